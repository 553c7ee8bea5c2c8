//! What `kind: RateLimit` (Edge Stack's shape: a domain and limits whose
//! patterns match label groups) and `kind: RateLimitService`, which in
//! pingress names a Redis server that replicas share counters through,
//! become: the limits of the evaluated domain and where their counters
//! live. `model::rate_limit` validates the resources into them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use openssl::sha::Sha256;

use super::labels::Entry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Second,
    Minute,
    Hour,
    Day,
}

impl Unit {
    pub(crate) fn parse(text: &str) -> Option<Unit> {
        match text.to_ascii_lowercase().as_str() {
            "second" => Some(Unit::Second),
            "minute" => Some(Unit::Minute),
            "hour" => Some(Unit::Hour),
            "day" => Some(Unit::Day),
            _ => None,
        }
    }

    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
        }
    }
}

/// One item of a pattern: `key: value` pairs of which any may match the
/// label at that position; `None` matches any value of the key.
pub(crate) type PatternItem = Vec<(String, Option<String>)>;

/// One limit of a RateLimit.
#[derive(Debug)]
pub(crate) struct Limit {
    /// `name`, else `<RateLimit name>.<namespace>-<index>` as Edge Stack
    /// names it.
    pub name: String,
    /// `action: LogOnly` limits only log.
    pub enforce: bool,
    pattern: Vec<PatternItem>,
    pub rate: u64,
    pub unit: Unit,
    /// What every bucket key of this limit starts with: the domain, the
    /// name, and the rate, so a changed rate starts from fresh counters.
    key_prefix: String,
}

impl Limit {
    /// A limit of `domain`, its buckets keyed by the domain, the name and
    /// the rate.
    pub(crate) fn new(
        name: String,
        enforce: bool,
        pattern: Vec<PatternItem>,
        rate: u64,
        unit: Unit,
        domain: &str,
    ) -> Limit {
        let key_prefix = format!(
            "{}:{domain}{}:{name}{rate}/{}|",
            domain.len(),
            name.len(),
            unit.seconds()
        );
        Limit {
            name,
            enforce,
            pattern,
            rate,
            unit,
            key_prefix,
        }
    }

