//! Certificates and keys: Secrets, PEM parsing, and the upstream (origination)
//! side of a TLSContext.
//!
//! PEM is parsed once, when the configuration is validated; a key that does
//! not belong to its certificate is a configuration error, not a failed
//! handshake at request time.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use openssl::error::ErrorStack;
use pingora::protocols::tls::{CustomALPN, ALPN};
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::ssl::SslVersion;
use pingora::tls::x509::X509;
use pingora::utils::tls::CertKey;

use crate::config::diagnostics::Named;
use crate::config::resources::SecretBody;

pub mod edge;

/// The PEM material a Secret carries, under the key names Emissary reads
/// (Kubernetes TLS and Istio), plus cert-manager's `ca.crt`, which Emissary
/// does not read.
#[derive(Debug, Clone, Default)]
pub struct SecretData {
    pub cert_chain: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    /// `root-cert.pem` (Istio) or `ca.crt` (cert-manager).
    pub ca: Option<Vec<u8>>,
    /// `crl.pem`.
    pub crl: Option<Vec<u8>>,
}

impl SecretData {
    /// Decodes `data` (base64) and `stringData` (plain). Errors name the key.
    pub fn decode(body: &SecretBody) -> Result<SecretData, Base64Error> {
        let mut values: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for (key, value) in &body.data {
            let text: String = value
                .as_deref()
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|error| Base64Error {
                    key: key.clone(),
                    error,
                })?;
            values.insert(key, bytes);
        }
        for (key, value) in &body.string_data {
            values.insert(key, value.clone().unwrap_or_default().into_bytes());
        }
        let pick = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| values.get(n).filter(|v| !v.is_empty()).cloned())
        };
        Ok(SecretData {
            cert_chain: pick(&["tls.crt", "cert-chain.pem"]),
            key: pick(&["tls.key", "key.pem", "user.key"]),
            ca: pick(&["root-cert.pem", "ca.crt"]),
            crl: pick(&["crl.pem"]),
        })
    }

    /// A CA Secret holds its bundle under `tls.crt` in Emissary; cert-manager
    /// and Istio put it under `ca.crt` / `root-cert.pem`.
    pub fn ca_bundle(&self) -> Option<&[u8]> {
        self.cert_chain.as_deref().or(self.ca.as_deref())
    }
}

/// A Secret's `data` value that is not base64. Where it breaks is said,
/// not the byte found there, which is part of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data.{key} is not valid base64: {}", base64_reason(.error))]
pub struct Base64Error {
    pub key: String,
    pub error: base64::DecodeError,
}

fn base64_reason(error: &base64::DecodeError) -> String {
    use base64::DecodeError;
    match error {
        DecodeError::InvalidByte(offset, _) => format!("invalid byte at offset {offset}"),
        DecodeError::InvalidLastSymbol(offset, _) => {
            format!("invalid last symbol at offset {offset}")
        }
        DecodeError::InvalidLength(length) => format!("invalid length {length}"),
        DecodeError::InvalidPadding => "invalid padding".to_string(),
    }
}

/// Parses a PEM chain, leaf first. Never empty on success.
pub fn parse_chain(pem: &[u8]) -> Result<Vec<X509>, ChainError> {
    let certs = X509::stack_from_pem(pem).map_err(ChainError::Unparsable)?;
    if certs.is_empty() {
        return Err(ChainError::Empty);
    }
    Ok(certs)
}

/// PEM that holds no certificate chain.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainError {
    #[error("cannot parse as PEM certificates: {0}")]
    Unparsable(ErrorStack),
    #[error("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")]
    Empty,
}

pub fn parse_key(pem: &[u8]) -> Result<PKey<Private>, KeyError> {
    PKey::private_key_from_pem(pem).map_err(KeyError)
}

