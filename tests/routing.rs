//! Routing behaviour of the real gateway, end to end: every Mapping field
//! pingress implements, proved from the client's side (status, Location,
//! response headers) and from the upstream's side (the exact request target,
//! Host and header values a pingress-echo server received, and which echo
//! server answered).
//!
//! Covered, mostly with the scenarios of Emissary's own acceptance (KAT)
//! tests: prefix matching with the default `/` rewrite and
//! `x-envoy-original-path`, path normalisation; explicit and empty
//! rewrites; case sensitivity; `prefix_exact`, `prefix_regex`; header,
//! query and regex matchers; `regex_rewrite`; `host` and `hostname` globs;
//! the Module's `strip_matching_host_port`, `merge_slashes` and
//! escaped-slash handling; invalid resources dropped alone;
//! `ambassador_id`; namespaces; methods, precedence and route order; Host
//! header rewriting; header edits and their append semantics; Module
//! `defaults`; Linkerd; Envoy headers and timeouts; header value variables;
//! canary weights; and Host association, `requestPolicy.insecure` and the
//! XFP security model with `l7Depth`.
//!
//! Each test starts one to three gateways holding several Mappings (a start
//! costs ~100 ms) and focuses on one behaviour family. AMBASSADOR_ID is not
//! set, so the gateway's instance id is `default`.

mod support;

use std::collections::BTreeMap;

use support::*;
use tempfile::TempDir;

const V2: &str = "getambassador.io/v2";

// ---------------------------------------------------------------------------
// Resource builders
// ---------------------------------------------------------------------------

// The harness builds the documents (tests/support/resources.rs); these
// only add this file's defaults, such as Mappings on every Host.

fn service(echo: &Echo) -> String {
    format!("127.0.0.1:{}", echo.port())
}

/// A Mapping with the given metadata, sending `prefix` to `echo`, plus
/// `extra` spec lines; no hostname unless `extra` sets one.
fn mapping_doc(
    api_version: &str,
    metadata: &str,
    prefix: &str,
    echo: &Echo,
    extra: &str,
) -> String {
    versioned_doc(
        api_version,
        "Mapping",
        metadata,
        &format!("prefix: {}\nservice: {}\n{extra}", q(prefix), service(echo)),
    )
}

/// A v3 Mapping served on every Host (`hostname: "*"`).
fn mapping(name: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    mapping_doc(
        V3,
        &format!("name: {name}"),
        prefix,
        echo,
        &format!("hostname: \"*\"\n{extra}"),
    )
}

/// A v3 Mapping without `hostname`: `extra` decides its host matching.
fn bare_mapping(name: &str, prefix: &str, echo: &Echo, extra: &str) -> String {
    mapping_doc(V3, &format!("name: {name}"), prefix, echo, extra)
}

/// A Host for `hostname` with `insecure.action` (`None`: Emissary's default,
/// Redirect) and extra spec lines.
fn host(name: &str, hostname: &str, action: Option<&str>, extra: &str) -> String {
    let policy = action.map(insecure_action).unwrap_or_default();
    support::host(name, hostname, &format!("{policy}{extra}"))
}

// ---------------------------------------------------------------------------
// A running gateway
// ---------------------------------------------------------------------------

struct Gw {
    dir: TempDir,
    gateway: Gateway,
    port: u16,
}

impl Gw {
    /// Writes the resources after an HTTP Listener and starts the gateway.
    fn start(resources: &str) -> Gw {
        Gw::start_with_listener("", resources)
    }

    /// Like [`Gw::start`], with extra Listener spec lines (`l7Depth: 1`).
    fn start_with_listener(listener_extra: &str, resources: &str) -> Gw {
        let (dir, gateway, port) = start_gateway(listener_extra, resources);
        Gw { dir, gateway, port }
    }

    fn send(&self, req: Request) -> Response {
        req.send(self.port)
    }

    /// Sends `req`, expects 200 from an echo upstream, returns what it saw.
    fn routed(&self, req: Request) -> EchoReply {
        let what = format!("{req:?}");
        let r = req.send(self.port);
        assert_eq!(
            r.status,
            200,
            "{what}: expected the upstream's 200, got {} {:?}\n{}\n--- gateway log tail:\n{}",
            r.status,
            r.headers,
            r.text(),
            self.log_tail()
        );
        r.echo()
    }

    fn get(&self, target: &str) -> EchoReply {
        self.routed(Request::get(target))
    }

    /// GET `target` with this Host header; the upstream's view.
    fn get_host(&self, host: &str, target: &str) -> EchoReply {
        self.routed(Request::get(target).header("Host", host))
    }

    /// Which echo server answered a GET of `target` with Host `host`.
    fn server_for(&self, host: &str, target: &str) -> String {
        self.get_host(host, target).server()
    }

    /// Expects the gateway's own 404 (no upstream was involved).
    fn assert_404(&self, req: Request) {
        let what = format!("{req:?}");
        let r = req.send(self.port);
        assert_eq!(
            r.status,
            404,
            "{what}: expected the gateway's 404, got {} {:?}\n{}",
            r.status,
            r.headers,
            r.text()
        );
        assert!(
            !r.is_echo(),
            "{what}: the 404 came from an upstream: {}",
            r.text()
        );
    }

    fn assert_404_get(&self, target: &str) {
        self.assert_404(Request::get(target));
    }

    fn assert_404_host(&self, host: &str, target: &str) {
        self.assert_404(Request::get(target).header("Host", host));
    }

    /// `pingress -t` on this gateway's configuration.
    fn check(&self) -> Output {
        check(self.dir.path())
    }

    fn log_tail(&self) -> String {
        let log = self.gateway.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The lines of `-t` output that mention `needle` (e.g. a resource name).
fn lines_with<'a>(out: &'a str, needle: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.contains(needle)).collect()
}

/// The error or warning line of `-t` about Mapping `default/<name>`.
fn diagnostic_for(out: &str, name: &str) -> String {
    lines_with(out, &format!("Mapping default/{name}:")).join("\n")
}

/// Sends `n` GETs over one keep-alive connection and counts which echo
/// server answered each.
fn tally(gw: &Gw, target: &str, n: usize) -> BTreeMap<String, usize> {
    let mut client = Client::connect(gw.port);
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = client.get(target);
        assert_eq!(r.status, 200, "request {i} to {target}: {}", r.text());
        *counts.entry(r.echo().server()).or_insert(0) += 1;
    }
    counts
}

