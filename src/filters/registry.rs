//! The filter types a `kind: Filter` resource may name: the built-in ones
//! and those a user's binary registers.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::chain::{Arguments, DynFilter, Typed};
use super::Filter;
use crate::model::spec::plain_words;

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
    let filter = F::build(settings).map_err(|message| SettingsError {
        field: String::new(),
        message,
    })?;
    Ok(Arc::new(Typed(filter)))
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
