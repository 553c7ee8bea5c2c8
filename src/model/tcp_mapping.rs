//! TCPMapping validation
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/tcpmappings>):
//! the port, the service and its TLS, and, with `host`, the TLS Host or
//! TLSContext that terminates for that SNI.
//! How TCPMappings share ports with each other and with Listeners is
//! decided when the snapshot is compiled (`crate::snapshot::tcp`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::bounds;
use crate::config::diagnostics::{Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::{Milliseconds, TcpMappingSpec};
use crate::routing::table::HostIndex;
use crate::tls::TlsContext;
use crate::upstream::breaker::Thresholds;
use crate::upstream::service::ServiceAddr;

use super::mapping::{breaker_thresholds, origination, verifiable};
use super::spec::{check_unknown_fields, parse_section};
use super::{count, ModuleSettings, TlsContexts, VirtualHost};

const SUPPORTED: &[&str] = &[
    "port",
    "address",
    "service",
    "tls",
    "host",
    "weight",
    "idle_timeout_ms",
    "enable_ipv4",
    "enable_ipv6",
    "circuit_breakers",
    "ambassador_id",
];
const LATER: &[&str] = &["resolver", "stats_name", "cluster_tag"];

/// Envoy's tcp_proxy closes a connection idle this long when nothing says
/// otherwise (Emissary does not emit `idle_timeout_ms`, so its users get
/// this).
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct TcpMapping {
    pub id: ResourceRef,
    /// `name.namespace`, as logs and metrics name it.
    pub name: String,
    pub port: u16,
    /// `address`: the interface to bind, all when `None`.
    pub address: Option<IpAddr>,
    pub service: ServiceAddr,
    pub originate_tls: bool,
    /// The origination context (`tls`).
    pub tls: Option<Arc<TlsContext>>,
    /// `host`: the SNI this TCPMapping answers (lower case), with the
    /// context whose certificate terminates TLS for it.
    pub sni: Option<(String, Arc<TlsContext>)>,
    pub weight: Option<u32>,
    /// `None`: tunnels are never closed for idleness (`idle_timeout_ms: 0`).
    pub idle_timeout: Option<Duration>,
    pub breaker: Thresholds,
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
}

pub fn validate_all(
    raws: &[&RawResource],
    module: &ModuleSettings,
    contexts: &TlsContexts,
    hosts: &[VirtualHost],
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> Vec<TcpMapping> {
    let mut mappings = Vec::new();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(spec) = parse_section::<TcpMappingSpec>(raw, "spec", &mut report) else {
            continue;
        };
        let suggested = check_unknown_fields(&spec.other, "spec", SUPPORTED, LATER, &mut report);
        let mapping = validate(raw, &spec, module, contexts, hosts, &suggested, &mut report);
        if let (Some(mapping), false) = (mapping, report.has_errors()) {
            count(accepted, "TCPMapping");
            mappings.push(mapping);
        }
    }
    mappings
}

fn validate(
    raw: &RawResource,
    spec: &TcpMappingSpec,
    module: &ModuleSettings,
    contexts: &TlsContexts,
    hosts: &[VirtualHost],
    suggested: &[&str],
    report: &mut Reporter,
) -> Option<TcpMapping> {
    let port = match spec.port {
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        Some(p) => {
            report.error("spec.port", format!("{p} is not a port (1-65535)"));
            None
        }
        None => {
            if !suggested.contains(&"port") {
                report
                    .error("spec.port", "port is required")
                    .with_hint("the port the gateway listens on for this TCPMapping");
            }
            return None;
        }
    };
    let address = address(spec, report);
    let (context, originate_tls) = origination(spec.tls.as_ref(), "TCPMapping", contexts, report)?;
    let namespace = (!module.use_ambassador_namespace).then_some(raw.id.namespace.as_str());
    let service = super::mapping::service(
        spec.service.as_deref(),
        originate_tls,
        namespace,
        suggested,
        report,
    )?;
    // From here on every problem is reported before the TCPMapping is
    // dropped, so one `-t` run shows them all.
    verifiable(context.as_deref(), &service, report);
    let sni = spec
        .host
        .as_deref()
        .and_then(|host| terminating(host.trim(), contexts, hosts, report));
    if let Some(weight) = spec.weight.filter(|w| *w > 100) {
        report.error("spec.weight", format!("weight {weight} is above 100"));
    }
    let idle_timeout = idle_timeout(spec, report);
    let breaker = match &spec.circuit_breakers {
        Some(list) => breaker_thresholds(list, "spec.circuit_breakers", report),
        None => module.circuit_breakers,
    };
    let (enable_ipv4, enable_ipv6) = address_families(spec, module, report);
    let port = port.filter(|_| !report.has_errors())?;
    Some(TcpMapping {
        id: raw.id.clone(),
        name: format!("{}.{}", raw.id.name, raw.id.namespace),
        port,
        address,
        originate_tls: originate_tls || service.https,
        service,
        tls: context,
        sni,
        weight: spec.weight,
        idle_timeout,
        breaker,
        enable_ipv4,
        enable_ipv6,
    })
}

/// `address`: the interface to listen on, every one when unset.
fn address(spec: &TcpMappingSpec, report: &mut Reporter) -> Option<IpAddr> {
    let text = spec.address.as_deref()?;
    match text.trim().parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            report
                .error("spec.address", format!("{text:?} is not an IP address"))
                .with_hint("e.g. 127.0.0.1 or ::1; leave it out to listen on every address");
            None
        }
    }
}

