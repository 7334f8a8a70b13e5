//! `bearman-sim rehearse` through the real binary: a twin and a drill file in, a
//! prediction out that `bearman drill run --prediction` accepts (it parses as
//! `core::drill::Prediction` and passes its check), and a scenario file that replays.

use std::path::{Path, PathBuf};
use std::process::Command;

use bearman::core::drill::{Prediction, PHASES};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/drill")
        .join(name)
}

fn rehearse(dir: &Path, drill: &Path, seeds: &str) -> (std::process::Output, PathBuf, PathBuf) {
    let json = dir.join("prediction.json");
    let scenario = dir.join("rehearsal.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_bearman-sim"))
        .arg("rehearse")
        .arg("--twin")
        .arg(fixture("twin-small.json"))
        .arg(drill)
        .args(["--seeds", seeds, "--jobs", "2"])
        .arg("--json")
        .arg(&json)
        .arg("--scenario-out")
        .arg(&scenario)
        .output()
        .expect("bearman-sim runs");
    (output, json, scenario)
}

#[test]
fn a_rehearsal_predicts_every_phase_and_saves_a_replayable_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let (output, json, scenario) = rehearse(dir.path(), &fixture("power-loss.toml"), "1..3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("vms_elsewhere_within_s"), "{stdout}");
    assert!(stdout.contains("holds in 2/2 seed(s)"), "{stdout}");
    let prediction: Prediction =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    prediction.check().unwrap();
    assert_eq!(prediction.seeds, 2);
    assert!(prediction.broken.is_empty(), "{prediction:?}");
    for phase in PHASES {
        let spread = prediction.phases.get(phase).unwrap_or_else(|| {
            panic!("no {phase} in {prediction:?}");
        });
        assert!(
            spread.p50_s > 0.0 && spread.p50_s <= spread.p99_s,
            "{phase}"
        );
    }
    // The saved scenario is the what-if, replayable as any other: twin rack r08 became
    // the simulator's second rack, and the storage and not-Ready nodes are modelled.
    let text = std::fs::read_to_string(&scenario).unwrap();
    assert!(text.contains("rack = \"tor-r1-1\""), "{text}");
    let parsed = bearman_sim::scenario::Scenario::load(&scenario).unwrap();
    assert_eq!(parsed.fleet.rack_sizes, vec![8, 8, 6]);
    assert_eq!(parsed.fleet.rack_storage, vec![1, 1, 1]);
    assert_eq!(parsed.fleet.off_nodes.len(), 2);
    assert_eq!(parsed.fleet.vms_per_node, 3, "2.6 rounded");
}

/// A budget the twin cannot meet: the preflight refuses on every seed, and the
/// rehearsal says so and exits non-zero.
#[test]
fn a_rehearsal_whose_budget_refuses_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let drill = dir.path().join("greedy.toml");
    let text = std::fs::read_to_string(fixture("power-loss.toml"))
        .unwrap()
        .replace("ready_compute_left_min = 10", "ready_compute_left_min = 50");
    std::fs::write(&drill, text).unwrap();
    let (output, json, _) = rehearse(dir.path(), &drill, "1..2");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("outcomes: refused 1"), "{stdout}");
    assert!(stdout.contains("budget.ready_compute_left_min"), "{stdout}");
    let prediction: Prediction =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(prediction.phases.is_empty());
}
