//! Self-tests of the integration harness (tests/support) and of
//! pingress-echo, independent of the gateway: if these fail, gateway test
//! failures mean nothing.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn echo_plain_round_trip_and_keep_alive() {
    let echo = Echo::plain("alpha");

    let r = request(
        echo.port(),
        "GET",
        "/hello?x=1&y=%2F",
        &[("X-Test", "one"), ("x-multi", "a"), ("X-Multi", "b")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    let e = r.echo();
    assert_eq!(e.server(), "alpha");
    assert_eq!(e.method(), "GET");
    assert_eq!(e.uri(), "/hello?x=1&y=%2F");
    assert_eq!(e.version(), "HTTP/1.1");
    assert!(e.tls().is_none());
    let names: Vec<String> = e.headers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        ["Host", "X-Test", "x-multi", "X-Multi", "Connection"]
    );
    assert_eq!(
        e.header("host").as_deref(),
        Some(&*format!("127.0.0.1:{}", echo.port()))
    );
    assert_eq!(e.headers_all("X-MULTI"), ["a", "b"]);
    let first_conn = e.connection();

    // Odd targets go out byte for byte, and Host can be omitted.
    for target in ["//svc/x", "/a/../b", "/%2e%2e/c", "*"] {
        let e = Request::get(target).no_host().send(echo.port()).echo();
        assert_eq!(e.uri(), target);
        assert!(!e.has_header("host"), "{:?}", e.headers());
    }

    // Keep-alive: three requests, one connection number; bodies both ways.
    let mut c = Client::connect(echo.port());
    let a = c.get("/one").echo();
    let b = c.send(Request::post("/two", "abcdef")).echo();
    let chunked = c
        .send(
            Request::new("PUT", "/three")
                .header("Transfer-Encoding", "chunked")
                .body("3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nx-trailer: t\r\n\r\n"),
        )
        .echo();
    assert_eq!(b.method(), "POST");
    assert_eq!(b.body_len(), 6);
    assert_eq!(chunked.body_len(), 7);
    assert_eq!(a.connection(), b.connection());
    assert_eq!(a.connection(), chunked.connection());
    assert_ne!(a.connection(), first_conn);

    let again = request(echo.port(), "GET", "/", &[]).echo();
    assert_ne!(again.connection(), a.connection());
}

#[test]
fn echo_control_headers() {
    let echo = Echo::plain("ctl");

    let r = request(
        echo.port(),
        "GET",
        "/",
        &[
            ("x-echo-status", "503"),
            ("x-echo-header", "x-one: 1"),
            ("x-echo-header", "Set-Cookie: a=b; Path=/"),
            ("x-echo-header", "Set-Cookie: c=d"),
        ],
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-one"), Some("1"));
    assert_eq!(r.headers_all("set-cookie"), ["a=b; Path=/", "c=d"]);
    assert_eq!(r.echo().server(), "ctl");

    let t = Instant::now();
    let r = request(echo.port(), "GET", "/", &[("x-echo-delay-ms", "300")]);
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    // A short client timeout against a long delay fails instead of hanging.
    let err = Request::get("/")
        .header("x-echo-delay-ms", "3000")
        .timeout(Duration::from_millis(200))
        .try_send(echo.port());
    assert!(err.is_err());

    let mut c = Client::connect(echo.port());
    let r = c.send(Request::get("/").header("x-echo-close", "1"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed());

    // HEAD and 204 carry no body; the keep-alive stream stays in sync.
    let mut c = Client::connect(echo.port());
    let h = c.send(Request::new("HEAD", "/h"));
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    let n = c.send(Request::get("/n").header("x-echo-status", "204"));
    assert_eq!(n.status, 204);
    assert!(n.body.is_empty());
    assert_eq!(c.get("/after").echo().uri(), "/after");
}

#[test]
fn echo_rejects_malformed_requests() {
    let echo = Echo::plain("bad");
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/1.1\r\nx-echo-status: nope\r\n\r\n",
    ] {
        let r = send_raw(echo.port(), raw).expect("a response");
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(raw));
        assert_eq!(r.header("connection"), Some("close"));
    }
    // Still serving afterwards.
    assert_eq!(request(echo.port(), "GET", "/", &[]).status, 200);
}

