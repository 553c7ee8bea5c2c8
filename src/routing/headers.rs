//! Header edits of a route: `add_*_headers` with Envoy-style `%VARIABLE%`
//! values, and `remove_*_headers`.

use std::fmt::Write;
use std::net::SocketAddr;

use http::header::{HeaderName, HeaderValue};

use super::timefmt;
use crate::tls::edge::PeerCert;

/// What a header value can refer to, known per request.
pub struct RequestFacts<'a> {
    pub client_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    pub request_headers: &'a http::HeaderMap,
    /// The verified client certificate of a TLS connection.
    pub peer: Option<&'a PeerCert>,
    /// The SNI of a TLS connection.
    pub sni: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Literal(String),
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    DownstreamLocalPort,
    Protocol,
    Hostname,
    RequestHeader(HeaderName),
    RequestedServerName,
    PeerSubject,
    PeerFingerprint256,
    PeerUriSan,
    PeerDnsSan,
    /// Validity start or end of the client certificate, strftime format.
    PeerValidFrom(String),
    PeerValidUntil(String),
}

pub const SUPPORTED_VARIABLES: &str = "%DOWNSTREAM_REMOTE_ADDRESS%, \
    %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, %DOWNSTREAM_LOCAL_ADDRESS%, \
    %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%, %DOWNSTREAM_LOCAL_PORT%, %PROTOCOL%, %HOSTNAME%, \
    %REQ(header-name)%, %REQUESTED_SERVER_NAME%, %DOWNSTREAM_PEER_SUBJECT%, \
    %DOWNSTREAM_PEER_FINGERPRINT_256%, %DOWNSTREAM_PEER_URI_SAN%, %DOWNSTREAM_PEER_DNS_SAN%, \
    %DOWNSTREAM_PEER_CERT_V_START%, %DOWNSTREAM_PEER_CERT_V_END% (both optionally with a \
    strftime format in parentheses) and %% for a literal percent sign";

/// A header value, either fixed or rendered per request.
#[derive(Debug, Clone)]
pub enum HeaderTemplate {
    Fixed(HeaderValue),
    Rendered(Vec<Part>),
}

impl HeaderTemplate {
    /// Parses a configured value. Errors never quote the value, which may
    /// hold a credential; they say where the problem is.
    pub fn parse(text: &str) -> Result<HeaderTemplate, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            literal.push_str(&rest[..start]);
            let at = text.len() - rest.len() + start;
            let unterminated = || TemplateError::Unterminated { at };
            let after = &rest[start + 1..];
            if let Some(stripped) = after.strip_prefix('%') {
                literal.push('%');
                rest = stripped;
                continue;
            }
            // A variable may take an argument in parentheses, which may
            // itself hold `%` (a time format): the name ends at `(` or `%`.
            let name_end = after.find(['(', '%']).ok_or_else(unterminated)?;
            let end = if after[name_end..].starts_with('(') {
                after[name_end..]
                    .find(")%")
                    .map(|close| name_end + close + 1)
                    .ok_or_else(unterminated)?
            } else {
                name_end
            };
            let part = parse_variable(&after[..end])
                .map_err(|error| TemplateError::Variable { at, error })?;
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(part);
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if parts.is_empty() {
            return HeaderValue::from_str(&literal)
                .map(HeaderTemplate::Fixed)
                .map_err(|_| TemplateError::Value(invalid_value(text)));
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(HeaderTemplate::Rendered(parts))
    }

    pub fn render(&self, facts: &RequestFacts) -> Option<HeaderValue> {
        let parts = match self {
            HeaderTemplate::Fixed(value) => return Some(value.clone()),
            HeaderTemplate::Rendered(parts) => parts,
        };
        let mut out = String::new();
        for part in parts {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Literal(s) => write!(out, "{s}"),
                Part::DownstreamRemoteAddress => write_opt(&mut out, facts.client_addr),
                Part::DownstreamRemoteAddressWithoutPort => {
                    write_opt(&mut out, facts.client_addr.map(|a| a.ip()))
                }
                Part::DownstreamLocalAddress => write_opt(&mut out, facts.local_addr),
                Part::DownstreamLocalAddressWithoutPort => {
                    write_opt(&mut out, facts.local_addr.map(|a| a.ip()))
                }
                Part::DownstreamLocalPort => {
                    write_opt(&mut out, facts.local_addr.map(|a| a.port()))
                }
                Part::Protocol => write!(out, "{}", facts.protocol),
                Part::Hostname => write!(out, "{}", hostname()),
                Part::RequestedServerName => write_opt(&mut out, facts.sni),
                Part::PeerSubject => write_opt(&mut out, facts.peer.map(|p| &p.subject)),
                Part::PeerFingerprint256 => write_opt(&mut out, facts.peer.map(|p| &p.sha256)),
                Part::PeerUriSan => write_opt(&mut out, facts.peer.map(|p| p.uris.join(","))),
                Part::PeerDnsSan => write_opt(&mut out, facts.peer.map(|p| p.dns.join(","))),
                Part::PeerValidFrom(format) => write_opt(
                    &mut out,
                    facts.peer.map(|p| timefmt::format(p.not_before, format)),
                ),
                Part::PeerValidUntil(format) => write_opt(
                    &mut out,
                    facts.peer.map(|p| timefmt::format(p.not_after, format)),
                ),
                Part::RequestHeader(name) => {
                    if let Some(v) = facts
                        .request_headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                    {
                        out.push_str(v);
                    }
                    Ok(())
                }
            };
        }
        HeaderValue::from_str(&out).ok()
    }
}

