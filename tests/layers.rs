//! The library's modules form layers that only point down (ARCHITECTURE.md): a module may use
//! modules of lower layers only. This test reads every file of `src/` and fails on an import
//! that points up or sideways, so the structure cannot rot silently.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

/// Every module of the library and its layer. A new module gets a line here (and one in
/// ARCHITECTURE.md's code map).
const LAYERS: &[(&str, u8)] = &[
    // Leaves: formats, errors, counters. They import nothing of the crate.
    ("dsn", 0),
    ("wire", 0),
    ("error", 0),
    ("metrics", 0),
    ("request", 0),
    ("session", 0),
    // Sends to many sockets in one system call.
    ("uring", 0),
    // ZeroMQ sockets from DSNs; what became of each message sent; throttled log lines.
    ("socket", 1),
    ("acks", 1),
    ("throttle", 1),
    ("failover", 2),
    // What components are built from.
    ("context", 2),
    ("snapshot", 2),
    // The writer shards of streamed clients.
    ("shard", 2),
    // Components.
    ("script", 3),
    ("hub", 3),
    ("homepage", 3),
    ("workers", 4),
    ("console", 4),
    ("broker", 5),
    ("event", 4),
    ("message", 6),
    // The front door: the POSTs it serves itself, then the accept loop and the streams.
    ("direct_post", 7),
    ("direct", 8),
    // The HTTP server wires the controllers.
    ("server", 9),
    // The configuration assembles every component's section.
    ("config", 10),
    // Start-up and shutdown.
    ("app", 11),
];

/// Macros the library exports (they live at the crate's root) and the module each is of.
const MACROS: &[(&str, &str)] = &[("throttled", "throttle")];

/// `crate::name` paths in the code of `text` (comments skipped); an exported macro stands for
/// its module.
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                let module = MACROS
                    .iter()
                    .find(|(mac, _)| after[name.len()..].starts_with('!') && *mac == name)
                    .map_or(name, |(_, module)| (*module).to_owned());
                found.push(module);
            }
            rest = after;
        }
    }
    found
}

#[test]
fn modules_only_import_lower_layers() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("an entry").path();
        let Some(module) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rs"))
        else {
            continue; // src/bin: binaries, above every layer.
        };
        if matches!(module, "lib" | "main") {
            continue;
        }
        seen.push(module.to_owned());
        let Some(&layer) = layers.get(module) else {
            problems.push(format!(
                "src/{module}.rs has no layer: add it to LAYERS in tests/layers.rs"
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("readable");
        for import in imports(&text) {
            match layers.get(import.as_str()) {
                None => {}                        // an item of lib.rs (`crate::App`)
                Some(_) if import == module => {} // its own path (`$crate::` in a macro)
                Some(&other) if other < layer => {}
                Some(&other) => problems.push(format!(
                    "src/{module}.rs (layer {layer}) imports `crate::{import}` (layer {other})"
                )),
            }
        }
    }
    for (module, _) in LAYERS {
        assert!(
            seen.iter().any(|s| s == module),
            "LAYERS names `{module}`, which is not in src/"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_import_reader_sees_paths_and_skips_comments() {
    let text = "use crate::wire::{MsgId};\n// crate::app in a comment\nlet x = crate::hub::Hub::new(); // crate::config\ncrate::throttled!(Level::WARN, \"x\");\n";
    assert_eq!(imports(text), ["wire", "hub", "throttle"]);
}
