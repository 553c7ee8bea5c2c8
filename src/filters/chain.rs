//! Filters without their types, in the order a request runs them, and the
//! guard that turns a failing or panicking hook into an error for that
//! request alone.

use std::any::Any;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result};

use super::policy::{FilterPolicies, Glob};
use super::{Cx, Filter, Flow, Reply, RequestInfo, Session};
use crate::throttle::throttled;

pub(crate) type Arguments = Arc<dyn Any + Send + Sync>;
type State = Box<dyn Any + Send + Sync>;

/// A filter behind `dyn`: arguments and state travel as `Any` and are
/// given back their types here.
#[async_trait]
pub(crate) trait DynFilter: Send + Sync {
    fn type_name(&self) -> &'static str;
    fn defaulted(&self) -> &Defaulted;
    fn new_state(&self) -> State;
    async fn request(
        &self,
        session: &mut Session,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<Flow>;
    async fn upstream_request(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<()>;
    async fn upstream_response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<()>;
    fn response_body(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<()>;
    async fn logging(
        &self,
        session: &mut Session,
        status: u16,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    );
}

pub(crate) struct Typed<F> {
    filter: F,
    defaulted: Defaulted,
}

impl<F> Typed<F> {
    pub fn new(filter: F) -> Typed<F> {
        Typed {
            filter,
            defaulted: Defaulted::default(),
        }
    }
}

/// Rebuilds a typed [`Cx`]; `None` only if the chain paired a filter with
/// another filter's arguments, which [`Entry::new`] rules out.
fn cx<'a, F: Filter>(
    arguments: &'a Arguments,
    state: &'a mut State,
    facts: &'a mut RequestInfo,
) -> Option<Cx<'a, F>> {
    Some(Cx {
        arguments: arguments.downcast_ref::<F::Arguments>()?,
        state: state.downcast_mut::<F::State>()?,
        request: facts,
    })
}

fn mismatch<F: Filter>() -> Box<Error> {
    Error::explain(
        ErrorType::InternalError,
        format!("filter {}: arguments or state of another type", F::TYPE),
    )
}

#[async_trait]
impl<F: Filter> DynFilter for Typed<F> {
    fn type_name(&self) -> &'static str {
        F::TYPE
    }

    fn defaulted(&self) -> &Defaulted {
        &self.defaulted
    }

    fn new_state(&self) -> State {
        // A zero-sized state (the common `()`) allocates nothing.
        Box::new(F::State::default())
    }

    async fn request(
        &self,
        session: &mut Session,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<Flow> {
        let mut cx = cx::<F>(arguments, state, facts).ok_or_else(mismatch::<F>)?;
        self.filter.request(session, &mut cx).await
    }

    async fn upstream_request(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<()> {
        let mut cx = cx::<F>(arguments, state, facts).ok_or_else(mismatch::<F>)?;
        self.filter
            .upstream_request(session, upstream, &mut cx)
            .await
    }

    async fn upstream_response(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<()> {
        let mut cx = cx::<F>(arguments, state, facts).ok_or_else(mismatch::<F>)?;
        self.filter
            .upstream_response(session, response, &mut cx)
            .await
    }

    fn response_body(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) -> Result<()> {
        let mut cx = cx::<F>(arguments, state, facts).ok_or_else(mismatch::<F>)?;
        self.filter
            .response_body(session, body, end_of_stream, &mut cx)
    }

    async fn logging(
        &self,
        session: &mut Session,
        status: u16,
        arguments: &Arguments,
        state: &mut State,
        facts: &mut RequestInfo,
    ) {
        if let Some(mut cx) = cx::<F>(arguments, state, facts) {
            self.filter.logging(session, status, &mut cx).await
        }
    }
}

/// Where in the chain a filter runs. Emissary's order: IP allow/deny and
/// CORS, then authentication (after which the route is matched again),
/// then rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Early,
    /// AuthService and FilterPolicy filters: skipped on redirects and by a
    /// Mapping's `bypass_auth`.
    Auth,
    Late,
}

/// What a FilterPolicy reference does when its filter answers (denies) or
/// lets the request through (allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Continue,
    /// Stop running this rule's filters.
    Break,
}

/// The hooks after `request` a filter leaves to their defaults, which do
/// nothing: learnt from the first call of each, after which no chain calls
/// them for this filter again.
#[derive(Debug, Default)]
pub(crate) struct Defaulted {
    upstream_request: AtomicBool,
    upstream_response: AtomicBool,
    response_body: AtomicBool,
    logging: AtomicBool,
}

/// One filter in a chain, with the arguments it runs with.
#[derive(Clone)]
pub(crate) struct Entry {
    pub filter: Arc<dyn DynFilter>,
    pub arguments: Arguments,
    /// `kind/name.namespace` of what configured the filter, for logs.
    pub origin: Arc<str>,
    pub stage: Stage,
    pub on_deny: Next,
    pub on_allow: Next,
    pub condition: Option<Arc<super::policy::HeaderCondition>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.origin, self.filter.type_name())
    }
}