    /// Edge Stack's rule: the group must start with the pattern's labels,
    /// in order.
    fn matches(&self, entries: &[Entry<'_>]) -> bool {
        self.pattern.len() <= entries.len()
            && self
                .pattern
                .iter()
                .zip(entries)
                .all(|(item, (key, value))| {
                    item.iter()
                        .any(|(k, v)| k == key && v.as_deref().is_none_or(|v| v == value.as_ref()))
                })
    }

    /// The counter this group's request counts against: one per distinct
    /// set of values of the labels the pattern covers (so a `remote_address:
    /// "*"` item gives each client its own). Lengths prefix every part, so
    /// no two label sets share a key.
    pub fn bucket_key(&self, entries: &[Entry<'_>]) -> BucketKey {
        let mut digest = Sha256::new();
        digest.update(self.key_prefix.as_bytes());
        for (k, v) in entries.iter().take(self.pattern.len()) {
            for part in [k.as_bytes(), v.as_bytes()] {
                digest.update(&(part.len() as u64).to_le_bytes());
                digest.update(part);
            }
        }
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.finish()[..16]);
        BucketKey(key)
    }

    /// What a limit's buckets are kept by across reloads: the domain, the
    /// name and the rate.
    pub(crate) fn identity(&self) -> &str {
        &self.key_prefix
    }
}

/// A bucket's name: 128 bits of a SHA-256 of the limit and the label
/// values, so a bucket costs the same however long the values a client
/// sends, and no client can choose values that share another's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BucketKey(pub [u8; 16]);

impl BucketKey {
    /// The key's hex form, 32 characters.
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(32);
        for byte in self.0 {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

/// Where counters live when replicas share them. `Debug` leaves the URL
/// out: it may hold a password, and the model is debug-printed.
#[derive(Clone)]
pub(crate) struct RedisSettings {
    pub url: String,
    /// `host:port`, for logs: the URL may hold a password.
    pub address: String,
    /// Each Redis call's bound (`timeout_ms`).
    pub timeout: Duration,
    /// 500 instead of letting requests through when Redis cannot answer.
    pub failure_mode_deny: bool,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("failure_mode_deny", &self.failure_mode_deny)
            .finish_non_exhaustive()
    }
}

/// Every limit of the label domain pingress evaluates.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// The RateLimitService's `domain`, else the Module's
    /// `default_label_domain`: only labels of this domain are evaluated.
    pub domain: String,
    pub(crate) limits: Vec<Arc<Limit>>,
    pub(crate) redis: Option<RedisSettings>,
}

impl RateLimits {
    /// The limit for a label group: of those whose pattern matches, the one
    /// with the longest pattern; the first defined among equals.
    /// The most specific limit of the group, and its place in `limits`.
    pub(crate) fn find(&self, entries: &[Entry<'_>]) -> Option<(usize, &Arc<Limit>)> {
        let mut best: Option<(usize, &Arc<Limit>)> = None;
        for (index, limit) in self.limits.iter().enumerate() {
            if limit.matches(entries)
                && best.is_none_or(|(_, b)| limit.pattern.len() > b.pattern.len())
            {
                best = Some((index, limit));
            }
        }
        best
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::diagnostics::Reporter;
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    fn limit_of(pattern: &str) -> Limit {
        let items: Vec<BTreeMap<String, String>> = serde_yaml::from_str(pattern).unwrap();
        let mut diags = Vec::new();
        let location = crate::config::diagnostics::Location::File("t".into());
        let mut report = Reporter::new(location, &mut diags);
        Limit {
            name: pattern.into(),
            enforce: true,
            pattern: crate::model::rate_limit::pattern(&items, "p", &mut report).unwrap(),
            rate: 1,
            unit: Unit::Minute,
            key_prefix: "p|".into(),
        }
    }

    fn entries<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Entry<'a>> {
        pairs.iter().map(|(k, v)| (*k, Cow::Borrowed(*v))).collect()
    }

    #[test]
    fn patterns_match_a_leading_run_of_labels() {
        let limit = limit_of("[{generic_key: api}, {remote_address: '*'}]");
        let group = entries(&[("generic_key", "api"), ("remote_address", "1.2.3.4")]);
        assert!(limit.matches(&group));
        let longer = entries(&[
            ("generic_key", "api"),
            ("remote_address", "1.2.3.4"),
            ("user", "x"),
        ]);
        assert!(limit.matches(&longer));
        assert!(!limit.matches(&entries(&[("generic_key", "api")])));
        assert!(!limit.matches(&entries(&[
            ("remote_address", "1.2.3.4"),
            ("generic_key", "api")
        ])));
        assert!(!limit.matches(&entries(&[
            ("generic_key", "web"),
            ("remote_address", "1.2.3.4")
        ])));
        // Any of an item's pairs may match.
        let either = limit_of("[{a: '1', b: ''}]");
        assert!(either.matches(&entries(&[("a", "1")])));
        assert!(either.matches(&entries(&[("b", "anything")])));
        assert!(!either.matches(&entries(&[("a", "2")])));
    }

    #[test]
    fn buckets_split_by_the_values_the_pattern_covers() {
        let limit = limit_of("[{generic_key: api}, {remote_address: '*'}]");
        let a = entries(&[
            ("generic_key", "api"),
            ("remote_address", "1.1.1.1"),
            ("x", "1"),
        ]);
        let a2 = entries(&[
            ("generic_key", "api"),
            ("remote_address", "1.1.1.1"),
            ("x", "2"),
        ]);
        let b = entries(&[("generic_key", "api"), ("remote_address", "2.2.2.2")]);
        assert_eq!(limit.bucket_key(&a), limit.bucket_key(&a2));
        assert_ne!(limit.bucket_key(&a), limit.bucket_key(&b));
        // Lengths keep "ab"+"c" apart from "a"+"bc".
        let one = limit_of("[{k: '*'}, {l: '*'}]");
        assert_ne!(
            one.bucket_key(&entries(&[("k", "ab"), ("l", "c")])),
            one.bucket_key(&entries(&[("k", "a"), ("l", "bc")]))
        );
    }

    #[test]
    fn the_longest_matching_pattern_wins() {
        let limits = RateLimits {
            domain: "d".into(),
            limits: vec![
                Arc::new(limit_of("[{generic_key: api}]")),
                Arc::new(limit_of("[{generic_key: api}, {remote_address: '*'}]")),
                Arc::new(limit_of("[{generic_key: other}]")),
            ],
            redis: None,
        };
        let group = entries(&[("generic_key", "api"), ("remote_address", "1.1.1.1")]);
        assert_eq!(limits.find(&group).unwrap().1.pattern.len(), 2);
        let short = entries(&[("generic_key", "api")]);
        assert_eq!(limits.find(&short).unwrap().1.pattern.len(), 1);
        assert!(limits.find(&entries(&[("generic_key", "none")])).is_none());
    }
}
