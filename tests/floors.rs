//! The floors of the crate, checked against its imports.
//!
//! ARCHITECTURE.md draws the top-level modules of `src/` on floors (its
//! `floors` block, top floor first). A module's non-test code may name
//! modules on its own floor or below, and the modules of one floor may not
//! import each other in a loop. This test reads that block and every file
//! of the library with plain std: `crate::` and `super::` paths, in `use`
//! trees (groups included) and inline, and the paths serde attributes
//! carry in strings. Comments, other strings and `#[cfg(test)]` items are
//! left out. So the picture in ARCHITECTURE.md is what the imports say.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

#[test]
fn imports_go_down_the_floors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let floors = read_floors(&fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap());
    let lib = fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let mut problems = Vec::new();

    let declared = declared_modules(&lib);
    let mut floor_of: BTreeMap<String, usize> = BTreeMap::new();
    for (level, (_, modules)) in floors.iter().enumerate() {
        for module in modules {
            if !declared.contains(module) {
                problems.push(format!(
                    "ARCHITECTURE.md puts `{module}` on a floor; src/lib.rs has no such module"
                ));
            }
            if floor_of.insert(module.clone(), level).is_some() {
                problems.push(format!("ARCHITECTURE.md puts `{module}` on two floors"));
            }
        }
    }
    for module in &declared {
        if !floor_of.contains_key(module) {
            problems.push(format!("`{module}` is on no floor of ARCHITECTURE.md"));
        }
    }

    let reexports = reexports(&lib);
    let mut same_floor: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for import in imports(&root.join("src")) {
        let to = match reexports.get(&import.target) {
            Some(module) => module.clone(),
            None => import.target.clone(),
        };
        if to == import.module {
            continue;
        }
        let (Some(&from_floor), Some(&to_floor)) =
            (floor_of.get(&import.module), floor_of.get(&to))
        else {
            if !declared.contains(&to) {
                problems.push(format!(
                    "{}:{}: `{}` is neither a module nor re-exported by src/lib.rs",
                    import.file, import.line, import.path
                ));
            }
            continue;
        };
        if from_floor < to_floor {
            problems.push(format!(
                "{}:{}: `{}` ({}) names `{}`, a floor above it ({}): {}",
                import.file,
                import.line,
                import.module,
                floors[from_floor].0,
                to,
                floors[to_floor].0,
                import.path
            ));
        } else if from_floor == to_floor {
            same_floor.entry(import.module).or_default().insert(to);
        }
    }
    if let Some(cycle) = find_cycle(&same_floor) {
        problems.push(format!(
            "modules of one floor import each other in a loop: {}",
            cycle.join(" -> ")
        ));
    }
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// ARCHITECTURE.md and src/lib.rs
// ---------------------------------------------------------------------------

