//! Replies the gateway gives by itself, and how proxy errors become statuses.
//! Every such reply has a short plain-text body that names its cause.

use bytes::Bytes;
use http::uri::PathAndQuery;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};

/// The `ErrorType::Custom` tag of an upstream TLS policy violation.
pub const TLS_POLICY: &str = "UpstreamTlsPolicy";

pub struct LocalReply {
    pub status: u16,
    /// A short tag for the access log.
    pub reason: &'static str,
    body: String,
    location: Option<String>,
    /// Envoy's `x-envoy-overloaded: true`, for circuit-breaker refusals.
    overloaded: bool,
}

impl LocalReply {
    fn new(status: u16, reason: &'static str, body: String) -> Self {
        LocalReply {
            status,
            reason,
            body,
            location: None,
            overloaded: false,
        }
    }

    pub fn no_listener() -> Self {
        Self::new(
            404,
            "no_listener",
            "no listener configuration for this port".into(),
        )
    }

    pub fn bad_path() -> Self {
        Self::new(400, "bad_path", "the request target is not a path".into())
    }

    pub fn escaped_slash() -> Self {
        Self::new(
            400,
            "escaped_slash",
            "escaped slashes are not allowed in the path".into(),
        )
    }

    pub fn no_host(host: &str) -> Self {
        Self::new(404, "no_host", format!("no Host matches {host:?}"))
    }

    pub fn no_route(method: &str, host: &str, path: &str) -> Self {
        Self::new(
            404,
            "no_route",
            format!("no Mapping matches {method} {host}{path}"),
        )
    }

    /// 421: the Host header names another Host than the TLS handshake's.
    pub fn misdirected(host: &str) -> Self {
        Self::new(
            421,
            "misdirected",
            format!("this connection's TLS certificate was chosen for another Host than {host:?}"),
        )
    }

    pub fn rejected_insecure() -> Self {
        // Emissary answers Reject with 404: the routes simply do not exist
        // for insecure requests.
        Self::new(
            404,
            "insecure_rejected",
            "this Host does not serve insecure requests".into(),
        )
    }

    pub fn https_redirect(host: &str, path: Option<&PathAndQuery>) -> Self {
        let target = format!("https://{host}{}", path.map(|p| p.as_str()).unwrap_or("/"));
        let mut reply = Self::redirect(301, target);
        reply.reason = "https_redirect";
        reply
    }

    /// A redirect Mapping's answer.
    pub fn redirect(status: u16, location: String) -> Self {
        let mut reply = Self::new(status, "redirect", format!("redirecting to {location}"));
        reply.location = Some(location);
        reply
    }

    /// 503 from an open circuit breaker.
    pub fn overloaded() -> Self {
        let mut reply = Self::new(
            503,
            "overloaded",
            "upstream overloaded: the circuit breaker is open".into(),
        );
        reply.overloaded = true;
        reply
    }

    pub fn failure(status: u16, cause: &'static str) -> Self {
        Self::new(status, "proxy_error", cause.to_string())
    }

    pub async fn send(self, session: &mut Session, server_name: Option<&str>) -> Result<()> {
        let body = Bytes::from(format!("{}\n", self.body));
        let mut header = ResponseHeader::build(self.status, Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        if let Some(location) = self.location {
            header.insert_header(http::header::LOCATION, location)?;
        }
        if self.overloaded {
            header.insert_header("x-envoy-overloaded", "true")?;
        }
        if let Some(server) = server_name {
            header.insert_header(http::header::SERVER, server)?;
        }
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await
    }
}

/// A failed proxy attempt, as the client and the metrics see it.
pub struct Failure {
    /// 0 means the client is gone and nothing can be sent.
    pub status: u16,
    pub cause: &'static str,
    /// `connect`, `tls`, `timeout`, `protocol`, `client` or `internal`.
    pub kind: &'static str,
}

/// Unreachable upstreams are 503, TLS failures 502, timeouts 504, as Envoy
/// answers them.
pub fn classify(e: &Error) -> Failure {
    use ErrorType::*;
    let failure = |status, cause, kind| Failure {
        status,
        cause,
        kind,
    };
    match e.etype() {
        HTTPStatus(503) => return failure(503, "no healthy upstream", "connect"),
        HTTPStatus(code) => return failure(*code, "gateway error", "internal"),
        _ => {}
    }
    match e.esource() {
        ErrorSource::Upstream => match e.etype() {
            ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | SocketError
            | BindError => failure(
                503,
                "upstream connect error: the upstream is unreachable",
                "connect",
            ),
            TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError
            | TLSWantX509Lookup => failure(502, "upstream TLS handshake failed", "tls"),
            Custom(TLS_POLICY) => {
                failure(502, "upstream TLS parameters violate the TLSContext", "tls")
            }
            ReadTimedout | WriteTimedout => failure(504, "upstream request timeout", "timeout"),
            _ => failure(502, "upstream connection error", "protocol"),
        },
        ErrorSource::Downstream => match e.etype() {
            WriteError | ReadError | ConnectionClosed => failure(0, "client went away", "client"),
            ReadTimedout => failure(408, "request timeout", "client"),
            _ => failure(400, "bad request", "client"),
        },
        ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
            Custom(TLS_POLICY) => {
                failure(502, "upstream TLS parameters violate the TLSContext", "tls")
            }
            _ => failure(500, "internal gateway error", "internal"),
        },
    }
}
