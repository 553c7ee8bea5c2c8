//! Redirect Mappings
//! (<https://www.getambassador.io/docs/emissary/latest/topics/using/redirects>):
//! `host_redirect` answers with a redirect to the Mapping's `service` instead
//! of proxying, optionally replacing the path.

use regex::Regex;

/// How the redirect's path is made from the request's.
#[derive(Debug, Clone)]
pub enum RedirectPath {
    /// The request's path, unchanged.
    Keep,
    /// `path_redirect`: the whole path.
    Replace(String),
    /// `prefix_redirect`: the part the Mapping's prefix matched.
    Prefix(String),
    /// `regex_redirect`: a substitution over the path.
    Regex { regex: Regex, substitution: String },
}

#[derive(Debug, Clone)]
pub struct Redirect {
    /// `https` or `http` when `service` names one; else the request's.
    pub scheme: Option<String>,
    /// `host[:port]` as written in `service`.
    pub authority: String,
    pub path: RedirectPath,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

pub const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

impl Redirect {
    /// The status to answer with; `status` is one of [`REDIRECT_CODES`],
    /// checked when the Mapping is validated.
    pub fn status_code(&self) -> http::StatusCode {
        http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::MOVED_PERMANENTLY)
    }

    /// The `Location` for a request. `matched` is how much of `path` the
    /// Mapping's prefix matched; the query string is always kept.
    pub fn location(
        &self,
        request_scheme: &str,
        path: &str,
        matched: usize,
        query: Option<&str>,
    ) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(request_scheme);
        let mut new_path = match &self.path {
            RedirectPath::Keep => path.to_string(),
            RedirectPath::Replace(replacement) => replacement.clone(),
            RedirectPath::Prefix(replacement) => {
                format!("{replacement}{}", path.get(matched..).unwrap_or(""))
            }
            RedirectPath::Regex {
                regex,
                substitution,
            } => regex.replace_all(path, substitution.as_str()).into_owned(),
        };
        // A substitution may drop the leading `/`; what follows the host
        // name must be a path, or it would change the host.
        if !new_path.starts_with('/') {
            new_path.insert(0, '/');
        }
        match query {
            Some(query) => format!("{scheme}://{}{new_path}?{query}", self.authority),
            None => format!("{scheme}://{}{new_path}", self.authority),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(path: RedirectPath) -> Redirect {
        Redirect {
            scheme: None,
            authority: "foobar.com".into(),
            path,
            status: 301,
        }
    }

    #[test]
    fn emissary_examples() {
        // The host, path, prefix and regex redirects of Emissary's
        // acceptance (KAT) tests.
        let keep = redirect(RedirectPath::Keep);
        assert_eq!(
            keep.location("http", "/r/anything", 3, Some("itworked=true")),
            "http://foobar.com/r/anything?itworked=true"
        );
        let replace = redirect(RedirectPath::Replace("/redirect/".into()));
        assert_eq!(
            replace.location("http", "/r3/foo/", 8, None),
            "http://foobar.com/redirect/"
        );
        let prefix = redirect(RedirectPath::Prefix("/foobar/baz".into()));
        assert_eq!(
            prefix.location("https", "/r4/foo/bar/baz/anything", 15, None),
            "https://foobar.com/foobar/baz/anything"
        );
        let regex = redirect(RedirectPath::Regex {
            regex: Regex::new("/r5/assets/([a-f0-9]{12})/images").unwrap(),
            substitution: "/images/${1}".into(),
        });
        assert_eq!(
            regex.location(
                "http",
                "/r5/assets/abcd0000f123/images",
                0,
                Some("itworked=true")
            ),
            "http://foobar.com/images/abcd0000f123?itworked=true"
        );
    }
}
