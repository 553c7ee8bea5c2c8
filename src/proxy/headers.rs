//! The headers the gateway itself adds to and edits in a request or a
//! response, and the room they need.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use crate::filters::ip::X_FORWARDED_FOR;
use crate::routing::headers::{HeaderEdits, RequestFacts};

/// Room for what is added later without growing the map: x-request-id,
/// x-envoy-expected-rq-timeout-ms, x-envoy-original-path, and a few of a
/// route's or a filter's own.
const ADDED_HEADERS: usize = 8;

pub(super) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// As the client sent it, or the gateway makes it (Module
/// `forward_client_cert_details`).
pub(super) static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// Where a request came from, for X-Forwarded-For and -Proto.
pub(super) struct Forwarding {
    /// Appended to X-Forwarded-For (Envoy's use_remote_address).
    pub client: Option<IpAddr>,
    /// A trusted proxy in front (l7Depth > 0) keeps its X-Forwarded-Proto.
    pub trusted_proxy: bool,
    pub wire_tls: bool,
    /// The Host without its port, when `strip_matching_host_port` removed
    /// it: Envoy rewrites the header itself, not only what it matches.
    pub stripped_host: Option<HeaderValue>,
}

/// Rebuilds the client's request head as Envoy's connection manager
/// leaves it before any filter runs (an authorizer sees the client in
/// X-Forwarded-For, and the Host without a stripped port), with room for what the gateway adds later and
/// without Pingora's record of how the client spelled each name.
///
/// Pingora sizes an HTTP/1 request's header map to exactly the headers
/// received and keeps a second map with each name's spelling. Every header
/// added afterwards grew and rehashed both maps, here and again in the copy
/// Pingora makes for the upstream: six grows per request in `bench/profile`.
/// Envoy sends header names in lower case, so the spelling map bought
/// nothing an Emissary user relies on.
pub(super) fn forward_request(header: &mut RequestHeader, from: &Forwarding) -> Result<()> {
    let mut headers = HeaderMap::with_capacity(header.headers.len() + 2 + ADDED_HEADERS);
    // Every line the client sent, as one list, then the client.
    let mut forwarded_for = from.client.map(|_| String::with_capacity(64));
    let mut proto_kept = false;
    for (name, value) in &header.headers {
        if *name == X_FORWARDED_FOR {
            if let Some(list) = forwarded_for.as_mut() {
                if let Ok(text) = value.to_str() {
                    list.push_str(text);
                    list.push_str(", ");
                }
                continue;
            }
        } else if *name == X_FORWARDED_PROTO {
            if !from.trusted_proxy {
                continue;
            }
            proto_kept = true;
        } else if *name == HOST && from.stripped_host.is_some() {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    if let (Some(mut list), Some(ip)) = (forwarded_for, from.client) {
        push_ip(&mut list, ip);
        let value =
            HeaderValue::try_from(list).or_err(ErrorType::InvalidHTTPHeader, "X-Forwarded-For")?;
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    if !proto_kept {
        let proto = if from.wire_tls { "https" } else { "http" };
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if let Some(host) = &from.stripped_host {
        headers.insert(HOST, host.clone());
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
fn push_ip(out: &mut String, ip: IpAddr) {
    use std::fmt::Write;
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
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
            let mut out = String::from("x, ");
            push_ip(&mut out, text.parse().unwrap());
            assert_eq!(out, format!("x, {text}"));
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
            trusted_proxy: false,
            wire_tls: false,
            stripped_host: None,
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