/// PEM that holds no private key (OpenSSL's reason is the source, not the message).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot parse as a PEM private key (PKCS#1, PKCS#8 or SEC1 EC)")]
pub struct KeyError(#[source] pub ErrorStack);

/// Builds a CertKey after checking that the key belongs to the leaf.
pub fn cert_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertKey, CertKeyError> {
    let chain = parse_chain(chain_pem).map_err(CertKeyError::Certificate)?;
    let key = parse_key(key_pem).map_err(CertKeyError::Key)?;
    let matches = chain[0]
        .public_key()
        .map(|public| public.public_eq(&key))
        .unwrap_or(false);
    if !matches {
        return Err(CertKeyError::Mismatch(describe(&chain[0])));
    }
    Ok(CertKey::new(chain, key))
}

/// A certificate chain and key that cannot serve together.
#[derive(Debug, Clone)]
pub enum CertKeyError {
    Certificate(ChainError),
    Key(KeyError),
    /// The subject of the certificate the key does not match.
    Mismatch(String),
}

/// A one-line subject for messages, e.g. `CN=gateway, O=Example`.
pub fn describe(cert: &X509) -> String {
    let parts: Vec<String> = cert
        .subject_name()
        .entries()
        .filter_map(|entry| {
            let key = entry.object().nid().short_name().ok()?;
            let value = entry.data().to_string().ok()?;
            Some(format!("{key}={value}"))
        })
        .collect();
    parts.join(", ")
}

/// A name in RFC 2253 form, most specific first (`CN=alice,O=Example`), as
/// Envoy writes subjects in client-certificate headers.
pub fn rfc2253(name: &openssl::x509::X509NameRef) -> String {
    let mut parts: Vec<String> = name
        .entries()
        .filter_map(|entry| {
            let key = entry.object().nid().short_name().ok()?;
            let value = entry.data().to_string().ok()?;
            let mut escaped = String::with_capacity(value.len());
            for (i, c) in value.chars().enumerate() {
                let edge = (i == 0 && (c == ' ' || c == '#')) || (i == value.len() - 1 && c == ' ');
                if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
                    escaped.push('\\');
                }
                escaped.push(c);
            }
            Some(format!("{key}={escaped}"))
        })
        .collect();
    parts.reverse();
    parts.join(",")
}

/// Days until a certificate expires (negative when it already has).
/// The expiry date of a certificate that has expired, for messages.
pub fn expired(cert: &X509) -> Option<String> {
    let now = openssl::asn1::Asn1Time::days_from_now(0).ok()?;
    let left = now.diff(cert.not_after()).ok()?;
    // A diff is days plus seconds of the same sign: an hour ago is 0 days
    // and -3600 seconds.
    (left.days < 0 || left.secs < 0).then(|| cert.not_after().to_string())
}

