//! What `kind: Filter` (a filter type and its settings) and `kind:
//! FilterPolicy` (which requests run which filters), in the shape of
//! Ambassador Edge Stack's resources, become: the rules that select
//! filters by host and path, and the filter that stands for one that
//! cannot run. `model::filter_policy` validates the resources into them.

use http::HeaderMap;
use http::StatusCode;
use regex::Regex;

use super::chain::{Entry, Stage};
use super::{Cx, Filter, Flow, Reply, Session};
use crate::routing::matchers::{full_match_regex, RegexError};

/// A `*` glob over a host name or a path: `*` matches any run of
/// characters, slashes and dots included, as in Edge Stack's FilterPolicy.
#[derive(Debug, Clone)]
pub(crate) struct Glob(Option<GlobRegexes>);

/// The glob as written, and in any case: a path that a case-insensitive
/// Mapping serves is guarded in any case.
#[derive(Debug, Clone)]
struct GlobRegexes {
    exact: Regex,
    any_case: Regex,
}

impl Glob {
    pub(crate) fn parse(glob: &str) -> Result<Glob, RegexError> {
        if glob == "*" {
            return Ok(Glob(None));
        }
        let pattern = glob
            .split('*')
            .map(regex::escape)
            .collect::<Vec<_>>()
            .join(".*");
        Ok(Glob(Some(GlobRegexes {
            exact: full_match_regex(&pattern, false)?,
            any_case: full_match_regex(&pattern, true)?,
        })))
    }

    pub fn matches(&self, text: &str, case_sensitive: bool) -> bool {
        self.0.as_ref().is_none_or(|regexes| {
            let regex = if case_sensitive {
                &regexes.exact
            } else {
                &regexes.any_case
            };
            regex.is_match(text)
        })
    }
}

/// `ifRequestHeader`: run the filter only when a header is present (or
/// has a value, or matches a regex), or, with `negate`, when it is not.
#[derive(Debug)]
pub(crate) struct HeaderCondition {
    pub(crate) name: http::HeaderName,
    pub(crate) value: ValueTest,
    pub(crate) negate: bool,
}

#[derive(Debug)]
pub(crate) enum ValueTest {
    Present,
    Exact(String),
    Regex(Regex),
}

impl HeaderCondition {
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let found = headers.get_all(&self.name).iter().any(|v| {
            let Ok(v) = v.to_str() else { return false };
            match &self.value {
                ValueTest::Present => true,
                ValueTest::Exact(expected) => v == expected,
                ValueTest::Regex(regex) => regex.is_match(v),
            }
        });
        found != self.negate
    }
}

/// The filters FilterPolicy rules select, first matching rule first.
#[derive(Debug, Default)]
pub struct FilterPolicies {
    pub(crate) rules: Vec<PolicyRule>,
}

#[derive(Debug)]
pub(crate) struct PolicyRule {
    pub host: Glob,
    pub path: Glob,
    pub entries: Vec<Entry>,
}

/// Stands for a filter a rule names but cannot run: every request the
/// rule selects is refused.
pub(crate) struct Unavailable;

#[async_trait::async_trait]
impl Filter for Unavailable {
    const TYPE: &'static str = "Unavailable";
    type Settings = ();
    type Arguments = ();
    type State = ();

    fn build(_: ()) -> std::result::Result<Self, crate::filters::BuildError> {
        Ok(Unavailable)
    }

    async fn request(&self, _: &mut Session, _: &mut Cx<'_, Self>) -> pingora::Result<Flow> {
        Ok(Flow::Respond(
            Reply::text(
                StatusCode::FORBIDDEN,
                "a filter guarding this path is not configured correctly",
            )
            .reason("filter_unavailable"),
        ))
    }
}

/// `origin` names what is invalid, for logs.
pub(crate) fn unavailable(origin: &str) -> Entry {
    Entry::builtin(Unavailable, &format!("{origin} (invalid)"), Stage::Auth)
}
