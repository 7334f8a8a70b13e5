//! Recovery figures for crashed nodes, read from the daemon's audit trail and the ground
//! truth: time to detect, to a verified fence, until every VM the node ran is running
//! elsewhere, and until the node is Ready again.

use std::time::Duration;

use bearman::core::model::{Action, Event};

use crate::fleet::World;
use crate::run::EPOCH_MS;

/// One crash of one node and how the fleet recovered from it. A node that crashes twice
/// has two: each measures from its own crash, and looks for the daemon's detect, fence and
/// Ready events only until the node's next crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    pub node: String,
    pub crashed_at: Duration,
    pub detected_after: Option<Duration>,
    pub fenced_after: Option<Duration>,
    /// `None` when some VM the node ran never ran elsewhere.
    pub vms_elsewhere_after: Option<Duration>,
    pub vms: usize,
    pub ready_after: Option<Duration>,
    /// When the same node crashed again, counted from this crash.
    pub crashed_again_after: Option<Duration>,
}

impl Recovery {
    /// Cut short: the node crashed again before it was Ready, so its Ready time belongs
    /// to the later crash's recovery.
    pub fn interrupted(&self) -> bool {
        self.ready_after.is_none() && self.crashed_again_after.is_some()
    }
}

fn event_time(event: &Event) -> Duration {
    Duration::from_millis((event.at_ms - EPOCH_MS).max(0) as u64)
}

/// One recovery per crash, by node and then in time order.
pub fn recoveries(world: &World, events: &[Event]) -> Vec<Recovery> {
    let mut out = Vec::new();
    for (index, crashes) in &world.crashes {
        let uuid = &world.nodes[*index as usize].uuid;
        for (nth, (crashed_at, vms)) in crashes.iter().enumerate() {
            let next_crash = crashes.get(nth + 1).map(|(at, _)| *at);
            let after = |action: Action, to_state: Option<&str>| {
                events
                    .iter()
                    .filter(|e| e.node_uuid.as_ref() == Some(uuid))
                    .filter(|e| {
                        e.action == action
                            && (to_state.is_none() || e.to_state.as_deref() == to_state)
                    })
                    .map(event_time)
                    .filter(|at| next_crash.is_none_or(|next| *at < next))
                    .find(|at| at >= crashed_at)
                    .map(|at| at - *crashed_at)
            };
            let mut vms_elsewhere_after = Some(Duration::ZERO);
            for vm in vms {
                let moved = world
                    .evacuated_at
                    .get(vm)
                    .filter(|at| *at >= crashed_at && world.vms[vm].assigned != *index)
                    .map(|at| *at - *crashed_at);
                vms_elsewhere_after = match (vms_elsewhere_after, moved) {
                    (Some(worst), Some(this)) => Some(worst.max(this)),
                    _ => None,
                };
            }
            out.push(Recovery {
                node: world.node_name(*index),
                crashed_at: *crashed_at,
                detected_after: after(Action::HeartbeatsMissed, None),
                fenced_after: after(Action::FenceVerified, None),
                vms_elsewhere_after,
                vms: vms.len(),
                ready_after: after(Action::Installed, Some("ready")),
                crashed_again_after: next_crash.map(|next| next - *crashed_at),
            });
        }
    }
    out
}

/// The `p`-th percentile (0-100) of `values`, nearest-rank; `None` when empty.
pub fn percentile(values: &[Duration], p: u32) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p as usize * sorted.len()).div_ceil(100)).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Fences started: one per remediation that began fencing its node, however many retry
/// rounds an unverifiable fence took (each round records `fence_started` again, with the
/// remediation's id at the head of its reason: "remediation 7 (automatic) step …"). A
/// `fence_started` whose reason names no remediation counts on its own.
pub fn fences_started(events: &[Event]) -> usize {
    let mut remediations = std::collections::BTreeSet::new();
    let mut unnamed = 0;
    for event in events.iter().filter(|e| e.action == Action::FenceStarted) {
        match remediation_id(&event.reason) {
            Some(id) => {
                remediations.insert(id);
            }
            None => unnamed += 1,
        }
    }
    remediations.len() + unnamed
}

/// The remediation id a saga's audit reason starts with.
fn remediation_id(reason: &str) -> Option<i64> {
    reason
        .strip_prefix("remediation ")?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(world: &World, id: i64, at_s: u64, action: Action, to: Option<&str>) -> Event {
        Event {
            id,
            at_ms: EPOCH_MS + at_s as i64 * 1000,
            node_uuid: Some(world.nodes[1].uuid.clone()),
            actor: "system".into(),
            action,
            from_state: None,
            to_state: to.map(str::to_string),
            reason: String::new(),
        }
    }

    #[test]
    fn each_crash_of_a_node_is_its_own_recovery_measured_from_it() {
        let mut world = World::new(1, 3, 0, 8);
        world.place_vms(1);
        for index in 0..3 {
            world.power_on(index, Duration::ZERO, "test");
            let epoch = world.nodes[index as usize].epoch;
            assert!(world.os_running(index, epoch, Duration::from_secs(60)));
        }
        world.crash(1, Duration::from_secs(300));
        world.power_off(1, Duration::from_secs(340), "fence");
        world.forced_down.insert(1);
        world.evacuate(1, Duration::from_secs(350)).unwrap();
        // Rebuilding: booting, and it crashes again in stage 1.
        world.power_on(1, Duration::from_secs(360), "rebuild");
        world.crash(1, Duration::from_secs(420));
        let events = [
            event(&world, 1, 330, Action::HeartbeatsMissed, None),
            event(&world, 2, 345, Action::FenceVerified, None),
            event(&world, 3, 450, Action::HeartbeatsMissed, None),
            event(&world, 4, 600, Action::Installed, Some("ready")),
        ];
        let got = recoveries(&world, &events);
        assert_eq!(got.len(), 2, "{got:?}");
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(
            (
                got[0].detected_after,
                got[0].fenced_after,
                got[0].ready_after
            ),
            (secs(30), secs(45), None)
        );
        assert_eq!(got[0].vms_elsewhere_after, secs(50));
        assert_eq!(got[0].crashed_again_after, secs(120));
        assert!(got[0].interrupted());
        assert_eq!(
            (
                got[1].detected_after,
                got[1].fenced_after,
                got[1].ready_after
            ),
            (secs(30), None, secs(180))
        );
        assert_eq!((got[1].vms, got[1].crashed_again_after), (0, None));
        assert!(!got[1].interrupted());
    }

    #[test]
    fn fence_retry_rounds_count_as_one_fence() {
        let event = |reason: &str| Event {
            id: 0,
            at_ms: 0,
            node_uuid: None,
            actor: "system".into(),
            action: Action::FenceStarted,
            from_state: None,
            to_state: None,
            reason: reason.into(),
        };
        let events = [
            event("remediation 3 (automatic) step power_off"),
            event("remediation 3 (automatic) step power_off"),
            event("remediation 4 (fence) step soft_off"),
            event("by hand"),
        ];
        assert_eq!(fences_started(&events), 3);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_secs).collect();
        assert_eq!(percentile(&values, 50), Some(Duration::from_secs(50)));
        assert_eq!(percentile(&values, 99), Some(Duration::from_secs(99)));
        assert_eq!(percentile(&values[..1], 99), Some(Duration::from_secs(1)));
        assert_eq!(percentile(&[], 50), None);
    }
}
