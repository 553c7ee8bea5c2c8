//! The seed scenario: the gateway originates TLS to upstreams that demand a
//! client certificate, presenting the one its TLSContext loads from a
//! Secret or from files, and verifies the upstream when the context has a CA.

mod support;

use std::path::Path;

use support::*;

fn tls_context(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: {name}\n\
         spec:\n  hosts: []\n{body}"
    )
}

fn mapping(name: &str, prefix: &str, service: &str, tls: Option<&str>) -> String {
    let tls = tls.map(|t| format!("  tls: {t}\n")).unwrap_or_default();
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n\
         spec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {service}\n{tls}"
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    gateway: Gateway,
    port: u16,
}

fn start(dir: tempfile::TempDir, resources: &str) -> Setup {
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), resources);
    let gateway = Gateway::start(dir.path());
    Setup {
        _dir: dir,
        gateway,
        port,
    }
}

fn client_subject(response: &Response) -> Option<String> {
    response.echo_ok().client_cert_subject()
}

fn file_path(path: &Path) -> String {
    serde_json::to_string(&path.to_string_lossy()).expect("a path serializes as JSON")
}

#[test]
fn seed_client_certificate_from_secret_and_from_files() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let from_secret = pki.issue_client("gateway-secret");
    let from_files = pki.issue_client("gateway-files");
    let upstream = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let service = format!("https://localhost:{}", upstream.port());

    let resources = [
        tls_secret("upstream-certs", "default", &from_secret),
        tls_context("upstream-context", "  secret: upstream-certs\n"),
        tls_context(
            "files-context",
            &format!(
                "  cert_chain_file: {}\n  private_key_file: {}\n",
                file_path(&from_files.cert),
                file_path(&from_files.key)
            ),
        ),
        mapping("seed", "/seed/", &service, Some("upstream-context")),
        mapping("files", "/files/", &service, Some("files-context")),
    ]
    .concat();
    let s = start(dir, &resources);

    let reply = Request::get("/seed/hello").send(s.port);
    assert_eq!(client_subject(&reply), Some(from_secret.subject()));
    assert_eq!(reply.echo().uri(), "/hello");
    assert_eq!(reply.echo().sni().as_deref(), Some("localhost"));

    let reply = Request::get("/files/x").send(s.port);
    assert_eq!(client_subject(&reply), Some(from_files.subject()));
    drop(s.gateway);
}

#[test]
fn interleaved_mappings_each_present_their_own_certificate() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let one = pki.issue_client("tenant-one");
    let two = pki.issue_client("tenant-two");
    let upstream = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let service = format!("https://localhost:{}", upstream.port());
    let resources = [
        tls_secret("one-certs", "default", &one),
        tls_secret("two-certs", "default", &two),
        tls_context("one", "  secret: one-certs\n"),
        tls_context("two", "  secret: two-certs\n"),
        mapping("one", "/one/", &service, Some("one")),
        mapping("two", "/two/", &service, Some("two")),
    ]
    .concat();
    let s = start(dir, &resources);

    // Keep-alive downstream connections make the gateway reuse pooled
    // upstream connections: each must still carry its own identity.
    let mut client = Client::connect(s.port);
    let mut connections = std::collections::HashMap::new();
    for i in 0..40 {
        let (path, expected) = if i % 2 == 0 {
            ("/one/", &one)
        } else {
            ("/two/", &two)
        };
        let reply = client.get(path);
        assert_eq!(
            client_subject(&reply),
            Some(expected.subject()),
            "request {i}"
        );
        connections
            .entry(expected.subject_cn.clone())
            .or_insert_with(std::collections::HashSet::new)
            .insert(reply.echo().connection());
    }
    // Pooling works: far fewer upstream connections than requests, and no
    // connection ever served both identities.
    let a = &connections["tenant-one"];
    let b = &connections["tenant-two"];
    assert!(a.len() < 10 && b.len() < 10, "{connections:?}");
    assert!(a.is_disjoint(b), "{connections:?}");
}

