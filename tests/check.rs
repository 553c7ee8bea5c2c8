//! Golden tests of `pingress -t -c gateway.yaml`: invalid (and valid)
//! fixtures paired with the exact report a user reads.
//!
//! Layout: `tests/golden/<case>/resources/*.yaml` are the fixtures and
//! `tests/golden/<case>/expected.txt` is the exact expected stdout. Each test
//! copies its case into a temp dir, writes a fixed `gateway.yaml` beside it
//! (`resources: [resources]`, so file names in the report are stable
//! relative paths; a case may bring its own `gateway.yaml` instead), adds the files that must be generated at test time
//! (certificates and keys, written as Secrets with `stringData`), runs
//! `pingress -t`, and compares stdout byte for byte and the exit code (1 when
//! the report has an error, 0 otherwise).
//!
//! To regenerate the expected files after an intended change of wording:
//!
//! ```text
//! PINGRESS_BLESS=1 cargo test --test check
//! ```
//!
//! then read every changed expected.txt as a user would (`git diff
//! tests/golden`): each problem must name the file, the document, the
//! resource, the field, and give a hint that helps.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use support::*;

/// Fixed subject CNs, so messages that quote a certificate stay stable.
const CLIENT_CN: &str = "gateway-client";
const OTHER_CN: &str = "someone-else";

/// Placeholder for the temp dir in case an absolute path ever shows up in
/// the report (none should: file names are relative to the gateway file).
const DIR_PLACEHOLDER: &str = "$DIR";

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("list {}: {e}", from.display()));
    for entry in entries {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// The gateway file every case uses: nothing but the resources directory.
fn write_check_gateway(dir: &Path) {
    fs::write(
        dir.join("gateway.yaml"),
        "pingora:\n  threads: 1\nresources:\n  - resources\nadmin:\n  listen: 127.0.0.1:8877\n",
    )
    .expect("write gateway.yaml");
}

/// Writes `resources/<file>` holding one `kubernetes.io/tls` Secret in the
/// `default` namespace with the given `stringData` entries.
fn write_secret(dir: &Path, file: &str, name: &str, entries: &[(&str, &str)]) {
    fs::write(dir.join("resources").join(file), secret_yaml(name, entries)).expect("write secret");
}

/// Minimal line diff (longest common subsequence), `-` expected, `+` actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(the final newline differs)\n");
    }
    out
}

/// Runs one golden case. `setup` adds generated files to the temp copy
/// before `pingress -t` runs.
fn golden(case: &str, expected_code: i32, setup: impl FnOnce(&Path)) {
    let source = golden_root().join(case);
    let dir = tempdir();
    copy_tree(&source.join("resources"), &dir.path().join("resources"));
    // A case may bring its own gateway file; most use the fixed one.
    let own_gateway = source.join("gateway.yaml");
    if own_gateway.exists() {
        fs::copy(&own_gateway, dir.path().join("gateway.yaml")).expect("copy gateway.yaml");
    } else {
        write_check_gateway(dir.path());
    }
    setup(dir.path());

    let out = check(dir.path());
    let actual = out
        .stdout
        .replace(&*dir.path().to_string_lossy(), DIR_PLACEHOLDER);
    let expected_path = source.join("expected.txt");

    // Exit 1 exactly when the report holds an error.
    let has_error = actual.lines().any(|l| l.starts_with("error: "));
    assert_eq!(
        has_error,
        expected_code == 1,
        "{case}: the report disagrees with the expected exit code {expected_code}:\n{actual}"
    );

    if std::env::var_os("PINGRESS_BLESS").is_some_and(|v| v == "1") {
        fs::write(&expected_path, &actual)
            .unwrap_or_else(|e| panic!("write {}: {e}", expected_path.display()));
    } else {
        let expected = fs::read_to_string(&expected_path).unwrap_or_else(|e| {
            panic!(
                "read {}: {e}\n(run PINGRESS_BLESS=1 cargo test --test check to create it)\n\
                 actual output:\n{actual}",
                expected_path.display()
            )
        });
        assert!(
            expected == actual,
            "{case}: `pingress -t` output differs from {} (- expected, + actual):\n{}\n\
             stderr:\n{}\n(if the change is intended: PINGRESS_BLESS=1 cargo test --test check)",
            expected_path.display(),
            diff(&expected, &actual),
            out.stderr
        );
    }
    assert_eq!(
        out.code, expected_code,
        "{case}: exit code\nstdout:\n{}\nstderr:\n{}",
        out.stdout, out.stderr
    );
}

