//! The Kubernetes objects the endpoint resolver reads (Service, Endpoints,
//! EndpointSlice) and the Emissary resolver kinds.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::config::diagnostics::{Code, Diagnostic, Reporter};
use crate::config::load::RawResource;
use crate::config::resources::{
    EndpointAddress, EndpointPort, EndpointSubset, IntOrString, KubeServiceSpec, SliceEndpoint,
};
use crate::upstream::cluster::ResolverKind;
use crate::upstream::endpoints::{EndpointGroup, EndpointIndex, ServicePort, TargetPort};

use super::count;
use super::spec::{check_unknown_fields, parse_section};

/// The API version each Kubernetes kind is read in.
pub const API_VERSIONS: &[(&str, &str)] = &[
    ("Service", "v1"),
    ("Endpoints", "v1"),
    ("EndpointSlice", "discovery.k8s.io/v1"),
];

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Resolvers by name. `kubernetes-service` and `kubernetes-endpoint` always
/// exist, as in Emissary.
#[derive(Debug, Clone)]
pub struct Resolvers(pub HashMap<String, ResolverKind>);

impl Default for Resolvers {
    fn default() -> Self {
        Resolvers(HashMap::from([
            ("kubernetes-service".to_string(), ResolverKind::Service),
            ("kubernetes-endpoint".to_string(), ResolverKind::Endpoint),
        ]))
    }
}

impl Resolvers {
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

pub fn validate_resolvers(
    raws: &[&RawResource],
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> Resolvers {
    let mut resolvers = Resolvers::default();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let kind = match raw.id.kind.as_str() {
            "KubernetesServiceResolver" => ResolverKind::Service,
            "KubernetesEndpointResolver" => ResolverKind::Endpoint,
            _ => ResolverKind::Consul,
        };
        let Some(spec) =
            parse_section::<BTreeMap<String, serde_yaml::Value>>(raw, "spec", &mut report)
        else {
            continue;
        };
        let known: &[&str] = match kind {
            ResolverKind::Consul => &["address", "datacenter", "ambassador_id"],
            _ => &["ambassador_id"],
        };
        let unknown: BTreeMap<String, serde_yaml::Value> = spec
            .into_iter()
            .filter(|(key, _)| !known.contains(&key.as_str()))
            .collect();
        check_unknown_fields(&unknown, "spec", known, &[], &mut report);
        if kind == ResolverKind::Consul {
            report
                .warning(
                    "kind",
                    "pingress has no Consul client: Mappings that name this resolver are invalid",
                )
                .with_hint(
                    "list the service's addresses as Kubernetes Endpoints and use a \
                     KubernetesEndpointResolver",
                );
        }
        if report.has_errors() {
            continue;
        }
        resolvers.0.insert(raw.id.name.clone(), kind);
        count(accepted, &raw.id.kind);
    }
    resolvers
}

/// Builds the endpoint index from Services, Endpoints and EndpointSlices.
/// A bad object is reported and left out alone.
pub fn validate_endpoints(
    raws: &[&RawResource],
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> EndpointIndex {
    let mut index = EndpointIndex::default();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let id = (raw.id.namespace.clone(), raw.id.name.clone());
        match raw.id.kind.as_str() {
            "Service" => {
                let Some(spec) = parse_section::<KubeServiceSpec>(raw, "spec", &mut report) else {
                    continue;
                };
                let ports = service_ports(&spec, &mut report);
                if !report.has_errors() {
                    index.add_service(id, ports);
                }
            }
            "Endpoints" => {
                let Some(subsets) =
                    parse_section::<Vec<EndpointSubset>>(raw, "subsets", &mut report)
                else {
                    continue;
                };
                let groups = subsets
                    .iter()
                    .enumerate()
                    .map(|(i, subset)| {
                        endpoints_subset(subset, &format!("subsets[{i}]"), &mut report)
                    })
                    .collect::<Vec<_>>();
                if report.has_errors() {
                    continue;
                }
                for group in groups {
                    index.add_group(id.clone(), group);
                }
            }
            _ => {
                let Some(service) = raw.labels.get(SERVICE_NAME_LABEL) else {
                    report
                        .error(
                            "metadata.labels",
                            format!("an EndpointSlice needs the label {SERVICE_NAME_LABEL}"),
                        )
                        .with_hint("it names the Service whose endpoints the slice lists");
                    continue;
                };
                let Some(group) = endpoint_slice(raw, &mut report) else {
                    continue;
                };
                if report.has_errors() {
                    continue;
                }
                index.add_group((raw.id.namespace.clone(), service.clone()), group);
            }
        }
        count(accepted, &raw.id.kind);
    }
    index
}

fn service_ports(spec: &KubeServiceSpec, report: &mut Reporter) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        if !tcp(&port.protocol) {
            continue;
        }
        if port.port == 0 {
            report.error(&format!("{field}.port"), "port 0 is not a port");
            continue;
        }
        let target = match &port.target_port {
            None => TargetPort::Number(port.port),
            Some(IntOrString::Int(0)) => {
                report.error(&format!("{field}.targetPort"), "port 0 is not a port");
                continue;
            }
            Some(IntOrString::Int(n)) => TargetPort::Number(*n),
            // Kubernetes sends numbers as strings now and then.
            Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                Ok(n) if n > 0 => TargetPort::Number(n),
                _ => TargetPort::Name(s.clone()),
            },
        };
        ports.push(ServicePort {
            name: port.name.clone().unwrap_or_default(),
            port: port.port,
            target,
        });
    }
    ports
}

