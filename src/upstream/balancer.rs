//! `load_balancer`
//! (<https://www.getambassador.io/docs/emissary/latest/topics/running/load-balancer>):
//! how a cluster picks one of its endpoints.
//!
//! A cluster's endpoints and the structure its policy needs (a ketama ring,
//! a maglev table) form one immutable [`Selection`], rebuilt when endpoints
//! or their health change and read lock-free per request. Consistent
//! hashing is built over the healthy endpoints only, so a key moves only
//! when its own endpoint leaves or returns.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use pingora::upstreams::peer::HttpPeer;
use pingora_ketama::{Bucket, Continuum};
use rand::Rng;

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    #[default]
    RoundRobin,
    /// Power of two choices over in-flight requests, as Envoy does.
    LeastRequest,
    RingHash(HashOn),
    Maglev(HashOn),
}

/// What a hashing policy hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashOn {
    Header(HeaderName),
    Cookie(Cookie),
    SourceIp,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cookie {
    pub name: String,
    pub path: Option<String>,
    /// With a ttl the gateway sets the cookie when the request lacks it
    /// (zero: a session cookie).
    pub ttl: Option<Duration>,
}

/// What a request offers to the balancer.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    pub headers: &'a HeaderMap,
    pub client: Option<SocketAddr>,
}

/// The health and load of one endpoint address. It outlives the snapshot
/// that created it: a reload hands it to the next cluster with the same
/// identity, so health checks and in-flight counts carry on.
#[derive(Debug)]
pub struct EndpointState {
    pub healthy: AtomicBool,
    pub in_flight: AtomicUsize,
    /// Consecutive passed / failed health checks.
    pub passes: AtomicU32,
    pub failures: AtomicU32,
}

impl Default for EndpointState {
    /// Endpoints start healthy, as Pingora's do, so a new cluster serves at
    /// once instead of waiting for its first check.
    fn default() -> Self {
        EndpointState {
            healthy: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Prepared at compile time (or when DNS brings the address).
    pub peer: HttpPeer,
    pub state: Arc<EndpointState>,
}

/// A request's claim on an endpoint under `least_request`; dropping it (when
/// the request ends, however it ends) releases it.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Maglev's table size: Envoy's default, a prime.
const MAGLEV_SIZE: usize = 65537;

enum Table {
    None,
    /// The ring and where each of its addresses sits in `active`.
    Ring(Continuum, HashMap<SocketAddr, usize>),
    /// Positions in `active`.
    Maglev(Vec<u32>),
}

/// The endpoints of a cluster, as requests see them.
pub struct Selection {
    pub endpoints: Vec<Endpoint>,
    /// Positions in `endpoints` that take traffic: the healthy ones, or all
    /// of them when none is healthy (Envoy's panic mode: better to try than
    /// to refuse every request).
    active: Vec<usize>,
    table: Table,
    /// Each endpoint's health when this selection was built.
    built_with: Vec<bool>,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field("endpoints", &self.endpoints.len())
            .field("active", &self.active)
            .finish()
    }
}

/// The endpoint a request goes to.
#[derive(Debug)]
pub struct Choice {
    pub peer: HttpPeer,
    pub in_flight: Option<InFlight>,
    /// A `Set-Cookie` value for the response (cookie hashing with a ttl,
    /// when the request had no cookie).
    pub set_cookie: Option<String>,
}

impl Selection {
    pub fn new(endpoints: Vec<Endpoint>, policy: &Policy) -> Selection {
        let built_with: Vec<bool> = endpoints
            .iter()
            .map(|e| e.state.healthy.load(Ordering::Relaxed))
            .collect();
        let healthy: Vec<usize> = (0..endpoints.len()).filter(|i| built_with[*i]).collect();
        let active = if healthy.is_empty() {
            (0..endpoints.len()).collect()
        } else {
            healthy
        };
        let addresses: Vec<SocketAddr> = active.iter().map(|i| endpoints[*i].address).collect();
        let table = match policy {
            Policy::RingHash(_) if !addresses.is_empty() => {
                let buckets: Vec<Bucket> = addresses.iter().map(|a| Bucket::new(*a, 1)).collect();
                let positions = addresses.iter().enumerate().map(|(i, a)| (*a, i)).collect();
                Table::Ring(Continuum::new(&buckets), positions)
            }
            Policy::Maglev(_) if !addresses.is_empty() => Table::Maglev(maglev(&addresses)),
            _ => Table::None,
        };
        Selection {
            endpoints,
            active,
            table,
            built_with,
        }
    }

