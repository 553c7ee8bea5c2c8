//! Client identity at the edge, through the real binary and a real TLS
//! client that presents client certificates:
//!
//! - `x-forwarded-client-cert` (XFCC) in each of the Module's
//!   `forward_client_cert_details` modes, with the fields
//!   `set_current_client_cert_details` selects, as Envoy defines them
//!   (<https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers>):
//!   what a client sends is trusted only as far as the mode says, and the
//!   gateway's own element is computed here, independently, from the
//!   certificate the client presented.
//! - The client-certificate variables of `add_request_headers` (Envoy's
//!   `%DOWNSTREAM_PEER_*%` formatters): validity bounds in Envoy's default
//!   and strftime formats, subject, SHA-256 fingerprint, SANs and the SNI;
//!   empty without a client certificate.
//! - `crl_secret`: a revoked client certificate fails the handshake,
//!   another of the same CA is served; what `pingress -t` says about bad
//!   CRL settings.
//! - Case-sensitive and case-insensitive redirect prefixes.
//!
//! Every HTTPS test uses one TLS Host, `id.example`, whose inline `tls`
//! verifies client certificates against the test CA without requiring one,
//! and whose insecure action is Route, so the same route is reachable with
//! a client certificate, over TLS without one, and in cleartext.

mod support;

use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use tempfile::TempDir;

use support::*;

const HOST: &str = "id.example";
const XFCC: &str = "x-forwarded-client-cert";

/// 2021-11-10T13:12:00Z, the notBefore of the client certificate in
/// Emissary's KAT test of `%DOWNSTREAM_PEER_CERT_V_START%`.
const NOT_BEFORE: i64 = 1_636_549_920;
/// 2041-03-05T07:08:09Z: a one-digit day, so `%e` must pad with a space.
const NOT_AFTER: i64 = 2_246_080_089;

/// The identity certificate's subject in DER order, least specific first,
/// with a comma that RFC 2253 must escape.
const SUBJECT: &[(&str, &str)] = &[
    ("C", "US"),
    ("ST", "California"),
    ("L", "San Francisco"),
    ("O", "Example Corp"),
    ("OU", "Engineering, Platform"),
    ("CN", "alice"),
];
/// [`SUBJECT`] in RFC 2253 form: most specific first, `,` escaped.
const SUBJECT_RFC2253: &str =
    r"CN=alice,OU=Engineering\, Platform,O=Example Corp,L=San Francisco,ST=California,C=US";
const URIS: &[&str] = &[
    "spiffe://cluster.local/ns/default/sa/alice",
    "urn:example:alice",
];
const DNS: &[&str] = &["alice.clients.example", "alice.internal.example"];

/// A forged XFCC a client sends, hoping the upstream trusts it.
const SPOOFED: &str = "By=spiffe://evil;Hash=deadbeef;Subject=\"CN=admin\"";

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// A gateway with an HTTP and an HTTPS Listener, the TLS Host [`HOST`]
/// (client certificates verified when presented, cleartext routed), and a
/// Mapping `/id/` to an echo upstream.
struct Edge {
    dir: TempDir,
    gateway: Gateway,
    pki: Pki,
    /// The client certificate with [`SUBJECT`], [`URIS`], [`DNS`] and the
    /// fixed validity.
    alice: CertFiles,
    http: u16,
    https: u16,
    _echo: Echo,
}

