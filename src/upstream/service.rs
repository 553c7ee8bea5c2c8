//! The `service:` of a Mapping: `[scheme://]host[.namespace][:port]`; an
//! `https://` scheme originates TLS and changes the default port to 443.

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
    /// A path or query after the authority, its query redacted.
    Trailing(String),
    Host(String),
    /// `user:password@` before the host; the service, redacted.
    Credentials(String),
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
            ServiceError::Credentials(shown) => write!(
                f,
                "service must not carry credentials ({shown:?}): the gateway never sends them"
            ),
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
        // Before anything is quoted back: `user:password@` must never
        // reach a diagnostic, a log or the admin diag.
        if rest.contains('@') {
            return Err(ServiceError::Credentials(redacted(text)));
        }
        if let Some(index) = rest.find(['/', '?', '#']) {
            return Err(ServiceError::Trailing(redacted(&rest[index..])));
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

/// `text` (a service, a URL) fit to quote in a diagnostic: what precedes
/// the last `@` (a user and password, which may hold any character) and
/// any query or fragment (tokens travel there) become `***`.
pub fn redacted(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    let rest = match rest.rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_string(),
    };
    match rest.find(['?', '#']) {
        Some(at) => format!("{scheme}{}{}***", &rest[..at], &rest[at..at + 1]),
        None => format!("{scheme}{rest}"),
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

    #[test]
    fn credentials_are_never_quoted() {
        for text in [
            "https://user:s3cret@example.com",
            "https://user:s3cret@example.com:8443",
            "user:s3cret@example.com",
            "https://u:s3c/ret@example.com/path",
            "https://u:s3c?ret@example.com",
            "https://example.com/path?token=s3cret",
            "https://example.com#s3cret",
        ] {
            let error = parse(text).unwrap_err();
            let shown = error.to_string();
            assert!(!shown.contains("s3cret"), "{text}: {shown}");
        }
        assert_eq!(
            parse("https://user:s3cret@example.com"),
            Err(ServiceError::Credentials("https://***@example.com".into()))
        );
        assert_eq!(
            parse("example.com/path?token=s3cret"),
            Err(ServiceError::Trailing("/path?***".into()))
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redacted("redis://:pw@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redacted("rediss://user:pw@host"), "rediss://***@host");
        assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
        assert_eq!(redacted("u:p@host"), "***@host");
        assert_eq!(redacted("redis://:a/b@host:6379"), "redis://***@host:6379");
        assert_eq!(redacted("https://h/p?q=1#f"), "https://h/p?***");
        assert_eq!(redacted("https://h#frag"), "https://h#***");
    }
}
