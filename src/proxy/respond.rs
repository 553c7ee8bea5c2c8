//! Replies the gateway gives by itself, and how proxy errors become statuses.
//! Every reply of the gateway's own has a short plain-text body that names
//! its cause.

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, SERVER};
use http::uri::PathAndQuery;
use http::HeaderValue;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};

use crate::routing::path::PathError;

/// The `ErrorType::Custom` tag of an upstream TLS policy violation.
pub const TLS_POLICY: &str = "UpstreamTlsPolicy";

/// The `ErrorType::Custom` tag of a pooled connection refused for being
/// older than its cluster's `cluster_max_connection_lifetime_ms`.
pub const EXPIRED_CONNECTION: &str = "UpstreamConnectionExpired";

/// A response the gateway writes itself: its own answers (404, redirects,
/// 503 overloaded...) and those of filters.
pub struct Reply {
    status: u16,
    /// A short tag for the access log and the local-reply metric.
    pub(crate) reason: &'static str,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl Reply {
    /// An empty reply.
    pub fn new(status: u16) -> Self {
        Reply {
            status,
            reason: "filter",
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A plain-text reply; a line break is added.
    pub fn text(status: u16, text: impl std::fmt::Display) -> Self {
        Reply::new(status).body("text/plain; charset=utf-8", format!("{text}\n"))
    }

    /// Adds a header (another value if the name is already there).
    pub fn header(mut self, name: HeaderName, value: impl Into<HeaderValue>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(self, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        self.typed_body(HeaderValue::from_static(content_type), body)
    }

    pub(crate) fn typed_body(mut self, content_type: HeaderValue, body: impl Into<Bytes>) -> Self {
        self.headers.retain(|(name, _)| name != CONTENT_TYPE);
        self.headers.push((CONTENT_TYPE, content_type));
        self.body = body.into();
        self
    }

    /// Names the cause in the access log (`note=`) and in
    /// `pingress_local_replies_total{reason}`.
    pub fn reason(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    fn gateway(status: u16, reason: &'static str, body: impl std::fmt::Display) -> Self {
        Reply::text(status, body).reason(reason)
    }

    pub fn no_listener() -> Self {
        Self::gateway(
            404,
            "no_listener",
            "no listener configuration for this port",
        )
    }

    /// A path that has no canonical form the gateway can vouch for.
    pub fn invalid_path(error: PathError) -> Self {
        Self::gateway(400, error.reason(), error)
    }

    /// The Host for this name is invalid: it refuses rather than let
    /// another Host serve its name.
    pub fn host_unavailable(host: &str) -> Self {
        Self::gateway(
            503,
            "host_unavailable",
            format_args!("the Host for {host} is not configured correctly"),
        )
    }

    /// The Module's `headers_with_underscores_action: REJECT_REQUEST`.
    pub fn underscore_header() -> Self {
        Self::gateway(
            400,
            "header_with_underscore",
            "header names with underscores are not allowed",
        )
    }

    pub fn no_host(host: &str) -> Self {
        Self::gateway(404, "no_host", format!("no Host matches {host:?}"))
    }

    pub fn no_route(method: &str, host: &str, path: &str) -> Self {
        Self::gateway(
            404,
            "no_route",
            format!("no Mapping matches {method} {host}{path}"),
        )
    }

    /// 421: the Host header names another Host than the TLS handshake's.
    pub fn misdirected(host: &str) -> Self {
        Self::gateway(
            421,
            "misdirected",
            format!("this connection's TLS certificate was chosen for another Host than {host:?}"),
        )
    }

    /// A TLS connection from before a reload that made its Host require a
    /// client certificate, which this connection's handshake never asked
    /// for: a new connection will be.
    pub fn certificate_now_required() -> Self {
        Self::gateway(
            421,
            "client_certificate_required",
            "the Host now requires a client certificate: connect again to present one",
        )
    }

    /// A client certificate an earlier handshake verified, which the
    /// Host's current CA or CRL refuses.
    pub fn certificate_refused() -> Self {
        Self::gateway(
            403,
            "client_certificate_refused",
            "this connection's client certificate is not accepted by the Host any more",
        )
    }

    /// An `Upgrade` the route does not allow: Envoy's 403 (`upgrade_failed`).
    pub fn upgrade_refused(protocol: &str) -> Self {
        Self::gateway(
            403,
            "upgrade_refused",
            format!("this route does not allow upgrading to {protocol:?}"),
        )
    }

    pub fn rejected_insecure() -> Self {
        // Emissary answers Reject with 404: the routes simply do not exist
        // for insecure requests.
        Self::gateway(
            404,
            "insecure_rejected",
            "this Host does not serve insecure requests",
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
        let body = format!("redirecting to {location}");
        match HeaderValue::try_from(location) {
            Ok(location) => Self::gateway(status, "redirect", body).header(LOCATION, location),
            // The parts of a Location are checked at compile time; a
            // request's path that slips an invalid byte in gets a 400.
            Err(_) => Self::gateway(
                400,
                "bad_redirect",
                "the redirect target is not a valid header value",
            ),
        }
    }

    /// 503 from an open circuit breaker.
    pub fn overloaded() -> Self {
        Self::gateway(
            503,
            "overloaded",
            "upstream overloaded: the circuit breaker is open",
        )
        .header(
            HeaderName::from_static("x-envoy-overloaded"),
            HeaderValue::from_static("true"),
        )
    }

    pub fn failure(status: u16, cause: &'static str) -> Self {
        Self::gateway(status, "proxy_error", cause)
    }

    pub async fn send(self, session: &mut Session, server_name: Option<&str>) -> Result<()> {
        let mut header = ResponseHeader::build(self.status, Some(self.headers.len() + 2))?;
        for (name, value) in self.headers {
            header.append_header(name, value)?;
        }
        header.insert_header(CONTENT_LENGTH, self.body.len().to_string())?;
        if let Some(server) = server_name {
            header.insert_header(SERVER, server)?;
        }
        let empty = self.body.is_empty();
        session
            .write_response_header(Box::new(header), empty)
            .await?;
        if !empty {
            session.write_response_body(Some(self.body), true).await?;
        }
        Ok(())
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
