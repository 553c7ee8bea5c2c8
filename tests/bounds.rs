//! What a client can make the gateway hold, through the real binary: how
//! long it waits for a request head and between requests, how large a head
//! may grow, and how many connections it keeps open.
//!
//! Each test is an attack that worked before these bounds: a head sent one
//! byte at a time (Pingora's timeout is per read), a kept-alive connection
//! that never sends again, 150 connections each sending a megabyte of
//! header lines that never end, and more connections than the pod can hold.

#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A gateway routing everything to an echo upstream, with `downstream`
/// (block YAML under the gateway file's `downstream:`) and a Module with
/// `module_config` when it is not empty.
fn start(downstream: &str, module_config: &str) -> (TempDir, Gateway, u16, Echo) {
    let echo = Echo::plain("up");
    let dir = tempdir();
    let port = free_port();
    let mut resources = mapping("up", "", "/", &echo, "hostname: \"*\"");
    if !module_config.is_empty() {
        resources.push_str(&module(module_config));
    }
    write_gateway_with_listener(dir.path(), port, free_port(), "", &resources);
    add_downstream(dir.path(), downstream);
    let gateway = Gateway::start(dir.path());
    (dir, gateway, port, echo)
}

/// Adds `downstream` (block YAML) to the gateway file under `dir`.
fn add_downstream(dir: &std::path::Path, downstream: &str) {
    if downstream.is_empty() {
        return;
    }
    let path = dir.join("gateway.yaml");
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&format!("downstream:\n{}", indent(downstream, 2)));
    fs::write(&path, text).unwrap();
}

fn open(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream
}

/// Everything the gateway sends until it closes the connection, and when
/// it closed, counted from `since`. Panics if it is still open after 15 s.
fn until_closed(stream: &mut TcpStream, since: Instant) -> (String, Duration) {
    let (bytes, after) = bytes_until_closed(stream, since);
    (String::from_utf8_lossy(&bytes).into_owned(), after)
}

fn bytes_until_closed(stream: &mut impl Read, since: Instant) -> (Vec<u8>, Duration) {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "still open after {:?} ({e}); read so far: {}",
                since.elapsed(),
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    (bytes, since.elapsed())
}

/// Reads one response with a `Content-Length` off a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&bytes);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                return text.into_owned();
            }
        }
    }
}

fn get_with(header_bytes: usize) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Fill: {}\r\nConnection: close\r\n\r\n",
        "f".repeat(header_bytes)
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------

