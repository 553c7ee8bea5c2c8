//! The filter types a `kind: Filter` resource may name: the built-in ones
//! and those a user's binary registers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::chain::{Arguments, DynFilter, Typed};
use super::Filter;
use crate::config::diagnostics::plain_words;

/// A problem with a filter's YAML: the field path inside the value (empty
/// for the value itself) and what is wrong.
#[derive(Debug)]
pub(crate) struct SettingsError {
    pub field: String,
    pub message: String,
}

type Build = fn(&Value) -> Result<Arc<dyn DynFilter>, SettingsError>;
type ParseArguments = fn(&Value) -> Result<Arguments, SettingsError>;

/// How to make one filter type from YAML.
#[derive(Clone, Copy)]
pub(crate) struct FilterType {
    pub build: Build,
    pub arguments: ParseArguments,
}

/// The filter types known to this binary, by `Filter::TYPE`.
#[derive(Clone, Default)]
pub struct Registry {
    types: BTreeMap<&'static str, FilterType>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.types.keys()).finish()
    }
}

fn parse<T: DeserializeOwned>(value: &Value) -> Result<T, SettingsError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        SettingsError {
            field: if path == "." { String::new() } else { path },
            message: plain_words(&e.into_inner().to_string()),
        }
    })
}

fn build<F: Filter>(settings: &Value) -> Result<Arc<dyn DynFilter>, SettingsError> {
    let settings = parse::<F::Settings>(settings)?;
    let filter = F::build(settings).map_err(|e| SettingsError {
        field: String::new(),
        message: e.to_string(),
    })?;
    Ok(Arc::new(Typed::new(filter)))
}

fn arguments<F: Filter>(value: &Value) -> Result<Arguments, SettingsError> {
    Ok(Arc::new(parse::<F::Arguments>(value)?))
}

impl Registry {
    /// The types every pingress binary knows.
    pub fn with_builtins() -> Registry {
        let mut registry = Registry::default();
        registry.register::<super::cors::CorsFilter>();
        registry.register::<super::ip::IpFilter>();
        registry
    }

    /// Makes `F` available to `kind: Filter` resources as `F::TYPE`; a
    /// later registration of the same name replaces the earlier one.
    pub fn register<F: Filter>(&mut self) {
        self.types.insert(
            F::TYPE,
            FilterType {
                build: build::<F>,
                arguments: arguments::<F>,
            },
        );
    }

    pub(crate) fn get(&self, name: &str) -> Option<FilterType> {
        self.types.get(name).copied()
    }

    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.types.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::diagnostics::Diagnostic;
    use crate::filters::cors::{CorsFilter, CorsSpec};
    use crate::filters::ip::{self, IpFilter, RangeSpec};
    use crate::model::key_coverage::{document, validate_yaml, Coverage};

    /// `F` built from its settings `spec`, as text, with the diagnostics
    /// of a `kind: Filter` of that type and spec.
    fn built<F: Filter + fmt::Debug>(spec: &str) -> (String, Vec<Diagnostic>) {
        let settings: String = spec.lines().map(|l| format!("  {l}\n")).collect();
        let spec_yaml = format!("{}:\n{settings}ambassador_id: [default]", F::TYPE);
        let (_, diags) = validate_yaml(
            &document("Filter", "f", &spec_yaml),
            &Registry::with_builtins(),
        );
        let filter = serde_yaml::from_str(spec)
            .map_err(|e| crate::filters::BuildError::from(e.to_string()))
            .and_then(F::build);
        (format!("{filter:?}"), diags)
    }

    /// Each key of a built-in filter type's settings changes the filter
    /// built; a type added to the builtins fails here until its keys are.
    #[test]
    fn every_filter_settings_key_is_used_or_warned() {
        let range: RangeSpec = serde_yaml::from_str("{}").unwrap();
        for name in Registry::with_builtins().names() {
            match name {
                CorsFilter::TYPE => Coverage {
                    base: "origins: [http://a.example]",
                    samples: &[
                        ("origins", "", "origins: [http://b.example]"),
                        ("methods", "", "methods: [GET]"),
                        ("headers", "", "headers: [x-a]"),
                        ("exposed_headers", "", "exposed_headers: [x-b]"),
                        ("credentials", "", "credentials: true"),
                        ("max_age", "", "max_age: 60"),
                    ],
                    specs: &[("", &CorsSpec::default())],
                    ..Coverage::default()
                }
                .check(built::<CorsFilter>),
                IpFilter::TYPE => Coverage {
                    base: "ip_allow: [{remote: 10.0.0.0/8}]",
                    samples: &[
                        ("ip_allow", "", "ip_allow: [{}, {peer: 127.0.0.1}]"),
                        (
                            "ip_deny",
                            "",
                            "{ip_allow: ~, ip_deny: [{remote: 10.0.0.0/8}]}",
                        ),
                        (
                            "ip_allow.peer",
                            "",
                            "ip_allow: [{remote: ~, peer: 10.0.0.0/8}]",
                        ),
                        ("ip_allow.remote", "", "ip_allow: [{remote: 10.1.0.0/16}]"),
                    ],
                    specs: &[("", &ip::Settings::default()), ("ip_allow.", &range)],
                    ..Coverage::default()
                }
                .check(built::<IpFilter>),
                other => panic!("no key-coverage table for the filter type {other}"),
            }
        }
    }
}