/// A client certificate (chain) plus its key, both issued by a fresh CA
/// under `dir/pki` (outside `resources/`, so never loaded as YAML).
fn client_cert(dir: &Path) -> (Pki, CertFiles) {
    let pki = Pki::new(&dir.join("pki"));
    let cert = pki.issue_client(CLIENT_CN);
    (pki, cert)
}

#[test]
fn broken_yaml() {
    golden("broken_yaml", 1, |_| {});
}

#[test]
fn unknown_kind() {
    golden("unknown_kind", 1, |_| {});
}

#[test]
fn missing_tls_context() {
    golden("missing_tls_context", 1, |_| {});
}

#[test]
fn missing_secret() {
    golden("missing_secret", 1, |_| {});
}

#[test]
fn key_mismatch() {
    golden("key_mismatch", 1, |dir| {
        let (pki, cert) = client_cert(dir);
        let unrelated = pki.issue_client(OTHER_CN);
        write_secret(
            dir,
            "secret.yaml",
            "upstream-certs",
            &[("tls.crt", &cert.cert_pem), ("tls.key", &unrelated.key_pem)],
        );
    });
}

#[test]
fn bad_service_port() {
    golden("bad_service_port", 1, |_| {});
}

#[test]
fn misspelt_field() {
    golden("misspelt_field", 1, |_| {});
}

#[test]
fn wrong_field_type() {
    golden("wrong_field_type", 1, |_| {});
}

#[test]
fn bad_regex_in_list() {
    golden("bad_regex_in_list", 1, |_| {});
}

#[test]
fn duplicate_name() {
    golden("duplicate_name", 1, |_| {});
}

#[test]
fn filter_problems() {
    golden("filter_problems", 1, |_| {});
}

#[test]
fn rate_limit_problems() {
    golden("rate_limit_problems", 1, |_| {});
}

#[test]
fn load_balancer_shapes() {
    golden("load_balancer_shapes", 1, |_| {});
}

#[test]
fn endpoint_resources() {
    golden("endpoint_resources", 1, |_| {});
}

#[test]
fn dns_settings() {
    golden("dns_settings", 1, |_| {});
}

#[test]
fn connection_settings() {
    golden("connection_settings", 1, |_| {});
}

#[test]
fn health_checks() {
    golden("health_checks", 1, |_| {});
}

#[test]
fn valid() {
    golden("valid", 0, |dir| {
        let (pki, cert) = client_cert(dir);
        write_secret(
            dir,
            "secret.yaml",
            "upstream-certs",
            &[
                ("tls.crt", &cert.cert_pem),
                ("tls.key", &cert.key_pem),
                ("ca.crt", pki.ca_pem()),
            ],
        );
    });
}