#[test]
fn ca_verification_right_ca_passes_wrong_ca_fails_even_after_pooling() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let rogue = Pki::new_named(&dir.path().join("rogue"), "rogue");
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("gateway");
    let upstream = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let service = format!("https://localhost:{}", upstream.port());
    // Same client certificate, different trust: only the group key keeps
    // these two contexts from sharing a pooled connection.
    let resources = [
        tls_secret("client-certs", "default", &client),
        ca_secret("good-ca", "default", pki.ca_pem()),
        ca_secret("rogue-ca", "default", rogue.ca_pem()),
        tls_context("trusting", "  secret: client-certs\n  ca_secret: good-ca\n"),
        tls_context(
            "distrusting",
            "  secret: client-certs\n  ca_secret: rogue-ca\n",
        ),
        tls_context(
            "wrong-name",
            "  secret: client-certs\n  ca_secret: good-ca\n  sni: other.example\n",
        ),
        mapping("trusting", "/good/", &service, Some("trusting")),
        mapping("distrusting", "/bad/", &service, Some("distrusting")),
        mapping("wrong-name", "/name/", &service, Some("wrong-name")),
    ]
    .concat();
    let s = start(dir, &resources);

    let mut keepalive = Client::connect(s.port);
    assert_eq!(
        client_subject(&keepalive.get("/good/")),
        Some(client.subject())
    );
    let refused = keepalive.get("/bad/");
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert!(refused.text().contains("TLS"), "{}", refused.text());
    let refused = Request::get("/name/").send(s.port);
    assert_eq!(refused.status, 502, "{}", refused.text());
    assert_eq!(Request::get("/good/").send(s.port).status, 200);
}

#[test]
fn without_a_client_certificate_the_upstream_refuses() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let upstream = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let nginx = Nginx::mtls(&server, pki.ca_pem_path());
    let resources = [
        ca_secret("ca", "default", pki.ca_pem()),
        tls_context("verify-only", "  ca_secret: ca\n"),
        mapping(
            "echo",
            "/echo/",
            &format!("https://localhost:{}", upstream.port()),
            Some("verify-only"),
        ),
        mapping(
            "nginx",
            "/nginx/",
            &format!("https://localhost:{}", nginx.port()),
            Some("verify-only"),
        ),
    ]
    .concat();
    let s = start(dir, &resources);

    // The echo aborts the TLS session: the gateway reports a 502.
    assert_eq!(Request::get("/echo/").send(s.port).status, 502);
    // nginx completes the handshake and answers 400 itself: passed through.
    let reply = Request::get("/nginx/").send(s.port);
    assert_eq!(reply.status, 400);
    assert!(
        reply.text().contains("No required SSL certificate"),
        "{}",
        reply.text()
    );
}

#[test]
fn nginx_interop_sees_the_gateway_certificate() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("gateway-client");
    let nginx = Nginx::mtls(&server, pki.ca_pem_path());
    let resources = [
        tls_secret("upstream-certs", "default", &client),
        ca_secret("upstream-ca", "default", pki.ca_pem()),
        tls_context(
            "upstream-context",
            "  secret: upstream-certs\n  ca_secret: upstream-ca\n  alpn_protocols: http/1.1\n  min_tls_version: v1.2\n",
        ),
        mapping(
            "nginx",
            "/",
            &format!("https://localhost:{}", nginx.port()),
            Some("upstream-context"),
        ),
    ]
    .concat();
    let s = start(dir, &resources);
    let reply = Request::get("/").send(s.port);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "hello from nginx");
    assert_eq!(reply.header("x-client-verify"), Some("SUCCESS"));
    assert!(
        reply
            .header("x-client-dn")
            .is_some_and(|dn| dn.contains("CN=gateway-client")),
        "{:?}",
        reply.headers
    );
}

#[test]
fn tls_version_bounds_are_enforced() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("gateway");
    // The echo negotiates TLS 1.3; a context capped at 1.2 must not use it.
    let upstream = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let service = format!("https://localhost:{}", upstream.port());
    let resources = [
        tls_secret("client-certs", "default", &client),
        tls_context(
            "capped",
            "  secret: client-certs\n  max_tls_version: v1.2\n",
        ),
        tls_context(
            "modern",
            "  secret: client-certs\n  min_tls_version: v1.3\n",
        ),
        mapping("capped", "/capped/", &service, Some("capped")),
        mapping("modern", "/modern/", &service, Some("modern")),
    ]
    .concat();
    let s = start(dir, &resources);
    let reply = Request::get("/capped/").send(s.port);
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(reply.text().contains("TLSContext"), "{}", reply.text());
    assert_eq!(Request::get("/modern/").send(s.port).status, 200);
}

#[test]
fn https_service_without_context_originates_tls_without_verification() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let upstream = Echo::tls("tls", &server);
    let resources = mapping(
        "plain-tls",
        "/",
        &format!("https://localhost:{}", upstream.port()),
        None,
    );
    let s = start(dir, &resources);
    let reply = Request::get("/x").send(s.port);
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), s.gateway.log());
    let echo = reply.echo();
    assert!(echo.tls().is_some(), "the upstream saw cleartext");
    assert_eq!(echo.client_cert_subject(), None);
}

