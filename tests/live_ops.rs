//! Live operations under a continuous load of real requests: a Mapping
//! edit, an invalid edit, certificate rotation, and a graceful upgrade
//! (`-u` + SIGQUIT) must not fail a single request.

// Test code: a panic is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// Keep-alive clients sending requests until stopped, reconnecting when
/// the gateway closes a connection (as a draining process does). Every
/// response and every I/O error is counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    /// Statuses other than 200, by target.
    seen: Arc<Mutex<Vec<(String, u16, String)>>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, target: &'static str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|_| {
                let (stop, ok, failures, seen) =
                    (stop.clone(), ok.clone(), failures.clone(), seen.clone());
                thread::spawn(move || {
                    let mut client: Option<Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let connection = client.get_or_insert_with(|| Client::connect(port));
                        match connection.try_send(Request::get(target)) {
                            Ok(reply) => {
                                let close = reply
                                    .header("connection")
                                    .is_some_and(|c| c.eq_ignore_ascii_case("close"));
                                if reply.status == 200 {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    seen.lock().unwrap().push((
                                        target.to_string(),
                                        reply.status,
                                        reply.text(),
                                    ));
                                }
                                if close {
                                    client = None;
                                }
                            }
                            Err(e) => {
                                failures.lock().unwrap().push(e.to_string());
                                client = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            seen,
            workers,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; returns the failures (I/O errors and non-200s).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.join().unwrap();
        }
        let mut failures = self.failures.lock().unwrap().clone();
        failures.extend(
            self.seen
                .lock()
                .unwrap()
                .iter()
                .map(|(t, s, b)| format!("{t}: {s} {b}")),
        );
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

fn mapping(name: &str, prefix: &str, service: &str) -> String {
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n\
         spec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {service}\n"
    )
}

/// Replaces a resource file the way editors and `kubectl cp` do: write a
/// new file, then rename it over the old one.
fn replace(path: &Path, content: &str) {
    let next = path.with_extension("next");
    fs::write(&next, content).unwrap();
    fs::rename(&next, path).unwrap();
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    assert!(poll_until(timeout, &mut ready), "{what} within {timeout:?}");
    started.elapsed()
}

#[test]
fn mapping_edit_goes_live_without_failing_a_request() {
    let dir = tempdir();
    let one = Echo::plain("one");
    let two = Echo::plain("two");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = dir.path().join("resources").join("routes.yaml");
    fs::write(
        &routes,
        mapping("svc", "/svc/", &format!("127.0.0.1:{}", one.port())),
    )
    .unwrap();
    let gateway = Gateway::start(dir.path());

    let load = Load::start(port, "/svc/", 4);
    wait_for("load", Duration::from_secs(5), || load.ok() > 100);

    // Point the Mapping at another upstream and add a route.
    replace(
        &routes,
        &[
            mapping("svc", "/svc/", &format!("127.0.0.1:{}", two.port())),
            mapping("new", "/new/", &format!("127.0.0.1:{}", two.port())),
        ]
        .concat(),
    );
    let took = wait_for("the edit to serve", Duration::from_secs(5), || {
        Request::get("/svc/").send(port).echo().server() == "two"
    });
    assert!(
        took < Duration::from_secs(1),
        "the edit took {took:?} to go live"
    );
    assert_eq!(Request::get("/new/").send(port).status, 200);

    // An invalid edit keeps the old routes serving and is reported.
    replace(&routes, "kind: [unclosed\n");
    wait_for("the refusal to be logged", Duration::from_secs(5), || {
        gateway.log().contains("reload refused")
    });
    assert_eq!(Request::get("/new/").send(port).status, 200);
    let diag = gateway.admin_get("/ambassador/v0/diag/?json=true&filter=errors");
    assert_eq!(diag.status, 200, "{}", diag.text());
    assert!(diag.text().contains("invalid YAML"), "{}", diag.text());

    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 200, "only {ok} requests");
}

#[test]
fn graceful_upgrade_under_load_fails_no_request() {
    let dir = tempdir();
    let echo = Echo::plain("upstream");
    let port = free_port();
    write_gateway(
        dir.path(),
        port,
        free_port(),
        &mapping("svc", "/svc/", &format!("127.0.0.1:{}", echo.port())),
    );
    let mut old = Gateway::start(dir.path());
    let load = Load::start(port, "/svc/", 8);
    wait_for("load", Duration::from_secs(5), || load.ok() > 100);

    // The new process first, then SIGQUIT to the old one within ~5 s: each
    // side waits for the other only that long.
    let mut new = Gateway::spawn(dir.path(), &["-u"], "new.log");
    thread::sleep(Duration::from_millis(500));
    let status = std::process::Command::new("kill")
        .args(["-QUIT", &old.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    new.wait_ready(Duration::from_secs(20));

    // The old process keeps serving for Pingora's 5 s close timeout, then
    // exits; the load runs through all of it.
    wait_for("the old process to exit", Duration::from_secs(30), || {
        old.try_wait().is_some()
    });
    let served_before = load.ok();
    wait_for("the new process to serve", Duration::from_secs(5), || {
        load.ok() > served_before + 100
    });
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}\nold:\n{}\nnew:\n{}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)],
        old.log(),
        new.log()
    );
    assert!(old.log().contains("draining"), "{}", old.log());
}
