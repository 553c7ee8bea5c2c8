//! Redirect Mappings
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/redirects>):
//! `host_redirect` with path, prefix and regex replacements and every
//! redirect code, through the real binary, with the examples of Emissary's
//! own redirect tests and the Module's `server_name` on every redirect.

mod support;

use support::*;

fn redirect_mapping(name: &str, prefix: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n\
         spec:\n  hostname: \"*\"\n  prefix: {prefix}\n  service: foobar.com\n  host_redirect: true\n{extra}"
    )
}

#[test]
fn redirect_kinds_and_codes() {
    let resources = [
        redirect_mapping("basic", "/r/", ""),
        redirect_mapping(
            "path",
            "/r3/foo/",
            "  path_redirect: /redirect/\n  redirect_response_code: 302\n",
        ),
        redirect_mapping(
            "prefix",
            "/r4/foo/bar/baz",
            "  prefix_redirect: /foobar/baz\n  redirect_response_code: 307\n",
        ),
        redirect_mapping(
            "regex",
            "/r5/assets/([a-f0-9]{12})/images",
            "  prefix_regex: true\n  regex_redirect:\n    pattern: /r5/assets/([a-f0-9]{12})/images\n    \
             substitution: /images/\\1\n  redirect_response_code: 308\n",
        ),
        redirect_mapping("see-other", "/r6/", "  redirect_response_code: 303\n"),
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Module\nmetadata:\n  name: ambassador\n\
         spec:\n  config:\n    server_name: test-server\n"
            .to_string(),
    ]
    .concat();
    let (_dir, gateway, port) = start_gateway("", &resources);

    let cases = [
        (
            "/r/anything?itworked=true",
            301,
            "http://foobar.com/r/anything?itworked=true",
        ),
        ("/r3/foo/", 302, "http://foobar.com/redirect/"),
        (
            "/r4/foo/bar/baz/anything",
            307,
            "http://foobar.com/foobar/baz/anything",
        ),
        (
            "/r5/assets/abcd0000f123/images?itworked=true",
            308,
            "http://foobar.com/images/abcd0000f123?itworked=true",
        ),
        ("/r6/x", 303, "http://foobar.com/r6/x"),
    ];
    for (target, status, location) in cases {
        let reply = Request::get(target).send(port);
        assert_eq!(
            reply.status,
            status,
            "{target}: {}\n{}",
            reply.text(),
            gateway.log()
        );
        assert_eq!(reply.header("location"), Some(location), "{target}");
        // Even a redirect the gateway makes itself carries server_name, as
        // in Emissary.
        assert_eq!(reply.header("server"), Some("test-server"), "{target}");
    }
}

#[test]
fn secure_requests_redirect_to_https() {
    // With a trusted proxy saying https, the redirect keeps the https
    // scheme.
    let dir = tempdir();
    let port = free_port();
    write_gateway_with_listener(
        dir.path(),
        port,
        free_port(),
        "l7Depth: 1",
        &redirect_mapping("basic", "/target/", ""),
    );
    let _gateway = Gateway::start(dir.path());
    let reply = Request::get("/target/")
        .header("X-Forwarded-Proto", "https")
        .send(port);
    assert_eq!(reply.status, 301);
    assert_eq!(reply.header("location"), Some("https://foobar.com/target/"));
}

#[test]
fn invalid_redirect_settings_are_reported() {
    let dir = tempdir();
    let resources = [
        // Path settings without host_redirect mean nothing: an error.
        "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: stray\n\
         spec:\n  hostname: \"*\"\n  prefix: /stray/\n  service: quote\n  path_redirect: /x/\n"
            .to_string(),
        // Two redirects in one group: the second is refused.
        redirect_mapping("first", "/twice/", ""),
        redirect_mapping("second", "/twice/", ""),
        // A code that is not a redirect: a warning, and 301.
        redirect_mapping("odd-code", "/odd/", "  redirect_response_code: 200\n"),
    ]
    .concat();
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    let text = out.stdout;
    assert!(
        text.contains(
            "Mapping default/stray: spec.path_redirect: only meaningful with host_redirect: true"
        ),
        "{text}"
    );
    assert!(
        text.contains("Mapping default/second: spec.host_redirect:"),
        "{text}"
    );
    assert!(
        text.contains("spec.redirect_response_code: 200 is not a redirect code; 301 is used"),
        "{text}"
    );
}

/// A redirect's new path is written right after the service's host name in
/// the Location: a path that does not start with `/` would continue the
/// host name (`foobar.com` + `.evil.example/x`) and send clients to
/// another host. `path_redirect` and `prefix_redirect` must start with
/// `/`, and a `regex_redirect` result that does not is given one.
#[test]
fn a_redirect_path_cannot_change_the_host() {
    let dir = tempdir();
    let resources = [
        redirect_mapping("empty-prefix", "/p", "  prefix_redirect: \"\"\n"),
        redirect_mapping("bare-path", "/q/", "  path_redirect: \"@evil.example/\"\n"),
    ]
    .concat();
    write_gateway(dir.path(), free_port(), free_port(), &resources);
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    for (name, field) in [
        ("empty-prefix", "spec.prefix_redirect"),
        ("bare-path", "spec.path_redirect"),
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains(&format!("Mapping default/{name}: {field}"))
                    && l.contains("must start with /")),
            "{name}: {}",
            out.stdout
        );
    }

    let resources = redirect_mapping(
        "regex",
        "/r/",
        "  regex_redirect:\n    pattern: ^/r/(.*)$\n    substitution: \\1\n",
    );
    let (_dir, _gateway, port) = start_gateway("", &resources);
    let response = request(port, "GET", "/r/.evil.example/x", &[]);
    assert_eq!(response.status, 301);
    assert_eq!(
        response.header("location"),
        Some("http://foobar.com/.evil.example/x")
    );
}
