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
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::diagnostics::{Code, Diagnostic, Location, ResourceRef, Source};
use crate::config::load::{
    load_gateway_file, load_resources, FileState, GatewayFile, RawResource, WRITE_BY_RENAME,
};
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
        let mut resources: HashSet<Identity> = HashSet::new();
        for diagnostic in self.diagnostics.iter().filter(|d| d.is_error()) {
            if let Location::Resource(resource) = &diagnostic.location {
                resources.insert(identity_of(resource));
            }
        }
        let mut per_kind = BTreeMap::new();
        for (kind, _, _) in resources {
            *per_kind.entry(kind).or_insert(0) += 1;
        }
        per_kind
    }
}

/// A resource across edits: which file or document holds it does not
/// matter. Kind, namespace, name.
type Identity = (String, String, String);

fn identity_of(resource: &ResourceRef) -> Identity {
    (
        resource.kind.clone(),
        resource.namespace.clone(),
        resource.name.clone(),
    )
}

/// The last good version of what the serving configuration was built from.
#[derive(Debug, Default)]
pub struct LastGood {
    /// Each resource's last version that validated without error.
    resources: HashMap<Identity, Arc<RawResource>>,
    /// Each file's resources the last time its content was known whole.
    files: HashMap<PathBuf, Vec<Arc<RawResource>>>,
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
        match self.resources.get(&identity_of(&raw.id)) {
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
    let (read, load_diags) = load_resources(&gateway);
    diagnostics.extend(load_diags);
    let mut last_good = LastGood {
        inherited: previous.inherited.clone(),
        ..LastGood::default()
    };
    let mut resources = Vec::new();
    // A directory that cannot be listed, or a listed path that is missing
    // (renamed, a mount not there yet), removes nothing it held.
    let listed: HashSet<&Path> = read.files.iter().map(|f| f.path.as_path()).collect();
    for (path, old) in &previous.files {
        let hidden = read.unreadable.iter().any(|root| path.starts_with(root));
        if hidden && !listed.contains(path.as_path()) && !old.is_empty() {
            diagnostics.push(
                Diagnostic::warning(
                    Location::File(path.clone()),
                    format!(
                        "cannot be read now; its last good content ({} resources) keeps serving",
                        old.len()
                    ),
                )
                .code(Code::LastGood),
            );
            resources.extend(old.iter().cloned());
            last_good.files.insert(path.clone(), old.clone());
        }
    }
    for file in read.files {
        let kept = previous.files.get(&file.path).filter(|old| !old.is_empty());
        // What did not change is shared with the last good configuration
        // rather than held twice.
        let read = file.resources.into_iter().map(|raw| previous.share(raw));
        let serving: Vec<Arc<RawResource>> = match (file.state, kept) {
            (FileState::Whole, _) | (_, None) => read.collect(),
            (FileState::Empty, Some(old)) => {
                diagnostics.push(
                    Diagnostic::warning(
                        Location::File(file.path.clone()),
                        format!(
                            "the file holds no document; its last good content ({} resources) \
                             keeps serving until it holds documents again or is deleted",
                            old.len()
                        ),
                    )
                    .code(Code::LastGood)
                    .hint(WRITE_BY_RENAME),
                );
                old.clone()
            }
            (FileState::Incomplete, Some(old)) => {
                // What was read applies; what could not be read is not
                // taken as removed.
                let read: Vec<Arc<RawResource>> = read.collect();
                let identities: HashSet<Identity> =
                    read.iter().map(|r| identity_of(&r.id)).collect();
                let missing: Vec<Arc<RawResource>> = old
                    .iter()
                    .filter(|r| !identities.contains(&identity_of(&r.id)))
                    .cloned()
                    .collect();
                if !missing.is_empty() {
                    diagnostics.push(
                        Diagnostic::warning(
                            Location::File(file.path.clone()),
                            format!(
                                "part of the file could not be read; {} resources it held keep \
                             serving their last good version",
                                missing.len()
                            ),
                        )
                        .code(Code::LastGood),
                    );
                }
                read.into_iter().chain(missing).collect()
            }
        };
        resources.extend(serving.iter().cloned());
        last_good.files.insert(file.path, serving);
    }

    let ambassador_id = std::env::var("AMBASSADOR_ID").unwrap_or_else(|_| "default".into());
    let run = |resources: &[Arc<RawResource>]| {
        let (mut model, mut diags) = validate(resources, &ambassador_id, registry);
        diags.extend(crate::model::upstream_trust::apply(
            &mut model,
            gateway.upstream_tls,
        ));
        (model, diags)
    };
    let (mut model, mut model_diags) = run(&resources);
    // Errors of versions that a last good one replaced: still reported.
    let mut replaced_errors = Vec::new();
    let mut restored: HashSet<Identity> = HashSet::new();
    for _ in 0..FALLBACK_ROUNDS {
        let fallback = fall_back(&mut resources, &model_diags, previous, &mut restored);
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
        (model, model_diags) = run(&resources);
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
    diagnostics.extend(replaced_errors);
    diagnostics.extend(model_diags);

    let failed = errors_by_resource(&diagnostics);
    for resource in &resources {
        let identity = identity_of(&resource.id);
        let good = if restored.contains(&identity) || failed.contains_key(&resource.id) {
            previous.resources.get(&identity)
        } else {
            Some(resource)
        };
        if let Some(good) = good {
            last_good.resources.insert(identity, good.clone());
        }
    }

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
    restored: &mut HashSet<Identity>,
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
    let mut copies: HashMap<Identity, usize> = HashMap::new();
    for resource in resources.iter() {
        *copies.entry(identity_of(&resource.id)).or_default() += 1;
    }
    // The Secrets that failing resources with good content of their own
    // blame their errors on.
    let mut blamed: HashSet<(&str, &str)> = HashSet::new();
    for resource in resources.iter() {
        let identity = identity_of(&resource.id);
        let Some(said) = errors.get(&resource.id) else {
            continue;
        };
        let content_was_good = previous
            .resources
            .get(&identity)
            .is_some_and(|good| restored.contains(&identity) || same_content(good, resource));
        if content_was_good {
            blamed.extend(
                said.iter()
                    .filter_map(|d| d.cause.as_ref())
                    .filter(|cause| cause.kind == "Secret")
                    .map(|cause| (cause.namespace.as_str(), cause.name.as_str())),
            );
            fallback.users.push(resource.id.clone());
        }
    }
    let named = |namespace: &str, name: &str| blamed.contains(&(namespace, name));
    for resource in resources.iter_mut() {
        let identity = identity_of(&resource.id);
        // A duplicate's error is about the duplicate, not its content.
        if restored.contains(&identity) || copies.get(&identity) != Some(&1) {
            continue;
        }
        let wanted = if resource.id.kind == "Secret" {
            named(&identity.1, &identity.2)
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
        let (kind, namespace, name) = identity;
        let deleted_in_use = kind == "Secret" && named(namespace, name);
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
