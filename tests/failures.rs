//! What the gateway answers when things go wrong, through the real binary:
//! unmatched requests, unreachable and misbehaving upstreams, timeouts, bad
//! resources, a taken port, the admin listener, and unusable gateway files.
//! Each failure must come with a status a client can act on, a body naming
//! the cause, and (for upstream failures) a log line naming the Mapping.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// A plain Mapping `name` (namespace `default`) on every Host.
fn mapping(name: &str, prefix: &str, service: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n  \
         namespace: default\nspec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {service}\n{extra}"
    )
}

/// Writes the gateway with `resources` and starts it; returns the listener
/// port with the guard.
fn start(dir: &Path, resources: &str) -> (Gateway, u16) {
    let port = free_port();
    write_gateway(dir, port, free_port(), resources);
    (Gateway::start(dir), port)
}

/// A port nothing listens on, reserved while the guard lives: the socket is
/// bound but never listens, so connections are refused and no other test
/// can take the port meanwhile.
fn closed_port() -> (socket2::Socket, u16) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    socket.bind(&addr.into()).expect("bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("bound port");
    (socket, port)
}

/// Waits (5 s) for a gateway.log line containing every one of `parts`.
fn log_line(gw: &Gateway, parts: &[&str]) -> Option<String> {
    let mut found = None;
    let _ = poll_until(Duration::from_secs(5), || {
        found = gw
            .log()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string);
        found.is_some()
    });
    found
}

#[test]
fn unmatched_request_is_404_naming_method_host_and_path() {
    let dir = tempdir();
    let echo = Echo::plain("quote");
    let (_gw, port) = start(
        dir.path(),
        &mapping(
            "quote",
            "/quote/",
            &format!("127.0.0.1:{}", echo.port()),
            "",
        ),
    );

    let r = Request::new("DELETE", "/nothing/here?x=1")
        .header("Host", "shop.example.com")
        .send(port);
    assert_eq!(r.status, 404, "{}", r.text());
    let body = r.text();
    for part in ["DELETE", "shop.example.com", "/nothing/here"] {
        assert!(
            body.contains(part),
            "404 body should name {part:?}: {body:?}"
        );
    }
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; charset=utf-8"),
        "{:?}",
        r.headers
    );

    // The route next door still works.
    assert_eq!(
        request(port, "GET", "/quote/", &[]).echo().server(),
        "quote"
    );
}

#[test]
fn unreachable_upstream_is_503_with_cause_and_log_line() {
    let dir = tempdir();
    let (_reserved, dead) = closed_port();
    let (gw, port) = start(
        dir.path(),
        &mapping("dead-service", "/dead/", &format!("127.0.0.1:{dead}"), ""),
    );

    let r = request(port, "GET", "/dead/x", &[]);
    assert_eq!(r.status, 503, "{}\n{}", r.text(), gw.log());
    let body = r.text();
    assert!(
        body.contains("unreachable") || body.contains("connect"),
        "503 body should name the cause: {body:?}"
    );
    let line = log_line(&gw, &["mapping dead-service.default", "503"]);
    assert!(
        line.is_some(),
        "no log line names the Mapping:\n{}",
        gw.log()
    );
}

#[test]
fn upstream_tls_failure_is_502() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let rogue = Pki::new_named(&dir.path().join("pki"), "rogue");
    let server = pki.issue_server("localhost", &["localhost", "127.0.0.1"]);
    let echo = Echo::tls("secure", &server);

    let quote = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("quote path");
    let context = |name: &str, ca: &Path| {
        format!(
            "---\napiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  \
             name: {name}\n  namespace: default\nspec:\n  hosts: []\n  cacert_chain_file: {}\n",
            quote(ca)
        )
    };
    let service = format!("https://localhost:{}", echo.port());
    let resources = [
        context("right-ca", pki.ca_pem_path()),
        context("wrong-ca", rogue.ca_pem_path()),
        mapping("right", "/right/", &service, "  tls: right-ca\n"),
        mapping("wrong", "/wrong/", &service, "  tls: wrong-ca\n"),
    ]
    .concat();
    let (gw, port) = start(dir.path(), &resources);

    // Control: the CA that issued the upstream's certificate verifies it.
    let r = request(port, "GET", "/right/x", &[]);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    assert_eq!(r.echo().sni().as_deref(), Some("localhost"));

    let r = request(port, "GET", "/wrong/x", &[]);
    assert_eq!(r.status, 502, "{}\n{}", r.text(), gw.log());
    let body = r.text();
    assert!(body.contains("TLS"), "502 body should name TLS: {body:?}");
    let line = log_line(&gw, &["mapping wrong.default", "502"]);
    assert!(
        line.is_some(),
        "no log line names the Mapping:\n{}",
        gw.log()
    );
}

