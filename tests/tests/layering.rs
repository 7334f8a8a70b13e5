//! The daemon's layering, checked over its source: which top-level module may name which.
//! Arrows point inward — `api → app → core/store`, `controller → app`; the core names
//! nothing but itself; nothing names `api` but the server assembly. ARCHITECTURE.md draws
//! the same table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// (module, the modules it may name besides itself). `lib.rs` and `main.rs` declare the
/// modules and are not checked.
const ALLOWED: &[(&str, &[&str])] = &[
    ("core", &[]),
    // Metrics: recorded by the layers above, names nothing of the daemon.
    ("telemetry", &[]),
    ("runtime", &["core"]),
    ("images", &[]),
    ("store", &["core"]),
    ("bmc", &["core", "runtime", "telemetry"]),
    ("cloud", &["core", "runtime"]),
    ("app", &["core", "store", "runtime", "telemetry"]),
    (
        "controller",
        &[
            "app",
            "core",
            "store",
            "bmc",
            "cloud",
            "runtime",
            "telemetry",
        ],
    ),
    // The network edge: connections, timeouts, rate limits, TLS; below the HTTP
    // application, above nothing but the pure core.
    ("edge", &["core"]),
    (
        "api",
        &[
            "app",
            "core",
            "store",
            "runtime",
            "images",
            "edge",
            "telemetry",
        ],
    ),
    (
        "server",
        &[
            "api",
            "app",
            "core",
            "store",
            "bmc",
            "cloud",
            "controller",
            "runtime",
            "images",
            "edge",
            "telemetry",
        ],
    ),
    // The CLI is a client of the HTTP API and the server's launcher: it names the server
    // assembly and the application's types, never the HTTP layer itself.
    (
        "cli",
        &[
            "server",
            "app",
            "core",
            "store",
            "bmc",
            "cloud",
            "controller",
            "runtime",
            "images",
            "edge",
            "telemetry",
        ],
    ),
];

fn daemon_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("daemon/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `core` for `core/health.rs`, `server` for
/// `server.rs`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// Top-level modules a line of code names through `crate::` (or `bearman::`, in the
/// binary's modules), ignoring comments.
fn named_modules(line: &str, out: &mut BTreeSet<String>) {
    let code = line.split("//").next().unwrap_or("");
    for prefix in ["crate::", "bearman::"] {
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            // `bearman_proto::` is another crate; only a path that starts here counts.
            let before = rest[..at].chars().last();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
}

/// Every (file, line, module it names) that the table does not allow.
fn violations() -> Vec<String> {
    let src = daemon_src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let module = module_of(&src, &file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some((_, allowed)) = ALLOWED.iter().find(|(name, _)| *name == module) else {
            found.push(format!(
                "{}: module {module} is not in the layering table (tests/tests/layering.rs)",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let mut named = BTreeSet::new();
            named_modules(line, &mut named);
            for other in named {
                if other != module && !allowed.contains(&other.as_str()) {
                    found.push(format!(
                        "{}:{}: {module} names {other}: {}",
                        file.display(),
                        number + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn every_module_names_only_the_layers_beneath_it() {
    let found = violations();
    assert!(
        found.is_empty(),
        "layering violations (see ARCHITECTURE.md):\n{}",
        found.join("\n")
    );
}

#[test]
fn nothing_but_the_server_assembly_names_the_http_layer() {
    for (module, allowed) in ALLOWED {
        if *module != "server" {
            assert!(!allowed.contains(&"api"), "{module} may not name api");
        }
    }
}

#[test]
fn a_line_naming_a_forbidden_layer_is_found() {
    // The scanner itself: comments are ignored, other crates are not this one.
    let mut named = BTreeSet::new();
    named_modules("use crate::api::AppState; // crate::cli", &mut named);
    named_modules(
        "let x = bearman_proto::uuid::NodeUuid::parse(s);",
        &mut named,
    );
    named_modules("bearman::store::Store", &mut named);
    assert_eq!(
        named,
        BTreeSet::from(["api".to_string(), "store".to_string()])
    );
}

/// The PXE services are their own crate (`pxe/`, see ARCHITECTURE.md): the daemon's CLI
/// starts them, and they know nothing of the daemon — no dependency on any Bearman
/// crate, so the proxyDHCP and TFTP code cannot reach the store, the app or the core.
/// And only the CLI (`bearman serve`) starts them: no daemon module but `cli` names them.
#[test]
fn the_pxe_services_know_nothing_of_the_daemon_and_only_the_cli_starts_them() {
    let root = daemon_src()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let manifest = std::fs::read_to_string(root.join("pxe/Cargo.toml")).unwrap();
    let dependencies: Vec<&str> = manifest
        .lines()
        .skip_while(|line| !line.starts_with("[dependencies]"))
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter_map(|line| line.split(['=', '.', ' ']).next())
        .filter(|name| !name.is_empty() && !name.starts_with('#'))
        .collect();
    assert!(
        !dependencies.is_empty(),
        "no [dependencies] read from pxe/Cargo.toml"
    );
    for name in &dependencies {
        assert!(
            !name.starts_with("bearman"),
            "pxe/ depends on {name}: the PXE services must not depend on a Bearman crate"
        );
    }
    let src = daemon_src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let starters: Vec<String> = files
        .iter()
        .filter(|file| {
            std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .any(|line| !line.trim_start().starts_with("//") && line.contains("bearman_pxe::"))
        })
        .map(|file| module_of(&src, file))
        .collect();
    assert!(
        starters.iter().all(|module| module == "cli"),
        "only the CLI may name bearman_pxe; named in: {starters:?}"
    );
    assert!(
        !starters.is_empty(),
        "bearman serve no longer starts the PXE services"
    );
}
