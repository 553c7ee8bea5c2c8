//! The background service that runs the clusters' own work (health
//! checks): it starts each cluster's tasks when a snapshot brings it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::snapshot::Snapshot;

/// How often the serving snapshot is looked at for new clusters: a reload
/// swaps it without telling anyone.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

pub struct UpstreamTasks {
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl UpstreamTasks {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>) -> Self {
        UpstreamTasks { snapshot }
    }
}

#[async_trait]
impl BackgroundService for UpstreamTasks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Weak: an old snapshot (and its clusters' tasks) must not be kept
        // alive by this loop.
        let mut seen: Weak<Snapshot> = Weak::new();
        loop {
            let current = self.snapshot.load_full();
            if !Weak::ptr_eq(&seen, &Arc::downgrade(&current)) {
                for cluster in &current.clusters {
                    cluster.start_tasks();
                }
                seen = Arc::downgrade(&current);
            }
            drop(current);
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
