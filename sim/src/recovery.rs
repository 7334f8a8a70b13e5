//! Recovery figures for crashed nodes, read from the daemon's audit trail and the ground
//! truth: time to detect, to a verified fence, until every VM the node ran is running
//! elsewhere, and until the node is Ready again.

use std::time::Duration;

use bearman::core::model::{Action, Event};

use crate::fleet::World;
use crate::run::EPOCH_MS;

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
}

fn event_time(event: &Event) -> Duration {
    Duration::from_millis((event.at_ms - EPOCH_MS).max(0) as u64)
}

pub fn recoveries(world: &World, events: &[Event]) -> Vec<Recovery> {
    let mut out = Vec::new();
    for (index, (crashed_at, vms)) in &world.crashes {
        let uuid = &world.nodes[*index as usize].uuid;
        let after = |action: Action, to_state: Option<&str>| {
            events
                .iter()
                .filter(|e| e.node_uuid.as_ref() == Some(uuid))
                .filter(|e| {
                    e.action == action && (to_state.is_none() || e.to_state.as_deref() == to_state)
                })
                .map(event_time)
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
        });
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

pub fn fences_started(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| e.action == Action::FenceStarted)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_secs).collect();
        assert_eq!(percentile(&values, 50), Some(Duration::from_secs(50)));
        assert_eq!(percentile(&values, 99), Some(Duration::from_secs(99)));
        assert_eq!(percentile(&values[..1], 99), Some(Duration::from_secs(1)));
        assert_eq!(percentile(&[], 50), None);
    }
}
