//! The request predicates of a Mapping, compiled once per snapshot.
//!
//! Regexes are compiled when the configuration is validated; matching a
//! request allocates nothing except for case-insensitive prefixes.

use regex::{Regex, RegexBuilder};

/// Compiled regexes are bounded so a hostile or careless pattern cannot
/// blow up memory; the regex crate matches in linear time regardless.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How a case-insensitive full-match pattern starts.
const CASE_INSENSITIVE: &str = "^(?:(?i)";

/// Builds a regex that must match the whole input, as Envoy's safe_regex
/// does. The error is a one-line message quoting the pattern as written.
pub fn full_match_regex(pattern: &str, case_insensitive: bool) -> Result<Regex, RegexError> {
    build_full_match(pattern, case_insensitive).map_err(|error| RegexError::Pattern {
        pattern: pattern.to_string(),
        error,
    })
}

/// [`full_match_regex`] for a pattern that matches header or query values,
/// which may spell out a credential: the error does not quote it.
pub fn full_match_value_regex(pattern: &str) -> Result<Regex, RegexError> {
    build_full_match(pattern, false).map_err(|e| RegexError::Value {
        reason: regex_reason(&e),
    })
}

fn build_full_match(pattern: &str, case_insensitive: bool) -> Result<Regex, regex::Error> {
    // The flag goes into the pattern, so the compiled regex says what it
    // matches (the route index relies on that).
    let anchored = if case_insensitive {
        format!("{CASE_INSENSITIVE}{pattern})$")
    } else {
        format!("^(?:{pattern})$")
    };
    RegexBuilder::new(&anchored)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// Builds a regex used for substitution (unanchored, all matches).
pub fn search_regex(pattern: &str) -> Result<Regex, RegexError> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|error| RegexError::Pattern {
            pattern: pattern.to_string(),
            error,
        })
}

/// A configured regex that does not compile.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegexError {
    #[error("invalid regex {pattern:?}: {}", regex_reason(.error))]
    Pattern {
        pattern: String,
        error: regex::Error,
    },
    /// A value pattern: the regex crate's error is not kept either, as its
    /// text draws the pattern.
    #[error("invalid regex: {reason}")]
    Value { reason: String },
}

/// Why a pattern did not compile, without the pattern.
fn regex_reason(error: &regex::Error) -> String {
    match error {
        // The syntax error text draws the pattern with a caret over several
        // lines; its last `error:` line is the reason.
        regex::Error::Syntax(text) => text
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("error: "))
            .unwrap_or("not a regular expression")
            .to_string(),
        regex::Error::CompiledTooBig(limit) => {
            format!("it compiles to more than {limit} bytes")
        }
        other => other.to_string(),
    }
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix {
        prefix: String,
        case_sensitive: bool,
    },
    Exact {
        path: String,
        case_sensitive: bool,
    },
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix {
                prefix,
                case_sensitive: true,
            } => path.starts_with(prefix.as_str()),
            PathMatch::Prefix {
                prefix,
                case_sensitive: false,
            } => path
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
            PathMatch::Exact {
                path: exact,
                case_sensitive: true,
            } => path == exact,
            PathMatch::Exact {
                path: exact,
                case_sensitive: false,
            } => path.eq_ignore_ascii_case(exact),
            PathMatch::Regex(regex) => regex.is_match(path),
        }
    }

    /// Whether the match tells upper from lower case. A regex says so in
    /// its pattern (`full_match_regex` puts the flag there).
    pub fn case_sensitive(&self) -> bool {
        match self {
            PathMatch::Prefix { case_sensitive, .. } | PathMatch::Exact { case_sensitive, .. } => {
                *case_sensitive
            }
            PathMatch::Regex(regex) => !regex.as_str().starts_with(CASE_INSENSITIVE),
        }
    }

    /// A string every matching path starts with, for the route index; empty
    /// when there is none to rely on (case-insensitive matches, regexes
    /// that start with a pattern or hold an alternation).
    pub fn literal_prefix(&self) -> &str {
        match self {
            PathMatch::Prefix {
                prefix,
                case_sensitive: true,
            } => prefix,
            PathMatch::Exact {
                path,
                case_sensitive: true,
            } => path,
            PathMatch::Regex(regex) => regex_literal_prefix(regex),
            _ => "",
        }
    }

    /// Length of the part of `path` that the default `rewrite` replaces:
    /// the prefix for prefix matches, the whole path otherwise.
    pub fn matched_len(&self, path: &str) -> usize {
        match self {
            PathMatch::Prefix { prefix, .. } => prefix.len(),
            PathMatch::Exact { .. } | PathMatch::Regex(_) => path.len(),
        }
    }
}

