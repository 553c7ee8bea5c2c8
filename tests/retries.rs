//! `retry_policy`: a connection that breaks before the response is retried
//! (`reset`), within `num_retries`, and never for requests that change
//! state; without a policy the failure reaches the client. Responses whose
//! status the policy names (`5xx`, `gateway-error`, `retriable-4xx`) are
//! tried again inside `timeout_ms`, which bounds all tries together, so a
//! slow failing upstream ends in 504 as in Emissary.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// An upstream whose first `broken` connections close after reading the
/// request, without answering; later ones answer 200.
fn flaky_upstream(broken: usize) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let attempt = counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                match stream.read(&mut byte) {
                    Ok(1) => request.push(byte[0]),
                    _ => break,
                }
            }
            if attempt >= broken {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        }
    });
    (port, seen)
}

fn mapping(name: &str, prefix: &str, port: u16, extra: &str) -> String {
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n\
         spec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: 127.0.0.1:{port}\n{extra}"
    )
}

#[test]
fn resets_are_retried_within_the_budget() {
    let dir = tempdir();
    let (once, once_seen) = flaky_upstream(1);
    let (thrice, thrice_seen) = flaky_upstream(3);
    let (plain, plain_seen) = flaky_upstream(1);
    let (posted, posted_seen) = flaky_upstream(1);
    let policy = "  retry_policy:\n    retry_on: reset\n    num_retries: 2\n";
    let resources = [
        mapping("once", "/once/", once, policy),
        mapping("thrice", "/thrice/", thrice, policy),
        mapping("plain", "/plain/", plain, ""),
        mapping("posted", "/posted/", posted, policy),
    ]
    .concat();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    let reply = Request::get("/once/").send(port);
    assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gateway.log());
    assert_eq!(once_seen.load(Ordering::SeqCst), 2);

    // Two retries are not enough for three broken connections.
    assert_eq!(Request::get("/thrice/").send(port).status, 502);
    assert_eq!(thrice_seen.load(Ordering::SeqCst), 3);

    // Without a policy the reset reaches the client.
    assert_eq!(Request::get("/plain/").send(port).status, 502);
    assert_eq!(plain_seen.load(Ordering::SeqCst), 1);

    // A POST may have changed state upstream: never sent twice.
    assert_eq!(Request::post("/posted/", "x").send(port).status, 502);
    assert_eq!(posted_seen.load(Ordering::SeqCst), 1);
}

