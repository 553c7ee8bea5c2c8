//! Active HTTP health checks (`health_checks`): a background loop per
//! cluster probes every endpoint each `interval`; an endpoint leaves the
//! rotation after `unhealthy_threshold` failed probes in a row and returns
//! after `healthy_threshold` passed ones.
//!
//! Each probe opens a new connection with the endpoint's prepared peer (so
//! upstream TLS, client certificates and h2 apply as for requests) and is
//! never pooled: a reused connection would hide an endpoint that stopped
//! accepting new ones.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use log::{info, warn};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;

use super::balancer::{Endpoint, EndpointState};
use super::cluster::ClusterState;

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub path: String,
    /// The `Host` of a probe; the service's host when not given.
    pub hostname: Option<String>,
    /// Inclusive status ranges that pass.
    pub expected: Vec<(u16, u16)>,
    /// `(name, value, append)`, literally.
    pub add_headers: Vec<(HeaderName, HeaderValue, bool)>,
    pub remove_headers: Vec<HeaderName>,
}

impl HealthCheck {
    fn passes(&self, status: u16) -> bool {
        self.expected
            .iter()
            .any(|(min, max)| (*min..=*max).contains(&status))
    }

    fn request(&self, host: &str) -> Option<RequestHeader> {
        let mut request = RequestHeader::build("GET", self.path.as_bytes(), None).ok()?;
        request.insert_header(http::header::HOST, host).ok()?;
        // Services written for Emissary recognise its probes by this.
        request
            .insert_header(http::header::USER_AGENT, "Envoy/HC")
            .ok()?;
        for name in &self.remove_headers {
            request.remove_header(name);
        }
        for (name, value, append) in &self.add_headers {
            if *append {
                request.append_header(name.clone(), value.clone()).ok()?;
            } else {
                request.insert_header(name.clone(), value.clone()).ok()?;
            }
        }
        Some(request)
    }
}

/// Probes `cluster`'s endpoints until the cluster is gone.
pub async fn run(cluster: Weak<ClusterState>, check: HealthCheck) {
    let connector = Arc::new(Connector::new(None));
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let host = check
            .hostname
            .clone()
            .unwrap_or_else(|| strong.key().service.host.clone());
        let mut probes = tokio::task::JoinSet::new();
        for endpoint in strong.endpoints() {
            let (connector, check, host) = (connector.clone(), check.clone(), host.clone());
            probes.spawn(async move {
                let passed = probe(&connector, &endpoint, &check, &host).await;
                (endpoint, passed)
            });
        }
        while let Some(done) = probes.join_next().await {
            if let Ok((endpoint, passed)) = done {
                record(strong.name(), &endpoint, passed, &check);
            }
        }
        strong.refresh_health();
        drop(strong);
        tokio::time::sleep(check.interval).await;
    }
}

/// One probe: a GET whose status must be expected, within the timeout.
async fn probe(
    connector: &Connector,
    endpoint: &Endpoint,
    check: &HealthCheck,
    host: &str,
) -> Result<(), ProbeError> {
    let mut peer = endpoint.peer.clone();
    peer.options.connection_timeout = Some(check.timeout);
    peer.options.total_connection_timeout = Some(check.timeout);
    peer.options.read_timeout = Some(check.timeout);
    peer.options.write_timeout = Some(check.timeout);
    let Some(request) = check.request(host) else {
        return Err(ProbeError::Request);
    };
    let exchange = async {
        let (mut session, _) = connector.get_http_session(&peer).await?;
        session.write_request_header(Box::new(request)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session
            .response_header()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        session.shutdown().await;
        match check.passes(status) {
            true => Ok(()),
            false => Err(ProbeError::Status(status)),
        }
    };
    match tokio::time::timeout(check.timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}

/// A health check probe that did not pass.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("the probe request cannot be built")]
    Request,
    #[error(transparent)]
    Exchange(#[from] Box<pingora::Error>),
    /// One the check does not expect.
    #[error("status {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Counts a probe's outcome; flips the endpoint's health at a threshold.
fn record(
    cluster: &str,
    endpoint: &Endpoint,
    outcome: Result<(), ProbeError>,
    check: &HealthCheck,
) {
    let state: &EndpointState = &endpoint.state;
    match outcome {
        Ok(()) => {
            state.failures.store(0, Ordering::Relaxed);
            let passes = state.passes.fetch_add(1, Ordering::Relaxed) + 1;
            if passes >= check.healthy_threshold && !state.healthy.swap(true, Ordering::Relaxed) {
                info!(
                    "cluster {cluster}: endpoint {} passed {passes} health check(s); back in rotation",
                    endpoint.address
                );
            }
        }
        Err(why) => {
            state.passes.store(0, Ordering::Relaxed);
            let failures = state.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= check.unhealthy_threshold && state.healthy.swap(false, Ordering::Relaxed)
            {
                warn!(
                    "cluster {cluster}: endpoint {} failed {failures} health check(s) ({why}); \
                     out of rotation",
                    endpoint.address
                );
            }
        }
    }
}
