//! The Module's `ip_allow` / `ip_deny`: 403 for clients outside the allowed
//! ranges or inside the denied ones. `peer` rules test the connection's
//! address, `remote` rules the client address that trusted proxies report
//! (a Listener's `l7Depth`).

use std::net::IpAddr;

use async_trait::async_trait;
use http::StatusCode;
use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use pingora::Result;
use serde::Deserialize;

use super::{Cx, Filter, Flow, Reply, Session};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Peer,
    Remote,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Range {
    source: Source,
    net: IpNet,
}

/// Parses `10.0.0.0/8`, or a single address as a one-address range.
fn parse_net(text: &str) -> std::result::Result<IpNet, NetError> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| NetError(text.to_string()))
}

/// Text that is neither an IP address nor a CIDR range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither an IP address nor a CIDR range")]
pub(crate) struct NetError(String);

/// An entry of `ip_allow` or `ip_deny` that names no range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RangeError {
    #[error("{key}[{index}]: give exactly one of peer or remote")]
    PeerOrRemote { key: &'static str, index: usize },
    #[error("{key}[{index}]: {error}")]
    Net {
        key: &'static str,
        index: usize,
        error: NetError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub(crate) struct IpFilter {
    mode: Mode,
    ranges: Vec<Range>,
}

/// The Module's keys, also usable as `spec: {IpAllowDeny: {ip_allow: ...}}`
/// in a Filter, so a FilterPolicy can guard some paths only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    pub ip_allow: Option<Vec<RangeSpec>>,
    pub ip_deny: Option<Vec<RangeSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RangeSpec {
    peer: Option<String>,
    remote: Option<String>,
}

fn ranges(key: &'static str, specs: &[RangeSpec]) -> std::result::Result<Vec<Range>, RangeError> {
    specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let (source, text) = match (&spec.peer, &spec.remote) {
                (Some(peer), None) => (Source::Peer, peer),
                (None, Some(remote)) => (Source::Remote, remote),
                _ => return Err(RangeError::PeerOrRemote { key, index }),
            };
            let net = parse_net(text).map_err(|error| RangeError::Net { key, index, error })?;
            Ok(Range { source, net })
        })
        .collect()
}

/// The client address behind `l7_depth` trusted proxies: the entry that
/// many places from the right of `X-Forwarded-For` (Envoy's
/// `xff_num_trusted_hops`). Several header lines are one list (RFC 9110
/// §5.3), so a client cannot push the trusted proxy's entry out of sight
/// with a line of its own; entries are split as bytes, so a byte that is
/// not text in one entry cannot hide the others. When that entry is
/// missing or is not an address, the connection's peer is the client, as
/// in Envoy: a request never goes without an address.
pub(crate) fn remote_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    l7_depth: u32,
) -> Option<IpAddr> {
    let Some(hops) = (l7_depth as usize).checked_sub(1) else {
        return peer;
    };
    headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|line| line.as_bytes().rsplit(|b| *b == b','))
        .nth(hops)
        .and_then(|entry| parse_address(std::str::from_utf8(entry).ok()?.trim()))
        .or(peer)
}

/// An address as proxies write it in X-Forwarded-For: alone, or with its
/// port (`10.0.0.1:5000`, `[2001:db8::1]:5000`).
fn parse_address(text: &str) -> Option<IpAddr> {
    text.parse()
        .ok()
        .or_else(|| text.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

#[async_trait]
impl Filter for IpFilter {
    const TYPE: &'static str = "IpAllowDeny";
    type Settings = Settings;
    type Arguments = ();
    type State = ();

    fn build(settings: Settings) -> std::result::Result<Self, crate::filters::BuildError> {
        let (mode, ranges) = match (&settings.ip_allow, &settings.ip_deny) {
            (Some(allow), None) => (Mode::Allow, ranges("ip_allow", allow)),
            (None, Some(deny)) => (Mode::Deny, ranges("ip_deny", deny)),
            _ => return Err("give exactly one of ip_allow and ip_deny".into()),
        };
        let ranges = ranges.map_err(|e| e.to_string())?;
        Ok(IpFilter { mode, ranges })
    }

    async fn request(&self, session: &mut Session, cx: &mut Cx<'_, Self>) -> Result<Flow> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let remote = cx.client_ip();
        let listed = self.ranges.iter().any(|range| {
            let address = match range.source {
                Source::Peer => peer,
                Source::Remote => remote,
            };
            address.is_some_and(|a| range.net.contains(&a))
        });
        let allowed = match self.mode {
            Mode::Allow => listed,
            Mode::Deny => !listed,
        };
        Ok(if allowed {
            Flow::Continue
        } else {
            Flow::Respond(
                Reply::text(
                    StatusCode::FORBIDDEN,
                    "access denied by the gateway's IP rules",
                )
                .reason("ip_denied"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_hops_pick_from_the_right() {
        let lines = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(X_FORWARDED_FOR.clone(), line.parse().unwrap());
            }
            headers
        };
        let ip = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        let peer = ip("10.0.0.1");
        let xff = lines(&["1.1.1.1, 2.2.2.2, 3.3.3.3"]);
        assert_eq!(remote_address(peer, &xff, 0), peer);
        assert_eq!(remote_address(peer, &xff, 1), ip("3.3.3.3"));
        assert_eq!(remote_address(peer, &xff, 3), ip("1.1.1.1"));
        // Too few entries, or one that is no address: the peer.
        assert_eq!(remote_address(peer, &xff, 4), peer);
        assert_eq!(remote_address(peer, &lines(&[]), 1), peer);
        assert_eq!(remote_address(peer, &lines(&["junk"]), 1), peer);
        // The trusted proxy's entry is on the last line, whatever a client
        // sent on an earlier one.
        let split = lines(&["6.6.6.6", "1.1.1.1, 3.3.3.3"]);
        assert_eq!(remote_address(peer, &split, 1), ip("3.3.3.3"));
        assert_eq!(remote_address(peer, &split, 3), ip("6.6.6.6"));
        // Proxies that write the port.
        let ported = lines(&["1.1.1.1, 3.3.3.3:5000", "[2001:db8::1]:443"]);
        assert_eq!(remote_address(peer, &ported, 1), ip("2001:db8::1"));
        assert_eq!(remote_address(peer, &ported, 2), ip("3.3.3.3"));
        // A byte that is not text spoils its own entry only.
        let mut raw = HeaderMap::new();
        let line = http::HeaderValue::from_bytes(b"\xff, 3.3.3.3").unwrap();
        raw.append(X_FORWARDED_FOR.clone(), line);
        assert_eq!(remote_address(peer, &raw, 1), ip("3.3.3.3"));
        assert_eq!(remote_address(peer, &raw, 2), peer);
    }

    #[test]
    fn single_addresses_are_ranges() {
        assert!(parse_net("127.0.0.1")
            .unwrap()
            .contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(parse_net("99.99.0.0/16")
            .unwrap()
            .contains(&"99.99.3.4".parse::<IpAddr>().unwrap()));
        assert!(parse_net("::1").is_ok());
        assert!(parse_net("99.99.0.0/33").is_err());
        assert!(parse_net("host.example").is_err());
    }
}
