//! Rate-limit labels: a Mapping's `labels` and the Module's
//! `default_labels`, parsed into label groups (Envoy's descriptors, the
//! [`LabelGroup`]s of `filters::rate_limit::labels`) whose entries a
//! request fills in.
//!
//! Both of Emissary's spellings are read: v3 specifiers are one-key maps
//! (`generic_key: {value: x}`, `request_headers: {key, header_name}`, ...),
//! v2 ones are bare strings (`remote_address`, or any other string as a
//! generic_key value) and `{my_key: {header: name}}`.

use http::HeaderName;
use serde::Deserialize;
use serde_yaml::Value;

use super::spec::parse_value;
use crate::config::diagnostics::Reporter;
use crate::filters::rate_limit::labels::{DefaultLabels, LabelGroup, Labels, Specifier};

/// A Mapping's `labels`: `{domain: [{group: [specifier, ...]}, ...]}`.
pub(crate) fn parse_labels(value: &Value, field: &str, report: &mut Reporter) -> Labels {
    let mut labels = Labels::new();
    let Some(domains) = as_map(value, field, "a map of domain to label groups", report) else {
        return labels;
    };
    for (domain, groups_value) in domains {
        let Some(domain) = key_text(domain, field, report) else {
            continue;
        };
        let field = format!("{field}.{domain}");
        let Value::Sequence(groups) = groups_value else {
            report
                .error(&field, "expected a list of label groups")
                .with_hint("each item is {group-name: [specifier, ...]}");
            continue;
        };
        let mut parsed = Vec::new();
        for (i, group) in groups.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let named = match group {
                Value::Mapping(map) if map.len() == 1 => map.iter().next(),
                _ => None,
            };
            let Some((name, specifiers)) = named else {
                report
                    .error(
                        &field,
                        "a label group is a map with one key, the group's name",
                    )
                    .with_hint("e.g. {per-client: [{remote_address: {key: remote_address}}]}");
                continue;
            };
            let Some(name) = key_text(name, &field, report) else {
                continue;
            };
            let field = format!("{field}.{name}");
            if let Some(specifiers) = parse_specifiers(specifiers, &field, report) {
                parsed.push(LabelGroup {
                    name: name.to_string(),
                    specifiers,
                });
            }
        }
        labels.insert(domain.to_string(), parsed);
    }
    labels
}

/// The Module's `default_labels`: `{domain: {defaults: [specifier, ...]}}`.
pub(crate) fn parse_default_labels(
    value: &Value,
    field: &str,
    report: &mut Reporter,
) -> DefaultLabels {
    let mut defaults = DefaultLabels::new();
    let Some(domains) = as_map(value, field, "a map of domain to {defaults: [...]}", report) else {
        return defaults;
    };
    for (domain, body) in domains {
        let Some(domain) = key_text(domain, field, report) else {
            continue;
        };
        let field = format!("{field}.{domain}");
        let Some(body) = as_map(body, &field, "{defaults: [specifier, ...]}", report) else {
            continue;
        };
        for (key, specifiers) in body {
            match key.as_str() {
                Some("defaults") => {
                    let field = format!("{field}.defaults");
                    if let Some(specifiers) = parse_specifiers(specifiers, &field, report) {
                        defaults.insert(domain.to_string(), specifiers);
                    }
                }
                _ => {
                    report
                        .error(&format!("{field}.{}", describe_key(key)), "unknown field")
                        .with_hint("a default_labels domain holds only `defaults`");
                }
            }
        }
    }
    defaults
}

/// Emissary's rule: the Module's defaults for a domain go in front of each
/// of the Mapping's groups of that domain, or, when the Mapping has none,
/// form a group of their own named `default`.
pub(crate) fn with_defaults(mut labels: Labels, defaults: &DefaultLabels) -> Labels {
    for (domain, specifiers) in defaults {
        let groups = labels.entry(domain.clone()).or_default();
        if groups.is_empty() {
            groups.push(LabelGroup {
                name: "default".into(),
                specifiers: specifiers.clone(),
            });
        } else {
            for group in groups {
                group.specifiers.splice(0..0, specifiers.iter().cloned());
            }
        }
    }
    labels
}

fn as_map<'v>(
    value: &'v Value,
    field: &str,
    expected: &str,
    report: &mut Reporter,
) -> Option<&'v serde_yaml::Mapping> {
    match value {
        Value::Mapping(map) => Some(map),
        Value::Null => None,
        _ => {
            report.error(field, format!("expected {expected}"));
            None
        }
    }
}

fn key_text<'v>(key: &'v Value, field: &str, report: &mut Reporter) -> Option<&'v str> {
    let text = key.as_str();
    if text.is_none() {
        report.error(
            field,
            format!("{} is not a string; names are strings", describe_key(key)),
        );
    }
    text
}

