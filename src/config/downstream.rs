//! `downstream:` of the gateway file: the client connections the gateway
//! holds. pingress settings, read at start, for bounds Emissary's Module
//! has no key for (the idle timeout and the head size are the Module's:
//! `listener_idle_timeout_ms`, `max_request_headers_kb`).
//!
//! ```yaml
//! downstream:
//!   request_head_timeout_ms: 10000   # a whole request head, 408 after
//!   max_connections: 4096            # open client connections, in all
//!   max_connections_per_client: 64   # per IPv4 address or IPv6 /64
//!   max_connection_age_ms: 3600000   # then drained; closed after the shutdown grace
//!   tls_drain_window_ms: 10000       # a reload's TLS change drains within it
//! ```

use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

/// haproxy's recommended `timeout http-request`: generous for a head of
/// tens of kilobytes on a slow link, short for a connection that trickles.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Each open connection holds a socket, a task and buffers (up to the
/// head limit while a head is read): 4,096 of them fit in the memory the
/// shipped Deployment gives the gateway.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// A rotated certificate outdates every open connection of its Host at
/// once; drained at one moment, the clients of its HTTP/2 connections
/// would reconnect, with full handshakes, together. Each is drained at a
/// random moment of this window instead, as Envoy drains a changed
/// listener gradually. An HTTP/1 connection closes after its next
/// response, which spreads them by itself.
pub const DEFAULT_TLS_DRAIN_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownstreamConf {
    pub head_timeout: Duration,
    pub max_connections: usize,
    /// `None`: no cap per client. Behind a load balancer every connection
    /// comes from a few addresses, so there is none by default.
    pub max_connections_per_client: Option<usize>,
    /// Connections older than this are drained, so clients move to new
    /// ones (after a scale-out, or to follow a configuration); `None`: no
    /// limit.
    pub max_connection_age: Option<Duration>,
    /// How long after a reload that changed their Host's TLS open
    /// connections may be drained; zero drains them at once.
    pub tls_drain_window: Duration,
}

impl Default for DownstreamConf {
    fn default() -> Self {
        DownstreamConf {
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: None,
            max_connection_age: None,
            tls_drain_window: DEFAULT_TLS_DRAIN_WINDOW,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DownstreamYaml {
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    request_head_timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "at_least_one")]
    max_connections: Option<usize>,
    #[serde(default, deserialize_with = "at_least_one")]
    max_connections_per_client: Option<usize>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    max_connection_age_ms: Option<u64>,
    #[serde(default, deserialize_with = "super::bounds::milliseconds")]
    tls_drain_window_ms: Option<u64>,
}

impl<'de> Deserialize<'de> for DownstreamConf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let yaml = DownstreamYaml::deserialize(deserializer)?;
        let base = DownstreamConf::default();
        let head_timeout = match yaml.request_head_timeout_ms {
            Some(0) => {
                return Err(D::Error::custom(
                    "request_head_timeout_ms: 0 would let a client hold a connection with a \
                     head it never finishes; give a number of milliseconds",
                ))
            }
            Some(ms) => Duration::from_millis(ms),
            None => base.head_timeout,
        };
        Ok(DownstreamConf {
            head_timeout,
            max_connections: yaml.max_connections.unwrap_or(base.max_connections),
            max_connections_per_client: yaml.max_connections_per_client,
            max_connection_age: yaml
                .max_connection_age_ms
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            tls_drain_window: yaml
                .tls_drain_window_ms
                .map_or(base.tls_drain_window, Duration::from_millis),
        })
    }
}

fn at_least_one<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<usize>, D::Error> {
    match Option::<usize>::deserialize(deserializer)? {
        Some(0) => Err(D::Error::custom(
            "0 would refuse every connection; leave the key out for the default",
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<DownstreamConf, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse("{}").unwrap(), DownstreamConf::default());
        let conf = parse(
            "request_head_timeout_ms: 2500\nmax_connections: 10\nmax_connections_per_client: 2\n\
             tls_drain_window_ms: 0",
        )
        .unwrap();
        assert_eq!(conf.tls_drain_window, Duration::ZERO);
        assert_eq!(conf.head_timeout, Duration::from_millis(2500));
        assert_eq!(conf.max_connections, 10);
        assert_eq!(conf.max_connections_per_client, Some(2));
    }

    #[test]
    fn refuses_what_would_not_bound_or_would_refuse_all() {
        for yaml in [
            "request_head_timeout_ms: 0",
            "request_head_timeout_ms: 31536000001",
            "max_connections: 0",
            "max_connections_per_client: 0",
            "max_conections: 5",
        ] {
            assert!(parse(yaml).is_err(), "{yaml}");
        }
    }
}