/// Only TCP ports carry HTTP.
fn tcp(protocol: &Option<String>) -> bool {
    protocol
        .as_deref()
        .is_none_or(|p| p.eq_ignore_ascii_case("tcp"))
}

fn ports(list: &[EndpointPort], field: &str, report: &mut Reporter) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for (i, port) in list.iter().enumerate() {
        if !tcp(&port.protocol) {
            continue;
        }
        if port.port == 0 {
            report.error(&format!("{field}[{i}].port"), "port 0 is not a port");
            continue;
        }
        out.push((port.name.clone().unwrap_or_default(), port.port));
    }
    out
}

fn address(text: &str, field: &str, report: &mut Reporter) -> Option<IpAddr> {
    match text.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            report.error(field, format!("{text:?} is not an IP address"));
            None
        }
    }
}

fn endpoints_subset(subset: &EndpointSubset, field: &str, report: &mut Reporter) -> EndpointGroup {
    let check = |list: &[EndpointAddress], key: &str, report: &mut Reporter| -> Vec<IpAddr> {
        list.iter()
            .enumerate()
            .filter_map(|(i, a)| address(&a.ip, &format!("{field}.{key}[{i}].ip"), report))
            .collect()
    };
    let addresses = check(&subset.addresses, "addresses", report);
    // Not-ready addresses are still checked: a typo there is a typo.
    check(&subset.not_ready_addresses, "notReadyAddresses", report);
    EndpointGroup {
        addresses,
        ports: ports(&subset.ports, &format!("{field}.ports"), report),
    }
}

fn endpoint_slice(raw: &RawResource, report: &mut Reporter) -> Option<EndpointGroup> {
    let address_type = parse_section::<Option<String>>(raw, "addressType", report)?;
    match address_type.as_deref() {
        Some("IPv4" | "IPv6") => {}
        Some("FQDN") => {
            report
                .warning(
                    "addressType",
                    "FQDN endpoints are not supported by pingress; this slice is ignored",
                )
                .with_code(Code::Unsupported);
            return None;
        }
        Some(other) => {
            report
                .error("addressType", format!("{other:?} is not an address type"))
                .with_hint("IPv4 or IPv6");
            return None;
        }
        None => {
            report
                .error("addressType", "addressType is required")
                .with_hint("IPv4 or IPv6");
            return None;
        }
    }
    let endpoints = parse_section::<Vec<SliceEndpoint>>(raw, "endpoints", report)?;
    let port_list = parse_section::<Vec<EndpointPort>>(raw, "ports", report)?;
    let mut addresses = Vec::new();
    for (i, endpoint) in endpoints.iter().enumerate() {
        // Kubernetes: an unknown readiness counts as ready.
        let ready = endpoint
            .conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true);
        for (j, text) in endpoint.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            if let Some(ip) = address(text, &field, report) {
                if ready && !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    Some(EndpointGroup {
        addresses,
        ports: ports(&port_list, "ports", report),
    })
}
