//! Failing closed and keeping the last good version, through the real
//! binary (src/pipeline.rs, `start_refusal` in src/server.rs, `--strict`,
//! the `Unavailable` filter of src/filters/policy.rs, invalid Hosts):
//!
//! - an invalid Module stops the start; `--strict` refuses any invalid
//!   resource;
//! - a FilterPolicy rule whose Filter is invalid refuses its paths (403)
//!   while the policy's other rules keep guarding theirs;
//! - an invalid Host keeps its hostname and SNI place and refuses there
//!   (503, failed handshake) instead of another Host serving its names, and
//!   no `*` Host is synthesized while any Host resource exists;
//! - on reload, a resource an edit broke keeps its last good version while
//!   every other change of the same edit applies; an empty file keeps its
//!   last good content; a Secret broken under a TLS Host keeps its last good
//!   certificate.
//!
//! Before these changes an invalid Module was dropped (and with it
//! ip_allow/ip_deny), an invalid Host or FilterPolicy was left out (opening
//! its names to the other Hosts, its paths to no filter), and a reload with
//! a new error was refused as a whole, so no other change of that edit
//! applied. Each test below says which of these it would catch.

// Test code: a panic is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// Reloads settle in 150 ms to 2 s; this leaves room for a slow machine.
const RELOAD: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A Mapping of `prefix` to `echo` on every Host; `extra` are spec lines.
fn route(name: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    mapping(name, "", prefix, echo, &format!("hostname: \"*\"\n{extra}"))
}

/// A Mapping that is invalid: it has no `service`.
fn route_without_service(name: &str, prefix: &str) -> String {
    doc(
        "Mapping",
        &format!("name: {name}"),
        &format!("hostname: \"*\"\nprefix: {}", q(prefix)),
    )
}

/// Replaces a file the way editors and Kubernetes volumes do: write a new
/// file, then rename it over the old one.
fn replace(path: &Path, content: &str) {
    let next = path.with_extension("next");
    fs::write(&next, content).unwrap();
    fs::rename(&next, path).unwrap();
}

/// `dir/resources/<name>`.
fn resource_file(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join("resources").join(name)
}

/// The echo upstream that answered GET `path` with a 200, if one did.
fn served_by(port: u16, path: &str) -> Option<String> {
    served_by_request(Request::get(path), port)
}

fn served_by_request(request: Request, port: u16) -> Option<String> {
    let response = request.try_send(port).ok()?;
    echo_server(&response)
}

fn echo_server(response: &Response) -> Option<String> {
    if response.status != 200 {
        return None;
    }
    let json: Value = serde_json::from_slice(&response.body).ok()?;
    json.get("connection")?;
    Some(json.get("server")?.as_str()?.to_string())
}

/// Status and body of GET `path`.
fn get(port: u16, path: &str) -> (u16, String) {
    let response = Request::get(path).send(port);
    (response.status, response.text())
}

/// Waits for `what`, failing with the gateway's log.
fn wait_for(gateway: &Gateway, what: &str, ready: impl FnMut() -> bool) {
    assert!(
        poll_until(RELOAD, ready),
        "{what} within {RELOAD:?}; log:\n{}",
        gateway.log()
    );
}

/// The admin's `[key, message]` error pairs
/// (`/ambassador/v0/diag/?json=true&filter=errors`).
fn diag_errors(gateway: &Gateway) -> Vec<(String, String)> {
    let response = gateway.admin_get("/ambassador/v0/diag/?json=true&filter=errors");
    assert_eq!(response.status, 200, "{}", response.text());
    let json: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("diag errors are not JSON ({e}): {}", response.text()));
    json.as_array()
        .unwrap_or_else(|| panic!("diag errors are not a list: {json}"))
        .iter()
        .map(|pair| {
            let text = |i: usize| {
                pair.get(i)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            (text(0), text(1))
        })
        .collect()
}

/// Whether an error's key is of the resource `name` (`name.namespace.N`).
fn names(key: &str, name: &str) -> bool {
    key.starts_with(&format!("{name}.default."))
}

/// Asserts the diag lists an error of the resource called `name`.
fn assert_diag_names(gateway: &Gateway, name: &str) {
    let errors = diag_errors(gateway);
    assert!(
        errors.iter().any(|(key, _)| names(key, name)),
        "no error of {name}: {errors:?}"
    );
}

/// Waits until the diag errors satisfy `wanted` (the status is published
/// a moment after the snapshot); returns them, or fails showing them, the
/// whole diag and the log.
fn wait_diag(
    gateway: &Gateway,
    what: &str,
    wanted: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let found = poll_until(RELOAD, || {
        errors = diag_errors(gateway);
        wanted(&errors)
    });
    assert!(
        found,
        "diag errors should {what}; they are {errors:?}\ndiag:\n{}\nlog:\n{}",
        gateway.admin_get("/ambassador/v0/diag/?json=true").text(),
        gateway.log()
    );
    errors
}

