//! Seed sweeps: what each seed's run concluded ([`SeedOutcome`]), a sweep's JSON report
//! ([`SweepReport`], written by `bearman-sim run --json`), merging the reports of shards
//! run elsewhere ([`merge`], `bearman-sim merge`), and the aggregate every one of them
//! prints ([`aggregate_text`]).
//!
//! Architecture invariant: an aggregate depends only on the seeds' outcomes, never on the
//! order they finished in or where they ran, so a serial run, `--jobs N` and merged
//! `--shard I/N` reports print the same aggregate. Wall-clock figures are kept apart
//! (`wall_ms`) and left out of it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::recovery::{percentile, Recovery};
use crate::run::Report;

/// The report format's version; `merge` refuses others.
pub const FORMAT: u32 = 1;

/// One crash's recovery, as a report keeps it (milliseconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryMs {
    pub node: String,
    pub crashed_at_ms: u64,
    pub detected_after_ms: Option<u64>,
    pub fenced_after_ms: Option<u64>,
    pub vms_elsewhere_after_ms: Option<u64>,
    pub ready_after_ms: Option<u64>,
    pub interrupted: bool,
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<&Recovery> for RecoveryMs {
    fn from(recovery: &Recovery) -> Self {
        RecoveryMs {
            node: recovery.node.clone(),
            crashed_at_ms: ms(recovery.crashed_at),
            detected_after_ms: recovery.detected_after.map(ms),
            fenced_after_ms: recovery.fenced_after.map(ms),
            vms_elsewhere_after_ms: recovery.vms_elsewhere_after.map(ms),
            ready_after_ms: recovery.ready_after.map(ms),
            interrupted: recovery.interrupted(),
        }
    }
}

/// What one seed's run concluded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedOutcome {
    pub seed: u64,
    pub passed: bool,
    pub trace_hash: String,
    /// Every failed verdict, "name: failure".
    pub failures: Vec<String>,
    pub recoveries: Vec<RecoveryMs>,
    pub fences: usize,
    pub lease_terms: usize,
    pub takeovers_ms: Vec<u64>,
    pub actions_judged: u64,
    pub virtual_ms: u64,
    /// How long the run took here; not part of the aggregate.
    pub wall_ms: u64,
    /// The scenario's drills as the operator ran them (their reports, as the daemon
    /// wrote them): what `bearman-sim rehearse` predicts from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drills: Vec<crate::drill::DrillRun>,
}

impl SeedOutcome {
    pub fn of(seed: u64, report: &Report, wall: Duration) -> SeedOutcome {
        let failures = report
            .checker
            .verdicts()
            .iter()
            .filter(|verdict| !verdict.passed())
            .flat_map(|verdict| {
                verdict
                    .failures
                    .iter()
                    .map(move |failure| format!("{}: {failure}", verdict.name))
            })
            .collect();
        SeedOutcome {
            seed,
            passed: report.passed(),
            trace_hash: report.trace.hash(),
            failures,
            recoveries: report.recoveries.iter().map(RecoveryMs::from).collect(),
            fences: report.fences,
            lease_terms: report.lease_terms,
            takeovers_ms: report.takeovers.iter().copied().map(ms).collect(),
            actions_judged: report.actions_judged,
            virtual_ms: ms(report.virtual_time),
            wall_ms: ms(wall),
            drills: report.drills.clone(),
        }
    }
}

/// A sweep's report: one scenario at one fleet shape, some seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    pub format: u32,
    pub scenario: String,
    pub nodes: u32,
    pub racks: u32,
    /// In seed order.
    pub seeds: Vec<SeedOutcome>,
}

impl SweepReport {
    pub fn new(scenario: &str, nodes: u32, racks: u32, mut seeds: Vec<SeedOutcome>) -> Self {
        seeds.sort_by_key(|outcome| outcome.seed);
        SweepReport {
            format: FORMAT,
            scenario: scenario.to_string(),
            nodes,
            racks,
            seeds,
        }
    }

    pub fn passed(&self) -> bool {
        self.seeds.iter().all(|outcome| outcome.passed)
    }
}

