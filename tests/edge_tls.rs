//! Edge TLS through the real binary and real TLS clients (OpenSSL from the
//! harness, curl for HTTP/2): HTTPS Listeners, the certificate chosen by SNI
//! among TLS Hosts (exact, wildcard, `*`), client-certificate authentication,
//! the binding of a TLS connection to the Host its SNI chose (421, and no
//! TLS 1.3 session resumed into another Host's client-certificate policy),
//! HTTP/2 by ALPN, the Host's insecure-request policy (`requestPolicy`,
//! <https://www.getambassador.io/docs/emissary/latest/topics/running/host-crd>)
//! in the scenarios of Emissary's Host and TLS acceptance tests,
//! X-Forwarded-Proto over TLS, and what `pingress -t` reports about TLS
//! Hosts.
//!
//! Every server certificate has CN = the name it is issued for, so a test
//! can tell from the client side which Host's certificate a handshake chose.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl::asn1::Asn1Time;
use openssl::nid::Nid;
use openssl::ssl::SslVersion;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;

use support::*;

// ---------------------------------------------------------------------------
// Resource builders
// ---------------------------------------------------------------------------

// `doc`, `listener`, `host`, `tls_host`, `tls_spec`, `tls_secret`,
// `ca_secret` and `mapping` live in tests/support/resources.rs, shared with
// tests/client_identity.rs.

// ---------------------------------------------------------------------------
// Client-side helpers
// ---------------------------------------------------------------------------

/// GET `path` over TLS; panics on any failure. Returns the response and the
/// certificate the server presented.
fn get_tls(port: u16, opts: &TlsOpts, path: &str) -> (Response, X509) {
    Request::get(path)
        .try_send_tls_peer(port, opts)
        .unwrap_or_else(|e| panic!("GET {path} with SNI {:?}: {e}", opts.sni))
}

fn common_name(cert: &X509) -> String {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
        .map(|s| s.to_string())
        .unwrap_or_default()
}

fn dns_names(cert: &X509) -> Vec<String> {
    cert.subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.dnsname().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The presented certificate is the one issued for `name`: CN and DNS SAN.
fn assert_cert_for(cert: &X509, name: &str) {
    assert_eq!(common_name(cert), name, "certificate CN");
    assert_eq!(dns_names(cert), vec![name.to_string()], "certificate SANs");
}

/// The name of the echo upstream that answered; panics unless it is a 200
/// from an echo.
fn served_by(response: &Response) -> String {
    response.echo_ok().server()
}

/// A cleartext request with this `Host` header on a fresh connection.
fn get_http(port: u16, host: &str, path: &str) -> Response {
    Request::get(path).header("Host", host).send(port)
}

/// A TCP stream that keeps a copy of every byte the server sends.
#[derive(Debug)]
struct Tap {
    inner: TcpStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A TLS handshake that sends `sni` (or none) and verifies nothing: what
/// matters is what the server answers. Returns whether the handshake
/// completed and every byte the server sent; after a completed handshake a
/// request is sent and its answer read too, so a late failure shows.
fn handshake_transcript(port: u16, sni: Option<&str>) -> (Result<(), String>, Vec<u8>) {
    let mut builder = SslConnector::builder(SslMethod::tls_client()).expect("connector");
    builder.set_verify(SslVerifyMode::NONE);
    let connector = builder.build();
    let mut config = connector.configure().expect("configure");
    config.set_use_server_name_indication(false);
    config.set_verify_hostname(false);
    let mut ssl = config.into_ssl("").expect("ssl");
    if let Some(sni) = sni {
        ssl.set_hostname(sni).expect("SNI");
    }
    let tcp = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
    )
    .expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let tap = Tap {
        inner: tcp,
        seen: Arc::clone(&seen),
    };
    let result = match ssl.connect(tap) {
        Ok(mut stream) => {
            let request = format!(
                "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                sni.unwrap_or("127.0.0.1")
            );
            let _ = stream.write_all(request.as_bytes());
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    };
    let bytes = seen.lock().map(|s| s.clone()).unwrap_or_default();
    (result, bytes)
}

/// A ClientHello with this SNI fails, and what came back is a TLS alert (or
/// nothing), never a cleartext HTTP response.
fn assert_handshake_refused(port: u16, sni: Option<&str>) {
    let (result, bytes) = handshake_transcript(port, sni);
    assert!(
        result.is_err(),
        "handshake with SNI {sni:?} completed; server sent {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(
        !bytes.windows(5).any(|w| w == b"HTTP/"),
        "SNI {sni:?}: the server answered a ClientHello in cleartext: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(
        bytes.is_empty() || bytes[0] == 0x15,
        "SNI {sni:?}: expected a TLS alert record (0x15) or nothing, got {:02x?}",
        &bytes[..bytes.len().min(16)]
    );
}

/// curl's view of one HTTPS request.
struct Curl {
    /// `%{http_version}`: `2` or `1.1`.
    version: String,
    status: u16,
    body: String,
}

/// `curl --http2` to `https://<name>:<port><path>`, resolving `name` to
/// 127.0.0.1 and trusting `ca`; `headers` are extra `-H` values.
fn curl_http2(port: u16, name: &str, ca: &Path, path: &str, headers: &[&str]) -> Curl {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http2", "--max-time", "10", "--noproxy", "*"])
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_version} %{response_code}"]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(format!("https://{name}:{port}{path}"));
    let out = cmd.output().expect("run curl (is curl installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {name}{path} failed ({}): {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, tail) = stdout.rsplit_once('\n').expect("curl -w line");
    let (version, status) = tail.split_once(' ').expect("version and status");
    Curl {
        version: version.to_string(),
        status: status.parse().expect("status code"),
        body: body.to_string(),
    }
}

/// TCP ports process `pid` listens on (Linux: its socket inodes matched
/// against /proc/net/tcp{,6} entries in state LISTEN).
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let inodes: BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/<pid>/fd")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                if let Some((_, port)) = cols[1].rsplit_once(':') {
                    ports.insert(u16::from_str_radix(port, 16).expect("hex port"));
                }
            }
        }
    }
    ports
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