/// Seconds since the Unix epoch.
pub fn unix_time(time: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(time).ok()?;
    Some(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

pub fn parse_tls_version(text: &str) -> Result<SslVersion, TlsVersionError> {
    Ok(match text {
        "v1.0" => SslVersion::TLS1,
        "v1.1" => SslVersion::TLS1_1,
        "v1.2" => SslVersion::TLS1_2,
        "v1.3" => SslVersion::TLS1_3,
        other => return Err(TlsVersionError(other.to_string())),
    })
}

/// A `min_tls_version` or `max_tls_version` that names no TLS version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a TLS version (v1.0, v1.1, v1.2, v1.3)")]
pub struct TlsVersionError(pub String);

/// `alpn_protocols` as Pingora understands it. Pingora offers h2, http/1.1,
/// both, or a single custom protocol (such as Istio's `istio`).
pub fn parse_alpn(text: &str) -> Result<ALPN, UpstreamAlpnError> {
    let protocols: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    Ok(match protocols.as_slice() {
        ["h2"] => ALPN::H2,
        ["http/1.1"] => ALPN::H1,
        ["h2", "http/1.1"] | ["http/1.1", "h2"] => ALPN::H2H1,
        [custom] if custom.len() <= 255 => {
            ALPN::Custom(CustomALPN::new(custom.as_bytes().to_vec()))
        }
        _ => return Err(UpstreamAlpnError(text.to_string())),
    })
}

/// An `alpn_protocols` that Pingora cannot offer upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: upstream ALPN may be h2, http/1.1, both, or one custom protocol")]
pub struct UpstreamAlpnError(pub String);

/// A validated TLSContext. Upstream, its certificate is the client
/// certificate and its CA verifies servers; at the edge (through a Host),
/// its certificate is the server's and its CA verifies clients.
#[derive(Debug, Clone)]
pub struct TlsContext {
    /// `name.namespace` of the TLSContext, for logs and diagnostics.
    pub name: String,
    pub cert_key: Option<Arc<CertKey>>,
    pub ca: Option<Arc<Box<[X509]>>>,
    /// At the edge: refuse clients without a certificate the CA signed.
    pub cert_required: bool,
    /// At the edge: revoked client certificates (PEM), checked for every
    /// certificate of the chain.
    pub crl: Option<Arc<Vec<u8>>>,
    /// `alpn_protocols` as written, for the edge.
    pub alpn_protocols: Vec<String>,
    /// SNI names the context claims (`hosts`); empty for origination only.
    pub hosts: Vec<String>,
    pub sni: Option<String>,
    pub alpn: Option<ALPN>,
    pub min_version: Option<SslVersion>,
    pub max_version: Option<SslVersion>,
    pub cipher_suites: Vec<String>,
    pub curves: Option<String>,
    /// A digest of everything above that changes what a connection may be
    /// used for. Pingora's pool key ignores the CA and ALPN and knows the
    /// client certificate only by serial, so this becomes the peer's
    /// `group_key` and keeps two contexts from sharing a pooled connection.
    pub identity: u64,
    /// The Secret the certificate was read from, if any: what a Host whose
    /// own certificate disagrees blames, so that a reload can put back the
    /// Secret an edit broke.
    pub cert_secret: Option<Named>,
}

impl TlsContext {
    /// A Host's context when nothing but its `tlsSecret` is configured.
    pub fn for_server(name: String) -> TlsContext {
        TlsContext {
            name,
            cert_key: None,
            ca: None,
            cert_required: false,
            crl: None,
            alpn_protocols: Vec::new(),
            hosts: Vec::new(),
            sni: None,
            alpn: None,
            min_version: None,
            max_version: None,
            cipher_suites: Vec::new(),
            curves: None,
            identity: 0,
            cert_secret: None,
        }
    }
}

/// Whether OpenSSL takes `ciphers` (a `:`-separated TLS 1.2 cipher list)
/// and `groups` (`:`-separated curves). It refuses a list it knows none of
/// when a handshake sets it, so a list is tried on a scratch context when
/// the configuration is read.
pub fn check_openssl_lists(
    ciphers: Option<&str>,
    groups: Option<&str>,
) -> Result<(), OpenSslListError> {
    let mut scratch =
        pingora::tls::ssl::SslContextBuilder::new(pingora::tls::ssl::SslMethod::tls())
            .map_err(OpenSslListError::Scratch)?;
    if let Some(ciphers) = ciphers {
        scratch
            .set_cipher_list(ciphers)
            .map_err(OpenSslListError::Ciphers)?;
    }
    if let Some(groups) = groups {
        scratch
            .set_groups_list(groups)
            .map_err(OpenSslListError::Groups)?;
    }
    Ok(())
}

/// A cipher or curve list OpenSSL does not take.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenSslListError {
    #[error("OpenSSL cannot make a TLS context: {0}")]
    Scratch(ErrorStack),
    #[error("OpenSSL takes none of these ciphers (TLS 1.3 suites are not set here): {0}")]
    Ciphers(ErrorStack),
    #[error("OpenSSL does not know all of these curves: {0}")]
    Groups(ErrorStack),
}

/// TLS versions from oldest to newest.
pub fn version_rank(version: SslVersion) -> u8 {
    [
        SslVersion::TLS1,
        SslVersion::TLS1_1,
        SslVersion::TLS1_2,
        SslVersion::TLS1_3,
    ]
    .iter()
    .position(|v| *v == version)
    .unwrap_or(0) as u8
}

impl TlsContext {
    /// Where a negotiated version stands against `min_tls_version` and
    /// `max_tls_version`: `Less` below the minimum, `Greater` above the
    /// maximum, `Equal` within.
    pub fn version_allowed(&self, version: SslVersion) -> std::cmp::Ordering {
        let rank = version_rank(version);
        if self.min_version.is_some_and(|min| rank < version_rank(min)) {
            std::cmp::Ordering::Less
        } else if self.max_version.is_some_and(|max| rank > version_rank(max)) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }
}

/// Digest of the parts of a context that change a connection's identity.
pub fn identity_digest(parts: &[&[u8]]) -> u64 {
    let mut hasher = openssl::sha::Sha256::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resources::SecretBody;

    #[test]
    fn secret_key_names() {
        let mut body = SecretBody::default();
        body.data
            .insert("cert-chain.pem".into(), Some("Y2hhaW4=".into()));
        body.data.insert("key.pem".into(), Some("a2V5\n".into()));
        body.string_data.insert("ca.crt".into(), Some("ca".into()));
        let data = SecretData::decode(&body).unwrap();
        assert_eq!(data.cert_chain.as_deref(), Some(&b"chain"[..]));
        assert_eq!(data.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(data.ca.as_deref(), Some(&b"ca"[..]));
    }

    /// The key and the offset are named; the byte found there, part of
    /// the secret, is not (`$` is byte 36).
    #[test]
    fn bad_base64_names_the_key_not_the_byte() {
        let mut body = SecretBody::default();
        body.data.insert("tls.key".into(), Some("QUJD$EFG".into()));
        let message = SecretData::decode(&body).unwrap_err().to_string();
        assert_eq!(
            message,
            "data.tls.key is not valid base64: invalid byte at offset 4"
        );
    }

    #[test]
    fn alpn_forms() {
        assert_eq!(parse_alpn("h2,http/1.1").unwrap(), ALPN::H2H1);
        assert!(matches!(parse_alpn("istio").unwrap(), ALPN::Custom(_)));
        assert!(parse_alpn("istio,h2").is_err());
        assert!(parse_alpn("").is_err());
    }

    #[test]
    fn garbage_pem_is_an_error_not_a_panic() {
        assert!(parse_chain(b"not pem").is_err());
        assert!(parse_key(b"not pem").is_err());
        assert!(matches!(
            cert_key(b"", b""),
            Err(CertKeyError::Certificate(_))
        ));
    }
}
