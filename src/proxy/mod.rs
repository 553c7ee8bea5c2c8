//! The Pingora `ProxyHttp` implementation, one phase per method, each thin:
//! the decisions live in the snapshot, the routing module and functions of
//! the request head (`route`, `allowed_upgrade`, `upstream_wait`), which
//! the tests call without a socket.
//!
//! - `early_request_filter`: tell the connection's `BoundedStream` that the
//!   head is read;
//! - `request_filter`: take the snapshot, make the path canonical, check the
//!   TLS handshake still holds, pick the Host and the route, run the
//!   filters, or answer here (400, 403, 404, 421, 503, redirects);
//! - `upstream_peer`: take a place under the cluster's breaker, let the
//!   balancer pick an endpoint, and box its prepared peer;
//! - `connected_to_upstream`: count the connection and hold it to its
//!   lifetime; `fail_to_connect`, `error_while_proxy`: decide retries;
//! - `upstream_request_filter`: path and Host rewrite, header edits;
//! - `request_body_filter`: start the route deadline when the body ends,
//!   and copy a small body for the shadow;
//! - `upstream_response_filter`, `response_filter`: response header edits,
//!   retries on status, and dropping the snapshot after a 101;
//! - `upstream_response_body_filter`, `response_body_filter`: the route
//!   deadline on body chunks, and the filters' body hooks;
//! - `fail_to_proxy`: the status and a body that name the cause;
//! - `logging`: the access log line, and the end of the exchange for the
//!   connection's `BoundedStream`.

mod headers;
mod respond;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use log::info;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};
use pingora::upstreams::peer::{H1UpgradePolicy, HttpUpstreamRequestPolicy};
use pingora::ErrorType;
use rand::Rng;

use crate::downstream::head::BoundedStream;
use crate::filters::chain::{Entry, Run, Stage};
use crate::filters::ip::remote_address;
use crate::filters::{RequestInfo, RouteFacts};
use crate::metrics::metrics;
use crate::model::{
    AccessLog, InsecureAction, Listener, ModuleSettings, Rewrite, SecurityModel, UnderscoreAction,
    VirtualHost,
};
use crate::routing::headers::RequestFacts;
use crate::routing::table::RequestView;
use crate::snapshot::routes::HostRoutes;
use crate::snapshot::{ListenerRoutes, Route, Snapshot, Target};
use crate::throttle::throttled;
use crate::tls::edge::{EdgeSession, Standing};
use crate::upstream::balancer::{InFlight, RequestKey};
use crate::upstream::breaker::Admission;
use crate::upstream::retry::RetryOn;
use crate::upstream::shadow::{Shadow, MAX_MIRRORED_BODY};

pub use crate::filters::Reply;
pub use respond::{classify, Failure};

mod access_log;
use access_log::AccessEntry;

const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// The gateway's proxy logic over the current snapshot.
pub struct Gateway {
    snapshot: Arc<ArcSwap<Snapshot>>,
    draining: Arc<AtomicBool>,
}

impl Gateway {
    /// `draining` turns true when this process starts handing over to a new
    /// one or shutting down (see [`crate::server::DrainWatch`]).
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, draining: Arc<AtomicBool>) -> Self {
        Gateway { snapshot, draining }
    }

    /// Spends one retry of the route's policy when it covers this failure,
    /// the deadline has time left and the cluster's `max_retries` has room.
    fn retry_allowed(&self, ctx: &mut RequestCtx, covers: impl Fn(&RetryOn) -> bool) -> bool {
        let Some(route) = ctx.route.as_ref() else {
            return false;
        };
        let Some(policy) = route.retry else {
            return false;
        };
        let in_time = ctx.deadline.is_none_or(|d| Instant::now() < d);
        if !covers(&policy.on) || ctx.retries >= policy.num_retries || !in_time {
            return false;
        }
        if ctx.retrying.is_none() {
            ctx.retrying = route.cluster().and_then(|c| c.breaker().try_retry());
            if ctx.retrying.is_none() {
                return false;
            }
        }
        ctx.retries += 1;
        route.metrics.retry();
        true
    }

    /// Once the process is draining, every response closes its connection:
    /// Pingora drops idle keep-alive connections when shutdown starts, and a
    /// client that had just sent a request on one would see a reset. With
    /// `Connection: close` clients reconnect, and the listening socket (by
    /// then shared with the new process) takes them.
    fn close_if_draining(&self, session: &mut Session) {
        if self.draining.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
    }
}

/// Per-request state.
pub struct RequestCtx {
    /// Until the response head; an upgraded stream (a WebSocket may last
    /// for days) keeps its route, not the whole configuration.
    snapshot: Option<Arc<Snapshot>>,
    /// The access-log format of the snapshot.
    access_log: Option<AccessLog>,
    route: Option<Arc<Route>>,
    started: Instant,
    /// The route's `timeout_ms`. It runs from the end of the request body,
    /// as Envoy's route timeout does: a slow upload is the client's time.
    timeout: Option<std::time::Duration>,
    /// When the route timeout runs out, once the request body is complete:
    /// the upstream's whole response must come before it.
    deadline: Option<Instant>,
    upstream_started: Option<Instant>,
    /// The upstream endpoint chosen, for the access log.
    /// Formatted only if an access-log line is written.
    upstream_addr: Option<std::net::SocketAddr>,
    /// This request's place under its cluster's circuit breaker.
    admission: Option<Admission>,
    /// The circuit breaker refused the request.
    overloaded: bool,
    /// This request's count on its endpoint under `least_request`.
    in_flight: Option<InFlight>,
    /// A hash cookie the balancer made for this client.
    set_cookie: Option<String>,
    /// Retries spent under the route's retry policy.
    retries: u32,
    /// This request's place among its cluster's retrying requests.
    retrying: Option<Admission>,
    /// `upstream_response_filter` turned the response into a retry.
    status_retry: bool,
    /// Pooled connections refused for being past their lifetime.
    expired_refused: u32,
    /// Why the gateway answered by itself, for the access log.
    local_reply: Option<&'static str>,
    /// The filters this request runs and their state.
    filters: Option<Run>,
    /// An HTTP/1.1 upgrade the route allows.
    upgrade: Option<Upgrade>,
    /// Where the copy for the route's shadow stands.
    mirror: Mirror,
}

/// A request's copy for a shadow Mapping.
enum Mirror {
    /// Not decided yet: the first try's upstream head decides.
    Undecided,
    /// Sent, or not to be sent.
    Settled,
    /// The head is copied; the body is kept as it passes to the primary.
    /// Boxed: the context is moved with every request, mirrored or not.
    Collecting(Box<MirrorCopy>),
}

struct MirrorCopy {
    shadow: Arc<Shadow>,
    request: RequestHeader,
    body: BytesMut,
}

/// An allowed upgrade. Pingora forwards WebSocket handshakes by itself;
/// other protocols need the request's hop-by-hop headers kept as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    WebSocket,
    Other,
}

/// Pooled connections past their lifetime that one request refuses before
/// it opens a connection of its own. Each refusal costs one of Pingora's
/// tries (`max_retries`, 16 by default), which the retry policy needs too;
/// past this bound the pool may hold more expired ones, and waiting for
/// them to be refused one by one could use up the tries.
const EXPIRED_REFUSALS: u32 = 4;

