//! TLSContext → [`TlsContext`]: certificates from a Secret or files, the CA
//! that verifies upstreams, SNI, ALPN and protocol bounds.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::sync::Arc;

use crate::config::diagnostics::{plain_words, Code, Diagnostic, Named, Reporter, ResourceRef};
use crate::config::load::RawResource;
use crate::config::resources::{SecretBody, TlsContextSpec};
use crate::tls::version_rank;
use crate::tls::{self, CertKeyError, SecretData, TlsContext};
use openssl::ssl::SslVersion;
use openssl::x509::X509;

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
                .with_code(Code::Conflict)
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
            report
                .error(
                    field,
                    format!(
                        "TLSContext {}/{name} is invalid (see {}); {user} is dropped with it",
                        invalid.namespace, invalid.source
                    ),
                )
                .caused_by(invalid.named());
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
            .with_code(Code::Reference)
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
            .caused_by(Named::secret(namespace, name))
            .with_hint(hint);
        return None;
    };
    let decoded =
        serde_yaml::from_value::<SecretBody>(serde_yaml::Value::Mapping(secret.body.clone()))
            // The body may be a PEM key written in the wrong place.
            .map_err(|e| plain_words(&e.to_string()))
            .and_then(|body| SecretData::decode(&body).map_err(|e| e.to_string()));
    match decoded {
        Ok(data) => Some(data),
        Err(e) => {
            report
                .error(field, format!("Secret {namespace}/{name}: {e}"))
                .caused_by(Named::secret(namespace, name));
            None
        }
    }
}

/// Builds a context from its spec; `name` and `namespace` are its own. The
/// steps run in the order their diagnostics are reported.
pub(crate) fn build(
    name: &str,
    namespace: &str,
    spec: &TlsContextSpec,
    secrets: &SecretStore,
    report: &mut Reporter,
) -> Option<TlsContext> {
    let refs = SecretRefs {
        secrets,
        namespace,
        namespacing: spec.secret_namespacing.unwrap_or(true),
    };
    let certificate = certificate_pems(spec, &refs, report);
    let pems = Pems {
        ca: ca_pem(spec, &refs, certificate.ca, report),
        ..certificate
    };
    let cert_key = match (&pems.chain, &pems.key) {
        (Some(chain), Some(key)) => tls::cert_key(chain, key)
            .map_err(|e| cert_key_error(spec, &refs, e, report))
            .ok()
            .map(Arc::new),
        _ => None,
    };
    if let Some(cert_key) = &cert_key {
        warn_if_expired(cert_key.leaf(), report);
    }
    let crl = crl(spec, &refs, report);
    if crl.is_some() && pems.ca.is_none() {
        let diagnostic = report.error(
            "spec.crl_secret",
            "a CRL needs a CA to check client certificates against",
        );
        if let Some(secret) = ca_secret(spec) {
            diagnostic.caused_by(refs.named(secret));
        }
    }
    let ca = match &pems.ca {
        Some(pem) => match tls::parse_chain(pem) {
            Ok(certs) => Some(Arc::new(certs.into_boxed_slice())),
            Err(e) => {
                let diagnostic = report.error("spec.ca_secret", format!("CA bundle: {e}"));
                if let Some(secret) = ca_secret(spec) {
                    diagnostic.caused_by(refs.named(secret));
                }
                None
            }
        },
        None => None,
    };
    let alpn = spec.alpn_protocols.as_deref().and_then(|text| {
        tls::parse_alpn(text)
            .map_err(|e| report.error("spec.alpn_protocols", e.to_string()))
            .ok()
    });
    let (min_version, max_version) = version_bounds(spec, report);
    let cipher_list = spec.cipher_suites.as_ref().map(|c| c.join(":"));
    let curves = spec.ecdh_curves.as_ref().map(|c| c.join(":"));
    if let Err(e) = tls::check_openssl_lists(cipher_list.as_deref(), curves.as_deref()) {
        let field = match e {
            tls::OpenSslListError::Groups(_) => "spec.ecdh_curves",
            _ => "spec.cipher_suites",
        };
        report.error(field, e.to_string());
    }
    if spec.cert_required == Some(true) && pems.ca.is_none() {
        // Without a CA, OpenSSL would be told to verify nothing: every
        // client, with or without a certificate, would be let in.
        let diagnostic = report
            .error(
                "spec.cert_required",
                "cert_required needs a CA to verify client certificates against",
            )
            .with_hint("set ca_secret or cacert_chain_file");
        if let Some(secret) = ca_secret(spec) {
            diagnostic.caused_by(refs.named(secret));
        }
    }
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

    let sni = spec.sni.clone().filter(|s| !s.is_empty());
    let identity = identity(spec, &pems, sni.as_deref(), curves.as_deref());
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
        cert_secret: spec.secret.as_deref().map(|secret| refs.named(secret)),
    })
}

