//! Stage 1: read the gateway file and every resource file it names.
//!
//! The result is a flat list of [`RawResource`]s, each tagged with where it
//! came from. Nothing is interpreted beyond `apiVersion`, `kind` and
//! `metadata`; a broken document is reported and skipped, its siblings load.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use pingora::server::configuration::ServerConf;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::diagnostics::{closest, Code, Diagnostic, Location, ResourceRef, Source};
use super::downstream::DownstreamConf;
use super::runtime_dir;
use super::upstream_tls::UpstreamTlsConf;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8877";

/// The gateway file: Pingora's server settings, where the resources are, and
/// the admin listener.
#[derive(Debug)]
pub struct GatewayFile {
    pub path: PathBuf,
    pub pingora: ServerConf,
    /// Resolved against the gateway file's directory.
    pub resources: Vec<PathBuf>,
    pub admin: AdminConf,
    /// How upstreams without a CA are verified (`upstream_tls`).
    pub upstream_tls: UpstreamTlsConf,
    /// The client connections the gateway holds (`downstream`).
    pub downstream: DownstreamConf,
    /// Which of Pingora's process files are left to pingress, which keeps
    /// them in a private directory (`config::runtime_dir`).
    pub left_to_pingress: ProcessFiles,
}

/// Pingora's files of the process, each `true` when the gateway file does
/// not name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessFiles {
    pub upgrade_sock: bool,
    pub pid_file: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConf {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConf {
    fn default() -> Self {
        AdminConf {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayFileYaml {
    #[serde(default)]
    pingora: Option<Value>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    admin: Option<AdminConf>,
    #[serde(default)]
    upstream_tls: UpstreamTlsConf,
    #[serde(default)]
    downstream: DownstreamConf,
}

/// Reads the gateway file. Only a file that cannot be used at all is an
/// `Err`; lesser problems (unknown Pingora keys) come back as warnings.
pub fn load_gateway_file(path: &Path) -> Result<(GatewayFile, Vec<Diagnostic>), Box<Diagnostic>> {
    let location = Location::File(path.to_path_buf());
    let text = fs::read_to_string(path).map_err(|e| {
        Diagnostic::error(
            location.clone(),
            format!("cannot read the gateway file: {e}"),
        )
        .code(Code::Unreadable)
        .hint("pass the gateway file with -c, e.g. `pingress -c conf/pingress.yaml`")
    })?;
    let parsed: GatewayFileYaml = serde_yaml::from_str(&text).map_err(|e| {
        Box::new(
            Diagnostic::error(location.clone(), format!("invalid gateway file: {e}"))
                .code(Code::Unreadable)
                .hint(
                    "the gateway file has five keys: `pingora:` (Pingora server settings), \
             `resources:` (files or directories), `admin:` (`listen`), `upstream_tls:` \
             (`verify`) and `downstream:` (`request_head_timeout_ms`, `max_connections`, \
             `max_connections_per_client`, `max_connection_age_ms`, `tls_drain_window_ms`)",
                ),
        )
    })?;

    let mut warnings = Vec::new();
    let given = |key: &str| {
        parsed
            .pingora
            .as_ref()
            .is_some_and(|pingora| pingora.get(key).is_some())
    };
    let process_files_given = [given("upgrade_sock"), given("pid_file")];
    let pingora = match parsed.pingora {
        None | Some(Value::Null) => ServerConf::default(),
        Some(value) => {
            warn_unknown_pingora_keys(&value, &location, &mut warnings);
            serde_path_to_error::deserialize::<_, ServerConf>(value).map_err(|e| {
                Box::new(
                    Diagnostic::error(location.clone(), e.inner().to_string())
                        .field(format!("pingora.{}", e.path())),
                )
            })?
        }
    };

    let pingora = pingora.validate().map_err(|e| {
        Box::new(Diagnostic::error(location.clone(), e.to_string()).field("pingora"))
    })?;
    if pingora.threads == 0 {
        return Err(Box::new(
            Diagnostic::error(location, "threads must be at least 1").field("pingora.threads"),
        ));
    }
    let left_to_pingress = ProcessFiles {
        upgrade_sock: !process_files_given[0],
        pid_file: !process_files_given[1],
    };
    warn_about_process_files(&pingora, left_to_pingress, &location, &mut warnings);

    let base = path.parent().unwrap_or(Path::new("."));
    let resources = parsed.resources.iter().map(|r| base.join(r)).collect();
    Ok((
        GatewayFile {
            path: path.to_path_buf(),
            pingora,
            resources,
            admin: parsed.admin.unwrap_or_default(),
            upstream_tls: parsed.upstream_tls,
            downstream: parsed.downstream,
            left_to_pingress,
        },
        warnings,
    ))
}

/// Process files the gateway file names must be found again by the new
/// process of an upgrade, and must not be another user's to create first.
fn warn_about_process_files(
    pingora: &ServerConf,
    left: ProcessFiles,
    location: &Location,
    warnings: &mut Vec<Diagnostic>,
) {
    for ((field, value), placed_by_pingress) in [
        ("pingora.upgrade_sock", &pingora.upgrade_sock),
        ("pingora.pid_file", &pingora.pid_file),
    ]
    .into_iter()
    .zip([left.upgrade_sock, left.pid_file])
    {
        if placed_by_pingress {
            // Placed in a private directory when the gateway starts serving.
            continue;
        }
        if !Path::new(value.as_str()).is_absolute() {
            warnings.push(
                Diagnostic::warning(location.clone(), format!("{value:?} is a relative path"))
                    .field(field)
                    .hint("use an absolute path: a daemon changes its directory, and the old and new process of an upgrade must agree"),
            );
        } else if runtime_dir::in_world_writable_dir(Path::new(value.as_str())) {
            warnings.push(
                Diagnostic::warning(
                    location.clone(),
                    format!("{value:?} is in a directory every user may write to"),
                )
                .code(Code::Insecure)
                .field(field)
                .hint("another user could create it first (and take the listeners at an upgrade); leave the key out for a private directory of pingress's own"),
            );
        }
    }
}

/// Pingora ignores keys it does not know; a misspelt `grace_period_seconds`
/// would silently mean a 300 s shutdown, so name them.
fn warn_unknown_pingora_keys(value: &Value, location: &Location, out: &mut Vec<Diagnostic>) {
    let Value::Mapping(given) = value else { return };
    let Ok(Value::Mapping(known)) = serde_yaml::to_value(ServerConf::default()) else {
        return;
    };
    for key in given.keys() {
        if !known.contains_key(key) {
            let name = key.as_str().unwrap_or("?");
            let mut diagnostic =
                Diagnostic::warning(location.clone(), "unknown Pingora setting, ignored")
                    .code(Code::UnknownKey)
                    .field(format!("pingora.{name}"));
            let names: Vec<&str> = known.keys().filter_map(Value::as_str).collect();
            if let Some(suggestion) = closest(name, &names) {
                diagnostic.with_hint(format!("did you mean `{suggestion}`?"));
            }
            out.push(diagnostic);
        }
    }
}

/// One resource document, identified but not yet interpreted.
#[derive(Debug, Clone)]
pub struct RawResource {
    pub id: ResourceRef,
    pub api_version: String,
    pub labels: BTreeMap<String, String>,
    pub body: Mapping,
}

impl RawResource {
    pub fn location(&self) -> Location {
        Location::Resource(self.id.clone())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.body.get(key)
    }
}

/// The resource files as read.
#[derive(Debug)]
pub struct ResourceFiles {
    pub files: Vec<ResourceFile>,
    /// Paths that could not be read or listed (missing, a dangling link, a
    /// directory without permission): what they held is not known.
    pub unreadable: Vec<PathBuf>,
}

/// One resource file as read.
#[derive(Debug)]
pub struct ResourceFile {
    pub path: PathBuf,
    pub resources: Vec<RawResource>,
    pub state: FileState,
}

/// Whether a file's resources are all it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Every document was read.
    Whole,
    /// No document at all: empty, only whitespace, comments or `---`.
    /// A file being written looks like this, so it removes nothing.
    Empty,
    /// A document could not be read (a YAML error, a document without an
    /// identity), the file changed while it was read, or it could not be
    /// read: its resources are not known whole.
    Incomplete,
}

/// How long a file must stay the same between two reads to be believed,
/// and how often it is tried.
const SAME_TWICE_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);
const SAME_TWICE_TRIES: usize = 4;

/// Reads every file under the given paths. Directories are walked in name
/// order so that resource order (which decides canary and conflict order) is
/// stable across machines.
/// File names in diagnostics are shown relative to the gateway file's
/// directory, as they are written under `resources:`.
///
/// Each file is read twice, a moment apart, and only content that read the
/// same both times is used: a writer caught in the middle of a file would
/// otherwise remove the resources it had not written yet.
pub fn load_resources(gateway: &GatewayFile) -> (ResourceFiles, Vec<Diagnostic>) {
    let root = gateway.path.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    let mut unreadable = Vec::new();
    let mut diagnostics = Vec::new();
    for (index, path) in gateway.resources.iter().enumerate() {
        if let Err(e) = fs::metadata(path) {
            unreadable.push(path.clone());
            let shown = path.strip_prefix(root).unwrap_or(path).display();
            let message = match e.kind() {
                std::io::ErrorKind::NotFound => format!("{shown} does not exist"),
                _ => format!("cannot read {shown}: {e}"),
            };
            diagnostics.push(
                Diagnostic::error(Location::File(gateway.path.clone()), message)
                    .code(Code::Unreadable)
                    .field(format!("resources[{index}]"))
                    .hint("paths under `resources:` are relative to the gateway file"),
            );
            continue;
        }
        collect_files(path, true, &mut files, &mut unreadable, &mut diagnostics);
    }
    let texts = read_settled(&files);
    let mut read = Vec::new();
    for (file, text) in files.into_iter().zip(texts) {
        let shown = file.strip_prefix(root).unwrap_or(&file).to_path_buf();
        let (resources, state) = match text {
            Ok(Some(text)) => {
                let errors_before = diagnostics.len();
                let mut resources = Vec::new();
                let documents = parse_documents(&shown, &text, &mut resources, &mut diagnostics);
                let state = if diagnostics.len() > errors_before {
                    FileState::Incomplete
                } else if documents == 0 {
                    FileState::Empty
                } else {
                    FileState::Whole
                };
                (resources, state)
            }
            Ok(None) => {
                diagnostics.push(
                    Diagnostic::warning(
                        Location::File(shown),
                        "the file kept changing while it was read; its content is not used yet",
                    )
                    .code(Code::Unreadable)
                    .hint(WRITE_BY_RENAME),
                );
                (Vec::new(), FileState::Incomplete)
            }
            Err(e) => {
                diagnostics.push(
                    Diagnostic::error(Location::File(shown), format!("cannot read: {e}"))
                        .code(Code::Unreadable),
                );
                (Vec::new(), FileState::Incomplete)
            }
        };
        read.push(ResourceFile {
            path: file,
            resources,
            state,
        });
    }
    let files = ResourceFiles {
        files: read,
        unreadable,
    };
    (files, diagnostics)
}

/// How resource files should be written.
pub const WRITE_BY_RENAME: &str =
    "write the new content to another file and rename it into place, as Kubernetes volumes do";

/// Each file's text once two reads a moment apart agree; `None` for a file
/// that never read the same twice. One pause covers all files.
fn read_settled(files: &[PathBuf]) -> Vec<std::io::Result<Option<String>>> {
    let mut texts: Vec<std::io::Result<Option<String>>> = files
        .iter()
        .map(|f| fs::read_to_string(f).map(Some))
        .collect();
    for _ in 0..SAME_TWICE_TRIES {
        std::thread::sleep(SAME_TWICE_PAUSE);
        let mut unsettled = false;
        for (file, text) in files.iter().zip(texts.iter_mut()) {
            let Ok(Some(first)) = text else { continue };
            match fs::read_to_string(file) {
                Ok(again) if again == *first => {}
                Ok(again) => {
                    *first = again;
                    unsettled = true;
                }
                Err(e) => *text = Err(e),
            }
        }
        if !unsettled {
            return texts;
        }
    }
    // A file that changed on the last try is not believed.
    let last: Vec<_> = files.iter().map(|f| fs::read_to_string(f).ok()).collect();
    texts
        .into_iter()
        .zip(last)
        .map(|(text, again)| match text {
            Ok(Some(first)) if again.as_deref() != Some(first.as_str()) => Ok(None),
            other => other,
        })
        .collect()
}

fn collect_files(
    path: &Path,
    named: bool,
    out: &mut Vec<PathBuf>,
    unreadable: &mut Vec<PathBuf>,
    diags: &mut Vec<Diagnostic>,
) {
    let metadata = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            unreadable.push(path.to_path_buf());
            // A dangling link inside a resource directory.
            diags.push(
                Diagnostic::error(
                    Location::File(path.to_path_buf()),
                    format!("cannot read: {e}"),
                )
                .code(Code::Unreadable),
            );
            return;
        }
    };
    if metadata.is_file() {
        if named || is_yaml(path) {
            out.push(path.to_path_buf());
        }
        return;
    }
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) => {
            unreadable.push(path.to_path_buf());
            diags.push(
                Diagnostic::error(
                    Location::File(path.to_path_buf()),
                    format!("cannot list directory: {e}"),
                )
                .code(Code::Unreadable),
            );
            return;
        }
    };
    let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    children.sort();
    for child in children {
        // Kubernetes ConfigMap and Secret volumes hold the real files in
        // `..<timestamp>` directories behind a `..data` symlink; the visible
        // names are links into it. Reading the dot entries would load every
        // resource twice.
        let hidden = child
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !hidden {
            collect_files(&child, false, out, unreadable, diags);
        }
    }
}

