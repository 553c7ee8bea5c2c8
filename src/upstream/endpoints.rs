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
    ) -> Result<Vec<SocketAddr>, EndpointError> {
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
        let (namespace, name) = (namespace.to_string(), name.to_string());
        if groups.is_empty() || ready == 0 {
            return Err(EndpointError::NoneReady { namespace, name });
        }
        let mut ports: Vec<u16> = groups
            .iter()
            .flat_map(|g| g.ports.iter().map(|(_, p)| *p))
            .collect();
        // Text order (10 before 9), the order the messages list them in.
        ports.sort_by_key(u16::to_string);
        ports.dedup();
        let ports = PortList(ports);
        Err(match (wanted, port) {
            (Some(sp), _) => EndpointError::NoPortForServicePort {
                namespace,
                name,
                service_port: sp.port,
                ports,
            },
            (None, Some(port)) => EndpointError::NoPort {
                namespace,
                name,
                port,
                ports,
            },
            (None, None) => EndpointError::SeveralPorts {
                namespace,
                name,
                ports,
            },
        })
    }
}

/// A Service whose endpoints give no address for a Mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("Service {namespace}/{name} has no port {port} (it has {ports})")]
    NoServicePort {
        namespace: String,
        name: String,
        port: u16,
        ports: PortList,
    },
    #[error(
        "Service {namespace}/{name} has several ports ({ports}); name one in the Mapping's service"
    )]
    SeveralServicePorts {
        namespace: String,
        name: String,
        ports: PortList,
    },
    #[error("no ready endpoints for service {name}.{namespace} in Endpoints or EndpointSlices")]
    NoneReady { namespace: String, name: String },
    #[error(
        "the endpoints of {name}.{namespace} have no port for Service port {service_port} \
         (endpoint ports: {ports})"
    )]
    NoPortForServicePort {
        namespace: String,
        name: String,
        service_port: u16,
        ports: PortList,
    },
    #[error(
        "the endpoints of {name}.{namespace} have no port {port} (they have {ports}); a Service \
         object would map the Mapping's port to its targetPort"
    )]
    NoPort {
        namespace: String,
        name: String,
        port: u16,
        ports: PortList,
    },
    #[error(
        "the endpoints of {name}.{namespace} have several ports ({ports}); name one in the \
         Mapping's service"
    )]
    SeveralPorts {
        namespace: String,
        name: String,
        ports: PortList,
    },
}

/// Port numbers, shown comma-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl std::fmt::Display for PortList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, port) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

/// The Service port a Mapping means: the one numbered `port`, or the only
/// one when it names none.
fn service_port<'p>(
    ports: &'p [ServicePort],
    port: Option<u16>,
    namespace: &str,
    name: &str,
) -> Result<&'p ServicePort, EndpointError> {
    let listed = || PortList(ports.iter().map(|p| p.port).collect());
    match port {
        Some(port) => {
            ports
                .iter()
                .find(|p| p.port == port)
                .ok_or_else(|| EndpointError::NoServicePort {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    port,
                    ports: listed(),
                })
        }
        None => match ports {
            [only] => Ok(only),
            _ => Err(EndpointError::SeveralServicePorts {
                namespace: namespace.to_string(),
                name: name.to_string(),
                ports: listed(),
            }),
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
