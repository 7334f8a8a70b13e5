//! Invariants. Safety properties must hold at every check; liveness properties must hold
//! by the scenario's deadline, after its faults have healed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bearman::core::lifecycle::{transition, LifecycleEvent, LifecycleState};
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

    fn fail(&mut self, failure: String) {
        // Keep the report readable: the first failures say enough.
        if self.failures.len() < 20 {
            self.failures.push(failure);
        }
    }
}

pub struct Checker {
    pub no_vm_twice: Verdict,
    pub no_vm_lost: Verdict,
    pub unique_addresses: Verdict,
    pub legal_states: Verdict,
    pub fence_before_evacuate: Verdict,
    pub ready_after_heal: Verdict,
    pub expectations: Verdict,
    reported_doubled: BTreeSet<u32>,
    events_seen: i64,
    violations_seen: usize,
    double_runs_seen: usize,
}

impl Default for Checker {
    fn default() -> Self {
        Checker {
            no_vm_twice: Verdict::new("no VM runs on two hosts", "safety"),
            no_vm_lost: Verdict::new("no VM is lost", "liveness"),
            unique_addresses: Verdict::new("no address is allocated twice", "safety"),
            legal_states: Verdict::new("every node moves only by legal transitions", "safety"),
            fence_before_evacuate: Verdict::new(
                "nothing evacuated from a host not verified off",
                "safety",
            ),
            ready_after_heal: Verdict::new("every powered node Ready by the deadline", "liveness"),
            expectations: Verdict::new("scenario expectations (fences, recovery times)", "expect"),
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
    pub fn verdicts(&self) -> [&Verdict; 7] {
        [
            &self.expectations,
            &self.no_vm_twice,
            &self.fence_before_evacuate,
            &self.unique_addresses,
            &self.legal_states,
            &self.ready_after_heal,
            &self.no_vm_lost,
        ]
    }

    pub fn all_passed(&self) -> bool {
        self.verdicts().iter().all(|v| v.passed())
    }

    /// Safety checks run after every simulation step. The world records double runs and
    /// unverified evacuations at the moment they happen, and the daemon's new audit events
    /// are replayed against the lifecycle, so each step costs only what changed.
    pub fn check_step(&mut self, world: &World, store: &MemoryStore, now: Duration) {
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
        let snapshot = store.snapshot();
        self.unique_addresses.checks += 1;
        let mut owners: BTreeMap<&str, &str> = BTreeMap::new();
        for allocation in &snapshot.allocations {
            if let Some(other) = owners.insert(&allocation.address, allocation.node_uuid.as_str()) {
                self.unique_addresses.fail(format!(
                    "t={} {} is held by {} and {}",
                    seconds(now),
                    allocation.address,
                    other,
                    allocation.node_uuid
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
    /// The scenario's own expectations about fences and recovery, judged at the end.
    pub fn check_expectations(
        &mut self,
        expect: &crate::scenario::Expect,
        recoveries: &[crate::recovery::Recovery],
        fences: usize,
    ) {
        self.expectations.checks += 1;
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
            if let Some(within) = expect.crashed_ready_within_s {
                match recovery.ready_after {
                    Some(after) if after <= Duration::from_secs(within) => {}
                    other => self.expectations.fail(format!(
                        "{}: Ready again {}; expected within {within} s of the crash",
                        recovery.node,
                        other.map_or("never".to_string(), |a| format!(
                            "after {:.1} s",
                            a.as_secs_f64()
                        ))
                    )),
                }
            }
        }
    }
}
