//! The configuration pipeline, run at start, by `-t` and on every reload:
//! the gateway file and resource files → resources → model → snapshot.
//!
//! A mistake never lowers what is serving. When an edit makes a resource
//! invalid, its last good version keeps serving and the error is reported;
//! a file that is empty or half-written keeps its last good content; every
//! other change in the same reload applies. Resources are removed by
//! deleting their documents or their file. A resource that was never valid
//! stays out, or fails closed where leaving it out would open a door (an
//! invalid Host refuses its names, a FilterPolicy rule with an invalid
//! filter refuses its paths, an invalid Module stops the start).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::config::diagnostics::{Code, Diagnostic, Location, Named, ResourceRef, Source};
use crate::config::load::{load_gateway_file, GatewayFile, RawResource};
use crate::config::source::{read_files, FilesKept};
use crate::filters::Registry;
use crate::model::{validate, Model};
use crate::snapshot::{compile, Inherited, Resolution, Snapshot};
use crate::upstream::cluster::ClusterStates;

/// Everything the configuration produced, ready to serve or to report.
pub struct Loaded {
    pub gateway: GatewayFile,
    pub model: Model,
    pub snapshot: Snapshot,
    pub diagnostics: Vec<Diagnostic>,
    /// What the next reload falls back on.
    pub last_good: LastGood,
}

impl Loaded {
    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }

    /// Resources with errors, per kind, for `pingress_resource_errors`.
    pub fn resource_errors(&self) -> BTreeMap<String, usize> {
        let mut resources: HashSet<Named> = HashSet::new();
        for diagnostic in self.diagnostics.iter().filter(|d| d.is_error()) {
            if let Location::Resource(resource) = &diagnostic.location {
                resources.insert(resource.named());
            }
        }
        let mut per_kind = BTreeMap::new();
        for resource in resources {
            *per_kind.entry(resource.kind).or_insert(0) += 1;
        }
        per_kind
    }
}

/// The last good version of what the serving configuration was built from.
#[derive(Debug, Default)]
pub struct LastGood {
    /// Each resource's last version that validated without error.
    resources: HashMap<Named, Arc<RawResource>>,
    /// What the resource files' source keeps for its next read.
    files: FilesKept,
    /// What the snapshots still live leave to the next build: shared by
    /// every build of one process, so a reload never multiplies a breaker,
    /// a probe or a rate limit.
    inherited: Arc<Inherited>,
}

impl LastGood {
    /// The cluster states every build of this line of snapshots shares.
    pub fn clusters(&self) -> &Arc<ClusterStates> {
        &self.inherited.clusters
    }

    /// `raw` itself, or the last good copy of it when nothing about it
    /// changed, where it sits included.
    fn share(&self, raw: RawResource) -> Arc<RawResource> {
        match self.resources.get(&raw.id.named()) {
            Some(good) if good.id == raw.id && same_content(good, &raw) => good.clone(),
            _ => Arc::new(raw),
        }
    }
}

/// Rounds of falling back: a resource's own last good version, then the
/// Secrets it refers to, then what those brought back.
const FALLBACK_ROUNDS: usize = 3;

/// Runs the whole pipeline once. `Err` only when the gateway file itself
/// is unusable; resource problems are in `diagnostics`.
pub fn load(
    gateway_path: &Path,
    resolution: Resolution,
    registry: &Registry,
    previous: &LastGood,
) -> Result<Loaded, Box<Diagnostic>> {
    let (gateway, mut diagnostics) = load_gateway_file(gateway_path)?;
    let arrival = read_files(&gateway, &previous.files, |raw| previous.share(raw));
    diagnostics.extend(arrival.diagnostics);
    let mut resources = arrival.resources;
    let mut last_good = LastGood {
        files: arrival.kept,
        inherited: previous.inherited.clone(),
        ..LastGood::default()
    };

    let ambassador_id = std::env::var("AMBASSADOR_ID").unwrap_or_else(|_| "default".into());
    let validate_all = |resources: &[Arc<RawResource>]| {
        let (mut model, mut diags) = validate(resources, &ambassador_id, registry);
        diags.extend(crate::model::upstream_trust::apply(
            &mut model,
            gateway.upstream_tls,
        ));
        (model, diags)
    };
    let (model, model_diags, restored) =
        validate_falling_back(&mut resources, previous, validate_all);
    diagnostics.extend(model_diags);
    last_good.resources = still_good(&resources, &restored, &diagnostics, previous);

    let (mut snapshot, compile_diags) = compile(&model, resolution, &previous.inherited);
    diagnostics.extend(compile_diags);
    snapshot.sources.extend(gateway.resources.iter().cloned());
    Ok(Loaded {
        gateway,
        model,
        snapshot,
        diagnostics,
        last_good,
    })
}

