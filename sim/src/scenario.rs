//! Scenario files (`scenarios/*.toml`): fleet shape, timings, a fault schedule, and the
//! expectations a run must meet. Parsing rejects unknown keys and impossible values with
//! a message naming the field.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Virtual time to simulate.
    pub duration_s: u64,
    /// turmoil tick: virtual time advanced per step. Larger ticks run faster and coarsen
    /// network latency; 10 ms is the default.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    pub fleet: Fleet,
    #[serde(default)]
    pub timing: Timing,
    #[serde(default)]
    pub bmc: BmcBehaviour,
    #[serde(default, rename = "fault")]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub expect: Expect,
    /// The daemon's remediation settings (defaults are the production defaults).
    #[serde(default)]
    pub remediation: bearman::controller::ControllerConfig,
    /// Several daemon replicas on one database host (the HA deployment); absent: one
    /// daemon calling its own in-memory store.
    #[serde(default)]
    pub cluster: Option<SimCluster>,
    /// A firmware rollout: every node starts behind its flavor's BIOS and a bundle
    /// updates it; absent: no firmware expectation, no bundle.
    #[serde(default)]
    pub firmware: Option<SimFirmware>,
    /// Chaos drills a simulated operator runs through the daemon's admin API, as
    /// `bearman drill run --yes` does, and what each must come to.
    #[serde(default, rename = "drill")]
    pub drills: Vec<SimDrill>,
}

/// `[[drill]]`: a drill file (inline `spec`, or `file` relative to the scenario), when
/// the simulated operator starts it, and the outcome it must reach.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimDrill {
    /// When the operator first previews it (seconds); it starts once the preflight
    /// passes, previewing again every `poll_s` for at most `start_within_s`.
    pub at_s: u64,
    /// The drill file's text (TOML, `bearman drill` format).
    #[serde(default)]
    pub spec: Option<String>,
    /// Or the drill file, relative to the scenario file (read by `Scenario::load`).
    #[serde(default)]
    pub file: Option<String>,
    /// Convenience: the drill's `targets.uuids` as simulator node indices (the file's
    /// own `targets` are replaced by these nodes).
    #[serde(default)]
    pub target_nodes: Vec<u32>,
    /// `passed`, `failed` (a hypothesis item broken), `aborted`, or `refused` (the
    /// preflight, budget or window never let it start).
    pub expect_outcome: DrillOutcome,
    /// With `aborted` (or `refused`): text the abort reason (the refusal) must contain.
    #[serde(default)]
    pub expect_abort_contains: Option<String>,
    /// How long the operator keeps previewing before giving up (default 900 s).
    #[serde(default = "drill_start_within_s_default")]
    pub start_within_s: u64,
    /// How often the operator previews and, once started, polls the drill (default 5 s).
    #[serde(default = "drill_poll_s_default")]
    pub poll_s: u64,
}

fn drill_start_within_s_default() -> u64 {
    900
}

fn drill_poll_s_default() -> u64 {
    5
}

/// What a drill came to, as its report says (`refused`: it never started).
#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DrillOutcome {
    Passed,
    Failed,
    Aborted,
    Refused,
}

impl DrillOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillOutcome::Passed => "passed",
            DrillOutcome::Failed => "failed",
            DrillOutcome::Aborted => "aborted",
            DrillOutcome::Refused => "refused",
        }
    }
}

impl SimDrill {
    /// The drill file the operator sends: `spec` with `target_nodes` as `targets.uuids`.
    pub fn file_text(&self) -> anyhow::Result<String> {
        let text = self
            .spec
            .as_deref()
            .context("the drill has no spec (a file is read by Scenario::load)")?;
        if self.target_nodes.is_empty() {
            return Ok(text.to_string());
        }
        let mut spec = bearman::core::drill::DrillSpec::parse(text)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        spec.targets = bearman::core::drill::TargetSpec {
            uuids: self
                .target_nodes
                .iter()
                .map(|index| {
                    bearman_proto::uuid::NodeUuid::from_index(
                        crate::fleet::UUID_NAMESPACE,
                        u64::from(*index),
                    )
                })
                .collect(),
            ..Default::default()
        };
        Ok(toml::to_string(&spec)?)
    }

    /// The drill's name, from its file.
    pub fn name(&self) -> String {
        self.spec
            .as_deref()
            .and_then(|text| bearman::core::drill::DrillSpec::parse(text).ok())
            .map(|spec| spec.name)
            .unwrap_or_default()
    }
}

/// `[firmware]`: the fleet's BIOS, the bundle that updates it, the boards it fails on, and
/// the daemon's rollout rules (`[firmware.rollout]`, the daemon's `[firmware]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimFirmware {
    /// The BIOS version every node reads at the start.
    pub bios_start: String,
    /// The version the flavor expects and the bundle installs.
    pub bios_target: String,
    /// Percentage of boards (picked from the seed) the bundle fails on: its updater exits
    /// 1 there, every attempt.
    #[serde(default)]
    pub fail_percent: u32,
    /// How long the updater runs, `[min, max]` seconds per run.
    #[serde(default = "flash_s_default")]
    pub flash_s: [u64; 2],
    /// The bundle's `applies_to.vendor` (default: any vendor). A vendor the fleet is not
    /// (its boards are "Dell Inc.") makes a bundle that applies to no board: the fleet
    /// then boots behind, which the checker must call out.
    #[serde(default)]
    pub bundle_vendor: Option<String>,
    /// The bundle's updater time limit, seconds.
    #[serde(default = "flash_timeout_s_default")]
    pub timeout_s: u64,
    #[serde(default)]
    pub rollout: bearman::core::firmware::RolloutPolicy,
}