#[test]
fn warning_only() {
    golden("warning_only", 0, |dir| {
        let (_pki, cert) = client_cert(dir);
        write_secret(
            dir,
            "secret.yaml",
            "upstream-certs",
            &[("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)],
        );
    });
}

#[test]
fn tcp_mapping_problems() {
    golden("tcp_mapping_problems", 1, |dir| {
        let pki = Pki::new(&dir.join("pki"));
        let cert = pki.issue_server("db.example.com", &["db.example.com"]);
        write_secret(
            dir,
            "secret.yaml",
            "db-cert",
            &[("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)],
        );
    });
}

#[test]
fn gateway_file_problems() {
    golden("gateway_file_problems", 1, |_| {});
}

/// Every number that reaches std or tokio (durations, deadlines, breaker
/// semaphores, rates) has an upper bound: far too large is an error naming
/// its field, never a panic (exit 101) of `pingress -t`.
#[test]
fn huge_numbers() {
    golden("huge_numbers", 1, |_| {});

    // The same fixture, field by field, whatever the wording.
    let dir = tempdir();
    copy_tree(
        &golden_root().join("huge_numbers").join("resources"),
        &dir.path().join("resources"),
    );
    write_check_gateway(dir.path());
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    let errors: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    for (resource, field) in [
        (
            "Module default/ambassador",
            "spec.config.circuit_breakers[0].max_connections",
        ),
        (
            "Mapping default/max-connections",
            "spec.circuit_breakers[0].max_connections",
        ),
        (
            "Mapping default/max-pending",
            "spec.circuit_breakers[0].max_pending_requests",
        ),
        (
            "Mapping default/max-requests",
            "spec.circuit_breakers[0].max_requests",
        ),
        (
            "Mapping default/max-retries",
            "spec.circuit_breakers[0].max_retries",
        ),
        ("Mapping default/route-timeout", "spec.timeout_ms"),
        ("Mapping default/connect-timeout", "spec.connect_timeout_ms"),
        ("Mapping default/idle-timeout", "spec.idle_timeout_ms"),
        ("Mapping default/pool-idle", "spec.cluster_idle_timeout_ms"),
        (
            "Mapping default/pool-lifetime",
            "spec.cluster_max_connection_lifetime_ms",
        ),
        (
            "Mapping default/per-try",
            "spec.retry_policy.per_try_timeout",
        ),
        ("Mapping default/keepalive", "spec.keepalive.idle_time"),
        ("Mapping default/weight", "spec.weight"),
        (
            "Mapping default/cookie-ttl",
            "spec.load_balancer.cookie.ttl",
        ),
        (
            "Mapping default/health-interval",
            "spec.health_checks[0].interval",
        ),
        ("TCPMapping default/tunnel-idle", "spec.idle_timeout_ms"),
        (
            "TCPMapping default/tunnel-breaker",
            "spec.circuit_breakers[0].max_connections",
        ),
        ("AuthService default/authz", "spec.timeout_ms"),
        ("RateLimitService default/redis", "spec.timeout_ms"),
        ("RateLimit default/limits", "spec.limits[0].rate"),
    ] {
        let named = format!("{resource}: {field}: ");
        assert!(
            errors.iter().any(|l| l.contains(&named)),
            "no error names {resource} {field}:\n{}",
            out.stdout
        );
    }
    assert_eq!(errors.len(), 20, "{}", out.stdout);
}

/// Diagnostics never quote what may be a secret: the credentials of a
/// service URL, a configured header value, a value pattern.
#[test]
fn secrets_are_never_quoted() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("resources")).expect("create resources");
    write_check_gateway(dir.path());
    let mapping = |name: &str, body: &str| {
        format!(
            "---\napiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata:\n  name: {name}\n  \
             namespace: default\nspec:\n  hostname: \"*\"\n  prefix: /{name}/\n{body}"
        )
    };
    let resources = [
        mapping("userinfo", "  service: https://user:s3cret@example.com\n"),
        mapping("userinfo-port", "  service: https://user:s3cret@example.com:8443\n"),
        mapping("token-query", "  service: https://example.com/api?token=s3cret\n"),
        mapping(
            "redirect",
            "  service: https://user:s3cret@example.com\n  host_redirect: true\n",
        ),
        mapping(
            "header-value",
            "  service: quote:8080\n  add_request_headers:\n    authorization: \"Bearer s3cret\\n\"\n",
        ),
        mapping(
            "header-percent",
            "  service: quote:8080\n  add_request_headers:\n    x-api-key: {value: \"s3cret%\"}\n",
        ),
        mapping(
            "header-variable",
            "  service: quote:8080\n  add_response_headers:\n    x-token: \"%s3cret%\"\n",
        ),
        mapping(
            "header-regex",
            "  service: quote:8080\n  regex_headers:\n    x-api-key: \"s3cret(\"\n",
        ),
        "---\napiVersion: getambassador.io/v3alpha1\nkind: AuthService\nmetadata:\n  name: authz\n  \
         namespace: default\nspec:\n  auth_service: https://user:s3cret@authz:3000\n  proto: http\n"
            .to_string(),
    ]
    .concat();
    fs::write(dir.path().join("resources").join("secrets.yaml"), resources)
        .expect("write resources");

    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(
        !out.combined().contains("s3cret"),
        "a secret was quoted:\n{}",
        out.combined()
    );
    // Each problem is still reported, at its field.
    for (resource, field) in [
        ("Mapping default/userinfo", "spec.service"),
        ("Mapping default/userinfo-port", "spec.service"),
        ("Mapping default/token-query", "spec.service"),
        ("Mapping default/redirect", "spec.service"),
        (
            "Mapping default/header-value",
            "spec.add_request_headers.authorization",
        ),
        (
            "Mapping default/header-percent",
            "spec.add_request_headers.x-api-key",
        ),
        (
            "Mapping default/header-variable",
            "spec.add_response_headers.x-token",
        ),
        (
            "Mapping default/header-regex",
            "spec.regex_headers.x-api-key",
        ),
        ("AuthService default/authz", "spec.auth_service"),
    ] {
        let named = format!("{resource}: {field}: ");
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with("error: ") && l.contains(&named)),
            "no error names {resource} {field}:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout.contains("https://***@example.com"),
        "{}",
        out.stdout
    );
}

/// `-t` warns for every upstream that originates TLS without verifying it
/// (README: "Without a CA ... `-t` warns"); with `upstream_tls: {verify:
/// system}` those warnings go, and what cannot be verified is an error.
#[test]
fn unverified_upstreams() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("resources")).expect("create resources");
    let resources = "\
apiVersion: getambassador.io/v3alpha1
kind: TLSContext
metadata: {name: no-ca, namespace: default}
spec: {sni: upstream.example}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: https-service, namespace: default}
spec: {hostname: \"*\", prefix: /a/, service: \"https://upstream.example\"}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: tls-true, namespace: default}
spec: {hostname: \"*\", prefix: /b/, service: \"upstream.example:8443\", tls: true}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: context-without-ca, namespace: default}
spec: {hostname: \"*\", prefix: /c/, service: \"upstream.example:8443\", tls: no-ca}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: by-address, namespace: default}
spec: {hostname: \"*\", prefix: /d/, service: \"https://10.1.2.3\"}
---
apiVersion: getambassador.io/v3alpha1
kind: Mapping
metadata: {name: cleartext, namespace: default}
spec: {hostname: \"*\", prefix: /e/, service: \"upstream.example\"}
---
apiVersion: getambassador.io/v3alpha1
kind: TCPMapping
metadata: {name: tunnel, namespace: default}
spec: {port: 6000, service: \"upstream.example:5432\", tls: no-ca}
---
apiVersion: getambassador.io/v3alpha1
kind: AuthService
metadata: {name: authz, namespace: default}
spec: {auth_service: \"https://authz.example\", proto: http}
";
    fs::write(dir.path().join("resources").join("tls.yaml"), resources).expect("write");

    write_check_gateway(dir.path());
    let out = check(dir.path());
    assert_eq!(out.code, 0, "{}", out.combined());
    let warnings: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("warning: ") && l.contains("not verified"))
        .collect();
    for (resource, field) in [
        ("Mapping default/https-service", "spec.service"),
        ("Mapping default/tls-true", "spec.tls"),
        ("Mapping default/context-without-ca", "spec.tls"),
        ("Mapping default/by-address", "spec.service"),
        ("TCPMapping default/tunnel", "spec.tls"),
        ("AuthService default/authz", "spec.auth_service"),
    ] {
        let named = format!("{resource}: {field}: ");
        assert!(
            warnings.iter().any(|l| l.contains(&named)),
            "no warning for {resource} {field}:\n{}",
            out.stdout
        );
    }
    assert_eq!(warnings.len(), 6, "{}", out.stdout);
    assert!(
        out.stdout.contains("upstream_tls: {verify: system}"),
        "{}",
        out.stdout
    );

    // Verified against the system store: no warning, and the address that
    // gives no name to verify is an error.
    let gateway = fs::read_to_string(dir.path().join("gateway.yaml")).expect("read gateway");
    fs::write(
        dir.path().join("gateway.yaml"),
        format!("{gateway}upstream_tls:\n  verify: system\n"),
    )
    .expect("write gateway");
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(!out.stdout.contains("not verified"), "{}", out.stdout);
    let errors: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.stdout);
    assert!(
        errors[0].contains("Mapping default/by-address: spec.service: ")
            && errors[0].contains("system trust store"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("Mapping: 4 accepted"), "{}", out.stdout);

    // A misspelt setting is not silently Emissary's default.
    fs::write(
        dir.path().join("gateway.yaml"),
        format!("{gateway}upstream_tls:\n  verify: systen\n"),
    )
    .expect("write gateway");
    let out = check(dir.path());
    assert_ne!(out.code, 0, "{}", out.combined());
    assert!(out.combined().contains("systen"), "{}", out.combined());
}

/// A CA promises verification, which Pingora cannot give an IP address
/// without an SNI: an error for AuthServices as for Mappings.
#[test]
fn authorizer_on_an_address_with_a_ca_needs_sni() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("resources")).expect("create resources");
    write_check_gateway(dir.path());
    let pki = Pki::new(&dir.path().join("pki"));
    write_secret(
        dir.path(),
        "ca.yaml",
        "authz-ca",
        &[("ca.crt", pki.ca_pem())],
    );
    fs::write(
        dir.path().join("resources").join("auth.yaml"),
        "apiVersion: getambassador.io/v3alpha1\nkind: TLSContext\nmetadata: {name: authz-tls, \
         namespace: default}\nspec: {ca_secret: authz-ca}\n---\n\
         apiVersion: getambassador.io/v3alpha1\nkind: AuthService\nmetadata: {name: authz, \
         namespace: default}\nspec: {auth_service: \"10.0.0.7:8443\", proto: http, tls: authz-tls}\n",
    )
    .expect("write resources");
    let out = check(dir.path());
    assert_eq!(out.code, 1, "{}", out.combined());
    assert!(
        out.stdout.lines().any(|l| l.starts_with("error: ")
            && l.contains("AuthService default/authz: spec.tls: ")
            && l.contains("IP address")),
        "{}",
        out.stdout
    );
}

#[test]
fn diff_marks_changed_lines() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
    assert_eq!(diff("a\n", "a"), "  a\n(the final newline differs)\n");
}

/// Pingora's upgrade socket in a directory anyone may write to can be
/// created first by another user, who then receives the listeners at the
/// next upgrade: `-t` warns. Left out, the paths are pingress's private
/// directory's, and nothing is said.
#[test]
fn process_files_in_a_world_writable_directory_are_warned() {
    let dir = tempdir();
    fs::create_dir_all(dir.path().join("resources")).expect("resources");
    fs::write(
        dir.path().join("gateway.yaml"),
        "pingora:\n  upgrade_sock: /tmp/pingress-check.sock\n  pid_file: /tmp/pingress-check.pid\n\
         resources:\n  - resources\n",
    )
    .expect("gateway.yaml");
    let out = check(dir.path());
    assert!(out.success(), "{}", out.combined());
    let text = out.combined();
    for field in ["pingora.upgrade_sock", "pingora.pid_file"] {
        assert!(
            text.lines()
                .any(|l| l.contains(field) && l.contains("every user may write to")),
            "{field}: {text}"
        );
    }

    write_check_gateway(dir.path());
    let out = check(dir.path());
    assert!(
        out.combined().contains("configuration OK (0 warning(s))"),
        "{}",
        out.combined()
    );
}

/// Without the two keys, the gateway keeps its process files in a private
/// directory, and refuses to start when that path is not one it can trust.
#[test]
fn the_runtime_directory_is_private_or_the_gateway_does_not_start() {
    // Runs the gateway until `done` says so (or it exits), then stops it.
    let run = |runtime: &Path, done: &dyn Fn() -> bool| {
        let dir = tempdir();
        write_gateway(dir.path(), free_port(), free_port(), "");
        let gateway = dir.path().join("gateway.yaml");
        let text = fs::read_to_string(&gateway).expect("gateway.yaml");
        let text: String = text
            .lines()
            .filter(|l| !l.contains("upgrade_sock") && !l.contains("pid_file"))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&gateway, text).expect("gateway.yaml");
        let mut child = std::process::Command::new(PINGRESS)
            .arg("-c")
            .arg(&gateway)
            .env("XDG_RUNTIME_DIR", runtime)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("pingress");
        let made = poll_until(std::time::Duration::from_secs(10), || {
            done() || child.try_wait().ok().flatten().is_some()
        });
        let _ = child.kill();
        let out = child.wait_with_output().expect("pingress output");
        (made, String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let fresh = tempdir();
    let private = fresh.path().join("pingress");
    let (made, log) = run(fresh.path(), &|| private.is_dir());
    assert!(made, "{log}");
    let mode = fs::metadata(fresh.path().join("pingress"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("the runtime directory");
    assert_eq!(mode, 0o700, "{log}");

    let planted = tempdir();
    let elsewhere = tempdir();
    std::os::unix::fs::symlink(elsewhere.path(), planted.path().join("pingress")).expect("link");
    let (_, log) = run(planted.path(), &|| false);
    assert!(
        log.contains("runtime directory") && log.contains("symbolic link"),
        "{log}"
    );
}