// ---------------------------------------------------------------------------
// Certificates chosen by SNI
// ---------------------------------------------------------------------------

/// Two TLS Hosts on one HTTPS port: each SNI gets its Host's certificate
/// and that Host's Mapping (both Mappings have the same prefix), over fresh
/// and kept-alive connections; an SNI no TLS Host serves (and no SNI at
/// all) gets a handshake alert, never a cleartext answer.
#[test]
fn two_hosts_on_one_port_each_sni_gets_its_own_certificate_and_routes() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let a = pki.issue_server("a.example", &[]);
    let b = pki.issue_server("b.example", &[]);
    let alpha = Echo::plain("alpha");
    let beta = Echo::plain("beta");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            tls_host("a", "a.example", &a, ""),
            tls_host("b", "b.example", &b, ""),
            mapping("a", "", "/svc/", &alpha, "hostname: a.example"),
            mapping("b", "", "/svc/", &beta, "hostname: b.example"),
        ],
    );

    for _ in 0..3 {
        for (name, echo) in [("a.example", "alpha"), ("b.example", "beta")] {
            let (response, cert) = get_tls(port, &TlsOpts::new(pki.ca_pem_path(), name), "/svc/");
            assert_cert_for(&cert, name);
            assert_eq!(served_by(&response), echo, "SNI {name}");
            let reply = response.echo();
            assert_eq!(reply.header("host").as_deref(), Some(name));
        }
    }
    // Several requests on one connection stay with that connection's Host.
    let mut client = Client::connect_tls(port, &TlsOpts::new(pki.ca_pem_path(), "b.example"));
    for _ in 0..3 {
        assert_eq!(served_by(&client.get("/svc/")), "beta");
    }

    assert_handshake_refused(port, Some("c.example"));
    assert_handshake_refused(port, None);
    let err = Request::get("/svc/")
        .try_send_tls(
            port,
            &TlsOpts::new(pki.ca_pem_path(), "c.example").verify_name(None),
        )
        .expect_err("an SNI without TLS Host must not be served");
    assert!(err.contains("handshake"), "{err}");
}

/// `*.example.com` serves names under it with its wildcard certificate; an
/// exact Host `a.example.com` wins over the wildcard for its own name.
#[test]
fn wildcard_host_serves_names_under_it_and_the_exact_host_wins() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let wild = pki.issue_server("*.example.com", &[]);
    let exact = pki.issue_server("a.example.com", &[]);
    let wild_echo = Echo::plain("wild");
    let exact_echo = Echo::plain("exact");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            tls_host("wild", "*.example.com", &wild, ""),
            tls_host("exact", "a.example.com", &exact, ""),
            mapping(
                "wild",
                "",
                "/wild/",
                &wild_echo,
                "hostname: \"*.example.com\"",
            ),
            mapping(
                "exact",
                "",
                "/exact/",
                &exact_echo,
                "hostname: a.example.com",
            ),
        ],
    );

    for name in ["x.example.com", "other.example.com"] {
        let (response, cert) = get_tls(port, &TlsOpts::new(pki.ca_pem_path(), name), "/wild/");
        assert_cert_for(&cert, "*.example.com");
        assert_eq!(served_by(&response), "wild", "SNI {name}");
        // The exact Host's route is not this Host's business.
        let (response, _) = get_tls(port, &TlsOpts::new(pki.ca_pem_path(), name), "/exact/");
        assert_eq!(response.status, 404, "SNI {name}: {}", response.text());
    }
    let (response, cert) = get_tls(
        port,
        &TlsOpts::new(pki.ca_pem_path(), "a.example.com"),
        "/exact/",
    );
    assert_cert_for(&cert, "a.example.com");
    assert_eq!(served_by(&response), "exact");
    assert_handshake_refused(port, Some("example.org"));
}

/// A TLS Host `hostname: "*"` catches an SNI no other Host names, and a
/// client that sends no SNI at all, with its own certificate.
#[test]
fn star_tls_host_catches_unknown_sni_and_clients_without_sni() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let a = pki.issue_server("a.example", &[]);
    let fallback = pki.issue_server("fallback.example", &[]);
    let alpha = Echo::plain("alpha");
    let any = Echo::plain("any");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            tls_host("a", "a.example", &a, ""),
            tls_host("fallback", "*", &fallback, ""),
            mapping("a", "", "/a/", &alpha, "hostname: a.example"),
            mapping("any", "", "/any/", &any, "hostname: \"*\""),
        ],
    );

    let unknown =
        TlsOpts::new(pki.ca_pem_path(), "unknown.example").verify_name(Some("fallback.example"));
    let (response, cert) = get_tls(port, &unknown, "/any/");
    assert_cert_for(&cert, "fallback.example");
    assert_eq!(served_by(&response), "any");
    // a.example's route is matched on the request's authority too.
    let (response, _) = get_tls(port, &unknown, "/a/");
    assert_eq!(response.status, 404, "{}", response.text());

    let no_sni = TlsOpts::new(pki.ca_pem_path(), "fallback.example").no_sni();
    let (response, cert) = get_tls(port, &no_sni, "/any/");
    assert_cert_for(&cert, "fallback.example");
    assert_eq!(served_by(&response), "any");

    let (response, cert) = get_tls(port, &TlsOpts::new(pki.ca_pem_path(), "a.example"), "/a/");
    assert_cert_for(&cert, "a.example");
    assert_eq!(served_by(&response), "alpha");
}

// ---------------------------------------------------------------------------
// Client certificates
// ---------------------------------------------------------------------------

