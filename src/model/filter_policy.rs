//! `kind: Filter` (a filter type and its settings) and `kind: FilterPolicy`
//! (which requests run which filters), in the shape of Ambassador Edge
//! Stack's resources, validated into the [`FilterPolicies`] of
//! `filters::policy`.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_yaml::Value;

use super::count;
use super::spec::parse_section;
use crate::config::diagnostics::{closest, Diagnostic, Reporter};
use crate::config::load::RawResource;
use crate::filters::chain::{DynFilter, Entry, Next, Stage};
use crate::filters::policy::{
    unavailable, FilterPolicies, Glob, HeaderCondition, PolicyRule, Unavailable, ValueTest,
};
use crate::filters::registry::{FilterType, Registry, SettingsError};
use crate::filters::Filter;
use crate::routing::matchers::full_match_value_regex;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    #[serde(default)]
    rules: Vec<RuleSpec>,
    /// Read by the instance selection before validation.
    #[serde(default, rename = "ambassador_id")]
    _ambassador_id: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
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

#[derive(Debug, Deserialize)]
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
                .map_err(|e| report.error(&format!("{field}.host"), e.to_string()))
                .ok();
            let path = Glob::parse(&rule.path)
                .map_err(|e| report.error(&format!("{field}.path"), e.to_string()))
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
        (None, Some(pattern)) => match full_match_value_regex(pattern) {
            Ok(regex) => ValueTest::Regex(regex),
            Err(e) => {
                report.error(&format!("{field}.valueRegex"), e.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key_coverage::{document, merged, validate_yaml, Coverage};

    /// A filter whose arguments are text, so a test can see them arrive.
    #[derive(Debug)]
    struct Probe;

    #[async_trait::async_trait]
    impl Filter for Probe {
        const TYPE: &'static str = "Probe";
        type Settings = ();
        type Arguments = Option<String>;
        type State = ();

        fn build(_: ()) -> std::result::Result<Self, crate::filters::BuildError> {
            Ok(Probe)
        }
    }

    const BASE: &str = "rules: [{host: a.example, path: /a/*, filters: [{name: f}]}]\n\
                        ambassador_id: [default]";
    const CONDITION: &str = "rules: [{filters: [{ifRequestHeader: {name: x-a}}]}]";

    /// The rules of a FilterPolicy with `spec`, with what a rule's `Debug`
    /// leaves out: each reference's outcomes, condition and arguments.
    fn rules(spec: &str) -> (String, Vec<Diagnostic>) {
        let mut registry = Registry::default();
        registry.register::<Probe>();
        let yaml = [
            document("Filter", "f", "Probe: ~"),
            document("Filter", "g", "Probe: ~"),
            "---\napiVersion: getambassador.io/v3alpha1\nkind: Filter\n\
             metadata: {name: f, namespace: other}\nspec: {Probe: ~}\n"
                .to_string(),
            document("FilterPolicy", "p", spec),
        ]
        .concat();
        let (model, diags) = validate_yaml(&yaml, &registry);
        let rules: Vec<String> = model
            .filter_policies
            .rules
            .iter()
            .map(|rule| {
                let entries: Vec<_> = rule
                    .entries
                    .iter()
                    .map(|e| {
                        let arguments = e.arguments.downcast_ref::<Option<String>>();
                        (&e.origin, e.on_deny, e.on_allow, &e.condition, arguments)
                    })
                    .collect();
                format!("{:?} {:?} {entries:?}", rule.host, rule.path)
            })
            .collect();
        (format!("{rules:?}"), diags)
    }

    /// A header value pattern may spell out a credential: its error says
    /// what is wrong without quoting it.
    #[test]
    fn an_invalid_value_regex_is_not_quoted() {
        let spec = "rules: [{filters: [{name: f, ifRequestHeader: \
                    {name: authorization, valueRegex: \"Bearer s3cr3t(\"}}]}]";
        let (_, diags) = rules(spec);
        let error = diags
            .iter()
            .find(|d| {
                d.field.as_deref() == Some("spec.rules[0].filters[0].ifRequestHeader.valueRegex")
            })
            .unwrap_or_else(|| panic!("{diags:?}"));
        assert!(error.is_error());
        assert!(!error.message.contains("s3cr3t"), "{}", error.message);
    }

    /// Each key of a FilterPolicy, of its rules, references and header
    /// conditions, changes the rules built.
    #[test]
    fn every_filter_policy_key_is_used_or_warned() {
        let spec: PolicySpec = serde_yaml::from_str(&merged(BASE, &[CONDITION])).unwrap();
        let rule = &spec.rules[0];
        let reference = &rule.filters[0];
        let condition = reference.if_request_header.as_ref().unwrap();
        let on =
            |condition: &str| format!("rules: [{{filters: [{{ifRequestHeader: {condition}}}]}}]");
        let (name, value, regex, negate) = (
            on("{name: x-b}"),
            on("{value: v}"),
            on("{valueRegex: v.*}"),
            on("{negate: true}"),
        );
        Coverage {
            base: BASE,
            samples: &[
                ("rules", "", "rules: [{}, {filters: [{name: g}]}]"),
                ("rules.host", "", "rules: [{host: b.example}]"),
                ("rules.path", "", "rules: [{path: /b/*}]"),
                ("rules.filters", "", "rules: [{filters: [{}, {name: g}]}]"),
                ("rules.filters.name", "", "rules: [{filters: [{name: g}]}]"),
                (
                    "rules.filters.namespace",
                    "",
                    "rules: [{filters: [{namespace: other}]}]",
                ),
                (
                    "rules.filters.arguments",
                    "",
                    "rules: [{filters: [{arguments: x}]}]",
                ),
                (
                    "rules.filters.onDeny",
                    "",
                    "rules: [{filters: [{onDeny: continue}]}]",
                ),
                (
                    "rules.filters.onAllow",
                    "",
                    "rules: [{filters: [{onAllow: break}]}]",
                ),
                ("rules.filters.ifRequestHeader", "", CONDITION),
                ("rules.filters.ifRequestHeader.name", CONDITION, &name),
                ("rules.filters.ifRequestHeader.value", CONDITION, &value),
                (
                    "rules.filters.ifRequestHeader.valueRegex",
                    CONDITION,
                    &regex,
                ),
                ("rules.filters.ifRequestHeader.negate", CONDITION, &negate),
                ("ambassador_id", "", "ambassador_id: [other]"),
            ],
            specs: &[
                ("", &spec),
                ("rules.", rule),
                ("rules.filters.", reference),
                ("rules.filters.ifRequestHeader.", condition),
            ],
            ..Coverage::default()
        }
        .check(rules);
    }
}