fn write_opt<T: std::fmt::Display>(out: &mut String, value: Option<T>) -> std::fmt::Result {
    match value {
        Some(v) => write!(out, "{v}"),
        None => Ok(()),
    }
}

/// Why `text` is not a header value, without quoting it: configured
/// header values often hold credentials.
pub fn invalid_value(text: &str) -> InvalidValue {
    match text
        .bytes()
        .position(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
    {
        Some(at) => InvalidValue::ControlCharacter(at),
        None => InvalidValue::NonAscii,
    }
}

/// A configured header value HTTP does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    /// At this byte.
    #[error("not a valid header value: byte {0} is a control character (a line break?)")]
    ControlCharacter(usize),
    #[error("not a valid header value")]
    NonAscii,
}

/// A header value template that cannot be parsed; it never quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unterminated variable: the % at byte {at} of the value has no closing %; write %% for \
         a literal percent sign"
    )]
    Unterminated { at: usize },
    #[error("{error} (the variable at byte {at} of the value)")]
    Variable { at: usize, error: VariableError },
    #[error(transparent)]
    Value(InvalidValue),
}

/// A `%...%` variable pingress does not know, or with a bad argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VariableError {
    #[error("unknown variable")]
    Unknown,
    /// With the known name it resembles.
    #[error("unknown variable; did you mean %{0}%?")]
    Misspelt(&'static str),
    #[error(transparent)]
    TimeFormat(#[from] timefmt::TimeFormatError),
    #[error("%REQ(...)% does not name a valid header")]
    HeaderName,
}

/// The variable names of [`SUPPORTED_VARIABLES`], for suggestions.
const VARIABLE_NAMES: &[&str] = &[
    "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS",
    "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_PORT",
    "PROTOCOL",
    "HOSTNAME",
    "REQUESTED_SERVER_NAME",
    "DOWNSTREAM_PEER_SUBJECT",
    "DOWNSTREAM_PEER_FINGERPRINT_256",
    "DOWNSTREAM_PEER_URI_SAN",
    "DOWNSTREAM_PEER_DNS_SAN",
    "DOWNSTREAM_PEER_CERT_V_START",
    "DOWNSTREAM_PEER_CERT_V_END",
];

/// "unknown variable", with a known name it resembles; the text between
/// the `%`s is not quoted (it may be part of a password, not a variable).
fn unknown_variable(name: &str) -> VariableError {
    let name = name.split('(').next().unwrap_or(name);
    match crate::config::diagnostics::closest(name, VARIABLE_NAMES) {
        Some(known) => VariableError::Misspelt(known),
        None => VariableError::Unknown,
    }
}

fn parse_variable(name: &str) -> Result<Part, VariableError> {
    Ok(match name {
        "DOWNSTREAM_REMOTE_ADDRESS" => Part::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Part::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_LOCAL_ADDRESS" => Part::DownstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Part::DownstreamLocalAddressWithoutPort,
        "DOWNSTREAM_LOCAL_PORT" => Part::DownstreamLocalPort,
        "PROTOCOL" => Part::Protocol,
        "HOSTNAME" => Part::Hostname,
        "REQUESTED_SERVER_NAME" => Part::RequestedServerName,
        "DOWNSTREAM_PEER_SUBJECT" => Part::PeerSubject,
        "DOWNSTREAM_PEER_FINGERPRINT_256" => Part::PeerFingerprint256,
        "DOWNSTREAM_PEER_URI_SAN" => Part::PeerUriSan,
        "DOWNSTREAM_PEER_DNS_SAN" => Part::PeerDnsSan,
        "DOWNSTREAM_PEER_CERT_V_START" => Part::PeerValidFrom(timefmt::DEFAULT_FORMAT.into()),
        "DOWNSTREAM_PEER_CERT_V_END" => Part::PeerValidUntil(timefmt::DEFAULT_FORMAT.into()),
        _ if name.starts_with("DOWNSTREAM_PEER_CERT_V_") => {
            let (which, format) = name
                .strip_suffix(')')
                .and_then(|n| n.split_once('('))
                .ok_or_else(|| unknown_variable(name))?;
            match which {
                "DOWNSTREAM_PEER_CERT_V_START" | "DOWNSTREAM_PEER_CERT_V_END" => {
                    timefmt::check(format)?
                }
                _ => return Err(unknown_variable(which)),
            }
            match which {
                "DOWNSTREAM_PEER_CERT_V_START" => Part::PeerValidFrom(format.into()),
                _ => Part::PeerValidUntil(format.into()),
            }
        }
        _ => {
            let header = name
                .strip_prefix("REQ(")
                .and_then(|n| n.strip_suffix(')'))
                .ok_or_else(|| unknown_variable(name))?;
            let header = HeaderName::from_bytes(header.trim().as_bytes())
                .map_err(|_| VariableError::HeaderName)?;
            Part::RequestHeader(header)
        }
    })
}

fn hostname() -> &'static str {
    static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

#[derive(Debug, Clone)]
pub struct AddHeader {
    pub name: HeaderName,
    pub value: HeaderTemplate,
    /// Envoy's default: add another value rather than replace.
    pub append: bool,
}

/// The header edits applied in one direction.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub remove: Vec<HeaderName>,
    pub add: Vec<AddHeader>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(headers: &http::HeaderMap) -> RequestFacts<'_> {
        RequestFacts {
            client_addr: Some("10.1.2.3:4567".parse().unwrap()),
            local_addr: Some("127.0.0.1:8080".parse().unwrap()),
            protocol: "HTTP/1.1",
            request_headers: headers,
            peer: None,
            sni: None,
        }
    }

    #[test]
    fn fixed_values_stay_fixed() {
        match HeaderTemplate::parse("plain 100%% sure").unwrap() {
            HeaderTemplate::Fixed(v) => assert_eq!(v, "plain 100% sure"),
            other => panic!("expected a fixed value, got {other:?}"),
        }
        assert!(matches!(
            HeaderTemplate::parse("plain").unwrap(),
            HeaderTemplate::Fixed(_)
        ));
    }

    #[test]
    fn variables_render() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("alice"));
        let t = HeaderTemplate::parse(
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%|%DOWNSTREAM_REMOTE_ADDRESS%|%PROTOCOL%|%REQ(X-User)%|%%",
        )
        .unwrap();
        assert_eq!(
            t.render(&facts(&headers)).unwrap(),
            "10.1.2.3|10.1.2.3:4567|HTTP/1.1|alice|%"
        );
    }

    #[test]
    fn client_certificate_variables() {
        let headers = http::HeaderMap::new();
        let peer = PeerCert {
            subject: "CN=alice,O=Example".into(),
            sha256: "ab12".into(),
            pem: String::new(),
            chain_pem: String::new(),
            dns: vec!["a.example".into()],
            uris: vec!["spiffe://example/alice".into()],
            not_before: 1_636_549_920,
            not_after: 1_636_549_920 + 86_400,
        };
        let mut f = facts(&headers);
        f.peer = Some(&peer);
        f.sni = Some("a.example");
        let t = HeaderTemplate::parse(
            "%DOWNSTREAM_PEER_CERT_V_START%|%DOWNSTREAM_PEER_CERT_V_END(%b %e %H:%M:%S %Y %Z)%|\
             %DOWNSTREAM_PEER_SUBJECT%|%DOWNSTREAM_PEER_URI_SAN%|%REQUESTED_SERVER_NAME%",
        )
        .unwrap();
        assert_eq!(
            t.render(&f).unwrap(),
            "2021-11-10T13:12:00.000Z|Nov 11 13:12:00 2021 UTC|CN=alice,O=Example|\
             spiffe://example/alice|a.example"
        );
        // Without a client certificate the variables render empty.
        assert_eq!(t.render(&facts(&headers)).unwrap(), "||||");
        assert!(HeaderTemplate::parse("%DOWNSTREAM_PEER_CERT_V_START(%Q)%").is_err());
        assert!(HeaderTemplate::parse("%DOWNSTREAM_PEER_CERT_V_START(%Y").is_err());
    }

    #[test]
    fn bad_templates_are_errors() {
        assert!(HeaderTemplate::parse("%NOPE%")
            .unwrap_err()
            .to_string()
            .contains("unknown variable"));
        assert!(HeaderTemplate::parse("%PROTOCOL").is_err());
        assert!(HeaderTemplate::parse("bad\nvalue").is_err());
        assert_eq!(
            HeaderTemplate::parse("%PROTOCL%").unwrap_err().to_string(),
            "unknown variable; did you mean %PROTOCOL%? (the variable at byte 0 of the value)"
        );
    }

    #[test]
    fn errors_never_quote_the_value() {
        for value in [
            "Bearer s3cret\n",
            "Bearer s3cret%",
            "Bearer %s3cret%",
            "Bearer %s3cret(x)%",
            "Bearer %REQ(s3 cret)%",
            "Bearer %DOWNSTREAM_PEER_CERT_V_START(s3cret",
            "s3cret\r\nx-injected: 1",
        ] {
            let error = HeaderTemplate::parse(value).unwrap_err().to_string();
            assert!(
                !error.contains("s3cret") && !error.contains("s3 cret"),
                "{value:?}: {error}"
            );
        }
        assert_eq!(
            HeaderTemplate::parse("Bearer s3cret\n")
                .unwrap_err()
                .to_string(),
            "not a valid header value: byte 13 is a control character (a line break?)"
        );
    }
}
