//! `x-forwarded-client-cert` (XFCC), as the Module's
//! `forward_client_cert_details` and `set_current_client_cert_details` ask,
//! with Envoy's semantics: what the client sent is trusted only as far as
//! the mode says, and the gateway's own view of the client is appended or
//! set only on connections with a verified client certificate.

use crate::routing::path::{is_unreserved, push_escaped};
use crate::tls::edge::PeerCert;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XfccMode {
    /// Never forward the header (Envoy's default).
    #[default]
    Sanitize,
    /// Forward the client's header on mTLS connections only.
    ForwardOnly,
    /// On mTLS connections, append the client certificate's details.
    AppendForward,
    /// On mTLS connections, replace the header with them.
    SanitizeSet,
    /// Forward the client's header whatever the connection.
    AlwaysForwardOnly,
}

impl XfccMode {
    pub fn parse(text: &str) -> Option<XfccMode> {
        Some(match text {
            "SANITIZE" => XfccMode::Sanitize,
            "FORWARD_ONLY" => XfccMode::ForwardOnly,
            "APPEND_FORWARD" => XfccMode::AppendForward,
            "SANITIZE_SET" => XfccMode::SanitizeSet,
            "ALWAYS_FORWARD_ONLY" => XfccMode::AlwaysForwardOnly,
            _ => return None,
        })
    }
}

/// Which certificate details the gateway adds (Hash is always there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XfccFields {
    pub subject: bool,
    pub cert: bool,
    pub chain: bool,
    pub dns: bool,
    pub uri: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XfccPolicy {
    pub mode: XfccMode,
    pub fields: XfccFields,
}

impl XfccPolicy {
    /// Whether [`XfccPolicy::header`] can give a value at all, on a
    /// connection with or without a verified client certificate: in the
    /// default mode, never, and the client's lines need not be read.
    pub fn sends_any(&self, verified_peer: bool) -> bool {
        match self.mode {
            XfccMode::Sanitize => false,
            XfccMode::AlwaysForwardOnly => true,
            XfccMode::ForwardOnly | XfccMode::AppendForward | XfccMode::SanitizeSet => {
                verified_peer
            }
        }
    }

    /// The header value to send upstream, or `None` to send none.
    pub fn header(&self, from_client: Option<&str>, peer: Option<&PeerCert>) -> Option<String> {
        match (self.mode, peer) {
            (XfccMode::AlwaysForwardOnly, _) | (XfccMode::ForwardOnly, Some(_)) => {
                from_client.map(str::to_string)
            }
            (XfccMode::AppendForward, Some(peer)) => Some(match from_client {
                Some(existing) => format!("{existing},{}", self.element(peer)),
                None => self.element(peer),
            }),
            (XfccMode::SanitizeSet, Some(peer)) => Some(self.element(peer)),
            _ => None,
        }
    }

    /// One XFCC element, in Envoy's key order.
    fn element(&self, peer: &PeerCert) -> String {
        let mut parts = vec![format!("Hash={}", peer.sha256)];
        if self.fields.cert {
            parts.push(format!("Cert=\"{}\"", url_encode(&peer.pem)));
        }
        if self.fields.chain {
            parts.push(format!(
                "Chain=\"{}\"",
                url_encode(&format!("{}{}", peer.pem, peer.chain_pem))
            ));
        }
        if self.fields.subject {
            // RFC 2253 has escaped `"` and `\\` in the subject already, as
            // Envoy's subject is; escaping again would end the quoted value
            // early at an escaped quote.
            parts.push(format!("Subject=\"{}\"", peer.subject));
        }
        if self.fields.uri {
            parts.extend(peer.uris.iter().map(|u| format!("URI={}", value(u))));
        }
        if self.fields.dns {
            parts.extend(peer.dns.iter().map(|d| format!("DNS={}", value(d))));
        }
        parts.join(";")
    }
}

