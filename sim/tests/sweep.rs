//! Seed sweeps through the real `bearman-sim` binary: `--jobs` and `--shard` + `merge`
//! give the serial run's verdicts, trace hashes and aggregate.

use std::path::Path;
use std::process::Command;

use bearman_sim::sweep::SweepReport;

const SCENARIO: &str = "node-crash";

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bearman-sim"))
}

/// Runs the sweep with `extra` arguments, returning its JSON report and stdout.
fn sweep(dir: &Path, name: &str, extra: &[&str]) -> (SweepReport, String) {
    let json = dir.join(format!("{name}.json"));
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{SCENARIO}.toml"));
    let output = sim()
        .arg("run")
        .arg(&scenario)
        // A small fleet: the point is the seeds, not the size.
        .args([
            "--seeds",
            "1..7",
            "--nodes",
            "16",
            "--nodes-per-rack",
            "4",
            "--quiet",
        ])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("bearman-sim runs");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, stdout)
}

/// The report without what differs from run to run (wall-clock time).
fn verdicts(mut report: SweepReport) -> SweepReport {
    report.seeds.iter_mut().for_each(|seed| seed.wall_ms = 0);
    report
}

/// The printed lines without their wall-clock ratio.
fn without_wall(stdout: &str) -> String {
    stdout
        .lines()
        .map(|line| line.split(" virtual/wall").next().unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn jobs_and_merged_shards_equal_the_serial_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let (serial, serial_out) = sweep(dir.path(), "serial", &[]);
    assert_eq!(serial.seeds.len(), 6);
    assert!(serial.passed());
    assert!(
        serial_out.contains("node-crash: 6 seeds (6 passed)"),
        "{serial_out}"
    );

    let (parallel, parallel_out) = sweep(dir.path(), "jobs", &["--jobs", "3"]);
    assert_eq!(verdicts(parallel), verdicts(serial.clone()));
    assert_eq!(without_wall(&parallel_out), without_wall(&serial_out));

    let (first, _) = sweep(dir.path(), "shard0", &["--shard", "0/2"]);
    let (second, _) = sweep(dir.path(), "shard1", &["--shard", "1/2"]);
    assert_eq!(
        first.seeds.iter().map(|s| s.seed).collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
    let merged_json = dir.path().join("merged.json");
    let merged = sim()
        .arg("merge")
        .arg(dir.path().join("shard1.json"))
        .arg(dir.path().join("shard0.json"))
        .arg("--json")
        .arg(&merged_json)
        .output()
        .unwrap();
    assert!(merged.status.success());
    let merged_out = String::from_utf8(merged.stdout).unwrap();
    let aggregate = serial_out
        .split_once("node-crash: 6 seeds")
        .map(|(_, rest)| format!("node-crash: 6 seeds{rest}"))
        .unwrap();
    assert_eq!(merged_out, aggregate);
    let merged: SweepReport =
        serde_json::from_str(&std::fs::read_to_string(&merged_json).unwrap()).unwrap();
    assert_eq!(verdicts(merged), verdicts(serial));
    drop((first, second));

    // Overlapping shards are refused, not double-counted.
    let overlap = sim()
        .arg("merge")
        .arg(dir.path().join("shard0.json"))
        .arg(dir.path().join("serial.json"))
        .output()
        .unwrap();
    assert_eq!(overlap.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&overlap.stderr).contains("more than one report"));
}

#[test]
fn bad_shards_are_refused_with_the_reason() {
    for (shard, says) in [
        ("2/2", "need 0 <= I < N"),
        ("x/2", "bad I"),
        ("1", "expected I/N"),
    ] {
        let output = sim()
            .args([
                "run",
                "../scenarios/node-crash.toml",
                "--seeds",
                "1..3",
                "--shard",
                shard,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{shard}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{shard}: {stderr}");
    }
}