fn flash_s_default() -> [u64; 2] {
    [60, 240]
}

fn flash_timeout_s_default() -> u64 {
    600
}

/// `[cluster]`: the replicas and their lease settings (production defaults unless set).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimCluster {
    /// Daemon replicas (`daemon0`, `daemon1`, …), 2-5.
    pub replicas: u32,
    #[serde(default = "lease_ttl_ms_default")]
    pub lease_ttl_ms: i64,
    #[serde(default = "renew_every_ms_default")]
    pub renew_every_ms: i64,
    #[serde(default = "renew_deadline_ms_default")]
    pub renew_deadline_ms: i64,
    #[serde(default = "cache_max_age_ms_default")]
    pub cache_max_age_ms: i64,
}

fn lease_ttl_ms_default() -> i64 {
    bearman::core::cluster::ClusterConfig::default().lease_ttl_ms
}
fn renew_every_ms_default() -> i64 {
    bearman::core::cluster::ClusterConfig::default().renew_every_ms
}
fn renew_deadline_ms_default() -> i64 {
    bearman::core::cluster::ClusterConfig::default().renew_deadline_ms
}
fn cache_max_age_ms_default() -> i64 {
    bearman::core::cluster::ClusterConfig::default().cache_max_age_ms
}

impl SimCluster {
    /// The daemon's `[cluster]` section these settings make.
    pub fn config(&self) -> bearman::core::cluster::ClusterConfig {
        bearman::core::cluster::ClusterConfig {
            enabled: true,
            replica_name: None,
            lease_ttl_ms: self.lease_ttl_ms,
            renew_every_ms: self.renew_every_ms,
            renew_deadline_ms: self.renew_deadline_ms,
            cache_max_age_ms: self.cache_max_age_ms,
        }
    }
}

fn default_tick_ms() -> u64 {
    10
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// Uniform racks: how many, and nodes in each (or `rack_sizes`).
    #[serde(default)]
    pub racks: u32,
    #[serde(default)]
    pub nodes_per_rack: u32,
    /// Nodes per rack that are storage nodes (no VMs); the rest are compute nodes.
    #[serde(default)]
    pub storage_per_rack: u32,
    /// Racks of different sizes, instead of `racks` x `nodes_per_rack`: nodes per rack.
    #[serde(default)]
    pub rack_sizes: Vec<u32>,
    /// With `rack_sizes`: storage nodes per rack (the first slots), instead of
    /// `storage_per_rack`.
    #[serde(default)]
    pub rack_storage: Vec<u32>,
    /// Nodes (by index) that stay powered off the whole run: not part of the live fleet
    /// (a rehearsal's nodes the twin shows not Ready). They carry no VMs.
    #[serde(default)]
    pub off_nodes: Vec<u32>,
    /// VMs placed on each compute node at the start.
    #[serde(default)]
    pub vms_per_node: u32,
    /// VM slots per compute node (evacuation targets need room).
    #[serde(default = "default_vm_capacity")]
    pub vm_capacity: u32,
    /// Whether the fleet starts powered on (a boot storm at t=0) — the default.
    #[serde(default = "default_true")]
    pub power_on_at_start: bool,
}

impl Fleet {
    /// Nodes per rack, rack by rack.
    pub fn sizes(&self) -> Vec<u32> {
        if self.rack_sizes.is_empty() {
            vec![self.nodes_per_rack; self.racks as usize]
        } else {
            self.rack_sizes.clone()
        }
    }

    /// Storage nodes per rack (its first slots), rack by rack.
    pub fn storage(&self) -> Vec<u32> {
        if self.rack_storage.is_empty() {
            self.sizes()
                .iter()
                .map(|size| self.storage_per_rack.min(*size))
                .collect()
        } else {
            self.rack_storage.clone()
        }
    }

    /// With `rack_sizes`, `racks` and `nodes_per_rack` say how many and the largest.
    fn normalize(&mut self) {
        if !self.rack_sizes.is_empty() {
            if self.racks == 0 {
                self.racks = self.rack_sizes.len() as u32;
            }
            if self.nodes_per_rack == 0 {
                self.nodes_per_rack = self.rack_sizes.iter().copied().max().unwrap_or(0);
            }
        }
    }
}

fn default_vm_capacity() -> u32 {
    16
}

fn default_true() -> bool {
    true
}