/// The sum of every `pingress_resource_errors{kind=..}` series.
fn resource_errors(gateway: &Gateway) -> f64 {
    let response = gateway.admin_get("/metrics");
    response
        .text()
        .lines()
        .filter(|line| line.starts_with("pingress_resource_errors{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `pingress_config_generation`: +1 per applied reload.
fn generation(gateway: &Gateway) -> f64 {
    gateway.metric("pingress_config_generation").unwrap_or(0.0)
}

/// Starts `pingress -c <dir>/gateway.yaml <extra>` and waits for it to
/// exit; returns its exit code, how long it ran, and its log. Panics if it
/// is still running after 15 s (it started serving).
fn run_until_exit(dir: &Path, extra: &[&str], log: &str) -> (Option<i32>, Duration, String) {
    let started = Instant::now();
    let mut gateway = Gateway::spawn(dir, extra, log);
    let mut status = None;
    let exited = poll_until(Duration::from_secs(15), || {
        status = gateway.try_wait();
        status.is_some()
    });
    assert!(
        exited,
        "pingress {extra:?} kept running instead of refusing to start; log:\n{}",
        gateway.log()
    );
    (
        status.and_then(|s| s.code()),
        started.elapsed(),
        gateway.log(),
    )
}

/// The serial of the certificate a TLS handshake with `opts` was given.
fn served_serial(port: u16, opts: &TlsOpts, path: &str) -> Result<String, String> {
    let (_, cert) = Request::get(path).try_send_tls_peer(port, opts)?;
    Ok(cert
        .serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string())
}

// ---------------------------------------------------------------------------
// 1. An invalid Module stops the start
// ---------------------------------------------------------------------------

/// An invalid Module holds ip_allow/ip_deny and every request-wide setting:
/// starting without it would serve without them, so the start is refused
/// (exit 1) and the message names the Module's error. The same gateway
/// with a valid Module starts. Before: the Module was left out and the
/// gateway started, the ip_deny gone.
#[test]
fn an_invalid_module_stops_the_start() {
    let echo = Echo::plain("app");
    for (config, named) in [
        ("ip_deny:\n  - peer: not-an-ip", "ip_deny[0]"),
        (
            "headers_with_underscores_action: BOGUS",
            "headers_with_underscores_action",
        ),
    ] {
        let dir = tempdir();
        write_gateway(
            dir.path(),
            free_port(),
            free_port(),
            &[route("app", "/", &echo, ""), module(config)].concat(),
        );
        let (code, took, log) = run_until_exit(dir.path(), &[], "gateway.log");
        assert_eq!(code, Some(1), "{config}: exit code; log:\n{log}");
        assert!(
            took < Duration::from_secs(10),
            "{config}: took {took:?} to refuse"
        );
        assert!(log.contains("an invalid Module"), "{config}: {log}");
        assert!(log.contains("Module default/ambassador"), "{config}: {log}");
        assert!(log.contains(named), "{config}: {log}");
    }

    // Valid Module settings of both kinds: it starts and serves.
    let port = free_port();
    let dir = tempdir();
    write_gateway(
        dir.path(),
        port,
        free_port(),
        &[
            route("app", "/", &echo, ""),
            module("ip_deny:\n  - peer: 10.0.0.0/8\nheaders_with_underscores_action: DROP_HEADER"),
        ]
        .concat(),
    );
    let gateway = Gateway::start(dir.path());
    assert_eq!(
        served_by(port, "/x").as_deref(),
        Some("app"),
        "{}",
        gateway.log()
    );
}

// ---------------------------------------------------------------------------
// 2. --strict
// ---------------------------------------------------------------------------

/// Without `--strict` an invalid Mapping is left out and the valid one
/// serves; with `--strict` the start is refused (exit 1) naming the error,
/// and a configuration without errors starts. Before: there was no
/// `--strict` (clap refused the flag with exit code 2).
#[test]
fn strict_refuses_to_start_with_an_invalid_resource() {
    let echo = Echo::plain("good");
    let resources = [
        route("good", "/good/", &echo, ""),
        route_without_service("bad", "/bad/"),
    ]
    .concat();

    let dir = tempdir();
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let (code, took, log) = run_until_exit(dir.path(), &["--strict"], "strict.log");
    assert_eq!(code, Some(1), "exit code; log:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?} to refuse");
    assert!(log.contains("--strict"), "{log}");
    assert!(log.contains("Mapping default/bad"), "{log}");
    assert!(log.contains("service is required"), "{log}");

    // The same configuration without --strict: the valid Mapping serves.
    let port = free_port();
    let dir = tempdir();
    write_gateway(dir.path(), port, free_port(), &resources);
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/good/").as_deref(), Some("good"));
    assert_eq!(get(port, "/bad/").0, 404);
    assert!(
        gateway.log().contains("service is required"),
        "{}",
        gateway.log()
    );
    drop(gateway);

    // --strict with nothing invalid starts.
    let port = free_port();
    let dir = tempdir();
    write_gateway(
        dir.path(),
        port,
        free_port(),
        &route("good", "/good/", &echo, ""),
    );
    let mut gateway = Gateway::spawn(dir.path(), &["--strict"], "strict.log");
    gateway.wait_ready(Duration::from_secs(20));
    assert_eq!(served_by(port, "/good/").as_deref(), Some("good"));
}

// ---------------------------------------------------------------------------
// 3. A FilterPolicy rule with an invalid Filter refuses its paths
// ---------------------------------------------------------------------------

/// Rule A names an invalid Filter: its paths get 403. Rule B of the same
/// policy still runs its valid Filter (127.0.0.1 allowed, 127.0.0.2 not).
/// Paths no rule selects are served. Before: the whole FilterPolicy was
/// dropped, so /guarded/ was served to anyone and /other/ to 127.0.0.2.
#[test]
fn a_policy_rule_with_an_invalid_filter_refuses_its_paths() {
    let echo = Echo::plain("app");
    let resources = [
        route("guarded", "/guarded/", &echo, ""),
        route("other", "/other/", &echo, ""),
        route("free", "/free/", &echo, ""),
        doc(
            "Filter",
            "name: broken",
            "IpAllowDeny:\n  ip_allow:\n    - peer: 10.0.0.0/33",
        ),
        doc(
            "Filter",
            "name: local-only",
            "IpAllowDeny:\n  ip_allow:\n    - peer: 127.0.0.1",
        ),
        doc(
            "FilterPolicy",
            "name: policy",
            "rules:\n  - path: /guarded/*\n    filters:\n      - name: broken\n  \
             - path: /other/*\n    filters:\n      - name: local-only",
        ),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let (status, body) = get(port, "/guarded/x");
    assert_eq!(status, 403, "{body}\nlog:\n{}", gateway.log());
    assert!(body.contains("not configured correctly"), "{body}");
    assert_eq!(served_by(port, "/other/x").as_deref(), Some("app"));
    assert_eq!(served_by(port, "/free/x").as_deref(), Some("app"));
    // Rule B is enforced: the policy was not dropped.
    let outsider = Request::get("/other/x").source_ip("127.0.0.2").send(port);
    assert_eq!(outsider.status, 403, "{}", outsider.text());
    assert!(outsider.text().contains("IP rules"), "{}", outsider.text());
    // The broken Filter is reported.
    assert_diag_names(&gateway, "broken");
}

// ---------------------------------------------------------------------------
// 4. An invalid Host keeps its names and refuses there
// ---------------------------------------------------------------------------

/// Cleartext: the Host for broken.example waits for a Secret that does not
/// exist. Its name gets 503 instead of the `*` Host's routes; other names
/// are served. Before: the invalid Host was left out and `*` served
/// broken.example.
#[test]
fn an_invalid_host_refuses_its_names_in_cleartext() {
    let echo = Echo::plain("app");
    let resources = [
        host(
            "good",
            "*",
            "requestPolicy:\n  insecure:\n    action: Route",
        ),
        host(
            "broken",
            "broken.example",
            &tls_spec("not-issued-yet", Some("Route")),
        ),
        route("app", "/", &echo, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let refused = Request::get("/x")
        .header("Host", "broken.example")
        .send(port);
    assert_eq!(
        refused.status,
        503,
        "{}\nlog:\n{}",
        refused.text(),
        gateway.log()
    );
    assert!(echo_server(&refused).is_none(), "{}", refused.text());
    assert!(
        refused.text().contains("not configured correctly"),
        "{}",
        refused.text()
    );
    let other = Request::get("/x").header("Host", "other.example");
    assert_eq!(served_by_request(other, port).as_deref(), Some("app"));
    assert_diag_names(&gateway, "broken");
}

/// With only an invalid Host, no `*` Host is synthesized: other names get
/// the gateway's 404 (no Host), its own name 503. Before: with no valid
/// Host the gateway synthesized `*` and served every name, broken.example
/// included.
#[test]
fn an_invalid_host_alone_does_not_bring_the_default_host() {
    let echo = Echo::plain("app");
    let resources = [
        host(
            "broken",
            "broken.example",
            &tls_spec("not-issued-yet", Some("Route")),
        ),
        route("app", "/", &echo, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let other = Request::get("/x")
        .header("Host", "other.example")
        .send(port);
    assert_eq!(
        other.status,
        404,
        "{}\nlog:\n{}",
        other.text(),
        gateway.log()
    );
    assert!(echo_server(&other).is_none(), "{}", other.text());
    assert!(other.text().contains("no Host"), "{}", other.text());
    let own = Request::get("/x")
        .header("Host", "broken.example")
        .send(port);
    assert_eq!(own.status, 503, "{}", own.text());
}

/// TLS: a valid `*` Host whose certificate names both other.example and
/// broken.example, and an invalid Host for broken.example. A handshake for
/// broken.example fails (even without checking the name, so the `*` Host's
/// certificate, which would verify, was not offered); other.example is
/// served. Before: the invalid Host was left out and the `*` Host's
/// certificate answered broken.example.
#[test]
fn an_invalid_tls_host_fails_its_handshakes() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let wild = pki.issue_server("wild", &["other.example", "broken.example"]);
    let echo = Echo::plain("app");
    let port = free_port();
    let resources = [
        listener("https", port, "HTTPS"),
        host("wild", "*", &tls_spec("wild-cert", None)),
        tls_secret("wild-cert", "default", &wild),
        host(
            "broken",
            "broken.example",
            &tls_spec("not-issued-yet", None),
        ),
        route("app", "/", &echo, ""),
    ]
    .concat();
    write_gateway_without_listener(dir.path(), free_port(), &resources);
    let gateway = Gateway::start(dir.path());

    let other = TlsOpts::new(pki.ca_pem_path(), "other.example");
    let served = Request::get("/x")
        .try_send_tls(port, &other)
        .unwrap_or_else(|e| panic!("other.example: {e}\nlog:\n{}", gateway.log()));
    assert_eq!(echo_server(&served).as_deref(), Some("app"));

    let broken = TlsOpts::new(pki.ca_pem_path(), "broken.example").verify_name(None);
    match Request::get("/x").try_send_tls(port, &broken) {
        Err(_) => {}
        Ok(response) => panic!(
            "the handshake for broken.example completed: {} {}",
            response.status,
            response.text()
        ),
    }
    // The listener still works for the valid Host afterwards.
    assert!(Request::get("/x").try_send_tls(port, &other).is_ok());
}

// ---------------------------------------------------------------------------
// 5. A reload keeps the last good version of what an edit broke
// ---------------------------------------------------------------------------

/// One edit breaks `a`, repoints `b` and adds `c`: `a` keeps its last good
/// version, `b` and `c` apply, and the error is reported (diag, metric).
/// Fixing `a` applies it and clears the error. Before: a reload with a new
/// error was refused as a whole: /c/ never served and /b/ stayed on one.
#[test]
fn a_broken_edit_keeps_the_last_good_version_and_applies_the_rest() {
    let dir = tempdir();
    let one = Echo::plain("one");
    let two = Echo::plain("two");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    fs::write(
        &routes,
        [route("a", "/a/", &one, ""), route("b", "/b/", &one, "")].concat(),
    )
    .unwrap();
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/a/").as_deref(), Some("one"));
    assert_eq!(served_by(port, "/b/").as_deref(), Some("one"));
    assert_eq!(get(port, "/c/").0, 404);

    replace(
        &routes,
        &[
            route_without_service("a", "/a/"),
            route("b", "/b/", &two, ""),
            route("c", "/c/", &two, ""),
        ]
        .concat(),
    );
    wait_for(&gateway, "/c/ to serve", || {
        served_by(port, "/c/").as_deref() == Some("two")
    });
    assert_eq!(
        served_by(port, "/a/").as_deref(),
        Some("one"),
        "last good a"
    );
    assert_eq!(served_by(port, "/b/").as_deref(), Some("two"));
    wait_diag(&gateway, "name mapping a", |errors| {
        errors
            .iter()
            .any(|(key, message)| names(key, "a") && message.contains("service is required"))
    });
    assert_eq!(
        gateway.metric("pingress_resource_errors{kind=\"Mapping\"}"),
        Some(1.0)
    );
    wait_for(&gateway, "the log to report the fallback", || {
        gateway.log().contains("last good version keeps serving")
    });

    // The fix applies and clears the error.
    replace(
        &routes,
        &[
            route("a", "/a/", &two, ""),
            route("b", "/b/", &two, ""),
            route("c", "/c/", &two, ""),
        ]
        .concat(),
    );
    wait_for(&gateway, "the fixed /a/ to serve", || {
        served_by(port, "/a/").as_deref() == Some("two")
    });
    let mapping_errors = gateway.metric("pingress_resource_errors{kind=\"Mapping\"}");
    assert!(
        mapping_errors.unwrap_or(0.0) == 0.0,
        "pingress_resource_errors{{kind=\"Mapping\"}} {mapping_errors:?}"
    );
    wait_diag(&gateway, "no longer name mapping a", |errors| {
        !errors.iter().any(|(key, _)| names(key, "a"))
    });
}

/// A Mapping that was never valid, then a document inserted above it in the
/// same file (its document number shifts), then another edit: every edit
/// applies, and the never-valid Mapping stays out. Before: the shifted
/// document's error looked new, the reload was refused, and so was every
/// later one.
#[test]
fn a_document_inserted_above_a_broken_one_does_not_block_later_edits() {
    let dir = tempdir();
    let one = Echo::plain("one");
    let two = Echo::plain("two");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    fs::write(
        &routes,
        [
            route_without_service("bad", "/bad/"),
            route("a", "/a/", &one, ""),
        ]
        .concat(),
    )
    .unwrap();
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/a/").as_deref(), Some("one"));
    assert_eq!(get(port, "/bad/").0, 404);
    let errors = diag_errors(&gateway);
    assert!(
        errors.iter().any(|(key, _)| key == "bad.default.1"),
        "{errors:?}"
    );

    replace(
        &routes,
        &[
            route("c", "/c/", &two, ""),
            route_without_service("bad", "/bad/"),
            route("a", "/a/", &one, ""),
        ]
        .concat(),
    );
    wait_for(&gateway, "/c/ (inserted above) to serve", || {
        served_by(port, "/c/").as_deref() == Some("two")
    });
    wait_diag(
        &gateway,
        "name the shifted document bad.default.2",
        |errors| errors.iter().any(|(key, _)| key == "bad.default.2"),
    );

    replace(
        &routes,
        &[
            route("c", "/c/", &two, ""),
            route_without_service("bad", "/bad/"),
            route("a", "/a/", &two, ""),
        ]
        .concat(),
    );
    wait_for(&gateway, "the later edit of /a/ to serve", || {
        served_by(port, "/a/").as_deref() == Some("two")
    });
    assert_eq!(served_by(port, "/c/").as_deref(), Some("two"));
    assert_eq!(get(port, "/bad/").0, 404);
}

// ---------------------------------------------------------------------------
// 6. An invalid Module on reload keeps its last good version
// ---------------------------------------------------------------------------

/// The Module denies 127.0.0.1. An edit breaks its ip_deny and adds a
/// Mapping: the Mapping applies (seen from 127.0.0.2, which the deny does
/// not list) and 127.0.0.1 is still denied everywhere. Before: the reload
/// was refused as a whole, so /c/ never served (and before that, an
/// invalid Module was dropped, lifting the deny).
#[test]
fn an_invalid_module_on_reload_keeps_its_last_good_version() {
    let dir = tempdir();
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    fs::write(
        &routes,
        [
            module("ip_deny:\n  - peer: 127.0.0.1"),
            route("a", "/a/", &echo, ""),
        ]
        .concat(),
    )
    .unwrap();
    let gateway = Gateway::start(dir.path());
    let from = |ip: &str, path: &str| Request::get(path).source_ip(ip).send(port);
    assert_eq!(from("127.0.0.1", "/a/").status, 403);
    assert_eq!(
        echo_server(&from("127.0.0.2", "/a/")).as_deref(),
        Some("app")
    );

    replace(
        &routes,
        &[
            module("ip_deny:\n  - peer: not-an-ip"),
            route("a", "/a/", &echo, ""),
            route("c", "/c/", &echo, ""),
        ]
        .concat(),
    );
    wait_for(&gateway, "/c/ to serve 127.0.0.2", || {
        echo_server(&from("127.0.0.2", "/c/")).as_deref() == Some("app")
    });
    for path in ["/a/", "/c/"] {
        let denied = from("127.0.0.1", path);
        assert_eq!(denied.status, 403, "{path}: {}", denied.text());
        assert!(denied.text().contains("IP rules"), "{}", denied.text());
    }
    wait_diag(&gateway, "name the Module's ip_deny", |errors| {
        errors
            .iter()
            .any(|(key, message)| names(key, "ambassador") && message.contains("ip_deny"))
    });
    assert_eq!(
        gateway.metric("pingress_resource_errors{kind=\"Module\"}"),
        Some(1.0)
    );
}

/// A misspelt kind or name is a mistake, not a deletion: the Module's
/// ip_deny keeps holding while its document says `ambasador` or
/// `kind: Modul`, and the rest of the edit applies. Deleting the document
/// removes it. Before the fix, the misspelt Module was ignored (a warning)
/// or an unknown kind, the old identity was gone, and ip_deny with it.
#[test]
fn a_misspelt_kind_or_name_keeps_the_last_good_resource() {
    let dir = tempdir();
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    let deny = "config:\n  ip_deny:\n  - peer: 127.0.0.1";
    fs::write(
        &routes,
        [
            doc("Module", "name: ambassador", deny),
            route("a", "/a/", &echo, ""),
        ]
        .concat(),
    )
    .unwrap();
    let gateway = Gateway::start(dir.path());
    let from = |ip: &str, path: &str| Request::get(path).source_ip(ip).send(port);
    assert_eq!(from("127.0.0.1", "/a/").status, 403);

    for (step, module) in [
        ("b", doc("Module", "name: ambasador", deny)),
        ("c", doc("Modul", "name: ambassador", deny)),
    ] {
        replace(
            &routes,
            &[
                module,
                route("a", "/a/", &echo, ""),
                route(step, &format!("/{step}/"), &echo, ""),
            ]
            .concat(),
        );
        let added = format!("/{step}/");
        wait_for(&gateway, &format!("{added} to serve 127.0.0.2"), || {
            echo_server(&from("127.0.0.2", &added)).as_deref() == Some("app")
        });
        for path in ["/a/", added.as_str()] {
            let denied = from("127.0.0.1", path);
            assert_eq!(denied.status, 403, "{step} {path}: {}", denied.text());
        }
    }

    replace(&routes, &route("a", "/a/", &echo, ""));
    wait_for(&gateway, "the deleted Module to stop denying", || {
        echo_server(&from("127.0.0.1", "/a/")).as_deref() == Some("app")
    });
}

/// A resource renamed in its place is gone under its old name, even when
/// the new one draws a warning about one of its own fields. Before reloads
/// told a warning from an ignored resource by code, the message text
/// "...ignored" made the place look broken and the old name kept serving.
#[test]
fn a_renamed_resource_with_a_field_warning_no_longer_serves_its_old_name() {
    let dir = tempdir();
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    fs::write(&routes, route("old", "/old/", &echo, "")).unwrap();
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/old/").as_deref(), Some("app"));

    // `hostname` wins over `host`, which is warned about as ignored.
    replace(
        &routes,
        &route("new", "/new/", &echo, "host: other.example"),
    );
    wait_for(&gateway, "the renamed Mapping to serve", || {
        served_by(port, "/new/").as_deref() == Some("app")
    });
    assert_eq!(get(port, "/old/").0, 404, "log:\n{}", gateway.log());
}

/// A resource directory that disappears (renamed, a mount not there yet)
/// removes nothing: what it held keeps serving, with a warning, until it
/// is back. Before the fix every resource under it was dropped at once.
#[test]
fn a_resource_directory_that_disappears_removes_nothing() {
    let dir = tempdir();
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), &route("a", "/a/", &echo, ""));
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/a/").as_deref(), Some("app"));

    let before = generation(&gateway);
    let resources = dir.path().join("resources");
    let moved = dir.path().join("moved");
    fs::rename(&resources, &moved).unwrap();
    wait_for(&gateway, "a reload", || generation(&gateway) > before);
    assert_eq!(served_by(port, "/a/").as_deref(), Some("app"));
    wait_for(&gateway, "the warning", || {
        gateway.log().contains("cannot be read now")
    });
    fs::rename(&moved, &resources).unwrap();
}

/// A Host or FilterPolicy whose spec cannot be read at all still fails
/// closed at start: the Host claims the hostname it names (503), and the
/// policy's rules refuse their paths (403). Before, both were dropped:
/// the wildcard Host served the name, and the paths ran no filter.
#[test]
fn unreadable_hosts_and_policies_fail_closed_at_start() {
    let echo = Echo::plain("app");
    let resources = [
        host(
            "wild",
            "*",
            "requestPolicy:\n  insecure:\n    action: Route\n",
        ),
        // tlsSecret is a map; a string cannot be read.
        host("broken", "broken.example", "tlsSecret: not-a-map\n"),
        doc(
            "FilterPolicy",
            "name: unreadable",
            "rules:\n- path: /guarded/*\n  filters:\n  - name: whatever\n    onDenny: break",
        ),
        route("app", "/", &echo, ""),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);
    let broken = Request::get("/x")
        .header("Host", "broken.example")
        .send(port);
    assert_eq!(
        broken.status,
        503,
        "{}\nlog:\n{}",
        broken.text(),
        gateway.log()
    );
    assert_eq!(served_by(port, "/free/x").as_deref(), Some("app"));
    let guarded = get(port, "/guarded/x");
    assert_eq!(guarded.0, 403, "{}", guarded.1);
}

// ---------------------------------------------------------------------------
// 7. An empty file keeps its last good content; a deleted one does not
// ---------------------------------------------------------------------------

/// Truncated to nothing, then holding only comments: the file's last good
/// content keeps serving and the log says why. Deleted: its resources go.
/// Before: an empty file meant no resources, and /a/ was gone at once.
#[test]
fn an_empty_file_keeps_its_last_good_content_until_deleted() {
    let dir = tempdir();
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    fs::write(&routes, route("a", "/a/", &echo, "")).unwrap();
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/a/").as_deref(), Some("app"));

    let before = generation(&gateway);
    fs::write(&routes, "").unwrap();
    wait_for(&gateway, "a reload of the empty file", || {
        generation(&gateway) > before
    });
    wait_for(&gateway, "the log to say the file is empty", || {
        gateway.log().contains("the file holds no document")
    });
    assert_eq!(served_by(port, "/a/").as_deref(), Some("app"));

    let before = generation(&gateway);
    fs::write(&routes, "# nothing here yet\n---\n# still nothing\n").unwrap();
    wait_for(&gateway, "a reload of the comments-only file", || {
        generation(&gateway) > before
    });
    assert_eq!(served_by(port, "/a/").as_deref(), Some("app"));

    fs::remove_file(&routes).unwrap();
    wait_for(&gateway, "/a/ to go with its file", || {
        get(port, "/a/").0 == 404
    });
}

// ---------------------------------------------------------------------------
// 8. A Secret broken on reload keeps its last good certificate
// ---------------------------------------------------------------------------

/// A TLS Host `gw.example` on an HTTPS Listener with Mapping `a`, its
/// Secret `gw-cert` (holding `cert`) alone in `resources/secret.yaml`.
struct SecretSetup {
    _dir: tempfile::TempDir,
    echo: Echo,
    pki: Pki,
    gateway: Gateway,
    port: u16,
    secret: std::path::PathBuf,
}

impl SecretSetup {
    fn start(make_cert: impl FnOnce(&Pki) -> Vec<CertFiles>) -> (SecretSetup, Vec<CertFiles>) {
        let dir = tempdir();
        let pki = Pki::new(&dir.path().join("pki"));
        let certs = make_cert(&pki);
        let echo = Echo::plain("app");
        let port = free_port();
        let resources = [
            listener("https", port, "HTTPS"),
            host("gw", "gw.example", &tls_spec("gw-cert", None)),
            route("a", "/a/", &echo, ""),
        ]
        .concat();
        write_gateway_without_listener(dir.path(), free_port(), &resources);
        let secret = resource_file(dir.path(), "secret.yaml");
        fs::write(&secret, tls_secret("gw-cert", "default", &certs[0])).unwrap();
        let gateway = Gateway::start(dir.path());
        let setup = SecretSetup {
            _dir: dir,
            echo,
            pki,
            gateway,
            port,
            secret,
        };
        (setup, certs)
    }

    fn tls(&self) -> TlsOpts {
        TlsOpts::new(self.pki.ca_pem_path(), "gw.example")
    }

    /// The serial of the certificate a handshake for gw.example gets.
    fn serial(&self) -> Result<String, String> {
        served_serial(self.port, &self.tls(), "/a/")
    }

    /// Writes `secret.yaml`: the Secret with `cert`'s chain and `key`'s
    /// key, then Mapping `c`.
    fn replace_secret(&self, cert: &CertFiles, key: &CertFiles) {
        let mut pair = cert.clone();
        pair.key_pem = key.key_pem.clone();
        replace(
            &self.secret,
            &[
                tls_secret("gw-cert", "default", &pair),
                route("c", "/c/", &self.echo, ""),
            ]
            .concat(),
        );
    }

    fn c_status(&self) -> Option<u16> {
        Request::get("/c/")
            .try_send_tls(self.port, &self.tls())
            .ok()
            .map(|r| r.status)
    }
}

/// The Secret of a TLS Host is replaced by one whose key does not match its
/// certificate, in the same edit as a new Mapping: the Mapping applies and
/// the Host keeps presenting its last good certificate. A valid
/// replacement then applies; deleting the Secret while the Host uses it
/// keeps its last good version too (while the deletion of /c/, in the same
/// file, applies). Before: the reload was refused as a whole, so /c/ never
/// served.
#[test]
fn a_broken_secret_keeps_its_last_good_certificate() {
    let (setup, certs) = SecretSetup::start(|pki| {
        vec![
            pki.issue_server("gw.example", &["gw.example"]),
            pki.issue_server("gw.example", &["gw.example"]),
        ]
    });
    let (v1, v2) = (&certs[0], &certs[1]);
    let gateway = &setup.gateway;
    assert_eq!(setup.serial(), Ok(v1.serial_hex.clone()));

    setup.replace_secret(v2, v1);
    wait_for(gateway, "/c/ to serve", || setup.c_status() == Some(200));
    assert_eq!(
        setup.serial(),
        Ok(v1.serial_hex.clone()),
        "the last good certificate keeps serving"
    );

    setup.replace_secret(v2, v2);
    wait_for(gateway, "the rotated certificate to serve", || {
        setup.serial().as_deref() == Ok(v2.serial_hex.as_str())
    });

    fs::remove_file(&setup.secret).unwrap();
    wait_for(gateway, "/c/ to go with its file", || {
        setup.c_status() == Some(404)
    });
    assert_eq!(
        setup.serial(),
        Ok(v2.serial_hex.clone()),
        "the deleted Secret's last good certificate keeps serving"
    );
}

/// What made a Secret fall back to its last good version is reported as
/// an error (diag errors, `pingress_resource_errors`), not only as the
/// fallback's warning: a key that does not match its certificate, then
/// the Secret deleted while its Host uses it. Before: the reload was
/// refused as a whole, so /c/ never served.
#[test]
fn a_secret_that_falls_back_is_reported_as_an_error() {
    let (setup, certs) = SecretSetup::start(|pki| {
        vec![
            pki.issue_server("gw.example", &["gw.example"]),
            pki.issue_server("gw.example", &["gw.example"]),
        ]
    });
    let (v1, v2) = (&certs[0], &certs[1]);
    let gateway = &setup.gateway;
    assert_eq!(resource_errors(gateway), 0.0);

    setup.replace_secret(v2, v1);
    wait_for(gateway, "/c/ to serve", || setup.c_status() == Some(200));
    wait_diag(gateway, "report the Secret's key mismatch", |errors| {
        errors
            .iter()
            .any(|(_, message)| message.contains("does not match"))
    });
    assert!(resource_errors(gateway) >= 1.0, "pingress_resource_errors");

    fs::remove_file(&setup.secret).unwrap();
    wait_for(gateway, "/c/ to go with its file", || {
        setup.c_status() == Some(404)
    });
    wait_diag(gateway, "report the Secret in use as missing", |errors| {
        errors
            .iter()
            .any(|(key, message)| key.starts_with("gw") && message.contains("gw-cert"))
    });
    assert!(resource_errors(gateway) >= 1.0, "pingress_resource_errors");
}

/// A Secret edited so that it lacks the key its TLSContext needs keeps its
/// last good version: the upstream that demands a client certificate keeps
/// getting the gateway's, while the rest of the edit applies. Before the
/// reload read which Secret an error is about from the error itself, it
/// searched the message for `namespace/name`; the TLSContext's message
/// names the Secret as written in the context (`upstream-certs`), so the
/// Secret was not put back, and the context and its Mapping went out (404).
#[test]
fn a_secret_that_loses_its_key_keeps_serving_upstream_mtls() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let server = pki.issue_server("localhost", &["localhost"]);
    let client = pki.issue_client("gateway");
    let upstream = Echo::mtls("mtls", &server, pki.ca_pem_path(), true);
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let context = doc(
        "TLSContext",
        "name: upstream-context",
        "hosts: []\nsecret: upstream-certs",
    );
    let upstream_route = route("m", "/m/", &upstream, "tls: upstream-context");
    fs::write(
        resource_file(dir.path(), "routes.yaml"),
        [context, upstream_route].concat(),
    )
    .unwrap();
    let secret = resource_file(dir.path(), "secret.yaml");
    fs::write(&secret, tls_secret("upstream-certs", "default", &client)).unwrap();
    let gateway = Gateway::start(dir.path());
    let presented = || {
        let response = Request::get("/m/").try_send(port).ok()?;
        (response.status == 200).then(|| response.echo().client_cert_subject())?
    };
    assert_eq!(presented(), Some(client.subject()));

    let without_key = opaque_secret(
        "upstream-certs",
        "default",
        &[("tls.crt", &client.cert_pem)],
    );
    replace(
        &secret,
        &[without_key, route("c", "/c/", &echo, "")].concat(),
    );
    wait_for(&gateway, "/c/ to serve", || {
        served_by(port, "/c/").as_deref() == Some("app")
    });
    assert_eq!(
        presented(),
        Some(client.subject()),
        "log:\n{}",
        gateway.log()
    );

    // The diag names the problem by identity and cause, not by words.
    let full = gateway.admin_get("/ambassador/v0/diag/?json=true");
    let full: Value = serde_json::from_slice(&full.body).unwrap();
    let problems = full["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["code"] == "reference"
            && p["resource"]["kind"] == "TLSContext"
            && p["field"] == "spec.secret"
            && p["causes"][0]["kind"] == "Secret"
            && p["causes"][0]["name"] == "upstream-certs"),
        "{problems:#?}"
    );
}

/// A Host that requires client certificates gets its CA from its
/// TLSContext's Secret (`ca.crt`). Rotating that Secret the way `kubectl
/// create secret tls` does drops `ca.crt`: the Secret keeps its last good
/// version, so the Host keeps verifying clients, while the rest of the edit
/// applies. Before, the Host's error blamed no Secret: the Host was refused
/// instead (a failed handshake for every client).
#[test]
fn a_secret_that_loses_the_ca_a_host_requires_keeps_its_last_good_version() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let server = pki.issue_server("gw.example", &["gw.example"]);
    let alice = pki.issue_client("alice");
    let echo = Echo::plain("app");
    let port = free_port();
    let resources = [
        listener("https", port, "HTTPS"),
        doc(
            "TLSContext",
            "name: ctx",
            "hosts: [gw.example]\nsecret: gw-cert\ncert_required: true",
        ),
        host(
            "gw",
            "gw.example",
            &format!("{}tlsContext:\n  name: ctx", tls_spec("gw-cert", None)),
        ),
        route("a", "/a/", &echo, ""),
    ]
    .concat();
    write_gateway_without_listener(dir.path(), free_port(), &resources);
    let secret = resource_file(dir.path(), "secret.yaml");
    let with_ca = [
        ("tls.crt", server.cert_pem.as_str()),
        ("tls.key", server.key_pem.as_str()),
        ("ca.crt", pki.ca_pem()),
    ];
    fs::write(&secret, opaque_secret("gw-cert", "default", &with_ca)).unwrap();
    let gateway = Gateway::start(dir.path());
    let tls = TlsOpts::new(pki.ca_pem_path(), "gw.example");
    let status = |path: &str, opts: &TlsOpts| {
        Request::get(path)
            .try_send_tls(port, opts)
            .ok()
            .map(|r| r.status)
    };
    assert_eq!(status("/a/", &tls.clone().client(&alice)), Some(200));

    replace(
        &secret,
        &[
            tls_secret("gw-cert", "default", &server),
            route("c", "/c/", &echo, ""),
        ]
        .concat(),
    );
    wait_for(&gateway, "/c/ to serve", || {
        status("/c/", &tls.clone().client(&alice)) == Some(200)
    });
    assert_eq!(status("/a/", &tls.clone().client(&alice)), Some(200));
    assert_eq!(
        status("/a/", &tls),
        None,
        "served without a client certificate"
    );
}

/// A deleted resource is gone even when another controller's kind (a
/// cert-manager Certificate) moves into its place in the file. That kind
/// is ignored by design, not by mistake: before, its warning made the place
/// look broken, and the deleted Mapping kept serving.
#[test]
fn a_foreign_kind_moving_into_a_deleted_resources_place_does_not_keep_it() {
    let dir = tempdir();
    let echo = Echo::plain("app");
    let port = free_port();
    write_gateway(dir.path(), port, free_port(), "");
    let routes = resource_file(dir.path(), "routes.yaml");
    let certificate = versioned_doc(
        "cert-manager.io/v1",
        "Certificate",
        "name: gw",
        "secretName: gw-cert\ndnsNames: [gw.example]",
    );
    fs::write(
        &routes,
        [route("old", "/old/", &echo, ""), certificate.clone()].concat(),
    )
    .unwrap();
    let gateway = Gateway::start(dir.path());
    assert_eq!(served_by(port, "/old/").as_deref(), Some("app"));

    replace(
        &routes,
        &[certificate, route("new", "/new/", &echo, "")].concat(),
    );
    wait_for(&gateway, "the new Mapping to serve", || {
        served_by(port, "/new/").as_deref() == Some("app")
    });
    assert_eq!(get(port, "/old/").0, 404, "log:\n{}", gateway.log());
}