impl Entry {
    /// A built-in filter that every request runs at `stage`.
    pub fn builtin<F: Filter<Arguments = ()>>(filter: F, origin: &str, stage: Stage) -> Entry {
        Entry {
            filter: Arc::new(Typed::new(filter)),
            arguments: Arc::new(()),
            origin: origin.into(),
            stage,
            on_deny: Next::Break,
            on_allow: Next::Continue,
            condition: None,
        }
    }
}

/// The chains a snapshot's requests run: one per FilterPolicy rule, one for
/// requests no rule selects, one for Mappings with `bypass_auth`. Each is
/// built once, so choosing one costs a reference count.
#[derive(Debug)]
pub struct FilterChains {
    rules: Vec<(Glob, Glob, Arc<[Entry]>)>,
    unmatched: Arc<[Entry]>,
    bypass: Arc<[Entry]>,
}

impl Default for FilterChains {
    fn default() -> Self {
        FilterChains::new(Vec::new(), &FilterPolicies::default())
    }
}

impl FilterChains {
    /// `builtin` holds the gateway's own filters, in order within a stage.
    pub(crate) fn new(builtin: Vec<Entry>, policies: &FilterPolicies) -> FilterChains {
        let stage = |s: Stage| builtin.iter().filter(move |e| e.stage == s).cloned();
        let chain = |policy: &[Entry]| -> Arc<[Entry]> {
            stage(Stage::Early)
                .chain(stage(Stage::Auth))
                .chain(policy.iter().cloned())
                .chain(stage(Stage::Late))
                .collect()
        };
        FilterChains {
            rules: policies
                .rules
                .iter()
                .map(|rule| (rule.host.clone(), rule.path.clone(), chain(&rule.entries)))
                .collect(),
            unmatched: chain(&[]),
            bypass: stage(Stage::Early).chain(stage(Stage::Late)).collect(),
        }
    }

    /// The chain for a request; `None` when it is empty. Paths compare
    /// with the case rule of the Mapping that serves them.
    pub(crate) fn select(
        &self,
        host: &str,
        path: &str,
        case_sensitive: bool,
        bypass_auth: bool,
    ) -> Option<&Arc<[Entry]>> {
        let chain = if bypass_auth {
            &self.bypass
        } else {
            self.rules
                .iter()
                .find(|(h, p, _)| h.matches(host, false) && p.matches(path, case_sensitive))
                .map_or(&self.unmatched, |(_, _, chain)| chain)
        };
        (!chain.is_empty()).then_some(chain)
    }
}

/// The filters one request runs, and their state.
pub(crate) struct Run {
    chain: Arc<[Entry]>,
    /// A filter's state exists once its request hook ran: only those
    /// filters see the rest of the exchange.
    states: Vec<Option<State>>,
    /// The next entry whose request hook is due.
    next: usize,
    pub facts: RequestInfo,
}

/// Turns a panic inside a hook into an error naming the filter.
fn panicked(origin: &str, payload: Box<dyn Any + Send>) -> Box<Error> {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into());
    throttled!(error, "filter {origin} panicked: {message}");
    Error::explain(
        ErrorType::InternalError,
        format!("filter {origin} panicked"),
    )
}

fn failed(origin: &str, mut e: Box<Error>) -> Box<Error> {
    throttled!(error, "filter {origin} failed: {e}");
    // A filter's error must not make Pingora retry the upstream.
    e.set_retry(false);
    e
}

/// The filters whose request hook ran and that were not seen leaving the
/// later hook `defaulted` picks to its default.
fn due<'a>(
    chain: &'a [Entry],
    states: &'a mut [Option<State>],
    defaulted: fn(&Defaulted) -> &AtomicBool,
) -> impl Iterator<Item = (&'a Entry, &'a mut State, &'a AtomicBool)> {
    chain
        .iter()
        .zip(states)
        .map(move |(entry, state)| (entry, state, defaulted(entry.filter.defaulted())))
        .filter(|(_, _, skip)| !skip.load(Ordering::Relaxed))
        .filter_map(|(entry, state, skip)| Some((entry, state.as_mut()?, skip)))
}

