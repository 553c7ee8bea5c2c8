//! How a Host finds the TLSContext it terminates with, as in Emissary
//! (<https://www.getambassador.io/docs/emissary/latest/topics/running/tls/>):
//! the server certificate always comes from `tlsSecret`; the other settings
//! come from `tlsContext`, inline `tls`, a context named `<host>-context`, or
//! defaults.

use std::sync::Arc;

use pingora::utils::tls::CertKey;

use crate::config::diagnostics::{Named, Reporter};
use crate::config::load::RawResource;
use crate::config::resources::{HostSpec, SecretRef, TlsContextSpec};
use crate::tls::{self, CertKeyError, TlsContext};

use super::spec::{check_unknown_fields, parse_value};
use super::tls_context::{build, secret_data, TlsContexts, LATER, SUPPORTED};
use super::SecretStore;

/// `Ok(None)`: a cleartext Host. Problems are reported; the caller drops the
/// Host when any was an error.
pub fn resolve(
    raw: &RawResource,
    spec: &HostSpec,
    contexts: &TlsContexts,
    secrets: &SecretStore,
    report: &mut Reporter,
) -> Option<Arc<TlsContext>> {
    let Some(secret) = &spec.tls_secret else {
        if spec.tls_context.is_some() || spec.tls.is_some() {
            report
                .error(
                    "spec.tlsSecret",
                    "TLS settings without tlsSecret: nothing to terminate with",
                )
                .with_hint("tlsSecret names the Secret with the Host's certificate and key");
        }
        return None;
    };
    let server = server_certificate(secret, &raw.id.namespace, secrets, report)?;
    let base = base_context(raw, spec, contexts, secrets, report)?;
    let hostname = spec.hostname.as_deref().unwrap_or("*");
    if !context_fits(&base, &server, hostname, &raw.id.name, report) {
        return None;
    }
    let mut context = (*base).clone();
    context.cert_key = Some(server.cert_key);
    Some(Arc::new(context))
}

/// The certificate a Host serves, from its `tlsSecret`, and the Secret
/// that holds it for the diagnostics that name it.
struct ServerCertificate {
    cert_key: Arc<CertKey>,
    namespace: String,
    name: String,
}

/// `tlsSecret`: the server certificate always comes from it, whatever
/// context supplies the other settings.
fn server_certificate(
    secret: &SecretRef,
    host_namespace: &str,
    secrets: &SecretStore,
    report: &mut Reporter,
) -> Option<ServerCertificate> {
    let Some(secret_name) = secret.name.as_deref().filter(|n| !n.is_empty()) else {
        report.error("spec.tlsSecret.name", "tlsSecret needs a name");
        return None;
    };
    // Here `.` is part of the name: the namespace is its own field.
    let namespace = secret.namespace.as_deref().unwrap_or(host_namespace);
    let data = secret_data(
        secrets,
        namespace,
        secret_name,
        "spec.tlsSecret",
        "add the Secret to a file under `resources:`",
        report,
    )?;
    let (Some(chain), Some(key)) = (&data.cert_chain, &data.key) else {
        report
            .error(
                "spec.tlsSecret",
                format!("Secret {namespace}/{secret_name} needs tls.crt and tls.key"),
            )
            .caused_by(Named::secret(namespace, secret_name))
            .with_hint("a kubernetes.io/tls Secret, as `kubectl create secret tls` makes it");
        return None;
    };
    let server = match tls::cert_key(chain, key) {
        Ok(server) => Arc::new(server),
        Err(e) => {
            let owner = format!("Secret {namespace}/{secret_name}");
            let message = match e {
                CertKeyError::Certificate(m) => format!("tls.crt of {owner}: {m}"),
                CertKeyError::Key(m) => format!("tls.key of {owner}: {m}"),
                CertKeyError::Mismatch(subject) => {
                    format!(
                        "tls.key does not match the certificate in tls.crt of {owner} ({subject})"
                    )
                }
            };
            report
                .error("spec.tlsSecret", message)
                .caused_by(Named::secret(namespace, secret_name));
            return None;
        }
    };
    if let Some(expired) = tls::expired(server.leaf()) {
        report.warning(
            "spec.tlsSecret",
            format!(
                "certificate {} expired on {expired}",
                tls::describe(server.leaf())
            ),
        );
    }
    Some(ServerCertificate {
        cert_key: server,
        namespace: namespace.to_string(),
        name: secret_name.to_string(),
    })
}

/// The context the Host's other TLS settings come from: `tlsContext`,
/// inline `tls`, the context named `<host>-context`, or defaults.
fn base_context(
    raw: &RawResource,
    spec: &HostSpec,
    contexts: &TlsContexts,
    secrets: &SecretStore,
    report: &mut Reporter,
) -> Option<Arc<TlsContext>> {
    let host_name = &raw.id.name;
    Some(match (&spec.tls_context, &spec.tls) {
        (Some(_), Some(_)) => {
            report.error("spec.tls", "set either tls or tlsContext, not both");
            return None;
        }
        (Some(link), None) => {
            let Some(name) = link.name.as_deref() else {
                report.error("spec.tlsContext.name", "tlsContext needs a name");
                return None;
            };
            contexts.lookup(name, "spec.tlsContext.name", "this Host", report)?
        }
        (None, Some(inline)) => {
            let inline_spec: TlsContextSpec = parse_value(Some(inline), "spec.tls", report)?;
            check_unknown_fields(&inline_spec.other, "spec.tls", SUPPORTED, LATER, report);
            report.rebase("spec", "spec.tls");
            let context = build(
                &format!("{host_name}-context"),
                &raw.id.namespace,
                &inline_spec,
                secrets,
                report,
            );
            report.unrebase();
            Arc::new(context?)
        }
        // Emissary's deprecated implicit link. An invalid `<host>-context`
        // fails the Host: its settings (a client-certificate demand among
        // them) must not quietly become the defaults.
        (None, None) => {
            let implicit = format!("{host_name}-context");
            if contexts.invalid.contains_key(&implicit) {
                return contexts.lookup(&implicit, "spec", "this Host", report);
            }
            match contexts.valid.get(&implicit) {
                Some(context) => context.clone(),
                None => Arc::new(TlsContext::for_server(format!(
                    "{implicit}.{}",
                    raw.id.namespace
                ))),
            }
        }
    })
}

/// Whether the context can terminate with the Host's certificate: its own
/// certificate, if any, is the same one. A host list that leaves the Host
/// out is only warned about.
fn context_fits(
    base: &TlsContext,
    server: &ServerCertificate,
    hostname: &str,
    host_name: &str,
    report: &mut Reporter,
) -> bool {
    let (namespace, secret_name) = (&server.namespace, &server.name);
    if let Some(own) = &base.cert_key {
        if own.leaf().to_der().ok() != server.cert_key.leaf().to_der().ok() {
            let diagnostic = report
                .error(
                    "spec.tlsContext",
                    format!(
                        "Secret info mismatch: TLSContext {} has a certificate other than tlsSecret {namespace}/{secret_name}",
                        base.name
                    ),
                )
                .caused_by(Named::secret(namespace, secret_name))
                .with_hint("drop the context's secret, or point both at the same Secret");
            if let Some(secret) = &base.cert_secret {
                diagnostic.caused_by(secret.clone());
            }
            return false;
        }
    }
    if !base.hosts.is_empty() && !base.hosts.iter().any(|h| h == hostname || h == host_name) {
        report.warning(
            "spec.tlsContext",
            format!(
                "TLSContext {} lists hosts {:?}, which do not include {hostname}",
                base.name, base.hosts
            ),
        );
    }
    true
}