/// A linked TLSContext with a CA Secret and `cert_required: true`: a client
/// certificate of that CA gets through, none or one of another CA fails
/// the handshake (or its first read, in TLS 1.3), and the refusals do not
/// disturb the next good client.
#[test]
fn cert_required_accepts_a_good_client_certificate_and_refuses_none_and_strangers() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let rogue = Pki::new_named(&dir.path().join("rogue"), "rogue");
    let server = pki.issue_server("mtls.example", &[]);
    let alice = pki.issue_client("alice");
    let mallory = rogue.issue_client("mallory");
    let echo = Echo::plain("protected");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            ca_secret("client-ca", "default", pki.ca_pem()),
            doc(
                "TLSContext",
                "name: mtls-context",
                "hosts: [mtls.example]\nca_secret: client-ca\ncert_required: true",
            ),
            tls_host(
                "mtls",
                "mtls.example",
                &server,
                "tlsContext:\n  name: mtls-context",
            ),
            mapping("protected", "", "/p/", &echo, "hostname: \"*\""),
        ],
    );
    let opts = TlsOpts::new(pki.ca_pem_path(), "mtls.example");

    let (response, cert) = get_tls(port, &opts.clone().client(&alice), "/p/");
    assert_cert_for(&cert, "mtls.example");
    assert_eq!(served_by(&response), "protected");

    let none = Request::get("/p/").try_send_tls(port, &opts);
    assert!(none.is_err(), "no client certificate: {none:?}");
    let stranger = Request::get("/p/").try_send_tls(port, &opts.clone().client(&mallory));
    assert!(stranger.is_err(), "certificate of another CA: {stranger:?}");

    let (response, _) = get_tls(port, &opts.clone().client(&alice), "/p/");
    assert_eq!(served_by(&response), "protected");
}

/// A CA without `cert_required` (inline `tls`): clients with and without a
/// certificate are served; a presented certificate is still verified, so
/// one of another CA fails.
#[test]
fn ca_without_cert_required_verifies_only_presented_certificates() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let rogue = Pki::new_named(&dir.path().join("rogue"), "rogue");
    let server = pki.issue_server("opt.example", &[]);
    let alice = pki.issue_client("alice");
    let mallory = rogue.issue_client("mallory");
    let echo = Echo::plain("optional");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            ca_secret("client-ca", "default", pki.ca_pem()),
            tls_host(
                "opt",
                "opt.example",
                &server,
                "tls:\n  ca_secret: client-ca",
            ),
            mapping("optional", "", "/o/", &echo, "hostname: \"*\""),
        ],
    );
    let opts = TlsOpts::new(pki.ca_pem_path(), "opt.example");

    let (response, _) = get_tls(port, &opts.clone().client(&alice), "/o/");
    assert_eq!(served_by(&response), "optional", "with a certificate");
    let (response, _) = get_tls(port, &opts, "/o/");
    assert_eq!(served_by(&response), "optional", "without a certificate");
    let stranger = Request::get("/o/").try_send_tls(port, &opts.clone().client(&mallory));
    assert!(stranger.is_err(), "certificate of another CA: {stranger:?}");
}

/// Inline `tls: {ca_secret: ca.alt-namespace, cert_required: true}` finds
/// Secret `ca` in namespace `alt-namespace`; names with more dots split at
/// the last one (`client.ca.alt-namespace`), and the Host's own name and
/// tlsSecret name may contain dots too.
#[test]
fn client_cert_host_with_a_ca_secret_in_another_namespace() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let rogue = Pki::new_named(&dir.path().join("rogue"), "rogue");
    let server = pki.issue_server("cc.example", &[]);
    let server2 = pki.issue_server("cc2.example", &[]);
    let alice = pki.issue_client("alice");
    let mallory = rogue.issue_client("mallory");
    let echo = Echo::plain("cc");
    let port = free_port();
    let required = |ca: &str| format!("tls:\n  ca_secret: {ca}\n  cert_required: true");
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            tls_secret("server.cert", "default", &server),
            tls_secret("server2.cert", "default", &server2),
            ca_secret("ca", "alt-namespace", pki.ca_pem()),
            ca_secret("client.ca", "alt-namespace", pki.ca_pem()),
            host(
                "client.cert.host",
                "cc.example",
                &format!(
                    "{}{}",
                    tls_spec("server.cert", None),
                    required("ca.alt-namespace")
                ),
            ),
            host(
                "client.cert.host2",
                "cc2.example",
                &format!(
                    "{}{}",
                    tls_spec("server2.cert", None),
                    required("client.ca.alt-namespace")
                ),
            ),
            mapping("cc", "", "/cc/", &echo, "hostname: \"*\""),
        ],
    );

    for name in ["cc.example", "cc2.example"] {
        let opts = TlsOpts::new(pki.ca_pem_path(), name);
        let (response, cert) = get_tls(port, &opts.clone().client(&alice), "/cc/");
        assert_cert_for(&cert, name);
        assert_eq!(served_by(&response), "cc", "{name}");
        let none = Request::get("/cc/").try_send_tls(port, &opts);
        assert!(none.is_err(), "{name} without a certificate: {none:?}");
        let stranger = Request::get("/cc/").try_send_tls(port, &opts.clone().client(&mallory));
        assert!(stranger.is_err(), "{name} with another CA's: {stranger:?}");
    }
}

// ---------------------------------------------------------------------------
// The Host that SNI chose owns the connection
// ---------------------------------------------------------------------------

