//! `cluster_max_connection_lifetime_ms` (Mapping, else Module): a pooled
//! upstream connection older than the lifetime takes no new request; the
//! request goes out on another connection and the client never notices.
//! pingress-echo numbers its connections, so each reply says which one
//! carried it.

mod support;

use std::thread;
use std::time::Duration;

use support::*;

/// Less than the lifetime of 500 ms, so two gaps outlast it.
const GAP: Duration = Duration::from_millis(300);

/// Four requests over one client connection, the first three `GAP` apart:
/// the upstream connection of each.
fn connections_over_time(port: u16, prefix: &str) -> [u64; 4] {
    let mut client = Client::connect(port);
    let mut next = || client.get(prefix).echo_ok().connection();
    let first = next();
    thread::sleep(GAP);
    let second = next();
    thread::sleep(GAP);
    let third = next();
    [first, second, third, next()]
}

/// A refused connection is neither logged nor an upstream failure.
fn assert_quiet(gateway: &Gateway) {
    let log = gateway.log();
    assert!(
        !log.contains("ConnectionExpired") && !log.contains("older than"),
        "{log}"
    );
    let metrics = gateway.admin_get("/metrics").text();
    assert!(!metrics.contains("upstream_errors_total{"), "{metrics}");
}

#[test]
fn connections_past_their_lifetime_take_no_new_request() {
    let (aged, lasting) = (Echo::plain("aged"), Echo::plain("lasting"));
    let resources = [
        mapping(
            "aged",
            "",
            "/aged/",
            &aged,
            "hostname: \"*\"\ncluster_max_connection_lifetime_ms: 500\n\
             retry_policy: {retry_on: 5xx, num_retries: 1}",
        ),
        mapping("lasting", "", "/lasting/", &lasting, "hostname: \"*\""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let mut client = Client::connect(port);
    let first = client.get("/aged/").echo_ok().connection();
    thread::sleep(GAP);
    let second = client.get("/aged/").echo_ok().connection();
    thread::sleep(GAP);
    // The refusal spends nothing of the retry policy's one retry, and the
    // body, not yet read when the connection is refused, goes out whole.
    let late = Request::post("/aged/", "abcdef")
        .headers(&[("x-echo-key", "late"), ("x-echo-fail-first", "1")]);
    let late = client.send(late).echo_ok();
    assert_eq!((late.attempt(), late.body_len()), (2, 6));
    let third = late.connection();
    let fourth = client.get("/aged/").echo_ok().connection();
    assert_eq!(
        first, second,
        "within the lifetime, the connection is reused"
    );
    assert_ne!(second, third, "past the lifetime, another connection");
    assert_eq!(third, fourth, "the new connection is pooled in turn");

    let [first, second, third, fourth] = connections_over_time(port, "/lasting/");
    assert!(
        first == second && second == third && third == fourth,
        "without a lifetime: {first} {second} {third} {fourth}"
    );
    assert_quiet(&gateway);
}

/// More expired connections in the pool than Pingora has tries for one
/// request: the request still gets through, on a connection of its own.
#[test]
fn a_pool_full_of_expired_connections_is_not_a_failure() {
    let (inherited, unlimited) = (Echo::plain("inherited"), Echo::plain("unlimited"));
    let resources = [
        doc(
            "Module",
            "name: ambassador",
            "config:\n  cluster_max_connection_lifetime_ms: 500",
        ),
        mapping(
            "inherited",
            "",
            "/inherited/",
            &inherited,
            "hostname: \"*\"",
        ),
        mapping(
            "unlimited",
            "",
            "/unlimited/",
            &unlimited,
            "hostname: \"*\"\ncluster_max_connection_lifetime_ms: 0",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    // Twenty requests at once leave twenty connections in the pool; Pingora
    // gives a request 16 tries.
    let pooled: Vec<u64> = (0..20)
        .map(|_| {
            thread::spawn(move || {
                Request::get("/inherited/")
                    .header("x-echo-delay-ms", "200")
                    .send(port)
                    .echo_ok()
                    .connection()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("a concurrent request"))
        .collect();
    let mut distinct = pooled.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 16, "{pooled:?}");
    thread::sleep(2 * GAP);
    for _ in 0..3 {
        let connection = Request::get("/inherited/")
            .send(port)
            .echo_ok()
            .connection();
        assert!(!pooled.contains(&connection), "{connection} in {pooled:?}");
    }

    let [first, second, third, fourth] = connections_over_time(port, "/unlimited/");
    assert!(
        first == second && second == third && third == fourth,
        "0 is no limit: {first} {second} {third} {fourth}"
    );
    assert_quiet(&gateway);
}
