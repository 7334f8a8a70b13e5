//! The simulated data centre's ground truth: which machines have power, which OS is up,
//! where each VM's instances actually run, and what every BMC and the cloud believe.
//!
//! Everything here is plain state with `now` passed in. The turmoil hosts (racks, BMC
//! fabric, cloud) and the run driver mutate it through these methods; the invariant
//! checker reads it. One mutex, never held across an await.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bearman_proto::uuid::NodeUuid;
use tokio::sync::watch;

use crate::trace::Trace;

/// Namespace for simulated node uuids (`NodeUuid::from_index`).
pub const UUID_NAMESPACE: u32 = 0x5e1f_0001;

/// Nova's `service_down_time`: a compute service is considered down this long after its
/// host stopped reporting.
pub const SERVICE_DOWN_TIME: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Power {
    On,
    Off,
}

/// What the machine is doing, as opposed to what the daemon thinks it is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Os {
    /// No power.
    Off,
    /// Firmware, iPXE, stage 1: on its way to stage 2.
    Booting,
    /// Stage 2 is up; the hypervisor runs VMs.
    Running,
    /// Kernel panic: power on, nothing running, nothing answering.
    Crashed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Compute,
    Storage,
}

pub struct NodeTruth {
    pub index: u32,
    pub rack: u32,
    pub uuid: NodeUuid,
    pub role: Role,
    pub power: Power,
    pub os: Os,
    /// Bumped on every power or OS change; a node task runs for one epoch only.
    pub epoch: u64,
    pub epoch_tx: watch::Sender<u64>,
    /// When the OS stopped running (for the cloud's service-down judgement).
    pub os_down_since: Option<Duration>,
    pub boots_completed: u32,
    pub next_boot_pxe: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmTruth {
    pub id: u32,
    /// The host the cloud has the VM assigned to.
    pub assigned: u32,
    /// Hosts on which an instance of this VM is actually running. More than one is the
    /// disaster the whole product exists to prevent (a shared iSCSI disk written twice).
    pub instances: BTreeSet<u32>,
}

/// Per-BMC fault switches and state.
#[derive(Clone, Debug, Default)]
pub struct BmcState {
    pub locked_until: Option<Duration>,
    pub recent_calls: Vec<Duration>,
    /// While set, power readback reports this instead of the truth.
    pub stale_power: Option<Power>,
}

#[derive(Clone, Debug, Default)]
pub struct BmcFaults {
    pub timeouts: bool,
    pub stale_readback: bool,
}

pub struct World {
    pub nodes: Vec<NodeTruth>,
    pub vms: BTreeMap<u32, VmTruth>,
    /// The VMs the cloud has assigned to each host (`VmTruth::assigned`, indexed), kept
    /// with it by [`World::place_vms`] and [`World::evacuate`]: a booting hypervisor and
    /// the cloud's host listing look up their own instead of scanning every VM.
    vms_assigned: BTreeMap<u32, BTreeSet<u32>>,
    pub vm_capacity: u32,
    pub forced_down: BTreeSet<u32>,
    pub bmcs: Vec<BmcState>,
    pub bmc_faults: BmcFaults,
    pub cloud_outage: bool,
    pub trace: Trace,
    /// Safety violations seen at the moment they happened (e.g. an evacuation from a
    /// host that was never powered off).
    pub violations: Vec<String>,
    pub heartbeats_sent: u64,
    pub heartbeats_failed: u64,
    pub requests_failed: u64,
    /// Nodes an operator should power-cycle through their BMCs (see `ops`).
    pub ops_power_cycles: Vec<u32>,
    /// Every moment a VM started running on a second host, as it happened.
    pub double_runs: Vec<String>,
    /// Racks without power: their BMCs are dark too.
    pub racks_without_power: BTreeSet<u32>,
    /// Crashes, for the recovery metrics: node → every crash of it in time order, each
    /// (crash time, VMs it was running).
    pub crashes: BTreeMap<u32, Vec<(Duration, Vec<u32>)>>,
    /// When each VM was last evacuated.
    pub evacuated_at: BTreeMap<u32, Duration>,
    /// The daemon hosts the nodes reach: `daemon`, or a clustered run's replicas.
    pub daemons: Vec<String>,
    /// Clustered runs: the database, to judge every action against its lease.
    pub cluster: Option<Arc<crate::db::Database>>,
    /// Actions (BMC power commands, cloud evacuations and force-downs) a replica sent
    /// while it did not hold an unexpired lease, as they reached the BMC or the cloud.
    pub stale_actions: Vec<String>,
    /// Actions judged against the lease (so a pass says how much it rests on).
    pub actions_judged: u64,
    /// Those actions as "replica target operation argument", for `when_action` faults
    /// (drained by the run loop).
    pub actions_new: Vec<String>,
    /// A firmware rollout's ground truth, in runs that have one.
    pub firmware: Option<FirmwareTruth>,
    /// Nodes that stay powered off the whole run (`fleet.off_nodes`): no VMs, no boot.
    pub off_nodes: BTreeSet<u32>,
    /// The scenario's drills as the simulated operator ran them, by `[[drill]]` index.
    pub drills: Vec<crate::drill::DrillRun>,
}

/// Ground truth of a firmware rollout (`[firmware]` in the scenario): what each board's
/// BIOS reads, which boards the bundle fails on, who is flashing now; and what must never
/// happen — more boards flashing at once than the rollout allows, or a node reaching
/// stage 2 on BIOS behind its flavor.
#[derive(Clone, Debug)]
pub struct FirmwareTruth {
    /// The version the flavor expects and the bundle installs.
    pub target: String,
    pub updates_max: usize,
    pub updates_per_rack_max: usize,
    /// Per node: the BIOS version the board reads.
    pub bios: Vec<String>,
    /// Per node: the bundle fails on this board (every attempt).
    pub fails: Vec<bool>,
    /// Nodes running the updater now.
    pub flashing: BTreeSet<u32>,
    pub flashes_ok: u64,
    pub flashes_failed: u64,
    /// Flashes cut short by a power or OS change.
    pub flashes_interrupted: u64,
    /// The most boards flashing at once, fleet-wide and in one rack.
    pub most_flashing: usize,
    pub most_flashing_in_rack: usize,
    /// Caps exceeded and nodes provisioned behind, as they happened.
    pub violations: Vec<String>,
}

pub type SharedWorld = Arc<Mutex<World>>;

pub fn lock(world: &SharedWorld) -> MutexGuard<'_, World> {
    world
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn seconds(at: Duration) -> String {
    format!("{}.{:03}", at.as_secs(), at.subsec_millis())
}

impl World {
    pub fn new(racks: u32, nodes_per_rack: u32, storage_per_rack: u32, vm_capacity: u32) -> World {
        let sizes = vec![nodes_per_rack; racks as usize];
        let storage = vec![storage_per_rack; racks as usize];
        World::with_racks(&sizes, &storage, vm_capacity)
    }