/// The floors of the ```floors block, bottom first: `name: module module`.
fn read_floors(architecture: &str) -> Vec<(String, Vec<String>)> {
    let block = architecture
        .split("```floors\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("ARCHITECTURE.md has no ```floors block");
    let mut floors: Vec<(String, Vec<String>)> = block
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (name, modules) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("a floor is `name: modules`, not {line:?}"));
            let modules = modules.split_whitespace().map(str::to_string).collect();
            (name.trim().to_string(), modules)
        })
        .collect();
    floors.reverse();
    floors
}

/// The top-level modules: `mod name;` lines of src/lib.rs.
fn declared_modules(lib: &str) -> BTreeSet<String> {
    lib.lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("pub ").unwrap_or(line.trim());
            line.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect()
}

/// Names src/lib.rs re-exports (`pub use cli::Pingress;`), by the module
/// they come from.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    lib.lines()
        .filter_map(|line| {
            let path = line.trim().strip_prefix("pub use ")?.strip_suffix(';')?;
            let (module, rest) = path.split_once("::")?;
            let name = rest.rsplit("::").next()?;
            Some((name.to_string(), module.to_string()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Reading the sources
// ---------------------------------------------------------------------------

/// One path that names another part of the crate.
#[derive(Debug, PartialEq)]
struct Import {
    /// The top-level module of the file.
    module: String,
    /// The top-level module (or root name) the path names.
    target: String,
    file: String,
    line: usize,
    path: String,
}

/// Every import of the library's non-test code under `src` (src/lib.rs,
/// the crate's face, and the binaries excepted).
fn imports(src: &Path) -> Vec<Import> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    let mut out = Vec::new();
    files.sort();
    let texts: Vec<(PathBuf, String)> = files
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path).unwrap();
            (path, text)
        })
        .collect();
    for (path, text) in &texts {
        let dir = if path.ends_with("mod.rs") || path.ends_with("lib.rs") {
            path.parent().unwrap().to_path_buf()
        } else {
            path.with_extension("")
        };
        for name in test_only_modules(&strip(text).0) {
            test_only.insert(dir.join(format!("{name}.rs")));
            test_only.insert(dir.join(name).join("mod.rs"));
        }
    }
    for (path, text) in &texts {
        let relative = path.strip_prefix(src).unwrap();
        let first = relative.components().next().unwrap();
        let first = first.as_os_str().to_str().unwrap();
        if ["lib.rs", "main.rs", "bin"].contains(&first) || test_only.contains(path) {
            continue;
        }
        let module_path = module_path(relative);
        let file = format!("src/{}", relative.display());
        out.extend(
            read_imports(text, &module_path)
                .into_iter()
                .map(|(line, target, path)| Import {
                    module: module_path[0].clone(),
                    target,
                    file: file.clone(),
                    line,
                    path,
                }),
        );
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `proxy/headers.rs` is `[proxy, headers]`; `proxy/mod.rs` is `[proxy]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The top-level module each path of `text` names, with its line, for a
/// file whose module is `module_path`.
fn read_imports(text: &str, module_path: &[String]) -> Vec<(usize, String, String)> {
    let (code, attribute_paths) = strip(text);
    let code = without_tests(&code);
    let mut out = Vec::new();
    for (line, path) in attribute_paths {
        if let Some(target) = resolve(&path, module_path) {
            out.push((line, target, path));
        }
    }
    for start in path_starts(&code) {
        let line = code[..start].matches('\n').count() + 1;
        let rest = &code[start..];
        if let Some(group) = rest.strip_prefix("crate::{") {
            // `self` in a root group names the crate itself.
            for name in group_heads(group).into_iter().filter(|n| n != "self") {
                out.push((line, name.clone(), format!("crate::{{{name}, ..}}")));
            }
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches(':');
        if let Some(target) = resolve(path, module_path) {
            out.push((line, target, path.to_string()));
        }
    }
    out
}

/// Where paths that start with `crate::` or `super::` begin in `code`.
fn path_starts(code: &str) -> Vec<usize> {
    let bytes = code.as_bytes();
    let mut starts = Vec::new();
    for prefix in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix) {
            let start = from + at;
            let before = start.checked_sub(1).map(|i| bytes[i]);
            // Not the tail of another path or name (`a::super::`, `xcrate`).
            if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
                starts.push(start);
            }
            from = start + prefix.len();
        }
    }
    starts
}

/// The first names of the items of a `crate::{..}` group (the text after
/// its `{`).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expecting = true;
    let mut word = String::new();
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expecting = true,
            c if expecting && (c.is_alphanumeric() || c == '_') => word.push(c),
            _ if expecting && !word.is_empty() => {
                heads.push(std::mem::take(&mut word));
                expecting = false;
            }
            _ => {}
        }
    }
    if !word.is_empty() {
        heads.push(word);
    }
    heads
}

/// The top-level name a `crate::` or `super::` path names, seen from
/// `module_path`; `None` if it stays in the file's own top-level module.
fn resolve(path: &str, module_path: &[String]) -> Option<String> {
    let head = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if let Some(rest) = path.strip_prefix("crate::") {
        return Some(head(rest));
    }
    let mut depth = module_path.len();
    let mut rest = path;
    while let Some(next) = rest.strip_prefix("super::") {
        depth = depth.checked_sub(1)?;
        rest = next;
    }
    // `super::` from a top-level module's own file reaches the root.
    (depth == 0).then(|| head(rest))
}

