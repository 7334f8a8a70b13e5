//! Invariants. Safety properties must hold at every check; liveness properties must hold
//! by the scenario's deadlines, after its faults have healed, and at the end of every run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use bearman::core::lifecycle::{transition, LifecycleEvent, LifecycleState};
use bearman::core::model::IpAllocation;
use bearman::store::memory::MemoryStore;

use crate::fleet::{seconds, Os, Power, World};

#[derive(Clone, Debug, Default)]
pub struct Verdict {
    pub name: &'static str,
    pub kind: &'static str,
    pub failures: Vec<String>,
    pub checks: u64,
}

impl Verdict {
    /// A verdict with no checks yet, for the run to fill.
    pub fn named(name: &'static str, kind: &'static str) -> Self {
        Self::new(name, kind)
    }

    fn new(name: &'static str, kind: &'static str) -> Self {
        Verdict {
            name,
            kind,
            ..Default::default()
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn fail(&mut self, failure: String) {
        // Keep the report readable: the first failures say enough.
        if self.failures.len() < 20 {
            self.failures.push(failure);
        }
    }
}

pub struct Checker {
    pub no_vm_twice: Verdict,
    pub no_vm_lost: Verdict,
    pub vms_placed_at_end: Verdict,
    pub unique_addresses: Verdict,
    pub legal_states: Verdict,
    pub fence_before_evacuate: Verdict,
    pub ready_after_heal: Verdict,
    pub expectations: Verdict,
    /// Clustered runs only: their verdicts (absent, not vacuously passed, otherwise).
    pub cluster: Option<ClusterVerdicts>,
    /// Firmware runs only: no board flashes past the rollout's caps and no node reaches
    /// stage 2 on BIOS behind its flavor, judged on the machines.
    pub firmware: Option<Verdict>,
    /// Runs with drills only: each came to its `expect_outcome`.
    pub drills: Option<Verdict>,
    firmware_violations_seen: usize,
    reported_doubled: BTreeSet<u32>,
    events_seen: i64,
    violations_seen: usize,
    double_runs_seen: usize,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            no_vm_twice: Verdict::new("no VM runs on two hosts", "safety"),
            no_vm_lost: Verdict::new("every VM runs somewhere at each deadline", "liveness"),
            vms_placed_at_end: Verdict::new(
                "every VM runs on exactly one powered host at the end",
                "liveness",
            ),
            unique_addresses: Verdict::new("no address is allocated twice", "safety"),
            legal_states: Verdict::new("every node moves only by legal transitions", "safety"),
            fence_before_evacuate: Verdict::new(
                "nothing evacuated from a host not verified off",
                "safety",
            ),
            ready_after_heal: Verdict::new("every powered node Ready by the deadline", "liveness"),
            cluster: None,
            expectations: Verdict::new(
                "scenario expectations (faults struck, fences, recovery)",
                "expect",
            ),
            firmware: None,
            drills: None,
            firmware_violations_seen: 0,
            reported_doubled: BTreeSet::new(),
            events_seen: 0,
            violations_seen: 0,
            double_runs_seen: 0,
        }
    }
}

/// Whether some event moves `from` to `to`.
fn reachable(from: LifecycleState, to: LifecycleState) -> bool {
    LifecycleEvent::ALL
        .iter()
        .any(|event| transition(from, *event) == Ok(to))
}

impl Checker {
    pub fn verdicts(&self) -> Vec<&Verdict> {
        let mut verdicts = vec![
            &self.expectations,
            &self.no_vm_twice,
            &self.fence_before_evacuate,
            &self.unique_addresses,
            &self.legal_states,
            &self.ready_after_heal,
            &self.no_vm_lost,
            &self.vms_placed_at_end,
        ];
        if let Some(firmware) = &self.firmware {
            verdicts.push(firmware);
        }
        if let Some(drills) = &self.drills {
            verdicts.push(drills);
        }
        if let Some(cluster) = &self.cluster {
            verdicts.extend([
                &cluster.one_leader_per_epoch,
                &cluster.no_stale_action,
                &cluster.no_lost_saga,
                &cluster.takeover,
            ]);
        }
        verdicts
    }