#[test]
fn echo_many_concurrent_connections() {
    let echo = Echo::plain("conc");
    let port = echo.port();
    let handles: Vec<_> = (0..32)
        .map(|i| {
            std::thread::spawn(move || {
                let e = request(
                    port,
                    "GET",
                    &format!("/c/{i}"),
                    &[("x-echo-delay-ms", "100")],
                )
                .echo();
                assert_eq!(e.uri(), format!("/c/{i}"));
                e.connection()
            })
        })
        .collect();
    let mut conns: Vec<u64> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    conns.sort_unstable();
    conns.dedup();
    assert_eq!(conns.len(), 32);
}

#[test]
fn echo_tls_with_required_client_cert() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let rogue = Pki::new_named(dir.path(), "rogue");
    let server = pki.issue_server("echo.test", &["echo.test", "127.0.0.1"]);
    let client = pki.issue_client("client-a");
    let rogue_client = rogue.issue_client("client-a");
    let echo = Echo::mtls("secure", &server, pki.ca_pem_path(), true);

    let r = tls_request(
        echo.port(),
        "echo.test",
        pki.ca_pem_path(),
        Some(&client),
        "/s?q=1",
    );
    assert_eq!(r.status, 200);
    let e = r.echo();
    assert_eq!(e.server(), "secure");
    assert_eq!(e.uri(), "/s?q=1");
    assert_eq!(e.sni().as_deref(), Some("echo.test"));
    assert_eq!(e.tls_version().as_deref(), Some("TLSv1.3"));
    assert_eq!(e.alpn().as_deref(), Some("http/1.1"));
    assert_eq!(
        e.client_cert_subject().as_deref(),
        Some("CN=client-a,O=pingress tests")
    );
    assert_eq!(e.client_cert_subject(), Some(client.subject()));
    assert_eq!(e.client_cert_issuer(), Some(pki.ca_subject()));
    assert_eq!(e.client_cert_serial(), Some(client.serial_hex.clone()));

    // Connecting by IP: no SNI is sent, the IP SAN verifies.
    let e = tls_request(
        echo.port(),
        "127.0.0.1",
        pki.ca_pem_path(),
        Some(&client),
        "/ip",
    )
    .echo();
    assert_eq!(e.sni(), None);

    // TLS 1.3 clients finish their side of the handshake before the server
    // checks the certificate, so the failure may surface on the first read.
    for (what, cert) in [("no cert", None), ("rogue cert", Some(&rogue_client))] {
        let res = try_tls_request(echo.port(), "echo.test", pki.ca_pem_path(), cert, "/");
        assert!(res.is_err(), "{what}: expected failure, got {res:?}");
    }

    // The client side verifies too: a server from another CA is refused.
    let res = try_tls_request(
        echo.port(),
        "echo.test",
        rogue.ca_pem_path(),
        Some(&client),
        "/",
    );
    assert!(res.is_err());
    // ... and a name the certificate does not cover.
    let res = try_tls_request(
        echo.port(),
        "other.test",
        pki.ca_pem_path(),
        Some(&client),
        "/",
    );
    assert!(res.is_err());
}

#[test]
fn echo_tls_optional_and_plain_tls() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("echo.test", &[]);
    let client = pki.issue_client("client-b");

    let optional = Echo::mtls("opt", &server, pki.ca_pem_path(), false);
    let e = tls_request(optional.port(), "echo.test", pki.ca_pem_path(), None, "/").echo();
    assert!(e.tls().is_some());
    assert_eq!(e.client_cert_subject(), None);
    let e = tls_request(
        optional.port(),
        "echo.test",
        pki.ca_pem_path(),
        Some(&client),
        "/",
    )
    .echo();
    assert_eq!(e.client_cert_subject(), Some(client.subject()));

    let tls = Echo::tls("tls", &server);
    let opts = TlsOpts::new(pki.ca_pem_path(), "echo.test").alpn(&[]);
    let mut c = Client::connect_tls(tls.port(), &opts);
    let a = c.get("/a").echo();
    let b = c.get("/b").echo();
    assert_eq!(a.alpn(), None);
    assert_eq!(a.connection(), b.connection());
    assert_eq!(b.header("host").as_deref(), Some("echo.test"));
}