/// Emissary #3340: a connection whose SNI chose one Host must not reach
/// another Host's routes through its `Host` header. Host A demands client
/// certificates, B does not; each direction gets 421 and never the other
/// Host's upstream, with or without a port in the header, and on a
/// kept-alive connection that first made a legitimate request.
#[test]
fn host_header_naming_another_host_than_the_sni_gets_421() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let a = pki.issue_server("a.example", &[]);
    let b = pki.issue_server("b.example", &[]);
    let alice = pki.issue_client("alice");
    let echo_a = Echo::plain("alpha");
    let echo_b = Echo::plain("beta");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            ca_secret("client-ca", "default", pki.ca_pem()),
            tls_host(
                "a",
                "a.example",
                &a,
                "tls:\n  ca_secret: client-ca\n  cert_required: true",
            ),
            tls_host("b", "b.example", &b, ""),
            mapping("a", "", "/a/", &echo_a, "hostname: a.example"),
            mapping("b", "", "/b/", &echo_b, "hostname: b.example"),
            mapping("shared", "", "/shared/", &echo_a, "hostname: \"*\""),
        ],
    );
    let sni_a = TlsOpts::new(pki.ca_pem_path(), "a.example").client(&alice);
    let sni_b = TlsOpts::new(pki.ca_pem_path(), "b.example");

    // The bypass: B's handshake needs no certificate; A's routes must stay
    // out of reach whatever the Host header says.
    for (target, host_header) in [
        ("/a/", "a.example".to_string()),
        ("/a/", format!("a.example:{port}")),
        ("/shared/", "a.example".to_string()),
    ] {
        let response = Request::get(target)
            .header("Host", &host_header)
            .send_tls(port, &sni_b);
        assert_eq!(
            response.status,
            421,
            "SNI b.example, Host {host_header}, {target}: {}",
            response.text()
        );
        assert!(!response.is_echo(), "{}", response.text());
    }
    // The other direction: A's connection cannot borrow B's routes.
    let response = Request::get("/b/")
        .header("Host", "b.example")
        .send_tls(port, &sni_a);
    assert_eq!(response.status, 421, "{}", response.text());
    assert!(!response.is_echo(), "{}", response.text());

    // A kept-alive connection: a legitimate request first, then one that
    // names the other Host.
    let mut client = Client::connect_tls(port, &sni_b);
    assert_eq!(served_by(&client.get("/b/")), "beta");
    let response = client.send(Request::get("/a/").header("Host", "a.example"));
    assert_eq!(response.status, 421, "{}", response.text());
    assert!(!response.is_echo(), "{}", response.text());

    // Each Host's own requests are served.
    assert_eq!(served_by(&get_tls(port, &sni_a, "/a/").0), "alpha");
    assert_eq!(served_by(&get_tls(port, &sni_b, "/b/").0), "beta");
    assert_eq!(served_by(&get_tls(port, &sni_b, "/shared/").0), "alpha");
}

/// `openssl s_client` to `port` with `sni`, trusting `ca`, sending
/// `request` and reading until the server closes; `sess_in`/`sess_out` load
/// and save the TLS session (the Rust binding has no safe way to resume).
/// Returns everything s_client printed.
fn s_client(
    port: u16,
    sni: &str,
    ca: &Path,
    request: &str,
    sess_in: Option<&Path>,
    sess_out: Option<&Path>,
) -> String {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "openssl", "s_client", "-ign_eof", "-tls1_3"])
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-servername")
        .arg(sni)
        .arg("-CAfile")
        .arg(ca);
    if let Some(p) = sess_in {
        cmd.arg("-sess_in").arg(p);
    }
    if let Some(p) = sess_out {
        cmd.arg("-sess_out").arg(p);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.as_bytes())
        .expect("write request");
    let out = child.wait_with_output().expect("s_client output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// TLS 1.3 does not tie a session to its SNI, so a session ticket that Host
/// B (no client certificate) issued must not let a client resume into Host
/// A (cert_required) without ever presenting a certificate: the resumed
/// connection either does a full handshake (and fails for lack of a
/// certificate) or is refused, and never reaches A's upstream.
#[test]

fn a_session_from_another_host_does_not_skip_client_certificates() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let a = pki.issue_server("a.example", &[]);
    let b = pki.issue_server("b.example", &[]);
    let echo_a = Echo::plain("alpha");
    let echo_b = Echo::plain("beta");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            ca_secret("client-ca", "default", pki.ca_pem()),
            tls_host(
                "a",
                "a.example",
                &a,
                "tls:\n  ca_secret: client-ca\n  cert_required: true",
            ),
            tls_host("b", "b.example", &b, ""),
            mapping("a", "", "/a/", &echo_a, "hostname: a.example"),
            mapping("b", "", "/b/", &echo_b, "hostname: b.example"),
        ],
    );
    let session = dir.path().join("b-session.pem");
    let first = s_client(
        port,
        "b.example",
        pki.ca_pem_path(),
        "GET /b/ HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        None,
        Some(&session),
    );
    assert!(first.contains("\"server\":\"beta\""), "{first}");
    // TLS 1.3 resumption is decided before the SNI is looked at, so a
    // ticket from B would open A without a client certificate. The gateway
    // issues no tickets and caches no sessions: there is nothing to resume.
    assert!(
        !session.exists(),
        "the gateway issued a resumable session; resuming it with SNI a.example would \
         skip A's client-certificate check:\n{first}"
    );
}

// ---------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------

