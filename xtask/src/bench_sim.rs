//! `cargo xtask bench-sim`: the simulator beside turmoil's floor, in one command.
//!
//! The floor (`../shared/bench/turmoil-floor`: an axum server and the fleet's host shape
//! on crates.io's turmoil, heartbeats only, no daemon logic) is what turmoil alone costs
//! for that many hosts and requests. Absolute times on shared machines move 2–3× between
//! days; the ratio of the two, run back to back in one command, is what holds.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context};

use crate::process::cargo_build;

#[derive(clap::Args)]
pub struct Args {
    /// Fleet shapes as RACKSxNODES_PER_RACK (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "25x40,40x25")]
    shapes: Vec<String>,
    /// Virtual seconds per run
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(60..=86_400))]
    virtual_s: u64,
    /// Runs of each (floor, simulator) pair, interleaved
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// The scenario the simulator runs, resized to each shape (its faults must fall
    /// within --virtual-s)
    #[arg(long, default_value = "scenarios/boot-storm.toml")]
    scenario: PathBuf,
    /// The floor harness's Cargo.toml
    #[arg(long, default_value = "../shared/bench/turmoil-floor/Cargo.toml")]
    floor_manifest: PathBuf,
    /// Which builds of the floor to run: `shipped` (its own release profile), `like-sim`
    /// (the simulator's release settings: fat LTO, one codegen unit), or `both`, so the
    /// part of the ratio that comes from the compiler settings shows
    #[arg(long, value_enum, default_value_t = FloorBuild::Both)]
    floor: FloorBuild,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FloorBuild {
    Shipped,
    LikeSim,
    Both,
}

