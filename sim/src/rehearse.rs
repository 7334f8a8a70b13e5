//! `bearman-sim rehearse`: a drill rehearsed on a twin of the live fleet. The twin
//! (`bearman drill twin --out`, [`FleetTwin`]) becomes a scenario — one simulated rack per
//! twin rack with its node count, storage (and other non-compute) nodes carrying no VMs,
//! nodes the twin shows not Ready kept powered off, the twin's remediation settings, VMs
//! per compute node from the twin's sample — with the drill as its `[[drill]]`, its
//! targets mapped onto the simulated nodes. Each seed runs the real daemon through the
//! warm-up and the drill; the daemon's reports give each phase's time per target, which
//! [`predict`] turns into the p50/p99 a real run is compared with
//! ([`Prediction`], what `bearman drill run --prediction` reads).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{bail, Context};
use bearman::core::drill::{DrillSpec, FleetTwin, PhaseSpread, Prediction, PHASES};
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::NodeRole;
use bearman_proto::uuid::NodeUuid;

use crate::drill::DrillRun;
use crate::fleet::UUID_NAMESPACE;
use crate::sweep::SweepReport;

/// When the simulated operator first previews the drill: the fleet's first boot (a boot
/// storm from power-on) is over by then at any size the scenarios use.
const DRILL_AT_S: u64 = 300;
/// How long the operator keeps previewing for the preflight to pass (the fleet Ready).
const START_WITHIN_S: u64 = 600;
/// Virtual time after the drill's deadline, for the last poll and the end checks.
const TAIL_S: u64 = 180;

/// The simulator's rack name for rack `index`: what its top-of-rack switch says over
/// LLDP, which the daemon takes as the rack.
pub fn sim_rack_name(index: usize) -> String {
    format!("tor-r{index}-1")
}

/// A twin turned into a scenario, and how its names map onto the simulator's.
#[derive(Debug)]
pub struct TwinScenario {
    /// The scenario file's text.
    pub text: String,
    /// Twin uuid → simulated node index.
    pub nodes: BTreeMap<NodeUuid, u32>,
    /// Twin rack name → simulated rack name.
    pub racks: BTreeMap<String, String>,
    pub vms_per_node: u32,
    /// Where `vms_per_node` came from.
    pub vms_source: String,
    pub nodes_off: usize,
}