/// HTTP/2 is offered by ALPN only to Hosts whose context lists `h2`: curl
/// speaks HTTP/2 to that Host (and the upstream gets the request) and
/// HTTP/1.1 to the other; the 421 binding holds on HTTP/2 too.
#[test]
fn http2_only_for_hosts_whose_context_lists_h2() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let h2 = pki.issue_server("h2.example", &[]);
    let h1 = pki.issue_server("h1.example", &[]);
    let echo = Echo::plain("upstream");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            doc(
                "TLSContext",
                "name: h2-context",
                "hosts: [h2.example]\nalpn_protocols: h2,http/1.1",
            ),
            tls_host("h2", "h2.example", &h2, "tlsContext:\n  name: h2-context"),
            tls_host("h1", "h1.example", &h1, ""),
            mapping("svc", "", "/svc/", &echo, "hostname: \"*\""),
        ],
    );
    let ca = pki.ca_pem_path();

    let got = curl_http2(port, "h2.example", ca, "/svc/over-h2", &[]);
    assert_eq!(
        (got.version.as_str(), got.status),
        ("2", 200),
        "{}",
        got.body
    );
    let reply: serde_json::Value = serde_json::from_str(&got.body).expect("echo JSON");
    assert_eq!(reply["server"], "upstream", "{}", got.body);
    assert_eq!(reply["uri"], "/over-h2", "{}", got.body);

    let got = curl_http2(port, "h1.example", ca, "/svc/over-h1", &[]);
    assert_eq!(
        (got.version.as_str(), got.status),
        ("1.1", 200),
        "{}",
        got.body
    );
    let reply: serde_json::Value = serde_json::from_str(&got.body).expect("echo JSON");
    assert_eq!(reply["server"], "upstream", "{}", got.body);

    // The same answer from OpenSSL's ALPN.
    for (name, expected) in [("h2.example", "h2"), ("h1.example", "http/1.1")] {
        let stream = tls_connect(port, &TlsOpts::new(ca, name).alpn(&["h2", "http/1.1"]))
            .unwrap_or_else(|e| panic!("{e}"));
        let selected = stream.ssl().selected_alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(selected.as_deref(), Some(expected.as_bytes()), "{name}");
    }

    // The :authority of an HTTP/2 request is bound to the SNI's Host too.
    let got = curl_http2(port, "h2.example", ca, "/svc/", &["Host: h1.example"]);
    assert_eq!(
        (got.version.as_str(), got.status),
        ("2", 421),
        "{}",
        got.body
    );
}

/// Each Host keeps its own min_tls_version on a listener it shares with a
/// laxer Host. OpenSSL settles the version before it knows the SNI, so the
/// listener allows the loosest bounds: a TLS 1.2 client used to reach the
/// Host that asks for TLS 1.3.
#[test]
fn a_hosts_min_tls_version_holds_on_a_shared_listener() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let strict = pki.issue_server("strict.example", &[]);
    let lax = pki.issue_server("lax.example", &[]);
    let echo = Echo::plain("upstream");
    let port = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            doc(
                "TLSContext",
                "name: strict-context",
                "hosts: [strict.example]\nmin_tls_version: v1.3",
            ),
            tls_host(
                "strict",
                "strict.example",
                &strict,
                "tlsContext:\n  name: strict-context",
            ),
            tls_host("lax", "lax.example", &lax, ""),
            mapping("svc", "", "/svc/", &echo, "hostname: \"*\""),
        ],
    );
    let status = |name: &str, max: Option<SslVersion>| {
        let mut opts = TlsOpts::new(pki.ca_pem_path(), name);
        if let Some(max) = max {
            opts = opts.max_version(max);
        }
        Request::get("/svc/")
            .try_send_tls(port, &opts)
            .map(|r| r.status)
    };
    assert_eq!(status("strict.example", None), Ok(200));
    assert!(status("strict.example", Some(SslVersion::TLS1_2)).is_err());
    assert_eq!(status("lax.example", Some(SslVersion::TLS1_2)), Ok(200));
}

// ---------------------------------------------------------------------------
// Insecure requests (Emissary's Host acceptance scenarios)
// ---------------------------------------------------------------------------

/// One TLS Host with a mappingSelector and a labelled Mapping without
/// hostname: HTTPS 200 with the Host's certificate; HTTP 301 to https (the
/// default action is Redirect), path and query kept.
#[test]
fn a_single_tls_host_redirects_cleartext() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("h46.example", &[]);
    let echo = Echo::plain("target");
    let (http, https) = (free_port(), free_port());
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("http", http, "HTTP"),
            listener("https", https, "HTTPS"),
            tls_host(
                "h46",
                "h46.example",
                &cert,
                "mappingSelector:\n  matchLabels:\n    app: target",
            ),
            mapping("target", ", labels: {app: target}", "/target/", &echo, ""),
        ],
    );

    let (response, presented) = get_tls(
        https,
        &TlsOpts::new(pki.ca_pem_path(), "h46.example"),
        "/target/",
    );
    assert_cert_for(&presented, "h46.example");
    assert_eq!(served_by(&response), "target");

    let response = get_http(http, "h46.example", "/target/");
    assert_eq!(response.status, 301, "{}", response.text());
    assert_eq!(
        response.header("location"),
        Some("https://h46.example/target/")
    );
    let response = get_http(http, "h46.example", "/target/x?y=1");
    assert_eq!(response.status, 301, "{}", response.text());
    assert_eq!(
        response.header("location"),
        Some("https://h46.example/target/x?y=1")
    );
}

/// Only an HTTPS Listener and `insecure.action: Reject`: HTTPS 200; there
/// is no cleartext port at all (pingress listens on the HTTPS port and the
/// admin port only: no default 8080), and cleartext HTTP on the HTTPS port
/// gets no HTTP answer.
#[test]
fn reject_without_an_http_listener() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("h47.example", &[]);
    let echo = Echo::plain("target");
    let https = free_port();
    let gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", https, "HTTPS"),
            tls_host("h47", "h47.example", &cert, &insecure_action("Reject")),
            mapping("target", "", "/target/", &echo, "hostname: \"*\""),
        ],
    );

    let (response, _) = get_tls(
        https,
        &TlsOpts::new(pki.ca_pem_path(), "h47.example"),
        "/target/",
    );
    assert_eq!(served_by(&response), "target");

    assert_eq!(
        listening_ports(gw.pid()),
        BTreeSet::from([https, gw.admin_port()]),
        "pingress must listen on the HTTPS port and the admin port only"
    );
    let answer = raw_exchange(
        https,
        b"GET /target/ HTTP/1.1\r\nHost: h47.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(
        !answer.windows(5).any(|w| w == b"HTTP/"),
        "cleartext HTTP on the HTTPS port was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// A cleartext-only Host (no tlsSecret, `action: Route`) on an HTTP
/// Listener only: HTTP 200, and a TLS handshake fails.
#[test]
fn a_cleartext_only_host() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let echo = Echo::plain("target");
    let http = free_port();
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("http", http, "HTTP"),
            host("h48", "h48.example", &insecure_action("Route")),
            mapping("target", "", "/target/", &echo, "hostname: \"*\""),
        ],
    );

    assert_eq!(
        served_by(&get_http(http, "h48.example", "/target/")),
        "target"
    );
    let tls = Request::get("/target/").try_send_tls(
        http,
        &TlsOpts::new(pki.ca_pem_path(), "h48.example").verify_name(None),
    );
    assert!(tls.is_err(), "TLS to a cleartext-only gateway: {tls:?}");
}

