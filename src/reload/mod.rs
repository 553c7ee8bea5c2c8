//! Live reconfiguration: watch every file the configuration came from,
//! rebuild the snapshot on the side, and swap it in one step.
//!
//! Every rebuild applies, resource by resource: one that an edit broke
//! keeps its last good version (the pipeline puts it back) and its error is
//! reported (log, admin diag, `pingress_resource_errors`). Pingora's pools
//! are keyed by peer identity, which is derived from content, so unchanged
//! upstreams keep their pooled connections across a swap; a rotated client
//! certificate gets a new pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use log::{error, info, warn};
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::diagnostics::{Diagnostic, Severity};
use crate::config::load::{is_yaml, GatewayFile};
use crate::filters::Registry;
use crate::metrics::metrics;
use crate::model::ModuleSettings;
use crate::pipeline::{load, LastGood, Loaded};
use crate::snapshot::{Resolution, Snapshot};

/// Events closer together than this are one change: editors and Kubernetes
/// volume updates write several files in a burst.
const SETTLE: Duration = Duration::from_millis(150);

/// The longest a burst may delay a reload: a writer that touches a file
/// every 100 ms must not hold every other change back.
const SETTLE_AT_MOST: Duration = Duration::from_secs(2);

/// What the gateway serves now, and how it got there.
pub struct Live {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub status: ArcSwap<Status>,
    /// The gateway file's process settings (`pingora:`, `admin:`,
    /// `downstream:`) the process started with: a reload cannot change
    /// them.
    process_settings: String,
    /// The filter types a rebuild may use.
    registry: Registry,
    /// What a rebuild falls back on for a resource an edit broke.
    last_good: std::sync::Mutex<LastGood>,
    /// Told after each swap of `snapshot`: open connections check their
    /// TLS against the new one.
    swapped: tokio::sync::watch::Sender<()>,
}

/// The Module keys whose HTTP/2 side is set once per process: Pingora
/// takes the HTTP/2 idle timeout and header list size when a listener
/// starts.
fn http2_keeps(serving: &ModuleSettings, next: &ModuleSettings) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if serving.listener_idle_timeout != next.listener_idle_timeout {
        keys.push("listener_idle_timeout_ms");
    }
    if serving.max_request_headers != next.max_request_headers {
        keys.push("max_request_headers_kb");
    }
    keys
}

/// The parts of the gateway file that only a new process applies.
fn process_settings(gateway: &GatewayFile) -> String {
    format!(
        "{}{:?}{:?}",
        serde_yaml::to_string(&gateway.pingora).unwrap_or_default(),
        gateway.admin.listen,
        gateway.downstream
    )
}

#[derive(Debug, Clone)]
pub struct Status {
    /// 1 for the configuration the process started with, +1 per reload.
    pub generation: u64,
    pub applied_at: SystemTime,
    /// Problems of the serving configuration.
    pub diagnostics: Vec<Diagnostic>,
    pub last_reload: Option<Reload>,
}

#[derive(Debug, Clone)]
pub struct Reload {
    pub at: SystemTime,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Applied,
    /// The gateway file itself could not be read.
    Failed(String),
}

impl Live {
    /// Serves what the start loaded; gives back the gateway file.
    pub fn new(loaded: Loaded, registry: Registry) -> (Live, GatewayFile) {
        publish_metrics(&loaded, 1);
        let live = Live {
            registry,
            process_settings: process_settings(&loaded.gateway),
            snapshot: Arc::new(ArcSwap::from_pointee(loaded.snapshot)),
            status: ArcSwap::from_pointee(Status {
                generation: 1,
                applied_at: SystemTime::now(),
                diagnostics: loaded.diagnostics,
                last_reload: None,
            }),
            last_good: std::sync::Mutex::new(loaded.last_good),
            swapped: tokio::sync::watch::Sender::new(()),
        };
        (live, loaded.gateway)
    }

    /// Changes each time a new snapshot serves.
    pub fn swaps(&self) -> tokio::sync::watch::Receiver<()> {
        self.swapped.subscribe()
    }

    /// Rebuilds from the gateway file and swaps.
    pub fn reload(&self, gateway_path: &Path) -> Outcome {
        // Reloads run one at a time; the lock is held across the load so
        // that the last good versions are read in place, not copied.
        let mut last_good = self
            .last_good
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = match load(
            gateway_path,
            Resolution::Resolve,
            &self.registry,
            &last_good,
        ) {
            Err(problem) => Outcome::Failed(problem.to_string()),
            Ok(loaded) => self.apply(loaded, &mut last_good),
        };
        drop(last_good);
        let mut status = (**self.status.load()).clone();
        status.last_reload = Some(Reload {
            at: SystemTime::now(),
            outcome: outcome.clone(),
        });
        let counters = metrics();
        match &outcome {
            Outcome::Applied => {
                status.generation += 1;
                status.applied_at = SystemTime::now();
                counters.reload("applied");
            }
            Outcome::Failed(_) => counters.reload("failed"),
        }
        self.status.store(Arc::new(status));
        outcome
    }