/// How long an upgraded connection may sit silent when the Mapping sets no
/// `idle_timeout_ms`: Envoy's default stream idle timeout, 5 minutes.
const UPGRADED_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// The protocol an HTTP/1.1 request asks to upgrade to. `h2c` is not an
/// upgrade here: Envoy's codec drops it, and Pingora strips it upstream, so
/// the request is proxied as it is. HTTP/1.0 and HTTP/2 requests never
/// upgrade (Pingora does not treat them as upgrades).
fn upgrade_protocol(session: &Session) -> Option<&str> {
    if !session.is_upgrade_req() {
        return None;
    }
    let value = session.req_header().headers.get(http::header::UPGRADE)?;
    // A value that is not text cannot name an allowed protocol: refused.
    let protocol = value.to_str().unwrap_or("").trim();
    (!protocol.eq_ignore_ascii_case("h2c")).then_some(protocol)
}

/// The upgrade a request asks for (`protocol`), as its route allows it:
/// one it does not name is refused with 403, as Envoy refuses it.
fn allowed_upgrade(route: &Route, protocol: Option<&str>) -> Result<Option<Upgrade>, Reply> {
    let Some(protocol) = protocol else {
        return Ok(None);
    };
    if !route.allows_upgrade(protocol) {
        return Err(Reply::upgrade_refused(protocol));
    }
    Ok(Some(if protocol.eq_ignore_ascii_case("websocket") {
        Upgrade::WebSocket
    } else {
        Upgrade::Other
    }))
}

fn protocol(session: &Session) -> &'static str {
    if session.is_http2() {
        "HTTP/2"
    } else {
        "HTTP/1.1"
    }
}

/// Each request is held to its Host's current client-certificate policy
/// (`EdgeSession::standing`): without a certificate the Host now requires,
/// 421 (a new connection will be asked for one); with one the current CA
/// and CRL refuse, 403. `Ok(false)`: the connection is outdated, and closes
/// after this request. `edge` is what the connection's handshake decided.
fn handshake_holds(edge: Option<&EdgeSession>, listener: &ListenerRoutes) -> Result<bool, Reply> {
    if !listener.listener.tls {
        return Ok(true);
    }
    let Some(edge) = edge else {
        // A cleartext connection to a port a reload made HTTPS: the port
        // stays cleartext until a new process, and no Host's TLS policy
        // held this connection.
        return Err(Reply::tls_required());
    };
    let now = listener
        .tls_host(edge.sni.as_deref())
        .map(|(_, now)| &**now);
    match edge.standing(now) {
        Standing::Current => Ok(true),
        Standing::Outdated => Ok(false),
        Standing::CertificateNowRequired => Err(Reply::certificate_now_required()),
        Standing::CertificateRefused => Err(Reply::certificate_refused()),
        Standing::NoTls => Err(Reply::misdirected(edge.sni.as_deref().unwrap_or(""))),
    }
}

/// What the TLS handshake of this request's connection decided.
fn edge_session(session: &Session) -> Option<&EdgeSession> {
    session
        .digest()?
        .ssl_digest
        .as_ref()?
        .extension
        .get::<EdgeSession>()
}

fn local_port(session: &Session) -> Option<u16> {
    session
        .server_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.port())
}

/// The request's authority: the URI's (HTTP/2, absolute form) or `Host`.
fn authority(req: &RequestHeader) -> &str {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

fn split_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.rsplit_once("]:") {
            Some((host, port)) => (&authority[..host.len() + 1], Some(port)),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// Where routing left a request that reached a Host.
struct Routed {
    /// The matched Mapping; `None` when nothing matched.
    route: Option<Arc<Route>>,
    /// The gateway's own answer instead of proxying: 404, a redirect.
    answer: Option<Reply>,
    /// The filters this request runs; `None` when there are none.
    filters: Option<Arc<[Entry]>>,
    client_ip: Option<IpAddr>,
}

/// What the edge decided, before routing.
struct Edge<'s> {
    listener: &'s ListenerRoutes,
    forwarding: headers::Forwarding,
    client_ip: Option<IpAddr>,
}

/// The names a request gives for itself.
struct RequestNames<'a> {
    /// Without port or trailing dot: what Hosts and FilterPolicies match.
    host: &'a str,
    /// What Mappings' `hostname` match: without its port when
    /// `strip_matching_host_port` removed it.
    authority: &'a str,
    port_stripped: bool,
}

impl<'a> RequestNames<'a> {
    fn new(lowered: &'a str, module: &ModuleSettings, listener_port: u16) -> Self {
        let (host, port) = split_port(lowered);
        let port_stripped = port.is_some_and(|port| {
            module.strip_matching_host_port && port.parse() == Ok(listener_port)
        });
        // `example.com.` names `example.com` (an absolute DNS name), for
        // Hosts, FilterPolicies and Mappings alike.
        let host = host.strip_suffix('.').unwrap_or(host);
        let authority = if port.is_none() || port_stripped {
            host
        } else {
            lowered
        };
        RequestNames {
            host,
            authority,
            port_stripped,
        }
    }
}

/// The request's authority in lower case; clients almost always send
/// lower-case names, so it is copied only when not.
fn lowered_authority(req: &RequestHeader) -> Cow<'_, str> {
    match authority(req) {
        lower if !lower.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(lower),
        mixed => Cow::Owned(mixed.to_ascii_lowercase()),
    }
}

/// What routing reads of the connection a request came on.
#[derive(Clone, Copy)]
struct Wire<'a> {
    /// The request came over TLS.
    tls: bool,
    /// On a TLS listener, the server name the handshake chose the Host by.
    sni: Option<&'a str>,
}

impl<'a> Wire<'a> {
    fn of(session: &'a Session, listener: &ListenerRoutes) -> Self {
        Wire {
            tls: over_tls(session),
            sni: listener
                .listener
                .tls
                .then(|| edge_session(session).and_then(|e| e.sni.as_deref()))
                .flatten(),
        }
    }
}

fn over_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Routing proper, on the head as the edge left it: canonical path,
/// headers only the gateway sets removed, so that what a Mapping's header
/// match reads is what the filters and the upstream read. `Err` is an
/// answer given before any filter runs: the request reached no Host, or
/// the Host refuses it.
fn route(
    snapshot: &Snapshot,
    listener: &ListenerRoutes,
    req: &RequestHeader,
    wire: Wire,
    client_ip: Option<IpAddr>,
) -> Result<Routed, Reply> {
    let path = req.uri.path();
    let lowered = lowered_authority(req);
    let RequestNames {
        host: host_name,
        authority,
        ..
    } = RequestNames::new(&lowered, &snapshot.module, listener.listener.port);
    let (vhost, owner) = virtual_host(listener, host_name, wire.sni)?;
    let secure = is_secure(&listener.listener, req, wire.tls);
    if !secure && !path.starts_with(ACME_CHALLENGE) {
        insecure_action(&vhost.host, host_name, req)?;
    }
    let view = RequestView {
        path,
        query: req.uri.query().unwrap_or(""),
        authority,
        method: req.method.as_str(),
        headers: &req.headers,
    };
    let route = vhost.find(&view).map(|group| {
        let pick = if group.is_canary() {
            rand::thread_rng().gen_range(0..100)
        } else {
            0
        };
        group.pick(pick).clone()
    });
    let answer = router_answer(route.as_deref(), req, host_name, secure);
    let filters = filters(snapshot, route.as_deref(), owner, path);
    Ok(Routed {
        route,
        answer,
        filters,
        client_ip,
    })
}