/// Remembers that the hook that just ran was a default one.
fn learn(facts: &mut RequestInfo, skip: &AtomicBool) {
    if std::mem::take(&mut facts.default_hook) {
        skip.store(true, Ordering::Relaxed);
    }
}

/// Awaits a hook; a panic becomes an error like a returned one.
async fn guarded<T>(origin: &str, hook: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match AssertUnwindSafe(hook).catch_unwind().await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(failed(origin, e)),
        Err(payload) => Err(panicked(origin, payload)),
    }
}

impl Run {
    pub fn new(chain: Arc<[Entry]>, facts: RequestInfo) -> Run {
        let states = chain.iter().map(|_| None).collect();
        Run {
            chain,
            states,
            next: 0,
            facts,
        }
    }

    /// Runs the request hooks of `stage` (and skips what is left of earlier
    /// stages); `Some` is the reply to send.
    pub async fn request(&mut self, session: &mut Session, stage: Stage) -> Result<Option<Reply>> {
        let mut rest_of_rule_skipped = false;
        // Redirects are answered without authentication.
        let redirecting = self
            .facts
            .route
            .as_ref()
            .is_some_and(|r| r.destination().is_none());
        while let Some(entry) = self.chain.get(self.next) {
            if entry.stage > stage {
                break;
            }
            let index = self.next;
            self.next += 1;
            let auth = entry.stage == Stage::Auth;
            let skip = entry.stage < stage
                || (auth && (rest_of_rule_skipped || redirecting))
                || entry
                    .condition
                    .as_ref()
                    .is_some_and(|c| !c.matches(&session.req_header().headers));
            if skip {
                continue;
            }
            let state = self.states[index].insert(entry.filter.new_state());
            let hook = entry
                .filter
                .request(session, &entry.arguments, state, &mut self.facts);
            match (
                guarded(&entry.origin, hook).await?,
                entry.on_deny,
                entry.on_allow,
            ) {
                (Flow::Respond(reply), Next::Break, _) => return Ok(Some(reply)),
                (Flow::Respond(_), Next::Continue, _) => {}
                (Flow::Continue, _, Next::Break) => rest_of_rule_skipped = true,
                (Flow::Continue, _, Next::Continue) => {}
            }
        }
        Ok(None)
    }

    pub async fn upstream_request(
        &mut self,
        session: &mut Session,
        upstream: &mut RequestHeader,
    ) -> Result<()> {
        for (entry, state, skip) in due(&self.chain, &mut self.states, |d| &d.upstream_request) {
            let hook = entry.filter.upstream_request(
                session,
                upstream,
                &entry.arguments,
                state,
                &mut self.facts,
            );
            guarded(&entry.origin, hook).await?;
            learn(&mut self.facts, skip);
        }
        Ok(())
    }

    pub async fn upstream_response(
        &mut self,
        session: &mut Session,
        response: &mut ResponseHeader,
    ) -> Result<()> {
        for (entry, state, skip) in due(&self.chain, &mut self.states, |d| &d.upstream_response) {
            let hook = entry.filter.upstream_response(
                session,
                response,
                &entry.arguments,
                state,
                &mut self.facts,
            );
            guarded(&entry.origin, hook).await?;
            learn(&mut self.facts, skip);
        }
        Ok(())
    }

    pub fn response_body(
        &mut self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        for (entry, state, skip) in due(&self.chain, &mut self.states, |d| &d.response_body) {
            let facts = &mut self.facts;
            let hook = AssertUnwindSafe(|| {
                entry.filter.response_body(
                    session,
                    body,
                    end_of_stream,
                    &entry.arguments,
                    state,
                    facts,
                )
            });
            match std::panic::catch_unwind(hook) {
                Ok(Ok(())) => learn(&mut self.facts, skip),
                Ok(Err(e)) => return Err(failed(&entry.origin, e)),
                Err(payload) => return Err(panicked(&entry.origin, payload)),
            }
        }
        Ok(())
    }