#[test]
fn a_head_must_arrive_whole_within_the_deadline() {
    let (_dir, gateway, port, _echo) = start("request_head_timeout_ms: 1000", "");

    // Half a head, then silence: 408 at the deadline.
    let started = Instant::now();
    let mut half = open(port);
    half.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
    let (reply, after) = until_closed(&mut half, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    // A byte every 200 ms never lets a per-read timeout fire; the
    // deadline counts the whole head.
    let started = Instant::now();
    let mut slow = open(port);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .unwrap();
    let mut writer = slow.try_clone().unwrap();
    let trickle = thread::spawn(move || {
        for _ in 0..40 {
            thread::sleep(Duration::from_millis(200));
            if writer.write_all(b"s").is_err() {
                return;
            }
        }
    });
    let (reply, after) = until_closed(&mut slow, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(after < Duration::from_secs(4), "closed after {after:?}");
    trickle.join().unwrap();

    // A connection that never sends a byte is closed without a word:
    // browsers open spare connections and may never use them.
    let started = Instant::now();
    let mut silent = open(port);
    let (reply, after) = until_closed(&mut silent, started);
    assert_eq!(reply, "");
    assert!(after < Duration::from_secs(4), "closed after {after:?}");

    assert_eq!(
        gateway.metric_when(
            "pingress_downstream_connections_closed_total{reason=\"head_timeout\"}",
            |n| n >= 2.0
        ),
        Some(2.0)
    );
    // The gateway still serves.
    assert_eq!(request(port, "GET", "/", &[]).status, 200);
}

#[test]
fn a_kept_alive_connection_is_closed_after_listener_idle_timeout_ms() {
    let (_dir, _gateway, port, _echo) = start("", "listener_idle_timeout_ms: 1000");
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";

    // Requests every 400 ms keep the connection: the idle time starts
    // again after each.
    let mut busy = open(port);
    for _ in 0..5 {
        busy.write_all(request).unwrap();
        assert!(read_response(&mut busy).starts_with("HTTP/1.1 200"));
        thread::sleep(Duration::from_millis(400));
    }
    busy.write_all(request).unwrap();
    assert!(read_response(&mut busy).starts_with("HTTP/1.1 200"));

    // Then silence: closed after the idle timeout, without a word.
    let started = Instant::now();
    let (rest, after) = until_closed(&mut busy, started);
    assert_eq!(rest, "");
    // The idle time starts when the gateway has answered, a little before
    // this client has read the answer.
    assert!(
        after >= Duration::from_millis(500) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
}

/// The body of a kept-alive connection's second request is not head: it
/// may be larger than the head limit and slower than the head deadline.
/// The second head is bounded like the first.
#[test]
fn later_requests_on_a_connection_are_bounded_like_the_first() {
    let (_dir, _gateway, port, _echo) =
        start("request_head_timeout_ms: 1000", "max_request_headers_kb: 8");
    let mut connection = open(port);
    connection
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert!(read_response(&mut connection).starts_with("HTTP/1.1 200"));

    let body = vec![b'b'; 64 * 1024];
    connection
        .write_all(
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    // Half the body, a pause longer than the head deadline, the rest.
    connection.write_all(&body[..body.len() / 2]).unwrap();
    thread::sleep(Duration::from_millis(1500));
    connection.write_all(&body[body.len() / 2..]).unwrap();
    let response = read_response(&mut connection);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"body_len\":65536"), "{response}");

    // A third head that does not come whole gets 408.
    let started = Instant::now();
    connection
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let (reply, _) = until_closed(&mut connection, started);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
}

/// Pingora peeks at the first 24 bytes of a cleartext connection for the
/// HTTP/2 preface and waited for all 24: a shorter request was never
/// answered.
#[test]
fn a_request_shorter_than_the_http2_preface_is_answered_at_once() {
    let (_dir, _gateway, port, _echo) = start("", "");
    let started = Instant::now();
    let mut short = open(port);
    short.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let (reply, after) = until_closed(&mut short, started);
    assert!(reply.starts_with("HTTP/1."), "{reply}");
    assert!(after < Duration::from_secs(3), "answered after {after:?}");
}

/// HTTP/2 is no way around the deadline: with ALPN h2 the preface is due
/// within the head deadline; a cleartext HTTP/2 connection that goes quiet
/// is closed after listener_idle_timeout_ms.
#[test]
fn http2_connections_are_bounded_too() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("a.example", &[]);
    let echo = Echo::plain("up");
    let (tls_port, plain_port) = (free_port(), free_port());
    let resources = [
        listener("https", tls_port, "HTTPS"),
        listener("http", plain_port, "HTTP"),
        tls_secret("a-cert", "default", &cert),
        doc(
            "TLSContext",
            "name: a-context",
            "hosts: [a.example]\nalpn_protocols: h2,http/1.1",
        ),
        host(
            "a",
            "a.example",
            &format!(
                "{}tlsContext:\n  name: a-context",
                tls_spec("a-cert", Some("Route"))
            ),
        ),
        mapping("up", "", "/", &echo, "hostname: \"*\""),
        module("listener_idle_timeout_ms: 1000"),
    ]
    .concat();
    write_gateway_without_listener(dir.path(), free_port(), &resources);
    add_downstream(dir.path(), "request_head_timeout_ms: 1000");
    let _gateway = Gateway::start(dir.path());

    let started = Instant::now();
    let opts = TlsOpts::new(pki.ca_pem_path(), "a.example").alpn(&["h2"]);
    let mut tls = tls_connect(tls_port, &opts).unwrap();
    assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
    // The server's SETTINGS come at once; then, without a preface from
    // the client, the end.
    let mut chunk = [0u8; 1024];
    while matches!(tls.read(&mut chunk), Ok(n) if n > 0) {
        assert!(started.elapsed() < Duration::from_secs(4), "still open");
    }
    let after = started.elapsed();
    assert!(after < Duration::from_secs(4), "closed after {after:?}");

    // The preface and the client's SETTINGS, then silence.
    let started = Instant::now();
    let mut h2c = open(plain_port);
    h2c.write_all(H2_PREFACE_AND_SETTINGS).unwrap();
    let (_, after) = until_closed(&mut h2c, started);
    assert!(after < Duration::from_secs(4), "closed after {after:?}");
}

// ---------------------------------------------------------------------------
// Size
// ---------------------------------------------------------------------------

#[test]
fn a_head_larger_than_max_request_headers_kb_gets_431() {
    let (_dir, gateway, port, _echo) = start("", "max_request_headers_kb: 8");
    let fits = send_raw(port, &get_with(7 * 1024)).unwrap();
    assert_eq!(fits.status, 200, "{}", fits.text());
    fits.echo_ok();

    let response = send_raw(port, &get_with(9 * 1024)).unwrap();
    assert_eq!(response.status, 431, "{}", response.text());
    assert!(response.text().contains("max_request_headers_kb"));
    assert_eq!(
        gateway.metric_when(
            "pingress_downstream_connections_closed_total{reason=\"head_too_large\"}",
            |n| n >= 1.0
        ),
        Some(1.0)
    );
}

/// The issue's figure: 150 connections that each send about a megabyte of
/// header lines and never end the head grew the gateway by ~200 MB, which
/// the allocator kept. Now each is cut at the head limit (60 KiB by
/// default) and answered 431, and other clients are served as usual.
#[test]
fn unfinished_heads_do_not_grow_memory_and_others_are_served() {
    let (_dir, gateway, port, _echo) = start("", "");
    for _ in 0..20 {
        assert_eq!(request(port, "GET", "/", &[]).status, 200);
    }
    let before = gateway.rss_kib();

    let attackers: Vec<_> = (0..150)
        .map(|i| {
            thread::spawn(move || {
                let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                // Fewer lines than Pingora's 256 headers, so only size can
                // stop them.
                let line = format!("X-Fill-{i}: {}\r\n", "a".repeat(8000));
                let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n");
                let mut sent = 0;
                while sent < 1_000_000 {
                    if stream.write_all(line.as_bytes()).is_err() {
                        break;
                    }
                    sent += line.len();
                }
                // Hold the connection, as an attacker would.
                thread::sleep(Duration::from_secs(3));
            })
        })
        .collect();

    let mut peak = before;
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while attackers.iter().any(|a| !a.is_finished()) && Instant::now() < deadline {
        peak = peak.max(gateway.rss_kib());
        let started = Instant::now();
        let response = Request::get("/").timeout(Duration::from_secs(5)).send(port);
        assert_eq!(response.status, 200, "{}", response.text());
        latencies.push(started.elapsed());
        thread::sleep(Duration::from_millis(50));
    }
    for attacker in attackers {
        attacker.join().unwrap();
    }
    peak = peak.max(gateway.rss_kib());

    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("RSS {before} KiB before, {peak} KiB at the peak");
    assert!(grown_mib < 64, "the gateway grew by {grown_mib} MiB");
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(!latencies.is_empty());
    assert!(
        median < Duration::from_millis(100)
            && latencies[latencies.len() - 1] < Duration::from_secs(2),
        "latencies under attack: {latencies:?}"
    );
}

// ---------------------------------------------------------------------------
// Connection caps
// ---------------------------------------------------------------------------

/// Whether the gateway closed a fresh connection at once.
fn refused_at_once(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        _ => false,
    }
}

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    // Held connections must outlive the test, not the head deadline.
    let (_dir, gateway, port, _echo) =
        start("max_connections: 3\nrequest_head_timeout_ms: 60000", "");
    let held: Vec<TcpStream> = (0..3).map(|_| open(port)).collect();
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(3.0)
    }));
    let mut extra = open(port);
    assert!(refused_at_once(&mut extra), "a fourth connection was kept");
    assert_eq!(
        gateway.metric("pingress_downstream_connections_refused_total{cap=\"max_connections\"}"),
        Some(1.0)
    );

    // A place given back is a place for the next client.
    drop(held);
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(0.0)
    }));
    assert_eq!(request(port, "GET", "/", &[]).status, 200);
}