/// Three TLS Hosts with three insecure actions. Each Host serves only its
/// Mappings over TLS, with the certificate whose CN is the SNI; a
/// `hostname: "*"` Mapping labelled for both selecting Hosts is served by
/// all three. Over HTTP: h1 (Route) 200; h2 (Redirect) 301 (for unmapped
/// paths too: a documented difference from Emissary's 404); h3 (Reject) 404
/// for everything but `/.well-known/acme-challenge/`, which every Host
/// routes whatever its action.
#[test]
fn three_hosts_three_insecure_actions() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let echo1 = Echo::plain("one");
    let echo2 = Echo::plain("two");
    let echo3 = Echo::plain("three");
    let shared = Echo::plain("shared");
    let acme = Echo::plain("acme");
    let (http, https) = (free_port(), free_port());
    let cert = |n: &str| pki.issue_server(&format!("{n}.example"), &[]);
    let docs = [
        listener("http", http, "HTTP"),
        listener("https", https, "HTTPS"),
        tls_host(
            "h1",
            "h1.example",
            &cert("h1"),
            &format!(
                "{}mappingSelector:\n  matchLabels:\n    h1: \"yes\"",
                insecure_action("Route")
            ),
        ),
        tls_host(
            "h2",
            "h2.example",
            &cert("h2"),
            &insecure_action("Redirect"),
        ),
        tls_host(
            "h3",
            "h3.example",
            &cert("h3"),
            &format!(
                "{}mappingSelector:\n  matchLabels:\n    h3: \"yes\"",
                insecure_action("Reject")
            ),
        ),
        mapping(
            "m1",
            ", labels: {h1: \"yes\"}",
            "/m1/",
            &echo1,
            "hostname: h1.example",
        ),
        mapping("m2", "", "/m2/", &echo2, "hostname: h2.example"),
        mapping(
            "m3",
            ", labels: {h3: \"yes\"}",
            "/m3/",
            &echo3,
            "hostname: h3.example",
        ),
        mapping(
            "all",
            ", labels: {h1: \"yes\", h3: \"yes\"}",
            "/all/",
            &shared,
            "hostname: \"*\"",
        ),
        mapping(
            "acme",
            ", labels: {h1: \"yes\", h3: \"yes\"}",
            "/.well-known/acme-challenge/",
            &acme,
            "hostname: \"*\"",
        ),
    ];
    let gw = start_gateway_without_listener(dir.path(), &docs);
    let report = check(dir.path());
    assert!(
        report.success()
            && report.stdout.contains("configuration OK (0 warning(s))")
            && !report
                .stdout
                .lines()
                .any(|l| l.starts_with("error") || l.starts_with("warning")),
        "the configuration must be clean:\n{}",
        report.combined()
    );

    let own = [
        ("h1", "/m1/", "one"),
        ("h2", "/m2/", "two"),
        ("h3", "/m3/", "three"),
    ];
    for (n, path, echo) in own {
        let name = format!("{n}.example");
        let opts = TlsOpts::new(pki.ca_pem_path(), &name);
        let (response, cert) = get_tls(https, &opts, path);
        assert_cert_for(&cert, &name);
        assert_eq!(served_by(&response), echo, "HTTPS {name}{path}");
        for (_, other, _) in own.iter().filter(|(m, _, _)| *m != n) {
            let (response, _) = get_tls(https, &opts, other);
            assert_eq!(
                response.status,
                404,
                "HTTPS {name}{other}: {}",
                response.text()
            );
        }
        let (response, _) = get_tls(https, &opts, "/all/");
        assert_eq!(served_by(&response), "shared", "HTTPS {name}/all/");
        let (response, _) = get_tls(https, &opts, "/.well-known/acme-challenge/t");
        assert_eq!(served_by(&response), "acme", "HTTPS {name} acme");
    }

    // h1: Route.
    assert_eq!(served_by(&get_http(http, "h1.example", "/m1/")), "one");
    assert_eq!(served_by(&get_http(http, "h1.example", "/all/")), "shared");
    assert_eq!(get_http(http, "h1.example", "/m2/").status, 404);
    // h2: Redirect.
    for path in ["/m2/", "/all/", "/m1/"] {
        let response = get_http(http, "h2.example", path);
        assert_eq!(response.status, 301, "HTTP h2.example{path}");
        assert_eq!(
            response.header("location"),
            Some(format!("https://h2.example{path}").as_str())
        );
    }
    // h3: Reject.
    for path in ["/m3/", "/all/", "/m1/"] {
        let response = get_http(http, "h3.example", path);
        assert_eq!(response.status, 404, "HTTP h3.example{path}");
        assert!(!response.is_echo(), "{}", response.text());
    }
    // The ACME challenge is routed whatever the action.
    for n in ["h1", "h2", "h3"] {
        let response = get_http(
            http,
            &format!("{n}.example"),
            "/.well-known/acme-challenge/t",
        );
        assert_eq!(served_by(&response), "acme", "HTTP {n} acme");
    }
    drop(gw);
}

