//! Where resources come from, as the rest of the pipeline sees it.
//!
//! A source hands over every resource it holds now, each with its identity
//! and its location ([`RawResource::id`]), as an [`Arrival`]. What a source
//! cannot read whole, it answers for itself: the resource files below keep
//! the last good content of a file that is empty, half-read or out of
//! sight, so that a writer caught mid-write removes nothing. Validation,
//! the per-resource last good versions and compilation come after, and do
//! not know whether a resource came from a file or, later, from an object
//! of the Kubernetes API.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::diagnostics::{Code, Diagnostic, Location, Named};
use super::load::{load_resources, FileState, GatewayFile, RawResource, WRITE_BY_RENAME};

/// The resources a source holds now, and what it had to say reading them.
pub struct Arrival {
    pub resources: Vec<Arc<RawResource>>,
    pub diagnostics: Vec<Diagnostic>,
    /// What the source needs at its next read.
    pub kept: FilesKept,
}

/// Each resource file's resources the last time its content was known
/// whole, by path: in a fixed order, so that "the first one wins" rules
/// (duplicates, the one Module) do not change from one read to the next.
#[derive(Debug, Default)]
pub struct FilesKept(BTreeMap<PathBuf, Vec<Arc<RawResource>>>);

/// Reads the resource files the gateway file names. A file or directory
/// that cannot be read now, a file with no document and the part of a file
/// that could not be read keep their `kept` content. `share` gives a
/// resource that did not change the copy the serving configuration already
/// holds.
pub fn read_files(
    gateway: &GatewayFile,
    kept: &FilesKept,
    share: impl Fn(RawResource) -> Arc<RawResource>,
) -> Arrival {
    let (read, diagnostics) = load_resources(gateway);
    let mut arrival = Arrival {
        resources: Vec::new(),
        diagnostics,
        kept: FilesKept::default(),
    };
    // A directory that cannot be listed, or a listed path that is missing
    // (renamed, a mount not there yet), removes nothing it held.
    let listed: HashSet<&Path> = read.files.iter().map(|f| f.path.as_path()).collect();
    for (path, old) in &kept.0 {
        let hidden = read.unreadable.iter().any(|root| path.starts_with(root));
        if hidden && !listed.contains(path.as_path()) && !old.is_empty() {
            arrival.diagnostics.push(
                Diagnostic::warning(
                    Location::File(path.clone()),
                    format!(
                        "cannot be read now; its last good content ({} resources) keeps serving",
                        old.len()
                    ),
                )
                .code(Code::LastGood),
            );
            arrival.keep(path.clone(), old.clone());
        }
    }
    for file in read.files {
        let old = kept.0.get(&file.path).filter(|old| !old.is_empty());
        let read = file.resources.into_iter().map(&share).collect();
        let serving = match (file.state, old) {
            (FileState::Whole, _) | (_, None) => read,
            (FileState::Empty, Some(old)) => {
                arrival.diagnostics.push(
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
                let (serving, missing) = with_unread(read, old);
                if missing > 0 {
                    arrival.diagnostics.push(
                        Diagnostic::warning(
                            Location::File(file.path.clone()),
                            format!(
                                "part of the file could not be read; {missing} resources it held \
                                 keep serving their last good version"
                            ),
                        )
                        .code(Code::LastGood),
                    );
                }
                serving
            }
        };
        arrival.keep(file.path, serving);
    }
    arrival
}

impl Arrival {
    fn keep(&mut self, path: PathBuf, resources: Vec<Arc<RawResource>>) {
        self.resources.extend(resources.iter().cloned());
        self.kept.0.insert(path, resources);
    }
}

/// What was read of a half-read file applies; what could not be read is
/// not taken as removed. Returns both, and how many came from `old`.
fn with_unread(
    read: Vec<Arc<RawResource>>,
    old: &[Arc<RawResource>],
) -> (Vec<Arc<RawResource>>, usize) {
    let present: HashSet<Named> = read.iter().map(|r| r.id.named()).collect();
    let unread: Vec<Arc<RawResource>> = old
        .iter()
        .filter(|r| !present.contains(&r.id.named()))
        .cloned()
        .collect();
    let count = unread.len();
    (read.into_iter().chain(unread).collect(), count)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::config::load::load_gateway_file;

    const MAPPING: &str = "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\n\
                           metadata:\n  name: a\nspec:\n  prefix: /a/\n  service: a\n";

    fn names(arrival: &Arrival) -> Vec<String> {
        arrival
            .resources
            .iter()
            .map(|r| r.id.name.clone())
            .collect()
    }

    #[test]
    fn a_file_without_documents_keeps_its_content_until_it_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("resources")).unwrap();
        fs::write(dir.path().join("gateway.yaml"), "resources: [resources]\n").unwrap();
        let file = dir.path().join("resources").join("a.yaml");
        fs::write(&file, MAPPING).unwrap();
        let (gateway, _) = load_gateway_file(&dir.path().join("gateway.yaml")).unwrap();

        let first = read_files(&gateway, &FilesKept::default(), Arc::new);
        assert_eq!(names(&first), ["a"]);
        assert!(first.diagnostics.is_empty(), "{:?}", first.diagnostics);

        fs::write(&file, "# being written\n").unwrap();
        let emptied = read_files(&gateway, &first.kept, Arc::new);
        assert_eq!(names(&emptied), ["a"]);
        assert_eq!(emptied.diagnostics.len(), 1);
        assert_eq!(emptied.diagnostics[0].code, Code::LastGood);

        fs::remove_file(&file).unwrap();
        let deleted = read_files(&gateway, &emptied.kept, Arc::new);
        assert!(names(&deleted).is_empty());
    }
}