#[test]
fn one_client_address_holds_at_most_max_connections_per_client() {
    let (_dir, gateway, port, _echo) = start(
        "max_connections_per_client: 2\nrequest_head_timeout_ms: 60000",
        "",
    );
    let _held: Vec<TcpStream> = (0..2).map(|_| open(port)).collect();
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(2.0)
    }));
    let mut third = open(port);
    assert!(refused_at_once(&mut third), "a third connection was kept");
    assert_eq!(
        gateway.metric(
            "pingress_downstream_connections_refused_total{cap=\"max_connections_per_client\"}"
        ),
        Some(1.0)
    );
    // Another address is another client.
    let other = Request::get("/").source_ip("127.0.0.2").send(port);
    assert_eq!(other.status, 200, "{}", other.text());
}

/// At the cap, kept-alive connections that wait for a next request give
/// their places up, as nginx reuses idle connections when it runs out, so
/// idle clients cannot lock new ones out.
#[test]
fn idle_connections_give_their_places_up_at_the_cap() {
    let (_dir, gateway, port, _echo) = start("max_connections: 2", "");
    let mut idle: Vec<TcpStream> = (0..2).map(|_| open(port)).collect();
    for connection in &mut idle {
        connection
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        assert!(read_response(connection).starts_with("HTTP/1.1 200"));
    }
    let mut refused = open(port);
    assert!(refused_at_once(&mut refused), "a third connection was kept");
    // Within a pressure check or two, the idle ones close...
    let started = Instant::now();
    for connection in &mut idle {
        let (rest, _) = until_closed(connection, started);
        assert_eq!(rest, "");
    }
    // ...and a new client is served.
    let response = Request::get("/").send(port);
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(gateway
        .metric("pingress_downstream_connections_refused_total{cap=\"max_connections\"}")
        .is_some_and(|n| n >= 1.0));
}

