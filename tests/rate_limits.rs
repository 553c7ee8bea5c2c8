//! Rate limits through the real binaries: Mapping labels and the Module's
//! default_labels against RateLimit resources, counted in each gateway's
//! memory or, with a RateLimitService, in a real redis-server that two
//! gateways share.

mod support;

use std::time::Duration;

use support::*;

/// A Mapping on every Host with rate-limit `labels` (block YAML under
/// `labels:`, domain `ambassador`).
fn labelled(name: &str, prefix: &str, echo: &Echo, groups: &str) -> String {
    let labels = if groups.is_empty() {
        String::new()
    } else {
        format!("labels:\n  ambassador:\n{}", indent(groups, 4))
    };
    mapping(
        name,
        "",
        prefix,
        echo,
        &format!("hostname: \"*\"\n{labels}"),
    )
}

/// A RateLimit in domain `ambassador`; `limits` is block YAML of the list.
fn rate_limit(name: &str, limits: &str) -> String {
    doc(
        "RateLimit",
        &format!("name: {name}"),
        &format!("domain: ambassador\nlimits:\n{}", indent(limits, 2)),
    )
}

fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Response {
    request(port, "GET", path, headers)
}

fn assert_limited(response: &Response, limit: &str) {
    assert_eq!(response.status, 429, "{}", response.text());
    assert!(
        response
            .header("retry-after")
            .is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)),
        "Retry-After in seconds: {:?}",
        response.header("retry-after")
    );
    assert_eq!(response.header("ratelimit-limit"), Some(limit));
    assert_eq!(response.header("ratelimit-remaining"), Some("0"));
    assert!(response.header("ratelimit-reset").is_some());
}