fn describe_key(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "a key".into()),
    }
}

fn parse_specifiers(value: &Value, field: &str, report: &mut Reporter) -> Option<Vec<Specifier>> {
    let Value::Sequence(items) = value else {
        report.error(field, "expected a list of label specifiers");
        return None;
    };
    // Every item is checked, so all its problems are reported at once.
    let parsed: Vec<Option<Specifier>> = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_specifier(item, &format!("{field}[{i}]"), report))
        .collect();
    parsed.into_iter().collect()
}

/// v3 `generic_key: {value, key}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericKeySpec {
    value: Option<String>,
    key: Option<String>,
}

/// v3 `remote_address`, `source_cluster`, `destination_cluster`: `{key}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixedKeySpec {
    key: Option<String>,
}

/// v3 `request_headers: {key, header_name, omit_if_not_present}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestHeadersSpec {
    key: Option<String>,
    header_name: Option<String>,
    #[serde(default)]
    omit_if_not_present: bool,
}

/// v2 `{my_key: {header: name, omit_if_not_present}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct V2HeaderSpec {
    header: Option<String>,
    #[serde(default)]
    omit_if_not_present: bool,
}

const SPECIFIER_HINT: &str = "a specifier is generic_key: {value: ...}, remote_address: {key: \
     remote_address}, request_headers: {key: ..., header_name: ...}, source_cluster: {key: \
     source_cluster}, destination_cluster: {key: destination_cluster}, or a v2 string";

fn parse_specifier(item: &Value, field: &str, report: &mut Reporter) -> Option<Specifier> {
    let map = match item {
        Value::String(text) => return Some(v2_string(text)),
        Value::Mapping(map) if map.len() == 1 => map,
        _ => {
            report
                .error(
                    field,
                    "expected a label specifier: a string or a map with one key",
                )
                .with_hint(SPECIFIER_HINT);
            return None;
        }
    };
    let (kind, body) = map.iter().next()?;
    let kind = key_text(kind, field, report)?;
    let field = format!("{field}.{kind}");
    match kind {
        "generic_key" => {
            // v2 wrote the value directly.
            if let Value::String(value) = body {
                return Some(generic("generic_key", value));
            }
            let spec = parse_value::<GenericKeySpec>(Some(body), &field, report)?;
            let Some(value) = spec.value.filter(|v| !v.is_empty()) else {
                report.error(&format!("{field}.value"), "a generic_key needs a value");
                return None;
            };
            let key = spec.key.filter(|k| !k.is_empty());
            Some(generic(key.as_deref().unwrap_or("generic_key"), &value))
        }
        "remote_address" | "source_cluster" | "destination_cluster" => {
            let spec = parse_value::<FixedKeySpec>(Some(body), &field, report)?;
            if let Some(key) = spec.key.filter(|k| k != kind) {
                report
                    .error(
                        &format!("{field}.key"),
                        format!("the key of a {kind} label is always {kind}, not {key:?}"),
                    )
                    .with_hint(format!("write {kind}: {{key: {kind}}}"));
                return None;
            }
            Some(fixed(kind))
        }
        "request_headers" => {
            let spec = parse_value::<RequestHeadersSpec>(Some(body), &field, report)?;
            let Some(key) = spec.key.filter(|k| !k.is_empty()) else {
                report.error(&format!("{field}.key"), "request_headers needs a key");
                return None;
            };
            let Some(name) = spec.header_name else {
                report.error(
                    &format!("{field}.header_name"),
                    "request_headers needs a header_name",
                );
                return None;
            };
            header(
                &key,
                &name,
                spec.omit_if_not_present,
                &format!("{field}.header_name"),
                report,
            )
        }
        custom => {
            let is_v2_header = matches!(body, Value::Mapping(m) if m.contains_key("header"));
            if !is_v2_header {
                report
                    .error(&field, format!("unknown label specifier {custom:?}"))
                    .with_hint(SPECIFIER_HINT);
                return None;
            }
            let spec = parse_value::<V2HeaderSpec>(Some(body), &field, report)?;
            let name = spec.header.unwrap_or_default();
            header(
                custom,
                &name,
                spec.omit_if_not_present,
                &format!("{field}.header"),
                report,
            )
        }
    }
}

/// v2: three names are specifiers of their own; any other string is a
/// generic_key value.
fn v2_string(text: &str) -> Specifier {
    match text {
        "remote_address" | "source_cluster" | "destination_cluster" => fixed(text),
        value => generic("generic_key", value),
    }
}

fn fixed(kind: &str) -> Specifier {
    match kind {
        "remote_address" => Specifier::RemoteAddress,
        "source_cluster" => Specifier::SourceCluster,
        _ => Specifier::DestinationCluster,
    }
}