fn count(counts: &BTreeMap<String, usize>, server: &str) -> usize {
    counts.get(server).copied().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Path matching and rewriting
// ---------------------------------------------------------------------------

/// The default rewrite replaces the matched prefix with `/`, the query is
/// kept, the upstream sees the client path in `x-envoy-original-path`,
/// trailing slashes matter, and a prefix without a trailing slash yields
/// `//foo`.
#[test]
fn prefix_match_with_default_rewrite() {
    let svc = Echo::plain("svc");
    let backend = Echo::plain("backend");
    let gw = Gw::start(
        &[
            mapping("svc", "/svc/", &svc, ""),
            mapping("backend", "/backend", &backend, ""),
        ]
        .concat(),
    );

    let e = gw.get("/svc/");
    assert_eq!(e.server(), "svc");
    assert_eq!(e.uri(), "/");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/svc/"]);

    let e = gw.get("/svc/foo/bar?a=1&b=%2F");
    assert_eq!(e.uri(), "/foo/bar?a=1&b=%2F");
    assert_eq!(
        e.headers_all("x-envoy-original-path"),
        ["/svc/foo/bar?a=1&b=%2F"]
    );

    // Dot segments are resolved before matching.
    let e = gw.get("/need-normalization/../svc/");
    assert_eq!(e.server(), "svc");
    assert_eq!(e.uri(), "/");
    assert_eq!(gw.get("/svc/./a/../b?x=1").uri(), "/b?x=1");

    // Trailing slash matters, nothing is added.
    gw.assert_404_get("/svc");
    gw.assert_404_get("/svcfoo");
    gw.assert_404_get("/other/svc/");

    // Prefix `/backend` (no slash): `/backend/foo` → `//foo` (issue #209);
    // a prefix is not segment-aware.
    let e = gw.get("/backend/foo");
    assert_eq!(e.server(), "backend");
    assert_eq!(e.uri(), "//foo");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/backend/foo"]);
    assert_eq!(gw.get("/backend").uri(), "/");
    assert_eq!(gw.get("/backendfoo?q").uri(), "/foo?q");
}

/// Envoy normalises `:path` before routing, so the request that needed
/// normalisation reports the normalised path as the original one, exactly
/// like the request that did not (Emissary's KAT checks
/// `x-envoy-original-path == /<name>/` for both queries of SimpleMapping and
/// SafeRegexMapping).
#[test]
fn normalised_path_is_the_original_path_upstream() {
    let svc = Echo::plain("svc");
    let gw = Gw::start(&mapping("svc", "/svc/", &svc, ""));

    let e = gw.get("/need-normalization/../svc/");
    assert_eq!(e.uri(), "/");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/svc/"]);

    let e = gw.get("/need-normalization/../svc/x?q=1");
    assert_eq!(e.uri(), "/x?q=1");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/svc/x?q=1"]);
}

/// An explicit rewrite replaces the prefix, `rewrite: ""` forwards the path
/// untouched (and then no original path is recorded), and a prefix without a
/// trailing slash is a plain string prefix.
#[test]
fn explicit_and_empty_rewrite() {
    let echo = Echo::plain("rw");
    let gw = Gw::start(
        &[
            mapping("foo", "/rw/", &echo, "rewrite: /foo"),
            mapping("v1", "/api/", &echo, "rewrite: /v1/"),
            mapping("keep", "/keep/", &echo, "rewrite: \"\""),
            mapping("man", "/man", &echo, "rewrite: \"\""),
        ]
        .concat(),
    );

    let e = gw.get("/rw/");
    assert_eq!(e.uri(), "/foo");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/rw/"]);
    assert_eq!(gw.get("/rw/bar?x=1").uri(), "/foobar?x=1");

    assert_eq!(gw.get("/api/foo/bar").uri(), "/v1/foo/bar");

    let e = gw.get("/keep/a/b?c=1");
    assert_eq!(e.uri(), "/keep/a/b?c=1");
    assert!(!e.has_header("x-envoy-original-path"), "{:?}", e.headers());

    // `/man` matches `/mankind`: no segment awareness.
    assert_eq!(gw.get("/mankind").uri(), "/mankind");
    assert_eq!(gw.get("/man").uri(), "/man");
    assert_eq!(gw.get("/man/x").uri(), "/man/x");
    gw.assert_404_get("/ma");
}

/// Paths match case-sensitively by default; `case_sensitive: false` lowers
/// the path comparison only, never header matches.
#[test]
fn case_sensitive_and_insensitive_prefixes() {
    let echo = Echo::plain("case");
    let gw = Gw::start(
        &[
            mapping("cs", "/cs/", &echo, ""),
            mapping("ci", "/ci/", &echo, "case_sensitive: false"),
            mapping(
                "ci-exact",
                "/Exact-CI",
                &echo,
                "case_sensitive: false\nprefix_exact: true\nrewrite: \"\"",
            ),
            mapping(
                "ci-header",
                "/ci-h/",
                &echo,
                "case_sensitive: false\nheaders:\n  x-k: Value",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/cs/x").uri(), "/x");
    gw.assert_404_get("/CS/x");
    gw.assert_404_get("/Cs/x");

    // The matched prefix is replaced whatever its case.
    assert_eq!(gw.get("/ci/x").uri(), "/x");
    assert_eq!(gw.get("/CI/x").uri(), "/x");
    assert_eq!(gw.get("/Ci/Y?Q=1").uri(), "/Y?Q=1");

    assert_eq!(gw.get("/exact-ci").uri(), "/exact-ci");
    assert_eq!(gw.get("/EXACT-CI").uri(), "/EXACT-CI");
    gw.assert_404_get("/exact-ci/");

    assert_eq!(
        gw.routed(Request::get("/CI-H/").header("x-k", "Value"))
            .uri(),
        "/"
    );
    gw.assert_404(Request::get("/ci-h/").header("x-k", "value"));
}

/// `prefix_exact` matches the whole path only (query aside); `prefix_regex`
/// must match the whole path, and its default rewrite sends `/` (the whole
/// path is the matched prefix).
#[test]
fn prefix_exact_and_prefix_regex() {
    let echo = Echo::plain("px");
    let gw = Gw::start(
        &[
            mapping(
                "exact",
                "/exact",
                &echo,
                "prefix_exact: true\nrewrite: \"\"",
            ),
            mapping("regex", "/re/[0-9]+", &echo, "prefix_regex: true"),
            mapping(
                "regex-keep",
                "/rk/[a-z]+/list",
                &echo,
                "prefix_regex: true\nrewrite: \"\"",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/exact").uri(), "/exact");
    assert_eq!(gw.get("/exact?x=1").uri(), "/exact?x=1");
    gw.assert_404_get("/exact/");
    gw.assert_404_get("/exactly");
    gw.assert_404_get("/EXACT");

    let e = gw.get("/re/123");
    assert_eq!(e.uri(), "/");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/re/123"]);
    assert_eq!(gw.get("/re/0?q=1").uri(), "/?q=1");
    gw.assert_404_get("/re/123/x");
    gw.assert_404_get("/re/");
    gw.assert_404_get("/re/abc");
    gw.assert_404_get("/x/re/1");

    assert_eq!(gw.get("/rk/abc/list").uri(), "/rk/abc/list");
    gw.assert_404_get("/rk/abc/list/more");
    gw.assert_404_get("/rk/ABC/list");
}

// ---------------------------------------------------------------------------
// Header, query and host matchers
// ---------------------------------------------------------------------------

/// A Mapping with `headers` wins over the plain one on the same prefix
/// (whatever the file order) only when the value matches exactly; all listed
/// headers must match; `regex_headers: {h: ".*"}` means present.
#[test]
fn header_routing() {
    let t1 = Echo::plain("target1");
    let t2 = Echo::plain("target2");
    let gw = Gw::start(
        &[
            mapping("hr-plain", "/hr/", &t1, ""),
            mapping("hr-header", "/hr/", &t2, "headers:\n  X-Route: target2"),
            mapping(
                "both",
                "/both/",
                &t1,
                "headers:\n  x-a: \"1\"\n  x-b: \"2\"",
            ),
            mapping(
                "present",
                "/present/",
                &t2,
                "regex_headers:\n  x-present: \".*\"",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/hr/").server(), "target1");
    let with = |name: &str, value: &str| gw.routed(Request::get("/hr/").header(name, value));
    assert_eq!(with("X-Route", "target2").server(), "target2");
    assert_eq!(with("x-route", "target2").server(), "target2");
    assert_eq!(with("X-Route", "target3").server(), "target1");
    assert_eq!(with("X-Route", "TARGET2").server(), "target1");
    assert_eq!(with("X-Other", "target2").server(), "target1");

    let e = gw.routed(Request::get("/both/").headers(&[("x-a", "1"), ("x-b", "2")]));
    assert_eq!(e.server(), "target1");
    gw.assert_404(Request::get("/both/").header("x-a", "1"));
    gw.assert_404(Request::get("/both/").headers(&[("x-a", "1"), ("x-b", "3")]));

    assert_eq!(
        gw.routed(Request::get("/present/").header("x-present", "anything"))
            .server(),
        "target2"
    );
    gw.assert_404_get("/present/");
}

/// Exact and regex query-parameter matchers; the query reaches the upstream
/// intact.
#[test]
fn query_parameter_routing() {
    let t1 = Echo::plain("target1");
    let t2 = Echo::plain("target2");
    let gw = Gw::start(
        &[
            mapping("qr-plain", "/qr/", &t1, ""),
            mapping(
                "qr-param",
                "/qr/",
                &t2,
                "query_parameters:\n  test_param: target2",
            ),
            mapping(
                "rq",
                "/rq/",
                &t1,
                "regex_query_parameters:\n  test_param: \"^[a-z].*\"",
            ),
            mapping(
                "rq-present",
                "/rqp/",
                &t2,
                "regex_query_parameters:\n  test_param: \".*\"",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/qr/").server(), "target1");
    let e = gw.get("/qr/?test_param=target2");
    assert_eq!(e.server(), "target2");
    assert_eq!(e.uri(), "/?test_param=target2");
    assert_eq!(gw.get("/qr/?a=1&test_param=target2").server(), "target2");
    assert_eq!(gw.get("/qr/?test_param=target3").server(), "target1");
    assert_eq!(gw.get("/qr/?other=target2").server(), "target1");

    assert_eq!(gw.get("/rq/?test_param=hello").uri(), "/?test_param=hello");
    gw.assert_404_get("/rq/");
    gw.assert_404_get("/rq/?test_param=HeLlO");

    assert_eq!(gw.get("/rqp/?test_param=HeLlO").server(), "target2");
    assert_eq!(gw.get("/rqp/?x=1&test_param=1").server(), "target2");
    gw.assert_404_get("/rqp/");
    gw.assert_404_get("/rqp/?other=1");
}

/// `prefix_regex`, `host` + `host_regex` and `regex_headers` together; every
/// matcher must hold.
#[test]
fn regex_everything_with_host_regex_and_regex_headers() {
    let echo = Echo::plain("sre");
    let gw = Gw::start(&bare_mapping(
        "sre",
        "/sre/",
        &echo,
        "prefix_regex: true\nhost: \"[a-zA-Z].*\"\nhost_regex: true\n\
         regex_headers:\n  X-Foo: \"^[a-z].*\"",
    ));

    let req = |target: &str, host: &str| Request::get(target).header("Host", host);
    let e = gw.routed(req("/sre/", "example.com").header("X-Foo", "hello"));
    assert_eq!(e.server(), "sre");
    assert_eq!(e.uri(), "/");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/sre/"]);
    let e = gw.routed(req("/need-normalization/../sre/", "example.com").header("X-Foo", "hello"));
    assert_eq!(e.uri(), "/");

    gw.assert_404(req("/sre/", "example.com"));
    gw.assert_404(req("/sre/", "example.com").header("X-Foo", "Hello"));
    gw.assert_404(req("/need-normalization/../sre/", "example.com"));
    gw.assert_404(req("/sre/", "1.example.com").header("X-Foo", "hello"));
    // The default Host is 127.0.0.1:<port>, which the host regex refuses.
    gw.assert_404(Request::get("/sre/").header("X-Foo", "hello"));
    gw.assert_404(req("/sre/x", "example.com").header("X-Foo", "hello"));
}

/// `regex_rewrite` replaces the default rewrite: a path that does not match
/// its pattern is forwarded unchanged; the substitution is unanchored and
/// wins over `rewrite`.
#[test]
fn regex_rewrite_without_match_forwards_unchanged() {
    let echo = Echo::plain("rr");
    let gw = Gw::start(
        &[
            mapping(
                "foo",
                "/foo/",
                &echo,
                "regex_rewrite:\n  pattern: /foo/baz\n  substitution: /baz/foo",
            ),
            mapping(
                "both",
                "/both/",
                &echo,
                "rewrite: /ignored/\nregex_rewrite:\n  pattern: \"^/both/x$\"\n  substitution: /y",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/foo/bar").uri(), "/foo/bar");
    let e = gw.get("/foo/baz");
    assert_eq!(e.uri(), "/baz/foo");
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/foo/baz"]);
    assert_eq!(gw.get("/foo/baz?q=1").uri(), "/baz/foo?q=1");
    assert_eq!(gw.get("/foo/bazooka").uri(), "/baz/fooooka");
    gw.assert_404_get("/ffoo/");

    assert_eq!(gw.get("/both/x").uri(), "/y");
    assert_eq!(gw.get("/both/z").uri(), "/both/z");
}

/// Capture groups with Envoy's `\1` syntax; every match is replaced.
#[test]
fn regex_rewrite_with_captures() {
    let echo = Echo::plain("cap");
    let gw = Gw::start(
        &[
            mapping(
                "cap",
                "/foo/",
                &echo,
                "regex_rewrite:\n  pattern: '/foo/([0-9]*)/list'\n  substitution: '/bar/\\1'",
            ),
            mapping(
                "swap",
                "/sw/",
                &echo,
                "regex_rewrite:\n  pattern: '^/sw/([a-z]+)/([0-9]+)$'\n  substitution: '/sw/\\2/\\1'",
            ),
            mapping(
                "all",
                "/all/",
                &echo,
                "regex_rewrite:\n  pattern: o\n  substitution: \"0\"",
            ),
        ]
        .concat(),
    );

    let e = gw.get("/foo/123456789/list");
    assert_eq!(e.uri(), "/bar/123456789");
    assert_eq!(
        e.headers_all("x-envoy-original-path"),
        ["/foo/123456789/list"]
    );
    assert_eq!(gw.get("/foo/12/list?x=1").uri(), "/bar/12?x=1");
    assert_eq!(gw.get("/foo/").uri(), "/foo/");
    gw.assert_404_get("/fooooo/123/list");

    assert_eq!(gw.get("/sw/abc/42").uri(), "/sw/42/abc");
    assert_eq!(gw.get("/sw/abc/42/x").uri(), "/sw/abc/42/x");

    assert_eq!(gw.get("/all/foo/boo").uri(), "/all/f00/b00");
}

/// The deprecated `host` is an exact `:authority` match, port included; it is
/// ignored when `hostname` is set.
#[test]
fn host_exact_match() {
    let echo = Echo::plain("insp");
    let gw = Gw::start(
        &[
            bare_mapping("insp", "/insp/", &echo, "host: inspector.external"),
            bare_mapping(
                "both",
                "/both/",
                &echo,
                "hostname: \"*.example.com\"\nhost: inspector.external",
            ),
        ]
        .concat(),
    );

    let e = gw.get_host("inspector.external", "/insp/");
    assert_eq!(e.server(), "insp");
    assert_eq!(
        e.headers_all("host"),
        ["inspector.external"],
        "the client Host passes through"
    );
    gw.assert_404(Request::get("/insp/").no_host());
    gw.assert_404_host("inspector.internal", "/insp/");
    gw.assert_404_host("inspector.external:8080", "/insp/");
    gw.assert_404_host(&format!("inspector.external:{}", gw.port), "/insp/");
    gw.assert_404_host("x.inspector.external", "/insp/");

    assert_eq!(gw.server_for("a.example.com", "/both/"), "insp");
    gw.assert_404_host("inspector.external", "/both/");
}

/// `hostname` globs match `:authority`: exact, `*.suffix` (any number of
/// labels), `prefix.*`; the port is part of the authority. The longer glob
/// sorts first, so `foo.example.com` goes to `*.example.com`.
#[test]
fn hostname_globs_route_by_authority() {
    let suffix = Echo::plain("suffix");
    let prefix = Echo::plain("prefix");
    let exact = Echo::plain("exact");
    let any = Echo::plain("any");
    let gw = Gw::start(
        &[
            bare_mapping("any", "/g/", &any, "hostname: \"*\""),
            bare_mapping("prefix", "/g/", &prefix, "hostname: \"foo.*\""),
            bare_mapping("suffix", "/g/", &suffix, "hostname: \"*.example.com\""),
            bare_mapping("exact", "/g/", &exact, "hostname: bar.example.com"),
        ]
        .concat(),
    );

    assert_eq!(gw.server_for("bar.example.com", "/g/"), "exact");
    assert_eq!(gw.server_for("a.example.com", "/g/"), "suffix");
    assert_eq!(gw.server_for("a.b.example.com", "/g/"), "suffix");
    assert_eq!(gw.server_for("foo.example.com", "/g/"), "suffix");
    assert_eq!(gw.server_for("foo.bar", "/g/"), "prefix");
    assert_eq!(gw.server_for("foo.bar:8080", "/g/"), "prefix");
    assert_eq!(gw.server_for("example.com", "/g/"), "any");
    assert_eq!(gw.server_for("a.example.com:8080", "/g/"), "any");
    assert_eq!(gw.server_for("bar.example.com:8080", "/g/"), "any");
    assert_eq!(gw.server_for("other.org", "/g/"), "any");
    assert_eq!(gw.get("/g/").server(), "any");
}

// ---------------------------------------------------------------------------
// Module path and authority handling
// ---------------------------------------------------------------------------

/// With `strip_matching_host_port`, a Host port equal to the listener's is
/// ignored for matching; any other port still counts.
#[test]
fn strip_matching_host_port() {
    let echo = Echo::plain("strip");
    let gw = Gw::start(
        &[
            module("strip_matching_host_port: true"),
            bare_mapping("strip", "/strip/", &echo, "host: myhostname.com"),
        ]
        .concat(),
    );

    assert_eq!(
        gw.server_for(&format!("myhostname.com:{}", gw.port), "/strip/"),
        "strip"
    );
    assert_eq!(gw.server_for("myhostname.com", "/strip/"), "strip");
    gw.assert_404_host("myhostname.com:11875", "/strip/");
    gw.assert_404_host("other.com", "/strip/");
}

/// The Module's `strip_matching_host_port` strips the port from the Host
/// header itself (Envoy removes it before any filter or routing), so the
/// upstream sees the bare host.
#[test]
fn strip_matching_host_port_strips_the_upstream_host() {
    let echo = Echo::plain("strip");
    let gw = Gw::start(
        &[
            module("strip_matching_host_port: true"),
            mapping("strip", "/strip/", &echo, ""),
        ]
        .concat(),
    );

    let e = gw.get_host(&format!("myhostname.com:{}", gw.port), "/strip/");
    assert_eq!(e.headers_all("host"), ["myhostname.com"]);
    let e = gw.get_host("myhostname.com:11875", "/strip/");
    assert_eq!(e.headers_all("host"), ["myhostname.com:11875"]);
}

/// `//` is kept by default (and so fails the prefix); with `merge_slashes` it
/// collapses before matching and upstream.
#[test]
fn merge_slashes_off_and_on() {
    let echo = Echo::plain("slashes");
    let mappings = mapping("status", "/svc/status/", &echo, "rewrite: \"\"");

    let off = Gw::start(&mappings);
    assert_eq!(off.get("/svc/status/200").uri(), "/svc/status/200");
    off.assert_404_get("//svc/status/200");
    off.assert_404_get("/svc//status/200");
    drop(off);

    let on = Gw::start(&[module("merge_slashes: true"), mappings].concat());
    assert_eq!(on.get("//svc/status/200").uri(), "/svc/status/200");
    assert_eq!(on.get("/svc//status//200?a=b").uri(), "/svc/status/200?a=b");
    assert_eq!(on.get("/svc/status/200").uri(), "/svc/status/200");
}

/// `%2F` reaches the upstream by default (its own 404 comes back with
/// `x-envoy-upstream-service-time`); with
/// `reject_requests_with_escaped_slashes` the gateway answers 400 itself.
#[test]
fn escaped_slashes_default_and_rejected() {
    let echo = Echo::plain("esc");
    let mappings = mapping("status", "/svc/status/", &echo, "rewrite: \"\"");

    let default = Gw::start(&mappings);
    let r = default.send(Request::get("/svc/status/%2F200").header("x-echo-status", "404"));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.is_echo(), "the upstream answers: {}", r.text());
    assert_eq!(r.echo().uri(), "/svc/status/%2F200");
    assert!(
        r.header("x-envoy-upstream-service-time").is_some(),
        "{:?}",
        r.headers
    );
    drop(default);

    let reject = Gw::start(
        &[
            module("reject_requests_with_escaped_slashes: true"),
            mappings,
        ]
        .concat(),
    );
    for target in [
        "/svc/status/%2F200",
        "/svc/status/%2f200",
        "/svc/status/%5C200",
    ] {
        let r = reject.send(Request::get(target).header("x-echo-status", "404"));
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert!(!r.is_echo(), "{target}: reached the upstream");
        assert_eq!(r.header("x-envoy-upstream-service-time"), None, "{target}");
    }
    assert_eq!(reject.get("/svc/status/200").uri(), "/svc/status/200");
}

// ---------------------------------------------------------------------------
// Invalid resources, ambassador_id, namespaces
// ---------------------------------------------------------------------------

/// A bad service port is reported as in Emissary and only that Mapping is
/// dropped.
#[test]
fn invalid_service_port_drops_only_that_mapping() {
    let good = Echo::plain("good");
    let gw = Gw::start(
        &[
            doc(
                "Mapping",
                "name: bad-port",
                "prefix: /bad/\nhostname: \"*\"\nservice: 127.0.0.1:80.invalid",
            ),
            mapping("good", "/good/", &good, ""),
        ]
        .concat(),
    );

    let out = gw.check();
    let text = out.combined();
    assert_eq!(out.code, 1, "{text}");
    let line = diagnostic_for(&text, "bad-port");
    assert!(line.contains("found invalid port for service"), "{text}");
    assert!(diagnostic_for(&text, "good").is_empty(), "{text}");

    gw.assert_404_get("/bad/");
    assert_eq!(gw.get("/good/x").server(), "good");
}

/// Each invalid Mapping (missing prefix, missing service, a field of the
/// wrong type) gets its own error and is dropped; its siblings route.
#[test]
fn invalid_mappings_are_dropped_alone() {
    let good = Echo::plain("good");
    let gw = Gw::start(
        &[
            mapping("ok1", "/ok1/", &good, ""),
            doc(
                "Mapping",
                "name: no-prefix",
                &format!("hostname: \"*\"\nservice: {}", service(&good)),
            ),
            doc(
                "Mapping",
                "name: no-service",
                "prefix: /no-service/\nhostname: \"*\"",
            ),
            mapping("bad-type", "/bad-type/", &good, "timeout_ms: soon"),
            bare_mapping("star-host", "/star-host/", &good, "host: \"*.example.com\""),
            bare_mapping("mid-glob", "/mid-glob/", &good, "hostname: \"a.*.com\""),
            mapping("ok2", "/ok2/", &good, ""),
        ]
        .concat(),
    );

    let text = gw.check().combined();
    for (name, field) in [
        ("no-prefix", "spec.prefix"),
        ("no-service", "spec.service"),
        ("bad-type", "spec.timeout_ms"),
        ("star-host", "spec.host"),
        ("mid-glob", "spec.hostname"),
    ] {
        let line = diagnostic_for(&text, name);
        assert!(
            line.starts_with("error:") && line.contains(field),
            "{name}: {text}"
        );
    }
    assert!(text.contains("Mapping: 2 accepted"), "{text}");

    assert_eq!(gw.get("/ok1/").server(), "good");
    assert_eq!(gw.get("/ok2/").server(), "good");
    gw.assert_404_get("/no-service/");
    gw.assert_404_get("/bad-type/");
    gw.assert_404_host("a.example.com", "/star-host/");
    gw.assert_404_host("a.b.com", "/mid-glob/");
}

/// Without AMBASSADOR_ID the instance is `default`; a resource is ours when
/// its `ambassador_id` (string or list, any position) names it or
/// `_automatic_`, or when it has none.
#[test]
fn ambassador_id_filtering() {
    let echo = Echo::plain("ids");
    let cases: [(&str, Option<&str>, bool); 8] = [
        ("none", None, true),
        ("string", Some("default"), true),
        ("list", Some("[default]"), true),
        ("list-last", Some("[missme, default]"), true),
        ("list-first", Some("[default, missme]"), true),
        ("automatic", Some("[_automatic_]"), true),
        ("miss", Some("[missme]"), false),
        ("miss-two", Some("[missme1, missme2]"), false),
    ];
    let mut resources: String = cases
        .iter()
        .map(|(name, ids, _)| {
            let ids = ids
                .map(|i| format!("ambassador_id: {i}"))
                .unwrap_or_default();
            mapping(name, &format!("/{name}/"), &echo, &ids)
        })
        .collect();
    resources.push_str(&mapping(
        "miss-string",
        "/miss-string/",
        &echo,
        "ambassador_id: missme",
    ));
    let gw = Gw::start(&resources);

    for (name, _, routed) in cases {
        let target = format!("/{name}/");
        if routed {
            assert_eq!(gw.get(&target).server(), "ids", "{name}");
        } else {
            gw.assert_404_get(&target);
        }
    }
    gw.assert_404_get("/miss-string/");
    // Another instance's resources are not even validated.
    let text = gw.check().combined();
    assert!(lines_with(&text, "miss").is_empty(), "{text}");
}

/// The same Mapping name in two namespaces: two resources, both routed.
#[test]
fn same_name_in_two_namespaces() {
    let a = Echo::plain("ns-a");
    let b = Echo::plain("ns-b");
    let gw = Gw::start(
        &[
            mapping_doc(
                V3,
                "name: twin, namespace: alpha",
                "/alpha/",
                &a,
                "hostname: \"*\"",
            ),
            mapping_doc(
                V3,
                "name: twin, namespace: beta",
                "/beta/",
                &b,
                "hostname: \"*\"",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/alpha/").server(), "ns-a");
    assert_eq!(gw.get("/beta/").server(), "ns-b");
    let text = gw.check().combined();
    assert!(text.contains("Mapping: 2 accepted"), "{text}");
}

// ---------------------------------------------------------------------------
// Methods and route order
// ---------------------------------------------------------------------------

/// `method` is an exact (upper-cased) `:method` match, `method_regex` a
/// whole-value regex; Mappings without `method` take the rest.
#[test]
fn method_matching() {
    let get = Echo::plain("get");
    let post = Echo::plain("post");
    let any = Echo::plain("any");
    let regex = Echo::plain("regex");
    let gw = Gw::start(
        &[
            mapping("any", "/m/", &any, ""),
            mapping("get", "/m/", &get, "method: GET"),
            mapping("post", "/m/", &post, "method: post"),
            mapping(
                "regex",
                "/m/",
                &regex,
                "method: \"PUT|PATCH\"\nmethod_regex: true",
            ),
            mapping("only-delete", "/del/", &any, "method: DELETE"),
        ]
        .concat(),
    );

    let by = |method: &str| {
        let e = gw.routed(Request::new(method, "/m/x").body(""));
        assert_eq!(e.method(), method);
        e.server()
    };
    assert_eq!(by("GET"), "get");
    assert_eq!(by("POST"), "post");
    assert_eq!(by("PUT"), "regex");
    assert_eq!(by("PATCH"), "regex");
    assert_eq!(by("DELETE"), "any");
    assert_eq!(by("OPTIONS"), "any");

    assert_eq!(gw.routed(Request::new("DELETE", "/del/")).server(), "any");
    gw.assert_404_get("/del/");
    gw.assert_404(Request::post("/del/", "x"));
}

/// `precedence` sorts first, before prefix length: a higher precedence short
/// prefix (or regex) wins over a longer prefix.
#[test]
fn precedence_overrides_prefix_length() {
    let short = Echo::plain("short");
    let long = Echo::plain("long");
    let regex = Echo::plain("regex");
    let gw = Gw::start(
        &[
            mapping("long", "/p/long/", &long, ""),
            mapping("short", "/p/", &short, "precedence: 10"),
            mapping("specific", "/r/specific/", &long, ""),
            mapping(
                "regex",
                "/r/.*",
                &regex,
                "prefix_regex: true\nprecedence: 5",
            ),
            mapping("neg-long", "/n/long/", &long, "precedence: -1"),
            mapping("neg-short", "/n/", &short, ""),
        ]
        .concat(),
    );

    assert_eq!(gw.get("/p/long/x").server(), "short");
    assert_eq!(gw.get("/p/other").server(), "short");
    assert_eq!(gw.get("/r/specific/x").server(), "regex");
    assert_eq!(gw.get("/n/long/x").server(), "short");
}

/// Without precedence, the longer prefix is tried first whatever the file
/// order, and at equal prefixes the Mapping with more header matchers.
#[test]
fn longer_prefix_routes_first_regardless_of_file_order() {
    let a = Echo::plain("a");
    let b = Echo::plain("b");
    let c = Echo::plain("c");
    let gw = Gw::start(
        &[
            // Shortest first …
            mapping("o1", "/o/", &a, ""),
            mapping("o2", "/o/deeper/", &b, ""),
            mapping("o3", "/o/deeper/still/", &c, ""),
            // … and longest first.
            mapping("i3", "/i/deeper/still/", &c, ""),
            mapping("i2", "/i/deeper/", &b, ""),
            mapping("i1", "/i/", &a, ""),
            // Same prefix: header matchers count as length.
            mapping("h-plain", "/h/", &a, ""),
            mapping("h-one", "/h/", &b, "headers:\n  x-one: \"1\""),
            mapping(
                "h-two",
                "/h/",
                &c,
                "headers:\n  x-one: \"1\"\n  x-two: \"2\"",
            ),
        ]
        .concat(),
    );

    for top in ["o", "i"] {
        assert_eq!(gw.get(&format!("/{top}/x")).server(), "a", "{top}");
        assert_eq!(gw.get(&format!("/{top}/deeper/x")).server(), "b", "{top}");
        let e = gw.get(&format!("/{top}/deeper/still/x"));
        assert_eq!(e.server(), "c", "{top}");
        assert_eq!(e.uri(), "/x", "{top}");
    }

    assert_eq!(gw.get("/h/").server(), "a");
    let one = gw.routed(Request::get("/h/").header("x-one", "1"));
    assert_eq!(one.server(), "b");
    let two = gw.routed(Request::get("/h/").headers(&[("x-one", "1"), ("x-two", "2")]));
    assert_eq!(two.server(), "c");
}

// ---------------------------------------------------------------------------
// Host header and header edits
// ---------------------------------------------------------------------------

/// The client Host passes through; `host_rewrite` sets a literal Host;
/// `auto_host_rewrite` uses the service's host without its port.
#[test]
fn host_rewrite_and_auto_host_rewrite() {
    let echo = Echo::plain("hosts");
    let gw = Gw::start(
        &[
            mapping("pass", "/pass/", &echo, ""),
            mapping(
                "literal",
                "/literal/",
                &echo,
                "host_rewrite: rewritten.example",
            ),
            mapping("auto-ip", "/auto-ip/", &echo, "auto_host_rewrite: true"),
            doc(
                "Mapping",
                "name: auto-name",
                &format!(
                    "prefix: /auto-name/\nhostname: \"*\"\nservice: localhost:{}\n\
                     auto_host_rewrite: true",
                    echo.port()
                ),
            ),
        ]
        .concat(),
    );

    let host = |target: &str| gw.get_host("client.example", target).headers_all("host");
    assert_eq!(host("/pass/"), ["client.example"]);
    assert_eq!(host("/literal/"), ["rewritten.example"]);
    assert_eq!(host("/auto-ip/"), ["127.0.0.1"]);
    assert_eq!(host("/auto-name/"), ["localhost"]);
}

/// `add_request_headers` appends by default (plain string or `{value}`),
/// `append: true` appends, `append: false` replaces.
#[test]
fn add_request_headers_append_semantics() {
    let echo = Echo::plain("reqh");
    let gw = Gw::start(&mapping(
        "add",
        "/add/",
        &echo,
        "add_request_headers:\n  zoo: {value: Zoo, append: false}\n  \
         aoo: {value: aoo, append: true}\n  boo: {value: boo}\n  foo: foo\n  new: fresh",
    ));

    let e = gw.routed(Request::get("/add/").headers(&[
        ("zoo", "ZooZ"),
        ("Zoo", "Z2"),
        ("aoo", "AooA"),
        ("boo", "BooB"),
        ("foo", "FooF"),
    ]));
    assert_eq!(e.headers_all("zoo"), ["Zoo"]);
    assert_eq!(e.headers_all("aoo"), ["AooA", "aoo"]);
    assert_eq!(e.headers_all("boo"), ["BooB", "boo"]);
    assert_eq!(e.headers_all("foo"), ["FooF", "foo"]);
    assert_eq!(e.headers_all("new"), ["fresh"]);

    let e = gw.get("/add/");
    assert_eq!(e.headers_all("zoo"), ["Zoo"]);
    assert_eq!(e.headers_all("aoo"), ["aoo"]);
    assert_eq!(e.headers_all("foo"), ["foo"]);
}

/// `add_response_headers` with the same semantics on the upstream's response
/// headers.
#[test]
fn add_response_headers_append_semantics() {
    let echo = Echo::plain("resph");
    let gw = Gw::start(&mapping(
        "add",
        "/add/",
        &echo,
        "add_response_headers:\n  koo: {value: KooK, append: false}\n  \
         zoo: {value: ZooZ, append: true}\n  test: {value: boo}\n  foo: {value: Foo}",
    ));

    let r = gw.send(Request::get("/add/").headers(&[
        ("x-echo-header", "koo: Koo"),
        ("x-echo-header", "koo: Koo2"),
        ("x-echo-header", "zoo: Zoo"),
        ("x-echo-header", "test: Test"),
    ]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers_all("koo"), ["KooK"]);
    assert_eq!(r.headers_all("zoo"), ["Zoo", "ZooZ"]);
    assert_eq!(r.headers_all("test"), ["Test", "boo"]);
    assert_eq!(r.headers_all("foo"), ["Foo"]);
}

/// `remove_request_headers` strips (every value, any case) before the
/// upstream; `remove_response_headers` strips before the client, even the
/// gateway's own `x-envoy-upstream-service-time`.
#[test]
fn remove_request_and_response_headers() {
    let echo = Echo::plain("rm");
    let gw = Gw::start(
        &[
            mapping(
                "rm",
                "/rm/",
                &echo,
                "remove_request_headers: [zoo, aoo]\n\
                 remove_response_headers: [x-envoy-upstream-service-time, x-drop-me]",
            ),
            mapping("keep", "/keep/", &echo, ""),
        ]
        .concat(),
    );

    let req = |target: &str| {
        Request::get(target).headers(&[
            ("zoo", "1"),
            ("ZOO", "2"),
            ("aoo", "3"),
            ("foo", "4"),
            ("x-echo-header", "x-drop-me: 1"),
            ("x-echo-header", "x-keep-me: 2"),
        ])
    };

    let r = gw.send(req("/rm/"));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert!(e.headers_all("zoo").is_empty(), "{:?}", e.headers());
    assert!(e.headers_all("aoo").is_empty(), "{:?}", e.headers());
    assert_eq!(e.headers_all("foo"), ["4"]);
    assert_eq!(r.header("x-envoy-upstream-service-time"), None);
    assert_eq!(r.header("x-drop-me"), None);
    assert_eq!(r.headers_all("x-keep-me"), ["2"]);

    let r = gw.send(req("/keep/"));
    let e = r.echo();
    assert_eq!(e.headers_all("zoo"), ["1", "2"]);
    assert_eq!(e.headers_all("aoo"), ["3"]);
    let service_time = r.header("x-envoy-upstream-service-time").unwrap_or("");
    assert!(service_time.parse::<u64>().is_ok(), "{:?}", r.headers);
    assert_eq!(r.headers_all("x-drop-me"), ["1"]);
}

/// Module `defaults.httpmapping` supplies the header edits of every Mapping
/// that does not set its own; a Mapping's own value replaces the default
/// entirely (`{}` / `[]` clear it). The class wins over the top-level
/// `defaults` key by key.
#[test]
fn module_defaults_replaced_not_merged() {
    let echo = Echo::plain("defaults");
    let gw = Gw::start(
        &[
            module(
                "defaults:\n  httpmapping:\n    add_request_headers:\n      \
                 fruit: {value: orange, append: false}\n    \
                 remove_request_headers: [x-evil-header]\n    \
                 add_response_headers:\n      x-default-resp: dflt\n    \
                 remove_response_headers: [x-up-drop]",
            ),
            mapping(
                "own",
                "/own/",
                &echo,
                "add_request_headers:\n  fruit: {value: banana, append: false}\n\
                 remove_request_headers: [x-evilness]",
            ),
            mapping("inherit", "/inherit/", &echo, ""),
            mapping(
                "cleared",
                "/cleared/",
                &echo,
                "add_request_headers: {}\nremove_request_headers: []\n\
                 add_response_headers: {}\nremove_response_headers: []",
            ),
        ]
        .concat(),
    );

    let req = |target: &str| {
        Request::get(target).headers(&[
            ("x-evil-header", "1"),
            ("x-evilness", "2"),
            ("x-echo-header", "x-up-drop: 3"),
        ])
    };

    let r = gw.send(req("/own/"));
    let e = r.echo();
    assert_eq!(e.headers_all("fruit"), ["banana"]);
    assert_eq!(e.headers_all("x-evil-header"), ["1"]);
    assert!(e.headers_all("x-evilness").is_empty(), "{:?}", e.headers());
    // The response defaults still apply: "own" set only request keys.
    assert_eq!(r.headers_all("x-default-resp"), ["dflt"]);
    assert_eq!(r.header("x-up-drop"), None);

    let r = gw.send(req("/inherit/"));
    let e = r.echo();
    assert_eq!(e.headers_all("fruit"), ["orange"]);
    assert!(
        e.headers_all("x-evil-header").is_empty(),
        "{:?}",
        e.headers()
    );
    assert_eq!(e.headers_all("x-evilness"), ["2"]);
    assert_eq!(r.headers_all("x-default-resp"), ["dflt"]);
    assert_eq!(r.header("x-up-drop"), None);

    let r = gw.send(req("/cleared/"));
    let e = r.echo();
    assert!(e.headers_all("fruit").is_empty(), "{:?}", e.headers());
    assert_eq!(e.headers_all("x-evil-header"), ["1"]);
    assert_eq!(e.headers_all("x-evilness"), ["2"]);
    assert_eq!(r.header("x-default-resp"), None);
    assert_eq!(r.headers_all("x-up-drop"), ["3"]);
    drop(gw);

    // Class first, then top level, per key.
    let gw = Gw::start(
        &[
            module(
                "defaults:\n  add_request_headers:\n    top-add: t\n  \
                 remove_request_headers: [x-top-remove]\n  httpmapping:\n    \
                 add_request_headers:\n      class-add: c",
            ),
            mapping("m", "/m/", &echo, ""),
        ]
        .concat(),
    );
    let e = gw.routed(Request::get("/m/").header("x-top-remove", "1"));
    assert_eq!(e.headers_all("class-add"), ["c"]);
    assert!(e.headers_all("top-add").is_empty(), "{:?}", e.headers());
    assert!(
        e.headers_all("x-top-remove").is_empty(),
        "{:?}",
        e.headers()
    );
}

/// `add_linkerd_headers` (Module default, Mapping override) adds
/// `l5d-dst-override: <service host>:<port>`.
#[test]
fn linkerd_headers_from_module_and_mapping() {
    let echo = Echo::plain("l5d");
    let port = echo.port();
    let gw = Gw::start(
        &[
            module("add_linkerd_headers: true"),
            mapping("on", "/on/", &echo, ""),
            mapping("off", "/off/", &echo, "add_linkerd_headers: false"),
            doc(
                "Mapping",
                "name: named",
                &format!("prefix: /named/\nhostname: \"*\"\nservice: localhost:{port}"),
            ),
        ]
        .concat(),
    );
    assert_eq!(
        gw.get("/on/").headers_all("l5d-dst-override"),
        [format!("127.0.0.1:{port}")]
    );
    assert!(!gw.get("/off/").has_header("l5d-dst-override"));
    assert_eq!(
        gw.get("/named/").headers_all("l5d-dst-override"),
        [format!("localhost:{port}")]
    );
    drop(gw);

    let gw = Gw::start(
        &[
            mapping("plain", "/plain/", &echo, ""),
            mapping("opt-in", "/opt-in/", &echo, "add_linkerd_headers: true"),
        ]
        .concat(),
    );
    assert!(!gw.get("/plain/").has_header("l5d-dst-override"));
    assert_eq!(
        gw.get("/opt-in/").headers_all("l5d-dst-override"),
        [format!("127.0.0.1:{port}")]
    );
}

/// The upstream sees `x-envoy-expected-rq-timeout-ms` (the Mapping's
/// `timeout_ms`, else the Module's `cluster_request_timeout_ms`) and
/// `x-envoy-original-path`; the client sees `x-envoy-upstream-service-time`.
/// `suppress_envoy_headers` removes them all.
#[test]
fn envoy_headers_and_their_suppression() {
    let echo = Echo::plain("envoy");
    let mappings = [
        mapping(
            "target",
            "/target/",
            &echo,
            "timeout_ms: 5001\nrewrite: /rewrite/",
        ),
        mapping("dflt", "/dflt/", &echo, ""),
    ]
    .concat();

    let gw = Gw::start(&mappings);
    let r = gw.send(Request::get("/target/"));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(e.uri(), "/rewrite/");
    assert_eq!(e.headers_all("x-envoy-expected-rq-timeout-ms"), ["5001"]);
    assert_eq!(e.headers_all("x-envoy-original-path"), ["/target/"]);
    assert!(
        r.header("x-envoy-upstream-service-time").is_some(),
        "{:?}",
        r.headers
    );
    assert_eq!(
        gw.get("/dflt/")
            .headers_all("x-envoy-expected-rq-timeout-ms"),
        ["3000"]
    );
    drop(gw);

    let gw = Gw::start(&[module("cluster_request_timeout_ms: 4321"), mappings.clone()].concat());
    assert_eq!(
        gw.get("/dflt/")
            .headers_all("x-envoy-expected-rq-timeout-ms"),
        ["4321"]
    );
    assert_eq!(
        gw.get("/target/")
            .headers_all("x-envoy-expected-rq-timeout-ms"),
        ["5001"]
    );
    drop(gw);

    let gw = Gw::start(&[module("suppress_envoy_headers: true"), mappings].concat());
    let r = gw.send(Request::get("/target/"));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(e.uri(), "/rewrite/");
    assert!(
        !e.has_header("x-envoy-expected-rq-timeout-ms"),
        "{:?}",
        e.headers()
    );
    assert!(!e.has_header("x-envoy-original-path"), "{:?}", e.headers());
    assert_eq!(r.header("x-envoy-upstream-service-time"), None);
}

/// Envoy formatter variables in added header values
/// (<https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers#custom-request-response-headers>).
#[test]
fn header_value_variables() {
    let echo = Echo::plain("vars");
    let gw = Gw::start(&mapping(
        "vars",
        "/vars/",
        &echo,
        "add_request_headers:\n  \
         x-client-ip: \"%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\"\n  \
         x-client-addr: \"%DOWNSTREAM_REMOTE_ADDRESS%\"\n  \
         x-user-copy: \"%REQ(x-user)%\"\n  \
         x-greeting: \"hi %REQ(X-User)%, via %PROTOCOL%\"\n  \
         x-proto: \"%PROTOCOL%\"\n  \
         x-percent: \"100%%\"\n\
         add_response_headers:\n  x-resp-user: \"%REQ(x-user)%\"",
    ));

    let r = gw.send(Request::get("/vars/").header("x-user", "alice"));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(e.headers_all("x-client-ip"), ["127.0.0.1"]);
    let addr = e.header("x-client-addr").unwrap_or_default();
    let port = addr.strip_prefix("127.0.0.1:").map(str::parse::<u16>);
    assert!(matches!(port, Some(Ok(p)) if p != 0), "{addr:?}");
    assert_eq!(e.headers_all("x-user-copy"), ["alice"]);
    assert_eq!(e.headers_all("x-greeting"), ["hi alice, via HTTP/1.1"]);
    assert_eq!(e.headers_all("x-proto"), ["HTTP/1.1"]);
    assert_eq!(e.headers_all("x-percent"), ["100%"]);
    assert_eq!(r.headers_all("x-resp-user"), ["alice"]);
}

// ---------------------------------------------------------------------------
// Canaries
// ---------------------------------------------------------------------------

/// Mappings on the same prefix split traffic by weight (one random draw
/// against cumulative thresholds); weightless Mappings share the rest
/// equally; weight 0 is never chosen and weight 100 takes everything.
#[test]
fn canary_weights_split_traffic() {
    let main = Echo::plain("main");
    let canary = Echo::plain("canary");
    let third = Echo::plain("third");
    let gw = Gw::start(
        &[
            mapping("w0-main", "/w0/", &main, ""),
            mapping("w0-canary", "/w0/", &canary, "weight: 0"),
            mapping("w100-main", "/w100/", &main, ""),
            mapping("w100-canary", "/w100/", &canary, "weight: 100"),
            mapping("w30-main", "/w30/", &main, ""),
            mapping("w30-canary", "/w30/", &canary, "weight: 30"),
            // 20 / 30 / rest (50).
            mapping("three-rest", "/three/", &third, ""),
            mapping("three-20", "/three/", &main, "weight: 20"),
            mapping("three-30", "/three/", &canary, "weight: 30"),
            // 40 / the remaining 60 shared by two weightless Mappings.
            mapping("share-40", "/share/", &main, "weight: 40"),
            mapping("share-a", "/share/", &canary, ""),
            mapping("share-b", "/share/", &third, ""),
        ]
        .concat(),
    );

    const N: usize = 400;
    // ±10 points of 400 is over 4 standard deviations for these shares.
    let near = |got: usize, percent: usize| {
        let expected = N * percent / 100;
        got + 40 >= expected && got <= expected + 40
    };

    // Weight 0 and weight 100 are valid: no diagnostics at all.
    let out = gw.check();
    assert!(out.success(), "{}", out.combined());

    let counts = tally(&gw, "/w0/", N);
    assert_eq!(count(&counts, "main"), N, "{counts:?}");

    let counts = tally(&gw, "/w100/", N);
    assert_eq!(count(&counts, "canary"), N, "{counts:?}");

    let counts = tally(&gw, "/w30/", N);
    assert_eq!(count(&counts, "main") + count(&counts, "canary"), N);
    assert!(near(count(&counts, "canary"), 30), "{counts:?}");

    let counts = tally(&gw, "/three/", N);
    assert!(near(count(&counts, "main"), 20), "{counts:?}");
    assert!(near(count(&counts, "canary"), 30), "{counts:?}");
    assert!(near(count(&counts, "third"), 50), "{counts:?}");

    let counts = tally(&gw, "/share/", N);
    assert!(near(count(&counts, "main"), 40), "{counts:?}");
    assert!(near(count(&counts, "canary"), 30), "{counts:?}");
    assert!(near(count(&counts, "third"), 30), "{counts:?}");
}

/// Each Mapping of a canary group keeps its own `host_rewrite` and `rewrite`.
#[test]
fn canary_members_keep_their_own_rewrites() {
    let one = Echo::plain("one");
    let two = Echo::plain("two");
    let gw = Gw::start(
        &[
            mapping(
                "main",
                "/cr/",
                &one,
                "host_rewrite: canary.1.example.com\nrewrite: /one/",
            ),
            mapping(
                "canary",
                "/cr/",
                &two,
                "weight: 50\nhost_rewrite: canary.2.example.com\nrewrite: /two/",
            ),
        ]
        .concat(),
    );

    let mut client = Client::connect(gw.port);
    let mut seen = BTreeMap::new();
    for _ in 0..200 {
        let r = client.get("/cr/x");
        assert_eq!(r.status, 200, "{}", r.text());
        let e = r.echo();
        let (host, uri) = match e.server().as_str() {
            "one" => ("canary.1.example.com", "/one/x"),
            "two" => ("canary.2.example.com", "/two/x"),
            other => panic!("unexpected server {other}"),
        };
        assert_eq!(e.headers_all("host"), [host]);
        assert_eq!(e.uri(), uri);
        *seen.entry(e.server()).or_insert(0) += 1;
    }
    // 50/50 of 200: both well inside 60..=140.
    for server in ["one", "two"] {
        assert!((60..=140).contains(&count(&seen, server)), "{seen:?}");
    }
}

/// Weights above 100 (one alone or summed in a group) drop the whole group
/// with an error; other groups keep routing.
#[test]
fn canary_weights_above_100_drop_the_group() {
    let a = Echo::plain("a");
    let b = Echo::plain("b");
    let gw = Gw::start(
        &[
            mapping("over-a", "/over/", &a, "weight: 60"),
            mapping("over-b", "/over/", &b, "weight: 50"),
            mapping("single", "/single/", &a, "weight: 101"),
            mapping("ok", "/ok/", &b, "weight: 100"),
        ]
        .concat(),
    );

    gw.assert_404_get("/over/");
    gw.assert_404_get("/single/");
    assert_eq!(gw.get("/ok/").server(), "b");

    let out = gw.check();
    let text = out.combined();
    assert_eq!(out.code, 1, "{text}");
    for name in ["over-a", "over-b", "single"] {
        let line = diagnostic_for(&text, name);
        assert!(
            line.starts_with("error:") && line.contains("spec.weight") && line.contains("100"),
            "{name}: {text}"
        );
    }
    assert!(diagnostic_for(&text, "ok").is_empty(), "{text}");
}

// ---------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------

/// With Host resources, a Mapping joins the Hosts whose hostname is
/// compatible with its own; one compatible with none is not routed and `-t`
/// says it is not reachable. Inside a Host, the Mapping's hostname still
/// matches `:authority`.
#[test]
fn hosts_associate_mappings_by_hostname() {
    let echo = Echo::plain("assoc");
    let gw = Gw::start(
        &[
            host("a", "a.example.com", Some("Route"), ""),
            host("wild", "*.wild.org", Some("Route"), ""),
            bare_mapping("exact-a", "/exact-a/", &echo, "hostname: a.example.com"),
            bare_mapping(
                "glob-com",
                "/glob-com/",
                &echo,
                "hostname: \"*.example.com\"",
            ),
            bare_mapping("in-wild", "/in-wild/", &echo, "hostname: x.wild.org"),
            mapping("star", "/star/", &echo, ""),
            bare_mapping("orphan", "/orphan/", &echo, "hostname: b.example.com"),
        ]
        .concat(),
    );

    assert_eq!(gw.server_for("a.example.com", "/exact-a/"), "assoc");
    assert_eq!(gw.server_for("a.example.com", "/glob-com/"), "assoc");
    assert_eq!(gw.server_for("x.wild.org", "/in-wild/"), "assoc");
    gw.assert_404_host("y.wild.org", "/in-wild/");
    gw.assert_404_host("x.wild.org", "/exact-a/");
    assert_eq!(gw.server_for("a.example.com", "/star/"), "assoc");
    assert_eq!(gw.server_for("z.wild.org", "/star/"), "assoc");
    // No Host serves other names at all.
    gw.assert_404_host("unknown.net", "/star/");

    gw.assert_404_host("b.example.com", "/orphan/");
    gw.assert_404_host("a.example.com", "/orphan/");

    let text = gw.check().combined();
    let line = diagnostic_for(&text, "orphan");
    assert!(line.contains("not reachable"), "{text}");
    for name in ["exact-a", "glob-com", "in-wild", "star"] {
        assert!(diagnostic_for(&text, name).is_empty(), "{name}: {text}");
    }
}

/// `mappingSelector` requires all its labels on the Mapping; a v3 Mapping
/// without hostname joins only Hosts that select it by label; a
/// `getambassador.io/v2` Mapping without host acts as `hostname: "*"`;
/// `host_regex` Mappings join every Host.
#[test]
fn host_mapping_selector_and_hostless_mappings() {
    let echo = Echo::plain("labels");
    let labelled = |name: &str, labels: &str, prefix: &str, extra: &str| {
        mapping_doc(
            V3,
            &format!("name: {name}, labels: {{{labels}}}"),
            prefix,
            &echo,
            extra,
        )
    };
    let gw = Gw::start(
        &[
            host(
                "sel",
                "sel.example.com",
                Some("Route"),
                "mappingSelector:\n  matchLabels:\n    team: a\n    tier: web",
            ),
            host("plain", "plain.example.com", Some("Route"), ""),
            labelled(
                "all-labels",
                "team: a, tier: web, extra: x",
                "/all-labels/",
                "",
            ),
            labelled("partial", "team: a", "/partial/", ""),
            labelled("wrong-value", "team: a, tier: db", "/wrong-value/", ""),
            labelled(
                "labels-and-host",
                "team: a, tier: web",
                "/labels-and-host/",
                "hostname: sel.example.com",
            ),
            labelled(
                "labels-other-host",
                "team: a, tier: web",
                "/labels-other-host/",
                "hostname: other.example.com",
            ),
            bare_mapping("v3-hostless", "/v3-hostless/", &echo, ""),
            mapping_doc(V2, "name: v2-hostless", "/v2-hostless/", &echo, ""),
            mapping("v3-star", "/v3-star/", &echo, ""),
            bare_mapping(
                "host-regex",
                "/host-regex/",
                &echo,
                "host: \".*\"\nhost_regex: true",
            ),
        ]
        .concat(),
    );

    let sel = "sel.example.com";
    let plain = "plain.example.com";
    assert_eq!(gw.server_for(sel, "/all-labels/"), "labels");
    gw.assert_404_host(plain, "/all-labels/");
    gw.assert_404_host(sel, "/partial/");
    gw.assert_404_host(sel, "/wrong-value/");
    assert_eq!(gw.server_for(sel, "/labels-and-host/"), "labels");
    gw.assert_404_host(sel, "/labels-other-host/");
    gw.assert_404_host(sel, "/v3-hostless/");
    gw.assert_404_host(plain, "/v3-hostless/");
    assert_eq!(gw.server_for(plain, "/v2-hostless/"), "labels");
    gw.assert_404_host(sel, "/v2-hostless/");
    assert_eq!(gw.server_for(plain, "/v3-star/"), "labels");
    gw.assert_404_host(sel, "/v3-star/");
    // host_regex Mappings join every Host, selector or not.
    assert_eq!(gw.server_for(sel, "/host-regex/"), "labels");
    assert_eq!(gw.server_for(plain, "/host-regex/"), "labels");

    let text = gw.check().combined();
    for name in ["partial", "wrong-value", "labels-other-host", "v3-hostless"] {
        assert!(
            diagnostic_for(&text, name).contains("not reachable"),
            "{name}: {text}"
        );
    }
    for name in ["all-labels", "labels-and-host", "v2-hostless", "v3-star"] {
        assert!(diagnostic_for(&text, name).is_empty(), "{name}: {text}");
    }
}

/// Insecure requests per Host `requestPolicy.insecure.action`: Route serves
/// them, Redirect (the default) answers 301 to `https://host/path`, Reject
/// answers 404; `/.well-known/acme-challenge/` is always routed.
#[test]
fn host_insecure_actions() {
    let echo = Echo::plain("insecure");
    let gw = Gw::start(
        &[
            host("route", "route.example.com", Some("Route"), ""),
            host("redirect", "redirect.example.com", Some("Redirect"), ""),
            host("default", "default.example.com", None, ""),
            host("reject", "reject.example.com", Some("Reject"), ""),
            mapping("app", "/app/", &echo, ""),
            mapping(
                "acme",
                "/.well-known/acme-challenge/",
                &echo,
                "rewrite: \"\"",
            ),
        ]
        .concat(),
    );

    assert_eq!(gw.get_host("route.example.com", "/app/x").uri(), "/x");

    for name in ["redirect", "default"] {
        let h = format!("{name}.example.com");
        let r = gw.send(Request::get("/app/x?q=1").header("Host", &h));
        assert_eq!(r.status, 301, "{h}: {}", r.text());
        assert!(!r.is_echo(), "{h}");
        assert_eq!(
            r.header("location"),
            Some(&*format!("https://{h}/app/x?q=1"))
        );
    }

    gw.assert_404_host("reject.example.com", "/app/x");

    for name in ["route", "redirect", "default", "reject"] {
        let e = gw.get_host(
            &format!("{name}.example.com"),
            "/.well-known/acme-challenge/token",
        );
        assert_eq!(e.uri(), "/.well-known/acme-challenge/token", "{name}");
    }
}

/// On an XFP Listener with `l7Depth: 1` a trusted proxy's
/// `X-Forwarded-Proto: https` makes the request secure (routed even on
/// Redirect and Reject Hosts); with `l7Depth: 0` the client cannot spoof it
/// and the upstream sees the wire protocol.
#[test]
fn xfp_security_depends_on_l7_depth() {
    let echo = Echo::plain("xfp");
    let resources = [
        host("redirect", "redirect.example.com", Some("Redirect"), ""),
        host("reject", "reject.example.com", Some("Reject"), ""),
        host("route", "route.example.com", Some("Route"), ""),
        mapping("app", "/app/", &echo, ""),
    ]
    .concat();
    let xfp = |host: &str, proto: Option<&str>| {
        let req = Request::get("/app/x").header("Host", host);
        match proto {
            Some(p) => req.header("X-Forwarded-Proto", p),
            None => req,
        }
    };

    let trusted = Gw::start_with_listener("l7Depth: 1", &resources);
    let e = trusted.routed(xfp("redirect.example.com", Some("https")));
    assert_eq!(e.uri(), "/x");
    assert_eq!(e.headers_all("x-forwarded-proto"), ["https"]);
    assert_eq!(
        trusted
            .send(xfp("redirect.example.com", Some("http")))
            .status,
        301
    );
    assert_eq!(trusted.send(xfp("redirect.example.com", None)).status, 301);
    trusted.routed(xfp("reject.example.com", Some("https")));
    trusted.assert_404(xfp("reject.example.com", Some("http")));
    drop(trusted);

    let untrusted = Gw::start_with_listener("l7Depth: 0", &resources);
    let r = untrusted.send(xfp("redirect.example.com", Some("https")));
    assert_eq!(r.status, 301, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some("https://redirect.example.com/app/x")
    );
    untrusted.assert_404(xfp("reject.example.com", Some("https")));
    let e = untrusted.routed(xfp("route.example.com", Some("https")));
    assert_eq!(e.headers_all("x-forwarded-proto"), ["http"]);
    drop(untrusted);

    // Without l7Depth the Listener takes the Module's xff_num_trusted_hops.
    let from_module = Gw::start(&[module("xff_num_trusted_hops: 1"), resources].concat());
    assert_eq!(
        from_module
            .routed(xfp("redirect.example.com", Some("https")))
            .uri(),
        "/x"
    );
    assert_eq!(
        from_module
            .send(xfp("redirect.example.com", Some("http")))
            .status,
        301
    );
}

/// A request picks its Host by name: exact first, then the longest
/// `*.suffix`, then `*`; that Host's insecure action applies.
#[test]
fn host_selection_exact_then_wildcard_then_catch_all() {
    let echo = Echo::plain("pick");
    let gw = Gw::start(
        &[
            host("catch-all", "*", Some("Redirect"), ""),
            host("wild", "*.domain.com", Some("Route"), ""),
            host("deeper", "*.b.domain.com", Some("Reject"), ""),
            host("exact", "a.domain.com", Some("Redirect"), ""),
            mapping("app", "/app/", &echo, ""),
        ]
        .concat(),
    );

    let status = |host: &str| gw.send(Request::get("/app/").header("Host", host)).status;
    assert_eq!(status("a.domain.com"), 301);
    assert_eq!(gw.get_host("wc.domain.com", "/app/").uri(), "/");
    assert_eq!(gw.get_host("x.a.domain.com", "/app/").uri(), "/");
    assert_eq!(status("c.b.domain.com"), 404);
    assert_eq!(status("127.0.0.1"), 301);
    assert_eq!(status("domain.com"), 301);
}