/// Why reports cannot be merged.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("no reports to merge")]
    Empty,
    #[error("report {index} has format {found}; this bearman-sim reads format {FORMAT}")]
    Format { index: usize, found: u32 },
    #[error("report {index} is {found}, report 0 is {expected}: merge sweeps of one scenario at one fleet shape")]
    Mismatch {
        index: usize,
        expected: String,
        found: String,
    },
    #[error("seed {seed} is in more than one report (shards overlap)")]
    DuplicateSeed { seed: u64 },
}

/// The seeds of every report in one, refusing reports of another scenario or fleet
/// shape and seeds run twice.
pub fn merge(reports: Vec<SweepReport>) -> Result<SweepReport, MergeError> {
    let first = reports.first().ok_or(MergeError::Empty)?;
    let shape = |r: &SweepReport| format!("{} ({} nodes, {} racks)", r.scenario, r.nodes, r.racks);
    let expected = shape(first);
    let (scenario, nodes, racks) = (first.scenario.clone(), first.nodes, first.racks);
    let mut seeds = BTreeMap::new();
    for (index, report) in reports.into_iter().enumerate() {
        if report.format != FORMAT {
            return Err(MergeError::Format {
                index,
                found: report.format,
            });
        }
        let found = shape(&report);
        if found != expected {
            return Err(MergeError::Mismatch {
                index,
                expected,
                found,
            });
        }
        for outcome in report.seeds {
            let seed = outcome.seed;
            if seeds.insert(seed, outcome).is_some() {
                return Err(MergeError::DuplicateSeed { seed });
            }
        }
    }
    Ok(SweepReport::new(
        &scenario,
        nodes,
        racks,
        seeds.into_values().collect(),
    ))
}

/// Which of `seeds` shard `index` of `count` runs: every `count`-th, from the
/// `index`-th. Together the shards run each seed once.
pub fn shard(seeds: &[u64], index: usize, count: usize) -> Vec<u64> {
    seeds
        .iter()
        .enumerate()
        .filter(|(position, _)| count > 0 && position % count == index)
        .map(|(_, seed)| *seed)
        .collect()
}

/// "p50 … p99 … max …" of `values` (seconds, one decimal; "-" when empty).
pub fn distribution(values: &[Duration]) -> String {
    let fmt =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    format!(
        "p50 {}  p99 {}  max {}",
        fmt(percentile(values, 50)),
        fmt(percentile(values, 99)),
        fmt(values.iter().max().copied())
    )
}