/// The literal start of an anchored regex built by [`full_match_regex`].
fn regex_literal_prefix(regex: &Regex) -> &str {
    let Some(pattern) = regex
        .as_str()
        .strip_prefix("^(?:")
        .and_then(|p| p.strip_suffix(")$"))
    else {
        return "";
    };
    // An alternation anywhere may make the literal start optional; flags
    // such as (?i) change what the literal means.
    if pattern.contains('|') || pattern.starts_with("(?") {
        return "";
    }
    let end = pattern
        .find(|c: char| ".[]{}()*+?^$\\|".contains(c))
        .unwrap_or(pattern.len());
    // A quantifier after the literal run applies to its last character.
    let end = match pattern[end..].chars().next() {
        Some('?' | '*' | '{') => pattern[..end].char_indices().last().map_or(0, |(i, _)| i),
        _ => end,
    };
    &pattern[..end]
}

/// Exact or regex match of a header, query parameter or method value.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(expected) => value == expected,
            ValueMatch::Regex(regex) => regex.is_match(value),
        }
    }

    pub fn is_regex(&self) -> bool {
        matches!(self, ValueMatch::Regex(_))
    }

    pub fn text(&self) -> &str {
        match self {
            ValueMatch::Exact(s) => s,
            ValueMatch::Regex(r) => {
                let s = r.as_str();
                // Strip the anchoring added by `full_match_regex`.
                s.strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(s)
            }
        }
    }
}

/// A DNS glob with at most one `*`, at the start or the end, as Emissary
/// accepts in `hostname`; a `*` may span several labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostGlob {
    Any,
    Exact(String),
    /// `*.example.com`: stores `.example.com`.
    Suffix(String),
    /// `example.*`: stores `example.`.
    Prefix(String),
}

/// A `hostname` that is not a glob Emissary accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostGlobError {
    #[error("hostname is empty")]
    Empty,
    /// More than one `*`, or one in the middle.
    #[error(
        "{0:?} is not a valid hostname glob: a single * is allowed only at the start or the end"
    )]
    Stars(String),
}

impl HostGlob {
    /// Parses a glob; the error says what is wrong with it.
    pub fn parse(glob: &str) -> Result<HostGlob, HostGlobError> {
        let lower = glob.to_ascii_lowercase();
        if lower.is_empty() {
            return Err(HostGlobError::Empty);
        }
        if lower == "*" {
            return Ok(HostGlob::Any);
        }
        match lower.matches('*').count() {
            0 => Ok(HostGlob::Exact(lower)),
            1 if lower.starts_with('*') => Ok(HostGlob::Suffix(lower[1..].to_string())),
            1 if lower.ends_with('*') => Ok(HostGlob::Prefix(lower[..lower.len() - 1].to_string())),
            _ => Err(HostGlobError::Stars(glob.to_string())),
        }
    }