    fn apply(&self, loaded: Loaded, last_good: &mut LastGood) -> Outcome {
        if process_settings(&loaded.gateway) != self.process_settings {
            warn!(
                "reload: the gateway file's pingora:, admin: or downstream: settings changed; they \
                 take effect only in a new process: start `pingress -u` with the same gateway \
                 file, then send SIGQUIT to this one"
            );
        }
        let serving = self.snapshot.load();
        if serving.bindings() != loaded.snapshot.bindings() {
            warn!(
                "reload: listener ports or protocols changed; they take effect only in a new \
                 process: start `pingress -u` with the same gateway file, then send SIGQUIT to \
                 this one"
            );
        }
        for key in http2_keeps(&serving.module, &loaded.snapshot.module) {
            warn!(
                "reload: the Module's {key} changed; HTTP/1 follows it now, HTTP/2 connections \
                 only in a new process (Pingora reads it when the listener starts)"
            );
        }
        let generation = self.status.load().generation + 1;
        publish_metrics(&loaded, generation);
        *last_good = loaded.last_good;
        self.snapshot.store(Arc::new(loaded.snapshot));
        self.swapped.send_replace(());
        let mut status = (**self.status.load()).clone();
        status.diagnostics = loaded.diagnostics;
        self.status.store(Arc::new(status));
        Outcome::Applied
    }
}

/// The serving configuration's gauges: generation, when, resources with
/// errors, and when each certificate in use expires.
fn publish_metrics(loaded: &Loaded, generation: u64) {
    let snapshot = &loaded.snapshot;
    let counters = metrics();
    counters.set_resource_errors(&loaded.resource_errors());
    counters.config.generation.set(generation as f64);
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    counters.config.last_reload_success.set(now);
    let mut certificates: Vec<(String, &'static str, i64)> = Vec::new();
    let mut add = |context: &crate::tls::TlsContext, role: &'static str| {
        if let Some(expiry) = context
            .cert_key
            .as_ref()
            .and_then(|c| crate::tls::unix_time(c.leaf().not_after()))
        {
            let entry = (context.name.clone(), role, expiry);
            if !certificates.contains(&entry) {
                certificates.push(entry);
            }
        }
    };
    for listener in &snapshot.listeners {
        for host in listener.hosts.hosts() {
            if let Some(context) = &host.host.tls {
                add(context, "server");
            }
            for group in &host.groups {
                for (_, route) in &group.members {
                    if let Some(context) = route.cluster().and_then(|c| c.tls.as_ref()) {
                        add(context, "client");
                    }
                }
            }
        }
    }
    counters.set_certificates(&certificates);
}

/// The background service that watches and reloads; SIGHUP forces a reload.
pub struct Reloader {
    gateway_path: PathBuf,
    live: Arc<Live>,
    relevant: Arc<ArcSwap<Relevant>>,
}

/// Which changed paths matter. Files are watched through their directory,
/// which may hold unrelated files (logs, for one) that must not trigger
/// reloads.
#[derive(Debug, Default)]
struct Relevant {
    files: Vec<PathBuf>,
    trees: Vec<PathBuf>,
}

impl Relevant {
    fn matches(&self, path: &Path) -> bool {
        // Kubernetes' atomic writer swaps `..data` and `..<timestamp>`
        // entries beside the files it publishes.
        let kubernetes_swap = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."));
        let watched_file = self.files.iter().any(|f| f == path)
            || (kubernetes_swap && self.files.iter().any(|f| f.parent() == path.parent()));
        // In a resource directory only what the loader reads matters (and
        // directories, which have no extension): a log file written there
        // must not reload the gateway over and over.
        let resource_like = is_yaml(path) || kubernetes_swap || path.extension().is_none();
        watched_file || (resource_like && self.trees.iter().any(|t| path.starts_with(t)))
    }
}

impl Reloader {
    pub fn new(gateway_path: PathBuf, live: Arc<Live>) -> Reloader {
        Reloader {
            gateway_path,
            live,
            relevant: Arc::new(ArcSwap::from_pointee(Relevant::default())),
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut changes) = mpsc::unbounded_channel();
        let relevant = self.relevant.clone();
        let mut watcher =
            match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if !event.kind.is_access() && event.paths.iter().any(|p| relevant.load().matches(p))
                {
                    let _ = tx.send(());
                }
            }) {
                Ok(watcher) => watcher,
                Err(e) => {
                    error!("reload: cannot watch files ({e}); only SIGHUP reloads");
                    return self.signals_only(shutdown).await;
                }
            };
        let mut watched = self.watch(&mut watcher, &[]);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                warn!("reload: SIGHUP is not available: {e}");
                None
            }
        };
        loop {
            tokio::select! {
                Some(()) = changes.recv() => settle(&mut changes).await,
                Some(()) = recv_signal(&mut hangup) => info!("reload: SIGHUP"),
                _ = shutdown.changed() => return,
            }
            self.reload().await;
            // The set of files can change with the configuration.
            watched = self.watch(&mut watcher, &watched);
        }
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits until no change has arrived for [`SETTLE`], or [`SETTLE_AT_MOST`]
/// has passed.
async fn settle(changes: &mut mpsc::UnboundedReceiver<()>) {
    let give_up = tokio::time::Instant::now() + SETTLE_AT_MOST;
    while tokio::time::Instant::now() < give_up {
        let wait = SETTLE.min(give_up - tokio::time::Instant::now());
        if !matches!(
            tokio::time::timeout(wait, changes.recv()).await,
            Ok(Some(()))
        ) {
            return;
        }
    }
}

