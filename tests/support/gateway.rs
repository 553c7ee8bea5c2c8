//! pingress itself: writing its files, running it (as a server until the
//! test drops it, or once with `-t`), and reading its admin port and log.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::client::{Request, Response};
use super::ports::{free_port, poll_until};
use super::process::{drain_to_string, kill_child, tempdir};

pub const PINGRESS: &str = env!("CARGO_BIN_EXE_pingress");

/// Writes `dir/gateway.yaml` and `dir/resources/test.yaml` (an HTTP Listener
/// on `listener_port` followed by `resources_yaml`).
pub fn write_gateway(dir: &Path, listener_port: u16, admin_port: u16, resources_yaml: &str) {
    write_gateway_with_listener(dir, listener_port, admin_port, "", resources_yaml);
}

/// Like [`write_gateway`], with `listener_extra` (block YAML at the level of
/// the Listener's `spec` keys, e.g. `"l7Depth: 1"`) added to the Listener.
pub fn write_gateway_with_listener(
    dir: &Path,
    listener_port: u16,
    admin_port: u16,
    listener_extra: &str,
    resources_yaml: &str,
) {
    // JSON strings are valid YAML double-quoted scalars, so odd temp paths
    // cannot break the document.
    let q = |p: PathBuf| serde_json::to_string(&p.to_string_lossy()).expect("quote path");
    let gateway = format!(
        "pingora:\n  threads: 1\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  \
         upgrade_sock: {}\n  pid_file: {}\nresources:\n  - resources\nadmin:\n  listen: 127.0.0.1:{admin_port}\n",
        q(dir.join("upgrade.sock")),
        q(dir.join("pingress.pid")),
    );
    fs::create_dir_all(dir.join("resources")).expect("create resources dir");
    fs::write(dir.join("gateway.yaml"), gateway).expect("write gateway.yaml");

    let mut resources = format!(
        "apiVersion: getambassador.io/v3alpha1\nkind: Listener\nmetadata:\n  name: http\nspec:\n  \
         port: {listener_port}\n  protocol: HTTP\n  securityModel: XFP\n  hostBinding:\n    \
         namespace:\n      from: ALL\n"
    );
    for line in listener_extra.lines().filter(|l| !l.trim().is_empty()) {
        resources.push_str(&format!("  {line}\n"));
    }
    let extra = resources_yaml.trim_start_matches('\n');
    if !extra.trim().is_empty() {
        if !extra.starts_with("---") {
            resources.push_str("---\n");
        }
        resources.push_str(extra);
        if !extra.ends_with('\n') {
            resources.push('\n');
        }
    }
    fs::write(dir.join("resources").join("test.yaml"), resources).expect("write test.yaml");
}

/// Like [`write_gateway`] without the implicit HTTP Listener:
/// `resources_yaml` brings every Listener the test wants (e.g. only HTTPS).
pub fn write_gateway_without_listener(dir: &Path, admin_port: u16, resources_yaml: &str) {
    write_gateway(dir, 0, admin_port, "");
    fs::write(dir.join("resources").join("test.yaml"), resources_yaml).expect("write test.yaml");
}

/// Writes `docs` (which bring every Listener, see
/// [`write_gateway_without_listener`]) into `dir` and starts pingress on them.
pub fn start_gateway_without_listener(dir: &Path, docs: &[String]) -> Gateway {
    write_gateway_without_listener(dir, free_port(), &docs.concat());
    Gateway::start(dir)
}

