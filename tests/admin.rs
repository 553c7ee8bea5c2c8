//! The admin listener promises: `/metrics` counts what happened (and holds
//! no certificate material), `/ambassador/v0/diag/` shows the route table in
//! evaluation order and errors keyed as Emissary keys them.

mod support;

use support::*;

fn mapping(name: &str, prefix: &str, service: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n\
         spec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: {service}\n{extra}"
    )
}

/// The value of one sample line of a Prometheus text exposition.
fn sample(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| {
            line.starts_with(name_and_labels) && line[name_and_labels.len()..].starts_with(' ')
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[test]
fn metrics_count_requests_failures_and_certificates() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("gateway");
    let echo = Echo::plain("echo");
    let mtls = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let closed = free_port();
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: client\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.crt: {}\n  tls.key: {}\n",
        serde_json::to_string(&client.cert_pem).unwrap(),
        serde_json::to_string(&client.key_pem).unwrap()
    );
    let resources = [
        secret,
        "---\napiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata:\n  name: upstream\n\
         spec:\n  hosts: []\n  secret: client\n"
            .to_string(),
        mapping("svc", "/svc/", &format!("127.0.0.1:{}", echo.port()), ""),
        mapping("dead", "/dead/", &format!("127.0.0.1:{closed}"), ""),
        mapping("idle", "/idle/", &format!("127.0.0.1:{}", echo.port()), ""),
        mapping(
            "secure",
            "/secure/",
            &format!("https://localhost:{}", mtls.port()),
            "  tls: upstream\n",
        ),
    ]
    .concat();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    let mut keepalive = Client::connect(port);
    for _ in 0..5 {
        assert_eq!(keepalive.get("/svc/").status, 200);
    }
    for _ in 0..4 {
        assert_eq!(keepalive.get("/secure/").status, 200);
    }
    assert_eq!(Request::get("/dead/").send(port).status, 503);
    assert_eq!(Request::get("/nowhere").send(port).status, 404);

    // Requests are counted when their logging phase runs, just after the
    // response is sent: wait for the last one to be counted.
    let mut metrics = String::new();
    let counted = poll_until(std::time::Duration::from_secs(5), || {
        let reply = gateway.admin_get("/metrics");
        assert_eq!(reply.status, 200);
        metrics = reply.text();
        sample(
            &metrics,
            "pingress_local_replies_total{reason=\"no_route\"}",
        )
        .is_some()
            && sample(
                &metrics,
                "pingress_requests_total{class=\"5xx\",mapping=\"dead.default\"}",
            )
            .is_some()
    });
    assert!(counted, "{metrics}");
    let value = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(
        value("pingress_requests_total{class=\"2xx\",mapping=\"svc.default\"}"),
        5.0
    );
    assert_eq!(
        value("pingress_requests_total{class=\"2xx\",mapping=\"secure.default\"}"),
        4.0
    );
    assert_eq!(
        value("pingress_requests_total{class=\"5xx\",mapping=\"dead.default\"}"),
        1.0
    );
    assert_eq!(
        value("pingress_upstream_errors_total{kind=\"connect\",mapping=\"dead.default\"}"),
        1.0
    );
    assert_eq!(
        value("pingress_local_replies_total{reason=\"no_route\"}"),
        1.0
    );
    assert_eq!(
        value("pingress_request_duration_seconds_count{mapping=\"svc.default\"}"),
        5.0
    );
    assert_eq!(value("pingress_config_generation"), 1.0);
    // Pooling: four requests on one downstream connection need one upstream
    // TLS handshake, not four.
    assert_eq!(value("pingress_upstream_tls_handshakes_total"), 1.0);
    assert!(value("pingress_upstream_connections_reused_total") >= 6.0);
    let expiry = value("pingress_certificate_expiry_timestamp_seconds{context=\"upstream.default\",role=\"client\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now && expiry < now + 31.0 * 86_400.0, "{expiry}");
    assert!(
        !metrics.contains("BEGIN"),
        "certificate material in /metrics"
    );
    // A Mapping without traffic has no series: large configurations stay
    // cheap to scrape.
    assert!(!metrics.contains("idle.default"), "{metrics}");
}

#[test]
fn diag_shows_routes_in_order_and_errors_by_resource() {
    let dir = tempdir();
    let resources = [
        mapping("short", "/a/", "127.0.0.1:9", ""),
        mapping("long", "/a/b/", "127.0.0.1:9", ""),
        mapping("canary", "/a/b/", "127.0.0.1:10", "  weight: 25\n"),
        mapping("broken", "/broken/", "127.0.0.1:9", "  timeout_ms: soon\n"),
    ]
    .concat();
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    let reply = gateway.admin_get("/ambassador/v0/diag/?json=true");
    assert_eq!(reply.status, 200);
    let diag: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let routes = diag["routes"].as_array().unwrap();
    let order: Vec<&str> = routes
        .iter()
        .map(|r| r["match"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["prefix /a/b/", "prefix /a/"], "{diag:#}");
    let canary = &routes[0]["mappings"];
    assert_eq!(canary[0]["mapping"], "canary.default");
    assert_eq!(canary[0]["weight"], 25);
    assert_eq!(canary[1]["weight"], 75);
    // The broken Mapping is document 5 of the file (the Listener is first).
    let errors = &diag["errors"]["broken.default.5"];
    assert!(
        errors[0].as_str().unwrap().contains("spec.timeout_ms"),
        "{diag:#}"
    );

    let reply = gateway.admin_get("/ambassador/v0/diag/?json=true&filter=errors");
    let pairs: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(pairs.as_array().unwrap().len(), 1, "{pairs:#}");
    assert_eq!(pairs[0][0], "broken.default.5");

    let text = gateway.admin_get("/ambassador/v0/diag/").text();
    assert!(text.contains("routes, in evaluation order"), "{text}");
}

/// A local address other than loopback, to reach the admin listener as a
/// client from elsewhere would.
fn non_loopback_ip() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    // Connecting a UDP socket sends nothing; it only picks the source.
    probe
        .connect("192.0.2.1:9")
        .expect("this test needs a network interface besides loopback");
    let ip = probe.local_addr().expect("a local address").ip();
    assert!(!ip.is_loopback(), "{ip}");
    ip
}

/// GET `path` on `ip:port` with `Connection: close`: the status.
fn get_from(ip: std::net::IpAddr, port: u16, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect((ip, port)).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("write");
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// Writes a gateway whose admin listener takes every address, with
/// `resources`.
fn admin_on_all_addresses(resources: &str) -> (tempfile::TempDir, u16, u16) {
    let dir = tempdir();
    let (port, admin) = (free_port(), free_port());
    write_gateway(dir.path(), port, admin, resources);
    let path = dir.path().join("gateway.yaml");
    let text = std::fs::read_to_string(&path).expect("gateway.yaml");
    std::fs::write(
        &path,
        text.replace(&format!("127.0.0.1:{admin}"), &format!("0.0.0.0:{admin}")),
    )
    .expect("gateway.yaml");
    (dir, port, admin)
}

/// Emissary's rule: the diag shows every route and error, so it answers
/// loopback clients only unless the Module's diagnostics.allow_non_local
/// says otherwise. Probes and metrics answer everyone.
#[test]
fn the_diag_answers_loopback_clients_only_unless_allowed() {
    let (dir, _port, admin) = admin_on_all_addresses("");
    let gateway = Gateway::start(dir.path());
    let remote = non_loopback_ip();
    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();

    for path in ["/ambassador/v0/diag/", "/ambassador/v0/diag/?json=true"] {
        assert_eq!(get_from(remote, admin, path), 403, "{path}");
        assert_eq!(get_from(loopback, admin, path), 200, "{path}");
    }
    assert_eq!(get_from(remote, admin, "/ambassador/v0/check_alive"), 200);
    assert_eq!(get_from(remote, admin, "/metrics"), 200);

    let before = gateway.metric("pingress_config_generation").unwrap_or(0.0);
    let module = module("diagnostics:\n  allow_non_local: true");
    let file = dir.path().join("resources").join("test.yaml");
    let text = std::fs::read_to_string(&file).expect("resources");
    std::fs::write(&file, text + &module).expect("resources");
    assert!(poll_until(std::time::Duration::from_secs(10), || {
        gateway.metric("pingress_config_generation").unwrap_or(0.0) > before
    }));
    assert_eq!(get_from(remote, admin, "/ambassador/v0/diag/"), 200);
}

/// The admin listener has one thread: the liveness probe must answer while
/// clients loop on the diag of a large configuration.
#[test]
fn probes_answer_while_the_diag_is_flooded() {
    let resources: String = (0..3000)
        .map(|i| mapping(&format!("m{i}"), &format!("/m{i}/"), "127.0.0.1:9", ""))
        .collect();
    let dir = tempdir();
    let admin = free_port();
    write_gateway(dir.path(), free_port(), admin, &resources);
    let gateway = Gateway::start(dir.path());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = get_from([127, 0, 0, 1].into(), admin, "/ambassador/v0/diag/");
                }
            })
        })
        .collect();
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let alive = get_from([127, 0, 0, 1].into(), admin, "/ambassador/v0/check_alive");
        assert_eq!(alive, 200);
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().expect("flooder");
    }
    // Kubernetes' default probe timeout is 1 s.
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "a probe took {slowest:?}\n{}",
        gateway.log().lines().take(5).collect::<Vec<_>>().join("\n")
    );
}