/// The Host that owns the request, and the name it owns it by: on TLS the
/// Host SNI chose, which a Host header naming another Host must not change
/// (the mTLS bypass of Emissary #3340); in cleartext the one the name
/// selects. FilterPolicy rules match that name, so a Host header that
/// names no Host (or none, on HTTP/1.0) cannot take a TLS request out from
/// under its Host's policies. An invalid Host refuses what it owns.
fn virtual_host<'l, 'n>(
    listener: &'l ListenerRoutes,
    host_name: &'n str,
    sni: Option<&'n str>,
) -> Result<(&'l HostRoutes<Route>, &'n str), Reply> {
    let by_name = listener.hosts.select(host_name);
    let (vhost, owner) = if listener.listener.tls {
        let Some((chosen, vhost)) = listener.hosts.select_tls(sni) else {
            return Err(Reply::no_host(host_name));
        };
        match by_name {
            Some((named, _)) if named != chosen => return Err(Reply::misdirected(host_name)),
            Some(_) => (vhost, host_name),
            None => (vhost, sni.unwrap_or(host_name)),
        }
    } else {
        match by_name {
            Some((_, vhost)) => (vhost, host_name),
            None => return Err(Reply::no_host(host_name)),
        }
    };
    if vhost.host.invalid.is_some() {
        return Err(Reply::host_unavailable(host_name));
    }
    Ok((vhost, owner))
}

/// Whether the request counts as secure, by the listener's
/// `securityModel`.
fn is_secure(listener: &Listener, req: &RequestHeader, wire_tls: bool) -> bool {
    match listener.security {
        SecurityModel::Secure => true,
        SecurityModel::Insecure => false,
        // With no trusted proxy in front, what the client claims in
        // X-Forwarded-Proto is ignored: the wire decides.
        SecurityModel::Xfp if listener.l7_depth == 0 => wire_tls,
        SecurityModel::Xfp => req
            .headers
            .get(&headers::X_FORWARDED_PROTO)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https")),
    }
}

/// The Host's `requestPolicy.insecure.action` for an insecure request.
fn insecure_action(host: &VirtualHost, host_name: &str, req: &RequestHeader) -> Result<(), Reply> {
    match host.insecure {
        InsecureAction::Route => Ok(()),
        // Every insecure request is redirected, mapped or not (Emissary
        // answers 404 for unmapped paths, a known gap).
        InsecureAction::Redirect => Err(Reply::https_redirect(host_name, req.uri.path_and_query())),
        InsecureAction::Reject => Err(Reply::rejected_insecure()),
    }
}

/// The router's own answer, given after the filters: 404 when no Mapping
/// matched, the Location of a `host_redirect`; `None` to proxy.
fn router_answer(
    route: Option<&Route>,
    req: &RequestHeader,
    host_name: &str,
    secure: bool,
) -> Option<Reply> {
    let path = req.uri.path();
    match route.map(|r| (r, &r.target)) {
        None => Some(Reply::no_route(req.method.as_str(), host_name, path)),
        Some((route, Target::Redirect(redirect))) => {
            let scheme = if secure { "https" } else { "http" };
            let matched = route.path.matched_len(path);
            let location = redirect.location(scheme, path, matched, req.uri.query());
            Some(Reply::redirect(redirect.status_code(), location))
        }
        Some((_, Target::Upstream(_))) => None,
    }
}

/// The filters the request runs: its FilterPolicy rule's for `host`, or
/// the chain without authentication for a `bypass_auth` Mapping.
fn filters(
    snapshot: &Snapshot,
    route: Option<&Route>,
    host: &str,
    path: &str,
) -> Option<Arc<[Entry]>> {
    let bypass_auth = route.is_some_and(|r| r.bypass_auth);
    // A FilterPolicy guards the paths its Mapping serves: a Mapping
    // that matches in any case is guarded in any case.
    let case_sensitive = route.is_none_or(|r| r.path.case_sensitive());
    snapshot
        .filters
        .select(host, path, case_sensitive, bypass_auth)
        .cloned()
}

