//! One simulation run: build the turmoil world (daemon, BMC fabric, cloud, one host per
//! rack), drive it step by step through the scenario's fault schedule, check invariants,
//! and produce the report and trace.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bearman::core::boot::Stage1Config;
use bearman::core::lifecycle::LifecycleState;
use bearman::core::model::{Flavor, IpPool, NodeRole, PoolPurpose};
use bearman::core::registration::RegistrationDefaults;
use bearman::images::MemoryImages;
use bearman::runtime::Clock;
use bearman::server::ServiceConfig;
use bearman::store::cached::CachedStore;
use bearman::store::memory::MemoryStore;
use bearman::store::Store;
use bearman_proto::{Artifact, RegisterRequest};

use crate::check::Checker;
use crate::fleet::{lock, seconds, Os, Power, SharedWorld, World};
use crate::scenario::{Fault, FaultKind, FaultTarget, Scenario};
use crate::{bmc, cloud, net, node};

/// The simulated calendar starts here (2026-01-01T00:00:00Z), so event timestamps in the
/// daemon's audit trail are the same on every run.
pub const EPOCH_MS: i64 = 1_767_225_600_000;
pub const DAEMON_PORT: u16 = 8080;
/// Full scans (VM census, address allocations) run this often; the incremental safety
/// checks run after every step.
const SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Seed stream of which boards the firmware bundle fails on (see [`SimRng::derive`]).
const FIRMWARE_FAIL_STREAM: u64 = 0x6677_6661_696c_0000;

/// The daemon's clock inside the simulation: the simulated calendar.
struct SimClock;

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        EPOCH_MS + turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64
    }
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub seed: u64,
    /// Run every host in every tick, even one with nothing to do, as turmoil does by
    /// default. Slower, and the same run: only for showing that skipping idle hosts
    /// changes nothing (`bearman-sim run --run-idle-hosts`).
    pub run_idle_hosts: bool,
}

impl RunOptions {
    /// The default run of one seed.
    pub fn seed(seed: u64) -> Self {
        Self {
            seed,
            run_idle_hosts: false,
        }
    }
}

/// Counts of daemon node states at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub counts: BTreeMap<LifecycleState, usize>,
    pub machines_running: usize,
    pub vms_down: usize,
}

pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: u32,
    pub racks: u32,
    pub virtual_time: Duration,
    pub samples: Vec<Sample>,
    pub checker: Checker,
    pub trace: crate::trace::Trace,
    pub daemon_events: usize,
    pub heartbeats_sent: u64,
    pub heartbeats_failed: u64,
    pub requests_failed: u64,
    pub steps: u64,
    /// Host ticks run and skipped as idle (turmoil's `skip_idle_hosts`): what the
    /// simulator's speed at fleet scale comes from.
    pub host_ticks_run: u64,
    pub host_ticks_skipped: u64,
    pub recoveries: Vec<crate::recovery::Recovery>,
    pub fences: usize,
    /// The scenario's last heal (`Scenario::last_heal_s`), when some fault heals.
    pub last_heal: Option<Duration>,
    /// Clustered runs: lease terms granted, and how long after each fault that struck
    /// the leader the next term began.
    pub lease_terms: usize,
    pub takeovers: Vec<Duration>,
    pub actions_judged: u64,
    /// Firmware runs: what the rollout came to.
    pub firmware: Option<FirmwareSummary>,
    /// The scenario's drills as the operator ran them, by `[[drill]]` index.
    pub drills: Vec<crate::drill::DrillRun>,
}

/// What a firmware rollout came to in one run.
#[derive(Clone, Debug)]
pub struct FirmwareSummary {
    /// Nodes the daemon recorded flashed to the target (`last_flashed`).
    pub flashed_recorded: u64,
    /// Updater runs on the boards: succeeded, failed, cut short by power or OS changes.
    pub flashes_ok: u64,
    pub flashes_failed: u64,
    pub flashes_interrupted: u64,
    /// The most boards flashing at once, fleet-wide and in one rack.
    pub most_flashing: usize,
    pub most_flashing_in_rack: usize,
    /// Boards still behind at the end.
    pub behind_at_end: usize,
    /// When the rollout paused (its first `firmware_rollout_paused` event), and why.
    pub paused_at: Option<Duration>,
    pub pause_reason: Option<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checker.all_passed()
    }
}

fn rack_host(rack: u32) -> String {
    format!("rack{rack}")
}

/// The flavor's stage-2 artifacts: a few bytes each, so a boot storm pays for requests,
/// not for bulk bytes. The agent downloads them and checks their sha256 as it would a
/// real kernel's.
const ARTIFACTS: [(&str, &[u8]); 2] = [
    ("hv/vmlinuz", b"bearman-sim stage-2 kernel"),
    ("hv/initrd.img", b"bearman-sim stage-2 initrd"),
];

fn artifact(index: usize) -> Artifact {
    let (path, bytes) = ARTIFACTS[index];
    Artifact {
        url: format!("/images/{path}"),
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes)),
    }
}

/// The image store the daemon serves `/images/…` from.
fn images() -> MemoryImages {
    let images = MemoryImages::default();
    for (path, bytes) in ARTIFACTS.into_iter().chain([BIOS_BUNDLE]) {
        images.insert(path, bytes.to_vec());
    }
    images
}

/// The simulated BIOS bundle's file (the simulated updater does not read it; the agent
/// downloads and verifies it as it would a real one).
const BIOS_BUNDLE: (&str, &[u8]) = ("fw/bios.bin", b"bearman-sim BIOS image");

