//! Tidy checks over the source tree, run as ordinary tests.
//!
//! 1. Code the simulator runs must be deterministic: no wall clocks, OS randomness, OS
//!    threads, OS sockets or hash-ordered collections outside the production adapters.
//! 2. Every `select!` in simulated code is `biased;` (turmoil replays need a fixed order).
//! 3. Every module opens with a `//!` line saying what it owns.

use std::path::{Path, PathBuf};

/// Crates whose code runs inside the simulator.
const SIMULATED_ROOTS: [&str; 4] = ["daemon/src", "agent/src", "proto/src", "sim/src"];

/// Production adapters and binaries: the only places allowed to touch the OS directly.
const ADAPTERS: [&str; 7] = [
    "daemon/src/runtime/system.rs",
    // TLS certificates from files, reloaded on SIGHUP: the simulator serves plain HTTP.
    "daemon/src/edge/tls.rs",
    "daemon/src/cli/",
    "daemon/src/main.rs",
    "agent/src/net.rs",
    "agent/src/stage1/",
    "sim/src/main.rs",
];

/// (pattern, why it breaks replay)
const FORBIDDEN: [(&str, &str); 9] = [
    (
        "SystemTime::now",
        "reads the wall clock; take `now` from runtime::Clock",
    ),
    (
        "std::time::Instant",
        "real time; use tokio::time::Instant, which turmoil virtualises",
    ),
    (
        "thread_rng",
        "OS-seeded randomness; use a seeded RNG passed in",
    ),
    (
        "Uuid::new_v4",
        "random identity; derive ids deterministically",
    ),
    (
        "spawn_blocking",
        "runs on an OS thread and freezes turmoil's clock",
    ),
    ("std::thread::spawn", "OS threads escape the simulation"),
    (
        "tokio::net",
        "OS sockets; go through the listener/connector seams",
    ),
    (
        "HashMap",
        "iteration order varies per process; use BTreeMap",
    ),
    (
        "HashSet",
        "iteration order varies per process; use BTreeSet",
    ),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

/// Source text without `//` comments, so explanations may name what they forbid.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(index, line)| {
        let code = match line.find("//") {
            Some(position) => &line[..position],
            None => line,
        };
        (index + 1, code)
    })
}

#[test]
fn simulated_code_avoids_nondeterminism() {
    let root = workspace_root();
    let mut violations = Vec::new();
    let mut scanned = 0;
    for crate_root in SIMULATED_ROOTS {
        let mut files = Vec::new();
        rust_files(&root.join(crate_root), &mut files);
        for file in files {
            let name = relative(&file);
            if ADAPTERS.iter().any(|adapter| name.starts_with(adapter)) {
                continue;
            }
            scanned += 1;
            let text = std::fs::read_to_string(&file).unwrap();
            for (line_no, code) in code_lines(&text) {
                for (pattern, why) in FORBIDDEN {
                    if code.contains(pattern) {
                        violations.push(format!("{name}:{line_no}: {pattern}: {why}"));
                    }
                }
                if code.contains("Instant::now") && !code.contains("tokio::time::Instant::now") {
                    violations.push(format!(
                        "{name}:{line_no}: Instant::now: write tokio::time::Instant::now so it is visibly virtual"
                    ));
                }
            }
        }
    }
    assert!(
        scanned > 20,
        "tidy scanned only {scanned} files; are the roots right?"
    );
    assert!(
        violations.is_empty(),
        "nondeterminism in simulated code:\n{}",
        violations.join("\n")
    );
}

#[test]
fn select_is_biased_in_simulated_code() {
    let root = workspace_root();
    let mut violations = Vec::new();
    for crate_root in SIMULATED_ROOTS {
        let mut files = Vec::new();
        rust_files(&root.join(crate_root), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (index, line) in lines.iter().enumerate() {
                if line.contains("select!") && !line.trim_start().starts_with("//") {
                    let next = lines.get(index + 1).map(|l| l.trim()).unwrap_or("");
                    if !line.contains("biased;") && next != "biased;" {
                        violations.push(format!("{}:{}", relative(&file), index + 1));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "select! without `biased;`:\n{}",
        violations.join("\n")
    );
}

#[test]
fn every_module_says_what_it_owns() {
    let root = workspace_root();
    let mut missing = Vec::new();
    for crate_root in [
        "daemon/src",
        "agent/src",
        "proto/src",
        "sim/src",
        "xtask/src",
        "tests/src",
    ] {
        let mut files = Vec::new();
        rust_files(&root.join(crate_root), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            if !text.trim_start().starts_with("//!") {
                missing.push(relative(&file));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a leading //! line:\n{}",
        missing.join("\n")
    );
}

#[test]
fn only_the_simulator_mounts_the_unauthenticated_read_only_routers() {
    // `read_only_window_router` answers the admin API's viewer reads with no token: the
    // simulator's window onto a simulated fleet. The daemon itself must never mount it.
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in [
        "daemon/src",
        "daemon/tests",
        "tests",
        "xtask/src",
        "agent/src",
        "pxe/src",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut offenders = Vec::new();
    for file in &files {
        let name = relative(file);
        // Where they are defined, and this test.
        if name == "daemon/src/api/admin/mod.rs"
            || name == "daemon/src/api/dashboard/mod.rs"
            || name == "tests/tests/tidy.rs"
        {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in code_lines(&text) {
            if line.contains("read_only_window_router") {
                offenders.push(format!("{name}:{number}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "mounted outside the simulator: {offenders:?}"
    );
    let window = std::fs::read_to_string(root.join("sim/src/watch.rs")).unwrap();
    assert!(
        window.contains("read_only_window_router"),
        "the check looks for the right name"
    );
}
