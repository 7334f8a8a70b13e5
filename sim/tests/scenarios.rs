//! Every scenario in `scenarios/` on a few seeds (`SIM_SEEDS=A..B`, default 1..3), and the
//! replay guarantee: one scenario and seed, run twice, give byte-identical traces.

use std::path::{Path, PathBuf};

use bearman_sim::run::{run, RunOptions};
use bearman_sim::scenario::Scenario;

fn scenario_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{name}.toml"))
}

fn seeds() -> Vec<u64> {
    let text = std::env::var("SIM_SEEDS").unwrap_or_else(|_| "1..3".into());
    let (start, end) = text.split_once("..").expect("SIM_SEEDS is A..B");
    (start.parse().expect("SIM_SEEDS start")..end.parse().expect("SIM_SEEDS end")).collect()
}

fn check_scenario(name: &str) {
    let scenario = Scenario::load(&scenario_path(name)).expect("scenario loads");
    for seed in seeds() {
        let report = run(&scenario, &RunOptions::seed(seed), |_, _| {}).expect("simulation runs");
        let failures: Vec<String> = report
            .checker
            .verdicts()
            .iter()
            .filter(|v| !v.passed())
            .map(|v| format!("{}: {:?}", v.name, v.failures))
            .collect();
        assert!(
            failures.is_empty(),
            "{name} seed {seed} failed (replay: bearman-sim run scenarios/{name}.toml --seed {seed}):\n{}",
            failures.join("\n")
        );
        assert!(
            report.heartbeats_sent > 0,
            "{name} seed {seed}: no node ever reached stage 2"
        );
    }
}

#[test]
fn boot_storm() {
    check_scenario("boot-storm");
}

#[test]
fn firmware_rollout_pause() {
    check_scenario("firmware-rollout-pause");
}

/// The size: a rollout across 1,000 nodes (25 racks of 40) whose bundle fails on
/// 10 % of the boards pauses itself at the threshold, within the caps, with nobody booted
/// on the old BIOS. One seed (the first of `SIM_SEEDS`): the 100-node scenario takes the
/// seed range.
#[test]
fn firmware_rollout_across_1000_nodes_pauses_itself() {
    let scenario = Scenario::load(&scenario_path("firmware-rollout-pause"))
        .unwrap()
        .with_nodes(1000, Some(40))
        .unwrap();
    let seed = seeds()[0];
    let report = run(&scenario, &RunOptions::seed(seed), |_, _| {}).unwrap();
    assert!(
        report.passed(),
        "seed {seed}: {:?}",
        report
            .checker
            .verdicts()
            .iter()
            .filter(|v| !v.passed())
            .map(|v| (&v.name, &v.failures))
            .collect::<Vec<_>>()
    );
    let firmware = report.firmware.expect("a firmware run");
    assert!(firmware.paused_at.is_some(), "the rollout paused itself");
    assert!(
        firmware.most_flashing <= 20 && firmware.most_flashing_in_rack <= 4,
        "{firmware:?}"
    );
    assert!(
        firmware.behind_at_end > 500,
        "the pause held most of the fleet: {firmware:?}"
    );
}

/// The checker is not vacuous: a bundle that applies to no board (the wrong vendor) lets
/// the fleet boot on its old BIOS, and the firmware verdict says so.
#[test]
fn a_bundle_for_another_vendor_lets_nodes_boot_behind_and_the_checker_says_so() {
    let mut scenario = Scenario::load(&scenario_path("firmware-rollout-pause")).unwrap();
    scenario.firmware.as_mut().unwrap().bundle_vendor = Some("HPE".into());
    scenario.duration_s = 600;
    let report = run(&scenario, &RunOptions::seed(1), |_, _| {}).unwrap();
    let verdict = report
        .checker
        .firmware
        .as_ref()
        .expect("a firmware verdict");
    assert!(!verdict.passed(), "nodes booted behind and nothing noticed");
    assert!(
        verdict.failures[0].contains("reached stage 2 on BIOS 2.10.2"),
        "{:?}",
        verdict.failures
    );
}

