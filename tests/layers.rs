//! The layering of `docs/architecture.md`, checked on the sources: no module imports one
//! above it, the modules' imports form no cycle, and the sans-IO files touch no socket.
//!
//! It reads `src/` as text: every `crate::name` path in a file under `src/name/` (or
//! `src/name.rs`) is an import of `name` by that module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer, bottom (0) to top.
const LAYERS: &[(&str, u8)] = &[
    ("media", 0),
    ("metrics", 1),
    ("clock", 1),
    ("net", 1),
    ("config", 2),
    ("auth", 3),
    ("transcode", 3),
    ("hub", 4),
    ("backbone", 5),
    ("rtmp", 5),
    ("webrtc", 5),
    ("bridge", 5),
    ("play", 5),
    ("egress", 5),
    ("cluster", 6),
    ("rooms", 6),
    ("api", 7),
    ("node", 8),
];

/// Files whose job is a sans-IO state machine or codec: no sockets, no spawned tasks, no
/// driver of their own folder.
const SANS_IO: &[&str] = &[
    "src/backbone/wire",
    "src/backbone/session.rs",
    "src/backbone/directory.rs",
    "src/backbone/group.rs",
    "src/backbone/select.rs",
    "src/backbone/rehome.rs",
    "src/backbone/handover.rs",
    "src/backbone/race.rs",
    "src/backbone/liveness.rs",
    "src/backbone/intake.rs",
    "src/cluster/route.rs",
    "src/rooms/state.rs",
    "src/rooms/diff.rs",
    "src/rooms/checks.rs",
    "src/rtmp/guard.rs",
    "src/rtmp/chunk.rs",
    "src/rtmp/protocol.rs",
    "src/egress/retimer.rs",
    "src/webrtc/demux.rs",
    "src/webrtc/assemble.rs",
    "src/webrtc/h264.rs",
    "src/webrtc/vp8.rs",
    "src/webrtc/batch.rs",
    "src/webrtc/offer.rs",
    "src/webrtc/dtls.rs",
    "src/webrtc/layers.rs",
    "src/webrtc/primary.rs",
    "src/webrtc/track_clock.rs",
    "src/media",
    "src/config",
    "src/metrics",
];

/// What a sans-IO file may not mention.
const IO_WORDS: &[&str] = &[
    "tokio::net",
    "tokio::spawn",
    "quinn::Endpoint",
    "quinn::Connection",
    "std::net::UdpSocket",
    "std::net::TcpStream",
    "crate::hub",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments (so a doc comment naming a module is not an import).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn module_of(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root.join("src")).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// Every `crate::name` a file uses.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    // `use crate::{a, b::c}` groups.
    for (i, _) in code.match_indices("crate::{") {
        let rest = &code[i + "crate::{".len()..];
        let group = &rest[..rest.find('}').unwrap_or(rest.len())];
        for item in group.split(',') {
            let name: String = item
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    // module -> imported module -> files that import it
    let mut g: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for f in files {
        let Some(module) = module_of(root, &f) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(&f).unwrap());
        let deps = g.entry(module.clone()).or_default();
        for dep in imports(&code) {
            if dep != module {
                deps.entry(dep)
                    .or_default()
                    .push(f.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    g
}

fn layer(module: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .unwrap_or_else(|| {
            panic!("module `{module}` has no layer: add it to LAYERS and docs/architecture.md")
        })
        .1
}

#[test]
fn no_module_imports_one_above_it() {
    let mut upward = Vec::new();
    for (module, deps) in graph() {
        for (dep, files) in deps {
            if layer(&dep) > layer(&module) {
                upward.push(format!(
                    "{module} (layer {}) imports {dep} (layer {}) in {}",
                    layer(&module),
                    layer(&dep),
                    files.join(", ")
                ));
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
}

#[test]
fn the_modules_form_no_cycle() {
    let g = graph();
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for dep in g.get(m).into_iter().flat_map(|d| d.keys()) {
            if let Some(c) = visit(dep, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(cycle) = visit(m, &g, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn sans_io_files_touch_no_socket_and_no_hub() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut found = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        if !SANS_IO.iter().any(|p| rel.starts_with(p)) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&f).unwrap());
        // Unit tests may drive the code however they like.
        let code = code.split("#[cfg(test)]").next().unwrap_or_default();
        for word in IO_WORDS {
            if code.contains(word) {
                found.push(format!("{rel} mentions {word}"));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn no_file_of_code_is_over_700_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut long = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text
            .split("#[cfg(test)]\nmod tests {")
            .next()
            .unwrap_or_default();
        let n = code.lines().count();
        if n > 700 {
            long.push(format!(
                "{}: {n} lines of code",
                f.strip_prefix(root).unwrap().display()
            ));
        }
    }
    assert!(long.is_empty(), "split these by job:\n{}", long.join("\n"));
}