/// Builds the scenario that rehearses `drill_text` on `twin`; `vms_per_node` overrides
/// the twin's VM sample.
pub fn scenario_from_twin(
    twin: &FleetTwin,
    drill_text: &str,
    vms_per_node: Option<u32>,
) -> anyhow::Result<TwinScenario> {
    let mut spec =
        DrillSpec::parse(drill_text).map_err(|error| anyhow::anyhow!("the drill file: {error}"))?;
    if twin.racks.is_empty() {
        bail!("the twin has no racks");
    }
    let mut nodes = BTreeMap::new();
    let mut racks = BTreeMap::new();
    let mut sizes = Vec::new();
    let mut storage = Vec::new();
    let mut off = Vec::new();
    let mut index: u32 = 0;
    for (rack_index, rack) in twin.racks.iter().enumerate() {
        if rack.nodes.is_empty() {
            bail!("twin rack {:?} has no nodes", rack.name);
        }
        racks.insert(rack.name.clone(), sim_rack_name(rack_index));
        // Nodes that carry no VMs take a rack's first slots (the simulator's storage).
        let (no_vms, compute): (Vec<_>, Vec<_>) = rack
            .nodes
            .iter()
            .partition(|node| node.role != NodeRole::Compute);
        sizes.push(rack.nodes.len() as u32);
        storage.push(no_vms.len() as u32);
        for node in no_vms.into_iter().chain(compute) {
            if nodes.insert(node.uuid.clone(), index).is_some() {
                bail!("the twin names node {} twice", node.uuid);
            }
            if node.state != LifecycleState::Ready {
                off.push(index);
            }
            index += 1;
        }
    }
    let (vms, vms_source) = match (vms_per_node, &twin.vms) {
        (Some(n), _) => (n, "--vms-per-node".to_string()),
        (None, Some(sample)) => (
            sample.mean_per_host.round().max(0.0) as u32,
            format!(
                "the twin's sample: mean {:.2} per host over {} of {} compute node(s) asked, rounded",
                sample.mean_per_host, sample.answered, sample.sampled_hosts
            ),
        ),
        (None, None) => (
            0,
            "none: the twin has no VM sample (no cloud); pass --vms-per-node".to_string(),
        ),
    };
    let capacity = twin
        .vms
        .as_ref()
        .map_or(0, |sample| sample.max_per_host)
        .max(vms)
        .saturating_mul(2)
        .max(16);
    // The drill's targets, on the simulated fleet.
    let targets = &mut spec.targets;
    for uuid in &mut targets.uuids {
        let index = nodes
            .get(uuid)
            .with_context(|| format!("targets.uuids: {uuid} is not in the twin"))?;
        *uuid = NodeUuid::from_index(UUID_NAMESPACE, u64::from(*index));
    }
    if let Some(rack) = &mut targets.rack {
        *rack = racks
            .get(rack.as_str())
            .with_context(|| format!("targets.rack: the twin has no rack {rack:?}"))?
            .clone();
    }
    // The window is the real run's to obey: the simulated calendar starts at midnight
    // UTC on a Thursday, which a window would refuse for reasons that are not the drill's.
    let window_dropped = spec.window.take().is_some();
    let drill_toml = toml::to_string(&spec)?;
    let deadline = spec.abort.deadline_s;
    let spacing = spec.spacing_s * u64::from(spec.targets.count.unwrap_or(1).max(1));
    let duration = DRILL_AT_S + START_WITHIN_S + spacing + deadline + TAIL_S;

    let mut table = toml::Table::new();
    table.insert("name".into(), format!("rehearse-{}", spec.name).into());
    table.insert(
        "description".into(),
        format!(
            "rehearsal of drill {:?} on a twin taken at {} ms",
            spec.name, twin.taken_at_ms
        )
        .into(),
    );
    table.insert("duration_s".into(), (duration as i64).into());
    let mut fleet = toml::Table::new();
    fleet.insert(
        "rack_sizes".into(),
        toml::Value::Array(sizes.iter().map(|s| i64::from(*s).into()).collect()),
    );
    fleet.insert(
        "rack_storage".into(),
        toml::Value::Array(storage.iter().map(|s| i64::from(*s).into()).collect()),
    );
    if !off.is_empty() {
        fleet.insert(
            "off_nodes".into(),
            toml::Value::Array(off.iter().map(|s| i64::from(*s).into()).collect()),
        );
    }
    fleet.insert("vms_per_node".into(), i64::from(vms).into());
    fleet.insert("vm_capacity".into(), i64::from(capacity).into());
    table.insert("fleet".into(), fleet.into());
    table.insert(
        "remediation".into(),
        toml::Value::try_from(&twin.remediation).context("the twin's remediation settings")?,
    );
    let mut drill = toml::Table::new();
    drill.insert("at_s".into(), (DRILL_AT_S as i64).into());
    drill.insert("start_within_s".into(), (START_WITHIN_S as i64).into());
    drill.insert("expect_outcome".into(), "passed".into());
    drill.insert("spec".into(), drill_toml.into());
    table.insert("drill".into(), toml::Value::Array(vec![drill.into()]));

    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Generated by `bearman-sim rehearse` from a fleet twin: replay with\n\
         # `bearman-sim run THIS.toml --seed N`. What the twin became:"
    );
    for (name, sim) in &racks {
        let rack = twin.racks.iter().find(|r| &r.name == name).expect("mapped");
        let _ = writeln!(
            text,
            "#   rack {name:?} -> {sim} ({} nodes)",
            rack.nodes.len()
        );
    }
    let _ = writeln!(
        text,
        "# Non-compute nodes (storage, load balancers, control plane) carry no VMs and are\n\
         # recorded as storage in the simulated daemon; the {} node(s) the twin shows not\n\
         # Ready stay powered off (never registered: no drill can pick them). VMs per compute\n\
         # node: {vms} ({vms_source}). Targets named by uuid are mapped in twin order.{}",
        off.len(),
        if window_dropped {
            "\n# The drill's [window] is left out: the real run obeys it, the rehearsal does not."
        } else {
            ""
        }
    );
    text.push_str(&toml::to_string(&table)?);
    // What the simulator makes of it must be a valid scenario.
    crate::scenario::Scenario::parse(&text, None).context("the generated scenario")?;
    Ok(TwinScenario {
        text,
        nodes,
        racks,
        vms_per_node: vms,
        vms_source,
        nodes_off: off.len(),
    })
}

/// One phase of the predicted timeline: its name, p50/p99/max seconds (when some target
/// reached it), and how many target-runs reached it.
pub type PhaseRow = (String, Option<(f64, f64, f64)>, usize);

/// What the seeds of a rehearsal came to.
#[derive(Debug)]
pub struct Rehearsal {
    pub prediction: Prediction,
    /// Per phase: p50, p99, max (seconds) and how many target-runs reached it.
    pub table: Vec<PhaseRow>,
    /// Target-runs (seeds x targets) the phases are out of.
    pub target_runs: usize,
    /// Per hypothesis item: its expectation and in how many seeds it passed.
    pub items: Vec<(String, String, usize)>,
    /// Per outcome (`passed`, `failed`, `aborted`, `refused`, …): how many seeds.
    pub outcomes: BTreeMap<String, usize>,
    /// Seeds whose drill did not pass, or whose run broke an invariant: why.
    pub problems: Vec<String>,
    pub seeds: usize,
}

