//! Helpers shared by the per-kind validators: typed spec parsing with field
//! paths, and the unknown-field policy.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::config::diagnostics::Reporter;
use crate::config::load::RawResource;
use crate::config::resources::StringOrList;

/// Deserializes `spec:` (or another top-level key) into its typed form.
/// A type error names the exact field, e.g. `spec.timeout_ms`.
pub fn parse_section<T: DeserializeOwned + Default>(
    raw: &RawResource,
    key: &str,
    report: &mut Reporter,
) -> Option<T> {
    let value = match raw.get(key) {
        None | Some(Value::Null) => return Some(T::default()),
        Some(value) => value.clone(),
    };
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(spec) => Some(spec),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." {
                key.to_string()
            } else {
                format!("{key}.{path}")
            };
            report.error(&field, e.into_inner().to_string());
            None
        }
    }
}

/// Emissary fields that pingress reads but does not act on yet warn; keys
/// nobody knows are errors, because a misspelt routing field silently
/// changes where traffic goes.
pub fn check_unknown_fields(
    other: &BTreeMap<String, Value>,
    prefix: &str,
    supported: &[&str],
    not_yet_supported: &[&str],
    report: &mut Reporter,
) {
    for key in other.keys() {
        let field = format!("{prefix}.{key}");
        if not_yet_supported.contains(&key.as_str()) {
            report.warning(&field, "not supported by pingress yet; ignored");
        } else {
            let diagnostic = report.error(&field, "unknown field");
            if let Some(suggestion) = closest(key, supported) {
                diagnostic.with_hint(format!("did you mean `{suggestion}`?"));
            }
        }
    }
}

fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| {
            (
                edit_distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                *c,
            )
        })
        .filter(|(distance, c)| *distance <= 2.max(c.len() / 3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Emissary's `ambassador_id`: a resource is ours when its list names our ID
/// or `_automatic_`; without a list it belongs to the `default` instance.
pub fn belongs_to(ids: Option<&StringOrList>, instance: &str) -> bool {
    match ids {
        None => instance == "default",
        Some(ids) => ids
            .to_vec()
            .iter()
            .any(|id| id == instance || id == "_automatic_"),
    }
}

/// Reads `spec.ambassador_id` without parsing the whole spec, so resources
/// of other instances are skipped before they can produce diagnostics.
pub fn ambassador_ids(raw: &RawResource) -> Option<StringOrList> {
    let value = raw.get("spec")?.get("ambassador_id")?;
    serde_yaml::from_value(value.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(closest("prefx", &["prefix", "service"]), Some("prefix"));
        assert_eq!(closest("timeout", &["timeout_ms"]), Some("timeout_ms"));
        assert_eq!(closest("zzzzzz", &["prefix"]), None);
    }

    #[test]
    fn ambassador_id_rules() {
        assert!(belongs_to(None, "default"));
        assert!(!belongs_to(None, "other"));
        let ids = StringOrList::Many(vec!["missme".into(), "default".into()]);
        assert!(belongs_to(Some(&ids), "default"));
        assert!(belongs_to(
            Some(&StringOrList::One("_automatic_".into())),
            "x"
        ));
        assert!(!belongs_to(
            Some(&StringOrList::One("missme".into())),
            "default"
        ));
    }
}