/// Hosts `*` (Redirect), `*.domain.com` (Route) and `a.domain.com`
/// (Redirect), one Mapping `hostname: "*"`. Over TLS every name is served,
/// each with its Host's certificate (no SNI: the `*` Host's). Over HTTP the
/// most specific Host's action wins: exact over wildcard over `*`.
#[test]
fn the_most_specific_host_decides() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let star = pki.issue_server("catch-all.test", &[]);
    let wild = pki.issue_server("*.domain.com", &[]);
    let exact = pki.issue_server("a.domain.com", &[]);
    let echo = Echo::plain("target");
    let (http, https) = (free_port(), free_port());
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("http", http, "HTTP"),
            listener("https", https, "HTTPS"),
            tls_host("star", "*", &star, &insecure_action("Redirect")),
            tls_host("wild", "*.domain.com", &wild, &insecure_action("Route")),
            tls_host(
                "exact",
                "a.domain.com",
                &exact,
                &insecure_action("Redirect"),
            ),
            mapping("target", "", "/target/", &echo, "hostname: \"*\""),
        ],
    );
    let ca = pki.ca_pem_path();

    for (sni, cert_name) in [
        ("a.domain.com", "a.domain.com"),
        ("wc.domain.com", "*.domain.com"),
    ] {
        let (response, cert) = get_tls(https, &TlsOpts::new(ca, sni), "/target/");
        assert_cert_for(&cert, cert_name);
        assert_eq!(served_by(&response), "target", "HTTPS {sni}");
    }
    let no_sni = TlsOpts::new(ca, "catch-all.test").no_sni();
    let response = Request::get("/target/")
        .header("Host", "127.0.0.1")
        .try_send_tls_peer(https, &no_sni)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_cert_for(&response.1, "catch-all.test");
    assert_eq!(served_by(&response.0), "target", "HTTPS 127.0.0.1");

    let response = get_http(http, "a.domain.com", "/target/");
    assert_eq!(
        response.status,
        301,
        "HTTP a.domain.com: {}",
        response.text()
    );
    assert_eq!(
        response.header("location"),
        Some("https://a.domain.com/target/")
    );
    assert_eq!(
        served_by(&get_http(http, "wc.domain.com", "/target/")),
        "target",
        "HTTP wc.domain.com"
    );
    let response = get_http(http, "127.0.0.1", "/target/");
    assert_eq!(response.status, 301, "HTTP 127.0.0.1: {}", response.text());
    assert_eq!(
        response.header("location"),
        Some("https://127.0.0.1/target/")
    );
}

/// A cleartext `*` Host (Redirect) and a TLS Host h1 (Route). HTTP to h1
/// 200, to another name 301; HTTPS with SNI h1 200; HTTPS with an unknown
/// SNI, or none, falls into no cleartext chain: the handshake ends with an
/// alert and never a plaintext response (Emissary's defect).
#[test]
fn an_unknown_sni_next_to_a_cleartext_star_host() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("h1.example", &[]);
    let echo = Echo::plain("target");
    let (http, https) = (free_port(), free_port());
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("http", http, "HTTP"),
            listener("https", https, "HTTPS"),
            host("star", "*", &insecure_action("Redirect")),
            tls_host("h1", "h1.example", &cert, &insecure_action("Route")),
            mapping("target", "", "/target/", &echo, "hostname: \"*\""),
        ],
    );

    assert_eq!(
        served_by(&get_http(http, "h1.example", "/target/")),
        "target"
    );
    let response = get_http(http, "unknown.example", "/target/");
    assert_eq!(response.status, 301, "{}", response.text());
    assert_eq!(
        response.header("location"),
        Some("https://unknown.example/target/")
    );

    let (response, presented) = get_tls(
        https,
        &TlsOpts::new(pki.ca_pem_path(), "h1.example"),
        "/target/",
    );
    assert_cert_for(&presented, "h1.example");
    assert_eq!(served_by(&response), "target");

    assert_handshake_refused(https, Some("unknown.example"));
    assert_handshake_refused(https, None);
}

/// Over TLS the request is secure (XFP, l7Depth 0): a Redirect Host serves
/// it, and the upstream sees exactly `x-forwarded-proto: https` even when
/// the client claims `http`. A cleartext client claiming `https` is still
/// insecure and redirected.
#[test]
fn upstream_sees_x_forwarded_proto_https_over_tls() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("xfp.example", &[]);
    let echo = Echo::plain("target");
    let (http, https) = (free_port(), free_port());
    let _gw = start_gateway_without_listener(
        dir.path(),
        &[
            listener("http", http, "HTTP"),
            listener("https", https, "HTTPS"),
            tls_host("xfp", "xfp.example", &cert, &insecure_action("Redirect")),
            mapping("target", "", "/target/", &echo, "hostname: \"*\""),
        ],
    );
    let opts = TlsOpts::new(pki.ca_pem_path(), "xfp.example");

    let (response, _) = get_tls(https, &opts, "/target/");
    assert_eq!(served_by(&response), "target");
    assert_eq!(
        response.echo().headers_all("x-forwarded-proto"),
        vec!["https"]
    );
    let response = Request::get("/target/")
        .header("X-Forwarded-Proto", "http")
        .send_tls(https, &opts);
    assert_eq!(served_by(&response), "target");
    assert_eq!(
        response.echo().headers_all("x-forwarded-proto"),
        vec!["https"]
    );

    let response = Request::get("/target/")
        .header("Host", "xfp.example")
        .header("X-Forwarded-Proto", "https")
        .send(http);
    assert_eq!(response.status, 301, "{}", response.text());
}

// ---------------------------------------------------------------------------
// `pingress -t`
// ---------------------------------------------------------------------------

/// Runs `pingress -t` on an HTTPS Listener plus `docs`.
fn check_docs(docs: &[String]) -> Output {
    let dir = tempdir();
    let mut all = vec![listener("https", 8443, "HTTPS")];
    all.extend_from_slice(docs);
    write_gateway_without_listener(dir.path(), 8877, &all.concat());
    check(dir.path())
}

