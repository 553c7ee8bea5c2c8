//! The headers the gateway itself adds to and edits in a request or a
//! response, and the room they need.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use std::borrow::Cow;

use crate::filters::ip::X_FORWARDED_FOR;
use crate::model::UnderscoreAction;
use crate::routing::headers::{HeaderEdits, RequestFacts};
use crate::routing::path::{canonicalize, push_escaped, PathError, PathOptions};
use crate::routing::xfcc::XfccPolicy;
use crate::tls::edge::PeerCert;

/// Room for what is added later without growing the map: x-request-id,
/// x-envoy-expected-rq-timeout-ms, x-envoy-original-path, and a few of a
/// route's or a filter's own.
const ADDED_HEADERS: usize = 8;

pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// As the client sent it, or the gateway makes it (Module
/// `forward_client_cert_details`).
pub(super) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

static L5D_DST_OVERRIDE: HeaderName = HeaderName::from_static("l5d-dst-override");

/// Where a request came from and what the edge decided about its headers.
pub(super) struct Forwarding {
    /// Appended to X-Forwarded-For (Envoy's use_remote_address).
    pub client: Option<IpAddr>,
    /// A trusted proxy in front (l7Depth > 0) keeps its X-Forwarded-Proto.
    pub trusted_proxy: bool,
    pub wire_tls: bool,
    /// The Host without its port, when `strip_matching_host_port` removed
    /// it: Envoy rewrites the header itself, not only what it matches.
    pub stripped_host: Option<HeaderValue>,
    /// The x-forwarded-client-cert the Module's mode leaves, in place of
    /// every line the client sent.
    pub client_cert: Option<HeaderValue>,
    pub underscores: UnderscoreAction,
}