    /// Clustered runs, at the end: every lease term had one holder; no replica acted
    /// (a BMC power command, a cloud evacuation or force-down reaching its target)
    /// without holding the lease; no remediation was left active with nobody to finish
    /// it; and after each fault that struck the leader another term began within
    /// `takeover_within_s`.
    pub fn check_cluster(&mut self, input: ClusterEnd<'_>) {
        let mut verdicts = ClusterVerdicts::default();
        verdicts.one_leader_per_epoch.checks = input.grants.len() as u64;
        let mut holders: BTreeMap<i64, &str> = BTreeMap::new();
        let mut last_epoch = 0;
        for grant in input.grants {
            if grant.epoch <= last_epoch {
                verdicts.one_leader_per_epoch.fail(format!(
                    "t={} epoch {} granted to {} after epoch {last_epoch}: epochs must only grow",
                    seconds(grant.at),
                    grant.epoch,
                    grant.holder
                ));
            }
            last_epoch = last_epoch.max(grant.epoch);
            if let Some(other) = holders.insert(grant.epoch, &grant.holder) {
                if other != grant.holder {
                    verdicts.one_leader_per_epoch.fail(format!(
                        "epoch {} granted to both {other} and {}",
                        grant.epoch, grant.holder
                    ));
                }
            }
        }
        verdicts.no_stale_action.checks = input.actions_judged;
        for action in input.stale_actions {
            verdicts.no_stale_action.fail(action.clone());
        }
        verdicts.no_lost_saga.checks = 1;
        for remediation in input.active_at_end {
            verdicts.no_lost_saga.fail(format!(
                "t={} remediation {} of {} still active at step {} (last written under epoch {:?})",
                seconds(input.end),
                remediation.id,
                remediation.node_uuid,
                remediation.step().map_or("none", |step| step.as_str()),
                remediation.epoch
            ));
        }
        for strike in input.strikes {
            // A node-side partition leaves the leader leading: nothing to take over.
            if strike.kind == crate::scenario::FaultKind::PartitionLeaderNodes {
                continue;
            }
            verdicts.takeover.checks += 1;
            let next = input
                .grants
                .iter()
                .find(|g| g.epoch > strike.epoch && g.at >= strike.at);
            let Some(within) = input.takeover_within else {
                continue;
            };
            match next {
                Some(grant) if grant.at - strike.at <= within => {}
                Some(grant) => verdicts.takeover.fail(format!(
                    "{:?} of {} at t={}: epoch {} began {:.1} s later ({}); expected within {} s",
                    strike.kind,
                    strike.victim,
                    seconds(strike.at),
                    grant.epoch,
                    (grant.at - strike.at).as_secs_f64(),
                    grant.holder,
                    within.as_secs()
                )),
                None => verdicts.takeover.fail(format!(
                    "{:?} of {} at t={}: no newer lease term began",
                    strike.kind,
                    strike.victim,
                    seconds(strike.at)
                )),
            }
        }
        self.cluster = Some(verdicts);
    }

    pub fn all_passed(&self) -> bool {
        self.verdicts().iter().all(|v| v.passed())
    }

    /// Safety checks run after every simulation step. The world records double runs and
    /// unverified evacuations at the moment they happen, and the daemon's new audit events
    /// are replayed against the lifecycle, so each step costs only what changed.
    pub fn check_step(&mut self, world: &World, store: &MemoryStore, now: Duration) {
        if let (Some(verdict), Some(truth)) = (self.firmware.as_mut(), world.firmware.as_ref()) {
            verdict.checks += 1;
            for violation in &truth.violations[self.firmware_violations_seen..] {
                verdict.fail(violation.clone());
            }
            self.firmware_violations_seen = truth.violations.len();
        }
        self.no_vm_twice.checks += 1;
        for failure in &world.double_runs[self.double_runs_seen..] {
            self.no_vm_twice.fail(failure.clone());
        }
        self.double_runs_seen = world.double_runs.len();
        self.fence_before_evacuate.checks += 1;
        for violation in &world.violations[self.violations_seen..] {
            self.fence_before_evacuate.fail(violation.clone());
        }
        self.violations_seen = world.violations.len();
        self.legal_states.checks += 1;
        for event in store.events_after(self.events_seen) {
            self.events_seen = event.id;
            let (Some(from), Some(to)) = (&event.from_state, &event.to_state) else {
                continue;
            };
            match (LifecycleState::parse(from), LifecycleState::parse(to)) {
                (Some(from_state), Some(to_state))
                    if reachable(from_state, to_state) || from_state == to_state => {}
                _ => self.legal_states.fail(format!(
                    "t={} event {} moved {} from {from} to {to}",
                    seconds(now),
                    event.id,
                    event
                        .node_uuid
                        .as_ref()
                        .map(|u| u.to_string())
                        .unwrap_or_default()
                )),
            }
        }
    }

