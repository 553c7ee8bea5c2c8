//! What the edge may trust, through the real binary: one canonical request
//! path for every decision and for the upstream, and none of the client's
//! words where only the gateway may speak (identity headers, the client
//! address behind a trusted proxy).
//!
//! Each test is an attack that worked while the gateway routed on a
//! normalised path but showed other spellings of it to the authorizer, the
//! FilterPolicy, the insecure-request policy and the upstream: the
//! upstream (nginx here, as in the field) resolves `..`, `%2e%2e` and
//! `..%2f` itself, so a path that meant one place to the gateway meant
//! another behind it.
//!
//! Requests whose target or headers matter byte for byte are written raw,
//! so no client library tidies them up first.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// GET `target` exactly as given (any bytes), with `headers` as whole raw
/// lines (`b"Name: value"`), a Host and `Connection: close`.
fn raw_get(port: u16, target: &[u8], headers: &[&[u8]]) -> Response {
    let mut bytes = b"GET ".to_vec();
    bytes.extend_from_slice(target);
    bytes.extend_from_slice(b" HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for line in headers {
        bytes.extend_from_slice(line);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"Connection: close\r\n\r\n");
    send_raw(port, &bytes).unwrap_or_else(|e| {
        panic!(
            "GET {} to port {port}: {e}",
            String::from_utf8_lossy(target)
        )
    })
}

/// Whether a pingress-echo (upstream or authorizer) wrote this body.
/// Sends `target` raw with `headers` and asserts the gateway refused it
/// itself with 400: no upstream answered.
fn assert_refused(port: u16, target: &[u8], headers: &[&[u8]]) -> Response {
    let response = raw_get(port, target, headers);
    let shown = String::from_utf8_lossy(target);
    assert_eq!(response.status, 400, "{shown}: {}", response.text());
    assert!(!is_echo(&response), "{shown}: an upstream answered");
    response
}

fn is_echo(response: &Response) -> bool {
    serde_json::from_slice::<Value>(&response.body)
        .map(|json| json.get("connection").is_some())
        .unwrap_or(false)
}

/// A Mapping on every Host; `extra` are spec lines.
fn route(name: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    mapping(name, "", prefix, echo, &format!("hostname: \"*\"\n{extra}"))
}

/// A Mapping on every Host to any `host:port`.
fn route_to(name: &str, prefix: &str, service: &str, extra: &str) -> String {
    doc(
        "Mapping",
        &format!("name: {name}"),
        &format!(
            "hostname: \"*\"\nprefix: {}\nservice: {service}\n{extra}",
            q(prefix)
        ),
    )
}

// ---------------------------------------------------------------------------
// 1. One canonical path
// ---------------------------------------------------------------------------

/// What the upstream must receive for a path, or a 400 from the gateway.
enum Expect {
    /// The echo that answers, and the request target it saw.
    Upstream(&'static str, &'static str),
    /// Refused by the gateway: nothing reaches an upstream.
    BadRequest,
}