// ---------------------------------------------------------------------------
// Client values the gateway keeps or logs
// ---------------------------------------------------------------------------

/// The access line of the request whose path holds `marker`.
fn access_line(gateway: &Gateway, marker: &str) -> String {
    let mut line = None;
    let _ = poll_until(Duration::from_secs(5), || {
        line = gateway
            .log()
            .lines()
            .find(|l| l.contains(marker))
            .map(str::to_string);
        line.is_some()
    });
    line.unwrap_or_else(|| panic!("no access line with {marker}:\n{}", gateway.log()))
}

/// A client cannot forge fields of the text access log with quotes and
/// backslashes, nor make a line as long as its request.
#[test]
fn the_access_log_escapes_and_bounds_what_clients_send() {
    let (_dir, gateway, port, _echo) = start("", "preserve_external_request_id: true");
    // Pingora refuses a quote in the target, and the edge a backslash; a
    // header value may hold both.
    let response = Request::get("/forge")
        .header("x-request-id", "id\" 200 1 0.1ms upstream=evil \\")
        .send(port);
    assert_eq!(response.status, 200, "{}", response.text());
    let line = access_line(&gateway, "/forge");
    assert!(
        line.contains(r#"request_id="id\" 200 1 0.1ms upstream=evil \\""#),
        "{line}"
    );
    assert_eq!(line.matches("upstream=").count(), 2, "{line}");

    let long = format!("/long-{}", "p".repeat(16 * 1024));
    let response = Request::get(&long).send(port);
    assert_eq!(response.status, 200);
    let line = access_line(&gateway, "/long-");
    assert!(line.len() < 4096, "a {}-byte access line", line.len());
}

/// An external request ID is kept only if it looks like one: bounded and
/// printable. Anything else is replaced, as if none had come.
#[test]
fn a_preserved_request_id_is_bounded() {
    let (_dir, _gateway, port, _echo) = start("", "preserve_external_request_id: true");
    let kept = request(port, "GET", "/", &[("x-request-id", "abc-123")]).echo_ok();
    assert_eq!(kept.header("x-request-id").as_deref(), Some("abc-123"));
    let huge = "i".repeat(8 * 1024);
    let replaced = request(port, "GET", "/", &[("x-request-id", &huge)]).echo_ok();
    let id = replaced.header("x-request-id").unwrap_or_default();
    assert_eq!(id.len(), 36, "an ID of {} bytes", id.len());
}

// ---------------------------------------------------------------------------
// Route deadlines
// ---------------------------------------------------------------------------

/// A request that waits for a circuit-breaker place waits no longer than
/// its route timeout, then gets 503, as Envoy answers an overflow.
#[test]
fn a_wait_for_a_breaker_place_ends_at_the_route_timeout() {
    let echo = Echo::plain("up");
    let dir = tempdir();
    let port = free_port();
    // Two Mappings of one cluster (and breaker), with different timeouts.
    let breaker = "circuit_breakers:\n- max_connections: 1\n  max_pending_requests: 5";
    let resources = [
        mapping(
            "slow",
            "",
            "/slow/",
            &echo,
            &format!("hostname: \"*\"\ntimeout_ms: 10000\n{breaker}"),
        ),
        mapping(
            "quick",
            "",
            "/quick/",
            &echo,
            &format!("hostname: \"*\"\ntimeout_ms: 1000\n{breaker}"),
        ),
    ]
    .concat();
    write_gateway_with_listener(dir.path(), port, free_port(), "", &resources);
    let _gateway = Gateway::start(dir.path());

    let holder = thread::spawn(move || {
        Request::get("/slow/")
            .header("x-echo-delay-ms", "4000")
            .timeout(Duration::from_secs(10))
            .send(port)
            .status
    });
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let waiting = Request::get("/quick/")
        .timeout(Duration::from_secs(10))
        .send(port);
    let waited = started.elapsed();
    assert_eq!(waiting.status, 503, "{}", waiting.text());
    assert_eq!(waiting.header("x-envoy-overloaded"), Some("true"));
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_millis(2500),
        "answered after {waited:?}"
    );
    assert_eq!(holder.join().unwrap(), 200);
}