/// `upstream_tls: {verify: system}` in the gateway file.
fn verify_with_system_store(dir: &Path) {
    let path = dir.join("gateway.yaml");
    let gateway = std::fs::read_to_string(&path).expect("read gateway.yaml");
    std::fs::write(&path, format!("{gateway}upstream_tls:\n  verify: system\n"))
        .expect("write gateway.yaml");
}

/// A gateway started with extra environment variables (the system trust
/// store is found through `SSL_CERT_FILE`), killed on drop.
struct GatewayWithEnv {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl GatewayWithEnv {
    fn start(dir: &Path, admin_port: u16, env: &[(&str, &Path)]) -> GatewayWithEnv {
        let log = dir.join("gateway-env.log");
        let out = std::fs::File::create(&log).expect("create the log");
        let err = out.try_clone().expect("clone the log");
        let mut command = std::process::Command::new(PINGRESS);
        command
            .arg("-c")
            .arg(dir.join("gateway.yaml"))
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut gateway = GatewayWithEnv {
            child: command.spawn().expect("spawn pingress"),
            log,
        };
        let ready = poll_until(std::time::Duration::from_secs(20), || {
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("pingress exited ({status}):\n{}", gateway.log());
            }
            Request::get("/ambassador/v0/check_ready")
                .timeout(std::time::Duration::from_secs(2))
                .try_send(admin_port)
                .is_ok_and(|r| r.status == 200)
        });
        assert!(ready, "pingress not ready:\n{}", gateway.log());
        gateway
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GatewayWithEnv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `upstream_tls: {verify: system}`, TLS origination without a CA
/// verifies the upstream's chain against the system trust store and its
/// name against the SNI; without the setting (Emissary's default) the same
/// upstream is used unverified.
#[test]
fn system_trust_verifies_upstreams_without_a_ca() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let server = pki.issue_server("localhost", &["localhost"]);
    let upstream = Echo::tls("tls", &server);
    let service = format!("https://localhost:{}", upstream.port());
    let resources = [
        tls_context("named-otherwise", "  sni: other.example\n"),
        mapping("plain", "/plain/", &service, None),
        mapping("tls-true", "/tls-true/", &service, Some("true")),
        mapping("sni", "/sni/", &service, Some("named-otherwise")),
    ]
    .concat();

    // The default: encrypted, not verified, and `-t` says so.
    let unverified = tempdir();
    let port = free_port();
    write_gateway(unverified.path(), port, free_port(), &resources);
    let out = check(unverified.path());
    assert_eq!(out.code, 0, "{}", out.combined());
    assert_eq!(
        out.stdout.matches("not verified").count(),
        3,
        "{}",
        out.stdout
    );
    let gateway = Gateway::start(unverified.path());
    assert!(gateway.log().contains("not verified"), "{}", gateway.log());
    assert_eq!(Request::get("/plain/").send(port).status, 200);
    assert_eq!(Request::get("/tls-true/").send(port).status, 200);
    assert_eq!(Request::get("/sni/").send(port).status, 200);
    drop(gateway);

    // Verified against the system store, which does not know the test CA:
    // refused, as a TLS failure (502). `-t` has nothing left to warn about.
    let system = tempdir();
    let port = free_port();
    write_gateway(system.path(), port, free_port(), &resources);
    verify_with_system_store(system.path());
    let out = check(system.path());
    assert_eq!(out.code, 0, "{}", out.combined());
    assert!(!out.stdout.contains("not verified"), "{}", out.stdout);
    let gateway = Gateway::start(system.path());
    for path in ["/plain/", "/tls-true/", "/sni/"] {
        let reply = Request::get(path).send(port);
        assert_eq!(reply.status, 502, "{path}: {}", reply.text());
    }
    assert!(!gateway.log().contains("not verified"), "{}", gateway.log());
    drop(gateway);

    // A system store that holds the test CA (OpenSSL reads SSL_CERT_FILE):
    // the chain verifies, and the name is still checked against the SNI.
    let trusting = tempdir();
    let (port, admin) = (free_port(), free_port());
    write_gateway(trusting.path(), port, admin, &resources);
    verify_with_system_store(trusting.path());
    let gateway = GatewayWithEnv::start(
        trusting.path(),
        admin,
        &[("SSL_CERT_FILE", pki.ca_pem_path())],
    );
    let reply = Request::get("/plain/x").send(port);
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gateway.log());
    assert_eq!(reply.echo().sni().as_deref(), Some("localhost"));
    assert_eq!(Request::get("/tls-true/").send(port).status, 200);
    let reply = Request::get("/sni/").send(port);
    assert_eq!(reply.status, 502, "{}", reply.text());
}