/// The code of `text` without comments and with string and character
/// literals emptied (line breaks kept, so lines still count), and the
/// `crate::`/`super::` paths found in strings (serde attributes).
fn strip(text: &str) -> (String, Vec<(usize, String)>) {
    let s: Vec<char> = text.chars().collect();
    let mut code = String::with_capacity(text.len());
    let mut in_strings = Vec::new();
    let mut line = 1;
    let mut i = 0;
    let keep_lines = |from: &[char], code: &mut String, line: &mut usize| {
        for &c in from {
            if c == '\n' {
                code.push('\n');
                *line += 1;
            }
        }
    };
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let (mut depth, start) = (0, i);
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 1;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 1;
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                i += 1;
            }
            keep_lines(&s[start..i], &mut code, &mut line);
        } else if let Some((open, hashes)) = string_start(&s, i) {
            let body_start = i + open;
            let mut j = body_start;
            loop {
                match s.get(j) {
                    None => break,
                    Some('\\') if hashes.is_none() => j += 2,
                    Some('"')
                        if (0..hashes.unwrap_or(0)).all(|k| s.get(j + 1 + k) == Some(&'#')) =>
                    {
                        break
                    }
                    Some(_) => j += 1,
                }
            }
            let body: String = s[body_start..j.min(s.len())].iter().collect();
            if body.starts_with("crate::") || body.starts_with("super::") {
                in_strings.push((line, body.clone()));
            }
            code.push_str("\"\"");
            keep_lines(&s[body_start..j.min(s.len())], &mut code, &mut line);
            i = j + 1 + hashes.unwrap_or(0);
        } else if c == '\'' && (next == Some('\\') || s.get(i + 2) == Some(&'\'')) {
            // A character literal; a lifetime has no closing quote.
            let mut j = i + 2;
            while j < s.len() && s[j] != '\'' {
                j += 1;
            }
            code.push_str("' '");
            i = j + 1;
        } else {
            if c == '\n' {
                line += 1;
            }
            code.push(c);
            i += 1;
        }
    }
    (code, in_strings)
}

/// A string literal starting at `i`: the length of its opening (`"`,
/// `b"`, `r#"`, ..) and, for a raw string, its number of `#`.
fn string_start(s: &[char], i: usize) -> Option<(usize, Option<usize>)> {
    let before = i.checked_sub(1).map(|b| s[b]);
    if before.is_some_and(|b| b.is_alphanumeric() || b == '_') {
        return None;
    }
    let mut j = i;
    if s.get(j) == Some(&'b') || s.get(j) == Some(&'c') {
        j += 1;
    }
    if s.get(j) == Some(&'r') {
        j += 1;
        let hashes = s[j..].iter().take_while(|&&c| c == '#').count();
        return (s.get(j + hashes) == Some(&'"')).then_some((j + hashes + 1 - i, Some(hashes)));
    }
    (s.get(j) == Some(&'"')).then_some((j + 1 - i, None))
}

/// `code` with every item under `#[cfg(test)]` blanked out.
fn without_tests(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(start) = test_attribute(&out) {
        let end = item_end(&out, start);
        let blank: String = out[start..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(start..end, &blank);
    }
    out
}

fn test_attribute(code: &str) -> Option<usize> {
    ["#[cfg(test)]", "#![cfg(test)]", "#[cfg(all(test"]
        .iter()
        .filter_map(|a| code.find(a))
        .min()
}

/// Where the item that starts with an attribute at `start` ends: its `;`,
/// or the brace that closes its body; a `#![..]` covers the whole file.
fn item_end(code: &str, start: usize) -> usize {
    if code[start..].starts_with("#!") {
        return code.len();
    }
    let bytes = code.as_bytes();
    let mut depth = 0usize;
    let mut i = start + code[start..].find(']').unwrap_or(0) + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'[' | b'(' => depth += 1,
            b']' | b')' => depth = depth.saturating_sub(1),
            b';' if depth == 0 => return i + 1,
            b'{' if depth == 0 => {
                let mut braces = 0usize;
                for (j, &b) in bytes.iter().enumerate().skip(i) {
                    match b {
                        b'{' => braces += 1,
                        b'}' => {
                            braces -= 1;
                            if braces == 0 {
                                return j + 1;
                            }
                        }
                        _ => {}
                    }
                }
                return bytes.len();
            }
            _ => {}
        }
        i += 1;
    }
    bytes.len()
}

