//! `cargo xtask modules`: fails when a crate of the workspace has a module cycle.
//!
//! A small reader instead of a tool to install (CI builds everything on two cores within a
//! time budget): for every crate root (`src/lib.rs`, `src/main.rs`) of every directory under
//! the workspace root with a `Cargo.toml`, each file module's `crate::`, `super::` and `self::`
//! paths (use trees included, comments and literals skipped) are edges to the module they name.
//! A path through a parent's `pub use` re-export is followed to the module that defines the
//! item, so `crate::http::RequestAudit` counts as a use of `http::audit`.
//!
//! Not counted: a module's edges to its own descendants (declaring and re-exporting children
//! is structure, not dependency), test code (`#[cfg(test)]` modules, inline or in files), and
//! inline modules other than tests (they count as their file). Any strongly connected set of
//! two or more modules is reported with one cycle through it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::util::root;

/// Crates whose cycles are being removed on another branch: reported, not failed. Each entry
/// must still have a cycle (else the check fails, so the exemption is removed, not kept).
const BEING_UNTANGLED: &[(&str, &str)] = &[];

pub fn run_modules() -> Result<()> {
    let root = root();
    let mut found = Vec::new();
    let mut crates = 0;
    let mut exempt_seen = BTreeSet::new();
    for entry in std::fs::read_dir(&root).context("reading the workspace root")? {
        let dir = entry?.path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') || name == "target" || !dir.join("Cargo.toml").is_file() {
            continue;
        }
        for crate_root in ["src/lib.rs", "src/main.rs"] {
            let path = dir.join(crate_root);
            if !path.is_file() {
                continue;
            }
            crates += 1;
            let files = read_crate(&path)?;
            let exempt = BEING_UNTANGLED.iter().find(|(c, _)| *c == name);
            for (cycle, members) in all_cycles(&graph(&files)) {
                let mut line = format!("{name} ({crate_root}): {}", cycle.join(" -> "));
                if members.len() + 1 > cycle.len() {
                    let _ = write!(line, " (one of the cycles among {})", members.join(", "));
                }
                match exempt {
                    Some((_, why)) => {
                        exempt_seen.insert(name.to_owned());
                        eprintln!("module cycle (exempt for now: {why}): {line}");
                    }
                    None => found.push(line),
                }
            }
        }
    }
    for (name, _) in BEING_UNTANGLED {
        if !exempt_seen.contains(*name) {
            found.push(format!(
                "{name} has no module cycle any more: remove it from BEING_UNTANGLED in \
                 xtask/src/modules.rs"
            ));
        }
    }
    if !found.is_empty() {
        for f in &found {
            eprintln!("module cycle: {f}");
        }
        bail!("{} module cycle problem(s); see above", found.len());
    }
    eprintln!("xtask modules: no module cycles in {crates} crate roots");
    Ok(())
}

/// A crate's file modules: module path (`a::b`, `""` for the root) to its source.
type Files = BTreeMap<String, String>;

/// Reads every file module reachable from `crate_root` through `mod name;` declarations that
/// are not `#[cfg(test)]`, following Rust's file layout (`name.rs` or `name/mod.rs`).
fn read_crate(crate_root: &Path) -> Result<Files> {
    let mut files = Files::new();
    let mut todo = vec![(String::new(), crate_root.to_owned())];
    while let Some((module, path)) = todo.pop() {
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let tokens = tokenize(&source);
        // Children live in `dir/` for a crate root or `mod.rs`, else in `dir/<stem>/`.
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir: PathBuf = if module.is_empty() || stem == "mod" {
            parent
        } else {
            parent.join(stem)
        };
        for child in child_files(&tokens) {
            let flat = dir.join(format!("{child}.rs"));
            let file = if flat.is_file() {
                flat
            } else {
                dir.join(&child).join("mod.rs")
            };
            // `#[path]` is not used in the workspace; a module this cannot find is skipped.
            if file.is_file() {
                todo.push((join(&module, &child), file));
            }
        }
        files.insert(module, source);
    }
    Ok(files)
}

