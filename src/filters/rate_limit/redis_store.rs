//! Counters in Redis, shared by every gateway pointed at it: fixed windows
//! of the limit's unit, one key per bucket, counted and given their expiry
//! by one Lua script, so concurrent gateways never lose a count or leave a
//! key without an expiry.
//!
//! One multiplexed connection per Redis, kept across reloads; the redis
//! crate's `ConnectionManager` reconnects in the background after Redis
//! restarts. Every call is bounded by the RateLimitService's `timeout_ms`.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use log::warn;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::OnceCell;

use super::limits::{BucketKey, RedisSettings};
use super::Decision;
use crate::throttle::Throttle;

/// KEYS[1] the bucket, ARGV[1] the window in ms. Returns the count in this
/// window and the milliseconds left of it.
const COUNT: &str = r"
local count = redis.call('INCR', KEYS[1])
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  left = tonumber(ARGV[1])
end
return {count, left}
";

/// Keys are namespaced, so a shared Redis can hold other data too.
const KEY_PREFIX: &str = "pingress:ratelimit:";

pub(crate) struct RedisCounters {
    settings: RedisSettings,
    client: redis::Client,
    /// Made on first use: the manager's tasks must start on the runtime
    /// that serves requests.
    connection: OnceCell<ConnectionManager>,
    script: Script,
    /// An outage logs a line a second, not one per request.
    failures: Throttle,
}

/// Every live snapshot's Redis counters.
pub(crate) type LiveCounters = Mutex<Vec<Weak<RedisCounters>>>;

/// The counters for `settings`: the same instance across snapshots while
/// one is alive, so a reload keeps the connection.
pub(crate) fn shared(
    settings: &RedisSettings,
    live: &LiveCounters,
) -> Result<Arc<RedisCounters>, RedisUrlError> {
    let mut live = live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    live.retain(|weak| weak.strong_count() > 0);
    let same = |c: &RedisCounters| {
        c.settings.url == settings.url && c.settings.timeout == settings.timeout
    };
    if let Some(found) = live.iter().filter_map(Weak::upgrade).find(|c| same(c)) {
        // failure_mode_deny is read per snapshot, not from the shared copy.
        return Ok(found);
    }
    let client = redis::Client::open(settings.url.as_str())?;
    let counters = Arc::new(RedisCounters {
        settings: settings.clone(),
        client,
        connection: OnceCell::new(),
        script: Script::new(COUNT),
        failures: Throttle::new(1),
    });
    live.push(Arc::downgrade(&counters));
    Ok(counters)
}

/// A Redis address the client cannot use.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct RedisUrlError(#[from] redis::RedisError);

impl RedisCounters {
    /// Counts a request in bucket `key` of a limit of `rate` per `period`;
    /// `None` when Redis did not answer in time (the failure is logged).
    pub async fn take(&self, key: BucketKey, rate: u64, period: Duration) -> Option<Decision> {
        let call = async {
            let manager = self
                .connection
                .get_or_try_init(|| async {
                    // Few, quick retries: the request waits at most
                    // timeout_ms anyway, and a restarted Redis should be
                    // found again within a second.
                    let config = ConnectionManagerConfig::new()
                        .set_number_of_retries(3)
                        .set_max_delay(Duration::from_millis(500))
                        .set_connection_timeout(Some(Duration::from_secs(1)));
                    self.client.get_connection_manager_lazy(config)
                })
                .await?;
            let mut connection = manager.clone();
            self.script
                .key(format!("{KEY_PREFIX}{}", key.hex()))
                .arg(period.as_millis() as u64)
                .invoke_async::<(u64, i64)>(&mut connection)
                .await
        };
        let failure = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok((count, left_ms))) => {
                let reset = (left_ms.max(0) as u64).div_ceil(1000);
                return Some(Decision {
                    allowed: count <= rate,
                    limit: rate,
                    remaining: rate.saturating_sub(count),
                    reset,
                    retry_after: reset.max(1),
                });
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.settings.timeout),
        };
        self.log_failure(&failure);
        None
    }

    fn log_failure(&self, failure: &str) {
        if let Some(held_back) = self.failures.admit() {
            warn!(
                "rate limits: Redis {} failed: {failure} ({held_back} more failures since the \
                 last line)",
                self.settings.address
            );
        }
    }
}
