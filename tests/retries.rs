//! `retry_policy`: a connection that breaks before the response is retried
//! (`reset`), within `num_retries`, and never for requests that change
//! state; without a policy the failure reaches the client.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
            "  retry_policy:\n    retry_on: 5xx\n",
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
    assert!(out.stdout.contains("warning: resources/test.yaml document 4: Mapping default/status: spec.retry_policy.retry_on: retries decided by the response status (5xx)"), "{}", out.stdout);
}
