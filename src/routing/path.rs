//! Request path normalisation before matching (§2.1): dot segments are
//! always removed (RFC 3986 §5.2.4), `//` collapses with `merge_slashes`,
//! and escaped slashes can be refused.

use std::borrow::Cow;

#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C` with `reject_requests_with_escaped_slashes`.
    EscapedSlash,
    /// Not an origin-form path.
    NotAbsolute,
}

pub fn normalize(
    path: &str,
    merge_slashes: bool,
    reject_escaped_slashes: bool,
) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        // `OPTIONS *` and authority-form requests carry no path to route.
        return Err(PathError::NotAbsolute);
    }
    if reject_escaped_slashes && has_escaped_slash(path) {
        return Err(PathError::EscapedSlash);
    }
    // One pass over the bytes: `str::contains` sets up a substring search
    // per call, which costs more than the scan for a path this short.
    let needs_work = path
        .as_bytes()
        .windows(2)
        .any(|pair| pair[0] == b'/' && (pair[1] == b'.' || (merge_slashes && pair[1] == b'/')));
    if !needs_work {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<&str> = Vec::new();
    let trailing_slash = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for segment in path[1..].split('/') {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            "" if merge_slashes => {}
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    // A kept empty last segment already produced the trailing slash.
    if out.is_empty() || (trailing_slash && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_uppercase()),
                (b'2', b'F') | (b'5', b'C')
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> String {
        normalize(path, false, false).unwrap().into_owned()
    }

    #[test]
    fn dot_segments() {
        assert_eq!(n("/need-normalization/../svc/"), "/svc/");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/a/.."), "/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/plain/path"), "/plain/path");
        assert_eq!(n("/.well-known/x"), "/.well-known/x");
    }

    #[test]
    fn slashes() {
        assert_eq!(n("//svc/status"), "//svc/status");
        assert_eq!(
            normalize("//svc//status/", true, false).unwrap(),
            "/svc/status/"
        );
        assert_eq!(
            normalize("/svc/%2F200", false, true),
            Err(PathError::EscapedSlash)
        );
        assert_eq!(
            normalize("/svc/%5c", false, true),
            Err(PathError::EscapedSlash)
        );
        assert_eq!(n("/svc/%2F200"), "/svc/%2F200");
        assert_eq!(normalize("*", false, false), Err(PathError::NotAbsolute));
    }
}
