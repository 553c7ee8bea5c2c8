//! Upstream TLS bounds. Pingora 0.9 offers no per-connection protocol or
//! cipher settings, so a TLSContext's `min_tls_version`, `max_tls_version`
//! and `cipher_suites` are enforced on what the handshake negotiated: a
//! connection outside them is refused before any request byte is sent.

use std::cmp::Ordering;

use pingora::tls::ssl::SslVersion;

use crate::tls::TlsContext;

fn version_of(name: &str) -> Option<SslVersion> {
    Some(match name {
        "TLSv1" => SslVersion::TLS1,
        "TLSv1.1" => SslVersion::TLS1_1,
        "TLSv1.2" => SslVersion::TLS1_2,
        "TLSv1.3" => SslVersion::TLS1_3,
        _ => return None,
    })
}

/// Checks the negotiated version and cipher against the context.
pub fn check_negotiated(
    tls: &TlsContext,
    version: &str,
    cipher: &str,
) -> Result<(), TlsPolicyError> {
    if let Some(negotiated) = version_of(version) {
        match tls.version_allowed(negotiated) {
            Ordering::Less => {
                return Err(TlsPolicyError::BelowMin {
                    version: version.to_string(),
                    context: tls.name.clone(),
                })
            }
            Ordering::Greater => {
                return Err(TlsPolicyError::AboveMax {
                    version: version.to_string(),
                    context: tls.name.clone(),
                })
            }
            Ordering::Equal => {}
        }
        // cipher_suites constrain TLS 1.2 and below, as in Envoy.
        let tls13 = negotiated == SslVersion::TLS1_3;
        if !tls13 && !tls.cipher_suites.is_empty() && !tls.cipher_suites.iter().any(|c| c == cipher)
        {
            return Err(TlsPolicyError::Cipher {
                cipher: cipher.to_string(),
                context: tls.name.clone(),
            });
        }
    }
    Ok(())
}

/// An upstream handshake outside its TLSContext's bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsPolicyError {
    #[error("upstream negotiated {version}, below min_tls_version of {context}")]
    BelowMin { version: String, context: String },
    #[error("upstream negotiated {version}, above max_tls_version of {context}")]
    AboveMax { version: String, context: String },
    #[error("upstream negotiated cipher {cipher}, not in cipher_suites of {context}")]
    Cipher { cipher: String, context: String },
}