#[test]
fn node_crash() {
    check_scenario("node-crash");
}

#[test]
fn node_power_loss() {
    check_scenario("node-power-loss");
}

/// Power sync earns its keep: a node whose BMC reads Off is fenced without the
/// confirmation wait. The same scenario and seeds with power sync off are the baseline;
/// the slowest fence with it must beat the fastest without.
#[test]
fn power_sync_fences_a_powered_off_node_sooner() {
    let with_sync = Scenario::load(&scenario_path("node-power-loss")).unwrap();
    let mut without = with_sync.clone();
    without.remediation.health.power_poll_interval_ms = 0;
    let confirm =
        std::time::Duration::from_millis(without.remediation.health.fence_confirm_ms as u64);
    for seed in seeds() {
        let detect_to_fence = |scenario: &Scenario| {
            let report = run(scenario, &RunOptions::seed(seed), |_, _| {}).unwrap();
            assert!(report.passed(), "{} seed {seed} failed", scenario.name);
            let times: Vec<_> = report
                .recoveries
                .iter()
                .map(|r| r.fenced_after.unwrap() - r.detected_after.unwrap())
                .collect();
            assert_eq!(times.len(), 2, "two nodes lost power");
            times
        };
        let fast = detect_to_fence(&with_sync);
        let slow = detect_to_fence(&without);
        let fast_max = fast.iter().max().unwrap();
        let slow_min = slow.iter().min().unwrap();
        assert!(
            *slow_min >= confirm && fast_max < slow_min,
            "seed {seed}: suspicion to verified fence {fast:?} with power sync, {slow:?} without"
        );
    }
}

#[test]
fn rack_power_loss() {
    check_scenario("rack-power-loss");
}

#[test]
fn tor_partition() {
    check_scenario("tor-partition");
}

#[test]
fn daemon_restart_mid_boot() {
    check_scenario("daemon-restart-mid-boot");
}

#[test]
fn bmc_flaky() {
    check_scenario("bmc-flaky");
}

#[test]
fn fleet_power_cycle() {
    check_scenario("fleet-power-cycle");
}

#[test]
fn daemon_crash_mid_evacuation() {
    check_scenario("daemon-crash-mid-evacuation");
}

#[test]
fn cloud_outage_during_evacuation() {
    check_scenario("cloud-outage-during-evacuation");
}

#[test]
fn crash_during_evacuation() {
    check_scenario("crash-during-evacuation");
}

#[test]
fn self_recovery_during_fence_retry() {
    check_scenario("self-recovery-during-fence-retry");
}

// Liveness scenarios (issue 11): each fails on a daemon that abandons a fence it cannot
// verify, waits out the whole Ready timeout when a rebuild goes silent, or never looks at
// a node whose first boot stalled with no remediation on it.

#[test]
fn bmc_dark_then_crash() {
    check_scenario("bmc-dark-then-crash");
}

#[test]
fn bmc_recovers_mid_retry() {
    check_scenario("bmc-recovers-mid-retry");
}

#[test]
fn crash_during_rebuild() {
    check_scenario("crash-during-rebuild");
}

#[test]
fn crash_during_first_boot() {
    check_scenario("crash-during-first-boot");
}

#[test]
fn every_scenario_file_has_a_test() {
    let source = include_str!("scenarios.rs");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 9, "scenarios: {names:?}");
    for name in names {
        assert!(
            source.contains(&format!("check_scenario(\"{name}\")"))
                || source.contains(&format!("check_ha_scenario(\"{name}\"")),
            "scenarios/{name}.toml has no test in sim/tests/scenarios.rs"
        );
    }
}

