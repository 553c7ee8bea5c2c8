//! Which upstreams are verified.
//!
//! A TLSContext with a CA verifies the upstream's chain and name. Without
//! one, Emissary verifies nothing, and neither does pingress unless the
//! gateway file says `upstream_tls: {verify: system}`: then the system
//! trust store (OpenSSL's default paths, which Pingora's connectors load)
//! verifies the chain, and the name is checked against the SNI. What
//! `pingress -t` says about the originations left unverified is the
//! model's (`model::upstream_trust`).

use crate::config::upstream_tls::{UpstreamTlsConf, UpstreamVerify};
use crate::tls::TlsContext;

/// How an upstream without a CA of its own is verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Trust {
    /// Only a TLSContext's CA verifies (Emissary's behaviour).
    #[default]
    ContextCaOnly,
    /// The system trust store verifies upstreams that have no CA.
    System,
}

impl From<UpstreamTlsConf> for Trust {
    fn from(conf: UpstreamTlsConf) -> Trust {
        match conf.verify {
            UpstreamVerify::None => Trust::ContextCaOnly,
            UpstreamVerify::System => Trust::System,
        }
    }
}

/// Whether a connection verifies against the system store: TLS is
/// originated and no context CA is there to verify with.
pub fn verifies_with_system(trust: Trust, originate_tls: bool, tls: Option<&TlsContext>) -> bool {
    trust == Trust::System && originate_tls && tls.is_none_or(|t| t.ca.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_verification_needs_tls_and_no_ca() {
        assert!(verifies_with_system(Trust::System, true, None));
        assert!(!verifies_with_system(Trust::System, false, None));
        assert!(!verifies_with_system(Trust::ContextCaOnly, true, None));
    }
}