/// Whether a file in a resource directory is read as one.
pub(crate) fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Splits a file into YAML documents and `kind: List` items; returns how
/// many documents held something (an empty document is not one).
pub fn parse_documents(
    file: &Path,
    text: &str,
    out: &mut Vec<RawResource>,
    diags: &mut Vec<Diagnostic>,
) -> usize {
    let mut documents = 0;
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let source = Source::new(file, index + 1);
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                diags.push(
                    Diagnostic::error(Location::Document(source), format!("invalid YAML: {e}"))
                        .code(Code::Unreadable)
                        .hint("documents after this one in the same file were not read"),
                );
                // The YAML stream cannot resynchronise after a syntax error.
                return documents + 1;
            }
        };
        if value != Value::Null {
            documents += 1;
        }
        match value {
            Value::Null => {}
            Value::Mapping(body) if is_list(&body) => {
                let items = match body.get("items") {
                    Some(Value::Sequence(items)) => items.clone(),
                    Some(Value::Null) | None => Vec::new(),
                    Some(_) => {
                        diags.push(
                            Diagnostic::error(Location::Document(source), "items must be a list")
                                .code(Code::Unreadable)
                                .field("items"),
                        );
                        continue;
                    }
                };
                for (item_index, item) in items.into_iter().enumerate() {
                    let mut item_source = source.clone();
                    item_source.item = Some(item_index + 1);
                    identify(item_source, item, out, diags);
                }
            }
            other => identify(source, other, out, diags),
        }
    }
    documents
}

