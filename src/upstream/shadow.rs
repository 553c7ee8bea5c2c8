//! Shadow Mappings
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/shadowing>):
//! a copy of a share (the shadow's `weight`, 100% by default) of a canary
//! group's requests goes to the shadow's service, and its answer is thrown
//! away.
//!
//! The primary never waits for its copy: each copy runs on a detached task
//! bounded by the shadow's own timeout, and at most [`MAX_IN_FLIGHT`] copies
//! per shadow run at once, so a slow or dead shadow costs a bounded amount
//! of memory; copies beyond that are skipped. Bodies are copied only when
//! they are at most [`MAX_MIRRORED_BODY`] long, kept in memory as they pass
//! to the primary; longer ones are not mirrored at all.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use log::debug;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use tokio::sync::Semaphore;

use crate::metrics::metrics;

use super::cluster::Cluster;
use super::side;

/// Copies of one shadow running at once; one more is skipped.
pub const MAX_IN_FLIGHT: usize = 256;
/// The largest request body copied, the size of Pingora's retry buffer.
pub const MAX_MIRRORED_BODY: usize = 64 * 1024;

/// One connection pool to shadows for the process, apart from the
/// primaries' so mirrored traffic never takes their pooled connections.
static CONNECTOR: std::sync::LazyLock<Connector> =
    std::sync::LazyLock::new(|| Connector::new(None));

#[derive(Debug)]
pub struct Shadow {
    /// `name.namespace` of the shadow Mapping.
    pub mapping: String,
    pub cluster: Arc<Cluster>,
    /// The share of requests mirrored, 0 to 100.
    pub percent: u32,
    /// How long a copy may take, connecting to reading the whole answer.
    pub timeout: Duration,
    slots: Arc<Semaphore>,
}

impl Shadow {
    pub fn new(mapping: String, cluster: Arc<Cluster>, percent: u32, timeout: Duration) -> Self {
        Shadow {
            mapping,
            cluster,
            percent,
            timeout,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Whether a request that rolled `roll` (0..100) is mirrored.
    pub fn takes(&self, roll: u32) -> bool {
        roll < self.percent
    }

    /// Sends a copy of the primary's upstream request on a detached task.
    pub fn mirror(&self, mut request: RequestHeader, body: Bytes) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            metrics().shadow(&self.mapping, "skipped");
            return;
        };
        if let Err(e) = prepare(&mut request, &body) {
            debug!("shadow {}: cannot copy the request: {e}", self.mapping);
            metrics().shadow(&self.mapping, "failed");
            return;
        }
        let (mapping, cluster, timeout) =
            (self.mapping.clone(), self.cluster.clone(), self.timeout);
        tokio::spawn(async move {
            let copy = side::exchange(&CONNECTOR, &cluster, request, Some(body), side::Body::Drop);
            let outcome = match tokio::time::timeout(timeout, copy).await {
                Ok(Ok(answer)) => {
                    debug!(
                        "shadow {mapping}: {} answered {}",
                        cluster.name, answer.status
                    );
                    "sent"
                }
                Ok(Err(e)) => {
                    debug!("shadow {mapping}: {e}");
                    "failed"
                }
                Err(_) => "timeout",
            };
            metrics().shadow(&mapping, outcome);
            drop(slot);
        });
    }
}

/// The copy as Envoy sends it: `-shadow` after the host name of the
/// authority, so the shadow's logs tell copies apart; origin-form target;
/// the body framed by its length.
fn prepare(request: &mut RequestHeader, body: &Bytes) -> pingora::Result<()> {
    let authority = request
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri.authority().map(|a| a.as_str()))
        .map(shadow_authority);
    if let Some(authority) = authority {
        request.insert_header(HOST, authority)?;
    }
    if let Some(target) = request.uri.path_and_query().cloned() {
        request.set_uri(http::Uri::from(target));
    }
    request.set_version(http::Version::HTTP_11);
    request.remove_header(&TRANSFER_ENCODING);
    // Nothing would read a 100 Continue.
    request.remove_header(&EXPECT);
    if !body.is_empty() || request.headers.contains_key(CONTENT_LENGTH) {
        request.insert_header(CONTENT_LENGTH, body.len().to_string())?;
    }
    Ok(())
}

/// `host[:port]` becomes `host-shadow[:port]`.
fn shadow_authority(authority: &str) -> String {
    let port_at = match authority.rfind(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some(colon) if !authority[colon..].contains(']') => colon,
        _ => authority.len(),
    };
    let (host, port) = authority.split_at(port_at);
    format!("{host}-shadow{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_authorities() {
        assert_eq!(shadow_authority("example.com"), "example.com-shadow");
        assert_eq!(
            shadow_authority("example.com:8080"),
            "example.com-shadow:8080"
        );
        assert_eq!(shadow_authority("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_authority("[::1]"), "[::1]-shadow");
    }
}