#[test]
fn a_generic_key_limit_answers_429_and_leaves_other_mappings_alone() {
    let echo = Echo::plain("rl");
    let resources = [
        labelled(
            "limited",
            "/limited/",
            &echo,
            "- per-api:\n  - generic_key: {value: limited}",
        ),
        labelled("free", "/free/", &echo, ""),
        rate_limit(
            "api",
            "- pattern: [{generic_key: limited}]\n  rate: 3\n  unit: minute",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    for remaining in ["2", "1", "0"] {
        let ok = get(port, "/limited/", &[]);
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(ok.header("ratelimit-limit"), Some("3"));
        assert_eq!(ok.header("ratelimit-remaining"), Some(remaining));
    }
    let refused = get(port, "/limited/", &[]);
    assert_limited(&refused, "3");
    // 3 a minute: one more after 20 s.
    assert_eq!(refused.header("retry-after"), Some("20"));

    for _ in 0..5 {
        let other = get(port, "/free/", &[]);
        other.echo_ok();
        assert_eq!(other.header("ratelimit-limit"), None);
    }
}

/// Behind one trusted proxy (l7Depth 1) the client is the last
/// X-Forwarded-For entry, and each client has its own bucket.
#[test]
fn remote_address_buckets_are_per_client() {
    let echo = Echo::plain("rl");
    let resources = [
        labelled(
            "per-client",
            "/",
            &echo,
            "- per-client:\n  - remote_address: {key: remote_address}",
        ),
        rate_limit(
            "clients",
            "- pattern: [{remote_address: \"*\"}]\n  rate: 2\n  unit: minute",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("l7Depth: 1", &resources);

    let a = [("x-forwarded-for", "10.0.0.1")];
    let b = [("x-forwarded-for", "10.0.0.2")];
    get(port, "/", &a).echo_ok();
    get(port, "/", &a).echo_ok();
    assert_limited(&get(port, "/", &a), "2");
    get(port, "/", &b).echo_ok();
    // What a client wrote before the trusted hop's entry does not count.
    assert_limited(
        &get(port, "/", &[("x-forwarded-for", "10.0.0.9, 10.0.0.1")]),
        "2",
    );
}

/// A header label with omit_if_not_present leaves the label out when the
/// header is missing (the shorter pattern applies then); without it the
/// whole group is skipped.
#[test]
fn request_header_labels_and_omit_if_not_present() {
    let echo = Echo::plain("rl");
    let groups = "- per-user:\n  - generic_key: {value: api}\n  \
                  - request_headers: {key: user, header_name: x-user, omit_if_not_present: true}\n\
                  - per-tenant:\n  - request_headers: {key: tenant, header_name: x-tenant}";
    let limits = "- pattern: [{generic_key: api}, {user: \"*\"}]\n  rate: 1\n  unit: minute\n\
                  - pattern: [{generic_key: api}]\n  rate: 2\n  unit: minute\n\
                  - pattern: [{tenant: \"*\"}]\n  rate: 1\n  unit: hour";
    let resources = [
        labelled("api", "/", &echo, groups),
        rate_limit("users", limits),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    get(port, "/", &[("x-user", "alice")]).echo_ok();
    assert_limited(&get(port, "/", &[("x-user", "alice")]), "1");
    get(port, "/", &[("x-user", "bob")]).echo_ok();
    // Without x-user the group is [generic_key=api]: the limit of 2.
    get(port, "/", &[]).echo_ok();
    get(port, "/", &[]).echo_ok();
    assert_limited(&get(port, "/", &[]), "2");
    // The tenant group only exists with the header.
    get(port, "/", &[("x-user", "carol"), ("x-tenant", "t1")]).echo_ok();
    let second = get(port, "/", &[("x-user", "dave"), ("x-tenant", "t1")]);
    assert_limited(&second, "1");
    assert_eq!(second.header("retry-after"), Some("3600"));
}

/// The Module's default_labels form a group of every Mapping, so one
/// bucket covers them all.
#[test]
fn default_labels_apply_to_every_mapping() {
    let echo = Echo::plain("rl");
    let module = doc(
        "Module",
        "name: ambassador",
        "config:\n  default_labels:\n    ambassador:\n      defaults:\n      - generic_key: {value: global}",
    );
    let resources = [
        labelled("a", "/a/", &echo, ""),
        labelled("b", "/b/", &echo, "- own:\n  - generic_key: {value: b}"),
        module,
        rate_limit(
            "global",
            "- pattern: [{generic_key: global}]\n  rate: 2\n  unit: minute",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    get(port, "/a/", &[]).echo_ok();
    get(port, "/b/", &[]).echo_ok();
    assert_limited(&get(port, "/a/", &[]), "2");
    assert_limited(&get(port, "/b/", &[]), "2");
}

fn redis_service(redis_url: &str, extra: &str) -> String {
    // A debug build on a busy machine can take longer than the default
    // 20 ms; these tests are about sharing and failures, not latency.
    doc(
        "RateLimitService",
        "name: redis",
        &format!("service: {}\ntimeout_ms: 1000\n{extra}", q(redis_url)),
    )
}

fn shared_resources(echo: &Echo, redis_url: &str, extra: &str) -> String {
    [
        labelled(
            "shared",
            "/",
            echo,
            "- g:\n  - generic_key: {value: shared}",
        ),
        rate_limit(
            "shared",
            "- pattern: [{generic_key: shared}]\n  rate: 4\n  unit: minute",
        ),
        redis_service(redis_url, extra),
    ]
    .concat()
}

#[test]
fn two_gateways_share_a_limit_through_redis() {
    let redis = Redis::start();
    let echo = Echo::plain("rl");
    let resources = shared_resources(&echo, &redis.url(), "");
    let (_d1, _g1, one) = start_gateway("", &resources);
    let (_d2, _g2, two) = start_gateway("", &resources);

    let mut remaining = Vec::new();
    for port in [one, two, one, two] {
        let ok = get(port, "/", &[]);
        assert_eq!(ok.status, 200, "{}", ok.text());
        remaining.push(ok.header("ratelimit-remaining").unwrap_or("-").to_string());
    }
    assert_eq!(
        remaining,
        ["3", "2", "1", "0"],
        "one count across both gateways"
    );
    let refused = get(one, "/", &[]);
    assert_limited(&refused, "4");
    assert_limited(&get(two, "/", &[]), "4");
}

#[test]
fn without_redis_requests_fail_open_until_it_is_back() {
    let mut redis = Redis::start();
    let echo = Echo::plain("rl");
    let resources = shared_resources(&echo, &redis.url(), "");
    let (_dir, gateway, port) = start_gateway("", &resources);
    for _ in 0..4 {
        get(port, "/", &[]).echo_ok();
    }
    assert_limited(&get(port, "/", &[]), "4");

    redis.stop();
    for _ in 0..6 {
        let open = get(port, "/", &[]);
        assert_eq!(open.status, 200, "fail open: {}", open.text());
        assert_eq!(open.header("ratelimit-limit"), None);
    }
    assert!(
        gateway.log().contains("rate limits: Redis 127.0.0.1:"),
        "{}",
        gateway.log()
    );

    // A fresh Redis has no counts: the gateway reconnects and counts anew.
    redis.restart();
    let limited = poll_until(Duration::from_secs(15), || {
        get(port, "/", &[]).status == 429
    });
    assert!(
        limited,
        "the limit applies again after Redis is back; log:\n{}",
        gateway.log()
    );
}

#[test]
fn failure_mode_deny_answers_500_without_redis() {
    let echo = Echo::plain("rl");
    // Nothing listens there.
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let resources = shared_resources(&echo, &nowhere, "failure_mode_deny: true");
    let (_dir, _gateway, port) = start_gateway("", &resources);
    let denied = get(port, "/", &[]);
    assert_eq!(denied.status, 500, "{}", denied.text());
    assert!(denied.text().contains("rate-limit service unavailable"));
}

#[test]
fn a_grpc_rate_limit_service_is_a_configuration_error() {
    let dir = tempdir();
    let resources = doc(
        "RateLimitService",
        "name: rls",
        "service: ratelimit.default:8081\nprotocol_version: v3",
    );
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let out = check(dir.path());
    assert!(!out.success(), "{}", out.combined());
    assert!(
        out.stdout.contains("does not speak Envoy's rls.proto"),
        "{}",
        out.stdout
    );
}

/// The chain's order: the authorizer answers before rate limits count, so
/// refused requests spend nothing, and the limit sees the route chosen
/// after authentication.
#[test]
fn rate_limits_count_only_what_authentication_let_through() {
    let echo = Echo::plain("rl");
    let authz = Echo::plain("authz");
    let resources = [
        labelled(
            "limited",
            "/limited/",
            &echo,
            "- per-api:\n  - generic_key: {value: limited}",
        ),
        rate_limit(
            "api",
            "- pattern: [{generic_key: limited}]\n  rate: 2\n  unit: minute",
        ),
        doc(
            "AuthService",
            "name: authz",
            &format!(
                "auth_service: 127.0.0.1:{}\nallowed_request_headers: [x-echo-status]",
                authz.port()
            ),
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    for _ in 0..5 {
        let refused = get(port, "/limited/", &[("x-echo-status", "401")]);
        assert_eq!(refused.status, 401, "{}", refused.text());
    }
    for remaining in ["1", "0"] {
        let ok = get(port, "/limited/", &[]);
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(ok.header("ratelimit-remaining"), Some(remaining));
    }
    assert_limited(&get(port, "/limited/", &[]), "2");
}

/// A Mapping whose requests count per `x-api-key` value, against a limit
/// of `rate` (`rate: N\n  unit: U`).
fn per_api_key(echo: &Echo, rate: &str) -> String {
    let groups = "- per-key:\n  - generic_key: {value: api}\n  \
                  - request_headers: {key: api_key, header_name: x-api-key}";
    [
        labelled("api", "/", echo, groups),
        rate_limit(
            "keys",
            &format!("- pattern: [{{generic_key: api}}, {{api_key: \"*\"}}]\n  {rate}"),
        ),
    ]
    .concat()
}

/// Buckets keyed by a client's header: each distinct value is a bucket, so
/// a client that sends large distinct values must not make the gateway
/// keep them. 3,000 keys of 32 KiB kept verbatim were ~100 MB.
#[test]
fn distinct_large_label_values_do_not_grow_memory() {
    let echo = Echo::plain("rl");
    let resources = per_api_key(&echo, "rate: 100\n  unit: day");
    let (_dir, gateway, port) = start_gateway("", &resources);
    get(port, "/", &[("x-api-key", "warm-up")]).echo_ok();
    let before = gateway.rss_kib();
    let filler = "k".repeat(32 * 1024);
    for i in 0..3000 {
        let key = format!("{i:06}{filler}");
        let response = get(port, "/", &[("x-api-key", &key)]);
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let grown_mib = gateway.rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 24, "the gateway grew by {grown_mib} MiB");
    // Still one bucket per key.
    get(port, "/", &[("x-api-key", "warm-up")]).echo_ok();
}

/// Redis keys have one length, whatever the label values.
#[test]
fn redis_keys_have_a_fixed_length() {
    let redis = Redis::start();
    let echo = Echo::plain("rl");
    let resources =
        per_api_key(&echo, "rate: 2\n  unit: minute") + &redis_service(&redis.url(), "");
    let (_dir, _gateway, port) = start_gateway("", &resources);
    let long = "k".repeat(16 * 1024);
    for key in ["a", long.as_str()] {
        assert_eq!(get(port, "/", &[("x-api-key", key)]).status, 200);
        assert_eq!(get(port, "/", &[("x-api-key", key)]).status, 200);
        assert_limited(&get(port, "/", &[("x-api-key", key)]), "2");
    }
    let scan = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "--scan"])
        .output()
        .expect("redis-cli");
    let keys = String::from_utf8_lossy(&scan.stdout);
    let lengths: Vec<usize> = keys.lines().map(str::len).collect();
    assert_eq!(lengths.len(), 2, "{keys}");
    assert!(
        lengths.iter().all(|&l| l == lengths[0] && l <= 64),
        "{lengths:?}"
    );
}