fn is_list(body: &Mapping) -> bool {
    body.get("kind").and_then(Value::as_str) == Some("List")
}

fn identify(source: Source, value: Value, out: &mut Vec<RawResource>, diags: &mut Vec<Diagnostic>) {
    let location = Location::Document(source.clone());
    let Value::Mapping(body) = value else {
        diags.push(
            Diagnostic::error(
                location,
                "a resource must be a YAML map with apiVersion, kind, metadata and spec",
            )
            .code(Code::Unreadable),
        );
        return;
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_string);
    let Some(kind) = text("kind") else {
        diags.push(Diagnostic::error(location, "missing kind").field("kind"));
        return;
    };
    let Some(api_version) = text("apiVersion") else {
        diags.push(
            Diagnostic::error(location, format!("{kind} has no apiVersion"))
                .field("apiVersion")
                .hint("use getambassador.io/v3alpha1 (or v1 for a Secret)"),
        );
        return;
    };
    let metadata = body.get("metadata").and_then(Value::as_mapping);
    let meta_text = |key: &str| {
        metadata
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let Some(name) = meta_text("name").filter(|n| !n.is_empty()) else {
        diags.push(
            Diagnostic::error(location, format!("{kind} has no metadata.name"))
                .field("metadata.name"),
        );
        return;
    };
    let namespace = meta_text("namespace").unwrap_or_else(|| "default".to_string());
    let labels = metadata
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .map(|labels| {
            labels
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar_text(v)?)))
                .collect()
        })
        .unwrap_or_default();
    out.push(RawResource {
        id: ResourceRef {
            source,
            kind,
            namespace,
            name,
        },
        api_version,
        labels,
        body,
    });
}

