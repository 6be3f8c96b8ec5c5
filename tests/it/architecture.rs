//! The shape of the source tree (docs/architecture.md): no dependency cycle between the
//! top-level modules of `src/`, and no production function longer than a screenful or two.
//! Read from the source text, so they hold for every build and need no tooling.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest production function allowed, in lines (signature to closing brace).
const MAX_FUNCTION_LINES: usize = 120;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its text up to its first `#[cfg(test)]` (unit tests
/// may use anything). Files that are test modules themselves are skipped.
fn production_sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".rs") || name.starts_with("tests") || name == "test_gen.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = match text.find("#[cfg(test)]") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            out.push((path, text));
        }
    }
    out.sort();
    out
}

/// The top-level module a file belongs to (`broker` for src/broker/conn/mod.rs), or None
/// for the crate roots.
fn top_module(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).unwrap();
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// For each top-level module, the other top-level modules it names as `crate::x`
/// (including inside `use crate::{x, y}` groups).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let sources = production_sources(&root);
    let modules: BTreeSet<String> = sources
        .iter()
        .filter_map(|(p, _)| top_module(&root, p))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &sources {
        let Some(from) = top_module(&root, path) else {
            continue;
        };
        let deps = graph.entry(from.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end]
                    .split(',')
                    .map(|item| item.trim().split("::").next().unwrap_or("").trim())
                    .collect()
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                vec![&rest[..end]]
            };
            for name in names {
                if name != from && modules.contains(name) {
                    deps.insert(name.to_owned());
                }
            }
        }
    }
    graph
}

/// A path `start -> ... -> start` through the graph, if there is one.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start.to_owned());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn no_cycles_between_top_level_modules() {
    let graph = module_graph();
    assert!(graph.contains_key("broker") && graph.contains_key("storage"));
    // The durability port: storage depends on the broker's journal, never the reverse.
    assert!(graph["storage"].contains("broker"), "{graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_through(&graph, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "module cycles: {cycles:#?}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    graph.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        cycle_through(&graph, "a"),
        Some(
            vec!["a", "b", "c", "a"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    assert_eq!(cycle_through(&graph, "d"), None);
}

/// Each `fn` item's length in lines, from its signature to its closing brace.
fn function_lengths(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let decl = [
            "pub fn ",
            "fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "async fn ",
        ]
        .iter()
        .chain(
            [
                "pub async fn ",
                "pub(crate) async fn ",
                "pub(super) async fn ",
            ]
            .iter(),
        )
        .find_map(|p| trimmed.strip_prefix(p));
        let Some(rest) = decl else { continue };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut depth = 0i32;
        let mut opened = false;
        for (i, l) in lines.iter().enumerate().skip(start) {
            if !opened && l.trim_end().ends_with(';') {
                break; // a declaration without a body (trait method)
            }
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                out.push((i - start + 1, name.clone(), start + 1));
                break;
            }
        }
    }
    out
}

#[test]
fn no_production_function_over_120_lines() {
    let root = src();
    let mut long = Vec::new();
    for (path, text) in production_sources(&root) {
        for (len, name, line) in function_lengths(&text) {
            if len > MAX_FUNCTION_LINES {
                let rel = path.strip_prefix(&root).unwrap().display().to_string();
                long.push(format!("src/{rel}:{line} {name} ({len} lines)"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines: {long:#?}"
    );
}

#[test]
fn the_length_check_measures_a_function() {
    let text = "fn a() {\n    if x {\n        y();\n    }\n}\n\nfn b();\n";
    assert_eq!(function_lengths(text), vec![(5, "a".to_owned(), 1)]);
}