    /// Full scans, run every few simulated seconds: the VM census over the ground truth
    /// (a second line of defence behind the per-step record) and the daemon's address
    /// allocations.
    pub fn check_scan(&mut self, world: &World, store: &MemoryStore, now: Duration) {
        for vm in world.vms.values() {
            if vm.instances.len() > 1
                && self.reported_doubled.insert(vm.id)
                && world.double_runs.is_empty()
            {
                let hosts: Vec<String> = vm.instances.iter().map(|h| world.node_name(*h)).collect();
                self.no_vm_twice.fail(format!(
                    "t={} vm{} runs on {} (found by scan)",
                    seconds(now),
                    vm.id,
                    hosts.join(" and ")
                ));
            }
        }
        let allocations = store.allocations();
        self.unique_addresses.checks += 1;
        // Sorted by address, parsed (a string-keyed map of the whole fleet's addresses
        // was most of this scan); the sort is stable, so holders pair up in
        // allocation order. Text that is no address sorts after every address.
        let mut held: Vec<(Result<IpAddr, &str>, &IpAllocation)> = allocations
            .iter()
            .map(|allocation| {
                let address = &allocation.address;
                (address.parse().map_err(|_| address.as_str()), allocation)
            })
            .collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        for pair in held.windows(2) {
            let ((first_key, first), (second_key, second)) = (&pair[0], &pair[1]);
            if first_key == second_key {
                self.unique_addresses.fail(format!(
                    "t={} {} is held by {} and {}",
                    seconds(now),
                    second.address,
                    first.node_uuid,
                    second.node_uuid
                ));
            }
        }
    }

    /// Liveness at the deadline: every node with power and a live OS path is Ready in the
    /// daemon, and every VM runs somewhere.
    pub fn check_deadline(&mut self, world: &World, store: &MemoryStore, now: Duration) {
        self.ready_after_heal.checks += 1;
        let snapshot = store.snapshot();
        let states: BTreeMap<&str, LifecycleState> = snapshot
            .nodes
            .iter()
            .map(|n| (n.uuid.as_str(), n.state))
            .collect();
        let mut not_ready = Vec::new();
        for node in &world.nodes {
            if node.power != Power::On || node.os == Os::Crashed {
                continue;
            }
            // A board behind its flavor's BIOS is the firmware rollout's to hold (it may
            // not boot on old firmware); the firmware verdicts judge it.
            if world
                .firmware
                .as_ref()
                .is_some_and(|truth| truth.bios[node.index as usize] != truth.target)
            {
                continue;
            }
            let state = states.get(node.uuid.as_str()).copied();
            if state != Some(LifecycleState::Ready) || node.os != Os::Running {
                not_ready.push(format!(
                    "{} (daemon: {}, machine: {:?})",
                    world.node_name(node.index),
                    state.map_or("unknown", LifecycleState::as_str),
                    node.os
                ));
            }
        }
        if !not_ready.is_empty() {
            let shown: Vec<String> = not_ready.iter().take(10).cloned().collect();
            self.ready_after_heal.fail(format!(
                "t={} {} powered node(s) not Ready: {}{}",
                seconds(now),
                not_ready.len(),
                shown.join(", "),
                if not_ready.len() > 10 { ", …" } else { "" }
            ));
        }
        self.no_vm_lost.checks += 1;
        let lost: Vec<u32> = world
            .vms
            .values()
            .filter(|vm| vm.instances.is_empty())
            .map(|vm| vm.id)
            .collect();
        if !lost.is_empty() {
            self.no_vm_lost.fail(format!(
                "t={} {} VM(s) run nowhere, e.g. vm{}",
                seconds(now),
                lost.len(),
                lost[0]
            ));
        }
    }
}