/// Rebuilds the client's request head as Envoy's connection manager
/// leaves it before any filter runs, so that every filter, the authorizer
/// and the upstream see one request: the client appended to
/// X-Forwarded-For, X-Forwarded-Proto set, the Host without a stripped
/// port, x-forwarded-client-cert as the Module's mode has it, and none of
/// the headers that only the gateway or a mesh sidecar may set when the
/// client sent them (`x-envoy-*`, `l5d-dst-override`, and the spellings
/// of the gateway's headers with `_`, which CGI-style servers read as the
/// same name). With room for what the gateway adds later and without
/// Pingora's record of how the client spelled each name.
///
/// Pingora sizes an HTTP/1 request's header map to exactly the headers
/// received and keeps a second map with each name's spelling. Every header
/// added afterwards grew and rehashed both maps, here and again in the copy
/// Pingora makes for the upstream: six grows per request in `bench/profile`.
/// Envoy sends header names in lower case, so the spelling map bought
/// nothing an Emissary user relies on.
pub(super) fn forward_request(header: &mut RequestHeader, from: &Forwarding) -> Result<()> {
    let mut headers = HeaderMap::with_capacity(header.headers.len() + 3 + ADDED_HEADERS);
    // Every line the client sent, as one list, then the client; as bytes,
    // so a line that is not text keeps its place in the list.
    let mut forwarded_for = from.client.map(|_| Vec::with_capacity(64));
    let mut proto_kept = false;
    for (name, value) in &header.headers {
        if *name == X_FORWARDED_FOR {
            if let Some(list) = forwarded_for.as_mut() {
                list.extend_from_slice(value.as_bytes());
                list.extend_from_slice(b", ");
                continue;
            }
        } else if *name == X_FORWARDED_PROTO {
            if !from.trusted_proxy {
                continue;
            }
            proto_kept = true;
        } else if (*name == HOST && from.stripped_host.is_some())
            || *name == XFCC
            || edge_only(name.as_str(), from.underscores)
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if let (Some(mut list), Some(ip)) = (forwarded_for, from.client) {
        push_ip(&mut list, ip);
        let value = HeaderValue::from_bytes(&list)
            .or_err(ErrorType::InvalidHTTPHeader, "X-Forwarded-For")?;
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    if !proto_kept {
        let proto = if from.wire_tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if let Some(host) = &from.stripped_host {
        headers.insert(HOST, host.clone());
    }
    if let Some(client_cert) = &from.client_cert {
        headers.insert(XFCC.clone(), client_cert.clone());
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = header.method.clone();
    parts.uri = header.uri.clone();
    parts.version = header.version;
    parts.headers = headers;
    parts.extensions = std::mem::take(header.extensions_mut());
    let mut rebuilt = RequestHeader::from(parts);
    // Only a target the URI cannot reproduce (absolute-form, not UTF-8)
    // differs, and it is kept verbatim as Pingora kept it.
    if rebuilt.raw_path() != header.raw_path() {
        rebuilt.set_raw_path(header.raw_path())?;
    }
    if let Some(end_stream) = header.send_end_stream() {
        rebuilt.set_send_end_stream(end_stream);
    }
    *header = rebuilt;
    Ok(())
}

/// Whether a client's header is one that only the gateway or a mesh
/// sidecar may set, or a name with `_` the Module drops. Names are lower
/// case.
fn edge_only(name: &str, underscores: UnderscoreAction) -> bool {
    if name.starts_with("x-envoy-") || name == L5D_DST_OVERRIDE.as_str() {
        return true;
    }
    if !name.contains('_') {
        return false;
    }
    underscores == UnderscoreAction::DropHeader || is_owned_spelling(name)
}

/// The headers whose meaning the gateway decides, in the spelling an
/// upstream may fold `_` into.
static OWNED: [&HeaderName; 5] = [
    &XFCC,
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &crate::filters::request_id::HEADER,
    &L5D_DST_OVERRIDE,
];

/// Whether a name with `_` reads as one of the gateway's headers once
/// `_` is read as `-`.
fn is_owned_spelling(name: &str) -> bool {
    let same = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
    };
    let name = name.as_bytes();
    OWNED
        .iter()
        .any(|owned| same(name, owned.as_str().as_bytes()))
        || name.get(..8).is_some_and(|head| same(head, b"x-envoy-"))
}

/// `http://` or `https://` (in any case) and an authority: the
/// absolute-form a proxy receives (RFC 9112 §3.2.2).
fn is_http_absolute_form(target: &[u8]) -> bool {
    let rest = match target.iter().position(|b| *b == b':') {
        Some(colon) if target[..colon].eq_ignore_ascii_case(b"http") => &target[colon..],
        Some(colon) if target[..colon].eq_ignore_ascii_case(b"https") => &target[colon..],
        _ => return false,
    };
    rest.starts_with(b"://") && rest.len() > 3
}

/// What x-forwarded-client-cert the upstream gets for the Module's mode:
/// the client's lines (as one list) only where the mode trusts them, the
/// gateway's view of a verified client certificate where it adds one.
/// Lines that are not text are never forwarded.
pub(super) fn client_cert_header(
    policy: &XfccPolicy,
    headers: &HeaderMap,
    peer: Option<&PeerCert>,
) -> Option<HeaderValue> {
    if !policy.sends_any(peer.is_some()) {
        return None;
    }
    let mut lines = headers
        .get_all(&XFCC)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    let from_client = lines
        .peek()
        .is_some()
        .then(|| lines.collect::<Vec<_>>().join(","));
    let value = policy.header(from_client.as_deref(), peer)?;
    HeaderValue::try_from(value).ok()
}

/// Puts the canonical path (`routing::path`) into the request head, so
/// that everything after it reads that one form. An origin-form target
/// that is canonical already, and text, is left alone: the common case
/// allocates nothing. An absolute-form target (`http://host/path`) always
/// becomes origin-form, so no upstream reads a path out of it that the
/// gateway did not route; any other form is refused, as Envoy refuses it
/// (Pingora routes `foo:/admin` or `admin` as `/` but would send them as
/// they came). Bytes outside ASCII in the query are escaped too, as the
/// URI Pingora built for a target that was not UTF-8 is only a lossy
/// reading.
pub(super) fn canonicalize_target(
    header: &mut RequestHeader,
    options: PathOptions,
) -> std::result::Result<(), PathError> {
    let raw = header.raw_path();
    let query_start = raw.iter().position(|b| *b == b'?');
    let origin_form = raw.first() == Some(&b'/');
    let path = if origin_form {
        &raw[..query_start.unwrap_or(raw.len())]
    } else if is_http_absolute_form(raw) {
        // The URI holds its path alone.
        header.uri.path().as_bytes()
    } else {
        return Err(PathError::NotAbsolute);
    };
    let canonical = canonicalize(path, options)?;
    if origin_form && matches!(canonical, Cow::Borrowed(_)) && header.raw_path_is_utf8() {
        return Ok(());
    }
    let mut target = canonical.into_owned();
    if let Some(start) = query_start {
        target.push('?');
        for &byte in &raw[start + 1..] {
            if byte.is_ascii() {
                target.push(char::from(byte));
            } else {
                push_escaped(&mut target, byte);
            }
        }
    }
    let mut parts = header.uri.clone().into_parts();
    parts.path_and_query =
        Some(http::uri::PathAndQuery::try_from(target).map_err(|_| PathError::BadCharacter)?);
    let uri = http::Uri::from_parts(parts).map_err(|_| PathError::BadCharacter)?;
    header.set_uri(uri);
    Ok(())
}

static UPSTREAM_SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");

/// The same for the upstream's response head on its way to the client:
/// x-envoy-upstream-service-time (unless suppressed) goes straight into the
/// map, with room for Server, Set-Cookie and a route's own. A response can
/// be taken apart, so nothing is copied.
pub(super) fn forward_response(
    header: &mut ResponseHeader,
    service_time: Option<HeaderValue>,
) -> Result<()> {
    let reason = header
        .get_reason_phrase()
        .filter(|reason| Some(*reason) != header.status.canonical_reason())
        .map(str::to_owned);
    let blank = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(header, blank));
    parts.headers.reserve(ADDED_HEADERS);
    if let Some(millis) = service_time {
        parts.headers.insert(UPSTREAM_SERVICE_TIME.clone(), millis);
    }
    *header = ResponseHeader::from(parts);
    header.set_reason_phrase(reason.as_deref())
}

/// Appends an address; IPv4 by hand, because `Display` for `Ipv4Addr`
/// formats into a padded buffer first and costs more than the rest of
/// X-Forwarded-For (the profile in BENCHMARKS.md shows it).
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    use std::io::Write;
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// Request and response headers, edited alike.
pub(super) trait EditableHeaders {
    fn remove(&mut self, name: &HeaderName) -> bool;
    fn set(&mut self, name: HeaderName, value: HeaderValue, append: bool) -> Result<()>;
}

/// Pingora's request and response headers share these methods without a
/// common trait.
macro_rules! editable_headers {
    ($($header:ty),*) => {$(
        impl EditableHeaders for $header {
            fn remove(&mut self, name: &HeaderName) -> bool {
                self.remove_header(name).is_some()
            }
            fn set(&mut self, name: HeaderName, value: HeaderValue, append: bool) -> Result<()> {
                if append {
                    self.append_header(name, value).map(drop)
                } else {
                    self.insert_header(name, value)
                }
            }
        }
    )*};
}
editable_headers!(RequestHeader, ResponseHeader);

/// Removes, then adds, as Envoy evaluates a route's header edits. The
/// facts templates read are gathered only for a route that has edits.
pub(super) fn apply_edits<'s>(
    edits: &HeaderEdits,
    facts: impl FnOnce() -> RequestFacts<'s>,
    target: &mut impl EditableHeaders,
) -> Result<()> {
    if edits.is_empty() {
        return Ok(());
    }
    let facts = facts();
    for name in &edits.remove {
        while target.remove(name) {}
    }
    for header in &edits.add {
        if let Some(value) = header.value.render(&facts) {
            target.set(header.name.clone(), value, header.append)?;
        }
    }
    Ok(())
}

/// The hop-by-hop headers of RFC 9110 §7.6.1 and their widespread kin,
/// besides `Connection` and `Upgrade`.
const HOP_BY_HOP: [HeaderName; 7] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
];

