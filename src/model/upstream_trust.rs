//! What `pingress -t` says about upstreams that are not verified: every
//! origination that ends up unverified under the gateway file's
//! `upstream_tls` is a warning naming the resource and the field that
//! asked for TLS, and one that cannot be verified as asked is an error (the
//! resource is left out).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::diagnostics::{Code, Diagnostic, Location, ResourceRef};
use crate::config::upstream_tls::UpstreamTlsConf;
use crate::tls::TlsContext;
use crate::upstream::service::ServiceAddr;
use crate::upstream::trust::Trust;

use super::Model;

/// One resource that originates TLS.
struct Origination<'m> {
    id: &'m ResourceRef,
    service: &'m ServiceAddr,
    tls: Option<&'m Arc<TlsContext>>,
    /// The field that names the service (`spec.service`, `spec.auth_service`).
    service_field: &'static str,
}

impl Origination<'_> {
    /// The field that asked for TLS: `tls` when it is set, else the
    /// service's `https://`.
    fn field(&self) -> &'static str {
        match (self.tls, self.service.https) {
            (None, true) => self.service_field,
            _ => "spec.tls",
        }
    }

    fn target(&self) -> String {
        match self.service.host.contains(':') {
            true => format!("[{}]:{}", self.service.host, self.service.port),
            false => format!("{}:{}", self.service.host, self.service.port),
        }
    }

    /// The error when the origination cannot be verified as asked.
    fn problem(&self, trust: Trust) -> Option<Diagnostic> {
        let has_ca = self.tls.is_some_and(|t| t.ca.is_some());
        let location = Location::Resource(self.id.clone());
        match trust {
            // A context CA on an IP address without `sni` is reported by
            // validation; nothing else is an error.
            _ if has_ca => None,
            Trust::ContextCaOnly => None,
            Trust::System => {
                let sni = self.tls.and_then(|t| t.sni.as_deref());
                (self.service.is_ip() && sni.is_none()).then(|| {
                    Diagnostic::error(
                        location,
                        format!(
                            "TLS to {} cannot be verified against the system trust store \
                             (upstream_tls.verify: system): an IP address gives no name to \
                             check the certificate against",
                            self.target()
                        ),
                    )
                    .field(self.field())
                    .hint(
                        "name a TLSContext in `tls` whose `sni` is the name in the \
                         upstream's certificate",
                    )
                })
            }
        }
    }

    /// The warning when the origination is not verified at all.
    fn unverified(&self, trust: Trust) -> Option<Diagnostic> {
        if trust == Trust::System || self.tls.is_some_and(|t| t.ca.is_some()) {
            return None;
        }
        let why = match self.tls {
            Some(context) => format!("TLSContext {} has no CA", context.name),
            None => "no TLSContext gives a CA".to_string(),
        };
        let fix = match self.tls {
            Some(_) => "give the TLSContext a ca_secret (or cacert_chain_file)",
            None => "name a TLSContext with a ca_secret in `tls`",
        };
        Some(
            Diagnostic::warning(
                Location::Resource(self.id.clone()),
                format!(
                    "TLS to {} is encrypted but the upstream is not verified: {why}",
                    self.target()
                ),
            )
            .code(Code::Insecure)
            .field(self.field())
            .hint(format!(
                "{fix}, or set `upstream_tls: {{verify: system}}` in the gateway file to verify \
                 upstreams without a CA against the system trust store"
            )),
        )
    }
}