/// How a TLSContext's Secret references resolve: a name without a
/// namespace is in the context's own.
struct SecretRefs<'a> {
    secrets: &'a SecretStore,
    namespace: &'a str,
    namespacing: bool,
}

impl SecretRefs<'_> {
    /// `reference` as (name, namespace).
    fn split(&self, reference: &str) -> (String, String) {
        split_secret_name(reference, self.namespace, self.namespacing)
    }

    /// The Secret `reference` names, to blame a problem with its content on.
    fn named(&self, reference: &str) -> Named {
        let (name, namespace) = self.split(reference);
        Named::secret(&namespace, &name)
    }

    /// The PEM material of the Secret `reference`, reported at `field`
    /// when there is none; a dotted name may have been read as
    /// name.namespace, and the hint says so.
    fn data(&self, field: &str, reference: &str, report: &mut Reporter) -> Option<SecretData> {
        let (name, namespace) = self.split(reference);
        let hint = if self.namespacing && reference.contains('.') {
            "with secret_namespacing (the default) a `.` separates name and namespace; \
             set secret_namespacing: false for names that contain dots"
        } else {
            "add the Secret to a file under `resources:`"
        };
        secret_data(self.secrets, &namespace, &name, field, hint, report)
    }
}

/// The PEM a context is built from, wherever each came from.
#[derive(Default)]
struct Pems {
    chain: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
}

/// The certificate chain and key, from `secret` or from
/// `cert_chain_file` and `private_key_file`; a `secret` may bring a CA too.
fn certificate_pems(spec: &TlsContextSpec, refs: &SecretRefs, report: &mut Reporter) -> Pems {
    match (&spec.secret, &spec.cert_chain_file, &spec.private_key_file) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            report.error(
                "spec.secret",
                "set either secret or cert_chain_file/private_key_file, not both",
            );
            Pems::default()
        }
        (Some(reference), None, None) => {
            let Some(data) = refs.data("spec.secret", reference, report) else {
                return Pems::default();
            };
            if data.cert_chain.is_none() {
                report
                    .error("spec.secret", format!("Secret {reference} has no tls.crt"))
                    .caused_by(refs.named(reference));
            }
            if data.key.is_none() {
                report
                    .error("spec.secret", format!("Secret {reference} has no tls.key"))
                    .caused_by(refs.named(reference));
            }
            Pems {
                chain: data.cert_chain,
                key: data.key,
                ca: data.ca,
            }
        }
        (None, Some(chain), Some(key)) => Pems {
            chain: read_file("spec.cert_chain_file", chain, report),
            key: read_file("spec.private_key_file", key, report),
            ca: None,
        },
        (None, Some(_), None) => {
            report.error(
                "spec.private_key_file",
                "cert_chain_file needs private_key_file",
            );
            Pems::default()
        }
        (None, None, Some(_)) => {
            report.error(
                "spec.cert_chain_file",
                "private_key_file needs cert_chain_file",
            );
            Pems::default()
        }
        (None, None, None) => Pems::default(),
    }
}

/// The CA from `ca_secret` or `cacert_chain_file`, which replaces the one
/// `secret` brought (`from_secret`) unless it cannot be had.
fn ca_pem(
    spec: &TlsContextSpec,
    refs: &SecretRefs,
    from_secret: Option<Vec<u8>>,
    report: &mut Reporter,
) -> Option<Vec<u8>> {
    match (&spec.ca_secret, &spec.cacert_chain_file) {
        (Some(_), Some(_)) => {
            report.error(
                "spec.ca_secret",
                "set either ca_secret or cacert_chain_file, not both",
            );
            from_secret
        }
        (Some(reference), None) => {
            let Some(data) = refs.data("spec.ca_secret", reference, report) else {
                return from_secret;
            };
            match data.ca_bundle() {
                Some(bundle) => Some(bundle.to_vec()),
                None => {
                    report
                        .error(
                            "spec.ca_secret",
                            format!("Secret {reference} has no CA certificate"),
                        )
                        .caused_by(refs.named(reference))
                        .with_hint("put the CA bundle under tls.crt (or ca.crt)");
                    from_secret
                }
            }
        }
        (None, Some(path)) => read_file("spec.cacert_chain_file", path, report),
        (None, None) => from_secret,
    }
}

