//! Endpoint discovery from Endpoints and EndpointSlices, and the
//! `load_balancer` policies, against several echo processes that stand in
//! for a Service's pods (one per loopback address, one shared port).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::thread;
use std::time::Duration;

use support::*;

/// A Mapping `name` of `prefix` to `service` through the endpoint resolver.
fn endpoint_mapping(name: &str, prefix: &str, service: &str, extra: &str) -> String {
    doc(
        "Mapping",
        &format!("name: {name}, namespace: default"),
        &format!(
            "hostname: \"*\"\nprefix: {prefix}\nservice: {service}\nresolver: kubernetes-endpoint\n{extra}"
        ),
    )
}

/// Which pod answered each of `count` requests built by `request`.
fn answers(port: u16, count: usize, request: impl Fn(usize) -> Request) -> Vec<String> {
    (0..count)
        .map(|i| request(i).send(port).echo_ok().server())
        .collect()
}

fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn round_robin_spreads_evenly_over_endpoints() {
    let pods = pods(3);
    let all: Vec<&Echo> = pods.iter().collect();
    let resources = [
        endpoints("quote", &all, &[]),
        // No port: the endpoints' only one.
        endpoint_mapping("implicit", "/implicit/", "quote", ""),
        endpoint_mapping(
            "explicit",
            "/explicit/",
            &format!("quote.default:{}", pods[0].port()),
            "load_balancer:\n  policy: round_robin",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    for prefix in ["/implicit/", "/explicit/"] {
        let counts = tally(&answers(port, 30, |_| Request::get(prefix)));
        let expected: BTreeMap<String, usize> =
            pods.iter().map(|p| (p.name().to_string(), 10)).collect();
        assert_eq!(counts, expected, "{prefix}\n{}", gateway.log());
    }
}

#[test]
fn a_service_maps_its_port_to_the_target_port() {
    let pods = pods(2);
    let all: Vec<&Echo> = pods.iter().collect();
    let service = kube_doc(
        "v1",
        "Service",
        "name: quote, namespace: default",
        &format!(
            "spec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: {}\n",
            pods[0].port()
        ),
    );
    let resources = [
        service,
        endpoints("quote", &all, &[]),
        // The Service's port 80, the pods' port behind it.
        endpoint_mapping("quote", "/quote/", "quote:80", ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let counts = tally(&answers(port, 4, |_| Request::get("/quote/")));
    assert_eq!(counts.len(), 2, "{counts:?}\n{}", gateway.log());
}

#[test]
fn endpoint_slices_and_endpoints_leave_out_what_is_not_ready() {
    let pods = pods(4);
    let resources = [
        endpoint_slice(
            "web-abc",
            "web",
            &[(&pods[0], true), (&pods[1], false), (&pods[2], true)],
        ),
        endpoints("api", &[&pods[3]], &[&pods[0]]),
        endpoint_mapping("web", "/web/", "web", ""),
        endpoint_mapping("api", "/api/", "api", ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let web = tally(&answers(port, 20, |_| Request::get("/web/")));
    let expected: BTreeMap<String, usize> = [("pod-1".to_string(), 10), ("pod-3".to_string(), 10)]
        .into_iter()
        .collect();
    assert_eq!(web, expected, "{}", gateway.log());
    let api = tally(&answers(port, 6, |_| Request::get("/api/")));
    assert_eq!(
        api.keys().collect::<Vec<_>>(),
        ["pod-4"],
        "{}",
        gateway.log()
    );
}

#[test]
fn a_service_without_endpoints_answers_503_until_they_appear() {
    let pods = pods(2);
    let (dir, gateway, port) = start_gateway("", &endpoint_mapping("late", "/late/", "late", ""));
    let reply = Request::get("/late/").send(port);
    assert_eq!(reply.status, 503, "{}", reply.text());

    let all: Vec<&Echo> = pods.iter().collect();
    fs::write(
        dir.path().join("resources").join("endpoints.yaml"),
        endpoints("late", &all, &[]),
    )
    .expect("write endpoints");
    let live = poll_until(Duration::from_secs(10), || {
        Request::get("/late/").send(port).status == 200
    });
    assert!(live, "endpoints never came in:\n{}", gateway.log());
    let counts = tally(&answers(port, 4, |_| Request::get("/late/")));
    assert_eq!(counts.len(), 2, "{counts:?}");
}

/// A Mapping per hash key of `policy`: header, cookie (with a ttl) and
/// source address.
fn hashing_mappings(policy: &str) -> String {
    [
        endpoint_mapping(
            &format!("{policy}-header"),
            &format!("/{policy}/header/"),
            "quote",
            &format!("load_balancer:\n  policy: {policy}\n  header: x-user"),
        ),
        endpoint_mapping(
            &format!("{policy}-cookie"),
            &format!("/{policy}/cookie/"),
            "quote",
            &format!(
                "load_balancer:\n  policy: {policy}\n  cookie:\n    name: lb\n    path: /\n    ttl: 60s"
            ),
        ),
        endpoint_mapping(
            &format!("{policy}-ip"),
            &format!("/{policy}/ip/"),
            "quote",
            &format!("load_balancer:\n  policy: {policy}\n  source_ip: true"),
        ),
    ]
    .concat()
}

#[test]
fn ring_hash_and_maglev_stick_by_header_cookie_and_source_address() {
    let pods = pods(3);
    let all: Vec<&Echo> = pods.iter().collect();
    let resources = [
        endpoints("quote", &all, &[]),
        hashing_mappings("ring_hash"),
        hashing_mappings("maglev"),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    for policy in ["ring_hash", "maglev"] {
        let header = format!("/{policy}/header/");
        let mut homes = Vec::new();
        for user in 0..12 {
            let user = format!("user-{user}");
            let seen = tally(&answers(port, 4, |_| {
                Request::get(&header).header("x-user", &user)
            }));
            assert_eq!(seen.len(), 1, "{policy}: {user} moved: {seen:?}");
            homes.extend(seen.into_keys());
        }
        homes.sort();
        homes.dedup();
        assert!(homes.len() > 1, "{policy}: every user on {homes:?}");
        // Without the header: spread at random.
        let spread = tally(&answers(port, 30, |_| Request::get(&header)));
        assert!(spread.len() > 1, "{policy}: {spread:?}");

        let cookie = format!("/{policy}/cookie/");
        let first = Request::get(&cookie).send(port);
        let set = first
            .header("set-cookie")
            .unwrap_or_else(|| panic!("{policy}: no Set-Cookie\n{}", gateway.log()))
            .to_string();
        assert!(
            set.starts_with("lb=") && set.contains("Max-Age=60") && set.contains("Path=/"),
            "{set}"
        );
        let home = first.echo_ok().server();
        let value = set.split(';').next().unwrap_or_default().to_string();
        for _ in 0..6 {
            let reply = Request::get(&cookie).header("cookie", &value).send(port);
            assert!(
                reply.header("set-cookie").is_none(),
                "{policy}: cookie set again"
            );
            assert_eq!(reply.echo_ok().server(), home, "{policy}: the cookie moved");
        }

        let by_ip = format!("/{policy}/ip/");
        let mut homes = Vec::new();
        for client in 10..22 {
            let client = format!("127.0.0.{client}");
            let seen = tally(&answers(port, 3, |_| {
                Request::get(&by_ip).source_ip(&client)
            }));
            assert_eq!(seen.len(), 1, "{policy}: client {client} moved: {seen:?}");
            homes.extend(seen.into_keys());
        }
        homes.sort();
        homes.dedup();
        assert!(homes.len() > 1, "{policy}: every client on {homes:?}");
    }
}

#[test]
fn least_request_prefers_the_idle_endpoint() {
    let pods = pods(2);
    let all: Vec<&Echo> = pods.iter().collect();
    let resources = [
        endpoints("quote", &all, &[]),
        endpoint_mapping(
            "least",
            "/least/",
            "quote",
            "load_balancer:\n  policy: least_request\ntimeout_ms: 10000",
        ),
        endpoint_mapping(
            "least-timeout",
            "/least/",
            "quote",
            "load_balancer:\n  policy: least_request\ntimeout_ms: 200\nheaders:\n  x-timeout: \"1\"",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    // A request that fails (504) must give its endpoint back too: a leaked
    // count would starve that endpoint below.
    let failed = Request::get("/least/")
        .headers(&[("x-echo-delay-ms", "1000"), ("x-timeout", "1")])
        .send(port);
    assert_eq!(failed.status, 504, "{}", failed.text());
    let spread = tally(&answers(port, 20, |_| Request::get("/least/")));
    assert_eq!(spread.len(), 2, "{spread:?}");
    for _ in 0..2 {
        let slow = thread::spawn(move || {
            Request::get("/least/")
                .header("x-echo-delay-ms", "2500")
                .send(port)
                .echo_ok()
                .server()
        });
        // Long enough for the slow request to be on its way upstream.
        thread::sleep(Duration::from_millis(500));
        let quick = tally(&answers(port, 10, |_| Request::get("/least/")));
        let busy = slow.join().expect("the slow request");
        assert_eq!(quick.len(), 1, "{quick:?}\n{}", gateway.log());
        assert!(!quick.contains_key(&busy), "{busy} was busy: {quick:?}");
    }
    // Released when the slow requests ended: both take traffic again.
    let after = tally(&answers(port, 20, |_| Request::get("/least/")));
    assert_eq!(after.len(), 2, "{after:?}");
}

#[test]
fn a_killed_endpoint_is_skipped_by_connect_failure_retries() {
    let mut pods = pods(3);
    let all: Vec<&Echo> = pods.iter().collect();
    let resources = [
        endpoints("quote", &all, &[]),
        endpoint_mapping(
            "retried",
            "/retried/",
            "quote",
            "retry_policy:\n  retry_on: connect-failure\n  num_retries: 2",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    drop(pods.remove(1));
    for _ in 0..30 {
        let reply = Request::get("/retried/").send(port);
        assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gateway.log());
        assert_ne!(reply.echo().server(), "pod-2");
    }
}

/// A health check every 200 ms: two failures take an endpoint out, two
/// passes bring it back.
const QUICK_CHECKS: &str = "health_checks:\n- interval: 200ms\n  timeout: 500ms\n  \
                            unhealthy_threshold: 2\n  healthy_threshold: 2\n  health_check:\n    \
                            http:\n      path: /healthz\n";

#[test]
fn health_checks_take_a_dead_endpoint_out_and_bring_it_back() {
    let mut pods = pods(3);
    let all: Vec<&Echo> = pods.iter().collect();
    let resources = [
        endpoints("quote", &all, &[]),
        endpoint_mapping("checked", "/checked/", "quote", QUICK_CHECKS),
    ]
    .concat();
    let (dir, gateway, port) = start_gateway("", &resources);
    let dead = pods.remove(1);
    let (address, name) = (dead.addr(), dead.name().to_string());
    drop(dead);
    let out = format!("endpoint {address} failed 2 health check(s)");
    assert!(
        poll_until(Duration::from_secs(10), || gateway.log().contains(&out)),
        "never detected:\n{}",
        gateway.log()
    );
    let diag = gateway.admin_get("/ambassador/v0/diag/?json=true").text();
    assert!(
        diag.contains("\"endpoints\": 3,\n") && diag.contains("\"healthy\": 2,\n"),
        "{diag}"
    );
    // No retry policy: after detection, no request may meet the dead pod.
    for _ in 0..30 {
        let reply = Request::get("/checked/").send(port);
        assert_eq!(reply.status, 200, "{}\n{}", reply.text(), gateway.log());
    }

    // A reload keeps the cluster's health: the dead pod stays out.
    let other = Echo::plain("other");
    fs::write(
        dir.path().join("resources").join("other.yaml"),
        mapping("other", "", "/other/", &other, "hostname: \"*\""),
    )
    .expect("write other.yaml");
    assert!(
        poll_until(Duration::from_secs(10), || Request::get("/other/")
            .send(port)
            .status
            == 200),
        "the reload never came:\n{}",
        gateway.log()
    );
    for _ in 0..30 {
        let reply = Request::get("/checked/").send(port);
        assert_eq!(
            reply.status,
            200,
            "after the reload: {}\n{}",
            reply.text(),
            gateway.log()
        );
    }

    let _back = Echo::plain_on(&address.to_string(), &name);
    let returned = poll_until(Duration::from_secs(10), || {
        Request::get("/checked/").send(port).echo_ok().server() == name
    });
    assert!(returned, "{name} never came back:\n{}", gateway.log());
    assert!(gateway
        .log()
        .contains(&format!("endpoint {address} passed 2 health check(s)")));
}

#[test]
fn a_check_that_every_endpoint_fails_leaves_them_all_in_rotation() {
    let pods = pods(2);
    let all: Vec<&Echo> = pods.iter().collect();
    // The echo answers 503 when asked to; the check expects 2xx.
    let failing = format!(
        "{QUICK_CHECKS}      expected_statuses:\n      - {{min: 200, max: 299}}\n      \
         add_request_headers:\n        x-echo-status: \"503\"\n"
    );
    let resources = [
        endpoints("quote", &all, &[]),
        endpoint_mapping("failing", "/failing/", "quote", &failing),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let both_out = poll_until(Duration::from_secs(10), || {
        let log = gateway.log();
        pods.iter()
            .all(|p| log.contains(&format!("endpoint {} failed", p.addr())))
    });
    assert!(both_out, "{}", gateway.log());
    // Better to try than to refuse: Envoy's panic mode.
    let counts = tally(&answers(port, 10, |_| Request::get("/failing/")));
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[test]
fn cluster_idle_timeout_ms_retires_idle_pooled_connections() {
    let echo = Echo::plain("pooled");
    let resources = [
        mapping("kept", "", "/kept/", &echo, "hostname: \"*\""),
        mapping(
            "short",
            "",
            "/short/",
            &echo,
            "hostname: \"*\"\ncluster_idle_timeout_ms: 200\nkeepalive: {idle_time: 60, interval: 10, probes: 3}",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let connection = |prefix: &str| Request::get(prefix).send(port).echo_ok().connection();
    let (kept, short) = (connection("/kept/"), connection("/short/"));
    // Longer than the short idle timeout.
    thread::sleep(Duration::from_millis(700));
    assert_eq!(connection("/kept/"), kept, "{}", gateway.log());
    assert_ne!(connection("/short/"), short, "{}", gateway.log());
}

#[test]
fn the_module_load_balancer_is_the_default_and_a_mapping_replaces_it() {
    // Emissary's KAT: the Module hashes on a header, Mapping a on a cookie.
    let pods = pods(3);
    let all: Vec<&Echo> = pods.iter().collect();
    let module = doc(
        "Module",
        "name: ambassador",
        "config:\n  resolver: kubernetes-endpoint\n  load_balancer:\n    policy: maglev\n    \
         header: LB-HEADER",
    );
    let resources = [
        module,
        endpoints("quote", &all, &[]),
        endpoint_mapping(
            "a",
            "/a/",
            "quote",
            "load_balancer:\n  policy: ring_hash\n  cookie:\n    name: lb-cookie",
        ),
        // No resolver of its own: the Module's.
        doc(
            "Mapping",
            "name: b, namespace: default",
            "hostname: \"*\"\nprefix: /b/\nservice: quote",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let by_header = |prefix: &str| {
        tally(&answers(port, 30, |_| {
            Request::get(prefix).header("LB-HEADER", "alice")
        }))
    };
    let by_cookie = |prefix: &str| {
        tally(&answers(port, 30, |_| {
            Request::get(prefix).header("cookie", "lb-cookie=alice")
        }))
    };
    assert_eq!(by_header("/b/").len(), 1, "{}", gateway.log());
    assert!(by_cookie("/b/").len() > 1);
    assert_eq!(by_cookie("/a/").len(), 1);
    assert!(by_header("/a/").len() > 1);
}