fn join(module: &str, child: &str) -> String {
    if module.is_empty() {
        child.to_owned()
    } else {
        format!("{module}::{child}")
    }
}

/// Whether `descendant` is `module` or inside it.
fn within(descendant: &str, module: &str) -> bool {
    module.is_empty()
        || descendant == module
        || descendant
            .strip_prefix(module)
            .is_some_and(|rest| rest.starts_with("::"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Punct(char),
    /// `::`
    Path,
}

/// Identifiers and punctuation; comments, string, char and numeric literals and lifetimes
/// are dropped. `#[cfg(test)]` items are removed here (see [`strip_test_items`]).
fn tokenize(source: &str) -> Vec<Tok> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1, 0);
        } else if (c == 'r' || (c == 'b' && at(i + 1) == 'r'))
            && matches!(at(i + usize::from(c == 'b') + 1), '"' | '#')
            && !i
                .checked_sub(1)
                .is_some_and(|p| at(p).is_alphanumeric() || at(p) == '_')
        {
            let mut j = i + usize::from(c == 'b') + 1;
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) == '"' {
                i = skip_string(&chars, j + 1, hashes);
            } else {
                out.push(Tok::Ident(c.to_string()));
                i += 1;
            }
        } else if c == '\'' {
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label.
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // b"..." and b'x' literals.
            if word == "b" && matches!(at(i), '"' | '\'') {
                continue;
            }
            out.push(Tok::Ident(word));
        } else if c.is_ascii_digit() {
            while at(i).is_alphanumeric() || at(i) == '_' || at(i) == '.' && at(i + 1) != '.' {
                i += 1;
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Tok::Path);
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(Tok::Punct(c));
            }
            i += 1;
        }
    }
    strip_test_items(&out)
}

/// Index just past a string literal whose body starts at `i` (`hashes`: raw string).
fn skip_string(chars: &[char], mut i: usize, hashes: usize) -> usize {
    while i < chars.len() {
        if hashes == 0 && chars[i] == '\\' {
            i += 2;
            continue;
        }
        if chars[i] == '"' && (0..hashes).all(|k| chars.get(i + 1 + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// The attribute starting at `i` (`#` `[` ... `]`): its tokens and the index after it.
fn attribute(tokens: &[Tok], i: usize) -> Option<(&[Tok], usize)> {
    if tokens.get(i) != Some(&Tok::Punct('#')) {
        return None;
    }
    let mut j = i + 1;
    if tokens.get(j) == Some(&Tok::Punct('!')) {
        j += 1;
    }
    if tokens.get(j) != Some(&Tok::Punct('[')) {
        return None;
    }
    let start = j + 1;
    let mut depth = 1;
    j += 1;
    while j < tokens.len() && depth > 0 {
        match tokens[j] {
            Tok::Punct('[') => depth += 1,
            Tok::Punct(']') => depth -= 1,
            _ => {}
        }
        j += 1;
    }
    Some((&tokens[start..j.saturating_sub(1)], j))
}

/// Exactly `cfg(test)`: code also built outside tests (`cfg(any(test, ...))`) counts.
fn is_cfg_test(attr: &[Tok]) -> bool {
    attr == [
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
        Tok::Punct(')'),
    ]
}

/// Drops every item under `#[cfg(test)]` (through its closing `;` or balanced `{}` block),
/// keeping `mod name;` declarations marked so [`child_files`] skips them.
fn strip_test_items(tokens: &[Tok]) -> Vec<Tok> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let Some((attr, after)) = attribute(tokens, i) else {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        };
        if !is_cfg_test(attr) {
            out.extend_from_slice(&tokens[i..after]);
            i = after;
            continue;
        }
        // Skip the item: more attributes, then up to `;` or a balanced block at depth 0.
        let mut j = after;
        while let Some((_, next)) = attribute(tokens, j) {
            j = next;
        }
        let mut depth = 0;
        while j < tokens.len() {
            match tokens[j] {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                Tok::Punct(';') if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        i = j;
    }
    out
}

/// `mod name;` declarations (test ones are already gone).
fn child_files(tokens: &[Tok]) -> Vec<String> {
    let mut children = Vec::new();
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        match t {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => depth = depth.saturating_sub(1),
            Tok::Ident(w) if w == "mod" && depth == 0 => {
                if let Some(name) = ident(tokens.get(i + 1))
                    && tokens.get(i + 2) == Some(&Tok::Punct(';'))
                {
                    children.push(name.to_owned());
                }
            }
            _ => {}
        }
    }
    children
}

/// One module path named in a source, as absolute segments.
fn paths_in(module: &str, tokens: &[Tok]) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let start = matches!(ident(tokens.get(i)), Some("crate" | "super" | "self"))
            && tokens.get(i + 1) == Some(&Tok::Path)
            // `$crate::` and a path's inner `::super` are not starts.
            && !matches!(
                i.checked_sub(1).and_then(|p| tokens.get(p)),
                Some(Tok::Path | Tok::Punct('$'))
            );
        if !start {
            i += 1;
            continue;
        }
        let mut base: Vec<String> = if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").map(str::to_owned).collect()
        };
        // Leading `crate`, `self` and any number of `super`s.
        let mut j = i;
        loop {
            match ident(tokens.get(j)) {
                Some("crate") if j == i => base.clear(),
                Some("self") if j == i => {}
                Some("super") => {
                    base.pop();
                }
                _ => break,
            }
            if tokens.get(j + 1) != Some(&Tok::Path) {
                break;
            }
            j += 2;
        }
        let end = use_tree(tokens, j, base, &mut paths);
        i = end.max(i + 1);
    }
    paths
}

