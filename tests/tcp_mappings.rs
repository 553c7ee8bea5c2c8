//! TCPMappings end to end: the real gateway tunnels raw bytes (HTTP to
//! pingress-echo, or a byte stream to a non-HTTP upstream) in cleartext,
//! originates TLS with a client certificate, terminates TLS and routes by
//! SNI, splits connections by weight, and follows reloads.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// A gateway whose HTTP Listener sits on its own port, with `resources`.
struct Setup {
    dir: tempfile::TempDir,
    gateway: Gateway,
    http_port: u16,
}

fn start(resources: &str) -> Setup {
    let dir = tempdir();
    start_in(dir, resources)
}

fn start_in(dir: tempfile::TempDir, resources: &str) -> Setup {
    let http_port = free_port();
    write_gateway(dir.path(), http_port, free_port(), resources);
    let gateway = Gateway::start(dir.path());
    Setup {
        dir,
        gateway,
        http_port,
    }
}

impl Setup {
    /// Rewrites the resources (same ports) and waits until `applied` holds.
    fn reload(&self, resources: &str, applied: impl FnMut() -> bool) {
        write_gateway(
            self.dir.path(),
            self.http_port,
            self.gateway.admin_port(),
            resources,
        );
        assert!(
            poll_until(Duration::from_secs(15), applied),
            "the reload did not take effect; log:\n{}",
            self.gateway.log()
        );
    }
}

fn tls_context(name: &str, spec: &str) -> String {
    doc("TLSContext", &format!("name: {name}"), spec)
}

