//! Problems found while loading and validating configuration.
//!
//! Every problem carries enough context to find and fix it without reading
//! pingress's source: the file, the YAML document, the resource, the field and
//! a hint. Loading never stops at the first problem; callers collect them all.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// Where a resource came from: file, document and (for `kind: List`) item.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// 1-based index inside a `kind: List` document.
    pub item: Option<usize>,
}

impl Source {
    pub fn new(file: &Path, document: usize) -> Self {
        Source {
            file: file.to_path_buf(),
            document,
            item: None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        Ok(())
    }
}

/// Identity of a resource: `Kind namespace/name`, plus where it was read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceRef {
    pub source: Source,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ResourceRef {
    /// Emissary keys its diagnostics `name.namespace.N` (N is the document
    /// number); the admin diag endpoint keeps that shape.
    pub fn emissary_key(&self) -> String {
        format!("{}.{}.{}", self.name, self.namespace, self.source.document)
    }

    /// The resource across edits: which file or document holds it does
    /// not matter.
    pub fn named(&self) -> Named {
        Named {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {}/{}",
            self.source, self.kind, self.namespace, self.name
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The gateway file itself or one of the paths it lists.
    File(PathBuf),
    /// A YAML document that did not yield a resource identity.
    Document(Source),
    Resource(ResourceRef),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::Document(source) => write!(f, "{source}"),
            Location::Resource(resource) => write!(f, "{resource}"),
        }
    }
}

/// What kind of problem a diagnostic reports. With the resource and the
/// field it is the diagnostic's stable identity: reloads, tools and
/// dashboards decide by it, never by the message, whose words may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// A file, directory or YAML document that cannot be read as resources.
    Unreadable,
    /// A value that is missing, of the wrong type, out of range or
    /// contradicts another field of the same resource.
    Invalid,
    /// A key the resource's schema does not have.
    UnknownKey,
    /// A key that is read but has no effect: not supported by pingress,
    /// or overridden by another key.
    KeyIgnored,
    /// The whole resource is not used because of a mistake: a misspelt
    /// apiVersion or Module name, or a duplicate. Its place (file and
    /// document) keeps the resource that was there.
    ResourceIgnored,
    /// The whole resource is not used, and that is no mistake: another
    /// controller's kind, a kind pingress does not support yet, or content
    /// it cannot use (FQDN endpoints).
    Unsupported,
    /// Another resource that this one needs is missing or broken;
    /// [`Diagnostic::causes`] name it.
    Reference,
    /// Two resources claim the same place: a route, a port, a name.
    Conflict,
    /// Valid, but it weakens security: upstream TLS without verification,
    /// process files in a directory others may write to.
    Insecure,
    /// Valid, but no request can reach it.
    Unreachable,
    /// The last good version of a resource serves in place of its
    /// current, failing one.
    LastGood,
    /// Valid, but probably not what was meant.
    Advice,
}

impl Code {
    /// The code's name, as the diag JSON shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unreadable => "unreadable",
            Code::Invalid => "invalid",
            Code::UnknownKey => "unknown-key",
            Code::KeyIgnored => "key-ignored",
            Code::ResourceIgnored => "resource-ignored",
            Code::Unsupported => "unsupported",
            Code::Reference => "reference",
            Code::Conflict => "conflict",
            Code::Insecure => "insecure",
            Code::Unreachable => "unreachable",
            Code::LastGood => "last-good",
            Code::Advice => "advice",
        }
    }
}