fn seed_store(
    store: &MemoryStore,
    firmware: Option<&crate::scenario::SimFirmware>,
    operator_secret: Option<&str>,
) {
    if let Some(secret) = operator_secret {
        MemoryStore::now_or_never(store.token_create(
            crate::drill::OPERATOR_TOKEN_NAME,
            bearman::core::model::TokenRole::Admin,
            &bearman::app::tokens::hash_secret(secret),
            EPOCH_MS,
            None,
            &[],
        ))
        .expect("seed the operator's token");
    }
    let mut flavor = Flavor {
        name: "hv".into(),
        kernel: artifact(0),
        initrds: vec![artifact(1)],
        // Stage 2 finds Bearman on its command line, as a real flavor's must say.
        cmdline_template:
            "console=ttyS0 hostname={hostname} ip={ip} bearman.url={url} bearman.uuid={uuid}".into(),
        firmware_expected: Default::default(),
    };
    let pools = [
        IpPool {
            name: "fleet".into(),
            purpose: PoolPurpose::Node,
            vlan: None,
            cidr: "10.64.0.0/12".into(),
            range_start: "10.64.0.10".into(),
            range_end: "10.79.255.250".into(),
            gateway: Some("10.64.0.1".into()),
            dns: vec!["10.64.0.2".into()],
            mtu: 9000,
        },
        IpPool {
            name: "oob".into(),
            purpose: PoolPurpose::Bmc,
            vlan: None,
            cidr: "10.128.0.0/12".into(),
            range_start: "10.128.0.10".into(),
            range_end: "10.143.255.250".into(),
            gateway: Some("10.128.0.1".into()),
            dns: vec![],
            mtu: 1500,
        },
    ];
    if let Some(firmware) = firmware {
        flavor.firmware_expected.bios = Some(firmware.bios_target.clone());
        let (path, bytes) = BIOS_BUNDLE;
        let bundle = bearman::core::firmware::FirmwareBundle {
            name: format!("bios-{}", firmware.bios_target),
            component: "bios".into(),
            version: firmware.bios_target.clone(),
            artifact: Artifact {
                url: format!("/images/{path}"),
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes)),
            },
            size_bytes: bytes.len() as u64,
            applies_to: bearman::core::firmware::AppliesTo {
                vendor: firmware.bundle_vendor.clone(),
                ..Default::default()
            },
            command: vec![
                crate::host::SIM_UPDATER.into(),
                "{file}".into(),
                firmware.bios_target.clone(),
            ],
            timeout_s: firmware.timeout_s,
            success_exit_codes: vec![0],
            restart: bearman_proto::FirmwareRestart::Reboot,
            created_at_ms: EPOCH_MS,
        };
        bundle.validate().expect("the simulated bundle is valid");
        MemoryStore::now_or_never(store.firmware_bundle_create(&bundle, &[]))
            .expect("seed firmware bundle");
    }
    MemoryStore::now_or_never(store.flavor_put(&flavor, EPOCH_MS, &[])).expect("seed flavor");
    for pool in &pools {
        MemoryStore::now_or_never(store.pool_create(pool, &[])).expect("seed pool");
    }
}

/// Picks `count` distinct nodes (in `rack`, or anywhere) from the seed, in a stable order.
fn pick_nodes(
    world: &World,
    rack: Option<u32>,
    count: u32,
    rng: &mut crate::rng::SimRng,
) -> Vec<u32> {
    let mut candidates: Vec<u32> = world
        .nodes
        .iter()
        .filter(|n| rack.is_none_or(|r| n.rack == r))
        .map(|n| n.index)
        .collect();
    let mut chosen = Vec::new();
    while chosen.len() < count as usize && !candidates.is_empty() {
        let index = rng.range(0, candidates.len() as u64 - 1) as usize;
        chosen.push(candidates.remove(index));
    }
    chosen.sort();
    chosen
}

/// What fault application remembers between a fault and its heal.
struct FaultState {
    /// Nodes each fault picked, by fault index.
    affected: BTreeMap<usize, Vec<u32>>,
    /// The node of the event that triggered a `target = "event_node"` fault, by index.
    event_nodes: BTreeMap<usize, u32>,
    /// Faults that did not strike as written, for the expectations verdict.
    problems: Vec<String>,
    /// The replica each leader-striking fault struck, by fault index (for its heal).
    leader_victims: BTreeMap<usize, String>,
    leader_strikes: Vec<LeaderStrike>,
    rng: crate::rng::SimRng,
}

impl FaultState {
    /// Picks the nodes fault `fault_index` strikes and remembers them for its heal: the
    /// triggering event's node (`target = "event_node"`), the nodes an earlier fault
    /// struck (`same_nodes_as`), or `count` (default 1) from the seed, in its rack or
    /// anywhere.
    fn pick(
        &mut self,
        world: &mut World,
        fault_index: usize,
        fault: &Fault,
        now: Duration,
    ) -> Vec<u32> {
        let nodes = if fault.target == Some(FaultTarget::EventNode) {
            self.event_nodes
                .get(&fault_index)
                .copied()
                .into_iter()
                .collect()
        } else if let Some(other) = fault.same_nodes_as {
            self.affected.get(&other).cloned().unwrap_or_default()
        } else {
            pick_nodes(world, fault.rack, fault.count.unwrap_or(1), &mut self.rng)
        };
        if fault.target.is_some() || fault.same_nodes_as.is_some() {
            let names: Vec<String> = nodes.iter().map(|n| world.node_name(*n)).collect();
            world.trace.record(
                now,
                format!("strike {:?} nodes=[{}]", fault.kind, names.join(",")),
            );
        }
        if let (Some(other), true) = (fault.same_nodes_as, nodes.is_empty()) {
            self.problems.push(format!(
                "fault[{fault_index}] ({:?}) struck no node: fault[{other}] had struck none by t={}",
                fault.kind,
                seconds(now)
            ));
        }
        self.affected.insert(fault_index, nodes.clone());
        nodes
    }
}

