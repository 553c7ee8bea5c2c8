//! External authorization (`kind: AuthService`, HTTP protocol): before a
//! request is proxied, the gateway asks the authorizer with the request's
//! method, path and chosen headers. A 2xx lets it through, with the
//! authorizer's chosen headers added (and the route matched again, so they
//! can choose the Mapping); any other answer goes back to the client. An
//! unreachable, slow or failing (5xx) authorizer gets `status_on_error`,
//! unless `failure_mode_allow` lets the request through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::StatusCode;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::Result;

use super::{Cx, Filter, Flow, Reply, Session};
use crate::config::diagnostics::ResourceRef;
use crate::throttle::throttled;
use crate::tls::TlsContext;
use crate::upstream::cluster::Cluster;
use crate::upstream::service::ServiceAddr;
use crate::upstream::side;

/// Pingora keeps at most this much of a request body for sending it again;
/// a body shown to the authorizer must fit, or it could not be proxied.
pub(crate) const MAX_INCLUDED_BODY: u64 = 64 * 1024;

/// The most of an authorizer's denial body passed to the client.
const MAX_DENIAL_BODY: usize = 64 * 1024;

/// One connection pool to authorizers for the process, so pooled
/// connections outlive configuration reloads.
static CONNECTOR: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IncludeBody {
    pub(crate) max_bytes: u64,
    pub(crate) allow_partial: bool,
}

/// What every AuthService of a configuration must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuthPolicy {
    pub(crate) path_prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) to_authorizer: Vec<HeaderName>,
    pub(crate) from_authorizer: Vec<HeaderName>,
    pub(crate) add_auth_headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) include_body: Option<IncludeBody>,
    pub(crate) status_on_error: StatusCode,
    pub(crate) failure_mode_allow: bool,
}

/// A validated AuthService.
#[derive(Debug)]
pub struct AuthService {
    pub id: ResourceRef,
    /// `name.namespace`.
    pub name: String,
    pub service: ServiceAddr,
    pub originate_tls: bool,
    pub tls: Option<Arc<TlsContext>>,
    pub(crate) policy: AuthPolicy,
}

/// The configuration's AuthServices. An invalid one makes the gateway
/// refuse every request (as Emissary fails closed) rather than let them
/// through unchecked.
#[derive(Debug, Default)]
pub struct AuthServices {
    pub services: Vec<AuthService>,
    pub misconfigured: Option<String>,
}

/// The filter: one policy, the authorizers taking turns.
pub(crate) enum ExtAuth {
    Authorizers {
        policy: AuthPolicy,
        clusters: Vec<Arc<Cluster>>,
        next: AtomicUsize,
    },
    /// Every request gets a 500 naming the broken AuthService.
    Misconfigured(String),
}

impl ExtAuth {
    pub fn new(policy: AuthPolicy, clusters: Vec<Arc<Cluster>>) -> ExtAuth {
        ExtAuth::Authorizers {
            policy,
            clusters,
            next: AtomicUsize::new(0),
        }
    }
}

/// The request to the authorizer: the client's method, the prefixed path,
/// the chosen headers, and the body shown (if any).
fn auth_request(
    session: &Session,
    policy: &AuthPolicy,
    body: Option<&Bytes>,
) -> Result<RequestHeader> {
    let original = session.req_header();
    let target = original.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = format!("{}{target}", policy.path_prefix);
    let mut request = RequestHeader::build(original.method.clone(), path.as_bytes(), None)?;
    let authority = original
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            original
                .headers
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    if let Some(authority) = authority {
        request.insert_header(HOST, authority)?;
    }
    for name in &policy.to_authorizer {
        for value in original.headers.get_all(name) {
            request.append_header(name.clone(), value.clone())?;
        }
    }
    for (name, value) in &policy.add_auth_headers {
        request.insert_header(name.clone(), value.clone())?;
    }
    request.insert_header(CONTENT_LENGTH, body.map_or(0, Bytes::len).to_string())?;
    Ok(request)
}

