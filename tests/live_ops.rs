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

    // A broken edit keeps the old routes serving and is reported.
    replace(&routes, "kind: [unclosed\n");
    wait_for("the fallback to be logged", Duration::from_secs(5), || {
        gateway
            .log()
            .contains("keep serving their last good version")
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

/// Publishes files the way Kubernetes mounts a Secret volume: the real
/// files live in a `..<version>` directory, `..data` links to it, and the
/// visible names link through `..data`. An update writes a new version
/// directory and swaps `..data` with a rename.
struct SecretVolume {
    dir: std::path::PathBuf,
    version: usize,
}

impl SecretVolume {
    fn new(dir: &Path, files: &[(&str, &str)]) -> SecretVolume {
        fs::create_dir_all(dir).unwrap();
        let mut volume = SecretVolume {
            dir: dir.to_path_buf(),
            version: 0,
        };
        volume.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        volume
    }

    fn publish(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        fs::create_dir(self.dir.join(&version)).unwrap();
        for (name, content) in files {
            fs::write(self.dir.join(&version).join(name), content).unwrap();
        }
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        fs::rename(&staged, self.dir.join("..data")).unwrap();
    }
}

#[test]
fn certificates_rotate_without_restart_or_failed_requests() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let upstream_cert = pki.issue_server("localhost", &["localhost"]);
    let upstream = Echo::mtls("mtls", &upstream_cert, pki.ca_pem_path(), true);
    let client_v1 = pki.issue_client("gateway-v1");
    let client_v2 = pki.issue_client("gateway-v2");
    let edge_v1 = pki.issue_server("gw.example", &["gw.example"]);
    let edge_v2 = pki.issue_server("gw.example", &["gw.example"]);

    // The upstream client certificate comes from a Secret volume, the edge
    // certificate from a Secret manifest among the resources.
    let certs = dir.path().join("certs");
    let mut volume = SecretVolume::new(
        &certs,
        &[
            ("tls.crt", &client_v1.cert_pem),
            ("tls.key", &client_v1.key_pem),
        ],
    );
    let port = free_port();
    let https = free_port();
    let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
    let resources = format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Listener\nmetadata:\n  name: https\n\
         spec:\n  port: {https}\n  protocol: HTTPS\n  securityModel: XFP\n  hostBinding:\n    \
         namespace:\n      from: ALL\n\
         ---\napiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: gw\n\
         spec:\n  hostname: gw.example\n  tlsSecret:\n    name: gw-cert\n  requestPolicy:\n    \
         insecure:\n      action: Route\n\
         ---\napiVersion: getambassador.io/v3alpha1\nkind: Host\nmetadata:\n  name: any\n\
         spec:\n  hostname: \"*\"\n  requestPolicy:\n    insecure:\n      action: Route\n\
         ---\napiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: upstream\n\
         spec:\n  hosts: []\n  cert_chain_file: {}\n  private_key_file: {}\n{}",
        quote(&certs.join("tls.crt")),
        quote(&certs.join("tls.key")),
        mapping("up", "/up/", &format!("https://localhost:{}", upstream.port()))
            + "  tls: upstream\n",
    );
    write_gateway(dir.path(), port, free_port(), &resources);
    let edge_secret = dir.path().join("resources").join("edge-secret.yaml");
    fs::write(&edge_secret, tls_secret("gw-cert", "default", &edge_v1)).unwrap();
    let _gateway = Gateway::start(dir.path());
    let subject = || Request::get("/up/").send(port).echo().client_cert_subject();
    assert_eq!(subject(), Some(client_v1.subject()));
    let tls = TlsOpts::new(pki.ca_pem_path(), "gw.example");
    let edge_serial = || {
        let (_, cert) = Request::get("/up/").try_send_tls_peer(https, &tls).unwrap();
        cert.serial_number()
            .to_bn()
            .unwrap()
            .to_hex_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(edge_serial(), edge_v1.serial_hex);

    let load = Load::start(port, "/up/", 4);
    wait_for("load", Duration::from_secs(5), || load.ok() > 100);

    // Kubernetes-style swap of the mounted client certificate.
    volume.publish(&[
        ("tls.crt", &client_v2.cert_pem),
        ("tls.key", &client_v2.key_pem),
    ]);
    wait_for(
        "the upstream to see the new client certificate",
        Duration::from_secs(5),
        || subject() == Some(client_v2.subject()),
    );
    // A rewritten Secret manifest: the next handshake gets the new certificate.
    replace(&edge_secret, &tls_secret("gw-cert", "default", &edge_v2));
    wait_for(
        "clients to see the new server certificate",
        Duration::from_secs(5),
        || edge_serial() == edge_v2.serial_hex,
    );

    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(5)]
    );
}