/// How long the phases of a boot take, as `[min, max]` seconds drawn per boot.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timing {
    pub firmware_s: [u64; 2],
    pub stage1_s: [u64; 2],
    pub kexec_s: [u64; 2],
    /// Stage 2's heartbeat period; the agent jitters each beat by ± a tenth of it.
    pub heartbeat_interval_s: u64,
    /// The agent's retry backoff (stage 1's attempts, stage 2's detail and installed
    /// reports, the firmware's `GET /ipxe`): starts here, doubles, capped; each delay is
    /// up to a quarter shorter (the agent's jitter).
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Per-request timeout of the agent's client.
    pub request_timeout_s: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            firmware_s: [30, 90],
            stage1_s: [5, 15],
            kexec_s: [5, 15],
            heartbeat_interval_s: 10,
            retry_initial_ms: 1000,
            retry_max_ms: 30_000,
            request_timeout_s: 10,
        }
    }
}

/// Simulated BMC latencies and failure modes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcBehaviour {
    /// Per-call latency range in milliseconds.
    pub latency_ms: [u64; 2],
    /// Power transitions take this long (the BMC reports the old state meanwhile).
    pub transition_ms: u64,
    /// A BMC that gets more than this many calls within `burst_window_s` locks up
    /// (stops answering) for `lockup_s`. 0 disables.
    pub burst_limit: u32,
    pub burst_window_s: u64,
    pub lockup_s: u64,
}