#[test]
fn retry_settings_are_checked() {
    let dir = tempdir();
    let resources = [
        mapping(
            "odd",
            "/odd/",
            9,
            "  retry_policy:\n    retry_on: sometimes\n",
        ),
        mapping(
            "slow",
            "/slow/",
            9,
            "  retry_policy:\n    retry_on: reset\n    per_try_timeout: \"5\"\n",
        ),
        mapping(
            "status",
            "/status/",
            9,
            "  retry_policy:\n    retry_on: 5xx, retriable-status-codes\n",
        ),
    ]
    .concat();
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(out.stdout.contains("Mapping default/odd: spec.retry_policy.retry_on: unknown retry_on condition \"sometimes\""), "{}", out.stdout);
    assert!(
        out.stdout.contains(
            "Mapping default/slow: spec.retry_policy.per_try_timeout: \"5\" is not a duration"
        ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("warning: resources/test.yaml document 4: Mapping default/status: spec.retry_policy.retry_on: retriable-status-codes needs a list of status codes that retry_policy has no field for"), "{}", out.stdout);
}

/// A request to `path` that the echo counts under `key`, failing its first
/// `fail` tries with `status`.
fn failing(path: &str, key: &str, fail: u32, status: u16) -> Request {
    Request::get(path).headers(&[
        ("x-echo-key", key),
        ("x-echo-fail-first", &fail.to_string()),
        ("x-echo-status", &status.to_string()),
    ])
}

/// How many requests with `key` reached the echo, asking it directly.
fn tries(echo: &Echo, key: &str) -> u64 {
    Request::get("/")
        .header("x-echo-key", key)
        .send(echo.port())
        .echo_ok()
        .attempt()
        - 1
}

#[test]
fn statuses_are_retried_within_the_budget() {
    let dir = tempdir();
    let echo = Echo::plain("flaky");
    let port_of = echo.port();
    let resources = [
        mapping(
            "gw",
            "/gw/",
            port_of,
            "  retry_policy:\n    retry_on: gateway-error\n    num_retries: 2\n",
        ),
        mapping(
            "five",
            "/five/",
            port_of,
            "  retry_policy:\n    retry_on: 5xx\n",
        ),
        mapping(
            "conflict",
            "/conflict/",
            port_of,
            "  retry_policy:\n    retry_on: retriable-4xx\n",
        ),
        mapping("plain", "/plain/", port_of, ""),
    ]
    .concat();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    let reply = failing("/gw/", "once", 1, 503).send(port);
    assert_eq!(reply.echo_ok().attempt(), 2, "{}", gateway.log());
    // Three 503s exhaust two retries: the last one reaches the client.
    let reply = failing("/gw/", "always", 5, 503).send(port);
    assert_eq!((reply.status, reply.echo().attempt()), (503, 3));
    // A 500 is not a gateway error.
    let reply = failing("/gw/", "internal", 1, 500).send(port);
    assert_eq!((reply.status, reply.echo().attempt()), (500, 1));
    let reply = failing("/conflict/", "conflict", 1, 409).send(port);
    assert_eq!(reply.echo_ok().attempt(), 2);
    let reply = failing("/plain/", "plain", 1, 503).send(port);
    assert_eq!((reply.status, reply.echo().attempt()), (503, 1));

    // As in Envoy, a status retry does not depend on the method: the
    // upstream said what became of the request. The buffered body goes
    // again.
    let reply = Request::post("/five/", "hello")
        .headers(&[("x-echo-key", "posted"), ("x-echo-fail-first", "1")])
        .send(port);
    let reply = reply.echo_ok();
    assert_eq!((reply.attempt(), reply.body_len()), (2, 5));
    // A body larger than Pingora's retry buffer (64 KiB) was streamed
    // upstream and cannot be sent again.
    let large = vec![b'x'; 256 * 1024];
    let reply = Request::post("/five/", large)
        .headers(&[("x-echo-key", "large"), ("x-echo-fail-first", "1")])
        .send(port);
    assert_eq!((reply.status, reply.echo().attempt()), (503, 1));

    // A dropped response leaves no unread bytes on a pooled connection:
    // the requests after it read their own answers.
    let mut client = Client::connect(port);
    for round in 0..5 {
        let key = format!("pooled-{round}");
        let reply = client.send(failing("/gw/", &key, 1, 503));
        assert_eq!(reply.echo_ok().attempt(), 2, "round {round}");
        let path = format!("/plain/{round}");
        assert_eq!(client.get(&path).echo_ok().uri(), format!("/{round}"));
    }

    assert_eq!(
        gateway.metric("pingress_upstream_retries_total{mapping=\"gw.default\"}"),
        Some(8.0)
    );
}

#[test]
fn retries_stay_inside_the_route_timeout() {
    let dir = tempdir();
    let echo = Echo::plain("slow");
    let module = "---\napiVersion: getambassador.io/v3alpha1\nkind: Module\nmetadata:\n  \
                  name: ambassador\nspec:\n  config:\n    retry_policy:\n      \
                  retry_on: retriable-4xx\n";
    let resources = [
        module.to_string(),
        mapping(
            "retried",
            "/retried/",
            echo.port(),
            "  timeout_ms: 3000\n  retry_policy:\n    retry_on: 5xx\n    num_retries: 4\n",
        ),
        mapping("plain", "/plain/", echo.port(), "  timeout_ms: 3000\n"),
        mapping(
            "per-try",
            "/per-try/",
            echo.port(),
            "  retry_policy:\n    retry_on: gateway-error\n    per_try_timeout: 300ms\n",
        ),
    ]
    .concat();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());
    let slow = |path: &str, key: &str, status: u16, delay_ms: u64| {
        let started = Instant::now();
        let reply = failing(path, key, 99, status)
            .header("x-echo-delay-ms", &delay_ms.to_string())
            .timeout(Duration::from_secs(10))
            .send(port);
        (reply.status, started.elapsed())
    };

    // A 500 after 2 s is retried; the retry runs out of the 3 s.
    let (status, took) = slow("/retried/", "37-5xx", 500, 2000);
    assert_eq!(status, 504, "{}", gateway.log());
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(3900),
        "{took:?}"
    );
    assert_eq!(tries(&echo, "37-5xx"), 2);

    // The Module's retriable-4xx applies to a Mapping without a policy.
    let (status, took) = slow("/plain/", "37-409", 409, 2000);
    assert_eq!(status, 504);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert_eq!(tries(&echo, "37-409"), 2);

    // A 500 it does not cover comes back at once.
    let (status, took) = slow("/plain/", "37-500", 500, 0);
    assert_eq!(status, 500);
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(tries(&echo, "37-500"), 1);

    // Each try may take 300 ms; a try that runs out is retried once.
    let (status, took) = slow("/per-try/", "per-try", 200, 1000);
    assert_eq!(status, 504);
    assert!(took < Duration::from_millis(950), "{took:?}");
    assert_eq!(tries(&echo, "per-try"), 2);
}