/// The report has a line starting with `severity` that contains every one
/// of `parts`.
fn assert_reported(out: &Output, severity: &str, parts: &[&str]) {
    let found = out
        .stdout
        .lines()
        .any(|l| l.starts_with(severity) && parts.iter().all(|p| l.contains(p)));
    assert!(
        found,
        "no `{severity}` line with {parts:?} in:\n{}",
        out.combined()
    );
}

#[test]
fn check_reports_a_missing_tls_secret() {
    let out = check_docs(&[host("h", "h.example", &tls_spec("missing-cert", None))]);
    assert_eq!(out.code, 1, "{}", out.combined());
    assert_reported(
        &out,
        "error:",
        &[
            "Host default/h: spec.tlsSecret:",
            "Secret default/missing-cert unknown",
        ],
    );
}

#[test]
fn check_reports_a_key_that_does_not_match_the_certificate() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let cert = pki.issue_server("h.example", &[]);
    let other = pki.issue_server("other.example", &[]);
    let mut mixed = cert.clone();
    mixed.key_pem = other.key_pem.clone();
    let out = check_docs(&[tls_host("h", "h.example", &mixed, "")]);
    assert_eq!(out.code, 1, "{}", out.combined());
    assert_reported(
        &out,
        "error:",
        &[
            "Host default/h: spec.tlsSecret:",
            "tls.key does not match the certificate in tls.crt of Secret default/h-cert",
        ],
    );
}

#[test]
fn check_reports_a_tls_context_with_another_certificate() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let cert = pki.issue_server("h.example", &[]);
    let other = pki.issue_server("other.example", &[]);
    let out = check_docs(&[
        tls_secret("other-cert", "default", &other),
        doc(
            "TLSContext",
            "name: h-context",
            "hosts: [h.example]\nsecret: other-cert",
        ),
        tls_host("h", "h.example", &cert, "tlsContext:\n  name: h-context"),
    ]);
    assert_eq!(out.code, 1, "{}", out.combined());
    assert_reported(
        &out,
        "error:",
        &["Host default/h: spec.tlsContext:", "Secret info mismatch"],
    );
}

#[test]
fn check_reports_cert_required_without_a_ca() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let cert = pki.issue_server("h.example", &[]);
    let out = check_docs(&[tls_host(
        "h",
        "h.example",
        &cert,
        "tls:\n  cert_required: true",
    )]);
    assert_eq!(out.code, 1, "{}", out.combined());
    assert_reported(
        &out,
        "error:",
        &[
            "Host default/h:",
            "cert_required needs a CA to verify client certificates against",
        ],
    );
}

/// `cert_required` without a CA is the TLSContext's own error, wherever it
/// terminates: a TCPMapping terminating with it used to verify nothing and
/// let every client in. Cipher and curve lists OpenSSL does not take are
/// errors of the context too, not a Host that fails every handshake or a
/// listener that cannot start.
#[test]
fn check_reports_tls_contexts_openssl_would_not_enforce() {
    let out = check_docs(&[
        doc(
            "TLSContext",
            "name: open",
            "hosts: [t.example]\ncert_required: true",
        ),
        doc(
            "TLSContext",
            "name: ciphers",
            "hosts: []\ncipher_suites: [TLS_AES_128_GCM_SHA256]",
        ),
        doc(
            "TLSContext",
            "name: curves",
            "hosts: []\necdh_curves: [X25519, P-257]",
        ),
    ]);
    assert_eq!(out.code, 1, "{}", out.combined());
    assert_reported(
        &out,
        "error:",
        &["TLSContext default/open: spec.cert_required:", "needs a CA"],
    );
    assert_reported(
        &out,
        "error:",
        &["TLSContext default/ciphers: spec.cipher_suites:"],
    );
    assert_reported(
        &out,
        "error:",
        &["TLSContext default/curves: spec.ecdh_curves:"],
    );
}

/// A Host without tlsContext takes `<host>-context` (Emissary's implicit
/// link). When that context is invalid, the Host fails closed: it used to
/// fall back to the defaults and serve without the client certificates
/// the context demands.
#[test]
fn an_invalid_implicit_context_does_not_drop_its_client_certificate_demand() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("h.example", &[]);
    let echo = Echo::plain("upstream");
    let port = free_port();
    let gateway = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            doc(
                "TLSContext",
                "name: h-context",
                "hosts: [h.example]\ncert_required: true\nca_secret: client-ca-typo",
            ),
            tls_host("h", "h.example", &cert, ""),
            mapping("svc", "", "/svc/", &echo, "hostname: \"*\""),
        ],
    );
    let anonymous =
        Request::get("/svc/").try_send_tls(port, &TlsOpts::new(pki.ca_pem_path(), "h.example"));
    assert!(
        anonymous.is_err(),
        "served without a client certificate: {:?}\n{}",
        anonymous.map(|r| r.status),
        gateway.log()
    );
}

/// An expired server certificate is a warning that gives the date; the
/// Host is still accepted.
fn assert_expiry_warning(expired_at: i64) {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let cert = pki.issue_server_valid("old.example", expired_at - 90 * 86_400, expired_at);
    let date = Asn1Time::from_unix(expired_at)
        .expect("asn1 time")
        .to_string();
    let out = check_docs(&[tls_host("old", "old.example", &cert, "")]);
    assert_eq!(out.code, 0, "{}", out.combined());
    assert_reported(
        &out,
        "warning:",
        &[
            "Host default/old: spec.tlsSecret:",
            "CN=old.example",
            &format!("expired on {date}"),
        ],
    );
    assert!(out.stdout.contains("Host: 1 accepted"), "{}", out.stdout);
}

#[test]
fn check_warns_about_an_expired_certificate_with_its_date() {
    assert_expiry_warning(now_unix() - 3 * 86_400);
}

#[test]

fn check_warns_about_a_certificate_that_expired_hours_ago() {
    assert_expiry_warning(now_unix() - 2 * 3600);
}