    /// Racks of `sizes[r]` nodes each, the first `storage[r]` of each rack storage nodes;
    /// nodes are numbered rack by rack.
    pub fn with_racks(sizes: &[u32], storage: &[u32], vm_capacity: u32) -> World {
        let mut nodes = Vec::new();
        let mut index = 0;
        for (rack, size) in sizes.iter().enumerate() {
            let storage_in_rack = storage.get(rack).copied().unwrap_or(0);
            for slot in 0..*size {
                let (epoch_tx, _) = watch::channel(0);
                nodes.push(NodeTruth {
                    index,
                    rack: rack as u32,
                    uuid: NodeUuid::from_index(UUID_NAMESPACE, index as u64),
                    role: if slot < storage_in_rack {
                        Role::Storage
                    } else {
                        Role::Compute
                    },
                    power: Power::Off,
                    os: Os::Off,
                    epoch: 0,
                    epoch_tx,
                    os_down_since: Some(Duration::ZERO),
                    boots_completed: 0,
                    next_boot_pxe: false,
                });
                index += 1;
            }
        }
        let bmcs = vec![BmcState::default(); nodes.len()];
        World {
            nodes,
            vms: BTreeMap::new(),
            vms_assigned: BTreeMap::new(),
            vm_capacity,
            forced_down: BTreeSet::new(),
            bmcs,
            bmc_faults: BmcFaults::default(),
            cloud_outage: false,
            trace: Trace::default(),
            violations: Vec::new(),
            heartbeats_sent: 0,
            heartbeats_failed: 0,
            requests_failed: 0,
            ops_power_cycles: Vec::new(),
            double_runs: Vec::new(),
            racks_without_power: BTreeSet::new(),
            crashes: BTreeMap::new(),
            evacuated_at: BTreeMap::new(),
            daemons: vec!["daemon".to_string()],
            cluster: None,
            stale_actions: Vec::new(),
            actions_judged: 0,
            actions_new: Vec::new(),
            firmware: None,
            off_nodes: BTreeSet::new(),
            drills: Vec::new(),
        }
    }