#[test]
fn same_seed_replays_byte_for_byte() {
    let scenario = Scenario::load(&scenario_path("daemon-restart-mid-boot")).unwrap();
    let first = run(&scenario, &RunOptions::seed(7), |_, _| {}).unwrap();
    let second = run(&scenario, &RunOptions::seed(7), |_, _| {}).unwrap();
    assert_eq!(
        first.trace.lines(),
        second.trace.lines(),
        "traces differ between identical runs"
    );
    assert_eq!(first.trace.hash(), second.trace.hash());
    let other = run(&scenario, &RunOptions::seed(8), |_, _| {}).unwrap();
    assert_ne!(
        first.trace.hash(),
        other.trace.hash(),
        "a different seed should change the run"
    );
}

// High availability (issue 12): three replicas on a database host. Each run must also
// have judged actions against the lease and seen the takeover it is about, so a pass
// rests on something.

fn check_ha_scenario(name: &str, takeovers: usize) {
    check_scenario(name);
    let scenario = Scenario::load(&scenario_path(name)).unwrap();
    let seed = seeds()[0];
    let report = run(&scenario, &RunOptions::seed(seed), |_, _| {}).unwrap();
    assert!(report.lease_terms >= 1, "{name}: no lease term was granted");
    assert_eq!(report.takeovers.len(), takeovers, "{name}: takeovers");
    assert!(
        report.checker.cluster.is_some(),
        "{name}: the cluster verdicts did not run"
    );
}

#[test]
fn ha_leader_killed_mid_fence() {
    check_ha_scenario("ha-leader-killed-mid-fence", 1);
}

/// A drill outlives its leader: the replica that takes over resumes it and it passes.
#[test]
fn ha_drill_leader_killed() {
    check_ha_scenario("ha-drill-leader-killed", 1);
}

#[test]
fn ha_leader_cut_from_database() {
    check_ha_scenario("ha-leader-cut-from-database", 1);
}

#[test]
fn ha_stalled_leader_wakes() {
    check_ha_scenario("ha-stalled-leader-wakes", 1);
}

#[test]
fn ha_leader_cut_from_nodes() {
    check_ha_scenario("ha-leader-cut-from-nodes", 0);
}

#[test]
fn ha_database_restart_during_boot_storm() {
    check_ha_scenario("ha-database-restart-during-boot-storm", 0);
}

/// A clustered run replays byte for byte from its seed, the database host and the
/// paused leader included.
#[test]
fn ha_runs_replay_byte_for_byte() {
    let scenario = Scenario::load(&scenario_path("ha-stalled-leader-wakes")).unwrap();
    let first = run(&scenario, &RunOptions::seed(7), |_, _| {}).unwrap();
    let second = run(&scenario, &RunOptions::seed(7), |_, _| {}).unwrap();
    assert_eq!(first.trace.hash(), second.trace.hash());
    assert!(first.actions_judged > 0);
}

// Chaos drills (issue 14): the simulated operator runs each `[[drill]]` through the real
// admin API (preview, start with the name confirmed, poll the report); the daemon injects
// through the simulated BMC fabric or its own heartbeat path. The drills verdict compares
// the report's outcome with `expect_outcome`.

#[test]
fn drill_power_loss() {
    check_scenario("drill-power-loss");
}

#[test]
fn drill_silence() {
    check_scenario("drill-silence");
}

#[test]
fn drill_kernel_panic() {
    check_scenario("drill-kernel-panic");
}

#[test]
fn drill_abort() {
    check_scenario("drill-abort");
}