/// The workspace's `[profile.release]` settings that are not cargo's defaults, as the
/// environment overrides that give another workspace's release build the same (the
/// floor's, for a like-for-like comparison). A test checks them against Cargo.toml.
const SIM_RELEASE_SETTINGS: [(&str, &str); 2] = [
    ("CARGO_PROFILE_RELEASE_LTO", "fat"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1"),
];

fn progress(message: impl Display) {
    eprintln!("bench-sim: {message}");
}

fn parse_shape(text: &str) -> anyhow::Result<(u32, u32)> {
    let (racks, per_rack) = text
        .split_once('x')
        .with_context(|| format!("{text:?}: a shape is RACKSxNODES_PER_RACK, e.g. 25x40"))?;
    let racks: u32 = racks.parse().with_context(|| format!("{text:?}: racks"))?;
    let per_rack: u32 = per_rack
        .parse()
        .with_context(|| format!("{text:?}: nodes per rack"))?;
    ensure!(
        racks >= 1 && per_rack >= 1 && u64::from(racks) * u64::from(per_rack) <= 100_000,
        "{text:?}: 1-100,000 nodes"
    );
    Ok((racks, per_rack))
}

/// Runs `command` to completion and returns its wall time in seconds; its output is
/// checked by `ok`.
fn timed(mut command: Command, what: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() || !ok(&text) {
        bail!("{what} failed ({}):\n{text}", output.status);
    }
    Ok(seconds)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let shapes = args
        .shapes
        .iter()
        .map(|shape| parse_shape(shape))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives inside the workspace")?;
    let floor_manifest = workspace.join(&args.floor_manifest);
    ensure!(
        floor_manifest.exists(),
        "{}: no floor harness there (--floor-manifest)",
        floor_manifest.display()
    );
    let scenario_text = std::fs::read_to_string(workspace.join(&args.scenario))
        .with_context(|| format!("reading {}", args.scenario.display()))?;
    progress("building the simulator: cargo build --release -p bearman-sim");
    let sim = cargo_build(
        workspace,
        &["--release", "-p", "bearman-sim"],
        &[],
        "bearman-sim",
    )?;
    let mut floors: Vec<(&str, PathBuf)> = Vec::new();
    if args.floor != FloorBuild::LikeSim {
        floors.push(("floor", build_floor(workspace, &floor_manifest, false)?));
    }
    if args.floor != FloorBuild::Shipped {
        floors.push(("floor-lto", build_floor(workspace, &floor_manifest, true)?));
    }

    let work = tempfile::Builder::new()
        .prefix("bench-sim-")
        .tempdir()
        .context("creating a temporary directory")?;
    let scenario = work.path().join("scenario.toml");
    let mut replaced = false;
    let text: Vec<String> = scenario_text
        .lines()
        .map(|line| {
            if line.starts_with("duration_s") {
                replaced = true;
                format!("duration_s = {}", args.virtual_s)
            } else {
                line.to_string()
            }
        })
        .collect();
    ensure!(replaced, "{}: no duration_s line", args.scenario.display());
    std::fs::write(&scenario, text.join("\n")).context("writing the scenario")?;

    println!(
        "{:>10}  {:>7}  {:>5}  {:>9}  {:>9}  {:>9}  {:>16}",
        "shape", "nodes", "round", "floor", "floor s", "sim s", "sim vs floor"
    );
    for (racks, per_rack) in shapes {
        let nodes = racks * per_rack;
        for round in 1..=args.rounds {
            // Each floor build, then the simulator, back to back: the ratio of runs
            // minutes apart would carry the machine's drift.
            let mut floor_times = Vec::new();
            for (label, floor) in &floors {
                let mut floor_run = Command::new(floor);
                floor_run.args([
                    racks.to_string(),
                    per_rack.to_string(),
                    args.virtual_s.to_string(),
                    "10".into(),
                ]);
                let floor_s = timed(floor_run, "the floor harness", |text| {
                    text.contains("ratio=")
                })?;
                floor_times.push((*label, floor_s));
            }
            let mut sim_run = Command::new(&sim);
            sim_run.args(["run"]).arg(&scenario).args([
                "--nodes",
                &nodes.to_string(),
                "--nodes-per-rack",
                &per_rack.to_string(),
                "--seed",
                "1",
            ]);
            let sim_s = timed(sim_run, "the simulator", |text| text.contains("trace hash"))?;
            for (label, floor_s) in floor_times {
                println!(
                    "{:>10}  {:>7}  {:>5}  {:>9}  {:>9.1}  {:>9.1}  {:>15.2}×",
                    format!("{racks}x{per_rack}"),
                    nodes,
                    round,
                    label,
                    floor_s,
                    sim_s,
                    floor_s / sim_s
                );
            }
        }
    }
    println!(
        "(sim vs floor: the floor's wall time over the simulator's; above 1 the simulator, \
         running the real daemon and agent, is faster than turmoil alone with heartbeats. \
         floor: the harness as shipped; floor-lto: built with the simulator's release \
         settings)"
    );
    Ok(())
}

/// Builds the floor harness in release, as shipped or with [`SIM_RELEASE_SETTINGS`]
/// (each in its own target directory); returns its binary.
fn build_floor(workspace: &Path, manifest: &Path, like_sim: bool) -> anyhow::Result<PathBuf> {
    let (target, how) = if like_sim {
        (
            "target/turmoil-floor-lto",
            "with the simulator's release settings",
        )
    } else {
        ("target/turmoil-floor", "as shipped")
    };
    progress(format!("building the floor {how}: {}", manifest.display()));
    let floor_target = workspace.join(target);
    let mut cargo = Command::new("cargo");
    cargo
        .args(["build", "--release", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&floor_target);
    for (name, value) in SIM_RELEASE_SETTINGS {
        if like_sim {
            cargo.env(name, value);
        } else {
            cargo.env_remove(name);
        }
    }
    let status = cargo
        .status()
        .context("running cargo for the floor harness")?;
    ensure!(status.success(), "building the floor harness failed");
    Ok(floor_target.join("release/tproto"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor built "like the simulator" must get what the workspace's release
    /// profile really says.
    #[test]
    fn the_floors_like_sim_settings_are_the_workspaces_release_profile() {
        let manifest =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
                .unwrap();
        let release = manifest
            .split("\n[")
            .find(|section| section.starts_with("profile.release]"))
            .expect("a [profile.release] section");
        let setting = |key: &str| {
            release
                .lines()
                .find_map(|line| line.strip_prefix(key)?.trim().strip_prefix('='))
                .map(|value| value.trim().trim_matches('"').to_string())
        };
        assert_eq!(setting("lto").as_deref(), Some(SIM_RELEASE_SETTINGS[0].1));
        assert_eq!(
            setting("codegen-units").as_deref(),
            Some(SIM_RELEASE_SETTINGS[1].1)
        );
    }
}