#[test]
fn timeout_is_504_within_about_a_second() {
    let dir = tempdir();
    let echo = Echo::plain("slow");
    let (gw, port) = start(
        dir.path(),
        &mapping(
            "slow",
            "/slow/",
            &format!("127.0.0.1:{}", echo.port()),
            "  timeout_ms: 300\n",
        ),
    );

    let started = Instant::now();
    let r = request(port, "GET", "/slow/x", &[("x-echo-delay-ms", "2000")]);
    let elapsed = started.elapsed();
    assert_eq!(r.status, 504, "{}\n{}", r.text(), gw.log());
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(1200),
        "504 after {elapsed:?}, expected about 300 ms"
    );
    let body = r.text();
    assert!(
        body.contains("timeout"),
        "504 body should name the cause: {body:?}"
    );
    assert!(
        log_line(&gw, &["mapping slow.default", "504"]).is_some(),
        "no log line names the Mapping:\n{}",
        gw.log()
    );

    // A fast answer on the same Mapping is unaffected.
    assert_eq!(request(port, "GET", "/slow/y", &[]).status, 200);
}

/// An upstream that answers every request with a valid response written one
/// byte every 100 ms (about 4 s in all): each read sees data well within
/// 300 ms, the whole response does not.
/// An upstream that answers every request by writing `head` at once and then
/// `body` one byte every 100 ms.
fn trickling_upstream(head: &'static [u8], body: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local_addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut byte = [0u8; 1];
                while !request.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => request.push(byte[0]),
                        _ => return,
                    }
                }
                if stream.write_all(head).is_err() {
                    return;
                }
                for b in body {
                    std::thread::sleep(Duration::from_millis(100));
                    if stream.write_all(&[*b]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Emissary's `timeout_ms` is Envoy's route timeout: it bounds the whole
/// exchange, not each read
/// (<https://www.getambassador.io/docs/emissary/latest/topics/using/timeouts>).
/// A body that trickles past the deadline is cut there, as Envoy resets the
/// stream.
#[test]
fn timeout_cuts_a_trickling_body_at_the_deadline() {
    let dir = tempdir();
    let upstream = trickling_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n",
        b"0123456789012345678901234567890123456789",
    );
    let (gw, port) = start(
        dir.path(),
        &mapping(
            "trickle",
            "/trickle/",
            &format!("127.0.0.1:{upstream}"),
            "  timeout_ms: 300\n",
        ),
    );

    let started = Instant::now();
    let outcome = Request::get("/trickle/x").try_send(port);
    let elapsed = started.elapsed();
    assert!(
        outcome.is_err(),
        "the whole body arrived after {elapsed:?}: {outcome:?}\n{}",
        gw.log()
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "cut only after {elapsed:?}"
    );
}

/// A response head that trickles in is judged when it is complete: Pingora
/// reads the head with a per-read timeout, so the 504 comes late, but it
/// comes (see README, "Differences from Emissary").
#[test]
fn a_trickling_response_head_past_the_deadline_is_504() {
    let dir = tempdir();
    let upstream = trickling_upstream(b"", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let (gw, port) = start(
        dir.path(),
        &mapping(
            "trickle",
            "/trickle/",
            &format!("127.0.0.1:{upstream}"),
            "  timeout_ms: 300\n",
        ),
    );
    let r = request(port, "GET", "/trickle/x", &[]);
    assert_eq!(r.status, 504, "{}\n{}", r.text(), gw.log());
}

#[test]
fn timeout_ms_zero_disables_the_timeout() {
    let dir = tempdir();
    let echo = Echo::plain("patient");
    let service = format!("127.0.0.1:{}", echo.port());
    // The Module makes 300 ms the default, so a short delay tells "disabled"
    // apart from "the 3 s default".
    let module = "---\napiVersion: getambassador.io/v3alpha1\nkind: Module\nmetadata:\n  \
                  name: ambassador\n  namespace: default\nspec:\n  config:\n    \
                  cluster_request_timeout_ms: 300\n";
    let resources = [
        module.to_string(),
        mapping("unbounded", "/unbounded/", &service, "  timeout_ms: 0\n"),
        mapping("bounded", "/bounded/", &service, ""),
    ]
    .concat();
    let (gw, port) = start(dir.path(), &resources);

    let r = request(port, "GET", "/unbounded/x", &[("x-echo-delay-ms", "800")]);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    assert_eq!(r.echo().server(), "patient");

    // Control: the Module default applies where timeout_ms is not set.
    let r = request(port, "GET", "/bounded/x", &[("x-echo-delay-ms", "800")]);
    assert_eq!(r.status, 504, "{}\n{}", r.text(), gw.log());
}

#[test]
fn a_bad_resource_is_dropped_alone() {
    let dir = tempdir();
    let echo = Echo::plain("good");
    let resources = [
        mapping("broken", "/broken/", "quote:80x", ""),
        mapping("good", "/good/", &format!("127.0.0.1:{}", echo.port()), ""),
    ]
    .concat();
    let (gw, port) = start(dir.path(), &resources);

    let r = request(port, "GET", "/good/x", &[]);
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.log());
    assert_eq!(r.echo().server(), "good");
    let r = request(port, "GET", "/broken/x", &[]);
    assert_eq!(r.status, 404, "{}", r.text());

    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("Mapping default/broken") && l.contains("spec.service")),
        "the dropped Mapping should be logged with its field:\n{log}"
    );
}