/// A SAN as an XFCC value: quoted, with `"` and `\\` escaped, when it holds
/// a character that delimits XFCC (`,` between elements, `;` between
/// pairs, `=` within one), so a certificate's name cannot add pairs or
/// elements of its own. Envoy writes them bare.
fn value(san: &str) -> std::borrow::Cow<'_, str> {
    if !san.contains([',', ';', '=', '"', '\\']) {
        return san.into();
    }
    let mut quoted = String::with_capacity(san.len() + 4);
    quoted.push('"');
    for c in san.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted.into()
}

/// Percent-encodes all but RFC 3986 unreserved characters, as Envoy encodes
/// PEM in XFCC.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for byte in text.bytes() {
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            push_escaped(&mut out, byte);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerCert {
        PeerCert {
            subject: "CN=alice,O=Example".into(),
            sha256: "ab12".into(),
            pem: "-----BEGIN CERTIFICATE-----\nMII=\n".into(),
            chain_pem: String::new(),
            dns: vec!["a.example".into()],
            uris: vec!["spiffe://example/alice".into()],
            not_before: 0,
            not_after: 0,
        }
    }

    fn policy(mode: XfccMode) -> XfccPolicy {
        XfccPolicy {
            mode,
            fields: XfccFields {
                subject: true,
                uri: true,
                dns: true,
                ..XfccFields::default()
            },
        }
    }

    #[test]
    fn modes() {
        let spoofed = Some("Hash=evil");
        let p = peer();
        assert_eq!(policy(XfccMode::Sanitize).header(spoofed, Some(&p)), None);
        assert_eq!(policy(XfccMode::ForwardOnly).header(spoofed, None), None);
        assert_eq!(
            policy(XfccMode::ForwardOnly)
                .header(spoofed, Some(&p))
                .as_deref(),
            spoofed
        );
        assert_eq!(
            policy(XfccMode::AlwaysForwardOnly)
                .header(spoofed, None)
                .as_deref(),
            spoofed
        );
        let own =
            "Hash=ab12;Subject=\"CN=alice,O=Example\";URI=spiffe://example/alice;DNS=a.example";
        assert_eq!(
            policy(XfccMode::SanitizeSet)
                .header(spoofed, Some(&p))
                .as_deref(),
            Some(own)
        );
        assert_eq!(policy(XfccMode::SanitizeSet).header(spoofed, None), None);
        assert_eq!(
            policy(XfccMode::AppendForward).header(spoofed, Some(&p)),
            Some(format!("Hash=evil,{own}"))
        );
        // `sends_any` is false exactly where `header` is None for any input.
        for mode in [
            XfccMode::Sanitize,
            XfccMode::ForwardOnly,
            XfccMode::AppendForward,
            XfccMode::SanitizeSet,
            XfccMode::AlwaysForwardOnly,
        ] {
            for peer in [None, Some(&p)] {
                let sends = policy(mode).header(spoofed, peer).is_some();
                assert_eq!(policy(mode).sends_any(peer.is_some()), sends, "{mode:?}");
            }
        }
    }

    #[test]
    fn names_cannot_add_pairs_or_elements() {
        let mut p = peer();
        // What tls::rfc2253 makes of CN `a"b,c`.
        p.subject = r#"CN=a\"b\,c"#.into();
        p.uris = vec!["spiffe://x,Hash=evil;By=me".into()];
        p.dns = vec!["a.example".into(), "b\"c".into()];
        assert_eq!(
            policy(XfccMode::SanitizeSet)
                .header(None, Some(&p))
                .unwrap(),
            r#"Hash=ab12;Subject="CN=a\"b\,c";URI="spiffe://x,Hash=evil;By=me";DNS=a.example;DNS="b\"c""#
        );
    }

    #[test]
    fn cert_is_url_encoded() {
        let mut with_cert = policy(XfccMode::SanitizeSet);
        with_cert.fields = XfccFields {
            cert: true,
            ..XfccFields::default()
        };
        assert_eq!(
            with_cert.header(None, Some(&peer())).unwrap(),
            "Hash=ab12;Cert=\"-----BEGIN%20CERTIFICATE-----%0AMII%3D%0A\""
        );
    }
}