impl Gateway {
    /// What the edge decides before anything reads the request: how the
    /// head is rebuilt (`forward_request`) and who the client is. `Err`:
    /// no listener, or a header name the Module refuses.
    fn edge<'s>(&self, session: &Session, snapshot: &'s Snapshot) -> Result<Edge<'s>, Reply> {
        let req = session.req_header();
        let listener = local_port(session)
            .and_then(|port| snapshot.listener(port))
            .ok_or_else(Reply::no_listener)?;
        let module = &snapshot.module;
        if module.underscores == UnderscoreAction::RejectRequest
            && req.headers.keys().any(|name| name.as_str().contains('_'))
        {
            return Err(Reply::underscore_header());
        }
        // Envoy strips the port from the header itself, not only for
        // matching; routing reads the names again from the rebuilt head.
        let stripped_host = if module.strip_matching_host_port {
            let lowered = lowered_authority(req);
            let names = RequestNames::new(&lowered, module, listener.listener.port);
            names
                .port_stripped
                .then(|| HeaderValue::from_str(names.host).ok())
                .flatten()
        } else {
            None
        };
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let l7_depth = listener.listener.l7_depth;
        Ok(Edge {
            listener,
            // Read before the client is appended to X-Forwarded-For.
            client_ip: remote_address(peer, &req.headers, l7_depth),
            forwarding: headers::Forwarding {
                client: peer,
                trusted_proxy: l7_depth > 0,
                wire_tls: over_tls(session),
                stripped_host,
                client_cert: headers::client_cert_header(
                    &module.xfcc,
                    &req.headers,
                    edge_session(session).and_then(|e| e.client.as_ref()),
                ),
                underscores: module.underscores,
            },
        })
    }

    /// The decisions made before any filter runs: the edge's, the
    /// handshake's and the router's. `Ok(Err)` is the gateway's answer.
    fn edge_and_route(
        &self,
        session: &mut Session,
        snapshot: &Snapshot,
    ) -> Result<Result<Routed, Reply>> {
        // The request is made canonical once, in the head itself, before
        // anything reads it: the path, and the headers only the gateway
        // sets. Routing, the filters, the authorizer, the access log and
        // the upstream all read this one request.
        let edge = headers::canonicalize_target(session.req_header_mut(), snapshot.module.path)
            .map_err(Reply::invalid_path)
            .and_then(|()| self.edge(session, snapshot));
        let edge = match edge {
            Ok(edge) => edge,
            Err(reply) => return Ok(Err(reply)),
        };
        headers::forward_request(session.req_header_mut(), &edge.forwarding)?;
        let handshake = handshake_holds(edge_session(session), edge.listener);
        if !matches!(handshake, Ok(true)) {
            // The next request comes on a new connection, under the
            // configuration that serves now.
            session.set_keepalive(None);
        }
        if let Err(reply) = handshake {
            return Ok(Err(reply));
        }
        let wire = Wire::of(session, edge.listener);
        let req = session.req_header();
        Ok(route(snapshot, edge.listener, req, wire, edge.client_ip))
    }

    /// Sends the gateway's own answer; the exchange ends here.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reply: Reply,
    ) -> Result<bool> {
        self.close_if_draining(session);
        ctx.local_reply = Some(reply.reason);
        let server_name = ctx
            .snapshot
            .as_ref()
            .and_then(|s| s.module.server_name.clone());
        reply.send(session, server_name.as_deref()).await?;
        Ok(true)
    }

    /// Runs the request's filters; `Some` is a filter's answer. After the
    /// authentication stage the route is matched again if a filter asked,
    /// so headers added by an authorizer can choose the Mapping.
    async fn run_filters(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        routed: &mut Routed,
        run: &mut Run,
    ) -> Result<Option<Reply>> {
        for stage in [Stage::Early, Stage::Auth] {
            if let Some(reply) = run.request(session, stage).await? {
                return Ok(Some(reply));
            }
        }
        if run.facts.reroute {
            let snapshot = ctx.snapshot.clone().ok_or_else(|| {
                Error::explain(ErrorType::InternalError, "no snapshot to route again")
            })?;
            let listener = local_port(session)
                .and_then(|port| snapshot.listener(port))
                .ok_or_else(|| Error::explain(ErrorType::InternalError, "no listener"))?;
            let wire = Wire::of(session, listener);
            match route(
                &snapshot,
                listener,
                session.req_header(),
                wire,
                routed.client_ip,
            ) {
                Ok(again) => {
                    routed.route = again.route;
                    routed.answer = again.answer;
                    run.facts.route = routed.route.clone().map(|r| r as Arc<dyn RouteFacts>);
                }
                Err(reply) => return Ok(Some(reply)),
            }
        }
        run.request(session, Stage::Late).await
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: None,
            access_log: None,
            route: None,
            started: Instant::now(),
            timeout: None,
            deadline: None,
            upstream_started: None,
            upstream_addr: None,
            admission: None,
            overloaded: false,
            in_flight: None,
            set_cookie: None,
            retries: 0,
            retrying: None,
            status_retry: false,
            expired_refused: 0,
            local_reply: None,
            filters: None,
            upgrade: None,
            mirror: Mirror::Undecided,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(connection) = bounded_connection(session) {
            connection.head_read();
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let snapshot = self.snapshot.load_full();
        let decision = self.edge_and_route(session, &snapshot)?;
        ctx.access_log = Some(snapshot.module.access_log);
        ctx.snapshot = Some(snapshot);
        let mut routed = match decision {
            Ok(routed) => routed,
            Err(reply) => return self.answer(session, ctx, reply).await,
        };
        if let Some(chain) = routed.filters.take() {
            let facts = RequestInfo {
                route: routed.route.clone().map(|r| r as Arc<dyn RouteFacts>),
                client_ip: routed.client_ip,
                ..RequestInfo::default()
            };
            let mut run = Run::new(chain, facts);
            let outcome = self.run_filters(session, ctx, &mut routed, &mut run).await;
            ctx.filters = Some(run);
            ctx.route = routed.route.take();
            if let Some(reply) = outcome? {
                return self.answer(session, ctx, reply).await;
            }
        } else {
            ctx.route = routed.route.take();
        }
        if let Some(reply) = routed.answer {
            return self.answer(session, ctx, reply).await;
        }
        if let Some(route) = &ctx.route {
            match allowed_upgrade(route, upgrade_protocol(session)) {
                Ok(upgrade) => ctx.upgrade = upgrade,
                Err(reply) => return self.answer(session, ctx, reply).await,
            }
            if route.retry.is_some() {
                // A body kept in memory can be sent again on a retry.
                session.enable_retry_buffering();
            }
            ctx.timeout = route.timeout;
            if session.is_body_empty() {
                ctx.deadline = route.timeout.map(|t| ctx.started + t);
            }
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route chosen"))?;
        let cluster = route.cluster().ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "a redirect route has no upstream")
        })?;
        // Retries come back here; the exchange keeps its place. A request
        // whose body is still coming waits at most its timeout.
        let wait_until = ctx
            .deadline
            .or_else(|| ctx.timeout.map(|t| Instant::now() + t));
        if ctx.admission.is_none() {
            match cluster.breaker().admit(wait_until).await {
                Some(admission) => ctx.admission = Some(admission),
                None => {
                    ctx.overloaded = true;
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(503),
                        format!("circuit breaker of {} is open", cluster.name),
                    ));
                }
            }
        }
        let request = RequestKey {
            headers: &session.req_header().headers,
            client: session.client_addr().and_then(|a| a.as_inet()).copied(),
        };
        let choice = cluster.choose(&request).ok_or_else(|| {
            Error::explain(
                ErrorType::HTTPStatus(503),
                format!("no endpoints for {}", cluster.name),
            )
        })?;
        ctx.in_flight = choice.in_flight;
        ctx.set_cookie = choice.set_cookie;
        let mut peer = choice.peer;
        ctx.upstream_addr = peer._address.as_inet().copied();
        if ctx.upgrade == Some(Upgrade::Other) {
            peer.options.http_upstream_request_policy = HttpUpstreamRequestPolicy {
                h1_upgrade: H1UpgradePolicy::Preserve,
                ..HttpUpstreamRequestPolicy::standard()
            };
        }
        let now = Instant::now();
        let wait = upstream_wait(route, ctx, now);
        peer.options.read_timeout = wait;
        peer.options.write_timeout = wait;
        if fresh_connection(ctx) {
            // A pool key no pooled connection has: Pingora connects anew.
            // `upstream_request_filter` asks for `Connection: close`, so the
            // connection is not pooled under a key no one else asks for.
            peer.group_key = !peer.group_key;
        }
        ctx.upstream_started = Some(now);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the upstream: always safe to try again, and the
        // next try gets the cluster's next endpoint.
        if self.retry_allowed(ctx, |on| on.connect_failure) {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Decided when the response head arrived, with the buffer checked.
        if std::mem::take(&mut ctx.status_retry) {
            return e;
        }
        // Nothing was sent on an expired connection: another try is always
        // safe, and it is routine, not a failure the retry policy pays for.
        if is_expired_refusal(&e) {
            return e;
        }
        // A request whose body was streamed beyond the retry buffer, or
        // that changes state, is never sent twice.
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
            return e;
        }
        // Pingora's own policy: a stale pooled connection is retried.
        e.retry.decide_reuse(client_reused);
        let broken = session.response_written().is_none()
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed
                    | ErrorType::ReadError
                    | ErrorType::WriteError
                    | ErrorType::H2Error
            );
        // A try that ran out of its per_try_timeout is a 504 to Envoy's
        // retry policy; one that ran out of the route timeout is not
        // retried, as the deadline has passed.
        let timed_out = session.response_written().is_none()
            && matches!(
                e.etype(),
                ErrorType::ReadTimedout | ErrorType::WriteTimedout
            );
        if !e.retry()
            && ((broken && self.retry_allowed(ctx, |on| on.reset))
                || (timed_out && self.retry_allowed(ctx, |on| on.status(504))))
        {
            e.set_retry(true);
        }
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let cluster = ctx.route.as_ref().and_then(|r| r.cluster());
        let lifetime = cluster.and_then(|c| c.key.connections.max_lifetime);
        if let (true, Some(lifetime)) = (reused, lifetime) {
            if expired(peer, digest, lifetime) {
                // Pingora drops the connection (an H1 session that errs
                // here is not released to the pool) and tries again.
                ctx.expired_refused += 1;
                let mut e = Error::explain(
                    ErrorType::Custom(respond::EXPIRED_CONNECTION),
                    format!("pooled connection older than {lifetime:?}"),
                )
                .into_up();
                e.set_retry(true);
                return Err(e);
            }
        }
        let counters = metrics();
        if reused {
            counters.upstream.connections_reused.inc();
        } else {
            counters.upstream.connections_new.inc();
            if peer.is_tls() {
                counters.upstream.tls_handshakes.inc();
            }
        }
        let Some(tls) = cluster.and_then(|c| c.tls.as_ref()) else {
            return Ok(());
        };
        let Some(ssl) = digest.and_then(|d| d.ssl_digest.as_ref()) else {
            return Ok(());
        };
        crate::upstream::policy::check_negotiated(tls, &ssl.version, &ssl.cipher)
            .map_err(|e| Error::explain(ErrorType::Custom(respond::TLS_POLICY), e.to_string()))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.upgrade == Some(Upgrade::Other) {
            // Pingora forwards such a handshake untouched (H1UpgradePolicy::
            // Preserve); only the upgrade itself crosses this hop.
            headers::keep_only_the_upgrade(upstream)?;
        }
        let (Some(route), Some(snapshot)) = (ctx.route.as_ref(), ctx.snapshot.as_ref()) else {
            return Ok(());
        };
        let module = &snapshot.module;
        let downstream = session.req_header();
        let path = downstream.uri.path();
        let new_path = match &route.rewrite {
            Rewrite::Keep => Cow::Borrowed(path),
            Rewrite::Prefix(replacement) => {
                let cut = route.path.matched_len(path).min(path.len());
                Cow::Owned(format!("{replacement}{}", &path[cut..]))
            }
            Rewrite::Regex {
                regex,
                substitution,
            } => regex.replace_all(path, substitution.as_str()),
        };
        if new_path != path {
            let target = match downstream.uri.query() {
                Some(query) => format!("{new_path}?{query}"),
                None => new_path.into_owned(),
            };
            let uri = target.parse::<http::Uri>().map_err(|e| {
                Error::explain(
                    ErrorType::InternalError,
                    format!("rewritten path {target:?}: {e}"),
                )
            })?;
            upstream.set_uri(uri);
            if !module.suppress_envoy_headers {
                // As in Envoy, the original is the path before the rewrite:
                // the canonical one, query included.
                let original = match downstream.uri.query() {
                    Some(query) => format!("{path}?{query}"),
                    None => path.to_string(),
                };
                upstream.insert_header("x-envoy-original-path", original)?;
            }
        }
        if let Some(host) = &route.host_rewrite {
            upstream.insert_header(http::header::HOST, host.clone())?;
        }

        if let Some(value) = &route.linkerd_header {
            upstream.insert_header("l5d-dst-override", value.clone())?;
        }
        if let Some(value) = &route.expected_timeout {
            upstream.insert_header("x-envoy-expected-rq-timeout-ms", value.clone())?;
        }
        headers::apply_edits(&route.request_headers, || facts(session), upstream)?;
        if let Some(run) = ctx.filters.as_mut() {
            run.upstream_request(session, upstream).await?;
        }
        start_mirror(session, upstream, ctx);
        if fresh_connection(ctx) && ctx.upgrade.is_none() {
            upstream.insert_header(http::header::CONNECTION, "close")?;
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // An upgraded stream's bytes are no request body: its route timeout
        // ended with the handshake.
        if end_of_stream && ctx.deadline.is_none() && ctx.upgrade.is_none() {
            ctx.deadline = ctx.timeout.map(|t| Instant::now() + t);
        }
        let Mirror::Collecting(copy) = &mut ctx.mirror else {
            return Ok(());
        };
        if let Some(chunk) = body {
            if copy.body.len() + chunk.len() > MAX_MIRRORED_BODY {
                metrics().shadow(&copy.shadow.mapping, "not_copied");
                ctx.mirror = Mirror::Settled;
                return Ok(());
            }
            copy.body.extend_from_slice(chunk);
        }
        if end_of_stream {
            if let Mirror::Collecting(copy) = std::mem::replace(&mut ctx.mirror, Mirror::Settled) {
                let MirrorCopy {
                    shadow,
                    request,
                    body,
                } = *copy;
                shadow.mirror(request, body.freeze());
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        check_deadline(ctx)?;
        let status = upstream_response.status.as_u16();
        // Nothing has gone downstream yet, so the response can still be
        // dropped for another try: the error ends this try without
        // returning its connection to the pool (the rest of the response
        // is unread), and Pingora calls `upstream_peer` again, replaying
        // the buffered request body.
        if !session.as_ref().retry_buffer_truncated()
            && self.retry_allowed(ctx, |on| on.status(status))
        {
            ctx.status_retry = true;
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                format!("upstream answered {status}; retrying"),
            );
            e.set_retry(true);
            return Err(e.into_up());
        }
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            // The route timeout covers the handshake, not the upgraded
            // stream's life, which the idle timeout bounds.
            ctx.deadline = None;
        }
        let suppress = ctx
            .snapshot
            .as_ref()
            .is_some_and(|s| s.module.suppress_envoy_headers);
        let service_time = match (ctx.upstream_started, suppress) {
            (Some(started), false) => {
                let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                Some(HeaderValue::from(millis))
            }
            _ => None,
        };
        headers::forward_response(upstream_response, service_time)?;
        match ctx.filters.as_mut() {
            Some(run) => run.upstream_response(session, upstream_response).await,
            None => Ok(()),
        }
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        match ctx.filters.as_mut() {
            Some(run) => run
                .response_body(session, body, end_of_stream)
                .map(|_| None),
            None => Ok(None),
        }
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        check_deadline(ctx).map(|_| None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.close_if_draining(session);
        if let Some(cookie) = ctx.set_cookie.take() {
            response.append_header(http::header::SET_COOKIE, cookie)?;
        }
        let (Some(route), Some(snapshot)) = (ctx.route.as_ref(), ctx.snapshot.as_ref()) else {
            return Ok(());
        };
        if let Some(server) = &snapshot.module.server_name {
            response.insert_header(http::header::SERVER, server.as_str())?;
        }
        headers::apply_edits(&route.response_headers, || facts(session), response)?;
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS {
            ctx.snapshot = None;
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let failure = classify(e);
        let mapping = ctx
            .route
            .as_ref()
            .map(|r| r.mapping.as_str())
            .unwrap_or("-");
        let target = ctx.route.as_ref().map(|r| r.target_name()).unwrap_or("-");
        if failure.status >= 500 {
            throttled!(
                warn,
                "mapping {mapping} upstream {target}: {} {}: {e}",
                failure.status,
                failure.cause
            );
            metrics().upstream_error(mapping, failure.kind);
        }
        if failure.status > 0 {
            // The connection is not reused after a failure: say so.
            session.set_keepalive(None);
            let server_name = ctx
                .snapshot
                .as_ref()
                .and_then(|s| s.module.server_name.clone());
            let reply = if ctx.overloaded {
                Reply::overloaded()
            } else {
                // A Pingora HTTPStatus error may carry any number.
                let status = http::StatusCode::from_u16(failure.status)
                    .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                Reply::failure(status, failure.cause)
            };
            if let Err(write_error) = reply.send(session, server_name.as_deref()).await {
                throttled!(warn, "failed to send the error response: {write_error}");
            }
        }
        FailToProxy {
            error_code: failure.status,
            can_reuse_downstream: false,
        }
    }

    /// An expired pooled connection that was refused is routine.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        error: &Error,
        context: ProxyWarnLogContext,
    ) -> bool {
        matches!(context, ProxyWarnLogContext::UpstreamRetry) && is_expired_refusal(error)
    }

    /// `fail_to_proxy` logs failures with the Mapping's name; Pingora's own
    /// line would say the same thing again without it.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        ctx.route.is_some()
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(connection) = bounded_connection(session) {
            connection.request_done();
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        if let Some(run) = ctx.filters.as_mut() {
            run.logging(session, status).await;
        }
        match (&ctx.route, ctx.local_reply) {
            (Some(route), None) => {
                route.metrics.record(status, elapsed.as_secs_f64());
            }
            (_, Some(reason)) => metrics().local_reply(reason),
            (None, None) => {}
        }
        let Some(format) = ctx.access_log else {
            return;
        };
        if !log::log_enabled!(target: "access", log::Level::Info) {
            return;
        }
        let req = session.req_header();
        let upstream = ctx.upstream_addr.as_ref().map(ToString::to_string);
        let entry = AccessEntry {
            client: session.client_addr().map(|a| a.to_string()),
            method: req.method.as_str(),
            uri: &req.uri,
            protocol: protocol(session),
            status,
            bytes: session.body_bytes_sent(),
            duration: elapsed,
            upstream: upstream.as_deref(),
            mapping: ctx.route.as_ref().map(|r| r.mapping.as_str()),
            request_id: req
                .headers
                .get(&crate::filters::request_id::HEADER)
                .and_then(|v| v.to_str().ok()),
            note: match (ctx.local_reply, error) {
                (Some(reason), _) => Some(reason),
                (None, Some(e)) => Some(e.etype().as_str()),
                (None, None) => None,
            },
        };
        info!(target: "access", "{}", entry.render(format));
    }
}

