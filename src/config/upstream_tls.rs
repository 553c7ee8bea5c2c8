//! `upstream_tls:` of the gateway file: how upstreams are verified when no
//! TLSContext gives a CA for them. A pingress setting, not an Emissary one:
//! the default keeps Emissary's behaviour, so migrated manifests work as
//! they did.
//!
//! ```yaml
//! upstream_tls:
//!   verify: system   # or none, the default
//! ```

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConf {
    #[serde(default)]
    pub verify: UpstreamVerify,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamVerify {
    /// Emissary's behaviour: only a TLSContext's CA verifies an upstream;
    /// without one the connection is encrypted, not authenticated, and
    /// `pingress -t` warns.
    #[default]
    None,
    /// Without a CA, the system trust store (OpenSSL's default paths)
    /// verifies the upstream's chain, and its name against the SNI.
    System,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let parse = |yaml: &str| serde_yaml::from_str::<UpstreamTlsConf>(yaml);
        assert_eq!(parse("{}").unwrap().verify, UpstreamVerify::None);
        assert_eq!(
            parse("verify: system").unwrap().verify,
            UpstreamVerify::System
        );
        assert_eq!(parse("verify: none").unwrap().verify, UpstreamVerify::None);
        assert!(parse("verify: always").is_err());
        assert!(parse("verfy: system").is_err());
    }
}