/// Modules a file declares only for tests: `#[cfg(test)] mod name;`.
fn test_only_modules(code: &str) -> Vec<String> {
    code.match_indices("#[cfg(test)]")
        .filter_map(|(at, attribute)| {
            let rest = code[at + attribute.len()..].trim_start();
            let rest = rest.strip_prefix("pub(crate) ").unwrap_or(rest);
            let rest = rest.strip_prefix("pub ").unwrap_or(rest);
            let name = rest.strip_prefix("mod ")?;
            let end = name.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
            name[end..]
                .trim_start()
                .starts_with(';')
                .then(|| name[..end].to_string())
        })
        .collect()
}

/// A loop among `edges`, as the modules along it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

// ---------------------------------------------------------------------------
// The reader itself
// ---------------------------------------------------------------------------

fn targets(text: &str, module_path: &[&str]) -> Vec<String> {
    let module_path: Vec<String> = module_path.iter().map(|s| s.to_string()).collect();
    read_imports(text, &module_path)
        .into_iter()
        .map(|(_, target, _)| target)
        .collect()
}

#[test]
fn use_groups_and_inline_paths_are_read() {
    let text = "use crate::{model::{Mapping, Host}, tls::edge::EdgeTls as E, self};\n\
                fn f() { crate::metrics::metrics().inc(); }\n\
                pub(crate) fn g() {}\n";
    assert_eq!(targets(text, &["proxy"]), ["model", "tls", "metrics"]);
}

#[test]
fn super_reaches_another_module_only_from_a_top_level_file() {
    assert_eq!(
        targets("use super::Local;", &["proxy", "headers"]),
        Vec::<String>::new()
    );
    assert_eq!(
        targets("use super::super::tls::X;", &["proxy", "a", "b"]),
        Vec::<String>::new()
    );
    assert_eq!(targets("use super::tls::X;", &["proxy"]), ["tls"]);
}

#[test]
fn comments_strings_and_characters_are_not_code() {
    let text = "// crate::proxy in a comment\n/* crate::admin /* nested */ */\n\
                const A: &str = \"crate::server in words\";\nconst B: &str = r#\"crate::cli\"#;\n\
                fn f<'a>(x: &'a str) -> char { let _ = '\"'; 'c' }\nuse crate::tls::X;\n";
    let read = read_imports(text, &["proxy".to_string()]);
    let found: Vec<(usize, &str)> = read.iter().map(|(l, t, _)| (*l, t.as_str())).collect();
    // The strings' paths are read as attribute paths, at their lines.
    assert_eq!(found, [(3, "server"), (4, "cli"), (6, "tls")]);
}

#[test]
fn test_items_are_left_out() {
    let text = "use crate::tls::X;\n#[cfg(test)]\nmod tests {\n    use crate::proxy::Y;\n    fn f() { if true { crate::admin::z(); } }\n}\n\
                #[cfg(test)]\nfn helper() -> crate::server::S { todo!() }\n#[cfg(test)]\nmod coverage;\n";
    assert_eq!(targets(text, &["model"]), ["tls"]);
    assert_eq!(test_only_modules(&strip(text).0), ["coverage"]);
}

#[test]
fn a_loop_within_a_floor_is_found() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        edges.entry(from.into()).or_default().insert(to.into());
    }
    assert_eq!(find_cycle(&edges).unwrap(), ["a", "b", "c", "a"]);
    edges.get_mut("c").unwrap().remove("a");
    assert_eq!(find_cycle(&edges), None);
}