/// Applies (or, with `heal`, undoes) one fault.
#[allow(clippy::too_many_arguments)]
fn apply_fault(
    sim: &mut turmoil::Sim<'_>,
    world: &SharedWorld,
    daemons: &[String],
    fault: &Fault,
    heal: bool,
    fault_index: usize,
    faults: &mut FaultState,
    now: Duration,
) {
    let verb = if heal { "heal" } else { "fault" };
    lock(world).trace.record(
        now,
        format!(
            "{verb} {:?} rack={:?} count={:?}",
            fault.kind, fault.rack, fault.count
        ),
    );
    match (&fault.kind, heal) {
        (FaultKind::CrashNodes, false) => {
            let mut world = lock(world);
            let nodes = faults.pick(&mut world, fault_index, fault, now);
            for index in &nodes {
                world.crash(*index, now);
            }
        }
        // Until automatic remediation exists, a crashed node comes back when someone
        // power-cycles it: the heal is that operator action.
        (FaultKind::CrashNodes, true) | (FaultKind::PowerCycleNodes, true) => {
            let mut world = lock(world);
            for index in faults
                .affected
                .get(&fault_index)
                .cloned()
                .unwrap_or_default()
            {
                world.power_off(index, now, "power cycle");
                world.power_on(index, now, "power cycle");
            }
        }
        (FaultKind::PowerCycleNodes, false) => {
            let mut world = lock(world);
            let nodes = faults.pick(&mut world, fault_index, fault, now);
            for index in &nodes {
                world.power_off(*index, now, "power cycle");
            }
        }
        (FaultKind::PowerLossNodes, false) => {
            let mut world = lock(world);
            let nodes = faults.pick(&mut world, fault_index, fault, now);
            for index in &nodes {
                world.lose_power(*index, now);
            }
        }
        // Nothing comes back by itself: the daemon's rebuild powers the node on.
        (FaultKind::PowerLossNodes, true) => {}
        (FaultKind::BmcPowerCycleNodes, false) => {
            let mut world = lock(world);
            let nodes = faults.pick(&mut world, fault_index, fault, now);
            world.ops_power_cycles.extend(nodes.iter().copied());
        }
        (FaultKind::BmcPowerCycleNodes, true) => {}
        (FaultKind::RackPowerLoss, false) => {
            let mut world = lock(world);
            let rack = fault.rack.expect("validated");
            world.racks_without_power.insert(rack);
            let nodes: Vec<u32> = world
                .nodes
                .iter()
                .filter(|n| n.rack == rack)
                .map(|n| n.index)
                .collect();
            for index in &nodes {
                world.power_off(*index, now, "rack power loss");
            }
        }
        (FaultKind::RackPowerLoss, true) => {
            let mut world = lock(world);
            let rack = fault.rack.expect("validated");
            world.racks_without_power.remove(&rack);
            let nodes: Vec<u32> = world
                .nodes
                .iter()
                .filter(|n| n.rack == rack)
                .map(|n| n.index)
                .collect();
            for index in &nodes {
                world.power_on(*index, now, "rack power restored");
            }
        }
        (FaultKind::PartitionRack, false) => {
            for daemon in daemons {
                sim.partition(rack_host(fault.rack.expect("validated")), daemon.as_str())
            }
        }
        (FaultKind::PartitionRack, true) => {
            for daemon in daemons {
                sim.repair(rack_host(fault.rack.expect("validated")), daemon.as_str())
            }
        }
        (FaultKind::PartitionBmc, false) => {
            for daemon in daemons {
                sim.partition(bmc::BMC_HOST, daemon.as_str())
            }
        }
        (FaultKind::PartitionBmc, true) => {
            for daemon in daemons {
                sim.repair(bmc::BMC_HOST, daemon.as_str())
            }
        }
        (FaultKind::BmcLockup, false) => {
            let mut world = lock(world);
            let until = now + Duration::from_secs(365 * 24 * 3600);
            let rack = fault.rack;
            for index in 0..world.nodes.len() {
                if rack.is_none_or(|r| world.nodes[index].rack == r) {
                    world.bmcs[index].locked_until = Some(until);
                }
            }
        }
        (FaultKind::BmcLockup, true) => {
            let mut world = lock(world);
            for bmc in &mut world.bmcs {
                bmc.locked_until = None;
            }
        }
        (FaultKind::BmcStaleReadback, heal) => {
            let mut world = lock(world);
            world.bmc_faults.stale_readback = !heal;
            if heal {
                for bmc in &mut world.bmcs {
                    bmc.stale_power = None;
                }
            }
        }
        (FaultKind::BmcTimeouts, heal) => lock(world).bmc_faults.timeouts = !heal,
        (FaultKind::DaemonRestart, false) => {
            for daemon in daemons {
                sim.crash(daemon.as_str())
            }
        }
        (FaultKind::DaemonRestart, true) => {
            for daemon in daemons {
                sim.bounce(daemon.as_str())
            }
        }
        (FaultKind::CloudOutage, false) => {
            for daemon in daemons {
                sim.partition(cloud::CLOUD_HOST, daemon.as_str())
            }
        }
        (FaultKind::CloudOutage, true) => {
            for daemon in daemons {
                sim.repair(cloud::CLOUD_HOST, daemon.as_str())
            }
        }
        (FaultKind::LatencySpike, false) => {
            sim.set_max_message_latency(Duration::from_millis(100 + fault.latency_ms.unwrap_or(0)))
        }
        (FaultKind::LatencySpike, true) => sim.set_max_message_latency(Duration::from_millis(100)),
        (FaultKind::PowerCycleAll, false) => {
            let mut world = lock(world);
            for index in 0..world.nodes.len() as u32 {
                world.power_off(index, now, "power cycle all");
                world.power_on(index, now, "power cycle all");
            }
        }
        (FaultKind::PowerCycleAll, true) => {}
        (kind, false) if kind.strikes_leader() => {
            let lease = lock(world).cluster.as_ref().and_then(|db| db.lease_at(now));
            let Some(lease) = lease.filter(|l| daemons.contains(&l.holder)) else {
                faults.problems.push(format!(
                    "fault[{fault_index}] ({kind:?}) struck no leader: nobody held the lease at t={}",
                    seconds(now)
                ));
                return;
            };
            let victim = lease.holder.clone();
            lock(world).trace.record(
                now,
                format!("strike {kind:?} leader={victim} epoch={}", lease.epoch),
            );
            match kind {
                FaultKind::KillLeader => sim.crash(victim.as_str()),
                FaultKind::PartitionLeaderDatabase => {
                    sim.partition(victim.as_str(), crate::db::DB_HOST)
                }
                FaultKind::PartitionLeaderNodes => {
                    for rack in 0..lock(world).racks() {
                        sim.partition(victim.as_str(), rack_host(rack))
                    }
                }
                FaultKind::PauseLeader => sim.pause(victim.as_str()),
                _ => unreachable!("strikes_leader"),
            }
            faults.leader_strikes.push(LeaderStrike {
                fault_index,
                kind: kind.clone(),
                at: now,
                victim: victim.clone(),
                epoch: lease.epoch,
            });
            faults.leader_victims.insert(fault_index, victim);
        }
        (kind, true) if kind.strikes_leader() => {
            let Some(victim) = faults.leader_victims.get(&fault_index).cloned() else {
                return;
            };
            lock(world)
                .trace
                .record(now, format!("heal {kind:?} leader={victim}"));
            match kind {
                FaultKind::KillLeader => sim.bounce(victim.as_str()),
                FaultKind::PartitionLeaderDatabase => {
                    sim.repair(victim.as_str(), crate::db::DB_HOST)
                }
                FaultKind::PartitionLeaderNodes => {
                    for rack in 0..lock(world).racks() {
                        sim.repair(victim.as_str(), rack_host(rack))
                    }
                }
                FaultKind::PauseLeader => sim.resume(victim.as_str()),
                _ => unreachable!("strikes_leader"),
            }
        }
        (FaultKind::RestartDatabase, false) => sim.crash(crate::db::DB_HOST),
        (FaultKind::RestartDatabase, true) => sim.bounce(crate::db::DB_HOST),
        (_, _) => unreachable!("every fault kind is matched above"),
    }
}