fn reply_text(port: u16, bytes: &[u8]) -> String {
    let reply = half_close_exchange(port, bytes).unwrap_or_else(|e| panic!("port {port}: {e}"));
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn plain_tunnel_carries_http_and_a_half_closed_byte_stream() {
    let echo = Echo::plain("http-echo");
    let bytes = ByteEcho::start("bytes");
    let (http_tunnel, byte_tunnel) = (free_port(), free_port());
    let s = start(
        &[
            tcp_mapping(
                "web",
                http_tunnel,
                &format!("127.0.0.1:{}", echo.port()),
                "",
            ),
            tcp_mapping(
                "raw",
                byte_tunnel,
                &format!("127.0.0.1:{}", bytes.port()),
                "",
            ),
        ]
        .concat(),
    );

    // The gateway does not parse these bytes: pingress-echo sees the
    // client's own request line and Host header.
    let reply = Request::get("/through/the/tunnel?x=1")
        .header("Host", "tunnelled.example")
        .send(http_tunnel);
    let echoed = reply.echo_ok();
    assert_eq!(echoed.server(), "http-echo");
    assert_eq!(echoed.uri(), "/through/the/tunnel?x=1");
    assert_eq!(echoed.header("host").as_deref(), Some("tunnelled.example"));
    assert!(
        !echoed.has_header("x-forwarded-for"),
        "{:?}",
        echoed.headers()
    );

    // The upstream answers only once it has seen the end of the client's
    // stream: the reply proves half-close crossed the tunnel both ways.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply = half_close_exchange(byte_tunnel, &payload).expect("byte exchange");
    assert_eq!(&reply[..6], b"bytes:");
    assert!(reply[6..] == payload[..], "the stream came back altered");

    // The line is written once the tunnel is torn down, after the client
    // saw its end.
    assert!(
        poll_until(Duration::from_secs(5), || s
            .gateway
            .log()
            .contains("tcp_mapping=raw.default note=closed")),
        "no access-log line for the tunnel:\n{}",
        s.gateway.log()
    );
    let metric = |series: &str| s.gateway.metric(series);
    assert_eq!(
        metric("pingress_tcp_connections_total{tcp_mapping=\"raw.default\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric("pingress_tcp_bytes_total{direction=\"received\",tcp_mapping=\"raw.default\"}"),
        Some(payload.len() as f64)
    );
    assert_eq!(
        metric("pingress_tcp_connections_active{tcp_mapping=\"raw.default\"}"),
        Some(0.0)
    );
}

#[test]
fn a_reload_moves_a_live_port_to_another_upstream() {
    let (one, two) = (ByteEcho::start("one"), ByteEcho::start("two"));
    let port = free_port();
    let to = |e: &ByteEcho| tcp_mapping("db", port, &format!("127.0.0.1:{}", e.port()), "");
    let s = start(&to(&one));
    assert_eq!(reply_text(port, b"hi"), "one:hi");

    // A connection opened before the reload keeps its upstream.
    let mut open = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    open.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    open.write_all(b"early").expect("write");
    assert!(
        poll_until(Duration::from_secs(5), || s.gateway.metric(
            "pingress_tcp_connections_active{tcp_mapping=\"db.default\"}"
        ) == Some(1.0)),
        "the early tunnel never opened"
    );

    s.reload(&to(&two), || reply_text(port, b"hi") == "two:hi");
    open.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut early = String::new();
    open.read_to_string(&mut early).expect("read");
    assert_eq!(early, "one:early");
    assert!(
        !s.gateway
            .log()
            .contains("take effect only in a new process"),
        "a service change must not ask for an upgrade:\n{}",
        s.gateway.log()
    );
}

#[test]
fn a_new_tcp_port_on_reload_asks_for_an_upgrade() {
    let bytes = ByteEcho::start("bytes");
    let service = format!("127.0.0.1:{}", bytes.port());
    let (first, second) = (free_port(), free_port());
    let s = start(&tcp_mapping("a", first, &service, ""));
    let both = [
        tcp_mapping("a", first, &service, ""),
        tcp_mapping("b", second, &service, ""),
    ]
    .concat();
    s.reload(&both, || {
        s.gateway
            .log()
            .contains("listener ports or protocols changed")
    });
    assert_eq!(reply_text(first, b"x"), "bytes:x");
}

/// An nginx that demands a client certificate from `pki`, and the Secret
/// and TLSContext that give the gateway one; `ca` is what the context
/// trusts for the upstream.
fn mtls_upstream(pki: &Pki, ca: &str) -> (Nginx, String) {
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("tcp-gateway");
    let nginx = Nginx::mtls(&server, pki.ca_pem_path());
    let resources = [
        secret_yaml_with_ca("gateway-client", &client, ca),
        tls_context("upstream", "hosts: []\nsecret: gateway-client"),
    ]
    .concat();
    (nginx, resources)
}

fn secret_yaml_with_ca(name: &str, cert: &CertFiles, ca: &str) -> String {
    opaque_secret(
        name,
        "default",
        &[
            ("tls.crt", &cert.cert_pem),
            ("tls.key", &cert.key_pem),
            ("ca.crt", ca),
        ],
    )
}

#[test]
fn tls_origination_presents_the_client_certificate_and_verifies_the_upstream() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let other = Pki::new_named(&dir.path().join("other"), "other");
    let (nginx, resources) = mtls_upstream(&pki, pki.ca_pem());
    let (good, wrong_ca) = (free_port(), free_port());
    let service = format!("https://localhost:{}", nginx.port());
    let wrong = format!("localhost:{}", nginx.port());
    let resources = [
        resources,
        secret_yaml_with_ca(
            "wrong-ca",
            &pki.issue_client("tcp-gateway-2"),
            other.ca_pem(),
        ),
        tls_context("wrong-ca", "hosts: []\nsecret: wrong-ca"),
        tcp_mapping("mtls", good, &service, "tls: upstream"),
        tcp_mapping("distrust", wrong_ca, &wrong, "tls: wrong-ca"),
    ]
    .concat();
    let s = start_in(dir, &resources);

    // nginx answers 400 without a client certificate; 200 says the
    // gateway presented the one from its TLSContext.
    let reply = Request::get("/").send(good);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let subject = reply.header("x-client-dn").unwrap_or_default();
    assert!(subject.contains("tcp-gateway"), "x-client-dn: {subject:?}");
    assert_eq!(reply.header("x-client-verify"), Some("SUCCESS"));

    // A context that does not trust the upstream's CA: no tunnel at all.
    let nothing = raw_exchange(wrong_ca, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", READ_TIMEOUT);
    assert!(nothing.is_empty(), "{}", String::from_utf8_lossy(&nothing));
    assert!(
        poll_until(Duration::from_secs(5), || s.gateway.log().contains(
            "tcp_mapping=distrust.default note=upstream connect failed"
        )),
        "{}",
        s.gateway.log()
    );
}

/// A certificate for `names` and the Secret that carries it.
fn server_secret(pki: &Pki, secret: &str, names: &[&str]) -> String {
    tls_secret(secret, "default", &pki.issue_server(names[0], names))
}

#[test]
fn host_routes_by_sni_and_refuses_unknown_names() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let (a, b) = (ByteEcho::start("a"), ByteEcho::start("b"));
    let web = Echo::plain("web");
    let port = free_port();
    let resources = [
        // a.example.com through a TLS Host, b.example.com through a
        // TLSContext that lists it: the two ways Emissary finds the
        // certificate for a TCPMapping's `host`.
        server_secret(&pki, "a-cert", &["a.example.com"]),
        host("a", "a.example.com", &tls_spec("a-cert", None)),
        server_secret(&pki, "b-cert", &["b.example.com", "web.example.com"]),
        tls_context(
            "b",
            "hosts: [b.example.com, web.example.com]\nsecret: b-cert",
        ),
        tcp_mapping(
            "to-a",
            port,
            &format!("127.0.0.1:{}", a.port()),
            "host: a.example.com",
        ),
        tcp_mapping(
            "to-b",
            port,
            &format!("127.0.0.1:{}", b.port()),
            "host: B.example.com",
        ),
        tcp_mapping(
            "to-web",
            port,
            &format!("127.0.0.1:{}", web.port()),
            "host: web.example.com",
        ),
    ]
    .concat();
    let s = start_in(dir, &resources);
    let ca = pki.ca_pem_path().to_path_buf();

    for (name, expected) in [("a.example.com", "a:ping"), ("b.example.com", "b:ping")] {
        let mut tls = tls_connect(port, &TlsOpts::new(&ca, name).alpn(&[]))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        tls.write_all(b"ping").expect("write");
        // close_notify ends the client's stream; the reply still comes.
        tls.shutdown().expect("close_notify");
        let mut reply = String::new();
        let _ = tls.read_to_string(&mut reply);
        assert_eq!(reply, expected, "SNI {name}");
    }
    // TLS is terminated: pingress-echo gets the cleartext request.
    let reply = Request::get("/over-tls").send_tls(port, &TlsOpts::new(&ca, "web.example.com"));
    assert_eq!(reply.echo_ok().uri(), "/over-tls");
    assert_eq!(reply.echo().tls(), None);

    let unknown = tls_connect(port, &TlsOpts::new(&ca, "c.example.com"));
    assert!(unknown.is_err(), "an unknown SNI must not get a tunnel");
    let none = tls_connect(port, &TlsOpts::new(&ca, "a.example.com").no_sni());
    assert!(none.is_err(), "no SNI must not get a tunnel");
    drop(s);
}

/// A TCPMapping whose Host is invalid (its Secret not issued yet) waits
/// for it: no TLSContext that lists the name terminates in its place, so
/// no certificate but the Host's own is ever offered for that name.
#[test]
fn a_tcp_mapping_waits_for_its_invalid_host() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let (a, db) = (ByteEcho::start("a"), ByteEcho::start("db"));
    let port = free_port();
    let resources = [
        server_secret(&pki, "a-cert", &["a.example.com"]),
        host("a", "a.example.com", &tls_spec("a-cert", None)),
        host("db", "db.example.com", &tls_spec("not-issued-yet", None)),
        server_secret(&pki, "fallback-cert", &["db.example.com"]),
        tls_context("fallback", "hosts: [db.example.com]\nsecret: fallback-cert"),
        tcp_mapping(
            "to-a",
            port,
            &format!("127.0.0.1:{}", a.port()),
            "host: a.example.com",
        ),
        tcp_mapping(
            "to-db",
            port,
            &format!("127.0.0.1:{}", db.port()),
            "host: db.example.com",
        ),
    ]
    .concat();
    let s = start_in(dir, &resources);
    let ca = pki.ca_pem_path().to_path_buf();

    let mut tls = tls_connect(port, &TlsOpts::new(&ca, "a.example.com").alpn(&[]))
        .unwrap_or_else(|e| panic!("a.example.com: {e}"));
    tls.write_all(b"ping").expect("write");
    tls.shutdown().expect("close_notify");
    let mut reply = String::new();
    let _ = tls.read_to_string(&mut reply);
    assert_eq!(reply, "a:ping");

    let db_tls = tls_connect(port, &TlsOpts::new(&ca, "db.example.com").alpn(&[]));
    assert!(
        db_tls.is_err(),
        "the invalid Host's name got a handshake from another certificate"
    );
    let report = check(s.dir.path());
    assert!(
        report.stdout.contains("the TCPMapping waits for it"),
        "{}",
        report.stdout
    );
}