    /// Clustered runs: an action (`what`) reached the BMC fabric or the cloud at `at` from
    /// host `sender`. A replica may act only while it holds the lease, unexpired, on the
    /// database's clock; anything else is a stale-epoch action. Senders that are not
    /// replicas (the operator's console) are not the controller and are not judged.
    pub fn judge_action(&mut self, sender: Option<String>, what: &str, at: Duration) {
        let Some(db) = &self.cluster else {
            return;
        };
        let Some(sender) = sender.filter(|s| self.daemons.contains(s)) else {
            return;
        };
        self.actions_judged += 1;
        self.trace.record(at, format!("action {sender} {what}"));
        self.actions_new.push(format!("{sender} {what}"));
        let lease = db.lease_at(at);
        let now_ms = crate::run::EPOCH_MS + at.as_millis() as i64;
        let holds = lease
            .as_ref()
            .is_some_and(|l| l.holder == sender && l.expires_at_ms > now_ms);
        if !holds {
            let lease = match lease {
                Some(l) => format!(
                    "{} at epoch {} expiring t={}",
                    l.holder,
                    l.epoch,
                    seconds(Duration::from_millis(
                        (l.expires_at_ms - crate::run::EPOCH_MS).max(0) as u64
                    ))
                ),
                None => "nobody".to_string(),
            };
            let line = format!(
                "t={} {sender} sent {what} while the lease was {lease}",
                seconds(at)
            );
            self.trace.record(at, format!("stale_action {line}"));
            self.stale_actions.push(line);
        }
    }

    /// How many racks the fleet has.
    pub fn racks(&self) -> u32 {
        self.nodes.last().map_or(0, |node| node.rack + 1)
    }

    pub fn node_name(&self, index: u32) -> String {
        let node = &self.nodes[index as usize];
        format!("r{}n{}", node.rack, index)
    }

    fn bump(&mut self, index: u32) {
        let node = &mut self.nodes[index as usize];
        node.epoch += 1;
        node.epoch_tx.send_replace(node.epoch);
        // Whatever the board was flashing stops with its power or OS (it is not rewritten:
        // the simulated flash writes only when it completes).
        if let Some(firmware) = self.firmware.as_mut() {
            if firmware.flashing.remove(&index) {
                firmware.flashes_interrupted += 1;
            }
        }
    }

    /// The machine restarts by itself (stage 1's reboot): power stays on, a new boot
    /// starts.
    pub fn reboot(&mut self, index: u32, now: Duration, why: &str) {
        if self.nodes[index as usize].power != Power::On {
            return;
        }
        self.stop_instances(index, now);
        self.nodes[index as usize].os = Os::Booting;
        self.bump(index);
        let name = self.node_name(index);
        self.trace.record(now, format!("reboot {name} ({why})"));
    }

    /// `index`'s updater starts writing its BIOS; the rollout's caps are judged here, on
    /// the machines themselves.
    pub fn flash_start(&mut self, index: u32, now: Duration) {
        let name = self.node_name(index);
        let rack = self.nodes[index as usize].rack;
        let racks: Vec<u32> = self.nodes.iter().map(|node| node.rack).collect();
        let Some(firmware) = self.firmware.as_mut() else {
            return;
        };
        firmware.flashing.insert(index);
        let now_flashing = firmware.flashing.len();
        let in_rack = firmware
            .flashing
            .iter()
            .filter(|other| racks[**other as usize] == rack)
            .count();
        firmware.most_flashing = firmware.most_flashing.max(now_flashing);
        firmware.most_flashing_in_rack = firmware.most_flashing_in_rack.max(in_rack);
        if now_flashing > firmware.updates_max {
            firmware.violations.push(format!(
                "t={} {name}: {now_flashing} boards flashing at once, more than updates_max {}",
                seconds(now),
                firmware.updates_max
            ));
        }
        if in_rack > firmware.updates_per_rack_max {
            firmware.violations.push(format!(
                "t={} {name}: {in_rack} boards flashing in rack {rack}, more than updates_per_rack_max {}",
                seconds(now),
                firmware.updates_per_rack_max
            ));
        }
        self.trace.record(now, format!("flash_start {name}"));
    }

