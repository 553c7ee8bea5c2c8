//! Helpers shared by the per-kind validators: typed spec parsing with field
//! paths, and the unknown-field policy.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::config::diagnostics::{closest, plain_words, Code, Reporter};
use crate::config::load::RawResource;
use crate::config::resources::StringOrList;

/// Deserializes `spec:` (or another top-level key) into its typed form.
/// A type error names the exact field, e.g. `spec.timeout_ms`.
pub fn parse_section<T: DeserializeOwned + Default>(
    raw: &RawResource,
    key: &str,
    report: &mut Reporter,
) -> Option<T> {
    parse_value(raw.get(key), key, report)
}

/// Deserializes a value found at `key` (a dotted field path).
pub fn parse_value<T: DeserializeOwned + Default>(
    value: Option<&Value>,
    key: &str,
    report: &mut Reporter,
) -> Option<T> {
    let value = match value {
        None | Some(Value::Null) => return Some(T::default()),
        Some(value) => value.clone(),
    };
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(spec) => Some(spec),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." {
                key.to_string()
            } else if path.starts_with('[') {
                // A list at the top: `subsets[0].ip`, not `subsets.[0].ip`.
                format!("{key}{path}")
            } else {
                format!("{key}.{path}")
            };
            let diagnostic = report.error(&field, plain_words(&e.into_inner().to_string()));
            if field.ends_with("_ms") {
                diagnostic.with_hint("a whole number of milliseconds, e.g. 3000");
            }
            None
        }
    }
}

/// Emissary fields that pingress reads but does not act on yet warn; keys
/// nobody knows are errors, because a misspelt routing field silently
/// changes where traffic goes. Returns the fields suggested for typos, so
/// a caller need not also report them as missing.
pub fn check_unknown_fields(
    other: &BTreeMap<String, Value>,
    prefix: &str,
    supported: &[&'static str],
    not_yet_supported: &[&str],
    report: &mut Reporter,
) -> Vec<&'static str> {
    let mut suggested = Vec::new();
    for key in other.keys() {
        let field = format!("{prefix}.{key}");
        if not_yet_supported.contains(&key.as_str()) {
            report
                .warning(&field, "not supported by pingress yet; ignored")
                .with_code(Code::KeyIgnored);
        } else {
            let diagnostic = report
                .error(&field, "unknown field")
                .with_code(Code::UnknownKey);
            if let Some(suggestion) = closest(key, supported) {
                diagnostic.with_hint(format!("did you mean `{suggestion}`?"));
                suggested.push(suggestion);
            }
        }
    }
    suggested
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

/// The assertion of the key-coverage tests: a key the model accepts must
/// change what validation makes of a resource (`changed`), or draw a
/// warning that names it.
#[cfg(test)]
pub(crate) fn assert_used_or_named(
    key: &str,
    changed: bool,
    diags: &[crate::config::diagnostics::Diagnostic],
) {
    let named = diags
        .iter()
        .any(|d| !d.is_error() && d.field.as_deref().is_some_and(|f| f.contains(key)));
    assert!(changed || named, "`{key}` is neither used nor warned about");
}

#[cfg(test)]
mod tests {
    use super::*;

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