/// Applies the gateway file's `upstream_tls` to a validated model: records
/// the trust for the clusters to come, drops what cannot be verified as
/// asked (an AuthService that cannot be used refuses every request, as an
/// invalid one does), and returns the diagnostics.
pub fn apply(model: &mut Model, conf: UpstreamTlsConf) -> Vec<Diagnostic> {
    let trust = Trust::from(conf);
    model.upstream_trust = trust;
    let mut diags = Vec::new();
    let mut dropped: Vec<ResourceRef> = Vec::new();
    let mut check = |origination: Origination| {
        if let Some(problem) = origination.problem(trust) {
            diags.push(problem);
            dropped.push(origination.id.clone());
        } else if let Some(warning) = origination.unverified(trust) {
            diags.push(warning);
        }
    };
    for mapping in &model.mappings {
        if mapping.originate_tls && mapping.redirect.is_none() {
            check(Origination {
                id: &mapping.id,
                service: &mapping.service,
                tls: mapping.tls.as_ref(),
                service_field: "spec.service",
            });
        }
    }
    for service in &model.auth_services.services {
        if service.originate_tls {
            check(Origination {
                id: &service.id,
                service: &service.service,
                tls: service.tls.as_ref(),
                service_field: "spec.auth_service",
            });
        }
    }
    for mapping in &model.tcp_mappings {
        if mapping.originate_tls {
            check(Origination {
                id: &mapping.id,
                service: &mapping.service,
                tls: mapping.tls.as_ref(),
                service_field: "spec.service",
            });
        }
    }
    let accepted = &mut model.accepted;
    model.mappings.retain(|m| keep(&m.id, &dropped, accepted));
    model
        .tcp_mappings
        .retain(|m| keep(&m.id, &dropped, accepted));
    let auth = &mut model.auth_services;
    if let Some(refused) = auth.services.iter().find(|s| dropped.contains(&s.id)) {
        auth.misconfigured.get_or_insert(refused.name.clone());
    }
    auth.services.retain(|s| keep(&s.id, &dropped, accepted));
    diags
}

/// Whether `id` stays; a dropped resource no longer counts as accepted.
fn keep(id: &ResourceRef, dropped: &[ResourceRef], accepted: &mut BTreeMap<String, usize>) -> bool {
    if !dropped.contains(id) {
        return true;
    }
    if let Some(count) = accepted.get_mut(&id.kind) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            accepted.remove(&id.kind);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_documents;
    use crate::config::upstream_tls::UpstreamVerify;

    fn model(yaml: &str) -> Model {
        let (mut raws, mut diags) = (Vec::new(), Vec::new());
        parse_documents(std::path::Path::new("t.yaml"), yaml, &mut raws, &mut diags);
        let (model, diags) =
            crate::model::validate(&raws, "default", &crate::filters::Registry::default());
        assert!(diags.iter().all(|d| !d.is_error()), "{diags:?}");
        model
    }

    const RESOURCES: &str = "\
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: plain-https, namespace: default}
spec: {prefix: /a/, service: https://upstream.example}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: by-ip, namespace: default}
spec: {prefix: /b/, service: https://10.0.0.1}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: cleartext, namespace: default}
spec: {prefix: /c/, service: upstream.example}
";

    #[test]
    fn without_system_trust_every_unverified_origination_warns() {
        let mut model = model(RESOURCES);
        let diags = apply(&mut model, UpstreamTlsConf::default());
        assert_eq!(model.upstream_trust, Trust::ContextCaOnly);
        assert_eq!(diags.len(), 2, "{diags:?}");
        assert!(diags.iter().all(|d| !d.is_error()
            && d.field.as_deref() == Some("spec.service")
            && d.message.contains("not verified")));
        assert_eq!(model.mappings.len(), 3);
    }

    #[test]
    fn with_system_trust_only_what_cannot_be_verified_is_reported() {
        let mut model = model(RESOURCES);
        let conf = UpstreamTlsConf {
            verify: UpstreamVerify::System,
        };
        let diags = apply(&mut model, conf);
        assert_eq!(model.upstream_trust, Trust::System);
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert!(diags[0].is_error() && diags[0].message.contains("10.0.0.1:443"));
        let names: Vec<&str> = model.mappings.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["plain-https.default", "cleartext.default"]);
        assert_eq!(model.accepted["Mapping"], 2);
    }
}