/// The route timeout starts when the request body is complete, as Envoy's
/// does: a slow upload is not cut by a deadline that began before it.
#[test]
fn the_route_timeout_starts_when_the_body_is_complete() {
    let echo = Echo::plain("up");
    let dir = tempdir();
    let port = free_port();
    let resources = mapping("up", "", "/", &echo, "hostname: \"*\"\ntimeout_ms: 1000");
    write_gateway_with_listener(dir.path(), port, free_port(), "", &resources);
    let _gateway = Gateway::start(dir.path());

    // Two seconds of upload, a chunk every quarter second.
    let mut connection = open(port);
    connection
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n")
        .unwrap();
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(250));
        connection.write_all(b"u").unwrap();
    }
    let response = read_response(&mut connection);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // Once the body is in, the upstream still has the route timeout.
    let started = Instant::now();
    let late = Request::post("/late", "body")
        .header("x-echo-delay-ms", "3000")
        .timeout(Duration::from_secs(10))
        .send(port);
    assert_eq!(late.status, 504, "{}", late.text());
    assert!(started.elapsed() < Duration::from_millis(2500));
}

// ---------------------------------------------------------------------------
// Established connections follow policy changes
// ---------------------------------------------------------------------------

/// A gateway with an HTTPS Host for `tls.example` whose linked TLSContext
/// has `context_extra`; returns what a reload needs to change it.
struct TlsGateway {
    dir: TempDir,
    pki: Pki,
    server: CertFiles,
    echo: Echo,
    port: u16,
    gateway: Gateway,
}

impl TlsGateway {
    fn start(downstream: &str, context_extra: &str, extra_docs: &[String]) -> TlsGateway {
        let dir = tempdir();
        let pki = Pki::new(&dir.path().join("pki"));
        let server = pki.issue_server("tls.example", &[]);
        let echo = Echo::plain("up");
        let port = free_port();
        let docs = Self::docs(port, &pki, &server, &echo, context_extra, extra_docs);
        write_gateway_without_listener(dir.path(), free_port(), &docs);
        add_downstream(dir.path(), downstream);
        let gateway = Gateway::start(dir.path());
        TlsGateway {
            dir,
            pki,
            server,
            echo,
            port,
            gateway,
        }
    }

    fn docs(
        port: u16,
        pki: &Pki,
        server: &CertFiles,
        echo: &Echo,
        context_extra: &str,
        extra_docs: &[String],
    ) -> String {
        let mut docs = vec![
            listener("https", port, "HTTPS"),
            tls_secret("server", "default", server),
            ca_secret("client-ca", "default", pki.ca_pem()),
            doc(
                "TLSContext",
                "name: ctx",
                &format!("hosts: [tls.example]\n{context_extra}"),
            ),
            host(
                "tls",
                "tls.example",
                &format!("{}tlsContext:\n  name: ctx", tls_spec("server", None)),
            ),
            mapping("up", "", "/", echo, "hostname: \"*\""),
        ];
        docs.extend(extra_docs.iter().cloned());
        docs.concat()
    }

    /// Rewrites the resources with another TLSContext and waits for the
    /// reload.
    fn reload(&self, context_extra: &str, extra_docs: &[String]) {
        let before = self
            .gateway
            .metric("pingress_config_generation")
            .unwrap_or(0.0);
        let docs = Self::docs(
            self.port,
            &self.pki,
            &self.server,
            &self.echo,
            context_extra,
            extra_docs,
        );
        let path = self.dir.path().join("resources").join("test.yaml");
        let next = path.with_extension("next");
        fs::write(&next, docs).unwrap();
        fs::rename(&next, &path).unwrap();
        assert!(
            poll_until(Duration::from_secs(10), || {
                self.gateway
                    .metric("pingress_config_generation")
                    .unwrap_or(0.0)
                    > before
            }),
            "no reload:\n{}",
            self.gateway.log()
        );
    }

    fn opts(&self) -> TlsOpts {
        TlsOpts::new(self.pki.ca_pem_path(), "tls.example")
    }
}