    pub async fn logging(&mut self, session: &mut Session, status: u16) {
        for (entry, state, skip) in due(&self.chain, &mut self.states, |d| &d.logging) {
            let hook = async {
                entry
                    .filter
                    .logging(session, status, &entry.arguments, state, &mut self.facts)
                    .await;
                Ok(())
            };
            // The failure is logged; the response is already gone.
            let _ = guarded(&entry.origin, hook).await;
            learn(&mut self.facts, skip);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Counts the calls of every hook after `request`.
    struct Counting {
        calls: Arc<AtomicUsize>,
    }

    impl Counting {
        fn count(&self) {
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[async_trait]
    impl Filter for Counting {
        const TYPE: &'static str = "Counting";
        type Settings = ();
        type Arguments = ();
        type State = ();

        fn build(_: ()) -> std::result::Result<Self, crate::filters::BuildError> {
            Err("built by the test".into())
        }

        async fn upstream_request(
            &self,
            _: &mut Session,
            _: &mut RequestHeader,
            _: &mut Cx<'_, Self>,
        ) -> Result<()> {
            self.count();
            Ok(())
        }

        async fn upstream_response(
            &self,
            _: &mut Session,
            _: &mut ResponseHeader,
            _: &mut Cx<'_, Self>,
        ) -> Result<()> {
            self.count();
            Ok(())
        }

        fn response_body(
            &self,
            _: &mut Session,
            _: &mut Option<Bytes>,
            _: bool,
            _: &mut Cx<'_, Self>,
        ) -> Result<()> {
            self.count();
            Ok(())
        }

        async fn logging(&self, _: &mut Session, _: u16, _: &mut Cx<'_, Self>) {
            self.count();
        }
    }

    /// Implements the request hook only.
    struct RequestOnly;

    #[async_trait]
    impl Filter for RequestOnly {
        const TYPE: &'static str = "RequestOnly";
        type Settings = ();
        type Arguments = ();
        type State = ();

        fn build(_: ()) -> std::result::Result<Self, crate::filters::BuildError> {
            Ok(RequestOnly)
        }
    }

    /// Runs one request through `chain`, every hook of it.
    async fn one_request(chain: &Arc<[Entry]>) {
        let (mut client, server) = tokio::io::duplex(4096);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
            .await
            .unwrap();
        let mut session = Session::new_h1(Box::new(server));
        assert!(session.read_request().await.unwrap());
        let mut run = Run::new(chain.clone(), RequestInfo::default());
        assert!(run
            .request(&mut session, Stage::Early)
            .await
            .unwrap()
            .is_none());
        let mut upstream = session.req_header().clone();
        run.upstream_request(&mut session, &mut upstream)
            .await
            .unwrap();
        let mut response = ResponseHeader::build(200, None).unwrap();
        run.upstream_response(&mut session, &mut response)
            .await
            .unwrap();
        run.response_body(&mut session, &mut None, true).unwrap();
        run.logging(&mut session, 200).await;
    }

    fn defaulted(entry: &Entry) -> [bool; 4] {
        let d = entry.filter.defaulted();
        [
            &d.upstream_request,
            &d.upstream_response,
            &d.response_body,
            &d.logging,
        ]
        .map(|flag| flag.load(Ordering::Relaxed))
    }

    /// A hook a filter implements is called on every request; one it
    /// leaves to its default is called once, then known and skipped.
    #[tokio::test]
    async fn hooks_left_to_their_defaults_are_learnt_and_skipped() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counting = Counting {
            calls: calls.clone(),
        };
        let chain: Arc<[Entry]> = Arc::from([
            Entry::builtin(counting, "counting", Stage::Early),
            Entry::builtin(RequestOnly, "request-only", Stage::Early),
        ]);
        one_request(&chain).await;
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        assert_eq!(defaulted(&chain[0]), [false; 4]);
        assert_eq!(defaulted(&chain[1]), [true; 4]);
        // Learnt hooks are no longer due: only the counting filter's are.
        let mut states: Vec<Option<State>> =
            chain.iter().map(|e| Some(e.filter.new_state())).collect();
        let hooks: [fn(&Defaulted) -> &AtomicBool; 4] = [
            |d| &d.upstream_request,
            |d| &d.upstream_response,
            |d| &d.response_body,
            |d| &d.logging,
        ];
        for hook in hooks {
            let due: Vec<String> = due(&chain, &mut states, hook)
                .map(|(entry, ..)| entry.origin.to_string())
                .collect();
            assert_eq!(due, ["counting"]);
        }
        one_request(&chain).await;
        assert_eq!(calls.load(Ordering::Relaxed), 8);
    }
}