#[test]
fn pki_files_are_well_formed() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let s = pki.issue_server("svc", &["svc.example", "10.1.2.3"]);
    assert!(s.cert_pem.starts_with(&s.leaf_pem));
    assert!(s.cert_pem.ends_with(pki.ca_pem()));
    assert!(s.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(std::fs::read_to_string(&s.cert).expect("cert"), s.cert_pem);
    assert_eq!(std::fs::read_to_string(&s.key).expect("key"), s.key_pem);
    assert_eq!(s.serial_hex, s.serial_hex.to_uppercase());

    let leaf = openssl::x509::X509::from_pem(s.leaf_pem.as_bytes()).expect("parse leaf");
    let ca = openssl::x509::X509::from_pem(pki.ca_pem().as_bytes()).expect("parse ca");
    assert!(leaf
        .verify(&ca.public_key().expect("ca key"))
        .expect("verify"));
    let sans = leaf.subject_alt_names().expect("sans");
    let dns: Vec<_> = sans.iter().filter_map(|n| n.dnsname()).collect();
    let ips: Vec<_> = sans.iter().filter_map(|n| n.ipaddress()).collect();
    assert_eq!(dns, ["svc.example"]);
    assert_eq!(ips, [&[10u8, 1, 2, 3][..]]);

    // Same CN twice must not overwrite the first files.
    let s2 = pki.issue_server("svc", &["svc.example"]);
    assert_ne!(s.cert, s2.cert);
    assert_ne!(s.serial_hex, s2.serial_hex);
}

#[test]
fn nginx_mtls_upstream() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("nginx.test", &["nginx.test", "127.0.0.1"]);
    let client = pki.issue_client("gateway-client");
    let nginx = Nginx::mtls(&server, pki.ca_pem_path());

    let r = tls_request(
        nginx.port(),
        "nginx.test",
        pki.ca_pem_path(),
        Some(&client),
        "/any",
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), nginx.error_log());
    assert_eq!(r.text(), "hello from nginx");
    assert_eq!(r.header("x-client-verify"), Some("SUCCESS"));
    let dn = r.header("x-client-dn").unwrap_or_default();
    assert!(dn.contains("CN=gateway-client"), "{dn}");

    // nginx completes the handshake without a cert and answers 400.
    let r = try_tls_request(nginx.port(), "nginx.test", pki.ca_pem_path(), None, "/");
    assert!(r.as_ref().map(|r| r.status == 400).unwrap_or(true), "{r:?}");
}

#[test]
fn nginx_plain_upstream() {
    let nginx = Nginx::plain();
    let r = request(nginx.port(), "GET", "/x", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from nginx");
    // nginx logs after it has sent the response, so wait for the line.
    assert!(poll_until(Duration::from_secs(5), || nginx
        .access_log()
        .contains("GET /x")));
}

#[test]
fn write_gateway_layout() {
    let dir = tempdir();
    write_gateway(
        dir.path(),
        18080,
        18877,
        "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: m\nspec:\n  prefix: /\n  service: 127.0.0.1:1\n",
    );
    let gw: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(dir.path().join("gateway.yaml")).expect("gateway.yaml"),
    )
    .expect("yaml");
    assert_eq!(gw["admin"]["listen"].as_str(), Some("127.0.0.1:18877"));
    assert_eq!(gw["pingora"]["threads"].as_u64(), Some(1));
    assert_eq!(
        gw["pingora"]["pid_file"]
            .as_str()
            .map(std::path::PathBuf::from),
        Some(dir.path().join("pingress.pid"))
    );
    let text = std::fs::read_to_string(dir.path().join("resources/test.yaml")).expect("test.yaml");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("doc"))
        .collect();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["kind"].as_str(), Some("Listener"));
    assert_eq!(docs[0]["spec"]["port"].as_u64(), Some(18080));
    assert_eq!(docs[1]["kind"].as_str(), Some("Mapping"));
}

#[test]
fn poll_until_reports_outcome() {
    let mut n = 0;
    assert!(poll_until(Duration::from_secs(2), || {
        n += 1;
        n >= 3
    }));
    assert!(!poll_until(Duration::from_millis(120), || false));
    let p = free_port();
    assert!(!port_open(p));
}