impl Rehearsal {
    /// Whether the drill passed on every seed with every invariant kept.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

fn percentile(values: &[f64], p: usize) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The prediction from a sweep of the rehearsal scenario.
pub fn predict(sweep: &SweepReport) -> Rehearsal {
    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut items: Vec<(String, String, usize)> = Vec::new();
    let mut outcomes = BTreeMap::new();
    let mut problems = Vec::new();
    let mut target_runs = 0;
    for seed in &sweep.seeds {
        let run = seed
            .drills
            .first()
            .cloned()
            .unwrap_or_else(DrillRun::default);
        let outcome = run.outcome();
        *outcomes.entry(outcome.clone()).or_insert(0) += 1;
        if outcome != "passed" {
            problems.push(format!(
                "seed {}: {outcome}{}",
                seed.seed,
                run.abort_reason()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default()
            ));
        }
        let invariants: Vec<&String> = seed
            .failures
            .iter()
            .filter(|failure| !failure.starts_with("every drill came to"))
            .collect();
        if !invariants.is_empty() {
            problems.push(format!(
                "seed {}: the run broke {} invariant(s): {}",
                seed.seed,
                invariants.len(),
                invariants
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        let Some(report) = &run.report else {
            continue;
        };
        for target in &report.targets {
            target_runs += 1;
            for phase in &target.phases {
                if let Some(seconds) = phase.actual_s {
                    samples
                        .entry(
                            PHASES
                                .iter()
                                .find(|p| **p == phase.phase)
                                .copied()
                                .unwrap_or("?"),
                        )
                        .or_default()
                        .push(seconds);
                }
            }
        }
        for item in &report.hypothesis {
            match items.iter_mut().find(|(name, _, _)| *name == item.item) {
                Some(entry) => entry.2 += usize::from(item.passed),
                None => items.push((
                    item.item.clone(),
                    item.expected.clone(),
                    usize::from(item.passed),
                )),
            }
        }
    }
    let mut phases = BTreeMap::new();
    let mut table = Vec::new();
    for phase in PHASES {
        let values = samples.get(phase).cloned().unwrap_or_default();
        if values.is_empty() {
            table.push((phase.to_string(), None, 0));
            continue;
        }
        let spread = (
            percentile(&values, 50),
            percentile(&values, 99),
            values.iter().copied().fold(f64::MIN, f64::max),
        );
        phases.insert(
            phase.to_string(),
            PhaseSpread {
                p50_s: spread.0,
                p99_s: spread.1,
            },
        );
        table.push((phase.to_string(), Some(spread), values.len()));
    }
    let seeds = sweep.seeds.len();
    let broken = items
        .iter()
        .filter(|(_, _, passed)| *passed < seeds)
        .map(|(name, _, _)| name.clone())
        .collect();
    Rehearsal {
        prediction: Prediction {
            seeds: seeds as u32,
            phases,
            broken,
        },
        table,
        target_runs,
        items,
        outcomes,
        problems,
        seeds,
    }
}

/// The rehearsal's printout: the per-phase table, each hypothesis item, the outcomes.
pub fn render(rehearsal: &Rehearsal) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "predicted timeline, seconds from injection ({} target run(s) over {} seed(s))",
        rehearsal.target_runs, rehearsal.seeds
    );
    let _ = writeln!(
        out,
        "  {:<16} {:>8} {:>8} {:>8} {:>8}",
        "phase", "p50", "p99", "max", "reached"
    );
    for (phase, spread, count) in &rehearsal.table {
        match spread {
            Some((p50, p99, max)) => {
                let _ = writeln!(
                    out,
                    "  {phase:<16} {p50:>8.1} {p99:>8.1} {max:>8.1} {:>8}",
                    format!("{count}/{}", rehearsal.target_runs)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  {phase:<16} {:>8} {:>8} {:>8} {:>8}",
                    "-",
                    "-",
                    "-",
                    format!("0/{}", rehearsal.target_runs)
                );
            }
        }
    }
    let _ = writeln!(out, "hypothesis");
    for (item, expected, passed) in &rehearsal.items {
        let _ = writeln!(
            out,
            "  {item:<24} {expected:<40} {} in {passed}/{} seed(s)",
            if *passed == rehearsal.seeds {
                "holds"
            } else {
                "BROKEN"
            },
            rehearsal.seeds
        );
    }
    let outcomes: Vec<String> = rehearsal
        .outcomes
        .iter()
        .map(|(outcome, count)| format!("{outcome} {count}"))
        .collect();
    let _ = writeln!(out, "outcomes: {}", outcomes.join(", "));
    for problem in &rehearsal.problems {
        let _ = writeln!(out, "  {problem}");
    }
    let _ = writeln!(
        out,
        "verdict: {}",
        if rehearsal.passed() {
            "the drill meets its hypothesis and budget on every seed"
        } else {
            "the rehearsal breaks the hypothesis, the budget or an invariant (see above)"
        }
    );
    out
}