fn generic(key: &str, value: &str) -> Specifier {
    Specifier::Generic {
        key: key.into(),
        value: value.into(),
    }
}

fn header(
    key: &str,
    name: &str,
    omit_if_not_present: bool,
    field: &str,
    report: &mut Reporter,
) -> Option<Specifier> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(header) => Some(Specifier::Header {
            key: key.into(),
            header,
            omit_if_not_present,
        }),
        Err(_) => {
            report.error(field, format!("{name:?} is not a valid header name"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::diagnostics::{Diagnostic, Location};
    use crate::filters::rate_limit::labels::RequestLabels;
    use http::HeaderMap;
    use std::borrow::Cow;

    fn parse(yaml: &str) -> (Labels, Vec<Diagnostic>) {
        let mut diags = Vec::new();
        let value: Value = serde_yaml::from_str(yaml).unwrap();
        let mut report = Reporter::new(Location::File("t".into()), &mut diags);
        let labels = parse_labels(&value, "spec.labels", &mut report);
        (labels, diags)
    }

    fn fields(diags: &[Diagnostic]) -> Vec<String> {
        diags
            .iter()
            .map(|d| d.field.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn v3_and_v2_specifiers_mean_the_same() {
        let (v3, d3) = parse(
            "ambassador:\n- g:\n  - generic_key: {value: fast}\n  - remote_address: {key: remote_address}\n  \
             - request_headers: {key: user, header_name: x-user, omit_if_not_present: true}\n  \
             - destination_cluster: {key: destination_cluster}",
        );
        let (v2, d2) = parse(
            "ambassador:\n- g:\n  - fast\n  - remote_address\n  - user: {header: x-user, omit_if_not_present: true}\n  \
             - destination_cluster",
        );
        assert!(d3.is_empty() && d2.is_empty(), "{d3:?} {d2:?}");
        assert_eq!(v3, v2);
        assert_eq!(v3["ambassador"][0].specifiers.len(), 4);
    }

    #[test]
    fn bad_specifiers_are_reported_where_they_are() {
        let (_, diags) = parse(
            "ambassador:\n- g:\n  - generic_key: {}\n  - remote_address: {key: ip}\n  \
             - request_headers: {key: k}\n  - request_headers: {key: k, header_name: 'bad header'}\n  \
             - somewhere: {nothing: 1}\n  - [1]\n- not-a-group\n",
        );
        assert_eq!(
            fields(&diags),
            [
                "spec.labels.ambassador[0].g[0].generic_key.value",
                "spec.labels.ambassador[0].g[1].remote_address.key",
                "spec.labels.ambassador[0].g[2].request_headers.header_name",
                "spec.labels.ambassador[0].g[3].request_headers.header_name",
                "spec.labels.ambassador[0].g[4].somewhere",
                "spec.labels.ambassador[0].g[5]",
                "spec.labels.ambassador[1]",
            ]
        );
    }

    #[test]
    fn defaults_go_first_or_form_their_own_group() {
        let (labels, _) = parse("ambassador:\n- a: [x]\n- b: [y]\nother:\n- c: [z]");
        let mut defaults = DefaultLabels::new();
        defaults.insert("ambassador".into(), vec![generic("generic_key", "d")]);
        defaults.insert("third".into(), vec![Specifier::RemoteAddress]);
        let merged = with_defaults(labels, &defaults);
        let values = |domain: &str| -> Vec<Vec<Specifier>> {
            merged[domain]
                .iter()
                .map(|g| g.specifiers.clone())
                .collect()
        };
        let d = generic("generic_key", "d");
        assert_eq!(
            values("ambassador"),
            [
                vec![d.clone(), generic("generic_key", "x")],
                vec![d, generic("generic_key", "y")]
            ]
        );
        assert_eq!(values("other"), [vec![generic("generic_key", "z")]]);
        assert_eq!(merged["third"][0].name, "default");
        assert_eq!(values("third"), [vec![Specifier::RemoteAddress]]);
    }

    #[test]
    fn missing_headers_skip_the_group_or_the_entry() {
        let (labels, _) = parse(
            "d:\n- strict: [{request_headers: {key: u, header_name: x-user}}]\n\
             - lenient: [a, {request_headers: {key: u, header_name: x-user, omit_if_not_present: true}}]",
        );
        let headers = HeaderMap::new();
        let request = RequestLabels {
            headers: &headers,
            client_ip: None,
            destination: None,
        };
        let groups = &labels["d"];
        assert_eq!(groups[0].entries(&request), None);
        assert_eq!(
            groups[1].entries(&request),
            Some(vec![("generic_key", Cow::Borrowed("a"))])
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().unwrap());
        let request = RequestLabels {
            headers: &headers,
            ..request
        };
        assert_eq!(
            groups[0].entries(&request),
            Some(vec![("u", Cow::Borrowed("alice"))])
        );
    }
}