/// `idle_timeout_ms`: when an idle tunnel closes; Envoy's hour when unset,
/// never when 0.
fn idle_timeout(spec: &TcpMappingSpec, report: &mut Reporter) -> Option<Duration> {
    let Some(value) = &spec.idle_timeout_ms else {
        return Some(DEFAULT_IDLE_TIMEOUT);
    };
    let ms = match value {
        Milliseconds::Number(ms) => Some(*ms),
        Milliseconds::Text(text) => text.trim().parse::<u64>().ok(),
    };
    if let Some(ms) = ms.filter(|ms| *ms > bounds::MAX_MILLISECONDS) {
        report
            .error("spec.idle_timeout_ms", bounds::too_many_milliseconds(ms))
            .with_hint("e.g. 30000 or \"30000\"; 0 never closes an idle tunnel");
    } else if ms.is_none() {
        let shown = match value {
            Milliseconds::Number(ms) => ms.to_string(),
            Milliseconds::Text(text) => format!("{text:?}"),
        };
        report
            .error(
                "spec.idle_timeout_ms",
                format!("{shown} is not a whole number of milliseconds"),
            )
            .with_hint("e.g. 30000 or \"30000\"; 0 never closes an idle tunnel");
    }
    ms.filter(|ms| *ms > 0).map(Duration::from_millis)
}

/// `enable_ipv4` and `enable_ipv6`, each the Module's when unset: which
/// of the service's addresses may be used.
fn address_families(
    spec: &TcpMappingSpec,
    module: &ModuleSettings,
    report: &mut Reporter,
) -> (bool, bool) {
    let enable_ipv4 = spec.enable_ipv4.unwrap_or(module.enable_ipv4);
    let enable_ipv6 = spec.enable_ipv6.unwrap_or(module.enable_ipv6);
    if !enable_ipv4 && !enable_ipv6 {
        report.error(
            "spec.enable_ipv4",
            "enable_ipv4 and enable_ipv6 are both false: no address could be used",
        );
    }
    (enable_ipv4, enable_ipv6)
}