/// Requiring client certificates on a Host reaches connections that are
/// already open: one without a certificate is closed at the reload, without
/// waiting for a request it may never make (a WebSocket, a tunnel); a new
/// connection presents the certificate.
#[test]
fn a_host_that_starts_requiring_client_certificates_reaches_open_connections() {
    let tls = TlsGateway::start("", "", &[]);
    let alice = tls.pki.issue_client("alice");
    let mut open_before = Client::connect_tls(tls.port, &tls.opts().client(&alice));
    assert_eq!(open_before.get("/").status, 200);

    // A reload that leaves the Host's TLS alone leaves its connections
    // alone.
    let other = Echo::plain("other");
    tls.reload(
        "",
        &[mapping("other", "", "/other/", &other, "hostname: \"*\"")],
    );
    let kept = open_before.get("/");
    assert_eq!(kept.status, 200);
    assert_ne!(kept.header("connection"), Some("close"));

    tls.reload("ca_secret: client-ca\ncert_required: true", &[]);
    assert!(
        open_before.closes_by_itself(),
        "still open after the reload"
    );
    assert!(tls
        .gateway
        .metric_when(
            "pingress_downstream_connections_closed_total{reason=\"client_policy\"}",
            |n| n >= 1.0
        )
        .is_some_and(|n| n >= 1.0));

    let mut again = Client::connect_tls(tls.port, &tls.opts().client(&alice));
    assert_eq!(again.get("/").status, 200);
    assert!(Request::get("/")
        .try_send_tls(tls.port, &tls.opts())
        .is_err());
}

/// Revoking a certificate reaches the connection that presented it: closed
/// at the reload. Another client's connection is served, and closes after
/// its response, to handshake again under the new policy.
#[test]
fn a_revoked_certificate_reaches_its_open_connection() {
    let required = "ca_secret: client-ca\ncert_required: true";
    let tls = TlsGateway::start("", required, &[]);
    let alice = tls.pki.issue_client("alice");
    let bob = tls.pki.issue_client("bob");
    let mut alices = Client::connect_tls(tls.port, &tls.opts().client(&alice));
    let mut bobs = Client::connect_tls(tls.port, &tls.opts().client(&bob));
    assert_eq!(alices.get("/").status, 200);
    assert_eq!(bobs.get("/").status, 200);

    let crl = tls.pki.crl_pem(&[&bob]);
    tls.reload(
        &format!("{required}\ncrl_secret: client-crl"),
        &[opaque_secret("client-crl", "default", &[("crl.pem", &crl)])],
    );
    assert!(bobs.closes_by_itself(), "still open after the revocation");
    let served = alices.get("/again");
    assert_eq!(served.status, 200, "{}", served.text());
    assert_eq!(served.header("connection"), Some("close"));
}

/// A TLS client that connects and never finishes its handshake holds a
/// place like any other connection, and only until the head deadline:
/// before, Pingora held it for 60 s outside every cap.
#[test]
fn unfinished_tls_handshakes_count_and_end_at_the_deadline() {
    let tls = TlsGateway::start("max_connections: 2\nrequest_head_timeout_ms: 1500", "", &[]);
    let started = Instant::now();
    let mut silent = open(tls.port);
    let mut half = open(tls.port);
    // The first bytes of a ClientHello record, and nothing more.
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    assert!(poll_until(Duration::from_secs(5), || {
        tls.gateway.metric("pingress_downstream_connections") == Some(2.0)
    }));
    let mut third = open(tls.port);
    assert!(refused_at_once(&mut third), "a third connection was kept");

    for stalled in [&mut silent, &mut half] {
        let (_, after) = until_closed(stalled, started);
        assert!(
            after < Duration::from_secs(5),
            "a stalled handshake lasted {after:?}"
        );
    }
    assert!(tls
        .gateway
        .metric_when(
            "pingress_downstream_connections_closed_total{reason=\"handshake_timeout\"}",
            |n| n >= 2.0
        )
        .is_some_and(|n| n >= 2.0));
    let mut client = Client::connect_tls(tls.port, &tls.opts());
    assert_eq!(client.get("/").status, 200);
}

/// A cipher list OpenSSL cannot use fails the Host's TLS closed. It used to
/// fail in the handshake after the certificate was on and before the
/// client-certificate policy was: a client without a certificate reached
/// a Host that requires one.
#[test]
fn an_unusable_cipher_list_does_not_open_a_host_that_requires_client_certificates() {
    let tls = TlsGateway::start(
        "",
        "ca_secret: client-ca\ncert_required: true\ncipher_suites: [TLS_AES_128_GCM_SHA256]",
        &[],
    );
    let anonymous = Request::get("/").try_send_tls(tls.port, &tls.opts());
    assert!(
        anonymous.is_err(),
        "served without a client certificate: {:?}",
        anonymous.map(|r| r.status)
    );
    assert!(
        tls.gateway.log().contains("cipher_suites"),
        "{}",
        tls.gateway.log()
    );
}