/// The aggregate over every seed: pass count, recovery figures over every crashed node,
/// and for clustered runs the takeovers. Depends on the outcomes only.
pub fn aggregate_text(report: &SweepReport) -> String {
    let mut out = String::new();
    let recoveries: Vec<&RecoveryMs> = report.seeds.iter().flat_map(|s| &s.recoveries).collect();
    let fences: usize = report.seeds.iter().map(|s| s.fences).sum();
    let passed = report.seeds.iter().filter(|s| s.passed).count();
    out.push_str(&format!(
        "{}: {} seeds ({passed} passed), {} crashed node(s), {fences} fence(s) started\n",
        report.scenario,
        report.seeds.len(),
        recoveries.len()
    ));
    let mut show = |label: &str, pick: fn(&RecoveryMs) -> Option<u64>, excused: usize| {
        let values: Vec<Duration> = recoveries
            .iter()
            .filter_map(|r| pick(r))
            .map(Duration::from_millis)
            .collect();
        let missing = recoveries.len() - values.len() - excused;
        if values.is_empty() && missing == 0 {
            return;
        }
        out.push_str(&format!(
            "  {label:<28} {}{}\n",
            distribution(&values),
            if missing > 0 {
                format!("  ({missing} never)")
            } else {
                String::new()
            }
        ));
    };
    show("crash -> detected", |r| r.detected_after_ms, 0);
    show("crash -> fence verified", |r| r.fenced_after_ms, 0);
    show(
        "crash -> VMs running elsewhere",
        |r| r.vms_elsewhere_after_ms,
        0,
    );
    // A recovery cut short by the node's next crash has no Ready time of its own.
    let interrupted = recoveries
        .iter()
        .filter(|r| r.interrupted && r.ready_after_ms.is_none())
        .count();
    show(
        "crash -> node Ready again",
        |r| r.ready_after_ms,
        interrupted,
    );
    let takeovers: Vec<Duration> = report
        .seeds
        .iter()
        .flat_map(|s| s.takeovers_ms.iter().copied().map(Duration::from_millis))
        .collect();
    if report.seeds.iter().any(|s| s.lease_terms > 0) {
        let judged: u64 = report.seeds.iter().map(|s| s.actions_judged).sum();
        out.push_str(&format!(
            "  leader lost -> new lease term {}  ({} takeover(s)); {judged} action(s) judged against the lease\n",
            distribution(&takeovers),
            takeovers.len()
        ));
    }
    let failed: Vec<String> = report
        .seeds
        .iter()
        .filter(|s| !s.passed)
        .map(|s| s.seed.to_string())
        .collect();
    if !failed.is_empty() {
        out.push_str(&format!("  FAILED seeds: {}\n", failed.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(seed: u64, passed: bool) -> SeedOutcome {
        SeedOutcome {
            seed,
            passed,
            trace_hash: format!("hash{seed}"),
            failures: Vec::new(),
            recoveries: vec![RecoveryMs {
                node: format!("n{seed}"),
                crashed_at_ms: 1_000,
                detected_after_ms: Some(seed * 1_000),
                fenced_after_ms: Some(seed * 2_000),
                vms_elsewhere_after_ms: None,
                ready_after_ms: Some(seed * 10_000),
                interrupted: false,
            }],
            fences: 1,
            lease_terms: 0,
            takeovers_ms: Vec::new(),
            actions_judged: 0,
            virtual_ms: 60_000,
            wall_ms: seed * 7,
            drills: Vec::new(),
        }
    }

    fn report(seeds: &[u64]) -> SweepReport {
        SweepReport::new(
            "s",
            80,
            4,
            seeds.iter().map(|s| outcome(*s, *s != 3)).collect(),
        )
    }

    #[test]
    fn shards_run_every_seed_once() {
        let seeds: Vec<u64> = (1..=10).collect();
        let mut all: Vec<u64> = (0..3).flat_map(|i| shard(&seeds, i, 3)).collect();
        all.sort();
        assert_eq!(all, seeds);
        assert_eq!(shard(&seeds, 1, 3), vec![2, 5, 8]);
    }

    #[test]
    fn merged_shards_aggregate_like_the_whole_sweep() {
        let whole = report(&[1, 2, 3, 4, 5]);
        let merged = merge(vec![report(&[4, 2]), report(&[5, 1, 3])]).unwrap();
        assert_eq!(merged.seeds, whole.seeds);
        assert_eq!(aggregate_text(&merged), aggregate_text(&whole));
        let text = aggregate_text(&whole);
        assert!(
            text.starts_with("s: 5 seeds (4 passed), 5 crashed node(s), 5 fence(s) started\n"),
            "{text}"
        );
        assert!(
            text.contains("crash -> VMs running elsewhere p50 -  p99 -  max -  (5 never)"),
            "{text}"
        );
        assert!(text.contains("FAILED seeds: 3"), "{text}");
        // Wall times differ between machines and never reach the aggregate.
        let mut slower = whole.clone();
        slower.seeds.iter_mut().for_each(|s| s.wall_ms *= 100);
        assert_eq!(aggregate_text(&slower), text);
    }

    #[test]
    fn merge_refuses_overlaps_and_foreign_reports() {
        assert_eq!(
            merge(vec![report(&[1, 2]), report(&[2, 3])]),
            Err(MergeError::DuplicateSeed { seed: 2 })
        );
        let mut other = report(&[9]);
        other.nodes = 1000;
        assert!(matches!(
            merge(vec![report(&[1]), other]),
            Err(MergeError::Mismatch { index: 1, .. })
        ));
        let mut future = report(&[9]);
        future.format = 2;
        assert_eq!(
            merge(vec![future]),
            Err(MergeError::Format { index: 0, found: 2 })
        );
        assert_eq!(merge(Vec::new()), Err(MergeError::Empty));
    }
}