/// A resource by name, without where it was read: what a problem of
/// another resource can be blamed on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Named {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl Named {
    pub fn secret(namespace: &str, name: &str) -> Self {
        Named {
            kind: "Secret".to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: Code,
    pub location: Location,
    /// Dotted path of the offending field, e.g. `spec.service`.
    pub field: Option<String>,
    pub message: String,
    pub hint: Option<String>,
    /// The resources whose content caused this problem, when it is not the
    /// one reported: a TLSContext fails because its Secret has no key; a
    /// Host's certificate and its TLSContext's disagree, and either Secret
    /// may be the one that changed.
    pub causes: Vec<Named>,
}

impl Diagnostic {
    /// An error of code [`Code::Invalid`] unless [`Diagnostic::code`] says
    /// otherwise.
    pub fn error(location: Location, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code: Code::Invalid,
            location,
            field: None,
            message: message.into(),
            hint: None,
            causes: Vec::new(),
        }
    }

    /// A warning of code [`Code::Advice`] unless [`Diagnostic::code`] says
    /// otherwise.
    pub fn warning(location: Location, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            code: Code::Advice,
            ..Diagnostic::error(location, message)
        }
    }

    pub fn code(mut self, code: Code) -> Self {
        self.code = code;
        self
    }

    /// Sets the code of a diagnostic already pushed through a [`Reporter`].
    pub fn with_code(&mut self, code: Code) -> &mut Self {
        self.code = code;
        self
    }

    /// Blames a problem on the resource `cause` (too): a [`Code::Reference`].
    pub fn caused_by(&mut self, cause: Named) -> &mut Self {
        self.code = Code::Reference;
        self.causes.push(cause);
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Attaches a hint to a diagnostic already pushed through a [`Reporter`].
    pub fn with_hint(&mut self, hint: impl Into<String>) -> &mut Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The kind of the resource this is about, when it is about one.
    pub fn kind(&self) -> Option<&str> {
        match &self.location {
            Location::Resource(resource) => Some(&resource.kind),
            _ => None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}: {}", self.location)?;
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics for one resource while it is being validated, so that
/// each check only states the field and the problem.
pub struct Reporter<'a> {
    location: Location,
    sink: &'a mut Vec<Diagnostic>,
    errors: usize,
    /// Field paths starting with `.0` are reported under `.1` instead.
    rebase: Option<(String, String)>,
}

impl<'a> Reporter<'a> {
    pub fn new(location: Location, sink: &'a mut Vec<Diagnostic>) -> Self {
        Reporter {
            location,
            sink,
            errors: 0,
            rebase: None,
        }
    }

    /// Reports fields under `from` as if under `to` until [`Reporter::unrebase`]:
    /// a Host's inline `tls:` is validated by the TLSContext code, whose
    /// fields are `spec.*`, but lives at `spec.tls.*`.
    pub fn rebase(&mut self, from: &str, to: &str) {
        self.rebase = Some((from.to_string(), to.to_string()));
    }

    pub fn unrebase(&mut self) {
        self.rebase = None;
    }

    fn field_path(&self, field: &str) -> String {
        match &self.rebase {
            Some((from, to)) => match field.strip_prefix(from.as_str()) {
                Some(rest) if rest.is_empty() || rest.starts_with('.') => format!("{to}{rest}"),
                _ => field.to_string(),
            },
            None => field.to_string(),
        }
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) -> &mut Diagnostic {
        self.errors += 1;
        let field = self.field_path(field);
        self.push(Diagnostic::error(self.location.clone(), message).field(field))
    }

    pub fn warning(&mut self, field: &str, message: impl Into<String>) -> &mut Diagnostic {
        let field = self.field_path(field);
        self.push(Diagnostic::warning(self.location.clone(), message).field(field))
    }

    fn push(&mut self, diagnostic: Diagnostic) -> &mut Diagnostic {
        self.sink.push(diagnostic);
        let last = self.sink.len() - 1;
        &mut self.sink[last]
    }

    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }

    pub fn location(&self) -> &Location {
        &self.location
    }
}

/// The candidate nearest to a misspelt word, if one is near enough.
pub fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
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

/// Serde's type errors speak Rust (`expected u64`); say it in the words of
/// YAML: `expected a whole number, found the string "3s"`.
pub(crate) fn plain_words(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    else {
        return message.to_string();
    };
    let Some((found, expected)) = rest.rsplit_once(", expected ") else {
        return message.to_string();
    };
    let expected = match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "a boolean" => "true or false",
        "a sequence" => "a list",
        "unit" => "nothing",
        "a borrowed string" | "a string" => "a string",
        other if other.starts_with("struct ") || other == "a map" => "a map",
        other => other,
    };
    // What was found is quoted only where a number or true/false was
    // expected, to show the slip ("3s"); anywhere else it may be a secret
    // (a header value, a password, a PEM key) and is named by its type.
    let found = match expected {
        "a whole number (0 or more)" | "a whole number" | "true or false" | "f32" | "f64" => found,
        _ => found
            .split(" \"")
            .next()
            .and_then(|kind| kind.split(" `").next())
            .unwrap_or(found),
    };
    format!("expected {expected}, found {}", found.replace('`', ""))
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
    fn type_errors_in_plain_words() {
        assert_eq!(
            plain_words("invalid type: string \"3s\", expected u64"),
            "expected a whole number (0 or more), found string \"3s\""
        );
        assert_eq!(
            plain_words("invalid value: integer `-1`, expected u32"),
            "expected a whole number (0 or more), found integer -1"
        );
        assert_eq!(plain_words("missing field `x`"), "missing field `x`");
        assert_eq!(
            plain_words("invalid type: integer `12345678`, expected a string"),
            "expected a string, found integer"
        );
        assert_eq!(
            plain_words("invalid type: string \"Authorization: Bearer t0k3n\", expected a map"),
            "expected a map, found string"
        );
        assert_eq!(
            plain_words("invalid type: string \"x\", expected a sequence"),
            "expected a list, found string"
        );
    }
}