/// An HTTP/2 (h2c) client sending requests one after another on one
/// connection, opening a new connection only when the server has said
/// GOAWAY (requests it never took are sent again, as HTTP/2 allows).
/// Returns the statuses and the failures.
async fn h2_client(port: u16, stop: Arc<AtomicBool>) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut failures = Vec::new();
    let mut connection: Option<h2::client::SendRequest<bytes::Bytes>> = None;
    while !stop.load(Ordering::Relaxed) {
        let sender = match connection.take() {
            Some(sender) => sender,
            None => {
                let tcp = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        failures.push(format!("connect: {e}"));
                        continue;
                    }
                };
                let (sender, driver) = h2::client::handshake(tcp).await.unwrap();
                tokio::spawn(driver);
                sender
            }
        };
        // `ready` fails once the server sent GOAWAY: nothing was sent, so
        // reconnecting is what every HTTP/2 client does.
        let mut sender = match sender.ready().await {
            Ok(sender) => sender,
            Err(e) if e.is_go_away() || e.is_io() => continue,
            Err(e) => {
                failures.push(format!("ready: {e}"));
                continue;
            }
        };
        let request = http::Request::get(format!("http://127.0.0.1:{port}/svc/h2"))
            .body(())
            .unwrap();
        let response = match sender.send_request(request, true) {
            Ok((response, _)) => response.await,
            Err(e) => Err(e),
        };
        match response {
            Ok(response) if response.status() == 200 => {
                let mut body = response.into_body();
                while let Some(chunk) = body.data().await {
                    if let Err(e) = chunk {
                        failures.push(format!("body: {e}"));
                        break;
                    }
                }
                ok += 1;
                connection = Some(sender);
            }
            Ok(response) => failures.push(format!("status {}", response.status())),
            // A stream the server refused before processing is safe to retry.
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away() => {}
            Err(e) => failures.push(format!("request: {e}")),
        }
    }
    (ok, failures)
}

/// HTTP/2 clients across an upgrade: the old process keeps serving its
/// HTTP/2 connections and sends GOAWAY when its shutdown starts, so clients
/// move to a new connection without losing a request.
#[test]
fn graceful_upgrade_keeps_http2_clients_whole() {
    let dir = tempdir();
    let echo = Echo::plain("upstream");
    let port = free_port();
    write_gateway(
        dir.path(),
        port,
        free_port(),
        &mapping("svc", "/svc/", &format!("127.0.0.1:{}", echo.port())),
    );
    // HTTP/2 streams in flight when GOAWAY goes out finish within the grace
    // period: give them one, as any production configuration does.
    let gateway_file = dir.path().join("gateway.yaml");
    let conf = fs::read_to_string(&gateway_file).unwrap();
    fs::write(
        &gateway_file,
        conf.replace("grace_period_seconds: 0", "grace_period_seconds: 2"),
    )
    .unwrap();
    let mut old = Gateway::start(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<_> = (0..4)
        .map(|_| runtime.spawn(h2_client(port, stop.clone())))
        .collect();
    thread::sleep(Duration::from_millis(500));

    let mut new = Gateway::spawn(dir.path(), &["-u"], "new.log");
    thread::sleep(Duration::from_millis(300));
    let status = std::process::Command::new("kill")
        .args(["-QUIT", &old.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    new.wait_ready(Duration::from_secs(20));
    wait_for("the old process to exit", Duration::from_secs(30), || {
        old.try_wait().is_some()
    });
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);

    let (mut ok, mut failures) = (0, Vec::new());
    for client in clients {
        let (served, failed) = runtime.block_on(client).unwrap();
        ok += served;
        failures.extend(failed);
    }
    assert!(
        failures.is_empty(),
        "{} HTTP/2 requests failed ({ok} served): {:?}\nold:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        old.log()
    );
    assert!(ok > 1000, "only {ok} HTTP/2 requests");
}