/// The head of an upgrade other than WebSocket, as Envoy forwards one:
/// `Upgrade` and `Connection: upgrade` cross the hop; the other hop-by-hop
/// headers, and those the client's `Connection` names, do not.
pub(super) fn keep_only_the_upgrade(head: &mut RequestHeader) -> pingora::Result<()> {
    let nominated: Vec<HeaderName> = head
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| *name != http::header::UPGRADE)
        .collect();
    for name in nominated.iter().chain(&HOP_BY_HOP) {
        head.remove_header(name);
    }
    head.insert_header(http::header::CONNECTION, "upgrade")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_display_does() {
        let addresses = [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ];
        for text in addresses {
            let mut out = b"x, ".to_vec();
            push_ip(&mut out, text.parse().unwrap());
            assert_eq!(out, format!("x, {text}").as_bytes());
        }
    }

    fn http1_request(target: &[u8], headers: &[(&'static str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", target, Some(headers.len())).unwrap();
        for (name, value) in headers {
            request.append_header(*name, *value).unwrap();
        }
        request
    }

    fn from_client(trusted_proxy: bool, wire_tls: bool) -> Forwarding {
        Forwarding {
            client: Some("10.0.0.9".parse().unwrap()),
            trusted_proxy,
            wire_tls,
            stripped_host: None,
            client_cert: None,
            underscores: UnderscoreAction::Allow,
        }
    }

    fn wire(request: &RequestHeader) -> String {
        let mut wire = Vec::new();
        request.header_to_h1_wire(&mut wire);
        String::from_utf8(wire).unwrap()
    }

    #[test]
    fn the_client_is_appended_and_no_other_line_lost() {
        let mut request = http1_request(
            b"/a/b?c=d",
            &[
                ("Host", "example.com"),
                ("X-Forwarded-For", "1.1.1.1"),
                ("X-Dup", "1"),
                ("X-Forwarded-For", "2.2.2.2, 3.3.3.3"),
                ("X-Dup", "2"),
                ("X-Forwarded-Proto", "https"),
            ],
        );
        forward_request(&mut request, &from_client(false, false)).unwrap();
        assert!(!request.has_case());
        assert!(request.headers.capacity() >= request.headers.len() + ADDED_HEADERS);
        assert_eq!(request.raw_path(), b"/a/b?c=d");
        // Pingora spells the names it knows its own way, the rest as stored;
        // the client's X-Forwarded-Proto is not believed without l7Depth.
        assert_eq!(
            wire(&request),
            "Host: example.com\r\nx-dup: 1\r\nx-dup: 2\r\n\
             x-forwarded-for: 1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9\r\n\
             x-forwarded-proto: http\r\n"
        );
    }

    #[test]
    fn headers_only_the_gateway_sets_never_pass() {
        let sent = [
            ("X-Envoy-Original-Path", "/admin"),
            ("x-envoy-retry-on", "5xx"),
            ("l5d-dst-override", "evil:80"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("X_Forwarded_Client_Cert", "Hash=evil"),
            ("x_forwarded_proto", "https"),
            ("X_Request_Id", "forged"),
            ("L5d_Dst_Override", "evil:80"),
            ("X_Envoy_Anything", "1"),
            ("x-forwarded-client-cert", "Hash=evil"),
            ("X_Custom", "1"),
            ("x_forwarded_forx", "1"),
        ];
        let names = |underscores| {
            let mut request = http1_request(b"/", &sent);
            let from = Forwarding {
                underscores,
                ..from_client(false, false)
            };
            forward_request(&mut request, &from).unwrap();
            let mut names: Vec<_> = request
                .headers
                .keys()
                .map(|n| n.as_str().to_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(UnderscoreAction::Allow),
            [
                "x-forwarded-for",
                "x-forwarded-proto",
                "x_custom",
                "x_forwarded_forx"
            ]
        );
        assert_eq!(
            names(UnderscoreAction::DropHeader),
            ["x-forwarded-for", "x-forwarded-proto"]
        );
    }

    #[test]
    fn the_client_cert_header_replaces_every_line_the_client_sent() {
        let mut request =
            http1_request(b"/", &[("x-forwarded-client-cert", "By=a;URI=spiffe://ok")]);
        let forged = HeaderValue::from_bytes(b"Hash=x;URI=spiffe://evil\xff").unwrap();
        request
            .append_header("x-forwarded-client-cert", forged)
            .unwrap();
        let sanitize = XfccPolicy::default();
        let always = XfccPolicy {
            mode: crate::routing::xfcc::XfccMode::AlwaysForwardOnly,
            ..XfccPolicy::default()
        };
        assert_eq!(client_cert_header(&sanitize, &request.headers, None), None);
        let forwarded = client_cert_header(&always, &request.headers, None);
        assert_eq!(forwarded.as_ref().unwrap(), "By=a;URI=spiffe://ok");
        for client_cert in [None, forwarded] {
            let mut request = request.clone();
            let from = Forwarding {
                client_cert: client_cert.clone(),
                ..from_client(false, false)
            };
            forward_request(&mut request, &from).unwrap();
            let lines: Vec<_> = request.headers.get_all(&XFCC).iter().cloned().collect();
            assert_eq!(lines, client_cert.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_non_canonical_or_lossy_target_is_rewritten_in_place() {
        let options = PathOptions::default();
        let mut request = http1_request(b"/a/../b/%2e%2e/c?q=%2e\xff", &[]);
        canonicalize_target(&mut request, options).unwrap();
        assert_eq!(request.raw_path(), b"/c?q=%2e%FF");
        assert_eq!(request.uri.path(), "/c");

        // Absolute-form always becomes origin-form.
        for target in [
            &b"http://example.com/x/../y?z"[..],
            b"HTTPS://example.com/y?z",
        ] {
            let mut request = http1_request(target, &[]);
            canonicalize_target(&mut request, options).unwrap();
            assert_eq!(request.raw_path(), b"/y?z");
        }

        // Canonical already: untouched.
        let mut request = http1_request(b"/a/b?c=%2e", &[]);
        canonicalize_target(&mut request, options).unwrap();
        assert_eq!(request.raw_path(), b"/a/b?c=%2e");

        // Targets Pingora keeps as they came but routes as `/`.
        for target in [
            &b"foo:/admin/users"[..],
            b"admin/users",
            b"ht_tp:/admin",
            b"?x",
            b"*",
        ] {
            let mut request = http1_request(target, &[]);
            assert_eq!(
                canonicalize_target(&mut request, options),
                Err(PathError::NotAbsolute),
                "{}",
                String::from_utf8_lossy(target)
            );
        }
        let mut request = http1_request(b"/a/..;/b", &[]);
        assert_eq!(
            canonicalize_target(&mut request, options),
            Err(PathError::HiddenDotSegment)
        );
    }

    #[test]
    fn a_trusted_proxy_keeps_its_proto_and_the_wire_fills_a_gap() {
        let mut request = http1_request(b"/", &[("X-Forwarded-Proto", "https")]);
        forward_request(&mut request, &from_client(true, false)).unwrap();
        assert_eq!(request.headers["x-forwarded-proto"], "https");
        let mut request = http1_request(b"/", &[]);
        forward_request(&mut request, &from_client(true, true)).unwrap();
        assert_eq!(request.headers["x-forwarded-proto"], "https");
        assert_eq!(request.headers["x-forwarded-for"], "10.0.0.9");
    }

    #[test]
    fn without_a_client_address_x_forwarded_for_is_left_as_sent() {
        let mut request = http1_request(b"/", &[("X-Forwarded-For", "1.1.1.1")]);
        let from = Forwarding {
            client: None,
            ..from_client(false, false)
        };
        forward_request(&mut request, &from).unwrap();
        assert_eq!(request.headers["x-forwarded-for"], "1.1.1.1");
    }

    #[test]
    fn a_stripped_port_leaves_the_host_header() {
        let mut request = http1_request(b"/", &[("Host", "example.com:8080")]);
        let from = Forwarding {
            stripped_host: Some(HeaderValue::from_static("example.com")),
            ..from_client(false, false)
        };
        forward_request(&mut request, &from).unwrap();
        let hosts: Vec<_> = request.headers.get_all(HOST).iter().collect();
        assert_eq!(hosts, ["example.com"]);
    }

    #[test]
    fn a_target_the_uri_cannot_hold_survives() {
        for target in [&b"http://example.com/x?y"[..], b"/caf\xc3\xa9/\xff"] {
            let mut request = http1_request(target, &[("Host", "example.com")]);
            let before = request.raw_path().to_vec();
            forward_request(&mut request, &from_client(false, false)).unwrap();
            assert_eq!(request.raw_path(), before);
        }
    }

    #[test]
    fn a_response_keeps_its_headers_and_reason() {
        let mut response = ResponseHeader::build(299, Some(2)).unwrap();
        response.append_header("Set-Cookie", "a=1").unwrap();
        response.append_header("Set-Cookie", "b=2").unwrap();
        response.set_reason_phrase(Some("Fine Anyway")).unwrap();
        forward_response(&mut response, Some(HeaderValue::from(7))).unwrap();
        assert!(!response.has_case());
        assert!(response.headers.capacity() >= 2 + ADDED_HEADERS);
        assert_eq!(response.status, 299);
        assert_eq!(response.get_reason_phrase(), Some("Fine Anyway"));
        let cookies: Vec<_> = response.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(response.headers["x-envoy-upstream-service-time"], "7");
    }
}