impl Checker {
    /// Firmware runs, at the end: the scenario's firmware expectations against the
    /// daemon's rollout record and its nodes' inventories.
    pub fn check_firmware_end(
        &mut self,
        expect: &crate::scenario::Expect,
        rollout: &bearman::core::firmware::FirmwareRollout,
        flashed: u64,
    ) {
        self.expectations.checks += 1;
        if let Some(paused) = expect.firmware_rollout_paused {
            if rollout.paused.is_some() != paused {
                self.expectations.fail(format!(
                    "firmware rollout {} at the end; expected {}",
                    match &rollout.paused {
                        Some(pause) => format!("paused by {}: {}", pause.by, pause.reason),
                        None => "running".to_string(),
                    },
                    if paused { "paused" } else { "running" }
                ));
            }
        }
        if let Some(min) = expect.firmware_flashed_min {
            if flashed < min {
                self.expectations.fail(format!(
                    "{flashed} node(s) recorded flashed by the daemon; expected at least {min}"
                ));
            }
        }
    }

    /// Liveness at the end of every run, whatever the deadlines: each VM runs on exactly
    /// one host, and that host is powered on with its OS running. At most `down_allowed`
    /// VMs may run nowhere (`expect.vms_down_allowed`); a VM on two hosts always fails.
    pub fn check_end(&mut self, world: &World, down_allowed: u64, now: Duration) {
        self.vms_placed_at_end.checks += 1;
        let mut down = Vec::new();
        let mut doubled = Vec::new();
        for vm in world.vms.values() {
            let live: Vec<u32> = vm
                .instances
                .iter()
                .copied()
                .filter(|host| {
                    let node = &world.nodes[*host as usize];
                    node.power == Power::On && node.os == Os::Running
                })
                .collect();
            let assigned = world.node_name(vm.assigned);
            if vm.instances.len() > 1 {
                let hosts: Vec<String> = vm.instances.iter().map(|h| world.node_name(*h)).collect();
                doubled.push(format!("vm{} on {}", vm.id, hosts.join(" and ")));
            } else if live.len() != 1 {
                let node = &world.nodes[vm.assigned as usize];
                down.push(format!(
                    "vm{} (assigned {assigned}: power {:?}, os {:?})",
                    vm.id, node.power, node.os
                ));
            }
        }
        if down.len() as u64 > down_allowed {
            let shown: Vec<String> = down.iter().take(5).cloned().collect();
            self.vms_placed_at_end.fail(format!(
                "t={} {} VM(s) run on no powered, running host ({} allowed): {}{}",
                seconds(now),
                down.len(),
                down_allowed,
                shown.join(", "),
                if down.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
        if !doubled.is_empty() {
            let shown: Vec<String> = doubled.iter().take(5).cloned().collect();
            self.vms_placed_at_end.fail(format!(
                "t={} {} VM(s) run on more than one host: {}{}",
                seconds(now),
                doubled.len(),
                shown.join(", "),
                if doubled.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ));
        }
    }

    /// The scenario's own expectations about its faults, fences and recovery, judged at
    /// the end. `fault_problems` are faults that did not strike as written (a
    /// `when_event` that never matched, a strike that hit no node).
    pub fn check_expectations(
        &mut self,
        scenario: &crate::scenario::Scenario,
        recoveries: &[crate::recovery::Recovery],
        fences: usize,
        fault_problems: &[String],
    ) {
        let expect = &scenario.expect;
        self.expectations.checks += 1;
        for problem in fault_problems {
            self.expectations.fail(problem.clone());
        }
        if let Some(max) = expect.fences_max {
            if fences as u64 > max {
                self.expectations
                    .fail(format!("{fences} fence(s) started; at most {max} expected"));
            }
        }
        for recovery in recoveries {
            if let Some(within) = expect.vms_elsewhere_within_s {
                match recovery.vms_elsewhere_after {
                    Some(after) if after <= Duration::from_secs(within) => {}
                    Some(after) => self.expectations.fail(format!(
                        "{}: VMs running elsewhere {:.1} s after the crash; expected within {within} s",
                        recovery.node,
                        after.as_secs_f64()
                    )),
                    None => self.expectations.fail(format!(
                        "{}: some of its {} VM(s) never ran elsewhere",
                        recovery.node, recovery.vms
                    )),
                }
            }
            if let Some(within) = expect.vms_elsewhere_after_heal_within_s {
                let heal = Duration::from_secs(scenario.last_heal_s().unwrap_or(0));
                let deadline = heal + Duration::from_secs(within);
                match recovery.vms_elsewhere_after {
                    Some(after) if recovery.crashed_at + after <= deadline => {}
                    Some(after) => self.expectations.fail(format!(
                        "{}: VMs running elsewhere {:.1} s after the last heal (t={}); expected within {within} s",
                        recovery.node,
                        (recovery.crashed_at + after).saturating_sub(heal).as_secs_f64(),
                        heal.as_secs()
                    )),
                    None => self.expectations.fail(format!(
                        "{}: some of its {} VM(s) never ran elsewhere; expected within {within} s of the last heal (t={})",
                        recovery.node,
                        recovery.vms,
                        heal.as_secs()
                    )),
                }
            }
            // A recovery cut short by the node's next crash is judged by that crash's.
            if recovery.interrupted() {
                continue;
            }
            if let Some(within) = expect.crashed_ready_within_s {
                match recovery.ready_after {
                    Some(after) if after <= Duration::from_secs(within) => {}
                    other => self.expectations.fail(format!(
                        "{}: Ready again {}; expected within {within} s of the crash at t={:.1}",
                        recovery.node,
                        other.map_or("never".to_string(), |a| format!(
                            "after {:.1} s",
                            a.as_secs_f64()
                        )),
                        recovery.crashed_at.as_secs_f64(),
                    )),
                }
            }
        }
    }
}

/// The clustered-run verdicts.
#[derive(Clone, Debug)]
pub struct ClusterVerdicts {
    pub one_leader_per_epoch: Verdict,
    pub no_stale_action: Verdict,
    pub no_lost_saga: Verdict,
    pub takeover: Verdict,
}

impl Default for ClusterVerdicts {
    fn default() -> Self {
        ClusterVerdicts {
            one_leader_per_epoch: Verdict::new("at most one leader per epoch", "safety"),
            no_stale_action: Verdict::new(
                "no BMC power action or evacuation without the lease",
                "safety",
            ),
            no_lost_saga: Verdict::new("no remediation left active at the end", "liveness"),
            takeover: Verdict::new(
                "a new leader after each fault that struck the leader",
                "liveness",
            ),
        }
    }
}

/// What the cluster verdicts judge at the end of a clustered run.
pub struct ClusterEnd<'a> {
    pub grants: &'a [crate::db::Grant],
    pub stale_actions: &'a [String],
    pub actions_judged: u64,
    pub active_at_end: &'a [bearman::core::remediation::Remediation],
    pub strikes: &'a [crate::run::LeaderStrike],
    pub takeover_within: Option<Duration>,
    pub end: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three compute nodes, two VMs each, all running.
    fn running_world() -> World {
        let mut world = World::new(1, 3, 0, 8);
        world.place_vms(2);
        for index in 0..3 {
            world.power_on(index, Duration::ZERO, "test");
            let epoch = world.nodes[index as usize].epoch;
            assert!(world.os_running(index, epoch, Duration::from_secs(60)));
        }
        world
    }

    #[test]
    fn the_end_check_counts_vms_on_a_dead_host_against_the_allowance() {
        let mut world = running_world();
        let mut checker = Checker::default();
        checker.check_end(&world, 0, Duration::from_secs(900));
        assert!(checker.vms_placed_at_end.passed());

        world.crash(1, Duration::from_secs(300));
        let mut checker = Checker::default();
        checker.check_end(&world, 0, Duration::from_secs(900));
        assert_eq!(
            checker.vms_placed_at_end.failures,
            [
                "t=900.000 2 VM(s) run on no powered, running host (0 allowed): \
              vm2 (assigned r0n1: power On, os Crashed), vm3 (assigned r0n1: power On, os Crashed)"
            ]
        );
        let mut checker = Checker::default();
        checker.check_end(&world, 2, Duration::from_secs(900));
        assert!(checker.vms_placed_at_end.passed(), "two down are allowed");
    }

    #[test]
    fn the_end_check_fails_a_vm_on_two_hosts_whatever_the_allowance() {
        let mut world = running_world();
        world.vms.get_mut(&0).unwrap().instances.insert(2);
        let mut checker = Checker::default();
        checker.check_end(&world, 6, Duration::from_secs(900));
        assert_eq!(
            checker.vms_placed_at_end.failures,
            ["t=900.000 1 VM(s) run on more than one host: vm0 on r0n0 and r0n2"]
        );
    }
}
