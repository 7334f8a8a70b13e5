//! Health judgement: which nodes have gone silent, and whether silence means the nodes
//! died or that we (or a top-of-rack switch) were cut off from them.
//!
//! Kubernetes evicting every pod when the control plane lost its network
//! (kubernetes/kubernetes #24597, #28832) is the failure this module exists to prevent:
//! when much of one rack goes silent together, suspect the switch and pause fencing there;
//! when most of the fleet goes silent, suspect ourselves and stop fencing everywhere.

use std::collections::{BTreeMap, BTreeSet};

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::lifecycle::LifecycleState;
use super::model::{Node, TimestampMs};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// A node whose last heartbeat is older than this is silent.
    pub heartbeat_grace_ms: i64,
    /// Pause automatic fencing in a rack when at least this fraction of its monitored
    /// nodes is silent (a ToR failure is not forty dead nodes).
    pub rack_silent_fraction_max: f64,
    /// ... provided the rack has at least this many monitored nodes.
    pub rack_nodes_min: usize,
    /// Stop all automatic fencing when at least this fraction of the monitored fleet is
    /// silent: we are the ones cut off.
    pub fleet_silent_fraction_max: f64,
    /// ... provided the fleet has at least this many monitored nodes.
    pub fleet_nodes_min: usize,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat_grace_ms: 25_000,
            rack_silent_fraction_max: 0.3,
            rack_nodes_min: 4,
            fleet_silent_fraction_max: 0.5,
            fleet_nodes_min: 4,
        }
    }
}

/// Whether a node in this state is expected to heartbeat.
pub fn is_monitored(state: LifecycleState) -> bool {
    matches!(state, LifecycleState::Ready | LifecycleState::Suspect)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RackHealth {
    pub monitored: usize,
    pub silent: usize,
    /// Automatic fencing is paused in this rack.
    pub fencing_paused: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Ready nodes that went silent: move them to Suspect.
    pub newly_silent: Vec<NodeUuid>,
    /// Silent nodes automatic fencing may act on (not in a paused rack, fleet not stopped).
    pub fenceable: Vec<NodeUuid>,
    pub racks: BTreeMap<String, RackHealth>,
    pub monitored: usize,
    pub silent: usize,
    /// All automatic fencing is stopped.
    pub fleet_fencing_stopped: bool,
}

fn is_silent(node: &Node, now_ms: TimestampMs, grace_ms: i64) -> bool {
    // A node that never heartbeated counts from when it reported installed.
    let last = node
        .last_heartbeat_at_ms
        .or(node.installed_at_ms)
        .unwrap_or(node.updated_at_ms);
    now_ms - last > grace_ms
}

/// Judges the fleet at `now_ms`. Nodes without a rack form the rack "".
pub fn judge(nodes: &[Node], now_ms: TimestampMs, config: &HealthConfig) -> Judgement {
    let mut judgement = Judgement::default();
    let mut silent_nodes: Vec<(&Node, String)> = Vec::new();
    for node in nodes.iter().filter(|n| is_monitored(n.state)) {
        let rack = node.rack.clone().unwrap_or_default();
        let entry = judgement.racks.entry(rack.clone()).or_default();
        entry.monitored += 1;
        judgement.monitored += 1;
        if is_silent(node, now_ms, config.heartbeat_grace_ms) {
            entry.silent += 1;
            judgement.silent += 1;
            if node.state == LifecycleState::Ready {
                judgement.newly_silent.push(node.uuid.clone());
            }
            silent_nodes.push((node, rack));
        }
    }
    for rack in judgement.racks.values_mut() {
        rack.fencing_paused = rack.monitored >= config.rack_nodes_min
            && rack.silent as f64 >= config.rack_silent_fraction_max * rack.monitored as f64;
    }
    judgement.fleet_fencing_stopped = judgement.monitored >= config.fleet_nodes_min
        && judgement.silent as f64 >= config.fleet_silent_fraction_max * judgement.monitored as f64;
    if !judgement.fleet_fencing_stopped {
        let paused: BTreeSet<&String> = judgement
            .racks
            .iter()
            .filter(|(_, r)| r.fencing_paused)
            .map(|(name, _)| name)
            .collect();
        judgement.fenceable = silent_nodes
            .iter()
            .filter(|(_, rack)| !paused.contains(rack))
            .map(|(node, _)| node.uuid.clone())
            .collect();
    }
    judgement
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::NodeRole;

    fn node(index: u64, rack: &str, state: LifecycleState, last_heartbeat_at_ms: i64) -> Node {
        let mut node = Node::new(
            NodeUuid::from_index(9, index),
            format!("n{index}"),
            NodeRole::Compute,
            0,
        );
        node.rack = Some(rack.into());
        node.state = state;
        node.last_heartbeat_at_ms = Some(last_heartbeat_at_ms);
        node
    }

    fn fleet(racks: usize, per_rack: usize) -> Vec<Node> {
        (0..racks * per_rack)
            .map(|i| {
                node(
                    i as u64,
                    &format!("r{}", i / per_rack),
                    LifecycleState::Ready,
                    100_000,
                )
            })
            .collect()
    }

    #[test]
    fn one_silent_node_is_suspected_and_fenceable() {
        let mut nodes = fleet(2, 10);
        nodes[3].last_heartbeat_at_ms = Some(50_000);
        let judgement = judge(&nodes, 100_000, &HealthConfig::default());
        assert_eq!(judgement.newly_silent, vec![nodes[3].uuid.clone()]);
        assert_eq!(judgement.fenceable, vec![nodes[3].uuid.clone()]);
        assert!(!judgement.fleet_fencing_stopped);
        assert!(!judgement.racks["r0"].fencing_paused);
    }

    #[test]
    fn a_silent_rack_pauses_fencing_there_only() {
        let mut nodes = fleet(3, 10);
        for node in nodes.iter_mut().filter(|n| n.rack.as_deref() == Some("r1")) {
            node.last_heartbeat_at_ms = Some(10_000);
        }
        nodes[0].last_heartbeat_at_ms = Some(10_000);
        let judgement = judge(&nodes, 100_000, &HealthConfig::default());
        assert!(judgement.racks["r1"].fencing_paused);
        assert_eq!(
            judgement.newly_silent.len(),
            11,
            "all silent nodes are still suspected"
        );
        assert_eq!(
            judgement.fenceable,
            vec![nodes[0].uuid.clone()],
            "only the lone r0 node may be fenced"
        );
    }

    #[test]
    fn losing_most_of_the_fleet_stops_all_fencing() {
        let mut nodes = fleet(4, 10);
        for node in nodes.iter_mut().take(25) {
            node.last_heartbeat_at_ms = Some(10_000);
        }
        let judgement = judge(&nodes, 100_000, &HealthConfig::default());
        assert!(judgement.fleet_fencing_stopped);
        assert!(judgement.fenceable.is_empty());
    }

    #[test]
    fn nodes_not_expected_to_heartbeat_are_ignored() {
        let mut nodes = fleet(1, 5);
        nodes[0].state = LifecycleState::Maintenance;
        nodes[0].last_heartbeat_at_ms = Some(0);
        nodes[1].state = LifecycleState::Provisioning;
        nodes[1].last_heartbeat_at_ms = None;
        let judgement = judge(&nodes, 100_000, &HealthConfig::default());
        assert_eq!(judgement.monitored, 3);
        assert!(judgement.newly_silent.is_empty());
    }
}
