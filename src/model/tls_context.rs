//! TLSContext → [`TlsContext`]: certificates from a Secret or files, the CA
//! that verifies upstreams, SNI, ALPN and protocol bounds.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::sync::Arc;

use crate::config::diagnostics::{Diagnostic, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::{SecretBody, TlsContextSpec};
use crate::tls::{self, CertKeyError, SecretData, TlsContext};

use super::spec::{check_unknown_fields, parse_section};
use super::{count, SecretStore};

pub(crate) const SUPPORTED: &[&str] = &[
    "hosts",
    "secret",
    "cert_chain_file",
    "private_key_file",
    "ca_secret",
    "crl_secret",
    "cacert_chain_file",
    "cert_required",
    "alpn_protocols",
    "min_tls_version",
    "max_tls_version",
    "cipher_suites",
    "ecdh_curves",
    "sni",
    "secret_namespacing",
    "ambassador_id",
];
pub(crate) const LATER: &[&str] = &["redirect_cleartext_from"];

/// Validates every TLSContext.
pub fn validate_all(
    raws: &[&RawResource],
    secrets: &SecretStore,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut BTreeMap<String, usize>,
) -> TlsContexts {
    let mut contexts = TlsContexts::default();
    for raw in raws {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(spec) = parse_section::<TlsContextSpec>(raw, "spec", &mut report) else {
            continue;
        };
        check_unknown_fields(&spec.other, "spec", SUPPORTED, LATER, &mut report);
        let context = build(&raw.id.name, &raw.id.namespace, &spec, secrets, &mut report);
        let context = match (context, report.has_errors()) {
            (Some(context), false) => context,
            _ => {
                contexts.invalid.insert(raw.id.name.clone(), raw.id.clone());
                continue;
            }
        };
        if contexts.valid.contains_key(&raw.id.name) {
            report
                .error(
                    "metadata.name",
                    "another TLSContext has this name in another namespace",
                )
                .with_hint(
                    "Mappings name TLSContexts without a namespace: give each a unique name",
                );
            continue;
        }
        count(accepted, "TLSContext");
        contexts
            .valid
            .insert(raw.id.name.clone(), Arc::new(context));
    }
    contexts
}

/// The TLSContexts by name, because a Mapping's `tls:` names a context
/// without a namespace; the invalid ones are kept to explain why a Mapping
/// that names one is dropped.
#[derive(Debug, Default)]
pub struct TlsContexts {
    pub valid: HashMap<String, Arc<TlsContext>>,
    pub invalid: HashMap<String, ResourceRef>,
}

impl TlsContexts {
    /// The valid context `name`, or an error at `field` saying why there is
    /// none; `user` (e.g. "this Mapping") is dropped with it.
    pub(crate) fn lookup(
        &self,
        name: &str,
        field: &str,
        user: &str,
        report: &mut Reporter,
    ) -> Option<Arc<TlsContext>> {
        if let Some(context) = self.valid.get(name) {
            return Some(context.clone());
        }
        if let Some(invalid) = self.invalid.get(name) {
            report.error(
                field,
                format!(
                    "TLSContext {}/{name} is invalid (see {}); {user} is dropped with it",
                    invalid.namespace, invalid.source
                ),
            );
            return None;
        }
        let mut known: Vec<&str> = self.valid.keys().map(String::as_str).collect();
        known.sort_unstable();
        let hint = if known.is_empty() {
            "no TLSContext is defined".to_string()
        } else {
            format!("defined TLSContexts: {}", known.join(", "))
        };
        report
            .error(field, format!("no TLSContext named {name:?}"))
            .with_hint(hint);
        None
    }
}

/// Reads a Secret's PEM material. `name` and `namespace` are already split.
pub(crate) fn secret_data(
    secrets: &SecretStore,
    namespace: &str,
    name: &str,
    field: &str,
    hint: &str,
    report: &mut Reporter,
) -> Option<SecretData> {
    let Some(secret) = secrets.get(&(namespace.to_string(), name.to_string())) else {
        report
            .error(field, format!("Secret {namespace}/{name} unknown"))
            .with_hint(hint);
        return None;
    };
    let decoded =
        serde_yaml::from_value::<SecretBody>(serde_yaml::Value::Mapping(secret.body.clone()))
            .map_err(|e| e.to_string())
            .and_then(|body| SecretData::decode(&body));
    match decoded {
        Ok(data) => Some(data),
        Err(e) => {
            report.error(field, format!("Secret {namespace}/{name}: {e}"));
            None
        }
    }
}

/// Builds a context from its spec; `name` and `namespace` are its own.
pub(crate) fn build(
    name: &str,
    namespace: &str,
    spec: &TlsContextSpec,
    secrets: &SecretStore,
    report: &mut Reporter,
) -> Option<TlsContext> {
    let namespacing = spec.secret_namespacing.unwrap_or(true);
    let lookup = |field: &str, reference: &str, report: &mut Reporter| -> Option<SecretData> {
        let (secret_name, secret_namespace) = split_secret_name(reference, namespace, namespacing);
        let hint = if namespacing && reference.contains('.') {
            "with secret_namespacing (the default) a `.` separates name and namespace; \
             set secret_namespacing: false for names that contain dots"
        } else {
            "add the Secret to a file under `resources:`"
        };
        secret_data(
            secrets,
            &secret_namespace,
            &secret_name,
            field,
            hint,
            report,
        )
    };

    let mut chain_pem = None;
    let mut key_pem = None;
    let mut ca_pem = None;
    match (&spec.secret, &spec.cert_chain_file, &spec.private_key_file) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            report.error(
                "spec.secret",
                "set either secret or cert_chain_file/private_key_file, not both",
            );
        }
        (Some(reference), None, None) => {
            if let Some(data) = lookup("spec.secret", reference, report) {
                if data.cert_chain.is_none() {
                    report.error("spec.secret", format!("Secret {reference} has no tls.crt"));
                }
                if data.key.is_none() {
                    report.error("spec.secret", format!("Secret {reference} has no tls.key"));
                }
                chain_pem = data.cert_chain;
                key_pem = data.key;
                ca_pem = data.ca;
            }
        }
        (None, Some(chain), Some(key)) => {
            chain_pem = read_file("spec.cert_chain_file", chain, report);
            key_pem = read_file("spec.private_key_file", key, report);
        }
        (None, Some(_), None) => {
            report.error(
                "spec.private_key_file",
                "cert_chain_file needs private_key_file",
            );
        }
        (None, None, Some(_)) => {
            report.error(
                "spec.cert_chain_file",
                "private_key_file needs cert_chain_file",
            );
        }
        (None, None, None) => {}
    }
    match (&spec.ca_secret, &spec.cacert_chain_file) {
        (Some(_), Some(_)) => {
            report.error(
                "spec.ca_secret",
                "set either ca_secret or cacert_chain_file, not both",
            );
        }
        (Some(reference), None) => {
            if let Some(data) = lookup("spec.ca_secret", reference, report) {
                match data.ca_bundle() {
                    Some(bundle) => ca_pem = Some(bundle.to_vec()),
                    None => {
                        report
                            .error(
                                "spec.ca_secret",
                                format!("Secret {reference} has no CA certificate"),
                            )
                            .with_hint("put the CA bundle under tls.crt (or ca.crt)");
                    }
                }
            }
        }
        (None, Some(path)) => ca_pem = read_file("spec.cacert_chain_file", path, report),
        (None, None) => {}
    }

    let cert_key = match (&chain_pem, &key_pem) {
        (Some(chain), Some(key)) => match tls::cert_key(chain, key) {
            Ok(cert_key) => Some(Arc::new(cert_key)),
            Err(e) => {
                // Name the exact place of each PEM: a Secret key or a file.
                let (field, cert_origin, key_origin, owner) = match &spec.secret {
                    Some(secret) => {
                        let (name, namespace) = split_secret_name(secret, namespace, namespacing);
                        (
                            "spec.secret",
                            "tls.crt".to_string(),
                            "tls.key".to_string(),
                            format!(" of Secret {namespace}/{name}"),
                        )
                    }
                    None => (
                        "spec.cert_chain_file",
                        spec.cert_chain_file.clone().unwrap_or_default(),
                        spec.private_key_file.clone().unwrap_or_default(),
                        String::new(),
                    ),
                };
                match e {
                    CertKeyError::Certificate(m) => {
                        report.error(field, format!("{cert_origin}{owner}: {m}"));
                    }
                    CertKeyError::Key(m) => {
                        report.error(field, format!("{key_origin}{owner}: {m}"));
                    }
                    CertKeyError::Mismatch(subject) => {
                        report
                            .error(
                                field,
                                format!("{key_origin} does not match the certificate in {cert_origin}{owner} ({subject})"),
                            )
                            .with_hint("the key must be the private key of the first (leaf) certificate of the chain");
                    }
                }
                None
            }
        },
        _ => None,
    };
    if let Some(cert_key) = &cert_key {
        if let Some(expired) = tls::expired(cert_key.leaf()) {
            report.warning(
                "spec",
                format!(
                    "certificate {} expired on {expired}",
                    tls::describe(cert_key.leaf())
                ),
            );
        }
    }

    let crl = match &spec.crl_secret {
        None => None,
        Some(reference) => lookup("spec.crl_secret", reference, report).and_then(|data| {
            let Some(pem) = data.crl else {
                report
                    .error(
                        "spec.crl_secret",
                        format!("Secret {reference} has no crl.pem"),
                    )
                    .with_hint("an Opaque Secret with the CRL in PEM under crl.pem");
                return None;
            };
            match openssl::x509::X509Crl::from_pem(&pem) {
                Ok(_) => Some(Arc::new(pem)),
                _ => {
                    report.error(
                        "spec.crl_secret",
                        format!("crl.pem of Secret {reference} is not a PEM CRL"),
                    );
                    None
                }
            }
        }),
    };
    if crl.is_some() && ca_pem.is_none() {
        report.error(
            "spec.crl_secret",
            "a CRL needs a CA to check client certificates against",
        );
    }

    let ca = match &ca_pem {
        Some(pem) => match tls::parse_chain(pem) {
            Ok(certs) => Some(Arc::new(certs.into_boxed_slice())),
            Err(e) => {
                report.error("spec.ca_secret", format!("CA bundle: {e}"));
                None
            }
        },
        None => None,
    };

    let alpn = spec.alpn_protocols.as_deref().and_then(|text| {
        tls::parse_alpn(text)
            .map_err(|e| report.error("spec.alpn_protocols", e))
            .ok()
    });
    let version = |field: &str, value: &Option<String>, report: &mut Reporter| {
        value.as_deref().and_then(|v| {
            tls::parse_tls_version(v)
                .map_err(|e| report.error(field, e))
                .ok()
        })
    };
    let min_version = version("spec.min_tls_version", &spec.min_tls_version, report);
    let max_version = version("spec.max_tls_version", &spec.max_tls_version, report);
    if let (Some(min), Some(max)) = (min_version, max_version) {
        if crate::upstream::policy::version_rank(min) > crate::upstream::policy::version_rank(max) {
            report.error(
                "spec.min_tls_version",
                "min_tls_version is above max_tls_version",
            );
        }
    }
    let sni = spec.sni.clone().filter(|s| !s.is_empty());
    if spec.hosts.as_ref().is_some_and(|h| !h.is_empty()) {
        report
            .warning(
                "spec.hosts",
                "only TCPMappings whose host is listed here terminate TLS with this context",
            )
            .with_hint(
                "HTTPS termination comes from a Host: tlsSecret, and tlsContext for settings",
            );
    }
    // A context without a CA leaves its upstreams unverified unless the
    // gateway file trusts the system store: `upstream::trust` warns at each
    // Mapping, TCPMapping or AuthService that originates TLS with it.

    let pem = |v: &Option<Vec<u8>>| v.clone().unwrap_or_default();
    let alpn_text = spec.alpn_protocols.clone().unwrap_or_default();
    let bounds = format!(
        "{:?}/{:?}/{:?}",
        spec.min_tls_version, spec.max_tls_version, spec.cipher_suites
    );
    let curves = spec.ecdh_curves.as_ref().map(|c| c.join(":"));
    let identity = tls::identity_digest(&[
        &pem(&chain_pem),
        &pem(&key_pem),
        &pem(&ca_pem),
        alpn_text.as_bytes(),
        sni.as_deref().unwrap_or_default().as_bytes(),
        bounds.as_bytes(),
        curves.as_deref().unwrap_or_default().as_bytes(),
    ]);
    Some(TlsContext {
        name: format!("{name}.{namespace}"),
        cert_key,
        ca,
        cert_required: spec.cert_required.unwrap_or(false),
        alpn_protocols: spec
            .alpn_protocols
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        hosts: spec.hosts.clone().unwrap_or_default(),
        crl,
        sni,
        alpn,
        min_version,
        max_version,
        cipher_suites: spec.cipher_suites.clone().unwrap_or_default(),
        curves,
        identity,
    })
}

fn read_file(field: &str, path: &str, report: &mut Reporter) -> Option<Vec<u8>> {
    fs::read(path)
        .map_err(|e| report.error(field, format!("cannot read {path}: {e}")))
        .ok()
}

/// `name.namespace` splits at the last dot when namespacing is on (§3.1).
pub fn split_secret_name(
    name: &str,
    default_namespace: &str,
    namespacing: bool,
) -> (String, String) {
    match name.rsplit_once('.') {
        Some((secret, namespace)) if namespacing && !secret.is_empty() && !namespace.is_empty() => {
            (secret.to_string(), namespace.to_string())
        }
        _ => (name.to_string(), default_namespace.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        assert_eq!(
            split_secret_name("certs", "default", true),
            ("certs".into(), "default".into())
        );
        assert_eq!(
            split_secret_name("certs.prod", "default", true),
            ("certs".into(), "prod".into())
        );
        assert_eq!(
            split_secret_name("istio.default.x", "ns", false),
            ("istio.default.x".into(), "ns".into())
        );
    }
}