/// The HTTP/1 connection under a session, which bounds its request heads
/// and must be told where one ends and when the exchange is over.
fn bounded_connection(session: &Session) -> Option<&BoundedStream> {
    session.as_downstream().stream().and_then(BoundedStream::of)
}

/// Decides, on the first try, whether the route's shadow gets a copy: the
/// head as sent to the primary (rewrites included), and the body once it
/// has passed, if it is small enough to keep.
fn start_mirror(session: &mut Session, upstream: &RequestHeader, ctx: &mut RequestCtx) {
    if !matches!(ctx.mirror, Mirror::Undecided) {
        return;
    }
    ctx.mirror = Mirror::Settled;
    let Some(shadow) = ctx.route.as_ref().and_then(|r| r.shadow.clone()) else {
        return;
    };
    // An upgraded stream has no request to copy.
    if ctx.upgrade.is_some() || !shadow.takes(rand::thread_rng().gen_range(0..100)) {
        return;
    }
    if session.is_body_empty() {
        shadow.mirror(upstream.clone(), Bytes::new());
        return;
    }
    let declared = upstream
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|length| length > MAX_MIRRORED_BODY) {
        metrics().shadow(&shadow.mapping, "not_copied");
        return;
    }
    ctx.mirror = Mirror::Collecting(Box::new(MirrorCopy {
        shadow,
        request: upstream.clone(),
        body: BytesMut::new(),
    }));
}