    /// Matches an authority (already lower-cased by the caller).
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostGlob::Any => true,
            HostGlob::Exact(exact) => host.eq_ignore_ascii_case(exact),
            HostGlob::Suffix(suffix) => ends_with_ignore_case(host, suffix),
            HostGlob::Prefix(prefix) => host
                .get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix)),
        }
    }

    /// Could some name match both globs? This decides Host/Mapping association.
    pub fn compatible(&self, other: &HostGlob) -> bool {
        use HostGlob::*;
        match (self, other) {
            (Any, _) | (_, Any) => true,
            (Exact(a), b) | (b, Exact(a)) => b.matches(a),
            (Suffix(a), Suffix(b)) => a.ends_with(b.as_str()) || b.ends_with(a.as_str()),
            (Prefix(a), Prefix(b)) => a.starts_with(b.as_str()) || b.starts_with(a.as_str()),
            // `pre*` and `*suf` both match "pre" + "suf".
            (Prefix(_), Suffix(_)) | (Suffix(_), Prefix(_)) => true,
        }
    }

    pub fn text(&self) -> String {
        match self {
            HostGlob::Any => "*".into(),
            HostGlob::Exact(e) => e.clone(),
            HostGlob::Suffix(s) => format!("*{s}"),
            HostGlob::Prefix(p) => format!("{p}*"),
        }
    }
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// The route-level `:authority` predicate of a Mapping.
#[derive(Debug, Clone)]
pub enum AuthorityMatch {
    Glob(HostGlob),
    Regex(Regex),
}

impl AuthorityMatch {
    pub fn matches(&self, authority: &str) -> bool {
        match self {
            AuthorityMatch::Glob(glob) => glob.matches(authority),
            AuthorityMatch::Regex(regex) => regex.is_match(authority),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_not_segment_aware() {
        let m = PathMatch::Prefix {
            prefix: "/man".into(),
            case_sensitive: true,
        };
        assert!(m.matches("/mankind"));
        assert!(!m.matches("/MAN"));
        let ci = PathMatch::Prefix {
            prefix: "/x/".into(),
            case_sensitive: false,
        };
        assert!(ci.matches("/X/anything"));
        assert!(!ci.matches("/X"));
    }

    #[test]
    fn regex_must_match_whole_path() {
        let m = PathMatch::Regex(full_match_regex("/foo/[0-9]+", false).unwrap());
        assert!(m.matches("/foo/12"));
        assert!(!m.matches("/foo/12/x"));
        assert!(!m.matches("/x/foo/12"));
    }

    #[test]
    fn literal_prefixes_for_the_index() {
        let regex = |p: &str| PathMatch::Regex(full_match_regex(p, false).unwrap());
        assert_eq!(regex("/re/5/[0-9]+").literal_prefix(), "/re/5/");
        assert_eq!(regex("/abc?/x").literal_prefix(), "/ab");
        assert_eq!(regex("/ab*").literal_prefix(), "/a");
        assert_eq!(regex("/a|/b").literal_prefix(), "");
        assert_eq!(regex("[a-z]+").literal_prefix(), "");
        assert_eq!(regex("/x{2}").literal_prefix(), "/");
        let insensitive_regex = PathMatch::Regex(full_match_regex("/abc/[0-9]+", true).unwrap());
        assert_eq!(insensitive_regex.literal_prefix(), "");
        assert!(insensitive_regex.matches("/ABC/12"));
        let insensitive = PathMatch::Prefix {
            prefix: "/A/".into(),
            case_sensitive: false,
        };
        assert_eq!(insensitive.literal_prefix(), "");
    }

    #[test]
    fn globs_parse_and_match() {
        assert_eq!(HostGlob::parse("*").unwrap(), HostGlob::Any);
        assert!(HostGlob::parse("a.*.com").is_err());
        assert!(HostGlob::parse("**").is_err());
        let suffix = HostGlob::parse("*.example.com").unwrap();
        assert!(suffix.matches("a.b.example.com"));
        assert!(!suffix.matches("example.com"));
        let prefix = HostGlob::parse("api.*").unwrap();
        assert!(prefix.matches("API.example.org"));
        assert!(HostGlob::parse("Foo.com").unwrap().matches("foo.com"));
    }

    #[test]
    fn glob_compatibility() {
        let g = |s| HostGlob::parse(s).unwrap();
        assert!(g("*").compatible(&g("a.com")));
        assert!(g("*.com").compatible(&g("a.com")));
        assert!(!g("*.org").compatible(&g("a.com")));
        assert!(g("*.example.com").compatible(&g("*.com")));
        assert!(!g("*.example.com").compatible(&g("*.org")));
        assert!(g("api.*").compatible(&g("*.com")));
        assert!(!g("a.com").compatible(&g("b.com")));
    }
}
