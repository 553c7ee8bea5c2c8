//! The canonical request path. Every decision about a request (Host
//! policy, route, FilterPolicy, authorizer, filters, access log) and the
//! upstream see this one form, so a path cannot mean one thing to the
//! gateway and another to the service behind it.
//!
//! As Envoy's connection manager does with `normalize_path`: escapes of
//! unreserved characters are decoded (RFC 3986 §6.2.2.2) and the others
//! written in upper case (§6.2.2.1), dot segments are removed (§5.2.4),
//! and `//` collapses when the Module's `merge_slashes` asks. Bytes outside
//! ASCII are escaped, so the path is text. What an upstream could still
//! read as a dot segment after the gateway has removed them is refused
//! instead of guessed at: a raw backslash (not a URI character, but a
//! separator to Windows servers and some frameworks), a segment that is
//! `.` or `..` once its `;` parameters are dropped (Tomcat, Jetty and
//! Spring drop them), and one that becomes `.` or `..` when `%2F`, `%5C`
//! or `%3B` is decoded. Other escaped slashes pass as they are, as in
//! Emissary, unless `reject_requests_with_escaped_slashes` is set.

use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (`OPTIONS *`, an authority).
    NotAbsolute,
    /// `%2F` or `%5C` with `reject_requests_with_escaped_slashes`.
    EscapedSlash,
    /// A raw `\`.
    Backslash,
    /// `%` not followed by two hexadecimal digits.
    BadEscape,
    /// A control character or a space.
    BadCharacter,
    /// A segment that an upstream could read as `.` or `..` although the
    /// gateway does not: `..;x`, `..%2F`, `%2E%2E%5C`...
    HiddenDotSegment,
}

impl PathError {
    /// A short tag for the access log and the local-reply metric.
    pub fn reason(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "bad_path",
            PathError::EscapedSlash => "escaped_slash",
            PathError::Backslash => "path_backslash",
            PathError::BadEscape => "path_bad_escape",
            PathError::BadCharacter => "path_bad_character",
            PathError::HiddenDotSegment => "path_hidden_dot_segment",
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request target is not a path",
            PathError::EscapedSlash => "escaped slashes are not allowed in the path",
            PathError::Backslash => "a backslash is not allowed in the path",
            PathError::BadEscape => "the path holds a % that starts no escape",
            PathError::BadCharacter => "the path holds a control character or a space",
            PathError::HiddenDotSegment => {
                "the path holds a segment that servers may read as . or .."
            }
        })
    }
}

/// The Module's path settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathOptions {
    pub merge_slashes: bool,
    pub reject_escaped_slashes: bool,
}

/// The canonical form of a request path (the target up to its `?`). A path
/// that is canonical already is borrowed: the common case costs one scan.
pub fn canonicalize(path: &[u8], options: PathOptions) -> Result<Cow<'_, str>, PathError> {
    if path.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(path, options.merge_slashes) {
        // Only ASCII passed the scan.
        if let Ok(text) = std::str::from_utf8(path) {
            return Ok(Cow::Borrowed(text));
        }
    }
    let canonical = rebuild(path, options)?;
    Ok(match std::str::from_utf8(path) {
        Ok(text) if text == canonical => Cow::Borrowed(text),
        _ => Cow::Owned(canonical),
    })
}

/// The quick test, one pass: printable ASCII without escapes or
/// backslashes, no segment that is or hides a dot segment, no `//` to
/// merge.
fn is_canonical(path: &[u8], merge_slashes: bool) -> bool {
    let mut segment_start = 1;
    for (i, &byte) in path.iter().enumerate().skip(1) {
        match byte {
            b'/' => {
                let segment = &path[segment_start..i];
                if (merge_slashes && segment.is_empty()) || names_a_dot_segment(segment) {
                    return false;
                }
                segment_start = i + 1;
            }
            b'%' | b'\\' => return false,
            0x21..=0x7e => {}
            _ => return false,
        }
    }
    !names_a_dot_segment(&path[segment_start..])
}

/// `.` or `..`, with `;` parameters or without.
fn names_a_dot_segment(segment: &[u8]) -> bool {
    if segment.first() != Some(&b'.') {
        return false;
    }
    let name = segment.split(|b| *b == b';').next().unwrap_or_default();
    name == b"." || name == b".."
}

