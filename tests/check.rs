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

#[test]
fn diff_marks_changed_lines() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
    assert_eq!(diff("a\n", "a"), "  a\n(the final newline differs)\n");
}