/// A reload cannot change how a port listens, so a port a reload made
/// HTTPS still takes cleartext until a new process. Its requests are
/// refused: before, they were routed as if the connection had the TLS, and
/// the client certificate, that its Hosts now ask for.
#[test]
fn cleartext_on_a_port_a_reload_made_https_is_refused() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let server = pki.issue_server("tls.example", &[]);
    let echo = Echo::plain("up");
    let port = free_port();
    let route = mapping("up", "", "/", &echo, "hostname: \"*\"");
    write_gateway_without_listener(
        dir.path(),
        free_port(),
        &[listener("plain", port, "HTTP"), route.clone()].concat(),
    );
    let gateway = Gateway::start(dir.path());
    assert_eq!(request(port, "GET", "/", &[]).status, 200);

    let before = gateway.metric("pingress_config_generation").unwrap_or(0.0);
    let https = [
        listener("plain", port, "HTTPS"),
        tls_secret("server", "default", &server),
        ca_secret("client-ca", "default", pki.ca_pem()),
        doc(
            "TLSContext",
            "name: ctx",
            "hosts: [tls.example]\nca_secret: client-ca\ncert_required: true",
        ),
        host(
            "tls",
            "tls.example",
            &format!("{}tlsContext:\n  name: ctx", tls_spec("server", None)),
        ),
        route,
    ]
    .concat();
    let path = dir.path().join("resources").join("test.yaml");
    let next = path.with_extension("next");
    fs::write(&next, https).unwrap();
    fs::rename(&next, &path).unwrap();
    assert!(poll_until(Duration::from_secs(10), || {
        gateway.metric("pingress_config_generation").unwrap_or(0.0) > before
    }));
    let refused = request(port, "GET", "/", &[("host", "tls.example")]);
    assert_eq!(refused.status, 421, "{}", refused.text());
}