/// Reads up to `limit` of the request body into Pingora's retry buffer,
/// from which the proxy sends it upstream later. `Err` is the reply when
/// the body cannot be shown or kept.
async fn read_body(
    session: &mut Session,
    limit: &IncludeBody,
) -> Result<std::result::Result<Bytes, Reply>> {
    session.enable_retry_buffering();
    let mut shown = BytesMut::new();
    while (shown.len() as u64) <= limit.max_bytes {
        match session.read_request_body().await? {
            Some(chunk) => shown.extend_from_slice(&chunk),
            None => break,
        }
    }
    let too_large = shown.len() as u64 > limit.max_bytes;
    if too_large && !limit.allow_partial {
        return Ok(Err(Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the {} bytes the authorizer may see",
                limit.max_bytes
            ),
        )
        .reason("auth_body_too_large")));
    }
    if session.as_ref().retry_buffer_truncated() {
        return Ok(Err(Reply::text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body arrived in a piece too large to keep while it is authorized",
        )
        .reason("auth_body_too_large")));
    }
    shown.truncate(limit.max_bytes as usize);
    Ok(Ok(shown.freeze()))
}

#[async_trait]
impl Filter for ExtAuth {
    const TYPE: &'static str = "AuthService";
    type Settings = serde::de::IgnoredAny;
    type Arguments = ();
    type State = ();

    /// AuthServices are built from their own kind, with their clusters;
    /// this type is never registered for `kind: Filter`.
    fn build(_: serde::de::IgnoredAny) -> std::result::Result<Self, crate::filters::BuildError> {
        Err("an AuthService is its own kind, not a Filter type".into())
    }

    async fn request(&self, session: &mut Session, cx: &mut Cx<'_, Self>) -> Result<Flow> {
        let (policy, clusters, next) = match self {
            ExtAuth::Misconfigured(name) => {
                let body = format!(
                    "{{\"error\": \"AuthService {name} is misconfigured: see the gateway's diagnostics\"}}\n"
                );
                return Ok(Flow::Respond(
                    Reply::new(StatusCode::INTERNAL_SERVER_ERROR)
                        .body("application/json", body)
                        .reason("auth_misconfigured"),
                ));
            }
            ExtAuth::Authorizers {
                policy,
                clusters,
                next,
            } => (policy, clusters, next),
        };
        let body = match &policy.include_body {
            None => None,
            Some(limit) => match read_body(session, limit).await? {
                Ok(body) => Some(body),
                Err(reply) => return Ok(Flow::Respond(reply)),
            },
        };
        let request = auth_request(session, policy, body.as_ref())?;
        let cluster = &clusters[next.fetch_add(1, Ordering::Relaxed) % clusters.len()];
        let keep = side::Body::Keep {
            at_most: MAX_DENIAL_BODY,
        };
        let ask = side::exchange(&CONNECTOR, cluster, request, body, keep);
        let answer = match tokio::time::timeout(policy.timeout, ask).await {
            Ok(Ok(verdict)) if verdict.status.as_u16() < 500 => Ok(verdict),
            Ok(Ok(verdict)) => Err(format!("{} answered {}", cluster.name, verdict.status)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "{} did not answer within {:?}",
                cluster.name, policy.timeout
            )),
        };
        let verdict = match answer {
            Ok(verdict) => verdict,
            Err(problem) if policy.failure_mode_allow => {
                throttled!(
                    warn,
                    "authorization skipped (failure_mode_allow): {problem}"
                );
                return Ok(Flow::Continue);
            }
            Err(problem) => {
                throttled!(warn, "authorization failed: {problem}");
                return Ok(Flow::Respond(
                    Reply::text(
                        policy.status_on_error,
                        "the authorization service is unavailable",
                    )
                    .reason("auth_error"),
                ));
            }
        };
        let content_type = verdict
            .headers
            .iter()
            .find(|(name, _)| name == CONTENT_TYPE)
            .map(|(_, value)| value.clone());
        let passed = verdict
            .headers
            .into_iter()
            .filter(|(name, _)| policy.from_authorizer.contains(name));
        if verdict.status.is_success() {
            let request = session.req_header_mut();
            let mut added = false;
            for (name, value) in passed {
                request.insert_header(name, value)?;
                added = true;
            }
            if added {
                cx.reroute();
            }
            return Ok(Flow::Continue);
        }
        let content_type = content_type.unwrap_or_else(|| HeaderValue::from_static("text/plain"));
        let mut reply = Reply::new(verdict.status).reason("auth_denied");
        for (name, value) in passed {
            reply = reply.header(name, value);
        }
        Ok(Flow::Respond(reply.typed_body(content_type, verdict.body)))
    }
}