impl Edge {
    /// `module` is block YAML under the `ambassador` Module's `config`
    /// (`None`: no Module), `mapping_extra` spec lines of the Mapping.
    fn start(module: Option<&str>, mapping_extra: &str) -> Edge {
        let dir = tempdir();
        let pki = Pki::new(&dir.path().join("pki"));
        let server = pki.issue_server(HOST, &[]);
        let alice = pki.issue_client_identity(&ClientIdentity {
            subject: SUBJECT,
            uris: URIS,
            dns: DNS,
            not_before: NOT_BEFORE,
            not_after: NOT_AFTER,
        });
        let echo = Echo::plain("identity");
        let (http, https) = (free_port(), free_port());
        let mut docs = vec![
            listener("http", http, "HTTP"),
            listener("https", https, "HTTPS"),
            tls_secret("id-cert", "default", &server),
            ca_secret("client-ca", "default", pki.ca_pem()),
            host(
                "id",
                HOST,
                &format!(
                    "{}tls:\n  ca_secret: client-ca",
                    tls_spec("id-cert", Some("Route"))
                ),
            ),
            mapping(
                "id",
                "",
                "/id/",
                &echo,
                &format!("hostname: \"*\"\n{mapping_extra}"),
            ),
        ];
        if let Some(config) = module {
            docs.push(doc(
                "Module",
                "name: ambassador",
                &format!("config:\n{}", indent(config, 2)),
            ));
        }
        write_gateway_without_listener(dir.path(), free_port(), &docs.concat());
        let gateway = Gateway::start(dir.path());
        Edge {
            dir,
            gateway,
            pki,
            alice,
            http,
            https,
            _echo: echo,
        }
    }

    fn tls_opts(&self) -> TlsOpts {
        TlsOpts::new(self.pki.ca_pem_path(), HOST)
    }

    /// What the upstream received for `request`, sent over TLS presenting
    /// `client` (or no certificate); panics unless the echo answered 200.
    fn over_tls(&self, request: Request, client: Option<&CertFiles>) -> EchoReply {
        let mut opts = self.tls_opts();
        if let Some(cert) = client {
            opts = opts.client(cert);
        }
        let response = request
            .try_send_tls(self.https, &opts)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.gateway.log()));
        response.echo_ok()
    }

    /// What the upstream received for `request`, sent in cleartext.
    fn cleartext(&self, request: Request) -> EchoReply {
        request.header("Host", HOST).send(self.http).echo_ok()
    }

    /// `pingress -t` on this gateway's configuration.
    fn check(&self) -> Output {
        check(self.dir.path())
    }
}

/// The XFCC header lines the upstream received, in order.
fn xfcc(reply: &EchoReply) -> Vec<String> {
    reply.headers_all(XFCC)
}

fn get_with_xfcc(value: Option<&str>) -> Request {
    let request = Request::get("/id/");
    match value {
        Some(v) => request.header("X-Forwarded-Client-Cert", v),
        None => request,
    }
}

// ---------------------------------------------------------------------------
// The expected values, computed from the certificate itself
// ---------------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the leaf's DER, lower-case hex (XFCC `Hash`, and
/// `%DOWNSTREAM_PEER_FINGERPRINT_256%`).
fn sha256_hex(cert: &CertFiles) -> String {
    hex(&cert
        .leaf()
        .digest(MessageDigest::sha256())
        .expect("SHA-256 digest"))
}

/// PEM as Envoy URL-encodes it in XFCC `Cert` and `Chain`: the newline,
/// space, `+`, `/` and `=` percent-encoded (Envoy's replacement table); a
/// PEM has no other characters but letters, digits and `-`.
fn url_encoded(pem: &str) -> String {
    pem.chars()
        .map(|c| match c {
            '\n' => "%0A".to_string(),
            ' ' => "%20".to_string(),
            '+' => "%2B".to_string(),
            '/' => "%2F".to_string(),
            '=' => "%3D".to_string(),
            c if c.is_ascii_alphanumeric() || c == '-' => c.to_string(),
            other => panic!("{other:?} in a PEM"),
        })
        .collect()
}

/// `Subject=..;URI=..;DNS=..` of the identity certificate.
fn subject_uri_dns() -> String {
    let mut parts = vec![format!("Subject=\"{SUBJECT_RFC2253}\"")];
    parts.extend(URIS.iter().map(|u| format!("URI={u}")));
    parts.extend(DNS.iter().map(|d| format!("DNS={d}")));
    parts.join(";")
}