/// A fault that struck the leader: when, whom, and the epoch it led under (a takeover is
/// the first lease term granted after it at a newer epoch).
#[derive(Clone, Debug)]
pub struct LeaderStrike {
    pub fault_index: usize,
    pub kind: FaultKind,
    pub at: Duration,
    pub victim: String,
    pub epoch: i64,
}

/// Runs `scenario` with `options`, calling `progress` about every tenth of the run.
pub fn run(
    scenario: &Scenario,
    options: &RunOptions,
    progress: impl FnMut(&Sample, f64),
) -> anyhow::Result<Report> {
    run_watched(scenario, options, None, &mut |_| {}, progress)
}

/// The settings every simulated daemon serves with (and the `--serve` window renders
/// with).
pub fn service_config() -> ServiceConfig {
    ServiceConfig {
        public_url: node::DAEMON_URL.into(),
        stage1: Stage1Config::default(),
        defaults: RegistrationDefaults {
            role: NodeRole::Compute,
            flavor: Some("hv".into()),
        },
        // The simulated racks are the operator's own machines, as if every one were on
        // an allow-list.
        enrollment: bearman::core::enrollment::EnrollmentPolicy::accept_all(),
        body_limit_bytes: bearman::server::BODY_LIMIT_BYTES_DEFAULT,
        edge: bearman::edge::EdgeLimits::default(),
        heartbeat_fresh_ms: 30_000,
        firmware: Default::default(),
        metrics_public: false,
        dashboard: Default::default(),
    }
}