#[test]
fn tcp_mappings_share_an_https_port_with_hosts_by_sni() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let bytes = ByteEcho::start("tunnel");
    let web = Echo::plain("web");
    let https = free_port();
    let resources = [
        listener("https", https, "HTTPS"),
        server_secret(&pki, "web-cert", &["web.example.com"]),
        host(
            "web",
            "web.example.com",
            &tls_spec("web-cert", Some("Route")),
        ),
        mapping("web", "", "/", &web, "hostname: \"*\""),
        server_secret(&pki, "db-cert", &["db.example.com"]),
        tls_context("db", "hosts: [db.example.com]\nsecret: db-cert"),
        tcp_mapping(
            "db",
            https,
            &format!("127.0.0.1:{}", bytes.port()),
            "host: db.example.com",
        ),
    ]
    .concat();
    let s = start_in(dir, &resources);
    let ca = pki.ca_pem_path().to_path_buf();

    let reply = Request::get("/page").send_tls(https, &TlsOpts::new(&ca, "web.example.com"));
    assert_eq!(reply.echo_ok().server(), "web");
    // Keep-alive HTTP on the shared port stays HTTP.
    let mut client = Client::connect_tls(https, &TlsOpts::new(&ca, "web.example.com"));
    for _ in 0..3 {
        assert_eq!(client.get("/again").echo_ok().uri(), "/again");
    }

    let mut tls = tls_connect(https, &TlsOpts::new(&ca, "db.example.com").alpn(&[]))
        .expect("handshake for the TCPMapping's host");
    tls.write_all(b"select 1").expect("write");
    tls.shutdown().expect("close_notify");
    let mut reply = String::new();
    let _ = tls.read_to_string(&mut reply);
    assert_eq!(reply, "tunnel:select 1");
    drop(s);
}