/// The gateway's XFCC element for `cert` with subject, URI and DNS.
fn own_element(cert: &CertFiles) -> String {
    format!("Hash={};{}", sha256_hex(cert), subject_uri_dns())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// OpenSSL prints a certificate time as `Nov 10 13:12:00 2021 GMT`; Envoy's
/// default rendering of the same instant is `2021-11-10T13:12:00.000Z`.
fn envoy_default_time(openssl_text: &str) -> String {
    let fields: Vec<&str> = openssl_text.split_whitespace().collect();
    assert_eq!(fields.len(), 5, "unexpected time {openssl_text:?}");
    let month = MONTHS
        .iter()
        .position(|m| *m == fields[0])
        .unwrap_or_else(|| panic!("month in {openssl_text:?}"))
        + 1;
    let day: u32 = fields[1].parse().expect("day");
    format!("{}-{month:02}-{day:02}T{}.000Z", fields[3], fields[2])
}

/// `%b %e %H:%M:%S %Y %Z` is exactly OpenSSL's print with `UTC` for `GMT`.
fn strftime_b_e_time_y_z(openssl_text: &str) -> String {
    openssl_text
        .strip_suffix(" GMT")
        .map(|t| format!("{t} UTC"))
        .unwrap_or_else(|| panic!("unexpected time {openssl_text:?}"))
}

// ---------------------------------------------------------------------------
// XFCC
// ---------------------------------------------------------------------------

/// The XFCC lines the upstream got in the four situations that tell the
/// modes apart.
#[derive(Debug)]
struct Seen {
    /// Client certificate, client sent [`SPOOFED`].
    mtls_spoofed: Vec<String>,
    /// Client certificate, no XFCC from the client.
    mtls_clean: Vec<String>,
    /// TLS without a client certificate, client sent [`SPOOFED`].
    tls_spoofed: Vec<String>,
    /// Cleartext, client sent [`SPOOFED`].
    cleartext_spoofed: Vec<String>,
}

fn seen(edge: &Edge) -> Seen {
    Seen {
        mtls_spoofed: xfcc(&edge.over_tls(get_with_xfcc(Some(SPOOFED)), Some(&edge.alice))),
        mtls_clean: xfcc(&edge.over_tls(get_with_xfcc(None), Some(&edge.alice))),
        tls_spoofed: xfcc(&edge.over_tls(get_with_xfcc(Some(SPOOFED)), None)),
        cleartext_spoofed: xfcc(&edge.cleartext(get_with_xfcc(Some(SPOOFED)))),
    }
}

fn one(value: &str) -> Vec<String> {
    vec![value.to_string()]
}

/// SANITIZE_SET with subject, URI and DNS. On an mTLS connection the upstream
/// gets exactly one XFCC, the gateway's own element (Hash = SHA-256 of the
/// presented certificate's DER, the RFC 2253 subject most specific first with
/// its comma escaped, every URI and DNS SAN in order), whether or not the
/// client sent a forged one; without a client certificate, over TLS or
/// cleartext, there is none at all.
#[test]
fn sanitize_set_replaces_any_client_xfcc_with_the_verified_certificate() {
    let edge = Edge::start(
        Some(
            "forward_client_cert_details: SANITIZE_SET\n\
             set_current_client_cert_details:\n  subject: true\n  uri: true\n  dns: true",
        ),
        "",
    );
    let own = own_element(&edge.alice);
    assert_eq!(sha256_hex(&edge.alice).len(), 64);
    let seen = seen(&edge);
    assert_eq!(seen.mtls_spoofed, one(&own), "mTLS, spoofed XFCC");
    assert_eq!(seen.mtls_clean, one(&own), "mTLS, no client XFCC");
    assert!(seen.tls_spoofed.is_empty(), "TLS without cert: {seen:?}");
    assert!(seen.cleartext_spoofed.is_empty(), "cleartext: {seen:?}");

    // The same certificate on a kept-alive connection: every request gets
    // the element, spoofed or not.
    let mut client = Client::connect_tls(edge.https, &edge.tls_opts().client(&edge.alice));
    for value in [Some(SPOOFED), None, Some("Hash=00")] {
        let reply = client.send(get_with_xfcc(value)).echo_ok();
        assert_eq!(xfcc(&reply), one(&own), "keep-alive, client XFCC {value:?}");
    }

    let report = edge.check();
    assert!(
        report.success() && report.stdout.contains("configuration OK (0 warning(s))"),
        "{}",
        report.combined()
    );
}

/// `set_current_client_cert_details` picks the fields, always after
/// `Hash` and in Envoy's order (Hash, Cert, Chain, Subject, URI, DNS);
/// `Cert` is the presented leaf and `Chain` the leaf plus the chain the
/// client sent, both as URL-encoded PEM in quotes. Without the setting only
/// `Hash` is set.
#[test]
fn set_current_client_cert_details_selects_the_fields_in_envoys_order() {
    /// The XFCC expected for a client certificate.
    type Expected = fn(&CertFiles) -> String;
    let cases: [(&str, Expected); 3] = [
        ("", |c| format!("Hash={}", sha256_hex(c))),
        ("\nset_current_client_cert_details:\n  cert: true", |c| {
            format!(
                "Hash={};Cert=\"{}\"",
                sha256_hex(c),
                url_encoded(&c.leaf_pem)
            )
        }),
        (
            "\nset_current_client_cert_details:\n  subject: true\n  cert: true\n  \
             chain: true\n  dns: true\n  uri: true",
            |c| {
                format!(
                    "Hash={};Cert=\"{}\";Chain=\"{}\";{}",
                    sha256_hex(c),
                    url_encoded(&c.leaf_pem),
                    url_encoded(&c.cert_pem),
                    subject_uri_dns()
                )
            },
        ),
    ];
    for (details, expected) in cases {
        let edge = Edge::start(
            Some(&format!(
                "forward_client_cert_details: SANITIZE_SET{details}"
            )),
            "",
        );
        let reply = edge.over_tls(get_with_xfcc(Some(SPOOFED)), Some(&edge.alice));
        assert_eq!(
            xfcc(&reply),
            one(&expected(&edge.alice)),
            "details {details:?}"
        );
    }
}

/// SANITIZE, the default: a client-sent XFCC never reaches the upstream,
/// with or without a client certificate, and the gateway adds none.
#[test]
fn sanitize_is_the_default_and_drops_every_client_xfcc() {
    for module in [None, Some("forward_client_cert_details: SANITIZE")] {
        let edge = Edge::start(module, "");
        let seen = seen(&edge);
        assert!(
            seen.mtls_spoofed.is_empty()
                && seen.mtls_clean.is_empty()
                && seen.tls_spoofed.is_empty()
                && seen.cleartext_spoofed.is_empty(),
            "Module {module:?}: {seen:?}"
        );
    }
}

/// FORWARD_ONLY: the client's XFCC is forwarded untouched on mTLS
/// connections only; the gateway adds nothing.
#[test]
fn forward_only_passes_the_client_xfcc_on_mtls_connections_only() {
    let edge = Edge::start(Some("forward_client_cert_details: FORWARD_ONLY"), "");
    let seen = seen(&edge);
    assert_eq!(seen.mtls_spoofed, one(SPOOFED), "{seen:?}");
    assert!(seen.mtls_clean.is_empty(), "{seen:?}");
    assert!(seen.tls_spoofed.is_empty(), "{seen:?}");
    assert!(seen.cleartext_spoofed.is_empty(), "{seen:?}");
}

/// APPEND_FORWARD: on mTLS connections the client's value, then `,`, then
/// the gateway's element (alone when the client sent none); without a
/// client certificate the header is dropped.
#[test]
fn append_forward_appends_the_gateways_element_to_the_client_value() {
    let edge = Edge::start(
        Some(
            "forward_client_cert_details: APPEND_FORWARD\n\
             set_current_client_cert_details:\n  subject: true\n  uri: true\n  dns: true",
        ),
        "",
    );
    let own = own_element(&edge.alice);
    let seen = seen(&edge);
    assert_eq!(
        seen.mtls_spoofed,
        one(&format!("{SPOOFED},{own}")),
        "{seen:?}"
    );
    assert_eq!(seen.mtls_clean, one(&own), "{seen:?}");
    assert!(seen.tls_spoofed.is_empty(), "{seen:?}");
    assert!(seen.cleartext_spoofed.is_empty(), "{seen:?}");
}

/// ALWAYS_FORWARD_ONLY: the client's XFCC is forwarded whatever the
/// connection; the gateway adds nothing.
#[test]
fn always_forward_only_passes_the_client_xfcc_on_every_connection() {
    let edge = Edge::start(Some("forward_client_cert_details: ALWAYS_FORWARD_ONLY"), "");
    let seen = seen(&edge);
    assert_eq!(seen.mtls_spoofed, one(SPOOFED), "{seen:?}");
    assert!(seen.mtls_clean.is_empty(), "{seen:?}");
    assert_eq!(seen.tls_spoofed, one(SPOOFED), "{seen:?}");
    assert_eq!(seen.cleartext_spoofed, one(SPOOFED), "{seen:?}");
}

/// An XFCC split over two header lines is one list (RFC 9110 §5.3: the
/// same as one comma-joined line). The forwarding modes pass both lines on,
/// as Envoy does (it leaves the header alone in them); APPEND_FORWARD keeps
/// both client elements and adds the gateway's once, either after the
/// joined list or, as Envoy does, appended to the first line; SANITIZE_SET
/// leaves only the gateway's element.
#[test]

fn a_client_xfcc_on_two_header_lines_is_handled_as_one_list() {
    let first = "Hash=1111;Subject=\"CN=first\"";
    let second = "Hash=2222;Subject=\"CN=second\"";
    let request = || {
        Request::get("/id/")
            .header("X-Forwarded-Client-Cert", first)
            .header("X-Forwarded-Client-Cert", second)
    };
    let mut wrong = Vec::new();
    for mode in [
        "ALWAYS_FORWARD_ONLY",
        "FORWARD_ONLY",
        "APPEND_FORWARD",
        "SANITIZE_SET",
    ] {
        let details = match mode {
            "APPEND_FORWARD" | "SANITIZE_SET" => {
                "\nset_current_client_cert_details:\n  subject: true\n  uri: true\n  dns: true"
            }
            _ => "",
        };
        let edge = Edge::start(
            Some(&format!("forward_client_cert_details: {mode}{details}")),
            "",
        );
        let own = own_element(&edge.alice);
        let got = xfcc(&edge.over_tls(request(), Some(&edge.alice)));
        let acceptable: Vec<Vec<String>> = match mode {
            "APPEND_FORWARD" => vec![
                one(&format!("{first},{second},{own}")),
                vec![format!("{first},{second}"), own.clone()],
                vec![first.to_string(), format!("{second},{own}")],
                vec![format!("{first},{own}"), second.to_string()],
            ],
            "SANITIZE_SET" => vec![one(&own)],
            _ => vec![
                one(&format!("{first},{second}")),
                vec![first.to_string(), second.to_string()],
            ],
        };
        if !acceptable.contains(&got) {
            wrong.push(format!("{mode}: upstream got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

// ---------------------------------------------------------------------------
// Client-certificate header variables
// ---------------------------------------------------------------------------

/// `add_request_headers` with the client-certificate variables. With a
/// verified certificate they render its notBefore in Envoy's default format
/// (`2021-11-10T13:12:00.000Z`), its notAfter with a strftime format (`%e`
/// space-padded), its RFC 2253 subject, SHA-256 fingerprint, URI and DNS
/// SANs, and the SNI. Without a client certificate over TLS only the SNI
/// renders; in cleartext nothing does. (Each value is bracketed, so an empty
/// rendering is still a header.)
#[test]
fn client_certificate_variables_render_the_verified_certificate() {
    let headers = [
        ("x-v-start", "%DOWNSTREAM_PEER_CERT_V_START%"),
        (
            "x-v-end",
            "%DOWNSTREAM_PEER_CERT_V_END(%b %e %H:%M:%S %Y %Z)%",
        ),
        ("x-subject", "%DOWNSTREAM_PEER_SUBJECT%"),
        ("x-fingerprint", "%DOWNSTREAM_PEER_FINGERPRINT_256%"),
        ("x-uri-san", "%DOWNSTREAM_PEER_URI_SAN%"),
        ("x-dns-san", "%DOWNSTREAM_PEER_DNS_SAN%"),
        ("x-sni", "%REQUESTED_SERVER_NAME%"),
    ];
    let add: String = headers
        .iter()
        .map(|(name, value)| format!("  {name}: {}\n", q(&format!("[{value}]"))))
        .collect();
    let edge = Edge::start(None, &format!("add_request_headers:\n{add}"));
    let leaf = edge.alice.leaf();
    let start_text = leaf.not_before().to_string();
    let end_text = leaf.not_after().to_string();
    // The oracle agrees with the literal values of the KAT.
    assert_eq!(envoy_default_time(&start_text), "2021-11-10T13:12:00.000Z");
    assert_eq!(strftime_b_e_time_y_z(&end_text), "Mar  5 07:08:09 2041 UTC");
    assert_eq!(
        Asn1Time::from_unix(NOT_BEFORE).expect("time").to_string(),
        start_text
    );

    let expected_mtls = [
        envoy_default_time(&start_text),
        strftime_b_e_time_y_z(&end_text),
        SUBJECT_RFC2253.to_string(),
        sha256_hex(&edge.alice),
        URIS.join(","),
        DNS.join(","),
        HOST.to_string(),
    ];
    let rendered = |reply: &EchoReply| -> Vec<Vec<String>> {
        headers
            .iter()
            .map(|(name, _)| reply.headers_all(name))
            .collect()
    };
    let bracketed = |values: &[String]| -> Vec<Vec<String>> {
        values.iter().map(|v| vec![format!("[{v}]")]).collect()
    };

    let reply = edge.over_tls(Request::get("/id/"), Some(&edge.alice));
    assert_eq!(rendered(&reply), bracketed(&expected_mtls), "mTLS");

    let mut without_cert = vec![String::new(); headers.len()];
    without_cert[6] = HOST.to_string();
    let reply = edge.over_tls(Request::get("/id/"), None);
    assert_eq!(
        rendered(&reply),
        bracketed(&without_cert),
        "TLS without a client certificate"
    );

    let reply = edge.cleartext(Request::get("/id/"));
    assert_eq!(
        rendered(&reply),
        bracketed(&vec![String::new(); headers.len()]),
        "cleartext"
    );
}

/// A certificate issued by [`Pki::issue_client`] (subject `CN`, then `O`
/// in DER order, validity from an hour ago) renders with its own values:
/// RFC 2253 puts the last RDN first, and the bounds follow the certificate.
#[test]
fn client_certificate_variables_follow_the_presented_certificate() {
    let edge = Edge::start(
        None,
        "add_request_headers:\n  x-subject: \"%DOWNSTREAM_PEER_SUBJECT%\"\n  \
         x-v-start: \"%DOWNSTREAM_PEER_CERT_V_START(%F %T)%\"\n  \
         x-fingerprint: \"%DOWNSTREAM_PEER_FINGERPRINT_256%\"",
    );
    let bob = edge.pki.issue_client("bob");
    let reply = edge.over_tls(Request::get("/id/"), Some(&bob));
    assert_eq!(
        reply.headers_all("x-subject"),
        one(&format!("O={TEST_ORG},CN=bob"))
    );
    assert_eq!(reply.headers_all("x-fingerprint"), one(&sha256_hex(&bob)));
    let start = envoy_default_time(&bob.leaf().not_before().to_string());
    let start = start.replacen('T', " ", 1);
    let start = start.strip_suffix(".000Z").expect("default format");
    assert_eq!(reply.headers_all("x-v-start"), one(start));
}

// ---------------------------------------------------------------------------
// CRL
// ---------------------------------------------------------------------------

/// `crl_secret` on an inline `tls` and on a linked TLSContext, each with
/// `cert_required`: the CRL (built here, signed by the client CA, revoking
/// bob) makes bob's handshake fail with a `certificate revoked` alert,
/// while alice of the same CA is served, before and after; no certificate
/// fails as well. The configuration checks clean.
#[test]
fn a_revoked_client_certificate_fails_the_handshake() {
    let dir = tempdir();
    let pki = Pki::new(&dir.path().join("pki"));
    let inline_cert = pki.issue_server("inline.example", &[]);
    let linked_cert = pki.issue_server("linked.example", &[]);
    let alice = pki.issue_client("alice");
    let bob = pki.issue_client("bob");
    let crl = pki.crl_pem(&[&bob]);
    assert!(crl.starts_with("-----BEGIN X509 CRL-----"), "{crl}");
    let echo = Echo::plain("guarded");
    let port = free_port();
    let docs = [
        listener("https", port, "HTTPS"),
        tls_secret("inline-cert", "default", &inline_cert),
        tls_secret("linked-cert", "default", &linked_cert),
        ca_secret("client-ca", "default", pki.ca_pem()),
        opaque_secret("client-crl", "default", &[("crl.pem", &crl)]),
        host(
            "inline",
            "inline.example",
            &format!(
                "{}tls:\n  ca_secret: client-ca\n  crl_secret: client-crl\n  cert_required: true",
                tls_spec("inline-cert", None)
            ),
        ),
        doc(
            "TLSContext",
            "name: linked-context",
            "ca_secret: client-ca\ncrl_secret: client-crl\ncert_required: true",
        ),
        host(
            "linked",
            "linked.example",
            &format!(
                "{}tlsContext:\n  name: linked-context",
                tls_spec("linked-cert", None)
            ),
        ),
        mapping("guarded", "", "/g/", &echo, "hostname: \"*\""),
    ];
    write_gateway_without_listener(dir.path(), free_port(), &docs.concat());
    let gateway = Gateway::start(dir.path());
    let report = check(dir.path());
    assert!(
        report.success() && !report.stdout.lines().any(|l| l.starts_with("error")),
        "{}",
        report.combined()
    );

    for name in ["inline.example", "linked.example"] {
        let opts = TlsOpts::new(pki.ca_pem_path(), name);
        let served = |cert: &CertFiles| {
            let response = Request::get("/g/")
                .try_send_tls(port, &opts.clone().client(cert))
                .unwrap_or_else(|e| {
                    panic!("{name} with {}: {e}\n{}", cert.subject_cn, gateway.log())
                });
            response.echo_ok().server()
        };
        assert_eq!(served(&alice), "guarded", "{name}: alice");
        let revoked = Request::get("/g/").try_send_tls(port, &opts.clone().client(&bob));
        match &revoked {
            Err(e) => assert!(
                e.contains("certificate revoked"),
                "{name}: bob was refused, but not as revoked: {e}"
            ),
            Ok(r) => panic!("{name}: revoked bob was served: {} {}", r.status, r.text()),
        }
        let none = Request::get("/g/").try_send_tls(port, &opts);
        assert!(none.is_err(), "{name}: no certificate: {none:?}");
        assert_eq!(
            served(&alice),
            "guarded",
            "{name}: alice after the refusals"
        );
    }
}

/// Runs `pingress -t` on an HTTPS Listener plus `docs`.
fn check_docs(docs: &[String]) -> Output {
    let dir = tempdir();
    let mut all = vec![listener("https", 8443, "HTTPS")];
    all.extend_from_slice(docs);
    write_gateway_without_listener(dir.path(), 8877, &all.concat());
    check(dir.path())
}

/// The report has a line starting with `error:` that contains every one of
/// `parts`, and the configuration is refused.
fn assert_error(out: &Output, parts: &[&str]) {
    assert_eq!(out.code, 1, "{}", out.combined());
    let found = out
        .stdout
        .lines()
        .any(|l| l.starts_with("error:") && parts.iter().all(|p| l.contains(p)));
    assert!(
        found,
        "no `error:` line with {parts:?} in:\n{}",
        out.combined()
    );
}

/// A Host `h.example` with a server certificate and inline `tls` lines,
/// plus `docs`, through `pingress -t`.
fn check_host_tls(tls: &str, docs: &[String]) -> Output {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let cert = pki.issue_server("h.example", &[]);
    let mut all = vec![
        tls_secret("h-cert", "default", &cert),
        ca_secret("client-ca", "default", pki.ca_pem()),
        host(
            "h",
            "h.example",
            &format!("{}tls:\n{}", tls_spec("h-cert", None), indent(tls, 2)),
        ),
    ];
    all.extend_from_slice(docs);
    check_docs(&all)
}

#[test]
fn check_reports_a_crl_secret_without_crl_pem() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let out = check_host_tls(
        "ca_secret: client-ca\ncrl_secret: not-a-crl",
        &[ca_secret("not-a-crl", "default", pki.ca_pem())],
    );
    assert_error(
        &out,
        &[
            "Host default/h:",
            "crl_secret",
            "Secret not-a-crl has no crl.pem",
        ],
    );
}

#[test]
fn check_reports_garbage_in_crl_pem() {
    let out = check_host_tls(
        "ca_secret: client-ca\ncrl_secret: bad-crl",
        &[opaque_secret(
            "bad-crl",
            "default",
            &[(
                "crl.pem",
                "-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
            )],
        )],
    );
    assert_error(
        &out,
        &[
            "Host default/h:",
            "crl_secret",
            "crl.pem of Secret bad-crl is not a PEM CRL",
        ],
    );
    let out = check_host_tls(
        "ca_secret: client-ca\ncrl_secret: text-crl",
        &[opaque_secret(
            "text-crl",
            "default",
            &[("crl.pem", "hello")],
        )],
    );
    assert_error(&out, &["crl.pem of Secret text-crl is not a PEM CRL"]);
}

#[test]
fn check_reports_a_crl_without_a_ca() {
    let dir = tempdir();
    let pki = Pki::new(dir.path());
    let crl = opaque_secret("client-crl", "default", &[("crl.pem", &pki.crl_pem(&[]))]);
    let out = check_host_tls("crl_secret: client-crl", std::slice::from_ref(&crl));
    assert_error(
        &out,
        &[
            "Host default/h:",
            "crl_secret",
            "a CRL needs a CA to check client certificates against",
        ],
    );
    // The same in a TLSContext.
    let out = check_docs(&[
        crl,
        doc("TLSContext", "name: ctx", "crl_secret: client-crl"),
    ]);
    assert_error(
        &out,
        &[
            "TLSContext default/ctx: spec.crl_secret:",
            "a CRL needs a CA to check client certificates against",
        ],
    );
}

/// A problem in a Host's inline `tls` names the field where it is written,
/// `spec.tls.<key>`, as other Host fields are named (`spec.tlsSecret`).
#[test]

fn check_names_the_inline_tls_field_of_a_host() {
    let out = check_host_tls("ca_secret: client-ca\ncrl_secret: client-ca", &[]);
    assert_error(
        &out,
        &["Host default/h: spec.tls.crl_secret: Secret client-ca has no crl.pem"],
    );
    let out = check_host_tls("ca_secret: missing-ca", &[]);
    assert_error(
        &out,
        &["Host default/h: spec.tls.ca_secret: Secret default/missing-ca unknown"],
    );
}

// ---------------------------------------------------------------------------
// Case sensitivity of redirect prefixes
// ---------------------------------------------------------------------------

/// A redirect Mapping on `/x/` matches case-sensitively, so `/X/anything` is
/// 404 (and `/x/anything` is redirected); another on `/y/` with
/// `case_sensitive: false` redirects `/Y/Anything`, and its Location keeps
/// the original upper-case path and the query.
#[test]
fn redirect_prefixes_and_case_sensitivity() {
    let dir = tempdir();
    let port = free_port();
    let redirect = |name: &str, prefix: &str, extra: &str| {
        doc(
            "Mapping",
            &format!("name: {name}"),
            &format!(
                "hostname: \"*\"\nprefix: {prefix}\nservice: foobar.com\nhost_redirect: true\n{extra}"
            ),
        )
    };
    write_gateway(
        dir.path(),
        port,
        free_port(),
        &[
            redirect("cs", "/x/", ""),
            redirect("ci", "/y/", "case_sensitive: false"),
        ]
        .concat(),
    );
    let _gateway = Gateway::start(dir.path());

    let response = Request::get("/X/anything").send(port);
    assert_eq!(response.status, 404, "{:?}", response.headers);
    assert_eq!(response.header("location"), None);

    for (target, location) in [
        ("/x/anything", "http://foobar.com/x/anything"),
        ("/Y/Anything", "http://foobar.com/Y/Anything"),
        ("/y/Anything", "http://foobar.com/y/Anything"),
        ("/Y/Anything?Q=A", "http://foobar.com/Y/Anything?Q=A"),
    ] {
        let response = Request::get(target).send(port);
        assert_eq!(response.status, 301, "{target}: {:?}", response.headers);
        assert_eq!(response.header("location"), Some(location), "{target}");
    }
}