/// Reads a path or use tree at `i` under `prefix`; pushes every full path; returns the index
/// after it.
fn use_tree(
    tokens: &[Tok],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match tokens.get(i) {
            Some(Tok::Punct('{')) => {
                i += 1;
                loop {
                    match tokens.get(i) {
                        Some(Tok::Punct('}')) | None => return i + 1,
                        Some(Tok::Punct(',')) => i += 1,
                        _ => {
                            let before = i;
                            i = use_tree(tokens, i, prefix.clone(), out);
                            if i == before {
                                i += 1;
                            }
                        }
                    }
                }
            }
            Some(Tok::Punct('*')) => {
                out.push(prefix);
                return i + 1;
            }
            Some(Tok::Ident(w)) if w == "self" => {
                out.push(prefix);
                return i + 1;
            }
            Some(Tok::Ident(w)) => {
                prefix.push(w.clone());
                if tokens.get(i + 1) == Some(&Tok::Path) {
                    i += 2;
                } else {
                    out.push(prefix);
                    return i + 1;
                }
            }
            _ => {
                out.push(prefix);
                return i;
            }
        }
    }
}

/// `pub use` re-exports of a module: exported name to the absolute path it names.
fn reexports(module: &str, tokens: &[Tok]) -> BTreeMap<String, Vec<String>> {
    let mut map = BTreeMap::new();
    let mut i = 0;
    while i < tokens.len() {
        if ident(tokens.get(i)) != Some("pub") {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        if tokens.get(j) == Some(&Tok::Punct('(')) {
            while j < tokens.len() && tokens[j] != Tok::Punct(')') {
                j += 1;
            }
            j += 1;
        }
        if ident(tokens.get(j)) != Some("use") {
            i += 1;
            continue;
        }
        j += 1;
        // Relative (`child::x`) or anchored (`crate::`, `super::`, `self::`) paths.
        let mut base: Vec<String> = if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").map(str::to_owned).collect()
        };
        loop {
            match ident(tokens.get(j)) {
                Some("crate") => base.clear(),
                Some("self") => {}
                Some("super") => {
                    base.pop();
                }
                _ => break,
            }
            j += 2;
        }
        let mut paths = Vec::new();
        let end = use_tree(tokens, j, base, &mut paths);
        for p in paths {
            if let Some(name) = p.last() {
                map.insert(name.clone(), p);
            }
        }
        i = end.max(i + 1);
    }
    map
}

