//! Filters: code that runs around the proxying of a request, one hook per
//! Pingora phase. The gateway's own policies (request IDs, IP allow/deny,
//! CORS, external auth, rate limits) are filters on this same API; users
//! add theirs through [`crate::Pingress::filter`].
//!
//! A filter is built once per configuration snapshot from typed settings:
//! a `kind: Filter` resource for user filters, the Module or a resource
//! kind for the built-in ones. A `kind: FilterPolicy` decides which
//! requests run which filters, with per-reference `arguments`.
//!
//! Everything a filter needs comes from [`prelude`]: a filter's crate needs
//! `pingress` and `serde`, not `pingora` or `async-trait` of its own.
//!
//! ```no_run
//! use pingress::filters::prelude::*;
//! use serde::Deserialize;
//!
//! /// Answers 403 unless the request carries the configured header.
//! struct RequireHeader {
//!     name: String,
//! }
//!
//! #[derive(Deserialize)]
//! struct Settings {
//!     name: String,
//! }
//!
//! #[async_trait]
//! impl Filter for RequireHeader {
//!     const TYPE: &'static str = "RequireHeader";
//!     type Settings = Settings;
//!     type Arguments = ();
//!     type State = ();
//!
//!     fn build(settings: Settings) -> Result<Self, BuildError> {
//!         Ok(RequireHeader { name: settings.name })
//!     }
//!
//!     async fn request(&self, session: &mut Session, _cx: &mut Cx<'_, Self>) -> pingora::Result<Flow> {
//!         if session.req_header().headers.contains_key(self.name.as_str()) {
//!             Ok(Flow::Continue)
//!         } else {
//!             Ok(Flow::Respond(Reply::text(StatusCode::FORBIDDEN, "missing header")))
//!         }
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     pingress::Pingress::new().filter::<RequireHeader>().main()
//! }
//! ```

/// What a filter needs, for `use pingress::filters::prelude::*;`. Pingora
/// comes as `pingora` (`pingora::Result` for the hooks), so it need not be
/// a dependency of the filter's crate.
pub mod prelude {
    pub use super::{BuildError, Cx, Filter, Flow, MatchedMapping, Reply, Session};
    pub use async_trait::async_trait;
    pub use bytes::Bytes;
    pub use http::header::{self, HeaderName, HeaderValue};
    pub use http::StatusCode;
    pub use pingora;
    pub use pingora::http::{RequestHeader, ResponseHeader};
    pub use pingora::{Error, ErrorType};
}

pub(crate) mod auth;
pub(crate) mod chain;
pub(crate) mod cors;
pub(crate) mod ip;
pub(crate) mod policy;
pub(crate) mod rate_limit;
pub(crate) mod registry;
mod reply;
pub(crate) mod request_id;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;
use serde::de::DeserializeOwned;

pub use chain::FilterChains;
pub use pingora::proxy::Session;
pub use registry::Registry;
pub use reply::Reply;

use cors::CorsPolicy;
use rate_limit::labels::LabelGroup;

/// Why a filter cannot be built from its settings: reported, with the
/// resource that configured the filter, as a configuration error. Made from
/// text: `Err("no such key".into())`, or `?` on a `String` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

impl From<String> for BuildError {
    fn from(message: String) -> BuildError {
        BuildError(message)
    }
}

impl From<&str> for BuildError {
    fn from(message: &str) -> BuildError {
        BuildError(message.to_string())
    }
}

/// What a request hook decides.
pub enum Flow {
    /// Go on with the next filter, then proxy.
    Continue,
    /// Answer the client with this reply; no later filter runs and nothing
    /// is sent upstream.
    Respond(Reply),
}