/// Label values are strings in Kubernetes, but YAML users write `true` or `1`.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<RawResource>, Vec<Diagnostic>) {
        let mut out = Vec::new();
        let mut diags = Vec::new();
        parse_documents(Path::new("r.yaml"), text, &mut out, &mut diags);
        (out, diags)
    }

    #[test]
    fn reads_many_documents_and_lists() {
        let (resources, diags) = parse(
            "apiVersion: getambassador.io/v3alpha1\nkind: Mapping\nmetadata: {name: a}\n\
             ---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Secret\n  \
             metadata: {name: s, namespace: prod, labels: {tier: 1}}\n",
        );
        assert!(diags.is_empty(), "{diags:?}");
        assert_eq!(resources.len(), 2);
        assert_eq!(resources[0].id.namespace, "default");
        assert_eq!(resources[1].id.source.document, 3);
        assert_eq!(resources[1].id.source.item, Some(1));
        assert_eq!(resources[1].labels["tier"], "1");
    }

    #[test]
    fn broken_document_keeps_earlier_ones() {
        let (resources, diags) =
            parse("apiVersion: v1\nkind: Secret\nmetadata: {name: ok}\n---\nkind: [unclosed\n");
        assert_eq!(resources.len(), 1);
        assert_eq!(diags.len(), 1);
        assert!(
            diags[0].to_string().contains("r.yaml document 2"),
            "{}",
            diags[0]
        );
    }

    #[test]
    fn missing_identity_is_reported() {
        let (resources, diags) = parse("kind: Mapping\napiVersion: getambassador.io/v3alpha1\n");
        assert!(resources.is_empty());
        assert_eq!(diags[0].field.as_deref(), Some("metadata.name"));
    }
}