/// [`run`], shown to `watch` (see [`crate::watch`]) and calling `on_step` with the
/// virtual time after every step (the CLI paces a watched run there). Neither feeds
/// anything into the simulation: a watched run is the same run.
pub fn run_watched(
    scenario: &Scenario,
    options: &RunOptions,
    watch: Option<&crate::watch::Watch>,
    on_step: &mut dyn FnMut(Duration),
    mut progress: impl FnMut(&Sample, f64),
) -> anyhow::Result<Report> {
    let fixture: RegisterRequest =
        serde_json::from_str(include_str!("../../fixtures/hardware/r640.json"))?;
    let fleet = &scenario.fleet;
    let world: SharedWorld = Arc::new(Mutex::new(World::with_racks(
        &fleet.sizes(),
        &fleet.storage(),
        fleet.vm_capacity,
    )));
    {
        let mut world = lock(&world);
        world.off_nodes = fleet.off_nodes.iter().copied().collect();
        world.drills = vec![Default::default(); scenario.drills.len()];
        world.place_vms(fleet.vms_per_node);
    }
    if let Some(firmware) = &scenario.firmware {
        let count = lock(&world).nodes.len();
        // Exactly fail_percent of the boards (rounded down), picked from the seed: the
        // rollout is judged against the rate the scenario names, not a draw around it.
        let mut rng = crate::rng::SimRng::derive(options.seed, FIRMWARE_FAIL_STREAM);
        let mut order: Vec<usize> = (0..count).collect();
        for i in (1..count).rev() {
            order.swap(i, rng.range(0, i as u64) as usize);
        }
        let failing = count * firmware.fail_percent as usize / 100;
        let mut fails = vec![false; count];
        for index in &order[..failing] {
            fails[*index] = true;
        }
        lock(&world).firmware = Some(crate::fleet::FirmwareTruth {
            target: firmware.bios_target.clone(),
            updates_max: firmware.rollout.updates_max,
            updates_per_rack_max: firmware.rollout.updates_per_rack_max,
            bios: vec![firmware.bios_start.clone(); count],
            fails,
            flashing: Default::default(),
            flashes_ok: 0,
            flashes_failed: 0,
            flashes_interrupted: 0,
            most_flashing: 0,
            most_flashing_in_rack: 0,
            violations: Vec::new(),
        });
    }
    let store = Arc::new(MemoryStore::new());
    let operator_secret =
        (!scenario.drills.is_empty()).then(|| crate::drill::operator_secret(options.seed));
    seed_store(
        &store,
        scenario.firmware.as_ref(),
        operator_secret.as_deref(),
    );
    if let Some(watch) = watch {
        watch.start(
            format!("{} seed {}", scenario.name, options.seed),
            store.clone(),
        );
    }

    let duration = Duration::from_secs(scenario.duration_s);
    let tick = Duration::from_millis(scenario.tick_ms);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(duration + Duration::from_secs(3600))
        .tick_duration(tick)
        .skip_idle_hosts(!options.run_idle_hosts)
        .rng_seed(options.seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS as u64))
        .tcp_capacity(4096)
        .build();

    // The daemon: the real router, lifecycle and store trait. Its data lives outside the
    // host factory, so a crash and restart keeps it (the cache inside does not survive,
    // as in production). A clustered run has several replicas, each reaching the data
    // through the database host.
    let database = scenario
        .cluster
        .as_ref()
        .map(|_| crate::db::Database::new(store.clone()));
    let daemons: Vec<String> = match &scenario.cluster {
        Some(cluster) => (0..cluster.replicas)
            .map(|i| format!("daemon{i}"))
            .collect(),
        None => vec![node::DAEMON_HOST.to_string()],
    };
    {
        let mut world = lock(&world);
        world.daemons = daemons.clone();
        world.cluster = database.clone();
    }
    let images = Arc::new(images());
    for name in &daemons {
        let data: Arc<dyn Store> = match &database {
            Some(db) => Arc::new(crate::db::RemoteStore { db: db.clone() }),
            None => store.clone(),
        };
        let membership =
            scenario
                .cluster
                .as_ref()
                .map(|cluster| bearman::server::ClusterMembership {
                    replica: bearman::core::cluster::Replica {
                        name: name.clone(),
                        address: format!("{name}:{DAEMON_PORT}"),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        started_at_ms: 0,
                        last_seen_at_ms: 0,
                    },
                    config: cluster.config(),
                });
        let remediation = scenario.remediation.clone();
        let images = images.clone();
        let observer = watch.map(|watch| watch.observer(name));
        let firmware_policy = scenario
            .firmware
            .as_ref()
            .map(|firmware| firmware.rollout.clone())
            .unwrap_or_default();
        sim.host(name.as_str(), move || {
            let data = data.clone();
            let membership = membership.clone();
            let remediation = remediation.clone();
            let images = images.clone();
            let observer = observer.clone();
            let firmware_policy = firmware_policy.clone();
            async move {
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", DAEMON_PORT)).await?;
                let store: Arc<dyn Store> = match &membership {
                    Some(membership) => Arc::new(CachedStore::with_max_age(
                        data,
                        membership.config.cache_max_age_ms,
                        Arc::new(|| SimClock.now_ms()),
                    )),
                    None => Arc::new(CachedStore::new(data)),
                };
                let membership = membership.map(|mut membership| {
                    membership.replica.started_at_ms = SimClock.now_ms();
                    membership
                });
                // Each daemon (each replica) counts its own, as in production.
                let metrics = Arc::new(bearman::telemetry::Metrics::new());
                let parts = bearman::server::DaemonParts {
                    store,
                    clock: Arc::new(SimClock),
                    images,
                    service: ServiceConfig {
                        firmware: firmware_policy.clone(),
                        ..service_config()
                    },
                    bmcs: Arc::new(
                        bmc::SimBmcs::new(Duration::from_secs(10)).with_metrics(metrics.clone()),
                    ),
                    cloud: Some(Arc::new(cloud::SimCloud {
                        timeout: Duration::from_secs(10),
                    })),
                    remediation,
                    cluster: membership,
                    metrics,
                    observer,
                };
                bearman::server::run_daemon(
                    net::TurmoilListener(listener),
                    parts,
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }
    if let Some(db) = &database {
        let db = db.clone();
        sim.host(crate::db::DB_HOST, move || crate::db::serve(db.clone()));
        // One data centre: the database answers its replicas within milliseconds.
        for name in &daemons {
            sim.set_link_max_message_latency(
                name.as_str(),
                crate::db::DB_HOST,
                Duration::from_millis(5),
            );
        }
    }
    {
        let world = world.clone();
        let behaviour = scenario.bmc.clone();
        let seed = options.seed;
        sim.host(bmc::BMC_HOST, move || {
            bmc::serve(world.clone(), behaviour.clone(), seed)
        });
    }
    {
        let world = world.clone();
        sim.host(cloud::CLOUD_HOST, move || cloud::serve(world.clone()));
    }
    {
        let world = world.clone();
        // The operator's drills, and the storage roles it records first so that drill
        // selectors and budgets see the fleet's roles (the nodes register as compute).
        let operator = operator_secret.map(|secret| crate::drill::Operator {
            world: world.clone(),
            secret,
            daemons: daemons.clone(),
            port: DAEMON_PORT,
        });
        let storage: Vec<bearman_proto::uuid::NodeUuid> = {
            let world = lock(&world);
            world
                .nodes
                .iter()
                .filter(|n| n.role == crate::fleet::Role::Storage)
                .filter(|n| !world.off_nodes.contains(&n.index))
                .map(|n| n.uuid.clone())
                .collect()
        };
        let drills = scenario.drills.clone();
        sim.host(crate::ops::OPS_HOST, move || {
            if let Some(operator) = &operator {
                if !storage.is_empty() {
                    tokio::task::spawn_local(
                        operator.clone().record_storage_roles(storage.clone()),
                    );
                }
                for (index, drill) in drills.iter().enumerate() {
                    tokio::task::spawn_local(operator.clone().run_drill(index, drill.clone()));
                }
            }
            crate::ops::serve(world.clone())
        });
    }
    let rack_nodes: Vec<Vec<u32>> = {
        let world = lock(&world);
        (0..fleet.racks)
            .map(|rack| {
                world
                    .nodes
                    .iter()
                    .filter(|n| n.rack == rack)
                    .map(|n| n.index)
                    .collect()
            })
            .collect()
    };
    for rack in 0..fleet.racks {
        let world = world.clone();
        let timing = scenario.timing.clone();
        let fixture = fixture.clone();
        let seed = options.seed;
        let indices = rack_nodes[rack as usize].clone();
        let flash_s = scenario.firmware.as_ref().map(|firmware| firmware.flash_s);
        sim.host(rack_host(rack), move || {
            let world = world.clone();
            let timing = timing.clone();
            let fixture = fixture.clone();
            let indices = indices.clone();
            async move {
                for index in indices {
                    tokio::task::spawn_local(node::supervise(
                        world.clone(),
                        index,
                        timing.clone(),
                        fixture.clone(),
                        seed,
                        flash_s,
                    ));
                }
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }

    if fleet.power_on_at_start {
        let mut world = lock(&world);
        for index in 0..world.nodes.len() as u32 {
            if !world.off_nodes.contains(&index) {
                world.power_on(index, Duration::ZERO, "initial power on");
            }
        }
    }

    // The fault schedule as (time, fault index, heal?), in time order; heals after faults
    // at the same instant.
    // Faults with `when_event` (`when_action`) wait, armed, for their event (action).
    let mut schedule: Vec<(Duration, usize, bool)> = Vec::new();
    let mut armed: Vec<usize> = Vec::new();
    for (index, fault) in scenario.faults.iter().enumerate() {
        if fault.triggered() {
            armed.push(index);
            continue;
        }
        schedule.push((Duration::from_secs(fault.at_s), index, false));
        if let Some(heal) = fault.heal_at_s {
            schedule.push((Duration::from_secs(heal), index, true));
        }
    }
    schedule.sort_by_key(|(at, index, heal)| (*at, *heal, *index));
    let mut trigger_events_seen: i64 = 0;

    // Liveness is judged at each expectation's deadline (and at the end when none is set).
    let mut deadlines: Vec<Duration> = Vec::new();
    if let Some(by) = scenario.expect.all_ready_by_s {
        deadlines.push(Duration::from_secs(by));
    }
    if let Some(after) = scenario.expect.ready_after_heal_s {
        deadlines.push(Duration::from_secs(
            scenario.last_heal_s().unwrap_or(0) + after,
        ));
    }
    // With drills, the end is a deadline too: every target is Ready again by then.
    if deadlines.is_empty() || !scenario.drills.is_empty() {
        deadlines.push(duration);
    }
    let mut deadlines: Vec<Duration> = deadlines.into_iter().map(|d| d.min(duration)).collect();
    deadlines.sort();
    deadlines.dedup();
    let mut deadlines = deadlines.into_iter().peekable();

    let mut checker = Checker::default();
    if !scenario.drills.is_empty() {
        checker.drills = Some(crate::check::Verdict::named(
            "every drill came to its expected outcome through the API",
            "expect",
        ));
    }
    if scenario.firmware.is_some() {
        checker.firmware = Some(crate::check::Verdict::named(
            "no board flashes past the rollout's caps, none boots on old firmware",
            "safety",
        ));
    }
    let mut fault_state = FaultState {
        affected: BTreeMap::new(),
        event_nodes: BTreeMap::new(),
        problems: Vec::new(),
        leader_victims: BTreeMap::new(),
        leader_strikes: Vec::new(),
        rng: crate::rng::SimRng::derive(options.seed, 0xfa17),
    };
    let mut samples = Vec::new();
    let sample_every = Duration::from_secs((scenario.duration_s / 12).max(1));
    let progress_every = Duration::from_secs((scenario.duration_s / 10).max(1));
    let mut next_sample = Duration::ZERO;
    let mut next_progress = progress_every;
    let mut next_scan = Duration::ZERO;
    let mut steps: u64 = 0;

    let sample = |world: &World, store: &MemoryStore, at: Duration| {
        let (_, vms_down) = world.vm_census();
        Sample {
            at,
            counts: store.state_counts(),
            machines_running: world.nodes.iter().filter(|n| n.os == Os::Running).count(),
            vms_down,
        }
    };

    loop {
        let now = sim.elapsed();
        if !armed.is_empty() {
            let new_events = store.events_after(trigger_events_seen);
            if let Some(last) = new_events.last() {
                trigger_events_seen = last.id;
            }
            for event in &new_events {
                let text = format!("{} {}", event.action, event.reason);
                // The fleet node the event is about, if any.
                let event_node = event
                    .node_uuid
                    .as_ref()
                    .and_then(crate::fleet::index_of)
                    .filter(|index| (*index as usize) < lock(&world).nodes.len());
                let fired: Vec<usize> = armed
                    .iter()
                    .copied()
                    .filter(|index| {
                        let fault = &scenario.faults[*index];
                        now >= Duration::from_secs(fault.at_s)
                            && fault
                                .when_event
                                .as_deref()
                                .is_some_and(|pattern| text.contains(pattern))
                            && (fault.target != Some(FaultTarget::EventNode)
                                || event_node.is_some())
                    })
                    .collect();
                for index in fired {
                    armed.retain(|i| *i != index);
                    let fault = &scenario.faults[index];
                    let strike = now + Duration::from_secs(fault.delay_s.unwrap_or(0));
                    let mut line = format!("trigger {:?} on event {}", fault.kind, event.id);
                    if fault.target == Some(FaultTarget::EventNode) {
                        let node = event_node.expect("filtered above");
                        fault_state.event_nodes.insert(index, node);
                        line.push_str(&format!(" node={}", lock(&world).node_name(node)));
                    }
                    if strike != now {
                        line.push_str(&format!(" strikes at t={}", seconds(strike)));
                    }
                    lock(&world).trace.record(now, line);
                    schedule.push((strike, index, false));
                    if let Some(after) = fault.heal_after_s {
                        schedule.push((strike + Duration::from_secs(after), index, true));
                    }
                }
            }
            let new_actions = std::mem::take(&mut lock(&world).actions_new);
            for action in &new_actions {
                let fired: Vec<usize> = armed
                    .iter()
                    .copied()
                    .filter(|index| {
                        let fault = &scenario.faults[*index];
                        now >= Duration::from_secs(fault.at_s)
                            && fault
                                .when_action
                                .as_deref()
                                .is_some_and(|pattern| action.contains(pattern))
                    })
                    .collect();
                for index in fired {
                    armed.retain(|i| *i != index);
                    let fault = &scenario.faults[index];
                    let strike = now + Duration::from_secs(fault.delay_s.unwrap_or(0));
                    lock(&world)
                        .trace
                        .record(now, format!("trigger {:?} on action {action}", fault.kind));
                    schedule.push((strike, index, false));
                    if let Some(after) = fault.heal_after_s {
                        schedule.push((strike + Duration::from_secs(after), index, true));
                    }
                }
            }
            schedule.sort_by_key(|(at, index, heal)| (*at, *heal, *index));
        }
        while let Some((at, index, heal)) = schedule.first().copied() {
            if at > now {
                break;
            }
            schedule.remove(0);
            apply_fault(
                &mut sim,
                &world,
                &daemons,
                &scenario.faults[index],
                heal,
                index,
                &mut fault_state,
                now,
            );
            samples.push(sample(&lock(&world), &store, now));
        }
        checker.check_step(&lock(&world), &store, now);
        if now >= next_scan {
            checker.check_scan(&lock(&world), &store, now);
            next_scan = now + SCAN_INTERVAL;
        }
        if now >= next_sample {
            let s = sample(&lock(&world), &store, now);
            lock(&world).trace.record(
                now,
                format!(
                    "sample {:?} running={} vms_down={}",
                    s.counts, s.machines_running, s.vms_down
                ),
            );
            samples.push(s);
            next_sample = now + sample_every;
        }
        if now >= next_progress {
            let s = sample(&lock(&world), &store, now);
            progress(&s, now.as_secs_f64() / duration.as_secs_f64());
            next_progress = now + progress_every;
        }
        while deadlines.peek().is_some_and(|deadline| now >= *deadline) {
            deadlines.next();
            checker.check_deadline(&lock(&world), &store, now);
        }
        if now >= duration {
            break;
        }
        sim.step()
            .map_err(|error| anyhow::anyhow!("simulation failed at t={}: {error}", seconds(now)))?;
        steps += 1;
        if let Some(watch) = watch {
            watch.set_now_ms(EPOCH_MS + sim.elapsed().as_millis() as i64);
        }
        on_step(sim.elapsed());
    }
    let end = sim.elapsed();
    let (host_ticks_run, host_ticks_skipped) = sim.host_ticks();
    checker.check_step(&lock(&world), &store, end);
    checker.check_scan(&lock(&world), &store, end);
    for _ in deadlines {
        checker.check_deadline(&lock(&world), &store, end);
    }
    checker.check_end(
        &lock(&world),
        scenario.expect.vms_down_allowed.unwrap_or(0),
        end,
    );
    samples.push(sample(&lock(&world), &store, end));
    // Faults that never struck make a scenario meaningless, not green.
    for index in &armed {
        let fault = &scenario.faults[*index];
        fault_state.problems.push(format!(
            "fault[{index}] ({:?}) never struck: no {} matching {:?}{} at or after {} s",
            fault.kind,
            if fault.when_action.is_some() {
                "replica action"
            } else {
                "daemon event"
            },
            fault
                .when_event
                .as_deref()
                .or(fault.when_action.as_deref())
                .unwrap_or_default(),
            if fault.target == Some(FaultTarget::EventNode) {
                " naming a node"
            } else {
                ""
            },
            fault.at_s
        ));
    }
    for (at, index, heal) in &schedule {
        if !heal {
            fault_state.problems.push(format!(
                "fault[{index}] ({:?}) never struck: due at t={}, after the end",
                scenario.faults[*index].kind,
                seconds(*at)
            ));
        }
    }

    // The trace: what the world saw, then the daemon's whole audit trail, then verdicts.
    let mut world = lock(&world);
    let events = store.events_after(0);
    let recoveries = crate::recovery::recoveries(&world, &events);
    let fences = crate::recovery::fences_started(&events);
    checker.check_expectations(scenario, &recoveries, fences, &fault_state.problems);
    if let Some(verdict) = checker.drills.as_mut() {
        verdict.checks += 1;
        for failure in crate::drill::judge(&scenario.drills, &world.drills) {
            verdict.fail(failure);
        }
    }
    let drills = world.drills.clone();
    let firmware = scenario.firmware.as_ref().map(|firmware| {
        let rollout = MemoryStore::now_or_never(store.firmware_rollout_get()).unwrap_or_default();
        let flashed = store
            .snapshot()
            .nodes
            .iter()
            .filter(|node| {
                node.firmware_components
                    .get("bios")
                    .and_then(|record| record.last_flashed.as_deref())
                    == Some(firmware.bios_target.as_str())
            })
            .count() as u64;
        checker.check_firmware_end(&scenario.expect, &rollout, flashed);
        let truth = world
            .firmware
            .clone()
            .expect("firmware runs have their truth");
        let paused_at = events
            .iter()
            .find(|event| event.action == bearman::core::model::Action::FirmwareRolloutPaused)
            .map(|event| Duration::from_millis((event.at_ms - EPOCH_MS).max(0) as u64));
        FirmwareSummary {
            flashed_recorded: flashed,
            flashes_ok: truth.flashes_ok,
            flashes_failed: truth.flashes_failed,
            flashes_interrupted: truth.flashes_interrupted,
            most_flashing: truth.most_flashing,
            most_flashing_in_rack: truth.most_flashing_in_rack,
            behind_at_end: truth
                .bios
                .iter()
                .filter(|bios| **bios != truth.target)
                .count(),
            paused_at,
            pause_reason: rollout.paused.map(|pause| pause.reason),
        }
    });
    let grants = database.as_ref().map(|db| db.grants()).unwrap_or_default();
    let takeovers: Vec<Duration> = fault_state
        .leader_strikes
        .iter()
        .filter(|strike| strike.kind != FaultKind::PartitionLeaderNodes)
        .filter_map(|strike| {
            grants
                .iter()
                .find(|g| g.epoch > strike.epoch && g.at >= strike.at)
                .map(|g| g.at - strike.at)
        })
        .collect();
    if database.is_some() {
        let active = MemoryStore::now_or_never(store.remediation_list(
            true,
            None,
            bearman::store::LIST_LIMIT_MAX,
        ))
        .unwrap_or_default();
        checker.check_cluster(crate::check::ClusterEnd {
            grants: &grants,
            stale_actions: &world.stale_actions,
            actions_judged: world.actions_judged,
            active_at_end: &active,
            strikes: &fault_state.leader_strikes,
            takeover_within: scenario.expect.takeover_within_s.map(Duration::from_secs),
            end,
        });
    }
    let mut trace = std::mem::take(&mut world.trace);
    trace.extend(grants.iter().map(|g| {
        format!(
            "lease_term epoch={} holder={} at={}",
            g.epoch,
            g.holder,
            seconds(g.at)
        )
    }));
    trace.extend(events.iter().map(|e| {
        format!(
            "event {} at={} node={} actor={} action={} {}->{} {}",
            e.id,
            e.at_ms - EPOCH_MS,
            e.node_uuid
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default(),
            e.actor,
            e.action,
            e.from_state.as_deref().unwrap_or("-"),
            e.to_state.as_deref().unwrap_or("-"),
            e.reason
        )
    }));
    for verdict in checker.verdicts() {
        trace.extend([format!(
            "verdict {} {} {:?}",
            verdict.name,
            verdict.passed(),
            verdict.failures
        )]);
    }
    let powered_off = world.nodes.iter().filter(|n| n.power == Power::Off).count();
    trace.extend([format!(
        "end powered_off={powered_off} heartbeats={}",
        world.heartbeats_sent
    )]);
    Ok(Report {
        scenario: scenario.name.clone(),
        seed: options.seed,
        nodes: scenario.node_count(),
        racks: fleet.racks,
        virtual_time: end,
        samples,
        checker,
        trace,
        daemon_events: events.len(),
        heartbeats_sent: world.heartbeats_sent,
        heartbeats_failed: world.heartbeats_failed,
        requests_failed: world.requests_failed,
        steps,
        host_ticks_run,
        host_ticks_skipped,
        recoveries,
        fences,
        last_heal: scenario
            .has_heals()
            .then(|| Duration::from_secs(scenario.last_heal_s().unwrap_or(0))),
        lease_terms: grants.len(),
        takeovers,
        actions_judged: world.actions_judged,
        firmware,
        drills,
    })
}