    /// `index`'s updater finished: the board reads `version` when it succeeded. A flash
    /// its power or OS already cut short ends nothing.
    pub fn flash_end(&mut self, index: u32, now: Duration, written: Option<&str>) {
        let name = self.node_name(index);
        let Some(firmware) = self.firmware.as_mut() else {
            return;
        };
        if !firmware.flashing.remove(&index) {
            return;
        }
        match written {
            Some(version) => {
                firmware.bios[index as usize] = version.to_string();
                firmware.flashes_ok += 1;
                self.trace
                    .record(now, format!("flash_done {name} bios={version}"));
            }
            None => {
                firmware.flashes_failed += 1;
                self.trace.record(now, format!("flash_failed {name}"));
            }
        }
    }

    /// Every VM instance on `index` dies with its OS.
    fn stop_instances(&mut self, index: u32, now: Duration) {
        for vm in self.vms.values_mut() {
            vm.instances.remove(&index);
        }
        let node = &mut self.nodes[index as usize];
        if node.os_down_since.is_none() {
            node.os_down_since = Some(now);
        }
    }

    pub fn power_on(&mut self, index: u32, now: Duration, why: &str) {
        if self.nodes[index as usize].power == Power::On {
            return;
        }
        let node = &mut self.nodes[index as usize];
        node.power = Power::On;
        node.os = Os::Booting;
        self.bump(index);
        let name = self.node_name(index);
        self.trace.record(now, format!("power_on {name} ({why})"));
    }

    pub fn power_off(&mut self, index: u32, now: Duration, why: &str) {
        if self.nodes[index as usize].power == Power::Off {
            return;
        }
        self.stop_instances(index, now);
        let node = &mut self.nodes[index as usize];
        node.power = Power::Off;
        node.os = Os::Off;
        self.bump(index);
        let name = self.node_name(index);
        self.trace.record(now, format!("power_off {name} ({why})"));
    }

    /// Remembers when `index` failed and which VMs ran on it, for the recovery figures.
    fn record_crash(&mut self, index: u32, now: Duration) {
        let running: Vec<u32> = self
            .vms
            .values()
            .filter(|vm| vm.instances.contains(&index))
            .map(|vm| vm.id)
            .collect();
        self.crashes.entry(index).or_default().push((now, running));
    }

    /// Kernel panic: the OS and every VM instance on it stop; power stays on.
    pub fn crash(&mut self, index: u32, now: Duration) {
        if self.nodes[index as usize].os == Os::Off {
            return;
        }
        self.record_crash(index, now);
        self.stop_instances(index, now);
        self.nodes[index as usize].os = Os::Crashed;
        self.bump(index);
        let name = self.node_name(index);
        self.trace.record(now, format!("crash {name}"));
    }

    /// Power supply failure: power goes off (the OS and every VM instance with it) and is
    /// recorded as a crash for the recovery figures. The BMC, on standby power, reads Off.
    pub fn lose_power(&mut self, index: u32, now: Duration) {
        if self.nodes[index as usize].power == Power::Off {
            return;
        }
        self.record_crash(index, now);
        self.power_off(index, now, "power supply failure");
    }