/// Validates `resources`, putting back the last good version of what an
/// edit broke (see [`fall_back`]) and validating again, for a few rounds.
/// Returns the model, its diagnostics (the errors of the versions put back
/// included) and the resources put back.
fn validate_falling_back(
    resources: &mut Vec<Arc<RawResource>>,
    previous: &LastGood,
    validate: impl Fn(&[Arc<RawResource>]) -> (Model, Vec<Diagnostic>),
) -> (Model, Vec<Diagnostic>, HashSet<Named>) {
    let (mut model, mut model_diags) = validate(resources);
    // Errors of versions that a last good one replaced: still reported.
    let mut replaced_errors = Vec::new();
    let mut restored: HashSet<Named> = HashSet::new();
    for _ in 0..FALLBACK_ROUNDS {
        let fallback = fall_back(resources, &model_diags, previous, &mut restored);
        if fallback.restored.is_empty() {
            break;
        }
        let by_resource = errors_by_resource(&model_diags);
        let errors_of = |resource: &ResourceRef| -> Vec<Diagnostic> {
            by_resource
                .get(resource)
                .map(|found| found.iter().map(|d| (*d).clone()).collect())
                .unwrap_or_default()
        };
        for resource in &fallback.restored {
            replaced_errors.extend(errors_of(resource));
            replaced_errors.push(
                Diagnostic::warning(
                    Location::Resource(resource.clone()),
                    "its last good version keeps serving: the current one is invalid, or missing \
                     while in use",
                )
                .code(Code::LastGood),
            );
        }
        // A Secret's problem is reported where it shows: on what uses it.
        for resource in &fallback.users {
            replaced_errors.extend(errors_of(resource));
        }
        (model, model_diags) = validate(resources);
    }
    // A user still failing after its Secret was put back reports the
    // same error twice: once is enough.
    let final_errors = errors_by_resource(&model_diags);
    replaced_errors.retain(|d| match &d.location {
        Location::Resource(resource) => final_errors
            .get(resource)
            .is_none_or(|found| !found.contains(&d)),
        _ => true,
    });
    replaced_errors.dedup();
    replaced_errors.extend(model_diags);
    (model, replaced_errors, restored)
}

/// Each resource's last version that validated without error: the one
/// serving now, or the one before when it failed or was put back.
fn still_good(
    resources: &[Arc<RawResource>],
    restored: &HashSet<Named>,
    diagnostics: &[Diagnostic],
    previous: &LastGood,
) -> HashMap<Named, Arc<RawResource>> {
    let failed = errors_by_resource(diagnostics);
    let mut good = HashMap::new();
    for resource in resources {
        let identity = resource.id.named();
        let kept = if restored.contains(&identity) || failed.contains_key(&resource.id) {
            previous.resources.get(&identity)
        } else {
            Some(resource)
        };
        if let Some(kept) = kept {
            good.insert(identity, kept.clone());
        }
    }
    good
}

