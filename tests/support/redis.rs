//! The system redis-server, for rate limits shared between gateways.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::ports::{free_port, poll_until, port_open};
use super::process::kill_child;

pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// The system redis-server on a loopback port, without persistence, killed
/// on drop. `stop` and `restart` (same port) let tests show what the
/// gateway does while Redis is away.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        if !Path::new(REDIS_SERVER).exists() {
            panic!(
                "{REDIS_SERVER} not found: the shared rate-limit tests need a real Redis; \
                 scripts/bootstrap installs it (apt-get install redis-server)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("pingress-redis-")
            .tempdir()
            .expect("redis temp dir");
        let mut last_err = String::new();
        // free_port() is racy; try again if someone took the port.
        for _ in 0..5 {
            let port = free_port();
            match Redis::spawn(dir.path(), port) {
                Ok(child) => {
                    return Redis {
                        child: Some(child),
                        port,
                        dir,
                    }
                }
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server failed to start:\n{last_err}");
    }

    fn spawn(dir: &Path, port: u16) -> Result<Child, String> {
        let log = dir.join("redis.log");
        let mut child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {REDIS_SERVER}: {e}"))?;
        let up = poll_until(Duration::from_secs(10), || {
            port_open(port) || matches!(child.try_wait(), Ok(Some(_)))
        });
        if up && matches!(child.try_wait(), Ok(None)) {
            return Ok(child);
        }
        kill_child(&mut child);
        Err(fs::read_to_string(&log).unwrap_or_default())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server; its counters are gone with it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts a fresh server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = Redis::spawn(self.dir.path(), self.port)
            .unwrap_or_else(|e| panic!("redis-server did not come back on {}:\n{e}", self.port));
        self.child = Some(child);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
