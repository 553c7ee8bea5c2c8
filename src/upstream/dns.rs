//! DNS for the service resolver, off the request path.
//!
//! A snapshot being compiled for serving resolves its names once, all at
//! once and within [`FIRST_LOOKUP_DEADLINE`], so the first requests find
//! addresses; `pingress -t` resolves nothing. From then on a background
//! loop per cluster refreshes the addresses: every [`REFRESH`] (Envoy's
//! default `dns_refresh_rate`), or at the record's TTL with
//! `respect_dns_ttl`. A failed refresh keeps the last good addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, ResolverOpts};
use hickory_resolver::{ResolveError, TokioResolver};
use log::{info, warn};

use super::cluster::ClusterState;

/// How often addresses are refreshed without `respect_dns_ttl`.
pub const REFRESH: Duration = Duration::from_secs(5);
/// Bounds on a record's TTL as a refresh interval.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long compiling a snapshot waits for its names.
pub const FIRST_LOOKUP_DEADLINE: Duration = Duration::from_secs(2);

/// How a cluster's name is resolved (`enable_ipv4`, `enable_ipv6`,
/// `respect_dns_ttl`, `dns_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DnsOptions {
    pub ipv4: bool,
    pub ipv6: bool,
    pub respect_ttl: bool,
    /// `logical_dns`: only the first address is used.
    pub logical: bool,
}

impl Default for DnsOptions {
    fn default() -> Self {
        DnsOptions {
            ipv4: true,
            ipv6: false,
            respect_ttl: false,
            logical: false,
        }
    }
}

/// A name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
    pub options: DnsOptions,
}

/// Addresses, or why there are none.
pub type Lookup = Result<Vec<SocketAddr>, DnsError>;

/// A DNS lookup that gave no usable address.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read the system's DNS configuration: {0}")]
    Config(ResolveError),
    /// Shared: every name of the batch fails with it.
    #[error("cannot start the DNS lookups: {0}")]
    Runtime(Arc<std::io::Error>),
    #[error("cannot resolve {host}: {error}")]
    Resolve { host: String, error: ResolveError },
    #[error(
        "{host} resolves to no address of an enabled family (enable_ipv4={ipv4}, \
         enable_ipv6={ipv6})"
    )]
    NoAddress {
        host: String,
        ipv4: bool,
        ipv6: bool,
    },
    #[error("no DNS answer for {host} within {deadline:?}; still trying in the background")]
    Timeout { host: String, deadline: Duration },
    /// A name the snapshot wanted that was not in its batch of lookups.
    #[error("{host} was not looked up")]
    NotLookedUp { host: String },
}

fn resolver(options: DnsOptions) -> Result<TokioResolver, DnsError> {
    let mut builder = TokioResolver::builder_tokio().map_err(DnsError::Config)?;
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.ip_strategy = match (options.ipv4, options.ipv6) {
        (true, false) => LookupIpStrategy::Ipv4Only,
        (false, true) => LookupIpStrategy::Ipv6Only,
        _ => LookupIpStrategy::Ipv4AndIpv6,
    };
    // Every refresh asks again; the loop itself keeps the schedule.
    opts.cache_size = 0;
    Ok(builder.build())
}

/// One lookup: the usable addresses and how long they are valid.
async fn lookup(
    resolver: &TokioResolver,
    target: &DnsTarget,
) -> Result<(Vec<SocketAddr>, Duration), DnsError> {
    let found = resolver
        .lookup_ip(target.host.as_str())
        .await
        .map_err(|error| DnsError::Resolve {
            host: target.host.clone(),
            error,
        })?;
    let options = target.options;
    let mut usable: Vec<SocketAddr> = found
        .iter()
        .filter(|ip| (ip.is_ipv4() && options.ipv4) || (ip.is_ipv6() && options.ipv6))
        .map(|ip| SocketAddr::new(ip, target.port))
        .collect();
    // Emissary prefers IPv6 when both families are enabled.
    usable.sort_by_key(|a| a.is_ipv4());
    usable.dedup();
    if options.logical {
        usable.truncate(1);
    }
    if usable.is_empty() {
        return Err(DnsError::NoAddress {
            host: target.host.clone(),
            ipv4: options.ipv4,
            ipv6: options.ipv6,
        });
    }
    let ttl = found
        .valid_until()
        .saturating_duration_since(Instant::now());
    Ok((usable, ttl.clamp(MIN_TTL, MAX_TTL)))
}

/// Resolves every target at once, waiting at most `deadline`. Runs on a
/// thread of its own, so it works with or without a runtime around.
pub fn resolve_all(targets: Vec<DnsTarget>, deadline: Duration) -> HashMap<DnsTarget, Lookup> {
    if targets.is_empty() {
        return HashMap::new();
    }
    let work = || -> HashMap<DnsTarget, Lookup> {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                let why = DnsError::Runtime(Arc::new(e));
                return targets.into_iter().map(|t| (t, Err(why.clone()))).collect();
            }
        };
        runtime.block_on(async {
            let mut lookups = tokio::task::JoinSet::new();
            for target in targets.iter().cloned() {
                lookups.spawn(async move {
                    let outcome = match resolver(target.options) {
                        Ok(resolver) => lookup(&resolver, &target).await.map(|(found, _)| found),
                        Err(e) => Err(e),
                    };
                    (target, outcome)
                });
            }
            let mut results = HashMap::new();
            let _ = tokio::time::timeout(deadline, async {
                while let Some(Ok((target, outcome))) = lookups.join_next().await {
                    results.insert(target, outcome);
                }
            })
            .await;
            for target in targets {
                results.entry(target.clone()).or_insert_with(|| {
                    Err(DnsError::Timeout {
                        host: target.host.clone(),
                        deadline,
                    })
                });
            }
            results
        })
    };
    std::thread::scope(|scope| scope.spawn(work).join()).unwrap_or_default()
}

/// Refreshes `cluster`'s addresses until the cluster is gone.
pub async fn run(cluster: Weak<ClusterState>, target: DnsTarget) {
    let resolver = match resolver(target.options) {
        Ok(resolver) => resolver,
        Err(e) => {
            warn!("{e}; the addresses of {} are not refreshed", target.host);
            return;
        }
    };
    let mut failing = false;
    loop {
        let outcome = lookup(&resolver, &target).await;
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let next = match outcome {
            Ok((addresses, ttl)) => {
                if failing {
                    info!("cluster {}: {} resolves again", strong.name(), target.host);
                    failing = false;
                }
                strong.set_addresses(&addresses);
                if target.options.respect_ttl {
                    ttl
                } else {
                    REFRESH
                }
            }
            Err(why) => {
                if !failing {
                    warn!(
                        "cluster {}: {why}; keeping the last addresses",
                        strong.name()
                    );
                    failing = true;
                }
                REFRESH
            }
        };
        drop(strong);
        tokio::time::sleep(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `localhost` comes from the hosts file: no DNS server is asked.
    #[test]
    fn names_resolve_together_within_the_deadline() {
        let target = DnsTarget {
            host: "localhost".into(),
            port: 8080,
            options: DnsOptions::default(),
        };
        let found = resolve_all(vec![target.clone()], Duration::from_secs(10));
        let addresses = found[&target].as_ref().expect("localhost resolves");
        assert!(addresses.contains(&"127.0.0.1:8080".parse().unwrap()));
        assert!(addresses.iter().all(SocketAddr::is_ipv4));
    }
}
