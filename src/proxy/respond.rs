//! Replies the gateway gives by itself, and how proxy errors become statuses.
//! Every reply of the gateway's own has a short plain-text body that names
//! its cause.

use http::header::{HeaderName, LOCATION};
use http::uri::PathAndQuery;
use http::{HeaderValue, StatusCode};
use pingora::prelude::*;
use pingora::{ErrorSource, ErrorType};

use crate::filters::Reply;
use crate::routing::path::PathError;

/// The `ErrorType::Custom` tag of an upstream TLS policy violation.
pub const TLS_POLICY: &str = "UpstreamTlsPolicy";

/// The `ErrorType::Custom` tag of a pooled connection refused for being
/// older than its cluster's `cluster_max_connection_lifetime_ms`.
pub const EXPIRED_CONNECTION: &str = "UpstreamConnectionExpired";

/// The gateway's own answers.
impl Reply {
    fn gateway(status: StatusCode, reason: &'static str, body: impl std::fmt::Display) -> Self {
        Reply::text(status, body).reason(reason)
    }

    pub fn no_listener() -> Self {
        Self::gateway(
            StatusCode::NOT_FOUND,
            "no_listener",
            "no listener configuration for this port",
        )
    }

    /// A path that has no canonical form the gateway can vouch for.
    pub fn invalid_path(error: PathError) -> Self {
        Self::gateway(StatusCode::BAD_REQUEST, error.reason(), error)
    }

    /// The Host for this name is invalid: it refuses rather than let
    /// another Host serve its name.
    pub fn host_unavailable(host: &str) -> Self {
        Self::gateway(
            StatusCode::SERVICE_UNAVAILABLE,
            "host_unavailable",
            format_args!("the Host for {host} is not configured correctly"),
        )
    }

    /// The Module's `headers_with_underscores_action: REJECT_REQUEST`.
    pub fn underscore_header() -> Self {
        Self::gateway(
            StatusCode::BAD_REQUEST,
            "header_with_underscore",
            "header names with underscores are not allowed",
        )
    }

    pub fn no_host(host: &str) -> Self {
        Self::gateway(
            StatusCode::NOT_FOUND,
            "no_host",
            format!("no Host matches {host:?}"),
        )
    }

    pub fn no_route(method: &str, host: &str, path: &str) -> Self {
        Self::gateway(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no Mapping matches {method} {host}{path}"),
        )
    }

    /// 421: the Host header names another Host than the TLS handshake's.
    pub fn misdirected(host: &str) -> Self {
        Self::gateway(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected",
            format!("this connection's TLS certificate was chosen for another Host than {host:?}"),
        )
    }

    /// A cleartext request on a port the configuration now says is HTTPS,
    /// which only a new process can listen with.
    pub fn tls_required() -> Self {
        Self::gateway(
            StatusCode::MISDIRECTED_REQUEST,
            "tls_required",
            "this port serves HTTPS in the current configuration; a new process applies it",
        )
    }

    /// A TLS connection from before a reload that made its Host require a
    /// client certificate, which this connection's handshake never asked
    /// for: a new connection will be.
    pub fn certificate_now_required() -> Self {
        Self::gateway(
            StatusCode::MISDIRECTED_REQUEST,
            "client_certificate_required",
            "the Host now requires a client certificate: connect again to present one",
        )
    }

    /// A client certificate an earlier handshake verified, which the
    /// Host's current CA or CRL refuses.
    pub fn certificate_refused() -> Self {
        Self::gateway(
            StatusCode::FORBIDDEN,
            "client_certificate_refused",
            "this connection's client certificate is not accepted by the Host any more",
        )
    }

    /// An `Upgrade` the route does not allow: Envoy's 403 (`upgrade_failed`).
    pub fn upgrade_refused(protocol: &str) -> Self {
        Self::gateway(
            StatusCode::FORBIDDEN,
            "upgrade_refused",
            format!("this route does not allow upgrading to {protocol:?}"),
        )
    }

    pub fn rejected_insecure() -> Self {
        // Emissary answers Reject with 404: the routes simply do not exist
        // for insecure requests.
        Self::gateway(
            StatusCode::NOT_FOUND,
            "insecure_rejected",
            "this Host does not serve insecure requests",
        )
    }

    pub fn https_redirect(host: &str, path: Option<&PathAndQuery>) -> Self {
        let target = format!("https://{host}{}", path.map(|p| p.as_str()).unwrap_or("/"));
        Self::redirect(StatusCode::MOVED_PERMANENTLY, target).reason("https_redirect")
    }

    /// A redirect Mapping's answer.
    pub fn redirect(status: StatusCode, location: String) -> Self {
        let body = format!("redirecting to {location}");
        match HeaderValue::try_from(location) {
            Ok(location) => Self::gateway(status, "redirect", body).header(LOCATION, location),
            // The parts of a Location are checked at compile time; a
            // request's path that slips an invalid byte in gets a 400.
            Err(_) => Self::gateway(
                StatusCode::BAD_REQUEST,
                "bad_redirect",
                "the redirect target is not a valid header value",
            ),
        }
    }

    /// 503 from an open circuit breaker.
    pub fn overloaded() -> Self {
        Self::gateway(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "upstream overloaded: the circuit breaker is open",
        )
        .header(
            HeaderName::from_static("x-envoy-overloaded"),
            HeaderValue::from_static("true"),
        )
    }

    pub fn failure(status: StatusCode, cause: &'static str) -> Self {
        Self::gateway(status, "proxy_error", cause)
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