fn rebuild(path: &[u8], options: PathOptions) -> Result<String, PathError> {
    let mut kept: Vec<String> = Vec::new();
    // A path ending in `.` or `..` names a directory (RFC 3986 §5.2.4).
    let mut ends_in_directory = false;
    let mut segments = path[1..].split(|b| *b == b'/').peekable();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let segment = canonical_segment(raw)?;
        if options.reject_escaped_slashes && has_escaped_slash(&segment) {
            return Err(PathError::EscapedSlash);
        }
        match segment.as_str() {
            "." => ends_in_directory = last,
            ".." => {
                kept.pop();
                ends_in_directory = last;
            }
            _ if hides_dot_segment(&segment) => return Err(PathError::HiddenDotSegment),
            _ => kept.push(segment),
        }
    }
    // Envoy merges slashes after removing dot segments: `/a//../b` is
    // `/a/b`, not `/b`.
    if options.merge_slashes {
        if kept.last().is_some_and(String::is_empty) {
            ends_in_directory = true;
        }
        kept.retain(|segment| !segment.is_empty());
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || (ends_in_directory && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(out)
}

/// One segment with unreserved escapes decoded, other escapes in upper
/// case and bytes outside ASCII escaped.
fn canonical_segment(raw: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(raw.len());
    let mut bytes = raw.iter().copied();
    while let Some(byte) = bytes.next() {
        match byte {
            b'%' => {
                let (Some(high), Some(low)) = (
                    bytes.next().and_then(hex_value),
                    bytes.next().and_then(hex_value),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let decoded = high << 4 | low;
                if is_unreserved(decoded) {
                    out.push(char::from(decoded));
                } else {
                    push_escaped(&mut out, decoded);
                }
            }
            b'\\' => return Err(PathError::Backslash),
            0x80.. => push_escaped(&mut out, byte),
            0..=0x20 | 0x7f => return Err(PathError::BadCharacter),
            _ => out.push(char::from(byte)),
        }
    }
    Ok(out)
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte).to_digit(16).map(|digit| digit as u8)
}

/// Appends `%XX`, hex digits in upper case (RFC 3986 §6.2.2.1).
pub(crate) fn push_escaped(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// RFC 3986 §2.3.
pub(crate) fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Whether a canonical segment that is not itself `.` or `..` holds one
/// that an upstream may see: after decoding `%2F` or `%5C` into
/// separators, or dropping `;` parameters (also when escaped as `%3B`).
fn hides_dot_segment(segment: &str) -> bool {
    segment
        .split("%2F")
        .flat_map(|piece| piece.split("%5C"))
        .any(|piece| {
            let name = piece.split(';').next().unwrap_or_default();
            let name = name.split("%3B").next().unwrap_or_default();
            name == "." || name == ".."
        })
}

/// Escapes are in upper case by then.
fn has_escaped_slash(segment: &str) -> bool {
    segment.contains("%2F") || segment.contains("%5C")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(path: &str, merge_slashes: bool) -> Result<String, PathError> {
        let options = PathOptions {
            merge_slashes,
            reject_escaped_slashes: false,
        };
        canonicalize(path.as_bytes(), options).map(Cow::into_owned)
    }

    fn c(path: &str) -> String {
        with(path, false).unwrap()
    }

    #[test]
    fn dot_segments() {
        assert_eq!(c("/need-normalization/../svc/"), "/svc/");
        assert_eq!(c("/a/./b/../c"), "/a/c");
        assert_eq!(c("/.."), "/");
        assert_eq!(c("/a/.."), "/");
        assert_eq!(c("/a/b/."), "/a/b/");
        assert_eq!(c("/a/b/.."), "/a/");
        assert_eq!(c("/a//.."), "/a/");
        assert_eq!(c("/plain/path"), "/plain/path");
        assert_eq!(c("/.well-known/x"), "/.well-known/x");
        assert_eq!(c("/..a/...b/.c;d"), "/..a/...b/.c;d");
    }

    #[test]
    fn unreserved_escapes_are_decoded_the_rest_upper_cased() {
        assert_eq!(c("/%2e%2e/admin"), "/admin");
        assert_eq!(c("/public/.%2e/admin"), "/admin");
        assert_eq!(c("/public/%2E%2E/admin"), "/admin");
        assert_eq!(c("/public/%2e/x"), "/public/x");
        assert_eq!(c("/%61%62%7E%5f"), "/ab~_");
        assert_eq!(c("/a%20b/%c3%a9"), "/a%20b/%C3%A9");
        assert_eq!(c("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(c("/a%2fb"), "/a%2Fb");
        // An escaped `%` is data, not the start of another escape.
        assert_eq!(c("/%252e%252e/x"), "/%252e%252e/x");
    }

    #[test]
    fn what_an_upstream_could_read_as_a_dot_segment_is_refused() {
        for path in [
            "/public/..;/admin",
            "/public/..;x=1/admin",
            "/public/.;/admin",
            "/public/..%3b/admin",
            "/public/..%2fadmin",
            "/public/%2e%2e%2fadmin",
            "/public/x%2f..%2fadmin",
            "/public/..%5cadmin",
            "/public/%2e%2e%5Cadmin",
            "/public/a%2F.",
        ] {
            assert_eq!(
                with(path, false),
                Err(PathError::HiddenDotSegment),
                "{path}"
            );
        }
        assert_eq!(with("/public\\..\\admin", false), Err(PathError::Backslash));
        assert_eq!(with("/a\\b", false), Err(PathError::Backslash));
        assert_eq!(with("/a%zz", false), Err(PathError::BadEscape));
        assert_eq!(with("/a%2", false), Err(PathError::BadEscape));
        assert_eq!(with("/a b", false), Err(PathError::BadCharacter));
        assert_eq!(with("*", false), Err(PathError::NotAbsolute));
        assert_eq!(with("", false), Err(PathError::NotAbsolute));
        // Parameters on ordinary segments and escaped slashes between
        // ordinary names are data.
        assert_eq!(c("/a;jsessionid=1/b;v=2"), "/a;jsessionid=1/b;v=2");
        assert_eq!(c("/svc/%2F200"), "/svc/%2F200");
        assert_eq!(c("/a/...%2Fb"), "/a/...%2Fb");
    }

    #[test]
    fn slashes() {
        assert_eq!(c("//svc/status"), "//svc/status");
        assert_eq!(with("//svc//status/", true).unwrap(), "/svc/status/");
        assert_eq!(with("/a//../b", true).unwrap(), "/a/b");
        assert_eq!(with("//", true).unwrap(), "/");
        let strict = PathOptions {
            merge_slashes: false,
            reject_escaped_slashes: true,
        };
        assert_eq!(
            canonicalize(b"/svc/%2F200", strict),
            Err(PathError::EscapedSlash)
        );
        assert_eq!(
            canonicalize(b"/svc/%5c", strict),
            Err(PathError::EscapedSlash)
        );
    }

    #[test]
    fn a_canonical_path_is_borrowed() {
        for path in ["/", "/a/b/", "/.well-known/acme-challenge/t", "/a%20b"] {
            let out = canonicalize(path.as_bytes(), PathOptions::default()).unwrap();
            assert!(matches!(out, Cow::Borrowed(_)), "{path}");
        }
    }

    #[test]
    fn bytes_outside_utf8_are_escaped() {
        let out = canonicalize(b"/a\xff/b", PathOptions::default()).unwrap();
        assert_eq!(out, "/a%FF/b");
    }

    /// An upstream that reads as much into a path as any server does:
    /// every escape decoded once, `\` as `/`, `;` parameters dropped, then
    /// dot segments resolved.
    fn read_by_a_lenient_upstream(path: &str) -> String {
        let mut decoded = Vec::new();
        let mut bytes = path.bytes();
        while let Some(byte) = bytes.next() {
            if byte == b'%' {
                let high = bytes.next().and_then(hex_value).unwrap_or(0);
                let low = bytes.next().and_then(hex_value).unwrap_or(0);
                decoded.push(high << 4 | low);
            } else {
                decoded.push(byte);
            }
        }
        let text = String::from_utf8_lossy(&decoded).replace('\\', "/");
        let mut kept: Vec<&str> = Vec::new();
        for segment in text.split('/').skip(1) {
            match segment.split(';').next().unwrap_or_default() {
                "." => {}
                ".." => {
                    kept.pop();
                }
                name => kept.push(name),
            }
        }
        format!("/{}", kept.join("/"))
    }

    fn spelling() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let pieces = prop::sample::select(vec![
            "/", "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%3b", "%3B", ";",
            ";x=1", "\\", "%", "%25", "%2", "a", "B", "%41", "~", " ", "\u{e9}", "%c3%a9", "?",
            "x",
        ]);
        prop::collection::vec(pieces, 0..14).prop_map(|pieces| pieces.concat())
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let mut path = b"/".to_vec();
            path.extend(bytes);
            for merge_slashes in [false, true] {
                let options = PathOptions { merge_slashes, reject_escaped_slashes: merge_slashes };
                let _ = canonicalize(&path, options);
            }
        }

        #[test]
        fn canonical_paths_are_fixed_points_without_dot_segments(
            tail in spelling(),
            merge_slashes in proptest::bool::ANY,
        ) {
            let options = PathOptions { merge_slashes, reject_escaped_slashes: false };
            let path = format!("/{tail}");
            if let Ok(canonical) = canonicalize(path.as_bytes(), options) {
                let again = canonicalize(canonical.as_bytes(), options).unwrap();
                proptest::prop_assert!(matches!(again, Cow::Borrowed(_)), "{path} -> {canonical}");
                proptest::prop_assert_eq!(&again, &canonical);
                proptest::prop_assert!(canonical.is_ascii());
                for segment in canonical.split('/') {
                    proptest::prop_assert!(segment != "." && segment != "..", "{path} -> {canonical}");
                }
            }
        }

        /// The attack on a `prefix: /static/public/` Mapping that rewrites
        /// to `/public/`: whatever follows the prefix, a path that still
        /// matches it once canonical stays under `/public/` for the
        /// upstream, however leniently the upstream reads it.
        #[test]
        fn a_matched_prefix_is_never_escaped(tail in spelling()) {
            let path = format!("/static/public/{tail}");
            if let Ok(canonical) = canonicalize(path.as_bytes(), PathOptions::default()) {
                if let Some(rest) = canonical.strip_prefix("/static/public/") {
                    let upstream = read_by_a_lenient_upstream(&format!("/public/{rest}"));
                    proptest::prop_assert!(
                        upstream.starts_with("/public/") || upstream == "/public",
                        "{path} -> {canonical} -> {upstream}"
                    );
                }
            }
        }
    }
}