    /// Some endpoint's health changed since this selection was built (by
    /// this cluster's checks or by a predecessor's, which share the state).
    pub fn is_stale(&self) -> bool {
        self.endpoints
            .iter()
            .zip(&self.built_with)
            .any(|(e, was)| e.state.healthy.load(Ordering::Relaxed) != *was)
    }

    /// Picks an endpoint; `None` when the cluster has none.
    pub fn choose(
        &self,
        policy: &Policy,
        next: &AtomicUsize,
        request: &RequestKey,
    ) -> Option<Choice> {
        if self.active.is_empty() {
            return None;
        }
        let mut set_cookie = None;
        let position = match policy {
            Policy::RoundRobin => next.fetch_add(1, Ordering::Relaxed) % self.active.len(),
            Policy::LeastRequest => self.least_loaded(),
            Policy::RingHash(on) | Policy::Maglev(on) => {
                let (key, cookie) = hash_key(on, request);
                set_cookie = cookie;
                match key {
                    Some(key) => self.hashed(key),
                    // Without a key, spread at random, as Envoy does.
                    None => rand::thread_rng().gen_range(0..self.active.len()),
                }
            }
        };
        let endpoint = &self.endpoints[self.active[position]];
        let in_flight = matches!(policy, Policy::LeastRequest).then(|| {
            endpoint.state.in_flight.fetch_add(1, Ordering::Relaxed);
            InFlight(endpoint.state.clone())
        });
        Some(Choice {
            peer: endpoint.peer.clone(),
            in_flight,
            set_cookie,
        })
    }

    /// Two distinct endpoints at random, the less loaded wins.
    fn least_loaded(&self) -> usize {
        let count = self.active.len();
        if count == 1 {
            return 0;
        }
        let mut rng = rand::thread_rng();
        let first = rng.gen_range(0..count);
        let second = (first + rng.gen_range(1..count)) % count;
        let load = |p: usize| {
            self.endpoints[self.active[p]]
                .state
                .in_flight
                .load(Ordering::Relaxed)
        };
        if load(second) < load(first) {
            second
        } else {
            first
        }
    }