/// How long each upstream read or write of this try may wait.
fn upstream_wait(route: &Route, ctx: &RequestCtx, now: Instant) -> Option<std::time::Duration> {
    // Pingora keeps these timeouts for the upgraded stream's life, so they
    // can only be the idle timeout; `check_deadline` still holds the
    // handshake's answer to the route timeout.
    if ctx.upgrade.is_some() {
        return Some(route.idle_timeout.unwrap_or(UPGRADED_IDLE));
    }
    // Each read may wait at most what is left of the route timeout (or
    // the idle timeout, if shorter); `check_deadline` catches a
    // response that trickles in under that.
    // While the body still comes, each read may wait the whole timeout:
    // Pingora restarts its upstream read with every body chunk, so an
    // upload that flows is never cut, one that stalls that long is.
    let left = match ctx.deadline {
        Some(deadline) => Some(deadline.saturating_duration_since(now)),
        None => ctx.timeout,
    };
    let per_try = route.retry.and_then(|r| r.per_try_timeout);
    [left, route.idle_timeout, per_try]
        .into_iter()
        .flatten()
        .min()
}

/// Whether a reused HTTP/1 connection was established longer than
/// `lifetime` ago. An HTTP/2 connection is shared by many streams and
/// Pingora returns it to its pool even when a stream refuses it, so
/// refusing would only hand the same connection back: it is not checked.
fn expired(peer: &HttpPeer, digest: Option<&Digest>, lifetime: std::time::Duration) -> bool {
    if peer.options.alpn.get_max_http_version() > 1 {
        return false;
    }
    let Some(timing) = digest.and_then(|d| d.timing_digest.first()?.as_ref()) else {
        return false;
    };
    // A clock set back makes the age unknown: the connection stays.
    SystemTime::now()
        .duration_since(timing.established_ts)
        .is_ok_and(|age| age > lifetime)
}

fn is_expired_refusal(e: &Error) -> bool {
    e.etype() == &ErrorType::Custom(respond::EXPIRED_CONNECTION)
}

/// Whether this try must not take a pooled connection: it has refused as
/// many expired ones as it may.
fn fresh_connection(ctx: &RequestCtx) -> bool {
    ctx.expired_refused >= EXPIRED_REFUSALS
}

/// Fails the exchange once the route timeout has run out; the error maps
/// to 504 when the response has not started yet.
fn check_deadline(ctx: &RequestCtx) -> Result<()> {
    match ctx.deadline {
        Some(deadline) if Instant::now() >= deadline => Err(Error::explain(
            ErrorType::ReadTimedout,
            "the route timeout ran out before the upstream response completed",
        )
        .into_up()),
        _ => Ok(()),
    }
}