#[test]
fn weights_split_connections_exactly() {
    let (small, large) = (ByteEcho::start("small"), ByteEcho::start("large"));
    let port = free_port();
    let s = start(
        &[
            tcp_mapping(
                "small",
                port,
                &format!("127.0.0.1:{}", small.port()),
                "weight: 25",
            ),
            tcp_mapping(
                "large",
                port,
                &format!("127.0.0.1:{}", large.port()),
                "weight: 75",
            ),
        ]
        .concat(),
    );
    let diag: serde_json::Value =
        serde_json::from_slice(&s.gateway.admin_get("/ambassador/v0/diag/?json=true").body)
            .expect("diag JSON");
    let shares: Vec<(&str, u64)> = diag["tcp"][0]["mappings"]
        .as_array()
        .expect("the port's TCPMappings")
        .iter()
        .map(|m| {
            (
                m["tcp_mapping"].as_str().unwrap_or(""),
                m["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(shares, [("small.default", 25), ("large.default", 75)]);

    const TOTAL: usize = 2000;
    let small_count = (0..TOTAL)
        .filter(|_| reply_text(port, b".").starts_with("small:"))
        .count();
    // 25% is 500 of 2000, with a binomial standard deviation of 19.4; the
    // bounds are four of them. Emissary's cumulative weights (25:100)
    // would give 400, outside.
    assert!(
        (422..=578).contains(&small_count),
        "small got {small_count} of {TOTAL}"
    );
    drop(s);
}

#[test]
fn idle_tunnels_are_closed_and_max_connections_is_enforced() {
    let bytes = ByteEcho::start("bytes");
    let service = format!("127.0.0.1:{}", bytes.port());
    let (idle, limited) = (free_port(), free_port());
    let s = start(
        &[
            tcp_mapping("idle", idle, &service, "idle_timeout_ms: \"300\""),
            tcp_mapping(
                "limited",
                limited,
                &service,
                "circuit_breakers:\n  - max_connections: 1",
            ),
        ]
        .concat(),
    );

    // The upstream waits for the client forever; the gateway does not.
    let mut quiet = TcpStream::connect(("127.0.0.1", idle)).expect("connect");
    quiet.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    let mut buffer = [0u8; 16];
    assert_eq!(quiet.read(&mut buffer).expect("closed, not timed out"), 0);
    assert!(
        poll_until(Duration::from_secs(5), || s
            .gateway
            .log()
            .contains("tcp_mapping=idle.default note=idle timeout")),
        "{}",
        s.gateway.log()
    );

    let mut first = TcpStream::connect(("127.0.0.1", limited)).expect("connect");
    first.write_all(b"first").expect("write");
    assert!(
        poll_until(Duration::from_secs(5), || s.gateway.metric(
            "pingress_tcp_connections_active{tcp_mapping=\"limited.default\"}"
        ) == Some(1.0)),
        "the first tunnel never opened"
    );
    let refused = raw_exchange(limited, b"second", READ_TIMEOUT);
    assert!(refused.is_empty(), "{}", String::from_utf8_lossy(&refused));
    first.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut reply = String::new();
    first.read_to_string(&mut reply).expect("read");
    assert_eq!(reply, "bytes:first");
    assert_eq!(
        s.gateway
            .metric("pingress_tcp_connections_refused_total{reason=\"overloaded\"}"),
        Some(1.0)
    );
}