/// Emissary's rule for a TCPMapping's `host`: a TLS Host whose hostname
/// glob matches it, else a TLSContext that lists it exactly in `hosts`.
fn terminating(
    host: &str,
    contexts: &TlsContexts,
    hosts: &[VirtualHost],
    report: &mut Reporter,
) -> Option<(String, Arc<TlsContext>)> {
    if host.is_empty() {
        report.error("spec.host", "host is empty");
        return None;
    }
    let sni = host.to_ascii_lowercase();
    if sni.contains(['*', ':', '/', ' ']) {
        report
            .error("spec.host", format!("{host:?} is not a server name"))
            .with_hint("host is the exact SNI a client sends, e.g. db.example.com");
        return None;
    }
    // The TLS Host that SNI would choose, as the handshake chooses it. An
    // invalid one keeps its names: no TLSContext serves them in its place.
    let tls_hosts: Vec<&VirtualHost> = hosts
        .iter()
        .filter(|h| h.tls.is_some() || h.invalid.is_some_and(|i| i.meant_tls))
        .collect();
    let chosen = HostIndex::new(tls_hosts.iter().map(|h| &h.hostname).enumerate())
        .select(Some(&sni))
        .and_then(|index| tls_hosts.get(index));
    if let Some(invalid) = chosen.filter(|h| h.invalid.is_some()) {
        report.error(
            "spec.host",
            format!(
                "Host {}/{} for {host:?} is invalid: the TCPMapping waits for it",
                invalid.namespace, invalid.name
            ),
        );
        return None;
    }
    let from_host = chosen.and_then(|h| h.tls.clone());
    let mut named: Vec<(&String, &Arc<TlsContext>)> = contexts
        .valid
        .iter()
        .filter(|(_, c)| {
            c.cert_key.is_some() && c.hosts.iter().any(|h| h.eq_ignore_ascii_case(&sni))
        })
        .collect();
    named.sort_by_key(|(name, _)| *name);
    match from_host.or_else(|| named.first().map(|(_, c)| (*c).clone())) {
        Some(context) => Some((sni, context)),
        None => {
            report
                .error(
                    "spec.host",
                    format!("no TLS Host and no TLSContext serves {host:?}: nothing to terminate TLS with"),
                )
                .with_hint(
                    "add a Host with this hostname and a tlsSecret, or a TLSContext with a \
                     certificate whose hosts list this name",
                );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key_coverage::{document, secret, self_signed, validate_yaml, Coverage};

    /// Each TCPMapping key changes the TCPMapping or is warned about,
    /// beside an origination TLSContext `upstream` and a terminating one
    /// for `tcp.example`.
    #[test]
    fn every_tcp_mapping_key_is_used_or_warned() {
        let pem = self_signed("tcp.example");
        let others = [
            secret("term", &[("tls.crt", &pem.cert), ("tls.key", &pem.key)]),
            document("TLSContext", "upstream", "sni: upstream.example"),
            document("TLSContext", "term", "secret: term\nhosts: [tcp.example]"),
        ]
        .concat();
        Coverage {
            base: "port: 9000\nservice: 127.0.0.1:8080\nambassador_id: [default]",
            listed: SUPPORTED,
            later: LATER,
            samples: &[
                ("port", "", "port: 9001"),
                ("address", "", "address: 127.0.0.1"),
                ("service", "", "service: 127.0.0.1:9090"),
                ("tls", "", "tls: upstream"),
                ("host", "", "host: tcp.example"),
                ("weight", "", "weight: 50"),
                ("idle_timeout_ms", "", "idle_timeout_ms: 1000"),
                ("enable_ipv4", "enable_ipv6: true", "enable_ipv4: false"),
                ("enable_ipv6", "", "enable_ipv6: true"),
                (
                    "circuit_breakers",
                    "",
                    "circuit_breakers: [{max_connections: 5}]",
                ),
                ("ambassador_id", "", "ambassador_id: [other]"),
            ],
            specs: &[("", &TcpMappingSpec::default())],
            ..Coverage::default()
        }
        .check(|spec| {
            let yaml = format!("{others}{}", document("TCPMapping", "t", spec));
            let (model, diags) = validate_yaml(&yaml, &crate::filters::Registry::default());
            (format!("{:?}", model.tcp_mappings), diags)
        });
    }
}