#[test]
fn a_taken_listener_port_fails_fast_naming_the_port() {
    // Another server holding the port on every address, or on loopback only:
    // both collide with the gateway's 0.0.0.0 listener.
    for holder_addr in ["0.0.0.0:0", "127.0.0.1:0"] {
        let dir = tempdir();
        let holder = TcpListener::bind(holder_addr).expect("bind holder");
        let taken = holder.local_addr().expect("local_addr").port();
        write_gateway(dir.path(), taken, free_port(), "");
        let config = dir.path().join("gateway.yaml");

        let (out, elapsed) = run_pingress(
            &["-c".as_ref(), config.as_os_str()],
            Duration::from_secs(15),
        );
        assert!(
            out.code > 0,
            "{holder_addr}: pingress should exit with an error, got {} after {elapsed:?}:\n{}",
            out.code,
            out.combined()
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "{holder_addr}: took {elapsed:?} to fail"
        );
        assert!(
            out.stderr.contains(&format!(":{taken}")),
            "{holder_addr}: the message should name port {taken}:\n{}",
            out.combined()
        );
        drop(holder);
    }
}

#[test]
fn a_taken_admin_port_fails_fast_naming_it() {
    let dir = tempdir();
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let taken = holder.local_addr().expect("local_addr").port();
    write_gateway(dir.path(), free_port(), taken, "");
    let config = dir.path().join("gateway.yaml");

    let (out, elapsed) = run_pingress(
        &["-c".as_ref(), config.as_os_str()],
        Duration::from_secs(15),
    );
    assert!(out.code > 0, "exit {}:\n{}", out.code, out.combined());
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?} to fail");
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{taken}")) && out.stderr.contains("admin"),
        "the message should name the admin address:\n{}",
        out.combined()
    );
    drop(holder);
}

#[test]
fn admin_endpoints() {
    let dir = tempdir();
    let (gw, port) = start(dir.path(), "");
    // Gateway::start returned, so check_ready said 200 once the listener
    // accepted connections.
    assert!(port_open(port));

    let alive = gw.admin_get("/ambassador/v0/check_alive");
    assert_eq!(alive.status, 200, "{}", alive.text());
    assert!(!alive.text().is_empty());
    let ready = gw.admin_get("/ambassador/v0/check_ready");
    assert_eq!(ready.status, 200, "{}", ready.text());

    for path in [
        "/ambassador/v0/nope",
        "/",
        "/ambassador/v0/check_alive/extra",
    ] {
        let r = gw.admin_get(path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
}

#[test]
fn check_on_a_missing_gateway_file_exits_2() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-gateway.yaml");
    let (out, _) = run_pingress(
        &["-t".as_ref(), "-c".as_ref(), missing.as_os_str()],
        Duration::from_secs(10),
    );
    assert_eq!(out.code, 2, "{}", out.combined());
    let text = out.combined();
    assert!(
        text.contains(&*missing.to_string_lossy()),
        "the message should name the file:\n{text}"
    );
    assert!(
        text.contains("cannot read the gateway file"),
        "the message should say what is wrong:\n{text}"
    );
}

#[test]
fn running_on_a_missing_gateway_file_fails_clearly() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-gateway.yaml");
    let (out, elapsed) = run_pingress(
        &["-c".as_ref(), missing.as_os_str()],
        Duration::from_secs(10),
    );
    assert!(
        out.code > 0,
        "exit {} after {elapsed:?}:\n{}",
        out.code,
        out.combined()
    );
    assert!(
        out.stderr.contains(&*missing.to_string_lossy()),
        "{}",
        out.combined()
    );
}

#[test]
fn an_unknown_gateway_file_key_is_rejected_by_name() {
    let dir = tempdir();
    write_gateway(dir.path(), free_port(), free_port(), "");
    let config = dir.path().join("gateway.yaml");
    // `resource:` for `resources:`, a plausible slip.
    let text = fs::read_to_string(&config).expect("read gateway.yaml");
    fs::write(&config, text.replace("resources:", "resource:")).expect("write gateway.yaml");

    let (out, _) = run_pingress(
        &["-t".as_ref(), "-c".as_ref(), config.as_os_str()],
        Duration::from_secs(10),
    );
    assert_eq!(out.code, 2, "{}", out.combined());
    assert!(
        out.stdout.contains("resource") && out.stdout.contains("unknown field"),
        "the message should name the key:\n{}",
        out.combined()
    );

    // Serving refuses it too, instead of running with no resources.
    let (out, elapsed) = run_pingress(
        &["-c".as_ref(), config.as_os_str()],
        Duration::from_secs(10),
    );
    assert!(
        out.code > 0,
        "exit {} after {elapsed:?}:\n{}",
        out.code,
        out.combined()
    );
    assert!(out.stderr.contains("`resource`"), "{}", out.combined());
}
