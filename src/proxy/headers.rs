//! The headers the gateway itself adds to and edits in a request or a
//! response, and the room they need.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;

use crate::filters::ip::X_FORWARDED_FOR;
use crate::routing::headers::{HeaderEdits, RequestFacts};

/// Room for what is added on the way upstream without growing the map:
/// x-request-id, X-Forwarded-For and -Proto, x-envoy-expected-rq-timeout-ms,
/// x-envoy-original-path, and a few of a route's or a filter's own.
const ADDED_HEADERS: usize = 8;

/// Rebuilds the client's request head with room for the headers the
/// gateway adds, and without Pingora's record of how the client spelled
/// each name.
///
/// Pingora sizes an HTTP/1 request's header map to exactly the headers
/// received and keeps a second map with each name's spelling. Every header
/// added afterwards grew and rehashed both maps, here and again in the copy
/// Pingora makes for the upstream: six grows per request in `bench/profile`.
/// Envoy sends header names in lower case, so the spelling map bought
/// nothing an Emissary user relies on.
pub(super) fn make_room(header: &mut RequestHeader) -> Result<()> {
    let spare = header.headers.capacity() - header.headers.len();
    if !header.has_case() && spare >= ADDED_HEADERS {
        return Ok(());
    }
    let mut headers = HeaderMap::with_capacity(header.headers.len() + ADDED_HEADERS);
    for (name, value) in &header.headers {
        headers.append(name.clone(), value.clone());
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = header.method.clone();
    parts.uri = header.uri.clone();
    parts.version = header.version;
    parts.headers = headers;
    parts.extensions = std::mem::take(header.extensions_mut());
    let mut roomy = RequestHeader::from(parts);
    // Only a target the URI cannot reproduce (absolute-form, not UTF-8)
    // differs, and it is kept verbatim as Pingora kept it.
    if roomy.raw_path() != header.raw_path() {
        roomy.set_raw_path(header.raw_path())?;
    }
    if let Some(end_stream) = header.send_end_stream() {
        roomy.set_send_end_stream(end_stream);
    }
    *header = roomy;
    Ok(())
}

/// X-Forwarded-For gets the client appended (Envoy's use_remote_address);
/// X-Forwarded-Proto keeps a trusted proxy's value (`l7_depth` > 0), else
/// names the wire protocol.
pub(super) fn forwarded_headers(
    upstream: &mut RequestHeader,
    client: Option<IpAddr>,
    l7_depth: u32,
    wire_tls: bool,
) {
    if let Some(ip) = client {
        // Every line the client sent, as one list, then the client: the
        // insert replaces them all.
        let mut value = String::with_capacity(64);
        for line in upstream.headers.get_all(X_FORWARDED_FOR) {
            if let Ok(text) = line.to_str() {
                value.push_str(text);
                value.push_str(", ");
            }
        }
        push_ip(&mut value, ip);
        let _ = upstream.insert_header(X_FORWARDED_FOR, value);
    }
    if l7_depth == 0 || upstream.headers.get("x-forwarded-proto").is_none() {
        let proto = if wire_tls { "https" } else { "http" };
        let _ = upstream.insert_header("x-forwarded-proto", proto);
    }
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

/// Removes, then adds, as Envoy evaluates a route's header edits.
pub(super) fn apply_edits(
    edits: &HeaderEdits,
    facts: &RequestFacts,
    target: &mut impl EditableHeaders,
) -> Result<()> {
    for name in &edits.remove {
        while target.remove(name) {}
    }
    for header in &edits.add {
        if let Some(value) = header.value.render(facts) {
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

    #[test]
    fn room_is_made_without_losing_a_header_line_or_the_target() {
        let mut request = http1_request(
            b"/a/b?c=d",
            &[("Host", "example.com"), ("X-Dup", "1"), ("X-Dup", "2")],
        );
        make_room(&mut request).unwrap();
        assert!(!request.has_case());
        assert!(request.headers.capacity() >= 3 + ADDED_HEADERS);
        assert_eq!(request.raw_path(), b"/a/b?c=d");
        assert_eq!(request.headers["host"], "example.com");
        let dups: Vec<_> = request.headers.get_all("x-dup").iter().collect();
        assert_eq!(dups, ["1", "2"]);
        let mut wire = Vec::new();
        request.header_to_h1_wire(&mut wire);
        // Pingora spells the names it knows its own way, the rest as stored.
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "Host: example.com\r\nx-dup: 1\r\nx-dup: 2\r\n"
        );
    }

    #[test]
    fn a_target_the_uri_cannot_hold_survives() {
        for target in [&b"http://example.com/x?y"[..], b"/caf\xc3\xa9/\xff"] {
            let mut request = http1_request(target, &[("Host", "example.com")]);
            let before = request.raw_path().to_vec();
            make_room(&mut request).unwrap();
            assert_eq!(request.raw_path(), before);
        }
    }

    #[test]
    fn a_roomy_request_is_left_alone() {
        let mut request = RequestHeader::build_no_case("GET", b"/", Some(64)).unwrap();
        request.insert_header("host", "example.com").unwrap();
        let roomy = request.headers.capacity();
        make_room(&mut request).unwrap();
        assert_eq!(request.headers.capacity(), roomy, "rebuilt, so shrunk");
    }
}