    /// Stage 2 came up on `index` (its epoch must still be current): the hypervisor starts
    /// instances of the VMs assigned to it and, like Nova on start-up, forgets instances
    /// of VMs that were evacuated away while it was down.
    pub fn os_running(&mut self, index: u32, epoch: u64, now: Duration) -> bool {
        let node = &mut self.nodes[index as usize];
        if node.epoch != epoch || node.os != Os::Booting {
            return false;
        }
        node.os = Os::Running;
        node.os_down_since = None;
        node.boots_completed += 1;
        if let Some(firmware) = self.firmware.as_mut() {
            let bios = &firmware.bios[index as usize];
            if *bios != firmware.target {
                let line = format!(
                    "t={} node {index} reached stage 2 on BIOS {bios}, behind its flavor's {}",
                    seconds(now),
                    firmware.target
                );
                firmware.violations.push(line);
            }
        }
        let node = &mut self.nodes[index as usize];
        node.next_boot_pxe = false;
        let mut started = 0;
        let mut doubled = Vec::new();
        // In VM id order, as a scan of every VM would visit them.
        for vm_id in self.vms_assigned.get(&index).into_iter().flatten() {
            let vm = self.vms.get_mut(vm_id).expect("indexed VMs exist");
            if vm.instances.insert(index) {
                started += 1;
                if vm.instances.len() > 1 {
                    doubled.push((vm.id, vm.instances.clone()));
                }
            }
        }
        for (vm, hosts) in doubled {
            self.record_double_run(vm, &hosts, now);
        }
        self.forced_down.remove(&index);
        let name = self.node_name(index);
        self.trace
            .record(now, format!("stage2_up {name} vms_started={started}"));
        true
    }

    /// Places `per_node` VMs on every compute node, in node order.
    pub fn place_vms(&mut self, per_node: u32) {
        let mut id = 0;
        for node in &self.nodes {
            if node.role != Role::Compute || self.off_nodes.contains(&node.index) {
                continue;
            }
            for _ in 0..per_node {
                self.vms.insert(
                    id,
                    VmTruth {
                        id,
                        assigned: node.index,
                        instances: BTreeSet::new(),
                    },
                );
                self.vms_assigned.entry(node.index).or_default().insert(id);
                id += 1;
            }
        }
    }

    /// The VMs the cloud has assigned to `index`, in id order.
    pub fn vms_assigned_to(&self, index: u32) -> impl Iterator<Item = u32> + '_ {
        self.vms_assigned.get(&index).into_iter().flatten().copied()
    }

    /// Whether the cloud considers `index`'s compute service alive.
    pub fn service_alive(&self, index: u32, now: Duration) -> bool {
        if self.forced_down.contains(&index) {
            return false;
        }
        match self.nodes[index as usize].os_down_since {
            None => true,
            Some(since) => now.saturating_sub(since) < SERVICE_DOWN_TIME,
        }
    }

    /// Nova-like evacuation of one VM. Refuses while the source service looks alive
    /// (`ComputeServiceInUse`) unless it was forced down; picks the least-loaded running
    /// compute node with room. Records a violation if the source is not actually off.
    pub fn evacuate(&mut self, vm_id: u32, now: Duration) -> Result<u32, String> {
        let vm = self
            .vms
            .get(&vm_id)
            .ok_or_else(|| format!("no such vm {vm_id}"))?
            .clone();
        let source = vm.assigned;
        if self.service_alive(source, now) {
            return Err(format!(
                "ComputeServiceInUse: compute service on {} is still up",
                self.node_name(source)
            ));
        }
        let load = |index: u32| {
            self.vms_assigned
                .get(&index)
                .map_or(0, |vms| vms.len() as u32)
        };
        let target = self
            .nodes
            .iter()
            .filter(|n| n.role == Role::Compute && n.os == Os::Running && n.index != source)
            .filter(|n| !self.forced_down.contains(&n.index))
            .map(|n| (load(n.index), n.index))
            .filter(|(used, _)| *used < self.vm_capacity)
            .min()
            .map(|(_, index)| index)
            .ok_or_else(|| "NoValidHost: no running compute node has room".to_string())?;
        if self.nodes[source as usize].power != Power::Off {
            let violation = format!(
                "t={} vm {vm_id} evacuated from {} whose power-off was never verified (power {:?}, os {:?})",
                seconds(now),
                self.node_name(source),
                self.nodes[source as usize].power,
                self.nodes[source as usize].os
            );
            self.violations.push(violation);
        }
        self.evacuated_at.insert(vm_id, now);
        let vm = self.vms.get_mut(&vm_id).expect("checked above");
        vm.assigned = target;
        if let Some(on_source) = self.vms_assigned.get_mut(&source) {
            on_source.remove(&vm_id);
        }
        self.vms_assigned.entry(target).or_default().insert(vm_id);
        vm.instances.insert(target);
        if vm.instances.len() > 1 {
            let hosts = vm.instances.clone();
            self.record_double_run(vm_id, &hosts, now);
        }
        let (from, to) = (self.node_name(source), self.node_name(target));
        self.trace
            .record(now, format!("evacuate vm{vm_id} {from} -> {to}"));
        Ok(target)
    }