/// Module dependency edges of a crate (descendant and self edges left out).
type Graph = BTreeMap<String, BTreeSet<String>>;

fn graph(files: &Files) -> Graph {
    let tokens: BTreeMap<&str, Vec<Tok>> = files
        .iter()
        .map(|(m, s)| (m.as_str(), tokenize(s)))
        .collect();
    let exports: BTreeMap<&str, BTreeMap<String, Vec<String>>> =
        tokens.iter().map(|(m, t)| (*m, reexports(m, t))).collect();
    let resolve = |path: &[String]| -> String {
        let mut path = path.to_vec();
        // Follow re-exports a few hops (a chain of `pub use`s), never forever.
        for _ in 0..8 {
            let mut module = String::new();
            let mut used = 0;
            for (k, seg) in path.iter().enumerate() {
                let next = join(&module, seg);
                if files.contains_key(&next) {
                    module = next;
                    used = k + 1;
                } else {
                    break;
                }
            }
            let followed = path.get(used).and_then(|name| {
                exports
                    .get(module.as_str())
                    .and_then(|e| e.get(name))
                    .filter(|target| target.as_slice() != path.get(..=used).unwrap_or_default())
            });
            match followed {
                Some(target) => {
                    let mut next = target.clone();
                    next.extend_from_slice(path.get(used + 1..).unwrap_or_default());
                    path = next;
                }
                None => return module,
            }
        }
        String::new()
    };
    let mut g = Graph::new();
    for (module, toks) in &tokens {
        let edges = g.entry((*module).to_owned()).or_default();
        for path in paths_in(module, toks) {
            let target = resolve(&path);
            if !within(&target, module) {
                edges.insert(target);
            }
        }
    }
    g
}

/// Cycles between modules and between whole subtrees: for each depth `d`, every module is
/// taken as its ancestor at depth `d`, so `cgroup -> ebpf::mounts` and `ebpf -> cgroup` are
/// the cycle `cgroup -> ebpf` although no single file of either imports the other back.
fn all_cycles(g: &Graph) -> Vec<(Vec<String>, Vec<String>)> {
    let depth = |m: &str| {
        if m.is_empty() {
            0
        } else {
            m.split("::").count()
        }
    };
    let deepest = g.keys().map(|m| depth(m)).max().unwrap_or(0);
    let mut found: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    for d in 1..=deepest {
        let at = |m: &str| -> String { m.split("::").take(d).collect::<Vec<_>>().join("::") };
        let mut collapsed = Graph::new();
        for (from, tos) in g {
            let from = at(from);
            let edges = collapsed.entry(from.clone()).or_default();
            for to in tos {
                let to = at(to);
                if !within(&to, &from) && !within(&from, &to) {
                    edges.insert(to);
                }
            }
        }
        for cycle in cycles(&collapsed) {
            if !found.contains(&cycle) {
                found.push(cycle);
            }
        }
    }
    found
}

/// One cycle through each strongly connected set of two or more modules (Tarjan), with the
/// members of the set.
fn cycles(g: &Graph) -> Vec<(Vec<String>, Vec<String>)> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        sccs: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w);
                if w == v {
                    break;
                }
            }
            s.sccs.push(scc);
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        sccs: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.sccs
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|scc| {
            let members: BTreeSet<&str> = scc.into_iter().collect();
            (
                cycle_in(g, &members),
                members.iter().map(|m| display(m)).collect(),
            )
        })
        .collect()
}

/// A shortest cycle from the smallest member of `scc` back to itself, inside `scc`.
fn cycle_in(g: &Graph, scc: &BTreeSet<&str>) -> Vec<String> {
    let start = *scc.iter().next().expect("non-empty");
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !scc.contains(w) {
                continue;
            }
            if w == start {
                let mut back = Vec::new();
                let mut at = v;
                while at != start {
                    back.push(at);
                    at = prev[at];
                }
                back.reverse();
                let path: Vec<&str> = std::iter::once(start)
                    .chain(back)
                    .chain(std::iter::once(start))
                    .collect();
                return path.into_iter().map(display).collect();
            }
            if !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    scc.iter().map(|m| display(m)).collect()
}