impl Default for BmcBehaviour {
    fn default() -> Self {
        BmcBehaviour {
            latency_ms: [50, 400],
            transition_ms: 3000,
            burst_limit: 0,
            burst_window_s: 10,
            lockup_s: 120,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Kernel panic on some nodes: the OS dies, power stays on.
    CrashNodes,
    /// Cut and restore power of some nodes directly (a PDU outlet), power returning at heal.
    PowerCycleNodes,
    /// Some nodes lose power for good (a failed power supply): OS and VMs die, the BMC
    /// (on standby power) keeps answering and reads Off. Only a BMC power-on (the
    /// rebuild) brings them back. Counted as crashes in the recovery figures.
    PowerLossNodes,
    /// An operator power-cycles some nodes through their BMCs over the out-of-band
    /// network: power off, read back until off is verified, power on, read back on.
    BmcPowerCycleNodes,
    /// A rack loses power; at heal, power returns and its nodes boot.
    RackPowerLoss,
    /// The rack's top-of-rack switch cuts it off from the daemon; heal repairs it.
    PartitionRack,
    /// The out-of-band (BMC) network is cut from the daemon.
    PartitionBmc,
    /// Every BMC in a rack (or all) stops answering; heal unlocks.
    BmcLockup,
    /// BMCs keep reporting the previous power state until heal.
    BmcStaleReadback,
    /// BMC calls never answer (time out) until heal.
    BmcTimeouts,
    /// The daemon process dies; at heal it restarts on the same database.
    DaemonRestart,
    /// The cloud (hypervisor) API is unreachable until heal.
    CloudOutage,
    /// Every link gets this much extra latency until heal.
    LatencySpike,
    /// Every node is powered off and on again at once.
    PowerCycleAll,
    /// Clustered runs: the replica holding the controller's lease when the fault strikes
    /// dies (`kill -9`); at heal it restarts.
    KillLeader,
    /// Clustered runs: the leader is cut from the database but still reaches the nodes,
    /// BMCs and cloud; heal repairs it.
    PartitionLeaderDatabase,
    /// Clustered runs: the leader is cut from every rack (the nodes fail over to the
    /// other replicas) but still reaches the database, BMCs and cloud; heal repairs it.
    PartitionLeaderNodes,
    /// Clustered runs: the leader stops the world (a long GC or VM pause): it runs
    /// nothing and hears nothing while time goes on; at heal it wakes up, believing
    /// what it believed.
    PauseLeader,
    /// Clustered runs: the database host restarts (connections cut, calls refused until
    /// heal; committed data kept).
    RestartDatabase,
}

impl Fault {
    /// Whether the fault waits for an event or an action instead of striking at `at_s`.
    pub fn triggered(&self) -> bool {
        self.when_event.is_some() || self.when_action.is_some()
    }
}

impl FaultKind {
    /// Faults that strike the current leader (and need `[cluster]`).
    pub fn strikes_leader(&self) -> bool {
        matches!(
            self,
            FaultKind::KillLeader
                | FaultKind::PartitionLeaderDatabase
                | FaultKind::PartitionLeaderNodes
                | FaultKind::PauseLeader
        )
    }

    /// Faults only a clustered run has.
    pub fn needs_cluster(&self) -> bool {
        self.strikes_leader() || *self == FaultKind::RestartDatabase
    }
}

/// Which nodes a node-striking fault (`crash_nodes`, `power_loss_nodes`,
/// `power_cycle_nodes`, `bmc_power_cycle_nodes`) applies to, when not `count` nodes picked
/// from the seed.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// The node named by the daemon audit event that triggered the fault (`when_event`):
    /// e.g. the very node whose rebuild just reached stage 1. An event that names no node
    /// of the fleet does not trigger the fault.
    EventNode,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub at_s: u64,
    pub kind: FaultKind,
    /// When the fault is undone, if ever.
    #[serde(default)]
    pub heal_at_s: Option<u64>,
    /// Strike at the first daemon audit event (at or after `at_s`) whose "action reason"
    /// contains this text, e.g. "step evacuate": lands a fault inside a remediation.
    #[serde(default)]
    pub when_event: Option<String>,
    /// Clustered runs, instead of `when_event`: strike at the first action a replica sends
    /// (at or after `at_s`) whose "replica target operation argument" text contains this,
    /// as it reaches its target, e.g. "cloud EVACUATE": lands a fault between two calls
    /// of one step. `delay_s`/`heal_after_s` as for `when_event`.
    #[serde(default)]
    pub when_action: Option<String>,
    /// With `when_event`: heal this many seconds after striking.
    #[serde(default)]
    pub heal_after_s: Option<u64>,
    /// With `when_event`: strike this many seconds after the event instead of at once
    /// (`heal_after_s` still counts from the strike).
    #[serde(default)]
    pub delay_s: Option<u64>,
    /// Rack index the fault applies to (where it applies to one rack).
    #[serde(default)]
    pub rack: Option<u32>,
    /// How many nodes (crash/power-cycle faults), chosen from the seed.
    #[serde(default)]
    pub count: Option<u32>,
    /// Node-striking faults: `"event_node"` strikes the node of the triggering event
    /// (needs `when_event`; `count` and `rack` must be absent). Absent: `count` nodes
    /// picked from the seed, as before.
    #[serde(default)]
    pub target: Option<FaultTarget>,
    /// Node-striking faults: strike exactly the nodes that fault number N (0-based, in
    /// file order, an earlier node-striking fault) struck, e.g. power-cycle at the PDU the
    /// node that crashed earlier. `count`, `rack` and `target` must be absent. If fault N
    /// has not struck yet, this one strikes nobody (the trace says so).
    #[serde(default)]
    pub same_nodes_as: Option<usize>,
    /// Extra latency for `latency_spike`.
    #[serde(default)]
    pub latency_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every powered node must be Ready by this time (seconds).
    #[serde(default)]
    pub all_ready_by_s: Option<u64>,
    /// After the last heal, every powered node must be Ready within this many seconds.
    #[serde(default)]
    pub ready_after_heal_s: Option<u64>,
    /// At most this many fences may start (0 for faults that kill no node).
    #[serde(default)]
    pub fences_max: Option<u64>,
    /// Every VM a crashed node was running must run elsewhere within this many seconds
    /// of the crash.
    #[serde(default)]
    pub vms_elsewhere_within_s: Option<u64>,
    /// Every crashed node must be Ready again within this many seconds of its crash. A
    /// node that crashes again before it was Ready is judged from its latest crash (each
    /// crash is its own recovery; one cut short by the next crash is not judged on Ready).
    #[serde(default)]
    pub crashed_ready_within_s: Option<u64>,
    /// Every VM of every crashed node must run elsewhere within this many seconds of the
    /// scenario's last heal (`last_heal_s`: the latest `heal_at_s`, or `at_s` +
    /// `delay_s` + `heal_after_s` of a `when_event` fault, or the strike of a fault that
    /// never heals). For faults that keep the daemon from fencing (a dark BMC network):
    /// once it is back, how fast are the VMs moved. Needs a fault that heals.
    #[serde(default)]
    pub vms_elsewhere_after_heal_within_s: Option<u64>,
    /// At the end of every run each VM must run on exactly one host that is powered on
    /// with its OS running; at most this many VMs may run nowhere (default 0). Only for
    /// scenarios whose fault legitimately leaves VMs down at the end (say why in the
    /// file). A VM running on two hosts always fails.
    #[serde(default)]
    pub vms_down_allowed: Option<u64>,
    /// Clustered runs: after each fault that strikes the leader (killed, cut from the
    /// database, paused), another replica is granted the lease under a newer epoch
    /// within this many seconds (virtual).
    #[serde(default)]
    pub takeover_within_s: Option<u64>,
    /// Firmware runs: whether the rollout is paused at the end (by itself, past its
    /// failure threshold, when true).
    #[serde(default)]
    pub firmware_rollout_paused: Option<bool>,
    /// Firmware runs: at least this many boards flashed (and came back reading the new
    /// version, as the daemon recorded).
    #[serde(default)]
    pub firmware_flashed_min: Option<u64>,
}

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        Scenario::parse(&text, path.parent())
            .with_context(|| format!("scenario {}", path.display()))
    }

    /// Parses and checks a scenario's text; drill `file`s are read relative to `dir`.
    pub fn parse(text: &str, dir: Option<&Path>) -> anyhow::Result<Scenario> {
        let mut scenario: Scenario = toml::from_str(text).context("parsing")?;
        scenario.fleet.normalize();
        for (index, drill) in scenario.drills.iter_mut().enumerate() {
            if drill.file.is_some() && drill.spec.is_some() {
                bail!("drill[{index}]: spec or file, not both");
            }
            if let (Some(file), None) = (&drill.file, &drill.spec) {
                let path = dir.unwrap_or(Path::new(".")).join(file);
                drill.spec =
                    Some(std::fs::read_to_string(&path).with_context(|| {
                        format!("drill[{index}].file: reading {}", path.display())
                    })?);
            }
        }
        scenario.validate()?;
        Ok(scenario)
    }

    /// Resizes the fleet to `nodes` in total (rounded up to whole racks), with
    /// `per_rack` nodes per rack or the scenario's own.
    pub fn with_nodes(mut self, nodes: u32, per_rack: Option<u32>) -> anyhow::Result<Scenario> {
        if nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if per_rack == Some(0) {
            bail!("--nodes-per-rack must be at least 1");
        }
        let per_rack = per_rack.unwrap_or(self.fleet.nodes_per_rack).min(nodes);
        if !self.fleet.rack_sizes.is_empty() || !self.fleet.off_nodes.is_empty() {
            bail!("--nodes: the scenario's fleet has racks of their own sizes or nodes kept off; edit the file instead");
        }
        self.fleet.storage_per_rack = self.fleet.storage_per_rack.min(per_rack);
        self.fleet.nodes_per_rack = per_rack;
        self.fleet.racks = nodes.div_ceil(per_rack);
        self.validate()?;
        Ok(self)
    }

    pub fn node_count(&self) -> u32 {
        self.fleet.sizes().iter().sum()
    }

    /// VMs placed at the start: `vms_per_node` on every compute node not kept off.
    pub fn vm_count(&self) -> u64 {
        let fleet = &self.fleet;
        let mut index = 0;
        let mut compute = 0u64;
        for (size, storage) in fleet.sizes().iter().zip(fleet.storage()) {
            for slot in 0..*size {
                if slot >= storage && !fleet.off_nodes.contains(&index) {
                    compute += 1;
                }
                index += 1;
            }
        }
        compute * u64::from(fleet.vms_per_node)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let range = |field: &str, r: [u64; 2]| -> anyhow::Result<()> {
            if r[0] > r[1] {
                bail!("{field}: [{}, {}] is not a range (min > max)", r[0], r[1]);
            }
            Ok(())
        };
        if self.duration_s == 0 || self.duration_s > 7 * 24 * 3600 {
            bail!("duration_s: {} is outside 1 s - 7 days", self.duration_s);
        }
        if !(1..=1000).contains(&self.tick_ms) {
            bail!("tick_ms: {} is outside 1-1000", self.tick_ms);
        }
        if self.fleet.rack_sizes.is_empty() {
            if self.fleet.racks == 0 || self.fleet.nodes_per_rack == 0 {
                bail!("fleet: racks and nodes_per_rack must be at least 1 (or give rack_sizes)");
            }
            if !self.fleet.rack_storage.is_empty() {
                bail!("fleet.rack_storage goes with rack_sizes; use storage_per_rack");
            }
        } else {
            let sizes = &self.fleet.rack_sizes;
            if sizes.contains(&0) {
                bail!("fleet.rack_sizes: every rack needs at least 1 node");
            }
            if self.fleet.racks as usize != sizes.len()
                || self.fleet.nodes_per_rack != sizes.iter().copied().max().unwrap_or(0)
            {
                bail!("fleet.rack_sizes: leave racks and nodes_per_rack out (they follow from it)");
            }
            if self.fleet.storage_per_rack != 0 {
                bail!("fleet.storage_per_rack: with rack_sizes, give rack_storage");
            }
            let storage = &self.fleet.rack_storage;
            if !storage.is_empty()
                && (storage.len() != sizes.len() || storage.iter().zip(sizes).any(|(s, n)| s > n))
            {
                bail!("fleet.rack_storage: one count per rack, each at most its rack_sizes entry");
            }
        }
        if let Some(node) = self
            .fleet
            .off_nodes
            .iter()
            .find(|n| **n >= self.node_count())
        {
            bail!(
                "fleet.off_nodes: node {node} does not exist ({} nodes)",
                self.node_count()
            );
        }
        if self.node_count() > 100_000 {
            bail!(
                "fleet: {} nodes is more than the 100,000 the simulator supports",
                self.node_count()
            );
        }
        if self.fleet.storage_per_rack > self.fleet.nodes_per_rack {
            bail!("fleet.storage_per_rack exceeds nodes_per_rack");
        }
        if let Some(firmware) = &self.firmware {
            if firmware.bios_start.trim().is_empty() || firmware.bios_target.trim().is_empty() {
                bail!("firmware.bios_start and firmware.bios_target must be versions");
            }
            if firmware.bios_start == firmware.bios_target {
                bail!("firmware.bios_start equals bios_target: nothing to roll out");
            }
            if firmware.fail_percent > 100 {
                bail!(
                    "firmware.fail_percent: {} is above 100",
                    firmware.fail_percent
                );
            }
            range("firmware.flash_s", firmware.flash_s)?;
            if !(1..=bearman::core::firmware::UPDATER_TIMEOUT_S_MAX).contains(&firmware.timeout_s) {
                bail!(
                    "firmware.timeout_s: {} is outside 1-14400",
                    firmware.timeout_s
                );
            }
            firmware.rollout.validate().map_err(|problem| {
                anyhow::anyhow!("{}", problem.replacen("firmware.", "firmware.rollout.", 1))
            })?;
        } else if self.expect.firmware_rollout_paused.is_some()
            || self.expect.firmware_flashed_min.is_some()
        {
            bail!("expect.firmware_*: needs a [firmware] section");
        }
        if self.fleet.vms_per_node > self.fleet.vm_capacity {
            bail!("fleet.vms_per_node exceeds vm_capacity");
        }
        if let Err(problem) = self.remediation.validate() {
            bail!("remediation: {problem}");
        }
        range("timing.firmware_s", self.timing.firmware_s)?;
        range("timing.stage1_s", self.timing.stage1_s)?;
        range("timing.kexec_s", self.timing.kexec_s)?;
        range("bmc.latency_ms", self.bmc.latency_ms)?;
        if self.timing.heartbeat_interval_s == 0 {
            bail!("timing.heartbeat_interval_s must be at least 1");
        }
        if self.timing.retry_initial_ms == 0
            || self.timing.retry_max_ms < self.timing.retry_initial_ms
        {
            bail!("timing: retry_initial_ms must be >= 1 and <= retry_max_ms");
        }
        for (index, fault) in self.faults.iter().enumerate() {
            let field = format!("fault[{index}] ({:?})", fault.kind);
            if fault.at_s >= self.duration_s {
                bail!(
                    "{field}: at_s {} is not before the end ({} s)",
                    fault.at_s,
                    self.duration_s
                );
            }
            if let Some(heal) = fault.heal_at_s {
                if heal <= fault.at_s {
                    bail!(
                        "{field}: heal_at_s {heal} must be after at_s {}",
                        fault.at_s
                    );
                }
            }
            if let Some(rack) = fault.rack {
                if rack >= self.fleet.racks {
                    bail!(
                        "{field}: rack {rack} does not exist (racks: {})",
                        self.fleet.racks
                    );
                }
            }
            let needs_rack = matches!(
                fault.kind,
                FaultKind::RackPowerLoss | FaultKind::PartitionRack
            );
            if needs_rack && fault.rack.is_none() {
                bail!("{field}: needs rack");
            }
            let needs_count = matches!(
                fault.kind,
                FaultKind::CrashNodes
                    | FaultKind::PowerCycleNodes
                    | FaultKind::PowerLossNodes
                    | FaultKind::BmcPowerCycleNodes
            );
            let strikes_nodes = needs_count;
            let chosen_otherwise = fault.target.is_some() || fault.same_nodes_as.is_some();
            if fault.target.is_some() && fault.same_nodes_as.is_some() {
                bail!("{field}: target and same_nodes_as exclude each other");
            }
            if chosen_otherwise {
                let key = if fault.target.is_some() {
                    "target"
                } else {
                    "same_nodes_as"
                };
                if !strikes_nodes {
                    bail!(
                        "{field}: {key} only applies to crash_nodes, power_loss_nodes, \
                         power_cycle_nodes and bmc_power_cycle_nodes"
                    );
                }
                if fault.count.is_some() || fault.rack.is_some() {
                    bail!("{field}: {key} names the nodes; count and rack must be absent");
                }
            } else if needs_count && fault.count.unwrap_or(0) == 0 {
                bail!("{field}: needs count >= 1");
            }
            if fault.target == Some(FaultTarget::EventNode) && fault.when_event.is_none() {
                bail!(
                    "{field}: target = \"event_node\" needs when_event (the event names the node)"
                );
            }
            if let Some(other) = fault.same_nodes_as {
                if other >= index {
                    bail!(
                        "{field}: same_nodes_as {other} must name an earlier fault (below {index})"
                    );
                }
                let earlier = &self.faults[other];
                let earlier_strikes_nodes = matches!(
                    earlier.kind,
                    FaultKind::CrashNodes
                        | FaultKind::PowerCycleNodes
                        | FaultKind::PowerLossNodes
                        | FaultKind::BmcPowerCycleNodes
                );
                if !earlier_strikes_nodes {
                    bail!(
                        "{field}: same_nodes_as {other} is a {:?} fault, which strikes no nodes",
                        earlier.kind
                    );
                }
                if !earlier.triggered() && !fault.triggered() && earlier.at_s > fault.at_s {
                    bail!(
                        "{field}: same_nodes_as {other} strikes at {} s, after this fault ({} s)",
                        earlier.at_s,
                        fault.at_s
                    );
                }
            }
            if fault.when_action.is_some() {
                if fault.when_event.is_some() {
                    bail!("{field}: when_event and when_action exclude each other");
                }
                if self.cluster.is_none() {
                    bail!("{field}: when_action needs [cluster] (actions are judged against the lease)");
                }
                if fault.target.is_some() {
                    bail!("{field}: target = \"event_node\" needs when_event");
                }
            }
            if fault.delay_s.is_some() && !fault.triggered() {
                bail!("{field}: delay_s goes with when_event; use at_s otherwise");
            }
            if fault.kind == FaultKind::LatencySpike && fault.latency_ms.is_none() {
                bail!("{field}: needs latency_ms");
            }
            let needs_heal = matches!(
                fault.kind,
                FaultKind::DaemonRestart | FaultKind::PowerCycleNodes | FaultKind::RackPowerLoss
            );
            if fault.heal_after_s.is_some() && !fault.triggered() {
                bail!("{field}: heal_after_s goes with when_event; use heal_at_s otherwise");
            }
            if fault.triggered() && fault.heal_at_s.is_some() {
                bail!("{field}: a when_event fault heals with heal_after_s, not heal_at_s");
            }
            if needs_heal && fault.heal_at_s.is_none() && fault.heal_after_s.is_none() {
                bail!("{field}: needs heal_at_s (when power returns / the daemon restarts)");
            }
        }
        if let Some(cluster) = &self.cluster {
            if !(2..=5).contains(&cluster.replicas) {
                bail!("cluster.replicas: {} is outside 2-5", cluster.replicas);
            }
            if let Err(problem) = cluster.config().validate() {
                bail!("cluster: {problem}");
            }
        }
        for (index, fault) in self.faults.iter().enumerate() {
            if fault.kind.needs_cluster() && self.cluster.is_none() {
                bail!(
                    "fault[{index}] ({:?}): needs [cluster] (several replicas on a database host)",
                    fault.kind
                );
            }
        }
        if self.expect.takeover_within_s.is_some()
            && !self
                .faults
                .iter()
                .any(|f| f.kind.strikes_leader() && f.kind != FaultKind::PartitionLeaderNodes)
        {
            bail!(
                "expect.takeover_within_s: no fault kills, cuts from the database or pauses the leader"
            );
        }
        if let Some(allowed) = self.expect.vms_down_allowed {
            if allowed > self.vm_count() {
                bail!(
                    "expect.vms_down_allowed: {allowed} is more than the fleet's {} VM(s)",
                    self.vm_count()
                );
            }
        }
        if self.expect.vms_elsewhere_after_heal_within_s.is_some() && !self.has_heals() {
            bail!(
                "expect.vms_elsewhere_after_heal_within_s: no fault heals (needs heal_at_s or heal_after_s)"
            );
        }
        for (index, drill) in self.drills.iter().enumerate() {
            let field = format!("drill[{index}]");
            if drill.spec.is_none() {
                bail!("{field}: needs spec (the drill file inline) or file");
            }
            if drill.at_s >= self.duration_s {
                bail!(
                    "{field}: at_s {} is not before the end ({} s)",
                    drill.at_s,
                    self.duration_s
                );
            }
            if drill.poll_s == 0 || drill.poll_s > 600 {
                bail!("{field}: poll_s must be 1-600");
            }
            if let Some(node) = drill.target_nodes.iter().find(|n| **n >= self.node_count()) {
                bail!(
                    "{field}: target_nodes: node {node} does not exist ({} nodes)",
                    self.node_count()
                );
            }
            if drill.expect_abort_contains.is_some()
                && !matches!(
                    drill.expect_outcome,
                    DrillOutcome::Aborted | DrillOutcome::Refused
                )
            {
                bail!("{field}: expect_abort_contains goes with expect_outcome = \"aborted\" or \"refused\"");
            }
            let text = drill
                .file_text()
                .map_err(|error| anyhow::anyhow!("{field}: the drill file: {error}"))?;
            bearman::core::drill::DrillSpec::parse(&text)
                .map_err(|error| anyhow::anyhow!("{field}: the drill file: {error}"))?;
        }
        Ok(())
    }

    /// Whether some fault is undone during the run (`heal_at_s` or `heal_after_s`).
    pub fn has_heals(&self) -> bool {
        self.faults
            .iter()
            .any(|f| f.heal_at_s.is_some() || f.heal_after_s.is_some())
    }

    /// When the last fault was healed (or, for faults that do not heal, struck). A
    /// `when_event` fault counts from its `at_s`, the earliest it can strike.
    pub fn last_heal_s(&self) -> Option<u64> {
        self.faults
            .iter()
            .map(|f| {
                f.heal_at_s
                    .unwrap_or(f.at_s + f.delay_s.unwrap_or(0) + f.heal_after_s.unwrap_or(0))
            })
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid scenario; `extra` is appended (faults, expectations).
    fn scenario(extra: &str) -> String {
        format!(
            "name = \"t\"\nduration_s = 1000\n[fleet]\nracks = 2\nnodes_per_rack = 4\n\
             storage_per_rack = 1\nvms_per_node = 2\n{extra}"
        )
    }

    /// Parses and validates `extra` on top of [`scenario`]; `expect` is `Ok(())` or a
    /// piece of the error's text.
    fn check(extra: &str, expect: Result<(), &str>) {
        let parsed = toml::from_str::<Scenario>(&scenario(extra))
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map_err(|e| e.to_string()));
        match (parsed, expect) {
            (Ok(()), Ok(())) => {}
            (Err(error), Err(part)) => {
                assert!(
                    error.contains(part),
                    "{extra}\nerror {error:?} lacks {part:?}"
                )
            }
            (got, want) => panic!("{extra}\ngot {got:?}, want {want:?}"),
        }
    }

    const CRASH: &str = "[[fault]]\nat_s = 100\nkind = \"crash_nodes\"\nrack = 0\ncount = 1\n";

    #[test]
    fn event_node_target_needs_when_event_and_no_count_or_rack() {
        let on_event = "[[fault]]\nat_s = 100\nkind = \"crash_nodes\"\n\
                        when_event = \"stage 1 started\"\ntarget = \"event_node\"\n";
        check(on_event, Ok(()));
        check(&format!("{on_event}delay_s = 5\n"), Ok(()));
        check(
            &format!("{on_event}delay_s = 5\nheal_after_s = 60\n"),
            Ok(()),
        );
        check(
            &format!("{on_event}count = 1\n"),
            Err("fault[0] (CrashNodes): target names the nodes; count and rack must be absent"),
        );
        check(
            &format!("{on_event}rack = 1\n"),
            Err("count and rack must be absent"),
        );
        check(
            "[[fault]]\nat_s = 100\nkind = \"power_loss_nodes\"\ntarget = \"event_node\"\n",
            Err("fault[0] (PowerLossNodes): target = \"event_node\" needs when_event"),
        );
        check(
            "[[fault]]\nat_s = 100\nkind = \"partition_bmc\"\nwhen_event = \"x\"\n\
             target = \"event_node\"\n",
            Err("target only applies to crash_nodes"),
        );
        check(
            "[[fault]]\nat_s = 100\nkind = \"crash_nodes\"\nwhen_event = \"x\"\n\
             target = \"the_other_node\"\n",
            Err("unknown variant `the_other_node`"),
        );
        check(
            "[[fault]]\nat_s = 100\nkind = \"crash_nodes\"\nwhen_event = \"x\"\n",
            Err("fault[0] (CrashNodes): needs count >= 1"),
        );
    }

    #[test]
    fn delay_s_goes_with_when_event() {
        check(
            &format!("{CRASH}delay_s = 5\n"),
            Err("fault[0] (CrashNodes): delay_s goes with when_event"),
        );
    }

    #[test]
    fn same_nodes_as_names_an_earlier_node_fault() {
        let cycle = "[[fault]]\nat_s = 300\nkind = \"power_cycle_nodes\"\nheal_at_s = 301\n";
        check(&format!("{CRASH}{cycle}same_nodes_as = 0\n"), Ok(()));
        check(
            &format!("{CRASH}{cycle}same_nodes_as = 0\ncount = 1\n"),
            Err("fault[1] (PowerCycleNodes): same_nodes_as names the nodes; count and rack must be absent"),
        );
        check(
            &format!("{cycle}same_nodes_as = 1\n{CRASH}"),
            Err("fault[0] (PowerCycleNodes): same_nodes_as 1 must name an earlier fault"),
        );
        check(
            &format!("[[fault]]\nat_s = 50\nkind = \"partition_bmc\"\n{cycle}same_nodes_as = 0\n"),
            Err("same_nodes_as 0 is a PartitionBmc fault, which strikes no nodes"),
        );
        check(
            &format!("[[fault]]\nat_s = 400\nkind = \"crash_nodes\"\ncount = 1\n{cycle}same_nodes_as = 0\n"),
            Err("same_nodes_as 0 strikes at 400 s, after this fault (300 s)"),
        );
        check(
            &format!(
                "{CRASH}[[fault]]\nat_s = 300\nkind = \"crash_nodes\"\nwhen_event = \"x\"\n\
                 target = \"event_node\"\nsame_nodes_as = 0\n"
            ),
            Err("target and same_nodes_as exclude each other"),
        );
    }

    #[test]
    fn vms_down_allowed_cannot_exceed_the_fleets_vms() {
        // 2 racks x (4 - 1 storage) nodes x 2 VMs = 12 VMs.
        check("[expect]\nvms_down_allowed = 12\n", Ok(()));
        check(
            "[expect]\nvms_down_allowed = 13\n",
            Err("expect.vms_down_allowed: 13 is more than the fleet's 12 VM(s)"),
        );
    }

    #[test]
    fn vms_elsewhere_after_heal_needs_a_heal() {
        let expect = "[expect]\nvms_elsewhere_after_heal_within_s = 90\n";
        check(
            &format!("{CRASH}{expect}"),
            Err("expect.vms_elsewhere_after_heal_within_s: no fault heals"),
        );
        check(
            &format!(
                "[[fault]]\nat_s = 50\nkind = \"partition_bmc\"\nheal_at_s = 500\n{CRASH}{expect}"
            ),
            Ok(()),
        );
    }

    #[test]
    fn last_heal_counts_a_when_event_faults_delay() {
        let text = scenario(
            "[[fault]]\nat_s = 50\nkind = \"partition_bmc\"\nheal_at_s = 500\n\
             [[fault]]\nat_s = 480\nkind = \"crash_nodes\"\nwhen_event = \"x\"\n\
             target = \"event_node\"\ndelay_s = 5\nheal_after_s = 30\n",
        );
        let scenario: Scenario = toml::from_str(&text).unwrap();
        scenario.validate().unwrap();
        assert_eq!(scenario.last_heal_s(), Some(515));
        assert!(scenario.has_heals());
        assert_eq!(scenario.vm_count(), 12);
    }
}