/// A filter. Implement the hooks you need; the others do nothing, and the
/// chain stops calling a hook once it has seen that the filter left it to
/// its default (each call costs a boxed future and a panic guard), so
/// nothing needs declaring.
///
/// Hooks run in the order of the filter chain: request hooks front to
/// back, response hooks for every filter whose request hook ran. An `Err`
/// from a hook, or a panic inside one, ends the request with a 500 (or the
/// status of an `ErrorType::HTTPStatus` error) and is logged with the
/// filter's name; other requests are not affected.
///
/// A filter a FilterPolicy selects runs with authentication, as Emissary's
/// do, so it does not run for every request its rule matches: not for a
/// Mapping with `bypass_auth: true`, not for a redirect Mapping (answered
/// without reaching an upstream), not after an earlier reference of the
/// same rule let the request through with `onAllow: break`, and not when
/// its `ifRequestHeader` condition does not hold. A filter that must see
/// every request upstream (signing, auditing) belongs on Mappings without
/// `bypass_auth`.
#[async_trait]
pub trait Filter: Send + Sync + Sized + 'static {
    /// The type name a `kind: Filter` resource uses: `spec: {<TYPE>: settings}`.
    const TYPE: &'static str;
    /// The filter's settings, parsed from YAML once per snapshot.
    type Settings: DeserializeOwned;
    /// What each FilterPolicy reference passes in `arguments:`; a reference
    /// without arguments parses YAML `null` (so `()` or an `Option` fit).
    type Arguments: DeserializeOwned + Send + Sync + 'static;
    /// Per-request state, created with `Default` when a request starts.
    type State: Default + Send + Sync + 'static;

    /// Builds the filter; an `Err` is reported as a configuration error on
    /// the resource that configured it.
    fn build(settings: Self::Settings) -> std::result::Result<Self, BuildError>;

    /// Before the request goes upstream; may answer it.
    async fn request(&self, _session: &mut Session, _cx: &mut Cx<'_, Self>) -> Result<Flow> {
        Ok(Flow::Continue)
    }

    /// The request as it will be sent upstream, after the gateway's own
    /// rewrites and header edits.
    async fn upstream_request(
        &self,
        _session: &mut Session,
        _upstream: &mut RequestHeader,
        cx: &mut Cx<'_, Self>,
    ) -> Result<()> {
        cx.left_to_default();
        Ok(())
    }

    /// The upstream's response head on its way to the client.
    async fn upstream_response(
        &self,
        _session: &mut Session,
        _response: &mut ResponseHeader,
        cx: &mut Cx<'_, Self>,
    ) -> Result<()> {
        cx.left_to_default();
        Ok(())
    }

    /// Each chunk of the upstream's response body on its way to the client.
    fn response_body(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        cx: &mut Cx<'_, Self>,
    ) -> Result<()> {
        cx.left_to_default();
        Ok(())
    }

    /// After the response is complete (or failed); `status` is 0 when none
    /// was sent.
    async fn logging(&self, _session: &mut Session, _status: u16, cx: &mut Cx<'_, Self>) {
        cx.left_to_default();
    }
}

/// A hook's view of the request beyond the session: this filter's
/// arguments and state, and what the gateway decided so far.
pub struct Cx<'a, F: Filter> {
    /// The arguments of the FilterPolicy reference that selected the filter.
    pub arguments: &'a F::Arguments,
    /// This filter's state for this request.
    pub state: &'a mut F::State,
    pub(crate) request: &'a mut RequestInfo,
}

impl<F: Filter> Cx<'_, F> {
    /// Said by the default hooks: this filter does nothing there.
    fn left_to_default(&mut self) {
        self.request.default_hook = true;
    }

    /// The Mapping the request matched, if any.
    pub fn route(&self) -> Option<MatchedMapping<'_>> {
        self.request.route.as_deref().map(MatchedMapping)
    }

    /// The client's address: the connection's peer, or, behind trusted
    /// proxies (a Listener's `l7Depth`), the address they reported in
    /// `X-Forwarded-For`.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.request.client_ip
    }

    /// Asks the gateway to match the request against the Mappings again
    /// once the authentication filters are done, as Emissary does after
    /// ext_authz: a filter that added a header can change the route.
    pub fn reroute(&mut self) {
        self.request.reroute = true;
    }
}

/// What the filters read of the route a request matched; the snapshot's
/// routes are made to be read this way.
pub(crate) trait RouteFacts: Send + Sync {
    /// `name.namespace` of the Mapping.
    fn mapping(&self) -> &str;
    /// The Mapping's `metadata.labels`.
    fn labels(&self) -> &BTreeMap<String, String>;
    /// The upstream cluster's name; `None` when the gateway answers the
    /// route itself with a redirect.
    fn destination(&self) -> Option<&str>;
    fn cors(&self) -> Option<&Arc<CorsPolicy>>;
    /// The Mapping's rate-limit label groups.
    fn rate_labels(&self) -> &[LabelGroup];
}

/// The Mapping a request matched, as filters see it.
#[derive(Clone, Copy)]
pub struct MatchedMapping<'a>(&'a dyn RouteFacts);

impl<'a> MatchedMapping<'a> {
    /// `name.namespace`.
    pub fn name(&self) -> &'a str {
        self.0.mapping()
    }

    /// The Mapping's `metadata.labels`.
    pub fn labels(&self) -> &'a BTreeMap<String, String> {
        self.0.labels()
    }

    /// Whether the gateway answers this route itself with a redirect.
    pub fn is_redirect(&self) -> bool {
        self.0.destination().is_none()
    }
}

/// What the gateway knows of a request that filters may read, shared by
/// all filters of the request.
#[derive(Default)]
pub(crate) struct RequestInfo {
    pub route: Option<Arc<dyn RouteFacts>>,
    /// Set by the hook that just ran if it was a default one.
    pub default_hook: bool,
    pub client_ip: Option<IpAddr>,
    pub reroute: bool,
}