/// Stops path confusion between the gateway and its upstream: the gateway
/// rewrites the request head to one canonical path (unreserved escapes
/// decoded, other escapes in upper case, bytes outside ASCII escaped, dot
/// segments removed) and refuses what an upstream could still read as a
/// dot segment (a backslash, `..;`, `..%2f`, `..%5c`, `..%3b`) or what has
/// no meaning (`%zz`). The Mapping `/svc/` keeps the path (`rewrite:
/// /svc/`), so its echo shows the canonical path itself; a path that
/// leaves `/svc/` once canonical goes to the catch-all echo instead.
#[test]
fn the_upstream_sees_the_canonical_path() {
    use Expect::{BadRequest, Upstream};
    let svc = Echo::plain("svc");
    let root = Echo::plain("root");
    let resources = [
        route("svc", "/svc/", &svc, "rewrite: /svc/"),
        route("root", "/", &root, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let cases: &[(&[u8], Expect)] = &[
        // Dot segments (RFC 3986 §5.2.4).
        (b"/svc/a/../b", Upstream("svc", "/svc/b")),
        (b"/svc/a/./b", Upstream("svc", "/svc/a/b")),
        (b"/svc/a/b/..", Upstream("svc", "/svc/a/")),
        (b"/svc/a/b/.", Upstream("svc", "/svc/a/b/")),
        (b"/x/../svc/y", Upstream("svc", "/svc/y")),
        (b"/svc/../../../etc/passwd", Upstream("root", "/etc/passwd")),
        // Escaped dots are dots: the request leaves /svc/.
        (b"/svc/%2e%2e/x", Upstream("root", "/x")),
        (b"/svc/.%2e/x", Upstream("root", "/x")),
        (b"/svc/%2E%2E/x", Upstream("root", "/x")),
        (b"/svc/%2e./x", Upstream("root", "/x")),
        (b"/svc/%2e/x", Upstream("svc", "/svc/x")),
        // Unreserved escapes decoded, wherever they are.
        (b"/%73vc/y", Upstream("svc", "/svc/y")),
        (b"/svc/%7Euser", Upstream("svc", "/svc/~user")),
        (b"/svc/%61%62c-%5F", Upstream("svc", "/svc/abc-_")),
        // Other escapes in upper case; bytes outside ASCII escaped.
        (b"/svc/caf%c3%a9", Upstream("svc", "/svc/caf%C3%A9")),
        (b"/svc/caf\xc3\xa9", Upstream("svc", "/svc/caf%C3%A9")),
        (b"/svc/a%20b", Upstream("svc", "/svc/a%20b")),
        (b"/svc/a%2fb", Upstream("svc", "/svc/a%2Fb")),
        (b"/svc/a%2Fb", Upstream("svc", "/svc/a%2Fb")),
        // An escaped `%` is data, never decoded twice.
        (b"/svc/%252e%252e/x", Upstream("svc", "/svc/%252e%252e/x")),
        // Parameters on ordinary segments, and `...`, are names.
        (b"/svc/a;v=1/b", Upstream("svc", "/svc/a;v=1/b")),
        (b"/svc/.../b", Upstream("svc", "/svc/.../b")),
        // The query is not a path: left as it came.
        (b"/svc/x?q=%2e%2e", Upstream("svc", "/svc/x?q=%2e%2e")),
        (
            b"/svc/a/../x?q=/../%2f&r=..\\",
            Upstream("svc", "/svc/x?q=/../%2f&r=..\\"),
        ),
        // What an upstream could read as a dot segment: refused.
        (b"/svc/a\\b", BadRequest),
        (b"/svc/a\\..\\..\\b", BadRequest),
        (b"/svc/a/..;/b", BadRequest),
        (b"/svc/a/..;x=1/b", BadRequest),
        (b"/svc/a/.;/b", BadRequest),
        (b"/svc/a/..%2fb", BadRequest),
        (b"/svc/a/..%2Fb", BadRequest),
        (b"/svc/a/%2e%2e%2fb", BadRequest),
        (b"/svc/a/x%2f..%2fb", BadRequest),
        (b"/svc/a/..%5cb", BadRequest),
        (b"/svc/a/%2e%2e%5Cb", BadRequest),
        (b"/svc/a/..%3b/b", BadRequest),
        (b"/svc/a/.%2e%3Bx/b", BadRequest),
        // A target that is not UTF-8 has no text form: Pingora refuses it
        // before the gateway reads it.
        (b"/svc/a\xffb", BadRequest),
        (b"/svc/a\xc3b", BadRequest),
        (b"/svc/x?q=\xff", BadRequest),
        // `%` that starts no escape.
        (b"/svc/a%zz", BadRequest),
        (b"/svc/a%2", BadRequest),
        (b"/svc/a%", BadRequest),
    ];
    let mut failures = Vec::new();
    for (target, expect) in cases {
        let shown = String::from_utf8_lossy(target);
        let response = raw_get(port, target, &[]);
        match expect {
            Upstream(server, uri) => {
                if response.status != 200 || !is_echo(&response) {
                    failures.push(format!(
                        "{shown}: expected {server} {uri}, got {} {}",
                        response.status,
                        response.text()
                    ));
                    continue;
                }
                let seen = response.echo();
                if seen.server() != *server || seen.uri() != *uri {
                    failures.push(format!(
                        "{shown}: expected {server} {uri}, got {} {}",
                        seen.server(),
                        seen.uri()
                    ));
                }
            }
            BadRequest => {
                if response.status != 400 || is_echo(&response) {
                    failures.push(format!(
                        "{shown}: expected 400 from the gateway, got {} {}",
                        response.status,
                        response.text()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The access log records the path that was served, not the spelling.
    let served = raw_get(port, b"/svc/log-me/%2e%2e/logged", &[]).echo_ok();
    assert_eq!(served.uri(), "/svc/logged");
    assert!(
        poll_until(Duration::from_secs(5), || gateway
            .log()
            .contains("\"GET /svc/logged HTTP/1.1\" 200")),
        "{}",
        gateway.log()
    );
    assert!(!gateway.log().contains("log-me"), "{}", gateway.log());
}

/// The same path for an absolute-form target (`GET http://host/path`),
/// which proxies and some clients send: the path inside the URI is made
/// canonical like any other.
#[test]
fn absolute_form_targets_are_canonical_too() {
    let svc = Echo::plain("svc");
    let root = Echo::plain("root");
    let resources = [
        route("svc", "/svc/", &svc, "rewrite: /svc/"),
        route("root", "/", &root, ""),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    let left = raw_get(port, b"http://127.0.0.1/svc/%2e%2e/x?q=%2e", &[]).echo_ok();
    assert_eq!(
        (left.server().as_str(), left.uri().as_str()),
        ("root", "/x?q=%2e")
    );
    let stayed = raw_get(port, b"http://127.0.0.1/svc/a/../b%7e", &[]).echo_ok();
    assert_eq!(
        (stayed.server().as_str(), stayed.uri().as_str()),
        ("svc", "/svc/b~")
    );
    assert_refused(port, b"http://127.0.0.1/svc/..%2fx", &[]);
    // An absolute-form target that is canonical already still reaches
    // the upstream in origin-form: no upstream reads another path out of it.
    let plain = raw_get(port, b"http://127.0.0.1/svc/b?q=1", &[]).echo_ok();
    assert_eq!(plain.uri(), "/svc/b?q=1");
}

/// Targets that are neither a path nor an `http(s)://` URL: Pingora would
/// route them as `/` and send them upstream as they came, where Go's and
/// Node's servers read `/admin/users` out of `foo:/admin/users`. Refused,
/// as Envoy refuses them.
#[test]
fn targets_that_are_no_path_are_refused() {
    let admin = Echo::plain("admin");
    let root = Echo::plain("root");
    let resources = [
        route("admin", "/admin/", &admin, "rewrite: /admin/"),
        route("root", "/", &root, ""),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);
    for target in [
        &b"foo:/admin/users"[..],
        b"admin/users",
        b"ht_tp:/admin/users",
        b"?x=/admin/users",
    ] {
        assert_refused(port, target, &[]);
    }
}

/// A Mapping's header match reads the request as the edge leaves it: a
/// client cannot pick a Mapping with a header the gateway drops before
/// the upstream sees it (a forged x-forwarded-client-cert, x-envoy-*,
/// l5d-dst-override), as Envoy sanitises them before routing.
#[test]
fn headers_the_edge_drops_do_not_choose_a_mapping() {
    let privileged = Echo::plain("privileged");
    let public = Echo::plain("public");
    let resources = [
        route(
            "by-cert",
            "/api/",
            &privileged,
            "regex_headers:\n  x-forwarded-client-cert: \".*spiffe://admin.*\"",
        ),
        route(
            "by-envoy",
            "/api/",
            &privileged,
            "headers:\n  x-envoy-internal: \"true\"",
        ),
        route(
            "by-l5d",
            "/api/",
            &privileged,
            "headers:\n  l5d-dst-override: admin",
        ),
        route("by-role", "/api/", &privileged, "headers:\n  x-role: admin"),
        route("public", "/api/", &public, ""),
    ]
    .concat();
    let (dir, _gateway, port) = start_gateway("", &resources);
    let report = check(dir.path());
    assert!(
        report.stdout.contains("Mapping: 5 accepted"),
        "{}",
        report.stdout
    );
    // Header matching itself works: a header the edge keeps chooses.
    let chosen = raw_get(port, b"/api/x", &[b"x-role: admin"]).echo_ok();
    assert_eq!(chosen.server(), "privileged");
    for forged in [
        &b"X-Forwarded-Client-Cert: By=spiffe://admin;URI=spiffe://admin"[..],
        b"X_Forwarded_Client_Cert: By=spiffe://admin",
        b"x-envoy-internal: true",
        b"l5d-dst-override: admin",
    ] {
        let reply = raw_get(port, b"/api/x", &[forged]).echo_ok();
        assert_eq!(
            reply.server(),
            "public",
            "{}",
            String::from_utf8_lossy(forged)
        );
    }
}

/// `x-envoy-original-path` is the gateway's word on the path before a
/// rewrite: the canonical one, as in Envoy, and only when the Mapping
/// rewrote it; a client's own never reaches the upstream. Escaped slashes
/// pass by default (after the default rewrite `/`) and are refused with
/// `reject_requests_with_escaped_slashes`.
#[test]
fn original_path_and_escaped_slashes() {
    let plain = Echo::plain("plain");
    let kept = Echo::plain("kept");
    let mappings = [
        route("plain", "/plain/", &plain, ""),
        route("kept", "/kept/", &kept, "rewrite: /kept/"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &mappings);

    let spoof: &[&[u8]] = &[b"x-envoy-original-path: /spoofed"];
    let e = raw_get(port, b"/plain/a/../b?q=1", spoof).echo_ok();
    assert_eq!(e.uri(), "/b?q=1");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/plain/b?q=1"]);
    let e = raw_get(port, b"/plain/x/%2e%2e/%63%2fd", spoof).echo_ok();
    assert_eq!(e.uri(), "/c%2Fd");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/plain/c%2Fd"]);
    let e = raw_get(port, b"/plain/a%2Fb", &[]).echo_ok();
    assert_eq!(e.uri(), "/a%2Fb");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/plain/a%2Fb"]);
    // No rewrite, no original path: not even the client's.
    let e = raw_get(port, b"/kept/a/../b", spoof).echo_ok();
    assert_eq!(e.uri(), "/kept/b");
    assert!(!e.has_header("x-envoy-original-path"), "{:?}", e.headers());

    let strict = [
        module("reject_requests_with_escaped_slashes: true"),
        mappings,
    ]
    .concat();
    let (_dir2, _gateway2, strict_port) = start_gateway("", &strict);
    for target in [
        &b"/plain/a%2Fb"[..],
        b"/plain/a%2fb",
        b"/plain/a%5cb",
        b"/kept/%2e%2e/plain/a%2Fb",
    ] {
        assert_refused(strict_port, target, &[]);
    }
    // `%252F` is an escaped `%`, not a slash.
    assert_eq!(
        raw_get(strict_port, b"/plain/a%252Fb", &[]).echo_ok().uri(),
        "/a%252Fb"
    );
    assert_eq!(
        raw_get(strict_port, b"/plain/ab", &[]).echo_ok().uri(),
        "/ab"
    );
}

// ---------------------------------------------------------------------------
// 2. The authorizer and the upstream read the same path
// ---------------------------------------------------------------------------

/// A response that is not the secret file (nginx's body is exactly it).
fn assert_no_secret(response: &Response, target: &str) {
    assert!(
        response.status != 200 && response.text() != "secret",
        "{target} leaked the secret: {} {}",
        response.status,
        response.text()
    );
}

/// Stops the classic authorizer bypass: an authorizer that allows only
/// `/public/*` and an nginx that resolves `..`, `%2e%2e` and `..%2f`
/// itself. `GET /public/../admin/secret.html` must be judged as the
/// `/admin/secret.html` nginx would serve (denied), and a `bypass_auth`
/// Mapping for `/static/public/` must not be a way out of its prefix.
#[test]
fn an_authorizer_judges_the_path_the_upstream_serves() {
    let nginx = Nginx::static_files(&[
        ("public/index.html", "public"),
        ("admin/secret.html", "secret"),
    ]);
    let authz = Echo::spawn(
        "authz",
        vec!["--allow-prefix".into(), "/extauth/public/".into()],
    );
    let service = format!("127.0.0.1:{}", nginx.port());
    let resources = [
        doc(
            "AuthService",
            "name: authz",
            &format!(
                "auth_service: 127.0.0.1:{}\npath_prefix: /extauth",
                authz.port()
            ),
        ),
        route_to("public", "/public/", &service, "rewrite: /public/"),
        route_to("admin", "/admin/", &service, "rewrite: /admin/"),
        route_to(
            "static",
            "/static/public/",
            &service,
            "rewrite: /public/\nbypass_auth: true",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    // The setup works: public is allowed, admin denied, the bypass serves.
    let public = raw_get(port, b"/public/index.html", &[]);
    assert_eq!(
        (public.status, public.text().as_str()),
        (200, "public"),
        "{public:?}"
    );
    let bypass = raw_get(port, b"/static/public/index.html", &[]);
    assert_eq!(
        (bypass.status, bypass.text().as_str()),
        (200, "public"),
        "{bypass:?}"
    );
    let admin = raw_get(port, b"/admin/secret.html", &[]);
    assert_eq!(admin.status, 403, "{}", admin.text());

    // Traversals out of /public/: the authorizer is asked about the path
    // nginx would serve, and denies it.
    for target in [
        "/public/../admin/secret.html",
        "/public/%2e%2e/admin/secret.html",
        "/public/.%2e/admin/secret.html",
        "/public/%2E%2E/admin/secret.html",
        "/public/./../admin/./secret.html",
    ] {
        let r = raw_get(port, target.as_bytes(), &[]);
        assert_no_secret(&r, target);
        assert_eq!(r.status, 403, "{target}: {}", r.text());
        assert_eq!(
            r.echo().uri(),
            "/extauth/admin/secret.html",
            "{target}: the authorizer saw the canonical path"
        );
    }
    // What only an upstream would read as a traversal: refused outright.
    for target in [
        "/public/..%2fadmin/secret.html",
        "/public/..%2Fadmin/secret.html",
        "/public/%2e%2e%2fadmin/secret.html",
        "/public/..;/admin/secret.html",
        "/public/..%5cadmin/secret.html",
        "/public\\..\\admin/secret.html",
    ] {
        let r = assert_refused(port, target.as_bytes(), &[]);
        assert_no_secret(&r, target);
    }

    // Out of the bypass Mapping: once canonical, the request is no longer
    // under /static/public/, so the bypass does not apply and the
    // authorizer (or the missing route) answers.
    for target in [
        "/static/public/%2e%2e/admin/secret.html",
        "/static/public/.%2e/admin/secret.html",
        "/static/public/%2E%2E/admin/secret.html",
        "/static/public/../admin/secret.html",
    ] {
        let r = raw_get(port, target.as_bytes(), &[]);
        assert_no_secret(&r, target);
        assert!(
            r.status == 403 || r.status == 404,
            "{target}: {} {}",
            r.status,
            r.text()
        );
    }
    for target in [
        "/static/public/%2e%2e/%2e%2e/admin/secret.html",
        "/static/public/../../admin/secret.html",
    ] {
        let r = raw_get(port, target.as_bytes(), &[]);
        assert_no_secret(&r, target);
        assert_eq!(r.status, 403, "{target}: {}", r.text());
        assert_eq!(r.echo().uri(), "/extauth/admin/secret.html", "{target}");
    }
    for target in [
        "/static/public/..%2fadmin/secret.html",
        "/static/public/..%2Fadmin/secret.html",
        "/static/public/%2e%2e%2fadmin/secret.html",
        "/static/public/..;/admin/secret.html",
    ] {
        let r = assert_refused(port, target.as_bytes(), &[]);
        assert_no_secret(&r, target);
    }
}

// ---------------------------------------------------------------------------
// 3. FilterPolicy paths and case
// ---------------------------------------------------------------------------

/// Stops a FilterPolicy bypass by spelling: a Mapping that serves
/// `/secret/` in any case (`case_sensitive: false`) is guarded by the rule
/// `/secret/*` in any case, and escapes or dot segments cannot move a
/// request out of the rule's sight while the Mapping still serves it.
#[test]
fn a_filter_policy_guards_every_spelling_its_mapping_serves() {
    let secret = Echo::plain("secret");
    let open = Echo::plain("open");
    let resources = [
        route("secret", "/secret/", &secret, "case_sensitive: false"),
        route("open", "/open/", &open, ""),
        doc(
            "Filter",
            "name: nobody",
            "IpAllowDeny:\n  ip_allow:\n    - peer: 10.255.255.255",
        ),
        doc(
            "FilterPolicy",
            "name: guard",
            "rules:\n  - path: /secret/*\n    filters: [{name: nobody}]",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    assert_eq!(raw_get(port, b"/open/x", &[]).echo_ok().server(), "open");
    for target in [
        "/secret/x",
        "/SECRET/x",
        "/Secret/x",
        "/sEcReT/x",
        "/%53ECRET/x",
        "/%73ecret/x",
        "/open/../Secret/x",
        "/open/%2e%2e/SECRET/x",
        "/secret/./x",
    ] {
        let r = raw_get(port, target.as_bytes(), &[]);
        assert_eq!(r.status, 403, "{target}: {}", r.text());
        assert!(!is_echo(&r), "{target} reached the upstream");
    }
}

// ---------------------------------------------------------------------------
// 4. The ACME exemption
// ---------------------------------------------------------------------------

/// Stops an escape from the insecure-request policy: only the ACME
/// challenge path is served over cleartext on a Host that redirects to
/// HTTPS, and `/.well-known/acme-challenge/%2e%2e/%2e%2e/admin/` is
/// `/admin/`, so it is redirected like `/admin/` itself.
#[test]
fn the_acme_exemption_covers_only_the_challenge_path() {
    let admin = Echo::plain("admin");
    let acme = Echo::plain("acme");
    let resources = [
        host(
            "everything",
            "*",
            "requestPolicy:\n  insecure:\n    action: Redirect",
        ),
        route("admin", "/admin/", &admin, "rewrite: /admin/"),
        route(
            "acme",
            "/.well-known/acme-challenge/",
            &acme,
            "rewrite: /.well-known/acme-challenge/",
        ),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("", &resources);

    for target in [
        "/admin/",
        "/.well-known/acme-challenge/%2e%2e/%2e%2e/admin/",
        "/.well-known/acme-challenge/../../admin/",
        "/.well-known/acme-challenge/.%2e/%2E./admin/",
    ] {
        let r = raw_get(port, target.as_bytes(), &[]);
        assert_eq!(r.status, 301, "{target}: {}", r.text());
        assert!(!is_echo(&r), "{target} was served");
        // To the canonical path: the redirect repeats no spelling.
        assert_eq!(
            r.header("location"),
            Some("https://127.0.0.1/admin/"),
            "{target}"
        );
    }
    // The challenge itself is served over cleartext, however spelled.
    let token = raw_get(port, b"/.well-known/acme-challenge/token", &[]).echo_ok();
    assert_eq!(
        (token.server().as_str(), token.uri().as_str()),
        ("acme", "/.well-known/acme-challenge/token")
    );
    let spelled = raw_get(port, b"/.well-known/%61cme-challenge/token", &[]).echo_ok();
    assert_eq!(spelled.server(), "acme");

    for target in [
        "/.well-known/acme-challenge/..%2f..%2fadmin/",
        "/.well-known/acme-challenge/..;/..;/admin/",
    ] {
        assert_refused(port, target.as_bytes(), &[]);
    }
}

// ---------------------------------------------------------------------------
// 5. Headers only the edge may set
// ---------------------------------------------------------------------------

/// Stops identity spoofing through the default Module (XFCC SANITIZE): no
/// client x-forwarded-client-cert reaches the upstream, even a line that
/// is not text (which once slipped past the sanitizer); nor do `x-envoy-*`
/// or `l5d-dst-override`; nor the underscore spellings of the gateway's
/// headers, which CGI-style upstreams read as the real ones. An ordinary
/// header with `_` still passes (Envoy's default ALLOW).
#[test]
fn identity_headers_from_the_client_never_reach_the_upstream() {
    let echo = Echo::plain("app");
    let (_dir, _gateway, port) = start_gateway("", &route("app", "/", &echo, ""));

    let cases: &[(&str, &[&[u8]])] = &[
        (
            "XFCC with a byte outside ASCII",
            &[b"x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://evil\xff"],
        ),
        (
            "XFCC, one line text and one not",
            &[
                b"x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://a",
                b"x-forwarded-client-cert: By=spiffe://evil;URI=spiffe://evil\xff",
            ],
        ),
        (
            "XFCC, the line that is not text first",
            &[
                b"X-Forwarded-Client-Cert: URI=spiffe://evil\xfe",
                b"X-Forwarded-Client-Cert: URI=spiffe://a",
            ],
        ),
        (
            "XFCC as text",
            &[b"X-Forwarded-Client-Cert: By=spiffe://evil;URI=spiffe://evil"],
        ),
    ];
    for (what, lines) in cases {
        let seen = raw_get(port, b"/", lines).echo_ok();
        assert!(
            !seen.has_header("x-forwarded-client-cert"),
            "{what}: {:?}",
            seen.headers()
        );
    }

    let seen = raw_get(
        port,
        b"/",
        &[
            b"x-envoy-foo: 1",
            b"X-Envoy-Original-Path: /x",
            b"x-envoy-internal: true",
            b"l5d-dst-override: evil:80",
            b"X_Forwarded_Client_Cert: URI=spiffe://evil",
            b"X_Forwarded_For: 6.6.6.6",
            b"X_Forwarded_Proto: https",
            b"X_Request_Id: evil-id",
            b"X_Envoy_Anything: 1",
            b"x-forwarded_client-cert: URI=spiffe://evil",
            b"L5d_Dst_Override: evil:80",
            b"X_Custom: 1",
        ],
    )
    .echo_ok();
    for name in [
        "x-envoy-foo",
        "x-envoy-original-path",
        "x-envoy-internal",
        "l5d-dst-override",
        "x_forwarded_client_cert",
        "x_forwarded_for",
        "x_forwarded_proto",
        "x_request_id",
        "x_envoy_anything",
        "x-forwarded_client-cert",
        "l5d_dst_override",
        "x-forwarded-client-cert",
    ] {
        assert!(!seen.has_header(name), "{name}: {:?}", seen.headers());
    }
    for (name, value) in seen.headers() {
        assert!(
            !value.contains("evil") && !value.contains("6.6.6.6"),
            "{name}: {value} came from the client"
        );
    }
    assert_ne!(seen.header("x-request-id").as_deref(), Some("evil-id"));
    assert_eq!(seen.headers_all("x-forwarded-proto"), ["http"]);
    assert_eq!(seen.headers_all("x_custom"), ["1"]);
}

/// `headers_with_underscores_action`: DROP_HEADER removes every name with
/// `_` (the `-` spelling stays), REJECT_REQUEST answers 400 to a request
/// that has one and serves one that has none.
#[test]
fn headers_with_underscores_can_be_dropped_or_refused() {
    let echo = Echo::plain("app");
    let with = |action: &str| {
        [
            route("app", "/", &echo, ""),
            module(&format!("headers_with_underscores_action: {action}")),
        ]
        .concat()
    };

    let (_dir, _gateway, port) = start_gateway("", &with("DROP_HEADER"));
    let seen = raw_get(port, b"/", &[b"X_Custom: 1", b"X-Custom: 2"]).echo_ok();
    assert!(!seen.has_header("x_custom"), "{:?}", seen.headers());
    assert_eq!(seen.headers_all("x-custom"), ["2"]);

    let (_dir2, _gateway2, port2) = start_gateway("", &with("REJECT_REQUEST"));
    assert_refused(port2, b"/", &[b"X_Custom: 1"]);
    let served = raw_get(port2, b"/", &[b"X-Custom: 1"]).echo_ok();
    assert_eq!(served.headers_all("x-custom"), ["1"]);
}

// ---------------------------------------------------------------------------
// 6. The client address behind a trusted proxy
// ---------------------------------------------------------------------------

/// Stops IP-rule evasion behind `l7Depth: 1`: the client is the entry the
/// trusted proxy appended to X-Forwarded-For, even when an earlier entry
/// holds bytes that are not text (once that hid the whole header and the
/// deny rule saw no address); an entry that is no address means the
/// connection's peer, never "no client".
#[test]
fn ip_deny_reads_the_trusted_entry_whatever_precedes_it() {
    let echo = Echo::plain("app");
    let resources = [
        route("app", "/", &echo, ""),
        module("ip_deny:\n  - remote: 6.6.6.6"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("l7Depth: 1", &resources);

    let cases: &[(&[&[u8]], u16)] = &[
        (&[b"X-Forwarded-For: \xff, 6.6.6.6"], 403),
        (&[b"X-Forwarded-For: 1.2.3.4\xff,6.6.6.6"], 403),
        (
            &[b"X-Forwarded-For: \xff", b"X-Forwarded-For: 6.6.6.6"],
            403,
        ),
        (&[b"X-Forwarded-For: 6.6.6.6"], 403),
        (&[b"X-Forwarded-For: 1.2.3.4"], 200),
        (&[b"X-Forwarded-For: 6.6.6.6, 1.2.3.4"], 200),
        // No address: the peer, 127.0.0.1, which the rule does not deny.
        (&[b"X-Forwarded-For: garbage"], 200),
        (&[], 200),
    ];
    for (lines, status) in cases {
        let r = raw_get(port, b"/", lines);
        let shown: Vec<_> = lines.iter().map(|l| String::from_utf8_lossy(l)).collect();
        assert_eq!(r.status, *status, "{shown:?}: {}", r.text());
        assert_eq!(is_echo(&r), *status == 200, "{shown:?}");
    }
}

/// The same reading for `ip_allow`: the trusted entry decides, a client's
/// earlier entry (text or not) neither helps nor hurts, and a trusted
/// entry that is no address means the peer, which the rule does not allow.
#[test]
fn ip_allow_reads_the_trusted_entry_whatever_precedes_it() {
    let echo = Echo::plain("app");
    let resources = [
        route("app", "/", &echo, ""),
        module("ip_allow:\n  - remote: 1.2.3.4"),
    ]
    .concat();
    let (_dir, _gateway, port) = start_gateway("l7Depth: 1", &resources);

    let cases: &[(&[&[u8]], u16)] = &[
        (&[b"X-Forwarded-For: 1.2.3.4"], 200),
        (&[b"X-Forwarded-For: \xff, 1.2.3.4"], 200),
        (&[b"X-Forwarded-For: 1.2.3.4, \xff"], 403),
        (&[b"X-Forwarded-For: 1.2.3.4, garbage"], 403),
        (&[b"X-Forwarded-For: 1.2.3.4, 5.6.7.8"], 403),
        (&[b"X-Forwarded-For: garbage"], 403),
        (&[], 403),
    ];
    for (lines, status) in cases {
        let r = raw_get(port, b"/", lines);
        let shown: Vec<_> = lines.iter().map(|l| String::from_utf8_lossy(l)).collect();
        assert_eq!(r.status, *status, "{shown:?}: {}", r.text());
        assert_eq!(is_echo(&r), *status == 200, "{shown:?}");
    }
}

/// On TLS the SNI chooses the Host, and a FilterPolicy rule for that Host
/// guards its paths whatever the Host header says. A Host header naming no
/// Host used to move the request out from under the rule (the policy was
/// matched against the header while the route was the SNI Host's): the
/// request reached the upstream past an IP allow-list.
#[test]
fn a_host_header_naming_no_host_does_not_escape_the_sni_hosts_policy() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let cert = pki.issue_server("a.example", &[]);
    let echo = Echo::plain("app");
    let port = free_port();
    let _gateway = start_gateway_without_listener(
        dir.path(),
        &[
            listener("https", port, "HTTPS"),
            tls_host("a", "a.example", &cert, ""),
            doc(
                "Filter",
                "name: office",
                "IpAllowDeny:\n  ip_allow:\n  - peer: 10.0.0.0/8",
            ),
            doc(
                "FilterPolicy",
                "name: guard",
                "rules:\n- host: a.example\n  path: /api/*\n  filters:\n  - name: office",
            ),
            mapping("api", "", "/api/", &echo, "hostname: \"*\""),
        ],
    );
    let tls = TlsOpts::new(pki.ca_pem_path(), "a.example");
    for host in ["a.example", "x.invalid"] {
        let response = Request::get("/api/x")
            .header("Host", host)
            .send_tls(port, &tls);
        assert_eq!(response.status, 403, "Host: {host}: {}", response.text());
    }
}
