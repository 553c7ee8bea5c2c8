//! External authorization through the real binary, Emissary's AuthService
//! (<https://www.getambassador.io/docs/emissary/latest/topics/running/services/auth-service>).
//! The authorizer is a pingress-echo: the client steers its answer with
//! `x-echo-*` headers that the AuthService lets through, and a denial's
//! body is the echo of what the authorizer saw.

mod support;

use support::*;

fn route(name: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    mapping(name, "", prefix, echo, &format!("hostname: \"*\"\n{extra}"))
}

/// An AuthService for `address`; `extra` are spec lines.
fn auth_service(name: &str, address: &str, extra: &str) -> String {
    doc(
        "AuthService",
        &format!("name: {name}"),
        &format!("auth_service: {address}\n{extra}"),
    )
}

/// Lets the client steer the echo authorizer.
const STEERABLE: &str =
    "allowed_request_headers: [x-echo-status, x-echo-header, x-echo-delay-ms]\n";

/// Allowed requests carry the authorizer's chosen headers (which can
/// choose the Mapping: the route is picked again after auth); denials reach
/// the client with the authorizer's status, body and chosen headers.
#[test]
fn allow_deny_and_routing_after_auth() {
    let authz = Echo::plain("authz");
    let plain = Echo::plain("plain");
    let routed = Echo::plain("routed");
    let resources = [
        auth_service(
            "authz",
            &format!("127.0.0.1:{}", authz.port()),
            &format!(
                "path_prefix: /extauth\n{STEERABLE}\
                 allowed_authorization_headers: [x-auth-route, x-user]\n\
                 add_auth_headers:\n  x-gateway: pingress\n"
            ),
        ),
        route("plain", "/target/", &plain, ""),
        route(
            "routed",
            "/target/",
            &routed,
            "headers:\n  x-auth-route: Route",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    let steer = |headers: &[&str]| -> Vec<(&str, String)> {
        headers
            .iter()
            .map(|h| ("x-echo-header", h.to_string()))
            .collect()
    };
    let send = |path: &str, headers: &[(&str, String)]| {
        let refs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        request(port, "GET", path, &refs)
    };

    let good = send(
        "/target/good/",
        &steer(&["X-Auth-Route: Route", "X-User: alice", "X-Secret: no"]),
    );
    let good = good.echo_ok();
    assert_eq!(
        good.server(),
        "routed",
        "the authorizer's header chose the Mapping"
    );
    assert_eq!(good.header("x-user").as_deref(), Some("alice"));
    assert!(
        !good.has_header("x-secret"),
        "only allowed headers travel upstream"
    );
    assert_eq!(send("/target/nohdr/", &[]).echo_ok().server(), "plain");

    // A denial: the client sees what the authorizer saw, and was sent.
    let denied = send(
        "/target/x?q=1",
        &[
            ("x-echo-status", "403".into()),
            ("authorization", "Bearer t".into()),
            ("x-private", "not for the authorizer".into()),
            ("x-forwarded-for", "203.0.113.7".into()),
        ],
    );
    assert_eq!(denied.status, 403);
    let seen = denied.echo();
    assert_eq!(seen.server(), "authz");
    assert_eq!(seen.uri(), "/extauth/target/x?q=1");
    assert_eq!(seen.header("authorization").as_deref(), Some("Bearer t"));
    assert_eq!(seen.header("x-gateway").as_deref(), Some("pingress"));
    assert!(!seen.has_header("x-private"));
    // As Envoy's connection manager leaves them before ext_authz runs.
    assert_eq!(
        seen.header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));

    let mut challenge = steer(&["WWW-Authenticate: Basic realm=x", "X-Secret: no"]);
    challenge.push(("x-echo-status", "401".into()));
    let unauthorized = send("/target/", &challenge);
    assert_eq!(unauthorized.status, 401);
    assert_eq!(
        unauthorized.header("www-authenticate"),
        Some("Basic realm=x")
    );
    assert_eq!(unauthorized.header("x-secret"), None);

    let mut login = steer(&["Location: https://login.example/"]);
    login.push(("x-echo-status", "302".into()));
    let redirected = send("/target/", &login);
    assert_eq!(redirected.status, 302);
    assert_eq!(
        redirected.header("location"),
        Some("https://login.example/")
    );
}

/// `bypass_auth` and redirects never ask the authorizer.
#[test]
fn bypass_auth_and_redirects_skip_the_authorizer() {
    let authz = Echo::plain("authz");
    let app = Echo::plain("app");
    let resources = [
        // This authorizer refuses everything it is asked.
        auth_service(
            "deny-all",
            &format!("127.0.0.1:{}", authz.port()),
            "add_auth_headers:\n  x-echo-status: \"403\"\n",
        ),
        route("authed", "/target/", &app, ""),
        route("unauthed", "/target/unauthed/", &app, "bypass_auth: true"),
        doc(
            "Mapping",
            "name: moved",
            "hostname: \"*\"\nprefix: /moved/\nservice: elsewhere.example\nhost_redirect: true",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    assert_eq!(request(port, "GET", "/target/", &[]).status, 403);
    request(port, "GET", "/target/unauthed/x", &[]).echo_ok();
    let moved = request(port, "GET", "/moved/x", &[]);
    assert_eq!(moved.status, 301);
    assert_eq!(
        moved.header("location"),
        Some("http://elsewhere.example/moved/x")
    );
}

#[test]
fn authorizer_failures_get_status_on_error_or_pass() {
    let authz = Echo::plain("authz");
    let app = Echo::plain("app");
    let dead = free_port();
    let strict = [
        auth_service(
            "strict",
            &format!("127.0.0.1:{}", authz.port()),
            &format!("{STEERABLE}timeout_ms: 500\nstatus_on_error:\n  code: 503\n"),
        ),
        route("app", "/", &app, ""),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &strict);
    request(port, "GET", "/", &[]).echo_ok();
    assert_eq!(
        request(port, "GET", "/", &[("x-echo-status", "500")]).status,
        503
    );
    assert_eq!(
        request(port, "GET", "/", &[("x-echo-delay-ms", "2000")]).status,
        503
    );

    // Unreachable: the default status is 403; failure_mode_allow lets through.
    let closed = [
        auth_service("gone", &format!("127.0.0.1:{dead}"), ""),
        route("app", "/", &app, ""),
    ]
    .concat();
    let (_dir2, _gateway2, port2) = start_gateway("", &closed);
    assert_eq!(request(port2, "GET", "/", &[]).status, 403);
    let lenient = [
        auth_service(
            "gone",
            &format!("127.0.0.1:{dead}"),
            "failure_mode_allow: true",
        ),
        route("app", "/", &app, ""),
    ]
    .concat();
    let (_dir3, _gateway3, port3) = start_gateway("", &lenient);
    request(port3, "GET", "/", &[]).echo_ok();
}

#[test]
fn several_authservices_take_turns() {
    let first = Echo::plain("authz-1");
    let second = Echo::plain("authz-2");
    let app = Echo::plain("app");
    let resources = [
        auth_service("one", &format!("127.0.0.1:{}", first.port()), STEERABLE),
        auth_service("two", &format!("127.0.0.1:{}", second.port()), STEERABLE),
        route("app", "/", &app, ""),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);
    let askers: std::collections::BTreeSet<String> = (0..6)
        .map(|_| {
            request(port, "GET", "/", &[("x-echo-status", "403")])
                .echo()
                .server()
        })
        .collect();
    assert_eq!(
        askers.into_iter().collect::<Vec<_>>(),
        ["authz-1", "authz-2"]
    );
}

#[test]
fn include_body_shows_the_body_and_still_proxies_it() {
    let authz = Echo::plain("authz");
    let app = Echo::plain("app");
    let with_body = |extra: &str| {
        [
            auth_service(
                "authz",
                &format!("127.0.0.1:{}", authz.port()),
                &format!("{STEERABLE}{extra}"),
            ),
            route("app", "/", &app, ""),
        ]
        .concat()
    };
    let (_dir, _gateway, port) = start_gateway("", &with_body("include_body:\n  max_bytes: 100\n"));
    let small = vec![b'a'; 60];
    let allowed = Request::post("/upload", small.clone()).send(port).echo_ok();
    assert_eq!(allowed.body_len(), 60, "the upstream gets the whole body");
    let shown = Request::post("/upload", small)
        .header("x-echo-status", "403")
        .send(port);
    assert_eq!(shown.echo().body_len(), 60, "the authorizer saw the body");
    let large = Request::post("/upload", vec![b'b'; 300]).send(port);
    assert_eq!(large.status, 413, "{}", large.text());

    let (_dir2, _gateway2, port2) = start_gateway(
        "",
        &with_body("include_body:\n  max_bytes: 100\n  allow_partial: true\n"),
    );
    let partial = Request::post("/upload", vec![b'c'; 300])
        .header("x-echo-status", "403")
        .send(port2);
    assert_eq!(
        partial.echo().body_len(),
        100,
        "the authorizer saw the first 100 bytes"
    );
    let whole = Request::post("/upload", vec![b'c'; 300])
        .send(port2)
        .echo_ok();
    assert_eq!(whole.body_len(), 300);
}

/// An AuthService that cannot be used refuses everything (Emissary fails
/// closed) instead of letting requests through unchecked.
#[test]
fn a_broken_authservice_fails_closed() {
    let app = Echo::plain("app");
    let resources = [
        auth_service("broken", "127.0.0.1:1", "proto: grpc"),
        route("app", "/", &app, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let refused = request(port, "GET", "/", &[]);
    assert_eq!(refused.status, 500);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert!(
        refused
            .text()
            .contains("AuthService broken.default is misconfigured"),
        "{}",
        refused.text()
    );
    assert!(gateway.log().contains("spec.proto"), "{}", gateway.log());
}

/// The order of the chain: IP rules and CORS preflights come before the
/// authorizer, which is never asked about them.
#[test]
fn ip_rules_and_cors_preflights_come_before_auth() {
    let authz = Echo::plain("authz");
    let app = Echo::plain("app");
    let resources = [
        auth_service(
            "deny-all",
            &format!("127.0.0.1:{}", authz.port()),
            "add_auth_headers:\n  x-echo-status: \"401\"\n",
        ),
        route("app", "/", &app, ""),
        doc(
            "Module",
            "name: ambassador",
            "config:\n  ip_deny:\n    - remote: 99.98.0.0/16\n  \
             cors:\n    origins: [http://ui.example]\n    methods: [GET]",
        ),
    ]
    .concat();
    let dir = tempdir();
    let port = free_port();
    write_gateway_with_listener(dir.path(), port, free_port(), "l7Depth: 1", &resources);
    let _gateway = Gateway::start(dir.path());

    assert_eq!(
        request(port, "GET", "/", &[("x-forwarded-for", "10.0.0.1")]).status,
        401
    );
    let denied = request(port, "GET", "/", &[("x-forwarded-for", "99.98.0.1")]);
    assert_eq!(denied.status, 403, "IP rules answer before the authorizer");
    assert!(denied.text().contains("IP rules"), "{}", denied.text());
    let preflight = request(
        port,
        "OPTIONS",
        "/",
        &[
            ("x-forwarded-for", "10.0.0.1"),
            ("origin", "http://ui.example"),
            ("access-control-request-method", "GET"),
        ],
    );
    assert_eq!(preflight.status, 200, "preflights are not authenticated");
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("http://ui.example")
    );
}

/// The seed scenario for the authorizer: TLS with the client certificate
/// of the AuthService's TLSContext, verified against its CA.
#[test]
fn authorizer_over_mutual_tls() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("gateway-authz");
    let authz = Echo::mtls("authz", &server, pki.ca_pem_path(), true);
    let app = Echo::plain("app");
    let resources = [
        tls_secret("authz-client", "default", &client),
        ca_secret("authz-ca", "default", pki.ca_pem()),
        doc(
            "TLSContext",
            "name: authz-context",
            "hosts: []\nsecret: authz-client\nca_secret: authz-ca",
        ),
        auth_service(
            "authz",
            &format!("https://localhost:{}", authz.port()),
            &format!("tls: authz-context\n{STEERABLE}"),
        ),
        route("app", "/", &app, ""),
    ]
    .concat();
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &resources);
    let _gateway = Gateway::start(dir.path());

    request(port, "GET", "/", &[]).echo_ok();
    let seen = request(port, "GET", "/", &[("x-echo-status", "403")]);
    assert_eq!(seen.status, 403);
    assert_eq!(seen.echo().client_cert_subject(), Some(client.subject()));
}
