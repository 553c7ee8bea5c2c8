//! Endpoints of Kubernetes Services as the resource files describe them:
//! `Service` (for `port` → `targetPort`), `Endpoints` (v1) and
//! `EndpointSlice` (discovery.k8s.io/v1). This is what the
//! `KubernetesEndpointResolver` reads instead of a cluster API.
//!
//! Port selection, as kube-proxy and Emissary do it: a Mapping's port is a
//! port of the Service. With a `Service` object, its port names the endpoint
//! port (endpoint ports carry the Service port's name), else its numeric
//! `targetPort`. Without one, the Mapping's port must be an endpoint port
//! itself; a Mapping without a port takes the endpoints' only port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// A Service's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// `""` when unnamed, as Kubernetes leaves it for a single port.
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// Ready addresses that share a set of ports: one Endpoints subset or one
/// EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointGroup {
    pub addresses: Vec<IpAddr>,
    /// `(name, port)`; the name is `""` when unnamed.
    pub ports: Vec<(String, u16)>,
}

/// `(namespace, name)` of a Service.
pub type ServiceId = (String, String);

#[derive(Debug, Clone, Default)]
pub struct EndpointIndex {
    services: HashMap<ServiceId, Vec<ServicePort>>,
    groups: HashMap<ServiceId, Vec<EndpointGroup>>,
}

impl EndpointIndex {
    pub fn add_service(&mut self, id: ServiceId, ports: Vec<ServicePort>) {
        self.services.insert(id, ports);
    }

    pub fn add_group(&mut self, id: ServiceId, group: EndpointGroup) {
        self.groups.entry(id).or_default().push(group);
    }

    /// The ready endpoints of `namespace/name` for a Mapping's `port`
    /// (`None`: the Mapping named no port). `Err` says why there are none,
    /// for a warning; an empty `Ok` cannot happen.
    pub fn lookup(
        &self,
        namespace: &str,
        name: &str,
        port: Option<u16>,
    ) -> Result<Vec<SocketAddr>, String> {
        let id = (namespace.to_string(), name.to_string());
        let groups = self.groups.get(&id).map(Vec::as_slice).unwrap_or_default();
        let service = self.services.get(&id);
        let wanted = match service {
            Some(ports) => Some(service_port(ports, port, namespace, name)?),
            None => None,
        };
        let mut found: Vec<SocketAddr> = Vec::new();
        for group in groups {
            let chosen = match wanted {
                Some(service_port) => endpoint_port_for(service_port, &group.ports),
                None => match port {
                    Some(port) => group.ports.iter().any(|(_, p)| *p == port).then_some(port),
                    None => match group.ports.as_slice() {
                        [(_, only)] => Some(*only),
                        _ => None,
                    },
                },
            };
            if let Some(port) = chosen {
                for ip in &group.addresses {
                    let address = SocketAddr::new(*ip, port);
                    if !found.contains(&address) {
                        found.push(address);
                    }
                }
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
        let ready = groups.iter().map(|g| g.addresses.len()).sum::<usize>();
        Err(if groups.is_empty() || ready == 0 {
            format!(
                "no ready endpoints for service {name}.{namespace} in Endpoints or EndpointSlices"
            )
        } else {
            let mut ports: Vec<String> = groups
                .iter()
                .flat_map(|g| g.ports.iter().map(|(_, p)| p.to_string()))
                .collect();
            ports.sort();
            ports.dedup();
            match (wanted, port) {
                (Some(sp), _) => format!(
                    "the endpoints of {name}.{namespace} have no port for Service port {} \
                     (endpoint ports: {})",
                    sp.port,
                    ports.join(", ")
                ),
                (None, Some(port)) => format!(
                    "the endpoints of {name}.{namespace} have no port {port} (they have {}); \
                     a Service object would map the Mapping's port to its targetPort",
                    ports.join(", ")
                ),
                (None, None) => format!(
                    "the endpoints of {name}.{namespace} have several ports ({}); name one in \
                     the Mapping's service",
                    ports.join(", ")
                ),
            }
        })
    }
}

/// The Service port a Mapping means: the one numbered `port`, or the only
/// one when it names none.
fn service_port<'p>(
    ports: &'p [ServicePort],
    port: Option<u16>,
    namespace: &str,
    name: &str,
) -> Result<&'p ServicePort, String> {
    let listed = || {
        ports
            .iter()
            .map(|p| p.port.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match port {
        Some(port) => ports.iter().find(|p| p.port == port).ok_or_else(|| {
            format!(
                "Service {namespace}/{name} has no port {port} (it has {})",
                listed()
            )
        }),
        None => match ports {
            [only] => Ok(only),
            _ => Err(format!(
                "Service {namespace}/{name} has several ports ({}); name one in the Mapping's \
                 service",
                listed()
            )),
        },
    }
}

/// Endpoint ports carry the name of the Service port they serve; an
/// unnamed or hand-written one is found by the numeric targetPort.
fn endpoint_port_for(service_port: &ServicePort, ports: &[(String, u16)]) -> Option<u16> {
    if let Some((_, port)) = ports.iter().find(|(n, _)| *n == service_port.name) {
        return Some(*port);
    }
    match &service_port.target {
        TargetPort::Number(target) => ports.iter().find(|(_, p)| p == target).map(|(_, p)| *p),
        TargetPort::Name(target) => ports.iter().find(|(n, _)| n == target).map(|(_, p)| *p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn id() -> ServiceId {
        ("default".into(), "quote".into())
    }

    #[test]
    fn without_a_service_the_port_is_an_endpoint_port() {
        let mut index = EndpointIndex::default();
        index.add_group(
            id(),
            EndpointGroup {
                addresses: vec![ip("10.0.0.1"), ip("10.0.0.2")],
                ports: vec![("http".into(), 8080)],
            },
        );
        let found = index.lookup("default", "quote", Some(8080)).unwrap();
        assert_eq!(found.len(), 2);
        // No port: the only one.
        assert_eq!(index.lookup("default", "quote", None).unwrap(), found);
        assert!(index.lookup("default", "quote", Some(80)).is_err());
        assert!(index.lookup("other", "quote", None).is_err());
    }

    #[test]
    fn a_service_maps_its_port_to_the_target() {
        let mut index = EndpointIndex::default();
        index.add_service(
            id(),
            vec![
                ServicePort {
                    name: "web".into(),
                    port: 80,
                    target: TargetPort::Number(8080),
                },
                ServicePort {
                    name: "admin".into(),
                    port: 81,
                    target: TargetPort::Name("adm".into()),
                },
            ],
        );
        index.add_group(
            id(),
            EndpointGroup {
                addresses: vec![ip("10.0.0.1")],
                ports: vec![("web".into(), 8080), ("adm".into(), 9090)],
            },
        );
        let web = index.lookup("default", "quote", Some(80)).unwrap();
        assert_eq!(web, vec!["10.0.0.1:8080".parse().unwrap()]);
        let admin = index.lookup("default", "quote", Some(81)).unwrap();
        assert_eq!(admin, vec!["10.0.0.1:9090".parse().unwrap()]);
        assert!(index.lookup("default", "quote", Some(8080)).is_err());
        // Two Service ports: the Mapping must choose.
        assert!(index.lookup("default", "quote", None).is_err());
    }
}