    fn hashed(&self, key: u64) -> usize {
        match &self.table {
            Table::Ring(ring, positions) => {
                let mut index = ring.node_idx(&key.to_le_bytes());
                ring.get_addr(&mut index)
                    .and_then(|address| positions.get(address).copied())
                    .unwrap_or(0)
            }
            Table::Maglev(table) => table[(key % table.len() as u64) as usize] as usize,
            Table::None => 0,
        }
    }
}

fn hash_of(value: impl Hash) -> u64 {
    // SipHash with fixed keys: the same key maps the same way in every
    // process, so several gateway replicas agree.
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The request's hash key, and a cookie to set when the policy makes one.
fn hash_key(on: &HashOn, request: &RequestKey) -> (Option<u64>, Option<String>) {
    match on {
        HashOn::Header(name) => (
            request.headers.get(name).map(|v| hash_of(v.as_bytes())),
            None,
        ),
        HashOn::SourceIp => (request.client.map(|a| hash_of(a.ip())), None),
        HashOn::Cookie(cookie) => {
            if let Some(value) = cookie_value(request.headers, &cookie.name) {
                return (Some(hash_of(value.as_bytes())), None);
            }
            let Some(ttl) = cookie.ttl else {
                return (None, None);
            };
            // Envoy derives the new cookie from the client's address, so a
            // retry of the same request gets the same value.
            let value = match request.client {
                Some(client) => format!("{:016x}", hash_of(client)),
                None => format!("{:016x}", rand::thread_rng().gen::<u64>()),
            };
            let mut header = format!("{}={value}", cookie.name);
            if !ttl.is_zero() {
                header.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
            }
            if let Some(path) = &cookie.path {
                header.push_str(&format!("; Path={path}"));
            }
            header.push_str("; HttpOnly");
            (Some(hash_of(value.as_bytes())), Some(header))
        }
    }
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Maglev's lookup table (Eisenbud et al., 2016): each endpoint walks the
/// table by its own permutation and claims the next free slot in turn, so
/// every endpoint owns an equal share and a change moves few keys.
fn maglev(addresses: &[SocketAddr]) -> Vec<u32> {
    let size = MAGLEV_SIZE as u64;
    let permutations: Vec<(u64, u64)> = addresses
        .iter()
        .map(|a| {
            let offset = hash_of((a, 0u8)) % size;
            let skip = hash_of((a, 1u8)) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut table = vec![u32::MAX; MAGLEV_SIZE];
    let mut next = vec![0u64; addresses.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in permutations.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % size) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % size) as usize;
            }
            table[slot] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_SIZE {
                break 'fill;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(count: usize) -> Vec<Endpoint> {
        (0..count)
            .map(|i| {
                let address: SocketAddr = format!("10.0.0.{}:80", i + 1).parse().unwrap();
                Endpoint {
                    address,
                    peer: HttpPeer::new(address, false, String::new()),
                    state: Arc::new(EndpointState::default()),
                }
            })
            .collect()
    }

    fn chosen(selection: &Selection, policy: &Policy, headers: &HeaderMap) -> SocketAddr {
        let request = RequestKey {
            headers,
            client: None,
        };
        let choice = selection
            .choose(policy, &AtomicUsize::new(0), &request)
            .unwrap();
        choice.peer._address.as_inet().copied().unwrap()
    }

    #[test]
    fn maglev_shares_evenly_and_moves_little() {
        let addresses: Vec<SocketAddr> = endpoints(5).iter().map(|e| e.address).collect();
        let table = maglev(&addresses);
        let mut counts = [0usize; 5];
        for slot in &table {
            counts[*slot as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| c.abs_diff(MAGLEV_SIZE / 5) < 50),
            "{counts:?}"
        );
        // Without the last endpoint, the others keep (nearly) all their slots.
        let fewer = maglev(&addresses[..4]);
        let moved = table
            .iter()
            .zip(&fewer)
            .filter(|(a, b)| **a != 4 && a != b)
            .count();
        assert!(moved < MAGLEV_SIZE / 50, "{moved} slots moved");
    }

    #[test]
    fn hashing_sticks_and_skips_unhealthy_endpoints() {
        for policy in [
            Policy::RingHash(HashOn::Header(HeaderName::from_static("x-user"))),
            Policy::Maglev(HashOn::Header(HeaderName::from_static("x-user"))),
        ] {
            let all = endpoints(4);
            let selection = Selection::new(all.clone(), &policy);
            let mut headers = HeaderMap::new();
            let mut homes = Vec::new();
            for user in 0..40 {
                headers.insert("x-user", user.to_string().parse().unwrap());
                let home = chosen(&selection, &policy, &headers);
                assert_eq!(home, chosen(&selection, &policy, &headers));
                homes.push(home);
            }
            let distinct: std::collections::HashSet<_> = homes.iter().collect();
            assert!(
                distinct.len() > 1,
                "{policy:?} sent every key to one endpoint"
            );

            all[0].state.healthy.store(false, Ordering::Relaxed);
            let without = Selection::new(all.clone(), &policy);
            for (user, home) in homes.iter().enumerate() {
                headers.insert("x-user", user.to_string().parse().unwrap());
                let now = chosen(&without, &policy, &headers);
                assert_ne!(now, all[0].address);
                if *home != all[0].address {
                    assert_eq!(now, *home, "{policy:?}: key {user} moved");
                }
            }
        }
    }

    #[test]
    fn cookies_are_read_and_made() {
        let mut headers = HeaderMap::new();
        headers.insert("cookie", "a=1; lb=\"xyz\"; b=2".parse().unwrap());
        assert_eq!(cookie_value(&headers, "lb"), Some("xyz"));
        assert_eq!(cookie_value(&headers, "c"), None);
        let on = HashOn::Cookie(Cookie {
            name: "lb".into(),
            path: Some("/".into()),
            ttl: Some(Duration::from_secs(60)),
        });
        let empty = HeaderMap::new();
        let client = Some("127.0.0.1:4000".parse().unwrap());
        let (key, set) = hash_key(
            &on,
            &RequestKey {
                headers: &empty,
                client,
            },
        );
        let set = set.unwrap();
        assert!(
            set.starts_with("lb=") && set.ends_with("; Max-Age=60; Path=/; HttpOnly"),
            "{set}"
        );
        // The made cookie hashes as the cookie will on the next request.
        let value = set.trim_start_matches("lb=").split(';').next().unwrap();
        headers.insert("cookie", format!("lb={value}").parse().unwrap());
        let (again, none) = hash_key(
            &on,
            &RequestKey {
                headers: &headers,
                client,
            },
        );
        assert_eq!((again, none), (key, None));
    }

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let all = endpoints(2);
        let selection = Selection::new(all.clone(), &Policy::LeastRequest);
        let headers = HeaderMap::new();
        let request = RequestKey {
            headers: &headers,
            client: None,
        };
        let next = AtomicUsize::new(0);
        let busy = selection
            .choose(&Policy::LeastRequest, &next, &request)
            .unwrap();
        for _ in 0..20 {
            let other = selection
                .choose(&Policy::LeastRequest, &next, &request)
                .unwrap();
            assert_ne!(other.peer._address, busy.peer._address);
        }
        drop(busy);
        assert!(all
            .iter()
            .all(|e| e.state.in_flight.load(Ordering::Relaxed) == 0));
    }
}
