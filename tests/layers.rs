//! The crate's layering (see `src/lib.rs` and ARCHITECTURE.md): every module of `src/` imports
//! only modules on lower floors, so there is no import cycle and no upward import. Reads the
//! sources: a `crate::x` path (in a `use`, in code or in a doc link, tests included) names
//! module `x`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules by floor; a module may import only modules on lower floors (and itself).
const FLOORS: &[(usize, &[&str])] = &[
    (0, &["endpoint", "config", "telemetry", "drain", "cli"]),
    (1, &["prefix", "usage", "kv_blocks", "apis", "admission"]),
    (2, &["request"]),
    (3, &["health", "store", "scrape", "kv_events"]),
    (4, &["policy"]),
    (5, &["selection", "routing"]),
    (6, &["proxy", "status"]),
    (7, &["admin"]),
    (8, &["app"]),
];

fn floor_of(module: &str) -> Option<usize> {
    FLOORS
        .iter()
        .find(|(_, mods)| mods.contains(&module))
        .map(|(f, _)| *f)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`None` for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// Every module named by a `crate::…` path in `text`, including `use crate::{a, b::c}` groups.
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c}}`: the first segment of each top-level item.
            let mut depth = 0usize;
            let mut item = String::new();
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.push(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 || item.is_empty() {
                    item.push(ch);
                }
            }
            found.push(first_segment(&item));
        } else {
            found.push(first_segment(rest));
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

#[test]
fn every_module_imports_only_lower_floors() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(own) = floor_of(&module) else {
            violations.push(format!(
                "{}: module '{module}' has no floor in tests/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("source readable");
        for imported in imports(&text) {
            if imported == module {
                continue;
            }
            *seen.entry(format!("{module} -> {imported}")).or_default() += 1;
            match floor_of(&imported) {
                Some(f) if f < own => {}
                Some(f) => violations.push(format!(
                    "{}: {module} (floor {own}) imports {imported} (floor {f})",
                    file.display()
                )),
                None => violations.push(format!(
                    "{}: imports unknown module '{imported}'",
                    file.display()
                )),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
    // The scan must see the real graph, or it proves nothing.
    for edge in [
        "proxy -> routing",
        "routing -> policy",
        "policy -> store",
        "store -> config",
    ] {
        assert!(seen.contains_key(edge), "edge {edge} not found: {seen:?}");
    }
}

#[test]
fn the_scanner_reads_groups_and_paths() {
    let text = "use crate::{config::{A, B}, policy, store::X};\nfn f() { crate::telemetry::touch(); }\n//! see [`crate::app`]\n";
    assert_eq!(
        imports(text),
        ["config", "policy", "store", "telemetry", "app"]
    );
}