    fn record_double_run(&mut self, vm: u32, hosts: &BTreeSet<u32>, now: Duration) {
        let names: Vec<String> = hosts.iter().map(|h| self.node_name(*h)).collect();
        let line = format!("t={} vm{vm} runs on {}", seconds(now), names.join(" and "));
        self.trace.record(now, format!("double_run vm{vm}"));
        self.double_runs.push(line);
    }

    /// Counts how many VMs run on more than one host, and how many run nowhere.
    pub fn vm_census(&self) -> (usize, usize) {
        let doubled = self
            .vms
            .values()
            .filter(|vm| vm.instances.len() > 1)
            .count();
        let down = self
            .vms
            .values()
            .filter(|vm| vm.instances.is_empty())
            .count();
        (doubled, down)
    }
}

/// The simulator's node index behind a uuid made by `NodeUuid::from_index(UUID_NAMESPACE, _)`.
pub fn index_of(uuid: &NodeUuid) -> Option<u32> {
    let hex: String = uuid.as_str().chars().filter(|c| *c != '-').collect();
    if u32::from_str_radix(&hex[..8], 16).ok()? != UUID_NAMESPACE {
        return None;
    }
    u32::try_from(u64::from_str_radix(&hex[8..], 16).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world_with_firmware() -> World {
        let mut world = World::new(2, 3, 0, 16);
        for index in 0..6 {
            world.power_on(index, Duration::ZERO, "test");
        }
        world.firmware = Some(FirmwareTruth {
            target: "2.0".into(),
            updates_max: 3,
            updates_per_rack_max: 2,
            bios: vec!["1.0".into(); 6],
            fails: vec![false; 6],
            flashing: BTreeSet::new(),
            flashes_ok: 0,
            flashes_failed: 0,
            flashes_interrupted: 0,
            most_flashing: 0,
            most_flashing_in_rack: 0,
            violations: Vec::new(),
        });
        world
    }

    #[test]
    fn flashing_past_the_rollout_caps_or_booting_behind_is_a_violation() {
        let mut world = world_with_firmware();
        let at = Duration::from_secs(10);
        world.flash_start(0, at);
        world.flash_start(1, at);
        assert!(world.firmware.as_ref().unwrap().violations.is_empty());
        // A third board in rack 0: past updates_per_rack_max.
        world.flash_start(2, at);
        // A fourth board fleet-wide: past updates_max.
        world.flash_start(3, at);
        let truth = world.firmware.as_ref().unwrap();
        assert_eq!(truth.violations.len(), 2, "{:?}", truth.violations);
        assert!(truth.violations[0].contains("in rack 0"));
        assert!(truth.violations[1].contains("more than updates_max 3"));
        assert_eq!((truth.most_flashing, truth.most_flashing_in_rack), (4, 3));

        world.flash_end(0, at, Some("2.0"));
        world.flash_end(1, at, None);
        // Power cut mid-flash: the flash ends with nothing written; a late end is ignored.
        world.power_off(2, at, "test");
        world.flash_end(2, at, Some("2.0"));
        let truth = world.firmware.as_ref().unwrap();
        assert_eq!(truth.bios[0], "2.0");
        assert_eq!(truth.bios[2], "1.0");
        assert_eq!(
            (
                truth.flashes_ok,
                truth.flashes_failed,
                truth.flashes_interrupted
            ),
            (1, 1, 1)
        );

        // Stage 2 on a board still behind its flavor is called out; on one flashed, not.
        let epoch = |world: &World, index: usize| world.nodes[index].epoch;
        let e0 = epoch(&world, 0);
        assert!(world.os_running(0, e0, at));
        let e4 = epoch(&world, 4);
        assert!(world.os_running(4, e4, at));
        let truth = world.firmware.as_ref().unwrap();
        assert_eq!(truth.violations.len(), 3, "{:?}", truth.violations);
        assert!(truth.violations[2].contains("node 4 reached stage 2 on BIOS 1.0"));
    }
}