/// The Secret the CA bundle was read from, as [`ca_pem`] chose it.
fn ca_secret(spec: &TlsContextSpec) -> Option<&str> {
    match (&spec.ca_secret, &spec.cacert_chain_file) {
        (Some(reference), None) => Some(reference),
        (None, Some(_)) => None,
        _ => spec.secret.as_deref(),
    }
}

/// An expired certificate is still served, as Envoy serves it, but the
/// clients that check it will refuse the connection.
fn warn_if_expired(leaf: &X509, report: &mut Reporter) {
    if let Some(expired) = tls::expired(leaf) {
        report.warning(
            "spec",
            format!("certificate {} expired on {expired}", tls::describe(leaf)),
        );
    }
}

/// Reports a chain or key that cannot be used, naming the exact place of
/// each PEM: a Secret key or a file.
fn cert_key_error(
    spec: &TlsContextSpec,
    refs: &SecretRefs,
    error: CertKeyError,
    report: &mut Reporter,
) {
    let secret = spec.secret.as_deref().map(|secret| refs.named(secret));
    let (field, cert_origin, key_origin, owner) = match &secret {
        Some(secret) => (
            "spec.secret",
            "tls.crt".to_string(),
            "tls.key".to_string(),
            format!(" of Secret {}/{}", secret.namespace, secret.name),
        ),
        None => (
            "spec.cert_chain_file",
            spec.cert_chain_file.clone().unwrap_or_default(),
            spec.private_key_file.clone().unwrap_or_default(),
            String::new(),
        ),
    };
    let diagnostic = match error {
        CertKeyError::Certificate(m) => report.error(field, format!("{cert_origin}{owner}: {m}")),
        CertKeyError::Key(m) => report.error(field, format!("{key_origin}{owner}: {m}")),
        CertKeyError::Mismatch(subject) => report
            .error(
                field,
                format!("{key_origin} does not match the certificate in {cert_origin}{owner} ({subject})"),
            )
            .with_hint("the key must be the private key of the first (leaf) certificate of the chain"),
    };
    if let Some(secret) = secret {
        diagnostic.caused_by(secret);
    }
}

/// `crl_secret`: the revoked client certificates, as PEM, from the
/// `crl.pem` of an Opaque Secret.
fn crl(spec: &TlsContextSpec, refs: &SecretRefs, report: &mut Reporter) -> Option<Arc<Vec<u8>>> {
    let reference = spec.crl_secret.as_ref()?;
    let data = refs.data("spec.crl_secret", reference, report)?;
    let Some(pem) = data.crl else {
        report
            .error(
                "spec.crl_secret",
                format!("Secret {reference} has no crl.pem"),
            )
            .caused_by(refs.named(reference))
            .with_hint("an Opaque Secret with the CRL in PEM under crl.pem");
        return None;
    };
    match openssl::x509::X509Crl::from_pem(&pem) {
        Ok(_) => Some(Arc::new(pem)),
        _ => {
            report
                .error(
                    "spec.crl_secret",
                    format!("crl.pem of Secret {reference} is not a PEM CRL"),
                )
                .caused_by(refs.named(reference));
            None
        }
    }
}

/// `min_tls_version` and `max_tls_version`, which must not cross.
fn version_bounds(
    spec: &TlsContextSpec,
    report: &mut Reporter,
) -> (Option<SslVersion>, Option<SslVersion>) {
    let mut version = |field: &str, value: &Option<String>| {
        value.as_deref().and_then(|v| {
            tls::parse_tls_version(v)
                .map_err(|e| report.error(field, e.to_string()))
                .ok()
        })
    };
    let min = version("spec.min_tls_version", &spec.min_tls_version);
    let max = version("spec.max_tls_version", &spec.max_tls_version);
    if let (Some(min), Some(max)) = (min, max) {
        if version_rank(min) > version_rank(max) {
            report.error(
                "spec.min_tls_version",
                "min_tls_version is above max_tls_version",
            );
        }
    }
    (min, max)
}

