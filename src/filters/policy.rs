//! `kind: Filter` (a filter type and its settings) and `kind: FilterPolicy`
//! (which requests run which filters), in the shape of Ambassador Edge
//! Stack's resources.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use regex::Regex;
use serde::Deserialize;
use serde_yaml::Value;

use super::chain::{DynFilter, Entry, Next, Stage};
use super::registry::{FilterType, Registry, SettingsError};
use super::{Cx, Filter, Flow, Hooks, Reply, Session};
use crate::config::diagnostics::{closest, Diagnostic, Reporter};
use crate::config::load::RawResource;
use crate::model::count;
use crate::model::spec::parse_section;
use crate::routing::matchers::{full_match_regex, search_regex};

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
    fn parse(glob: &str) -> Result<Glob, String> {
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
    name: http::HeaderName,
    value: ValueTest,
    negate: bool,
}

#[derive(Debug)]
enum ValueTest {
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    #[serde(default)]
    rules: Vec<RuleSpec>,
    /// Read by the instance selection before validation.
    #[serde(default, rename = "ambassador_id")]
    _ambassador_id: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default = "any")]
    host: String,
    #[serde(default = "any")]
    path: String,
    #[serde(default)]
    filters: Vec<ReferenceSpec>,
}

fn any() -> String {
    "*".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReferenceSpec {
    name: String,
    namespace: Option<String>,
    #[serde(default)]
    arguments: Value,
    #[serde(default)]
    on_deny: Option<String>,
    #[serde(default)]
    on_allow: Option<String>,
    #[serde(default)]
    if_request_header: Option<HeaderConditionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HeaderConditionSpec {
    name: String,
    value: Option<String>,
    value_regex: Option<String>,
    #[serde(default)]
    negate: bool,
}

/// A valid `kind: Filter`, built.
struct Defined {
    filter: Arc<dyn DynFilter>,
    filter_type: FilterType,
}

/// Validates Filters, then the FilterPolicies that use them.
pub(crate) fn validate(
    filters: &[&RawResource],
    policies: &[&RawResource],
    registry: &Registry,
    diags: &mut Vec<Diagnostic>,
    accepted: &mut std::collections::BTreeMap<String, usize>,
) -> FilterPolicies {
    let mut defined = HashMap::new();
    let mut invalid = HashMap::new();
    for raw in filters {
        let key = (raw.id.namespace.clone(), raw.id.name.clone());
        match define(raw, registry, diags) {
            Some(filter) => {
                count(accepted, "Filter");
                defined.insert(key, filter);
            }
            None => {
                invalid.insert(key, ());
            }
        }
    }
    let mut result = FilterPolicies::default();
    for raw in policies {
        let mut report = Reporter::new(raw.location(), diags);
        let Some(spec) = parse_section::<PolicySpec>(raw, "spec", &mut report) else {
            result.rules.extend(unreadable_policy(raw, &mut report));
            continue;
        };
        let mut rules = Vec::new();
        for (r, rule) in spec.rules.iter().enumerate() {
            let field = format!("spec.rules[{r}]");
            let host = Glob::parse(&rule.host)
                .map_err(|e| report.error(&format!("{field}.host"), e))
                .ok();
            let path = Glob::parse(&rule.path)
                .map_err(|e| report.error(&format!("{field}.path"), e))
                .ok();
            let mut entries = Vec::new();
            for (f, reference) in rule.filters.iter().enumerate() {
                let field = format!("{field}.filters[{f}]");
                let namespace = reference.namespace.as_deref().unwrap_or(&raw.id.namespace);
                let key = (namespace.to_string(), reference.name.clone());
                let Some(filter) = defined.get(&key) else {
                    let why = if invalid.contains_key(&key) {
                        "is invalid (see its own error)"
                    } else {
                        "does not exist"
                    };
                    report.error(
                        &format!("{field}.name"),
                        format!("Filter {}.{namespace} {why}", reference.name),
                    );
                    entries.push(unavailable(&format!(
                        "Filter/{}.{namespace}",
                        reference.name
                    )));
                    continue;
                };
                match reference_entry(raw, reference, filter, &field, &mut report) {
                    Some(entry) => entries.push(entry),
                    None => entries.push(unavailable(&format!(
                        "Filter/{}.{namespace}",
                        reference.name
                    ))),
                }
            }
            if entries
                .iter()
                .any(|e| e.filter.type_name() == Unavailable::TYPE)
            {
                report.warning(
                    &field,
                    "a filter of this rule cannot run: the rule's requests are refused (403) \
                     until it is fixed",
                );
            }
            if let (Some(host), Some(path)) = (host, path) {
                rules.push(PolicyRule {
                    host,
                    path,
                    entries,
                });
            }
        }
        // A rule with a broken reference would run fewer filters than its
        // author meant (an auth filter missing opens a door): in its place
        // stands a filter that refuses, so its paths fail closed while the
        // policy's other rules keep guarding theirs.
        if !report.has_errors() {
            count(accepted, "FilterPolicy");
        }
        result.rules.extend(rules);
    }
    result
}

/// The rules of a FilterPolicy whose spec cannot be read, as far as their
/// host and path can: each refuses its requests, since which filters
/// should guard them is not known.
fn unreadable_policy(raw: &RawResource, report: &mut Reporter) -> Vec<PolicyRule> {
    let rules = raw
        .get("spec")
        .and_then(|spec| spec.get("rules"))
        .and_then(Value::as_sequence);
    let glob = |rule: &Value, key: &str| match rule.get(key) {
        None => Glob::parse("*").ok(),
        Some(value) => value.as_str().and_then(|text| Glob::parse(text).ok()),
    };
    let refused: Vec<PolicyRule> = rules
        .into_iter()
        .flatten()
        .filter_map(|rule| {
            Some(PolicyRule {
                host: glob(rule, "host")?,
                path: glob(rule, "path")?,
                entries: vec![unavailable(&format!(
                    "FilterPolicy/{}.{}",
                    raw.id.name, raw.id.namespace
                ))],
            })
        })
        .collect();
    if !refused.is_empty() {
        report.warning(
            "spec.rules",
            "the invalid FilterPolicy's rules refuse their requests (403) until it is fixed",
        );
    }
    refused
}

/// Stands for a filter a rule names but cannot run: every request the
/// rule selects is refused.
struct Unavailable;

#[async_trait::async_trait]
impl Filter for Unavailable {
    const TYPE: &'static str = "Unavailable";
    const HOOKS: Hooks = Hooks::REQUEST_ONLY;
    type Settings = ();
    type Arguments = ();
    type State = ();

    fn build(_: ()) -> std::result::Result<Self, String> {
        Ok(Unavailable)
    }

    async fn request(&self, _: &mut Session, _: &mut Cx<'_, Self>) -> pingora::Result<Flow> {
        Ok(Flow::Respond(
            Reply::text(
                403,
                "a filter guarding this path is not configured correctly",
            )
            .reason("filter_unavailable"),
        ))
    }
}

/// `origin` names what is invalid, for logs.
fn unavailable(origin: &str) -> Entry {
    Entry::builtin(Unavailable, &format!("{origin} (invalid)"), Stage::Auth)
}

fn define(raw: &RawResource, registry: &Registry, diags: &mut Vec<Diagnostic>) -> Option<Defined> {
    let mut report = Reporter::new(raw.location(), diags);
    let Some(spec) = raw.get("spec").and_then(Value::as_mapping) else {
        report.error(
            "spec",
            "a Filter needs a spec naming its type, e.g. spec: {External: {...}}",
        );
        return None;
    };
    let types: Vec<(&str, &Value)> = spec
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?, v)))
        .filter(|(k, _)| *k != "ambassador_id")
        .collect();
    let known = registry.names();
    let [(name, settings)] = types.as_slice() else {
        report
            .error(
                "spec",
                format!("a Filter names exactly one type, found {}", types.len()),
            )
            .with_hint(format!("types known to this binary: {}", known.join(", ")));
        return None;
    };
    let field = format!("spec.{name}");
    let Some(filter_type) = registry.get(name) else {
        let hint = match closest(name, &known) {
            Some(close) => format!("did you mean {close}? "),
            None => String::new(),
        };
        report
            .error(&field, format!("unknown filter type {name:?}"))
            .with_hint(format!(
                "{hint}types known to this binary: {}",
                known.join(", ")
            ));
        return None;
    };
    match (filter_type.build)(settings) {
        Ok(filter) => Some(Defined {
            filter,
            filter_type,
        }),
        Err(e) => {
            report.error(&join(&field, &e), e.message);
            None
        }
    }
}

