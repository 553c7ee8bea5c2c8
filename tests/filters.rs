//! Filters through the real binaries: the built-in request IDs, the
//! Module's IP allow/deny, CORS, Filter and FilterPolicy resources, and the
//! example binaries' custom filters, including one that fails or panics.

mod support;

use std::thread;

use support::*;

/// A Mapping on every Host; `extra` are spec lines.
fn route(name: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    mapping(name, "", prefix, echo, &format!("hostname: \"*\"\n{extra}"))
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[test]
fn request_ids_are_generated_and_replace_the_clients() {
    let echo = Echo::plain("ids");
    let (_dir, _gateway, port) = start_gateway("", &route("ids", "/ids/", &echo, ""));

    let first = request(port, "GET", "/ids/", &[]).echo_ok();
    let second = request(port, "GET", "/ids/", &[]).echo_ok();
    let (a, b) = (
        first
            .header("x-request-id")
            .expect("a generated request ID"),
        second
            .header("x-request-id")
            .expect("a generated request ID"),
    );
    assert!(is_uuid(&a), "{a}");
    assert_ne!(a, b, "each request gets its own ID");

    // A client's ID is replaced by default, as in Emissary (unless
    // `preserve_external_request_id`).
    let replaced = request(port, "GET", "/ids/", &[("x-request-id", "hello")]).echo_ok();
    let id = replaced.header("x-request-id").expect("an ID");
    assert!(is_uuid(&id), "{id}");
    assert_eq!(replaced.headers_all("x-request-id").len(), 1);
}

#[test]
fn preserve_external_request_id_keeps_the_clients() {
    let echo = Echo::plain("ids");
    let resources = [
        route("ids", "/ids/", &echo, ""),
        module("preserve_external_request_id: true"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    let kept = request(port, "GET", "/ids/", &[("x-request-id", "hello")]).echo_ok();
    assert_eq!(kept.header("x-request-id").as_deref(), Some("hello"));
    let generated = request(port, "GET", "/ids/", &[]).echo_ok();
    assert!(is_uuid(&generated.header("x-request-id").expect("an ID")));
}

/// Module `ip_allow`, with the test client on 127.0.0.1: a `peer` rule for
/// another address does not let it in; a `remote` rule matches the address
/// the trusted proxy (l7Depth 1) put in X-Forwarded-For.
#[test]
fn ip_allow_takes_peer_and_remote_rules() {
    let echo = Echo::plain("guarded");
    let resources = [
        route("guarded", "/", &echo, ""),
        module("ip_allow:\n  - peer: 127.0.0.2\n  - remote: 99.99.0.0/16"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("l7Depth: 1", &resources);

    let plain = request(port, "GET", "/", &[]);
    assert_eq!(plain.status, 403, "{}", plain.text());
    assert!(plain.text().contains("IP rules"), "{}", plain.text());
    request(port, "GET", "/", &[("x-forwarded-for", "99.99.0.1")]).echo_ok();
    // Only the entry the trusted hop added counts, not what a client wrote
    // before it.
    let spoofed = request(
        port,
        "GET",
        "/",
        &[("x-forwarded-for", "99.99.0.1, 10.1.1.1")],
    );
    assert_eq!(spoofed.status, 403);
    // Nor on a header line of its own before the trusted hop's.
    let split = request(
        port,
        "GET",
        "/",
        &[
            ("x-forwarded-for", "99.99.0.1"),
            ("x-forwarded-for", "10.1.1.1"),
        ],
    );
    assert_eq!(split.status, 403);
    let outside = request(port, "GET", "/", &[("x-forwarded-for", "99.98.0.1")]);
    assert_eq!(outside.status, 403);
}

#[test]
fn ip_deny_refuses_listed_clients_only() {
    let echo = Echo::plain("open");
    let resources = [
        route("open", "/", &echo, ""),
        module("ip_deny:\n  - remote: 99.98.0.0/16"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("l7Depth: 1", &resources);

    request(port, "GET", "/", &[("x-forwarded-for", "99.99.0.1")]).echo_ok();
    let denied = request(port, "GET", "/", &[("x-forwarded-for", "99.98.0.1")]);
    assert_eq!(denied.status, 403);
}

/// CORS: the Module's policy, a Mapping's own replacing it (not merged),
/// and preflights answered by the gateway.
#[test]
fn cors_policies_of_module_and_mapping() {
    let foo = Echo::plain("foo");
    let bar = Echo::plain("bar");
    let any = Echo::plain("any");
    let resources = [
        module(
            "cors:\n  origins: [http://foo.example.com]\n  methods: [GET, POST]\n  \
             headers: [x-custom]\n  exposed_headers: [x-trace]\n  credentials: true\n  max_age: \"600\"",
        ),
        route("foo", "/foo/", &foo, ""),
        route("bar", "/bar/", &bar, "cors:\n  origins: http://bar.example.com"),
        route("any", "/any/", &any, "cors:\n  origins: [\"*\"]"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    let no_origin = request(port, "GET", "/foo/", &[]);
    no_origin.echo_ok();
    assert_eq!(no_origin.header("access-control-allow-origin"), None);

    let allowed = request(
        port,
        "GET",
        "/foo/",
        &[("origin", "http://foo.example.com")],
    );
    allowed.echo_ok();
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("http://foo.example.com")
    );
    assert_eq!(
        allowed.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        allowed.header("access-control-expose-headers"),
        Some("x-trace")
    );
    // An answer that echoes the Origin differs by Origin: a cache must
    // not give it to another site.
    assert_eq!(allowed.header("vary"), Some("Origin"));

    let wrong = request(
        port,
        "GET",
        "/foo/",
        &[("origin", "http://bar.example.com")],
    );
    wrong.echo_ok();
    assert_eq!(wrong.header("access-control-allow-origin"), None);

    // The Mapping's policy replaces the Module's.
    let bar_own = request(
        port,
        "GET",
        "/bar/",
        &[("origin", "http://bar.example.com")],
    );
    assert_eq!(
        bar_own.header("access-control-allow-origin"),
        Some("http://bar.example.com")
    );
    let bar_module = request(
        port,
        "GET",
        "/bar/",
        &[("origin", "http://foo.example.com")],
    );
    assert_eq!(bar_module.header("access-control-allow-origin"), None);

    let any_origin = request(port, "GET", "/any/", &[("origin", "http://x.example")]);
    assert_eq!(
        any_origin.header("access-control-allow-origin"),
        Some("http://x.example")
    );

    // A preflight never reaches the upstream.
    let preflight = request(
        port,
        "OPTIONS",
        "/foo/",
        &[
            ("origin", "http://foo.example.com"),
            ("access-control-request-method", "POST"),
        ],
    );
    assert_eq!(preflight.status, 200, "{}", preflight.text());
    assert!(
        preflight.text().is_empty(),
        "answered by the gateway: {}",
        preflight.text()
    );
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("http://foo.example.com")
    );
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("GET, POST")
    );
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("x-custom")
    );
    assert_eq!(preflight.header("access-control-max-age"), Some("600"));
    assert_eq!(preflight.header("vary"), Some("Origin"));
    // From an origin outside the policy, the OPTIONS goes to the upstream.
    request(
        port,
        "OPTIONS",
        "/foo/",
        &[
            ("origin", "http://evil.example"),
            ("access-control-request-method", "POST"),
        ],
    )
    .echo_ok();
}

/// Built-in filter types under a FilterPolicy: only the selected paths
/// run them, `ifRequestHeader` narrows further, and `bypass_auth` opts a
/// Mapping out.
#[test]
fn filter_policies_select_requests() {
    let echo = Echo::plain("app");
    let resources = [
        route("app", "/", &echo, ""),
        route("open-admin", "/admin/open/", &echo, "bypass_auth: true"),
        doc(
            "Filter",
            "name: office-only",
            "IpAllowDeny:\n  ip_allow:\n    - peer: 10.0.0.0/8",
        ),
        doc(
            "FilterPolicy",
            "name: admin",
            "rules:\n  - path: /admin/*\n    filters:\n      - name: office-only\n        \
             ifRequestHeader: {name: x-break-glass, negate: true}\n  \
             - path: /reports/*\n    filters:\n      - name: office-only\n        onDeny: continue",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    request(port, "GET", "/public/", &[]).echo_ok();
    assert_eq!(request(port, "GET", "/admin/users", &[]).status, 403);
    request(port, "GET", "/admin/users", &[("x-break-glass", "1")]).echo_ok();
    request(port, "GET", "/admin/open/page", &[]).echo_ok();
    // onDeny: continue lets the denial pass.
    request(port, "GET", "/reports/q3", &[]).echo_ok();
}

#[test]
fn filter_configuration_errors_name_the_field() {
    let dir = tempdir();
    write_gateway(
        dir.path(),
        free_port(),
        free_port(),
        &[
            doc("Filter", "name: unknown", "HmacSigning:\n  key_id: a"),
            doc(
                "Filter",
                "name: bad",
                "IpAllowDeny:\n  ip_allow: [{peer: 10.0.0.0/8, remote: 10.0.0.1}]",
            ),
        ]
        .concat(),
    );
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    let report = out.combined();
    assert!(
        report.contains("spec.HmacSigning: unknown filter type \"HmacSigning\""),
        "{report}"
    );
    assert!(
        report.contains("types known to this binary: Cors, IpAllowDeny"),
        "{report}"
    );
    assert!(
        report.contains("ip_allow[0]: give exactly one of peer or remote"),
        "{report}"
    );

    // The example binary knows its own type, and checks its settings.
    let out = check_program(&example_binary("hmac_signing"), dir.path());
    let report = out.combined();
    assert!(!report.contains("unknown filter type"), "{report}");
    assert!(
        report.contains("spec.HmacSigning: give exactly one of secret and secret_file"),
        "{report}"
    );
}

fn hmac_hex(key: &[u8], message: &str) -> String {
    use openssl::{hash::MessageDigest, pkey::PKey, sign::Signer};
    let key = PKey::hmac(key).expect("HMAC key");
    let mut signer = Signer::new(MessageDigest::sha256(), &key).expect("signer");
    signer.update(message.as_bytes()).expect("sign");
    signer
        .sign_to_vec()
        .expect("sign")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn example_hmac_signing_signs_what_the_upstream_receives() {
    let echo = Echo::plain("signed");
    let secret = "0123456789abcdef-test";
    let resources = [
        route("signed", "/api/", &echo, "rewrite: /v2/"),
        route("unsigned", "/public/", &echo, ""),
        doc(
            "Filter",
            "name: sign",
            &format!("HmacSigning:\n  key_id: gw-1\n  secret: {secret}"),
        ),
        doc(
            "FilterPolicy",
            "name: sign-api",
            "rules:\n  - path: /api/*\n    filters: [{name: sign}]",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) =
        start_gateway_program(&example_binary("hmac_signing"), "", &resources);

    let reply = request(port, "POST", "/api/orders?id=7", &[]).echo_ok();
    let header = reply.header("x-pingress-signature").expect("a signature");
    let fields: std::collections::HashMap<&str, &str> = header
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    assert_eq!(fields["keyId"], "gw-1");
    // Signed over the rewritten path, as the upstream sees it.
    assert_eq!(reply.uri(), "/v2/orders?id=7");
    let expected = hmac_hex(
        secret.as_bytes(),
        &format!("POST\n/v2/orders?id=7\n{}", fields["ts"]),
    );
    assert_eq!(fields["sig"], expected);

    let public = request(port, "GET", "/public/", &[]).echo_ok();
    assert!(!public.has_header("x-pingress-signature"));
}

fn jwt(secret: &str, claims: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let head = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims);
    let signature = hmac_hex(secret.as_bytes(), &format!("{head}.{body}"));
    let raw: Vec<u8> = (0..signature.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&signature[i..i + 2], 16).expect("hex"))
        .collect();
    format!("{head}.{body}.{}", URL_SAFE_NO_PAD.encode(raw))
}

#[test]
fn example_tenant_routing_chooses_the_mapping_by_claim() {
    let shared = Echo::plain("shared");
    let acme = Echo::plain("acme");
    let secret = "tenant-secret";
    let resources = [
        route("shared", "/app/", &shared, ""),
        route("acme", "/app/", &acme, "headers:\n  x-tenant: acme"),
        doc(
            "Filter",
            "name: tenant",
            &format!("TenantRouting:\n  secret: {secret}"),
        ),
        doc(
            "FilterPolicy",
            "name: tenants",
            "rules:\n  - path: /app/*\n    filters: [{name: tenant}]",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) =
        start_gateway_program(&example_binary("tenant_routing"), "", &resources);

    let bearer = |claims: &str| format!("Bearer {}", jwt(secret, claims));
    let acme_token = bearer(r#"{"tenant":"acme","exp":4102444800}"#);
    let routed = request(port, "GET", "/app/x", &[("authorization", &acme_token)]).echo_ok();
    assert_eq!(routed.server(), "acme");
    assert_eq!(routed.header("x-tenant").as_deref(), Some("acme"));

    let other = bearer(r#"{"tenant":"globex"}"#);
    assert_eq!(
        request(port, "GET", "/app/x", &[("authorization", &other)])
            .echo_ok()
            .server(),
        "shared"
    );

    // A client cannot pick a tenant by sending the header itself.
    let spoof = request(
        port,
        "GET",
        "/app/x",
        &[("authorization", &other), ("x-tenant", "acme")],
    )
    .echo_ok();
    assert_eq!(spoof.server(), "shared");

    let missing = request(port, "GET", "/app/x", &[]);
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let forged = format!("Bearer {}", jwt("another-secret", r#"{"tenant":"acme"}"#));
    assert_eq!(
        request(port, "GET", "/app/x", &[("authorization", &forged)]).status,
        401
    );
    let expired = bearer(r#"{"tenant":"acme","exp":1000}"#);
    let expired = request(port, "GET", "/app/x", &[("authorization", &expired)]);
    assert_eq!(expired.status, 401);
    assert!(expired.text().contains("expired"), "{}", expired.text());
}

/// A failing or panicking filter costs its own request a 500, nothing more.
#[test]
fn example_fault_injection_failures_stay_in_their_request() {
    let echo = Echo::plain("steady");
    let rule = |path: &str, arguments: &str| {
        format!("  - path: {path}\n    filters: [{{name: faults, arguments: {arguments}}}]\n")
    };
    let resources = [
        route("steady", "/", &echo, ""),
        doc("Filter", "name: faults", "FaultInjection: {}"),
        doc(
            "FilterPolicy",
            "name: chaos",
            &format!(
                "rules:\n{}{}{}",
                rule("/panic/*", "{panic: true}"),
                rule("/error/*", "{error: true}"),
                rule("/abort/*", "{abort: 418}"),
            ),
        ),
    ]
    .concat();
    let (_dir, mut gateway, port) =
        start_gateway_program(&example_binary("fault_injection"), "", &resources);

    // Healthy requests run beside the panicking ones the whole time.
    let steady = thread::spawn(move || {
        (0..100)
            .filter(|_| request(port, "GET", "/ok", &[]).status != 200)
            .count()
    });
    for _ in 0..20 {
        let panicked = request(port, "GET", "/panic/x", &[]);
        assert_eq!(panicked.status, 500, "{}", panicked.text());
        assert_eq!(request(port, "GET", "/error/x", &[]).status, 500);
        assert_eq!(request(port, "GET", "/abort/x", &[]).status, 418);
    }
    assert_eq!(steady.join().expect("the steady client"), 0);
    assert!(
        gateway.try_wait().is_none(),
        "the gateway must survive: {}",
        gateway.log()
    );
    let log = gateway.log();
    assert!(
        log.contains("filter Filter/faults.default panicked: fault injected: panic"),
        "{log}"
    );
    assert!(log.contains("filter Filter/faults.default failed"), "{log}");
}

/// `origins: "*"` with `credentials: true` lets any site make requests
/// with the user's cookies: `-t` warns.
#[test]
fn cors_any_origin_with_credentials_is_warned() {
    let dir = tempdir();
    let echo = Echo::plain("any");
    write_gateway(
        dir.path(),
        free_port(),
        free_port(),
        &route(
            "any",
            "/any/",
            &echo,
            "cors:\n  origins: [\"*\"]\n  credentials: true",
        ),
    );
    let out = check(dir.path());
    assert!(out.success(), "{}", out.combined());
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("spec.cors") && l.contains("any site")),
        "{}",
        out.stdout
    );
}