/// Result of a short-lived pingress invocation.
#[derive(Debug)]
pub struct Output {
    /// Exit code; -1 if killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// stdout followed by stderr, for "the message appears somewhere" checks.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `pingress -t -c <dir>/gateway.yaml`: validate the configuration only.
pub fn check(dir: &Path) -> Output {
    check_program(Path::new(PINGRESS), dir)
}

/// `-t` with another pingress binary, e.g. an example with its own filters.
pub fn check_program(program: &Path, dir: &Path) -> Output {
    let out = Command::new(program)
        .arg("-t")
        .arg("-c")
        .arg(dir.join("gateway.yaml"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {} -t: {e}", program.display()));
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn admin_addr_from(gateway_yaml: &Path) -> SocketAddr {
    let text = fs::read_to_string(gateway_yaml)
        .unwrap_or_else(|e| panic!("read {}: {e}", gateway_yaml.display()));
    let doc: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("parse {}: {e}", gateway_yaml.display()));
    let listen = doc
        .get("admin")
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or_else(|| panic!("{} has no admin.listen", gateway_yaml.display()));
    listen
        .parse()
        .unwrap_or_else(|e| panic!("admin.listen {listen:?}: {e}"))
}

/// A ready gateway on `resources` behind an HTTP Listener (`listener_extra`
/// adds lines to it, e.g. `"l7Depth: 1"`), with the directory that holds its
/// files (removed when dropped) and the listener's port.
pub fn start_gateway(listener_extra: &str, resources: &str) -> (TempDir, Gateway, u16) {
    start_gateway_program(Path::new(PINGRESS), listener_extra, resources)
}

/// [`start_gateway`] with another pingress binary (see [`example_binary`]).
pub fn start_gateway_program(
    program: &Path,
    listener_extra: &str,
    resources: &str,
) -> (TempDir, Gateway, u16) {
    let dir = tempdir();
    let port = free_port();
    write_gateway_with_listener(dir.path(), port, free_port(), listener_extra, resources);
    let gateway = Gateway::start_program(program, dir.path());
    (dir, gateway, port)
}

/// A running `pingress -c <dir>/gateway.yaml`, killed (SIGKILL) on drop.
pub struct Gateway {
    child: Child,
    dir: PathBuf,
    admin: SocketAddr,
    log: PathBuf,
}

impl Gateway {
    /// Starts the gateway on an already written `dir/gateway.yaml` and waits
    /// (20 s) until `/ambassador/v0/check_ready` answers 200.
    pub fn start(dir: &Path) -> Gateway {
        Gateway::start_program(Path::new(PINGRESS), dir)
    }

    /// Like [`Gateway::start`], with another pingress binary (an example
    /// with its own filters, see [`example_binary`]).
    pub fn start_program(program: &Path, dir: &Path) -> Gateway {
        let mut gw = Gateway::spawn_program(program, dir, &[], "gateway.log");
        gw.wait_ready(Duration::from_secs(20));
        gw
    }

    /// Starts `pingress -c <dir>/gateway.yaml <extra>` with its output in
    /// `dir/<log>`, without waiting for it (a `-u` process waits for the old
    /// one's sockets).
    pub fn spawn(dir: &Path, extra: &[&str], log: &str) -> Gateway {
        Gateway::spawn_program(Path::new(PINGRESS), dir, extra, log)
    }

    fn spawn_program(program: &Path, dir: &Path, extra: &[&str], log: &str) -> Gateway {
        let config = dir.join("gateway.yaml");
        let admin = admin_addr_from(&config);
        let log_path = dir.join(log);
        let log = fs::File::create(&log_path).expect("create the gateway log");
        let log2 = log.try_clone().expect("clone log handle");
        let child = Command::new(program)
            .arg("-c")
            .arg(&config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Gateway {
            child,
            dir: dir.to_path_buf(),
            admin,
            log: log_path,
        }
    }

    /// Polls check_ready until 200; panics with the log if the process exits
    /// or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "pingress exited ({status}) before becoming ready; log:\n{}",
                    self.log()
                );
            }
            let ready = Request::get("/ambassador/v0/check_ready")
                .timeout(Duration::from_secs(2))
                .try_send(self.admin.port())
                .map(|r| r.status == 200)
                .unwrap_or(false);
            if ready {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "pingress not ready after {timeout:?} (admin {}); log:\n{}",
                    self.admin,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything pingress wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.port()
    }

    /// GET on the admin listener.
    pub fn admin_get(&self, path: &str) -> Response {
        Request::get(path).send(self.admin.port())
    }

    /// The value of one series of `/metrics`, e.g.
    /// `pingress_config_generation` or `name{label="value"}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let response = self.admin_get("/metrics");
        assert_eq!(response.status, 200, "{}", response.text());
        response.text().lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
    }

    /// The value of `series` once `ready` holds for it, or the last read
    /// after 5 s. A connection's close can reach the client a moment
    /// before the gateway counts it.
    pub fn metric_when(&self, series: &str, ready: impl Fn(f64) -> bool) -> Option<f64> {
        let mut last = None;
        let _settled = poll_until(Duration::from_secs(5), || {
            last = self.metric(series);
            last.is_some_and(&ready)
        });
        last
    }

    /// The gateway's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the gateway's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Runs `pingress <args>` to completion, killing it after `timeout`.
/// Returns its output (code -1 when it had to be killed) and how long it ran.
pub fn run_pingress<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    timeout: Duration,
) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = Command::new(PINGRESS)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {PINGRESS}: {e}"));
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|s| drain_to_string(s, Arc::clone(&stdout))),
        child
            .stderr
            .take()
            .map(|s| drain_to_string(s, Arc::clone(&stderr))),
    ];
    let mut code = -1;
    let deadline = started + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            code = status.code().unwrap_or(-1);
            break;
        }
        if Instant::now() >= deadline {
            kill_child(&mut child);
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    for reader in readers.into_iter().flatten() {
        let _ = reader.join();
    }
    let text = |s: &Arc<Mutex<String>>| s.lock().map(|s| s.clone()).unwrap_or_default();
    (
        Output {
            code,
            stdout: text(&stdout),
            stderr: text(&stderr),
        },
        elapsed,
    )
}