fn join(field: &str, e: &SettingsError) -> String {
    if e.field.is_empty() {
        field.to_string()
    } else {
        format!("{field}.{}", e.field)
    }
}

fn reference_entry(
    raw: &RawResource,
    reference: &ReferenceSpec,
    filter: &Defined,
    field: &str,
    report: &mut Reporter,
) -> Option<Entry> {
    let arguments = match (filter.filter_type.arguments)(&reference.arguments) {
        Ok(arguments) => arguments,
        Err(e) => {
            report.error(&join(&format!("{field}.arguments"), &e), e.message);
            return None;
        }
    };
    let mut next = |value: &Option<String>, key: &str, default: Next| match value.as_deref() {
        None => Some(default),
        Some("continue") => Some(Next::Continue),
        Some("break") => Some(Next::Break),
        Some(other) => {
            report.error(
                &format!("{field}.{key}"),
                format!("{other:?} is neither \"break\" nor \"continue\""),
            );
            None
        }
    };
    let on_deny = next(&reference.on_deny, "onDeny", Next::Break);
    let on_allow = next(&reference.on_allow, "onAllow", Next::Continue);
    let condition = match &reference.if_request_header {
        None => None,
        Some(spec) => Some(Arc::new(condition(
            spec,
            &format!("{field}.ifRequestHeader"),
            report,
        )?)),
    };
    let namespace = reference.namespace.as_deref().unwrap_or(&raw.id.namespace);
    Some(Entry {
        filter: filter.filter.clone(),
        arguments,
        origin: format!("Filter/{}.{namespace}", reference.name).into(),
        stage: Stage::Auth,
        on_deny: on_deny?,
        on_allow: on_allow?,
        condition,
    })
}

fn condition(
    spec: &HeaderConditionSpec,
    field: &str,
    report: &mut Reporter,
) -> Option<HeaderCondition> {
    let name = match http::HeaderName::from_bytes(spec.name.as_bytes()) {
        Ok(name) => name,
        Err(_) => {
            report.error(
                &format!("{field}.name"),
                format!("{:?} is not a header name", spec.name),
            );
            return None;
        }
    };
    let value = match (&spec.value, &spec.value_regex) {
        (None, None) => ValueTest::Present,
        (Some(value), None) => ValueTest::Exact(value.clone()),
        (None, Some(pattern)) => match search_regex(&format!("^(?:{pattern})$")) {
            Ok(regex) => ValueTest::Regex(regex),
            Err(e) => {
                report.error(&format!("{field}.valueRegex"), e);
                return None;
            }
        },
        (Some(_), Some(_)) => {
            report.error(field, "give value or valueRegex, not both");
            return None;
        }
    };
    Some(HeaderCondition {
        name,
        value,
        negate: spec.negate,
    })
}