/// What header templates may refer to, for this request.
fn facts(session: &Session) -> RequestFacts<'_> {
    RequestFacts {
        client_addr: session.client_addr().and_then(|a| a.as_inet()).copied(),
        local_addr: session.server_addr().and_then(|a| a.as_inet()).copied(),
        protocol: protocol(session),
        request_headers: &session.req_header().headers,
        peer: edge_session(session).and_then(|e| e.client.as_ref()),
        sni: edge_session(session).and_then(|e| e.sni.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_documents;
    use crate::model::key_coverage::{document, secret, self_signed};
    use crate::snapshot::{compile, Inherited, Resolution};
    use http::header::LOCATION;

    const LISTENER: &str =
        "protocol: HTTP\nsecurityModel: XFP\nhostBinding:\n  namespace:\n    from: ALL";

    /// The snapshot of `yaml`; invalid resources are left out as a
    /// reload leaves them out.
    fn snapshot(yaml: &str) -> Snapshot {
        let (mut raws, mut diags) = (Vec::new(), Vec::new());
        parse_documents(
            std::path::Path::new("proxy.yaml"),
            yaml,
            &mut raws,
            &mut diags,
        );
        let registry = crate::filters::Registry::with_builtins();
        let (model, _) = crate::model::validate(&raws, "default", &registry);
        compile(&model, Resolution::Skip, &Inherited::default()).0
    }

    /// Cleartext listeners on 8080 (no trusted proxy) and 8081 (one):
    /// `a.example` routes insecure requests, `b.example` redirects them
    /// (the default), `r.example` rejects them, and `bad.example` is an
    /// invalid Host.
    fn cleartext() -> Snapshot {
        let host = |name: &str, action: &str| {
            let policy = format!("requestPolicy:\n  insecure:\n    action: {action}");
            document("Host", name, &format!("hostname: {name}.example\n{policy}"))
        };
        let yaml = [
            document("Listener", "plain", &format!("port: 8080\n{LISTENER}")),
            document("Listener", "proxied", &format!("port: 8081\nl7Depth: 1\n{LISTENER}")),
            host("a", "Route"),
            document("Host", "b", "hostname: b.example"),
            host("r", "Reject"),
            host("bad", "Sometimes"),
            document("Mapping", "api", "hostname: \"*\"\nprefix: /api/\nservice: api\nallow_upgrade: [websocket]\ntimeout_ms: 3000\nidle_timeout_ms: 1000"),
            document("Mapping", "slow", "hostname: \"*\"\nprefix: /slow/\nservice: slow\ntimeout_ms: 3000"),
            document("Mapping", "old", "hostname: \"*\"\nprefix: /old/\nservice: new.example\nhost_redirect: true\nprefix_redirect: /new/"),
        ];
        snapshot(&yaml.concat())
    }

    /// An HTTPS listener on 8443 with two TLS Hosts.
    fn tls() -> Snapshot {
        let mut yaml = document(
            "Listener",
            "https",
            &format!("port: 8443\n{}", LISTENER.replace("HTTP", "HTTPS")),
        );
        for name in ["a", "b"] {
            let pem = self_signed(&format!("{name}.example"));
            yaml += &secret(name, &[("tls.crt", &pem.cert), ("tls.key", &pem.key)]);
            let spec = format!("hostname: {name}.example\ntlsSecret:\n  name: {name}");
            yaml += &document("Host", name, &spec);
        }
        yaml += &document(
            "Mapping",
            "api",
            "hostname: \"*\"\nprefix: /api/\nservice: api",
        );
        snapshot(&yaml)
    }

    fn request(target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        for (name, value) in headers {
            req.insert_header(name.to_string(), *value).unwrap();
        }
        req
    }

    /// What routing decided, as the client would see it.
    #[derive(Debug, PartialEq)]
    enum Decision {
        /// The gateway answers before any filter runs.
        Refused(u16, &'static str),
        /// The router answers once the filters let the request through.
        Answered(u16, &'static str),
        /// Proxied with this Mapping.
        Proxied(String),
    }

    fn decide(snapshot: &Snapshot, port: u16, req: &RequestHeader, wire: Wire) -> Decision {
        let listener = snapshot.listener(port).unwrap();
        match route(snapshot, listener, req, wire, None) {
            Err(reply) => Decision::Refused(reply.status().as_u16(), reply.reason),
            Ok(Routed {
                answer: Some(reply),
                ..
            }) => Decision::Answered(reply.status().as_u16(), reply.reason),
            Ok(Routed { route, .. }) => Decision::Proxied(route.unwrap().mapping.clone()),
        }
    }

    const CLEARTEXT: Wire = Wire {
        tls: false,
        sni: None,
    };

    #[test]
    fn a_cleartext_request_is_routed_by_its_host_name() {
        let snapshot = cleartext();
        let get = |target: &str, headers: &[(&str, &str)]| {
            decide(&snapshot, 8080, &request(target, headers), CLEARTEXT)
        };
        assert_eq!(
            get("/api/x", &[("host", "a.example")]),
            Decision::Proxied("api.default".into())
        );
        // The port is no part of the name a Host matches.
        assert_eq!(
            get("/api/x", &[("host", "A.example:8080")]),
            Decision::Proxied("api.default".into())
        );
        assert_eq!(get("/api/x", &[]), Decision::Refused(404, "no_host"));
        assert_eq!(
            get("/api/x", &[("host", "c.example")]),
            Decision::Refused(404, "no_host")
        );
        assert_eq!(
            get("/api/x", &[("host", "bad.example")]),
            Decision::Refused(503, "host_unavailable")
        );
        // No Mapping matches: the router's 404 comes after the filters.
        assert_eq!(
            get("/other", &[("host", "a.example")]),
            Decision::Answered(404, "no_route")
        );
    }

    #[test]
    fn an_insecure_request_meets_its_hosts_insecure_action() {
        let snapshot = cleartext();
        let get = |port, host: &str, path: &str, proto: &str| {
            let req = request(path, &[("host", host), ("x-forwarded-proto", proto)]);
            decide(&snapshot, port, &req, CLEARTEXT)
        };
        let api = Decision::Proxied("api.default".into());
        let redirected = Decision::Refused(301, "https_redirect");
        let rejected = Decision::Refused(404, "insecure_rejected");
        assert_eq!(get(8080, "a.example", "/api/x", "http"), api);
        assert_eq!(get(8080, "b.example", "/api/x", "http"), redirected);
        // Mapped or not, every insecure request is redirected.
        assert_eq!(get(8080, "b.example", "/none", "http"), redirected);
        assert_eq!(get(8080, "r.example", "/api/x", "http"), rejected);
        // ACME's HTTP-01 challenge is always served in cleartext.
        let challenge = "/.well-known/acme-challenge/t";
        assert_eq!(
            get(8080, "r.example", challenge, "http"),
            Decision::Answered(404, "no_route")
        );
        // X-Forwarded-Proto counts only from a trusted proxy.
        assert_eq!(get(8080, "r.example", "/api/x", "https"), rejected);
        assert_eq!(get(8081, "r.example", "/api/x", "https"), api);
        assert_eq!(get(8081, "r.example", "/api/x", "http"), rejected);

        let req = request("/api/x?q=1", &[("host", "b.example")]);
        let listener = snapshot.listener(8080).unwrap();
        let reply = route(&snapshot, listener, &req, CLEARTEXT, None)
            .err()
            .unwrap();
        assert_eq!(
            reply.header_value(&LOCATION).unwrap(),
            "https://b.example/api/x?q=1"
        );
    }

    #[test]
    fn a_host_redirect_mapping_answers_with_its_location() {
        let snapshot = cleartext();
        let req = request("/old/page?q=1", &[("host", "a.example")]);
        let listener = snapshot.listener(8080).unwrap();
        let routed = route(&snapshot, listener, &req, CLEARTEXT, None)
            .ok()
            .unwrap();
        let reply = routed.answer.unwrap();
        assert_eq!((reply.status().as_u16(), reply.reason), (301, "redirect"));
        // The request was insecure: the Location keeps its scheme.
        assert_eq!(
            reply.header_value(&LOCATION).unwrap(),
            "http://new.example/new/page?q=1"
        );
    }

    #[test]
    fn on_tls_the_host_the_handshake_chose_owns_the_request() {
        let snapshot = tls();
        let wire = |sni| Wire { tls: true, sni };
        let get = |headers: &[(&str, &str)], sni| {
            decide(&snapshot, 8443, &request("/api/x", headers), wire(sni))
        };
        let api = Decision::Proxied("api.default".into());
        assert_eq!(get(&[("host", "a.example")], Some("a.example")), api);
        // Without a Host header (HTTP/1.0) the SNI names the Host.
        assert_eq!(get(&[], Some("b.example")), api);
        assert_eq!(
            get(&[("host", "b.example")], Some("a.example")),
            Decision::Refused(421, "misdirected")
        );
        assert_eq!(
            get(&[("host", "a.example")], None),
            Decision::Refused(404, "no_host")
        );
    }

    /// The origins of the filters a request runs, as routing chose them.
    fn filter_origins(
        snapshot: &Snapshot,
        port: u16,
        req: &RequestHeader,
        wire: Wire,
    ) -> Vec<String> {
        let listener = snapshot.listener(port).unwrap();
        let routed = route(snapshot, listener, req, wire, None).ok().unwrap();
        routed
            .filters
            .iter()
            .flat_map(|chain| chain.iter())
            .map(|entry| entry.origin.to_string())
            .collect()
    }

    #[test]
    fn bypass_auth_skips_the_authorizer_and_the_sni_names_the_policy_host() {
        let mut yaml = document(
            "Listener",
            "https",
            &format!("port: 8443\n{}", LISTENER.replace("HTTP", "HTTPS")),
        );
        let pem = self_signed("a.example");
        yaml += &secret("a", &[("tls.crt", &pem.cert), ("tls.key", &pem.key)]);
        yaml += &document("Host", "a", "hostname: a.example\ntlsSecret:\n  name: a");
        yaml += &document(
            "AuthService",
            "authz",
            "auth_service: authz:3000\nproto: http",
        );
        yaml += &document(
            "Filter",
            "office",
            "IpAllowDeny:\n  ip_allow:\n  - remote: 10.0.0.0/8",
        );
        yaml += &document(
            "FilterPolicy",
            "guard",
            "rules:\n- host: a.example\n  path: /api/*\n  filters:\n  - name: office",
        );
        for (name, extra) in [("api", ""), ("public", "\nbypass_auth: true")] {
            let spec = format!("hostname: \"*\"\nprefix: /{name}/\nservice: {name}{extra}");
            yaml += &document("Mapping", name, &spec);
        }
        let snapshot = snapshot(&yaml);
        let wire = Wire {
            tls: true,
            sni: Some("a.example"),
        };
        let authorizer = |origins: &[String]| origins.iter().any(|o| o.starts_with("AuthService"));
        let policy = |origins: &[String]| origins.iter().any(|o| o.contains("office"));

        // Without a Host header (HTTP/1.0), or with one that names no Host,
        // the SNI is the host the policy rule is matched against.
        for headers in [&[][..], &[("host", "x.invalid")][..]] {
            let api = filter_origins(&snapshot, 8443, &request("/api/x", headers), wire);
            assert!(authorizer(&api) && policy(&api), "{headers:?}: {api:?}");
        }
        let public = filter_origins(&snapshot, 8443, &request("/public/x", &[]), wire);
        assert!(!authorizer(&public) && !policy(&public), "{public:?}");
    }

    #[test]
    fn a_cleartext_connection_to_a_tls_listener_is_refused() {
        let (tls, cleartext) = (tls(), cleartext());
        let refused = handshake_holds(None, tls.listener(8443).unwrap())
            .err()
            .unwrap();
        assert_eq!(
            (refused.status().as_u16(), refused.reason),
            (421, "tls_required")
        );
        assert_eq!(
            handshake_holds(None, cleartext.listener(8080).unwrap()).ok(),
            Some(true)
        );
    }

    /// The route of `path` on a.example, for the phases after routing.
    fn mapped(snapshot: &Snapshot, path: &str) -> Arc<Route> {
        let req = request(path, &[("host", "a.example")]);
        let listener = snapshot.listener(8080).unwrap();
        let routed = route(snapshot, listener, &req, CLEARTEXT, None);
        routed.ok().and_then(|r| r.route).unwrap()
    }

    #[test]
    fn an_upgrade_needs_its_protocol_named_by_the_mapping() {
        let snapshot = cleartext();
        let (api, slow) = (mapped(&snapshot, "/api/x"), mapped(&snapshot, "/slow/x"));
        assert_eq!(allowed_upgrade(&api, None).ok(), Some(None));
        assert_eq!(
            allowed_upgrade(&api, Some("WebSocket")).ok(),
            Some(Some(Upgrade::WebSocket))
        );
        let refused = allowed_upgrade(&slow, Some("websocket")).err().unwrap();
        assert_eq!(
            (refused.status().as_u16(), refused.reason),
            (403, "upgrade_refused")
        );
        assert!(allowed_upgrade(&api, Some("spdy/3")).is_err());
    }

    #[test]
    fn an_upstream_read_waits_what_is_left_of_the_shortest_timeout() {
        let snapshot = Arc::new(cleartext());
        let (api, slow) = (mapped(&snapshot, "/api/x"), mapped(&snapshot, "/slow/x"));
        let gateway = Gateway::new(
            Arc::new(ArcSwap::new(snapshot.clone())),
            Arc::new(AtomicBool::new(false)),
        );
        let now = Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut ctx = gateway.new_ctx();
        ctx.timeout = slow.timeout;
        // The body still comes: the whole route timeout, each read.
        assert_eq!(upstream_wait(&slow, &ctx, now), Some(ms(3000)));
        ctx.deadline = Some(now + ms(2000));
        assert_eq!(upstream_wait(&slow, &ctx, now), Some(ms(2000)));
        // The idle timeout is shorter.
        assert_eq!(upstream_wait(&api, &ctx, now), Some(ms(1000)));
        ctx.deadline = Some(now);
        assert_eq!(upstream_wait(&api, &ctx, now + ms(5)), Some(ms(0)));
        // An upgraded stream lives by its idle timeout alone.
        ctx.upgrade = Some(Upgrade::WebSocket);
        assert_eq!(upstream_wait(&api, &ctx, now), Some(ms(1000)));
        assert_eq!(upstream_wait(&slow, &ctx, now), Some(UPGRADED_IDLE));
    }

    #[test]
    fn a_request_names_one_host_for_every_decision() {
        let stripping = ModuleSettings {
            strip_matching_host_port: true,
            ..ModuleSettings::default()
        };
        let names = |authority, module: &ModuleSettings| {
            let n = RequestNames::new(authority, module, 8080);
            (n.host, n.authority, n.port_stripped)
        };
        let plain = ModuleSettings::default();
        assert_eq!(
            names("a.example", &plain),
            ("a.example", "a.example", false)
        );
        assert_eq!(
            names("a.example.", &plain),
            ("a.example", "a.example", false)
        );
        assert_eq!(
            names("a.example:8080", &plain),
            ("a.example", "a.example:8080", false)
        );
        assert_eq!(
            names("a.example.:8080", &stripping),
            ("a.example", "a.example", true)
        );
        assert_eq!(
            names("a.example:9090", &stripping),
            ("a.example", "a.example:9090", false)
        );
        assert_eq!(names("[::1]:8080", &stripping), ("[::1]", "[::1]", true));
    }
}
