//! Rate limits: the matched Mapping's label groups (its `labels` with the
//! Module's `default_labels` in front) are checked against the `RateLimit`
//! limits of the evaluated domain. Runs after authentication, as Emissary
//! orders its filters, so it sees the route the authorizer chose.
//!
//! Over a limit the gateway answers 429 with `Retry-After` and the IETF
//! `RateLimit-Limit`, `-Remaining` and `-Reset` headers; responses it lets
//! through carry the `RateLimit-*` headers of the tightest limit applied.

pub(crate) mod labels;
pub(crate) mod limits;
mod local;
mod redis_store;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::StatusCode;
use http::{HeaderName, HeaderValue};
use log::info;
use pingora::http::ResponseHeader;
use pingora::Result;

use super::{Cx, Filter, Flow, Reply, Session};
use crate::throttle::Throttle;
use labels::RequestLabels;
pub use limits::RateLimits;
use limits::{BucketKey, Limit};

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// One bucket's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the bucket is full (or the window ends) again.
    pub reset: u64,
    /// Seconds until a request would be allowed again.
    pub retry_after: u64,
}

impl Decision {
    fn headers(&self) -> [(HeaderName, HeaderValue); 3] {
        [
            (RATELIMIT_LIMIT, HeaderValue::from(self.limit)),
            (RATELIMIT_REMAINING, HeaderValue::from(self.remaining)),
            (RATELIMIT_RESET, HeaderValue::from(self.reset)),
        ]
    }
}

/// Where a snapshot's counters live.
enum Counters {
    /// The buckets of each limit, in the order of `RateLimits::limits`.
    Local(Vec<Arc<local::LimitBuckets>>),
    Redis {
        counters: Arc<redis_store::RedisCounters>,
        failure_mode_deny: bool,
    },
}

/// The built-in filter a snapshot with RateLimits runs.
pub(crate) struct RateLimitFilter {
    limits: Arc<RateLimits>,
    counters: Counters,
    /// The LogOnly lines of each limit, in the order of `limits`.
    log_only: Vec<Throttle>,
}

/// The counters of every live snapshot's rate limits, which the next build
/// takes over: a limit's buckets by its identity (so a reload keeps spent
/// quotas), Redis connections by address. Passed to each build, as the
/// cluster states are.
#[derive(Default)]
pub struct RateLimitStates {
    buckets: local::LiveBuckets,
    redis: redis_store::LiveCounters,
}

impl std::fmt::Debug for RateLimitStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitStates").finish_non_exhaustive()
    }
}

/// LogOnly lines a second per limit: any client can exceed such a limit
/// with every request.
const LOG_ONLY_LINES_PER_SECOND: u32 = 1;

impl RateLimitFilter {
    /// Counts in the live counters of `states` where they have the same
    /// limits. `Err` when the Redis address cannot be used.
    pub fn new(
        limits: Arc<RateLimits>,
        states: &RateLimitStates,
    ) -> std::result::Result<RateLimitFilter, redis_store::RedisUrlError> {
        let counters = match &limits.redis {
            None => Counters::Local(
                limits
                    .limits
                    .iter()
                    .map(|l| local::for_limit(l, &states.buckets))
                    .collect(),
            ),
            Some(settings) => Counters::Redis {
                counters: redis_store::shared(settings, &states.redis)?,
                failure_mode_deny: settings.failure_mode_deny,
            },
        };
        let log_only = limits
            .limits
            .iter()
            .map(|_| Throttle::new(LOG_ONLY_LINES_PER_SECOND))
            .collect();
        Ok(RateLimitFilter {
            limits,
            counters,
            log_only,
        })
    }

    /// The bucket's answer; `Err` is the reply when Redis failed and
    /// `failure_mode_deny` is set, `Ok(None)` when it failed open.
    async fn take(
        &self,
        index: usize,
        limit: &Limit,
        key: BucketKey,
    ) -> std::result::Result<Option<Decision>, Reply> {
        let period = Duration::from_secs(limit.unit.seconds());
        match &self.counters {
            Counters::Local(buckets) => Ok(buckets
                .get(index)
                .map(|buckets| buckets.take(key, Instant::now()))),
            Counters::Redis {
                counters,
                failure_mode_deny,
            } => match counters.take(key, limit.rate, period).await {
                Some(decision) => Ok(Some(decision)),
                None if *failure_mode_deny => Err(Reply::text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "rate-limit service unavailable (failure_mode_deny)",
                )
                .reason("rate_limit_unavailable")),
                None => Ok(None),
            },
        }
    }
}

#[async_trait]
impl Filter for RateLimitFilter {
    const TYPE: &'static str = "RateLimit";
    type Settings = ();
    type Arguments = ();
    /// The tightest limit applied, for the response's headers.
    type State = Option<Decision>;

    fn build(_: ()) -> std::result::Result<Self, crate::filters::BuildError> {
        Err("rate limits come from RateLimit resources and Mapping labels, not a Filter".into())
    }

    async fn request(&self, session: &mut Session, cx: &mut Cx<'_, Self>) -> Result<Flow> {
        let Some(route) = cx.request.route.clone() else {
            return Ok(Flow::Continue);
        };
        let request = RequestLabels {
            headers: &session.req_header().headers,
            client_ip: cx.client_ip(),
            destination: route.destination(),
        };
        let mut tightest: Option<Decision> = None;
        let mut refused: Option<Decision> = None;
        // Every group counts, as a rate-limit service counts every
        // descriptor it is sent; one refusal refuses the request.
        for group in route.rate_labels() {
            let Some(entries) = group.entries(&request) else {
                continue;
            };
            let Some((index, limit)) = self.limits.find(&entries) else {
                continue;
            };
            let decision = match self.take(index, limit, limit.bucket_key(&entries)).await {
                Ok(Some(decision)) => decision,
                Ok(None) => continue,
                Err(reply) => return Ok(Flow::Respond(reply)),
            };
            if !decision.allowed && !limit.enforce {
                if let Some(held_back) = self.log_only.get(index).and_then(Throttle::admit) {
                    info!(
                        "rate limit {} (LogOnly) exceeded by a request for Mapping {} \
                         ({held_back} more since the last line)",
                        limit.name,
                        route.mapping()
                    );
                }
                continue;
            }
            if !decision.allowed && refused.is_none_or(|r| decision.retry_after > r.retry_after) {
                refused = Some(decision);
            }
            if tightest.is_none_or(|t| decision.remaining < t.remaining) {
                tightest = Some(decision);
            }
        }
        if let Some(decision) = refused {
            let mut reply = Reply::text(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests: rate limit exceeded",
            )
            .reason("rate_limited")
            .header(http::header::RETRY_AFTER, decision.retry_after);
            for (name, value) in decision.headers() {
                reply = reply.header(name, value);
            }
            return Ok(Flow::Respond(reply));
        }
        *cx.state = tightest;
        Ok(Flow::Continue)
    }

    async fn upstream_response(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        cx: &mut Cx<'_, Self>,
    ) -> Result<()> {
        if let Some(decision) = cx.state.take() {
            for (name, value) in decision.headers() {
                response.insert_header(name, value)?;
            }
        }
        Ok(())
    }
}
