//! The `service:` of a Mapping: `[scheme://]host[.namespace][:port]` (§2.14).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceAddr {
    /// `https://` was written.
    pub https: bool,
    /// Host to resolve, namespace-qualified where Kubernetes would qualify it.
    pub host: String,
    pub port: u16,
    /// The port was written, not defaulted (the endpoint resolver then
    /// takes the endpoints' only port).
    pub explicit_port: bool,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceError {
    Empty,
    Scheme(String),
    Port(String),
    /// A path or query after the authority.
    Trailing(String),
    Host(String),
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceError::Empty => write!(f, "service is empty"),
            ServiceError::Scheme(s) => write!(f, "unknown scheme {s:?} (use http:// or https://)"),
            ServiceError::Port(p) => write!(f, "found invalid port for service: {p:?}"),
            ServiceError::Trailing(t) => {
                write!(f, "service must not carry a path or query ({t:?})")
            }
            ServiceError::Host(h) => write!(f, "invalid host {h:?} in service"),
        }
    }
}

impl ServiceAddr {
    /// Parses a service. `originate_tls` (a `tls:` context is set) changes the
    /// default port to 443; `namespace` qualifies bare names the way the
    /// Kubernetes service resolver does.
    pub fn parse(
        text: &str,
        originate_tls: bool,
        namespace: Option<&str>,
    ) -> Result<ServiceAddr, ServiceError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(ServiceError::Empty);
        }
        let (https, rest) = match text.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some((scheme, _)) => return Err(ServiceError::Scheme(scheme.to_string())),
            None => (false, text),
        };
        if let Some(index) = rest.find(['/', '?', '#']) {
            return Err(ServiceError::Trailing(rest[index..].to_string()));
        }
        let (host, port) = split_host_port(rest)?;
        if host.is_empty() || host.contains(['@', ' ', '{', '}']) {
            return Err(ServiceError::Host(host.to_string()));
        }
        let explicit_port = port.is_some();
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ServiceError::Port(p.to_string()))?,
            None if https || originate_tls => 443,
            None => 80,
        };
        let host = match namespace {
            Some(ns) if !host.contains(['.', ':']) && host != "localhost" => format!("{host}.{ns}"),
            _ => host.to_string(),
        };
        Ok(ServiceAddr {
            https,
            host,
            port,
            explicit_port,
        })
    }

    /// The host is a literal IP address (it cannot serve as an SNI name).
    pub fn is_ip(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }
}

fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), ServiceError> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| ServiceError::Host(authority.to_string()))?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|p| (host, Some(p)))
                .ok_or_else(|| ServiceError::Host(authority.to_string())),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ServiceAddr, ServiceError> {
        ServiceAddr::parse(s, false, Some("default"))
    }

    #[test]
    fn defaults_and_qualification() {
        let s = parse("quote").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.https),
            ("quote.default", 80, false)
        );
        let s = parse("https://quote.prod").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.https),
            ("quote.prod", 443, true)
        );
        let s = ServiceAddr::parse("quote:8080", true, None).unwrap();
        assert_eq!((s.host.as_str(), s.port), ("quote", 8080));
        assert_eq!(ServiceAddr::parse("quote", true, None).unwrap().port, 443);
        assert_eq!(parse("localhost:9").unwrap().host, "localhost");
        assert_eq!(parse("[::1]:81").unwrap().host, "::1");
    }

    #[test]
    fn rejects() {
        assert_eq!(
            parse("host:80.invalid"),
            Err(ServiceError::Port("80.invalid".into()))
        );
        assert_eq!(parse("host:0"), Err(ServiceError::Port("0".into())));
        assert!(matches!(parse("ftp://x"), Err(ServiceError::Scheme(_))));
        assert!(matches!(parse("x/path"), Err(ServiceError::Trailing(_))));
        assert!(matches!(
            parse("example.com}:443"),
            Err(ServiceError::Host(_))
        ));
        assert_eq!(parse(" "), Err(ServiceError::Empty));
    }
}