/// The errors of each resource that has some.
fn errors_by_resource(diagnostics: &[Diagnostic]) -> HashMap<&ResourceRef, Vec<&Diagnostic>> {
    let mut errors: HashMap<&ResourceRef, Vec<&Diagnostic>> = HashMap::new();
    for diagnostic in diagnostics.iter().filter(|d| d.is_error()) {
        if let Location::Resource(resource) = &diagnostic.location {
            errors.entry(resource).or_default().push(diagnostic);
        }
    }
    errors
}

/// What one round of falling back did.
struct Fallback {
    /// Resources put back at their last good version.
    restored: Vec<ResourceRef>,
    /// Failing resources whose Secrets were looked at: their errors are
    /// what the put-back Secrets caused.
    users: Vec<ResourceRef>,
}

/// Puts back the last good version of:
/// - each resource that has an error now and had a different, valid
///   version before;
/// - each Secret, changed or deleted, that the error of a resource whose
///   own content is its last good one is blamed on (that Secret is what
///   broke);
/// - each resource whose place (file and document) now holds one with an
///   error or one that is ignored as a whole: a misspelt kind, apiVersion
///   or name is a mistake, not a deletion. A warning about one field of a
///   renamed resource is not.
fn fall_back(
    resources: &mut Vec<Arc<RawResource>>,
    diagnostics: &[Diagnostic],
    previous: &LastGood,
    restored: &mut HashSet<Named>,
) -> Fallback {
    let errors = errors_by_resource(diagnostics);
    // Places whose resource has an error or is ignored.
    let troubled: HashSet<&Source> = diagnostics
        .iter()
        .filter(|d| d.is_error() || d.code == Code::ResourceIgnored)
        .filter_map(|d| match &d.location {
            Location::Resource(resource) => Some(&resource.source),
            _ => None,
        })
        .collect();
    let mut fallback = Fallback {
        restored: Vec::new(),
        users: Vec::new(),
    };
    if troubled.is_empty() {
        return fallback;
    }
    let mut copies: HashMap<Named, usize> = HashMap::new();
    for resource in resources.iter() {
        *copies.entry(resource.id.named()).or_default() += 1;
    }
    // The Secrets that failing resources with good content of their own
    // blame their errors on.
    let mut blamed: HashSet<&Named> = HashSet::new();
    for resource in resources.iter() {
        let identity = resource.id.named();
        let Some(said) = errors.get(&resource.id) else {
            continue;
        };
        let content_was_good = previous
            .resources
            .get(&identity)
            .is_some_and(|good| restored.contains(&identity) || same_content(good, resource));
        if content_was_good {
            blamed.extend(said.iter().flat_map(|d| &d.causes));
            fallback.users.push(resource.id.clone());
        }
    }
    for resource in resources.iter_mut() {
        let identity = resource.id.named();
        // A duplicate's error is about the duplicate, not its content.
        if restored.contains(&identity) || copies.get(&identity) != Some(&1) {
            continue;
        }
        let wanted = if resource.id.kind == "Secret" {
            blamed.contains(&identity)
        } else {
            errors.contains_key(&resource.id)
        };
        let Some(good) = previous.resources.get(&identity).filter(|_| wanted) else {
            continue;
        };
        if same_content(good, resource) {
            continue;
        }
        let mut back = (**good).clone();
        back.id.source = resource.id.source.clone();
        fallback.restored.push(resource.id.clone());
        *resource = Arc::new(back);
        restored.insert(identity);
    }
    for (identity, good) in &previous.resources {
        if copies.contains_key(identity) || restored.contains(identity) {
            continue;
        }
        let deleted_in_use = identity.kind == "Secret" && blamed.contains(identity);
        if deleted_in_use || troubled.contains(&good.id.source) {
            fallback.restored.push(good.id.clone());
            resources.push(good.clone());
            restored.insert(identity.clone());
        }
    }
    if !fallback.restored.iter().any(|r| r.kind == "Secret") {
        fallback.users.clear();
    }
    fallback
}

fn same_content(a: &RawResource, b: &RawResource) -> bool {
    a.api_version == b.api_version && a.labels == b.labels && a.body == b.body
}