/// The drills verdict is not vacuous: the same drill with a hypothesis it cannot meet
/// (Ready within 30 s of a power loss) comes to `failed` in the daemon's report, which
/// fails a run expecting `passed` and passes one expecting `failed`.
#[test]
fn a_drill_whose_hypothesis_breaks_is_failed_and_the_verdict_says_so() {
    let mut scenario = Scenario::load(&scenario_path("drill-power-loss")).unwrap();
    let drill = &mut scenario.drills[0];
    drill.spec = Some(
        drill
            .spec
            .as_ref()
            .unwrap()
            .replace("ready_within_s = 600", "ready_within_s = 30"),
    );
    scenario.validate().unwrap();
    let report = run(&scenario, &RunOptions::seed(1), |_, _| {}).unwrap();
    let verdict = report.checker.drills.as_ref().expect("a drills verdict");
    assert!(!verdict.passed(), "a broken hypothesis went unnoticed");
    assert!(
        verdict.failures[0].contains("outcome failed, expected passed")
            && verdict.failures[0].contains("ready_within_s <= 30 s"),
        "{:?}",
        verdict.failures
    );
    scenario.drills[0].expect_outcome = bearman_sim::scenario::DrillOutcome::Failed;
    let report = run(&scenario, &RunOptions::seed(1), |_, _| {}).unwrap();
    assert!(report.passed(), "{:?}", report.checker.drills);
}

/// Each drill scenario replays byte for byte; the aborted power loss was restored (its
/// target powered back on through the BMC, as the report and the trace say).
#[test]
fn drill_runs_replay_byte_for_byte() {
    for name in [
        "drill-power-loss",
        "drill-silence",
        "drill-kernel-panic",
        "drill-abort",
    ] {
        let scenario = Scenario::load(&scenario_path(name)).unwrap();
        let first = run(&scenario, &RunOptions::seed(5), |_, _| {}).unwrap();
        let second = run(&scenario, &RunOptions::seed(5), |_, _| {}).unwrap();
        assert_eq!(first.trace.hash(), second.trace.hash(), "{name}");
        assert!(first.drills[0].finished, "{name}: {:?}", first.drills[0]);
        if name == "drill-abort" {
            let report = first.drills[0].report.as_ref().unwrap();
            assert_eq!(
                report.targets[0].restored.as_deref(),
                Some("powered on"),
                "{report:?}"
            );
            let target = bearman_sim::fleet::index_of(&report.targets[0].uuid).unwrap();
            let name = format!("r1n{target}");
            assert!(
                first
                    .trace
                    .lines()
                    .iter()
                    .any(|line| line.ends_with(&format!("power_on {name} (bmc)"))),
                "the restore's power-on never reached {name}"
            );
        }
    }
}

/// Skipping idle hosts (turmoil patched, see vendor/README.md) changes nothing: a run
/// that steps every host in every tick gives the same trace, line for line. One
/// scenario per way a host's runtime is touched between ticks: a daemon restart
/// (bounce), node crashes with fencing and evacuation, and a paused leader that wakes.
#[test]
fn skipping_idle_hosts_changes_nothing() {
    for (name, seed) in [
        ("daemon-restart-mid-boot", 7),
        ("node-crash", 3),
        ("ha-stalled-leader-wakes", 7),
    ] {
        let scenario = Scenario::load(&scenario_path(name)).unwrap();
        let skipping = run(&scenario, &RunOptions::seed(seed), |_, _| {}).unwrap();
        let every_host = run(
            &scenario,
            &RunOptions {
                seed,
                run_idle_hosts: true,
            },
            |_, _| {},
        )
        .unwrap();
        assert!(
            skipping.host_ticks_skipped > 0 && every_host.host_ticks_skipped == 0,
            "{name}: {} host ticks skipped when skipping, {} when stepping every host",
            skipping.host_ticks_skipped,
            every_host.host_ticks_skipped
        );
        assert_eq!(
            skipping.host_ticks_run + skipping.host_ticks_skipped,
            every_host.host_ticks_run,
            "{name}: every host is run or skipped once per step"
        );
        assert!(
            skipping.steps > 0 && skipping.steps == every_host.steps,
            "{name}: {} steps skipping, {} stepping every host",
            skipping.steps,
            every_host.steps
        );
        assert_eq!(
            skipping.trace.lines(),
            every_host.trace.lines(),
            "{name} seed {seed}: skipping idle hosts changed the run"
        );
    }
}