/// The digest behind [`TlsContext::identity`], of everything that decides
/// what a connection made with the context may be used for.
fn identity(spec: &TlsContextSpec, pems: &Pems, sni: Option<&str>, curves: Option<&str>) -> u64 {
    let pem = |v: &Option<Vec<u8>>| v.clone().unwrap_or_default();
    let alpn_text = spec.alpn_protocols.clone().unwrap_or_default();
    let bounds = format!(
        "{:?}/{:?}/{:?}",
        spec.min_tls_version, spec.max_tls_version, spec.cipher_suites
    );
    tls::identity_digest(&[
        &pem(&pems.chain),
        &pem(&pems.key),
        &pem(&pems.ca),
        alpn_text.as_bytes(),
        sni.unwrap_or_default().as_bytes(),
        bounds.as_bytes(),
        curves.unwrap_or_default().as_bytes(),
    ])
}

fn read_file(field: &str, path: &str, report: &mut Reporter) -> Option<Vec<u8>> {
    fs::read(path)
        .map_err(|e| report.error(field, format!("cannot read {path}: {e}")))
        .ok()
}

/// `name.namespace` splits at the last dot when namespacing is on, as in
/// Emissary; `secret_namespacing: false` keeps dotted (Istio) names whole.
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

    /// Each TLSContext key changes the context or is warned about, with
    /// real PEM behind the keys that name Secrets and files.
    #[test]
    fn every_tls_context_key_is_used_or_warned() {
        use crate::model::key_coverage::{document, secret, self_signed, validate_yaml, Coverage};

        let (a, b) = (self_signed("a.example"), self_signed("b.example"));
        let dir = tempfile::tempdir().unwrap();
        let path = |file: &str| dir.path().join(file).display().to_string();
        fs::write(path("tls.crt"), &a.cert).unwrap();
        fs::write(path("tls.key"), &a.key).unwrap();
        let files = format!(
            "{{cert_chain_file: {}, private_key_file: {}}}",
            path("tls.crt"),
            path("tls.key")
        );
        let ca_file = format!("cacert_chain_file: {}", path("tls.crt"));
        // `server.default` is Secret `server` with secret_namespacing, and
        // the Secret of that name without.
        let secrets = [
            secret("server", &[("tls.crt", &a.cert), ("tls.key", &a.key)]),
            secret(
                "server.default",
                &[("tls.crt", &b.cert), ("tls.key", &b.key)],
            ),
            secret("crl", &[("crl.pem", &a.crl)]),
        ]
        .concat();
        Coverage {
            base: "ambassador_id: [default]",
            listed: SUPPORTED,
            later: LATER,
            samples: &[
                ("hosts", "", "hosts: [a.example]"),
                ("secret", "", "secret: server"),
                ("cert_chain_file", "", &files),
                ("private_key_file", "", &files),
                ("ca_secret", "", "ca_secret: server"),
                ("crl_secret", "ca_secret: server", "crl_secret: crl"),
                ("cacert_chain_file", "", &ca_file),
                ("cert_required", "ca_secret: server", "cert_required: true"),
                ("alpn_protocols", "", "alpn_protocols: h2"),
                ("min_tls_version", "", "min_tls_version: v1.2"),
                ("max_tls_version", "", "max_tls_version: v1.2"),
                (
                    "cipher_suites",
                    "",
                    "cipher_suites: [ECDHE-ECDSA-AES128-GCM-SHA256]",
                ),
                ("ecdh_curves", "", "ecdh_curves: [X25519]"),
                ("sni", "", "sni: a.example"),
                (
                    "secret_namespacing",
                    "secret: server.default",
                    "secret_namespacing: false",
                ),
                ("ambassador_id", "", "ambassador_id: [other]"),
            ],
            specs: &[("", &TlsContextSpec::default())],
            ..Coverage::default()
        }
        .check(|spec| {
            let yaml = format!("{secrets}{}", document("TLSContext", "ctx", spec));
            let (model, diags) = validate_yaml(&yaml, &crate::filters::Registry::default());
            (format!("{:?}", model.tls_contexts.valid.get("ctx")), diags)
        });
    }
}
