//! The crate's imports point one way: from the command line down to the
//! numeric ops. This test reads every file under src/, collects the files
//! each one refers to (`use crate::...`, `crate::...` paths in code,
//! `super::...`, and a parent module's bare paths into its children), and
//! fails on any cycle between files, printing it. `mod x;` declarations are
//! not references: a parent names its children without depending on them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path ("cuda::train") for every file under src/ (lib.rs is "").
fn module_files(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") || p.file_name().unwrap() == "main.rs" {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The code of a file without comments, string literals and `mod x;` lines.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // a string literal (raw strings of the crate hold no quotes that matter here)
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // a char literal such as '"'
            i += 3;
        } else {
            // copy one whole UTF-8 character
            let len = text[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[i..i + len]);
            i += len;
        }
    }
    out.lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("mod ") || t.starts_with("pub mod ") || t.starts_with("pub(crate) mod "))
                || !t.trim_end().ends_with(';')
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands `use` trees: `a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e.
fn expand_tree(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree] };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).flat_map(|p| expand_tree(&format!("{prefix}{p}"))).collect()
}

/// Every path the code names that starts at the crate root or a parent,
/// made absolute ("crate::a::b::c" -> ["a", "b", "c"]).
fn referenced_paths(code: &str, module: &str, children: &[String]) -> Vec<Vec<String>> {
    let here: Vec<String> = if module.is_empty() { vec![] } else { module.split("::").map(String::from).collect() };
    let mut paths = Vec::new();
    let mut add = |p: &str| {
        let segs: Vec<&str> =
            p.split("::").map(|s| s.trim_matches(|c: char| !c.is_alphanumeric() && c != '_')).collect();
        let mut abs: Vec<String> = Vec::new();
        let mut it = segs.iter().peekable();
        match it.peek().copied() {
            Some(&"crate") => {
                it.next();
            }
            Some(&"super") => {
                abs = here.clone();
                while it.peek() == Some(&&"super") {
                    it.next();
                    abs.pop();
                }
            }
            Some(&"self") => {
                it.next();
                abs = here.clone();
            }
            Some(first) if children.iter().any(|c| c == first) => abs = here.clone(),
            _ => return,
        }
        abs.extend(it.filter(|s| !s.is_empty() && **s != "self").map(|s| s.to_string()));
        paths.push(abs);
    };
    // `use` items, trees expanded
    let mut rest = code;
    while let Some(pos) = rest.find("use ") {
        let before = rest[..pos].chars().last();
        let after = &rest[pos + 4..];
        let end = after.find(';').unwrap_or(after.len());
        if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
            for p in expand_tree(&after[..end]) {
                add(p.split(" as ").next().unwrap_or(&p));
            }
        }
        rest = &after[end.min(after.len())..];
    }
    // paths in expressions and types
    let bytes = code.as_bytes();
    for start in 0..bytes.len() {
        if !code.is_char_boundary(start) {
            continue;
        }
        if start > 0
            && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_' || bytes[start - 1] == b':')
        {
            continue;
        }
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':') {
            end += 1;
        }
        let word = &code[start..end];
        if word.contains("::") {
            add(word);
        }
    }
    paths
}

/// The file a path lands in: its longest prefix that is a module with a file.
fn resolve(path: &[String], modules: &BTreeMap<String, PathBuf>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| modules.contains_key(m))
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // 0 unvisited, 1 on the stack, 2 done
    fn dfs(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = dfs(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = dfs(n, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = module_files(src);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap();
        // #[cfg(test)] modules inside a file are its own tests, not its design
        let text = text.split("#[cfg(test)]").next().unwrap_or("");
        let children: Vec<String> = modules
            .keys()
            .filter_map(|m| {
                let rest = if module.is_empty() { Some(m.as_str()) } else { m.strip_prefix(&format!("{module}::")) };
                rest.filter(|r| !r.is_empty() && !r.contains("::")).map(String::from)
            })
            .collect();
        let code = code_only(text);
        let set = edges.entry(module.clone()).or_default();
        for p in referenced_paths(&code, module, &children) {
            if let Some(target) = resolve(&p, &modules)
                && target != *module
            {
                set.insert(target);
            }
        }
    }
    edges
}

/// No file of src/ reaches itself through the files it imports.
#[test]
fn no_import_cycle_between_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = import_graph(&src);
    let files = module_files(&src);
    let name = |m: &String| files[m].strip_prefix(&src).unwrap().display().to_string();
    let n_edges: usize = edges.values().map(BTreeSet::len).sum();
    eprintln!("{} files, {n_edges} import edges", edges.len());
    if let Some(cycle) = find_cycle(&edges) {
        let shown: Vec<String> = cycle.iter().map(name).collect();
        panic!("import cycle between files: {}", shown.join(" -> "));
    }
}

/// The checker itself finds a cycle when there is one, and reads grouped
/// `use` trees, `super::` and a parent's paths into its children.
#[test]
fn the_checker_sees_cycles_and_use_trees() {
    assert_eq!(expand_tree("crate::{a::{B, c}, d}"), ["crate::a::B", "crate::a::c", "crate::d"]);
    let children = vec!["gpu".to_string()];
    let code = "use super::launch as k;\nfn f() { gpu::go(); crate::model::Model::new(); }";
    let got = referenced_paths(code, "cuda::check", &[]);
    assert!(got.contains(&vec!["cuda".into(), "launch".into()]), "{got:?}");
    assert!(got.contains(&vec!["model".into(), "Model".into(), "new".into()]), "{got:?}");
    let got = referenced_paths(code, "cuda", &children);
    assert!(got.contains(&vec!["cuda".into(), "gpu".into(), "go".into()]), "{got:?}");
    let mut e: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("c".into());
    assert!(find_cycle(&e).is_none());
    e.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&e).unwrap(), ["a", "b", "c", "a"]);
    assert!(code_only("// crate::x::y\nlet s = \"crate::z\";\nmod q;").find("crate").is_none());
}