impl Reloader {
    async fn reload(&self) {
        let live = self.live.clone();
        let path = self.gateway_path.clone();
        // Reading files, parsing PEM and resolving names block.
        let outcome = tokio::task::spawn_blocking(move || live.reload(&path)).await;
        match outcome {
            Ok(Outcome::Applied) => {
                let status = self.live.status.load();
                info!(
                    "reload: configuration generation {} is serving",
                    status.generation
                );
                for diagnostic in &status.diagnostics {
                    match diagnostic.severity {
                        Severity::Error => error!("{diagnostic}"),
                        Severity::Warning => warn!("{diagnostic}"),
                    }
                }
            }
            Ok(Outcome::Failed(problem)) => {
                error!("reload failed, the previous configuration keeps serving: {problem}")
            }
            Err(e) => error!("reload: {e}"),
        }
    }

    async fn signals_only(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload().await,
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Watches what the configuration is read from: the gateway file, the
    /// resource paths, and certificate files. Files are watched through
    /// their directories, because editors and Kubernetes replace files
    /// (rename, `..data` symlink swap) rather than write them in place.
    fn watch(
        &self,
        watcher: &mut notify::RecommendedWatcher,
        previous: &[(PathBuf, RecursiveMode)],
    ) -> Vec<(PathBuf, RecursiveMode)> {
        let mut wanted: Vec<(PathBuf, RecursiveMode)> = Vec::new();
        let mut relevant = Relevant::default();
        let mut want = |path: &Path| {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            let entry = if path.is_dir() {
                relevant.trees.push(path.clone());
                (path, RecursiveMode::Recursive)
            } else {
                let parent = path.parent().unwrap_or(Path::new("/")).to_path_buf();
                relevant.files.push(path);
                (parent, RecursiveMode::NonRecursive)
            };
            if !wanted.contains(&entry) {
                wanted.push(entry);
            }
        };
        want(&self.gateway_path);
        let snapshot = self.live.snapshot.load();
        for path in &snapshot.sources {
            want(path);
        }
        self.relevant.store(Arc::new(relevant));
        for (path, _) in previous {
            if !wanted.iter().any(|(p, _)| p == path) {
                let _ = watcher.unwatch(path);
            }
        }
        for (path, mode) in &wanted {
            if !previous.iter().any(|(p, _)| p == path) {
                if let Err(e) = watcher.watch(path, *mode) {
                    warn!("reload: cannot watch {}: {e}", path.display());
                }
            }
        }
        wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_resource_files_in_a_resource_directory_matter() {
        let relevant = Relevant {
            files: vec![PathBuf::from("/etc/pingress/certs/tls.crt")],
            trees: vec![PathBuf::from("/etc/pingress/resources")],
        };
        for path in [
            "/etc/pingress/resources/routes.yaml",
            "/etc/pingress/resources/team/routes.yml",
            "/etc/pingress/resources/..data",
            "/etc/pingress/resources/team",
            "/etc/pingress/certs/tls.crt",
            "/etc/pingress/certs/..2026_12_07_00_00_00.123",
        ] {
            assert!(relevant.matches(Path::new(path)), "{path}");
        }
        for path in [
            "/etc/pingress/resources/gateway.log",
            "/etc/pingress/resources/routes.yaml.swp",
            "/etc/pingress/certs/other.pem",
            "/var/log/pingress.log",
        ] {
            assert!(!relevant.matches(Path::new(path)), "{path}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_moment_ends_the_settling() {
        let (tx, mut changes) = mpsc::unbounded_channel();
        tx.send(()).unwrap();
        let started = tokio::time::Instant::now();
        settle(&mut changes).await;
        assert_eq!(started.elapsed(), SETTLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_never_stops_cannot_hold_a_reload_back() {
        let (tx, mut changes) = mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            loop {
                if tx.send(()).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = tokio::time::Instant::now();
        settle(&mut changes).await;
        assert!(
            started.elapsed() <= SETTLE_AT_MOST,
            "{:?}",
            started.elapsed()
        );
        assert!(started.elapsed() >= SETTLE_AT_MOST - SETTLE);
        writer.abort();
    }
}
