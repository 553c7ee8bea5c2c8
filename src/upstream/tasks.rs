//! The background service that runs the clusters' own work (DNS refresh,
//! health checks): it starts each new cluster identity's tasks once a
//! build has registered it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::cluster::ClusterStates;

/// How often the live cluster states are looked at for new builds: a
/// reload builds without telling anyone.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

pub struct UpstreamTasks {
    states: Arc<ClusterStates>,
}

impl UpstreamTasks {
    pub fn new(states: Arc<ClusterStates>) -> Self {
        UpstreamTasks { states }
    }
}

#[async_trait]
impl BackgroundService for UpstreamTasks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut seen = 0;
        loop {
            self.states.start_tasks(&mut seen);
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