fn display(module: &str) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        format!("crate::{module}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Files {
        list.iter()
            .map(|(m, s)| ((*m).to_owned(), (*s).to_owned()))
            .collect()
    }

    #[test]
    fn finds_a_cycle_and_names_it() {
        let f = files(&[
            ("", "pub mod a; pub mod b; pub mod c;"),
            ("a", "use crate::b::Thing; fn f() {}"),
            ("b", "pub struct Thing; fn g() { super::c::h(); }"),
            ("c", "pub fn h() { let _ = crate::a::f; }"),
        ]);
        let found: Vec<Vec<String>> = all_cycles(&graph(&f)).into_iter().map(|c| c.0).collect();
        assert_eq!(
            found,
            vec![vec!["crate::a", "crate::b", "crate::c", "crate::a"]]
        );
    }

    #[test]
    fn parents_children_comments_literals_and_tests_are_not_edges() {
        let f = files(&[
            ("", "pub mod http; pub mod audit;"),
            (
                "http",
                "mod forward; pub use forward::serve; pub struct Ctx;\n\
                 // crate::audit::X in a comment\n\
                 const S: &str = \"crate::audit::X\"; const R: &str = r#\"crate::audit\"#;\n\
                 fn f<'a>(c: char) -> bool { c == '\"' }\n\
                 #[cfg(test)] mod tests { use crate::audit::X; }",
            ),
            ("http::forward", "use super::Ctx; pub fn serve() {}"),
            ("audit", "use crate::http::serve; pub struct X;"),
        ]);
        let g = graph(&f);
        assert!(all_cycles(&g).is_empty(), "{g:?}");
        // The re-export is followed to the module that defines `serve`.
        assert!(g["audit"].contains("http::forward"), "{g:?}");
        assert!(g["http::forward"].contains("http"), "{g:?}");
        assert!(!g["http"].contains("audit"), "{g:?}");
    }

    #[test]
    fn use_trees_and_reexports_resolve_to_the_defining_module() {
        let f = files(&[
            ("", "pub mod metrics; pub mod audit; pub mod labels;"),
            ("labels", "pub enum Rejection {}"),
            (
                "metrics",
                "pub use crate::labels::Rejection; pub fn count() {}",
            ),
            (
                "audit",
                "use crate::{metrics::{self, Rejection}, labels as _};",
            ),
        ]);
        let g = graph(&f);
        assert!(g["audit"].contains("labels"), "{g:?}");
        assert!(g["audit"].contains("metrics"), "{g:?}");
        // Now metrics needs audit back: a cycle.
        let mut f = f;
        f.insert("metrics".into(), "use crate::audit::Kind;".into());
        f.insert(
            "audit".into(),
            "use crate::metrics::count; pub enum Kind {}".into(),
        );
        assert_eq!(
            all_cycles(&graph(&f))[0].0,
            ["crate::audit", "crate::metrics", "crate::audit"]
        );
    }

    #[test]
    fn cycles_between_subtrees_count() {
        let f = files(&[
            ("", "pub mod cgroup; pub mod ebpf;"),
            ("cgroup", "fn f() { crate::ebpf::mounts::root(); }"),
            ("ebpf", "pub mod mounts; use crate::cgroup::Cgroup;"),
            ("ebpf::mounts", "pub fn root() {}"),
        ]);
        let g = graph(&f);
        assert!(cycles(&g).is_empty(), "no file imports its importer back");
        assert_eq!(
            all_cycles(&g),
            [(
                vec![
                    "crate::cgroup".to_owned(),
                    "crate::ebpf".into(),
                    "crate::cgroup".into()
                ],
                vec!["crate::cgroup".to_owned(), "crate::ebpf".into()]
            )]
        );
    }

    #[test]
    fn a_test_only_file_module_is_not_read() {
        let tokens = tokenize("#[cfg(test)]\nmod tests;\nmod real;\n#[cfg(not(test))] mod prod;");
        assert_eq!(child_files(&tokens), ["real", "prod"]);
    }
}