/// A WebSocket makes no request after its upgrade: revoking its client's
/// certificate closes it at the reload.
#[test]
fn a_revoked_certificate_closes_its_websocket() {
    let required = "ca_secret: client-ca\ncert_required: true";
    let ws_echo = Echo::plain("ws");
    let ws = mapping(
        "ws",
        "",
        "/ws/",
        &ws_echo,
        "hostname: \"*\"\nallow_upgrade: [websocket]",
    );
    let tls = TlsGateway::start("", required, std::slice::from_ref(&ws));
    let bob = tls.pki.issue_client("bob");
    let mut socket = tls_connect(tls.port, &tls.opts().client(&bob)).unwrap();
    socket
        .write_all(
            b"GET /ws/ HTTP/1.1\r\nHost: tls.example\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            socket.read(&mut byte).unwrap(),
            1,
            "the upgrade was not answered"
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    let crl = tls.pki.crl_pem(&[&bob]);
    tls.reload(
        &format!("{required}\ncrl_secret: client-crl"),
        &[
            ws,
            opaque_secret("client-crl", "default", &[("crl.pem", &crl)]),
        ],
    );
    let started = Instant::now();
    loop {
        match socket.read(&mut byte) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let after = started.elapsed();
    assert!(
        after < Duration::from_secs(5),
        "the WebSocket lasted {after:?}"
    );
}

/// With downstream.max_connection_age_ms, an old connection closes after
/// its current response.
#[test]
fn connections_older_than_max_connection_age_close_after_a_response() {
    let (_dir, _gateway, port, _echo) = start("max_connection_age_ms: 1000", "");
    let mut client = Client::connect(port);
    let young = client.get("/");
    assert_eq!(young.status, 200);
    assert_ne!(young.header("connection"), Some("close"));
    thread::sleep(Duration::from_millis(1200));
    let old = client.get("/");
    assert_eq!(old.status, 200);
    assert_eq!(old.header("connection"), Some("close"));
    assert!(client.is_closed());
}

/// HTTP/2 reads the Module's idle timeout and head size when the process
/// starts (Pingora sets them per listener); HTTP/1 follows a reload at
/// once. A reload that changes them says what waits for a new process.
#[test]
fn a_module_bound_change_names_what_http2_keeps_until_a_new_process() {
    let (dir, gateway, port, _echo) = start("", "listener_idle_timeout_ms: 60000");
    let before = gateway.metric("pingress_config_generation").unwrap_or(0.0);
    let path = dir.path().join("resources").join("test.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let next = path.with_extension("next");
    fs::write(
        &next,
        text.replace(
            "listener_idle_timeout_ms: 60000",
            "listener_idle_timeout_ms: 5000",
        ),
    )
    .unwrap();
    fs::rename(&next, &path).unwrap();
    assert!(
        poll_until(Duration::from_secs(10), || {
            gateway.metric("pingress_config_generation").unwrap_or(0.0) > before
        }),
        "{}",
        gateway.log()
    );
    let log = gateway.log();
    assert!(
        log.contains("listener_idle_timeout_ms") && log.contains("HTTP/2"),
        "{log}"
    );
    assert_eq!(request(port, "GET", "/", &[]).status, 200);
}

/// HTTP/2 connections have a maximum age too: at it, GOAWAY, then closed
/// once their streams are done.
#[test]
fn http2_connections_older_than_max_connection_age_get_goaway() {
    let (_dir, gateway, port, _echo) = start("max_connection_age_ms: 1000", "");
    let started = Instant::now();
    let mut h2c = open(port);
    h2c.write_all(H2_PREFACE_AND_SETTINGS).unwrap();
    let (frames, after) = bytes_until_closed(&mut h2c, started);
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
    assert!(
        frame_types(&frames).contains(&0x7),
        "no GOAWAY in {frames:?}"
    );
    // The client sees the close a moment before the gateway's task ends.
    assert!(poll_until(Duration::from_secs(5), || {
        gateway.metric("pingress_downstream_connections") == Some(0.0)
    }));
}

/// A reload that changes a Host's TLS drains the HTTP/2 connections made
/// with the old one (GOAWAY, then closed), each at its own moment of
/// `tls_drain_window_ms`, so that a rotated certificate does not make all
/// clients reconnect at once. Before the window, all were drained at the
/// moment of the reload.
#[test]
fn a_tls_change_drains_http2_connections_over_the_window() {
    let h2 = "alpn_protocols: h2";
    let tls = TlsGateway::start("tls_drain_window_ms: 3000", h2, &[]);
    let opts = tls.opts().alpn(&["h2"]);
    let connections: Vec<_> = (0..8)
        .map(|_| {
            let mut stream = tls_connect(tls.port, &opts).unwrap();
            stream.write_all(H2_PREFACE_AND_SETTINGS).unwrap();
            stream
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(15)))
                .unwrap();
            stream
        })
        .collect();
    assert!(poll_until(Duration::from_secs(5), || {
        tls.gateway.metric("pingress_downstream_connections") == Some(8.0)
    }));

    tls.reload(&format!("{h2}\nmin_tls_version: v1.2"), &[]);
    let reloaded = Instant::now();
    let readers: Vec<_> = connections
        .into_iter()
        .map(|mut stream| thread::spawn(move || until_goaway(&mut stream, reloaded)))
        .collect();
    let mut drained_after = Vec::new();
    for reader in readers {
        let after = reader.join().unwrap();
        assert!(after < Duration::from_secs(8), "drained after {after:?}");
        drained_after.push(after);
    }
    let first = drained_after.iter().min().unwrap();
    let last = drained_after.iter().max().unwrap();
    // Eight moments drawn from 3 s fall within 300 ms of each other about
    // once in a million runs.
    assert!(
        *last - *first >= Duration::from_millis(300),
        "all drained within {:?}: {drained_after:?}",
        *last - *first
    );
}

/// When the first GOAWAY frame came on `stream`, counted from `since`. The
/// connection stays open after it until the client answers the PING that
/// comes with it, as h2's graceful shutdown waits for.
fn until_goaway(stream: &mut impl Read, since: Instant) -> Duration {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    while !frame_types(&bytes).contains(&0x7) {
        match stream.read(&mut chunk) {
            Ok(0) => panic!("closed without GOAWAY: {bytes:?}"),
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("no GOAWAY after {:?} ({e}): {bytes:?}", since.elapsed()),
        }
    }
    since.elapsed()
}

/// A client's HTTP/2 connection preface and its empty SETTINGS frame.
const H2_PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// The type of each HTTP/2 frame in `bytes`.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

/// The gateway file's `downstream:` is read at start; a reload that changes
/// it says so instead of seeming to apply it.
#[test]
fn a_downstream_change_on_reload_is_named_as_needing_a_new_process() {
    let (dir, gateway, port, _echo) = start("max_connections: 100", "");
    let before = gateway.metric("pingress_config_generation").unwrap_or(0.0);
    let path = dir.path().join("gateway.yaml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("max_connections: 100", "max_connections: 5"),
    )
    .unwrap();
    assert!(
        poll_until(Duration::from_secs(10), || {
            gateway.metric("pingress_config_generation").unwrap_or(0.0) > before
        }),
        "{}",
        gateway.log()
    );
    assert!(
        gateway.log().contains("downstream: settings changed"),
        "{}",
        gateway.log()
    );
    assert_eq!(request(port, "GET", "/", &[]).status, 200);
}
