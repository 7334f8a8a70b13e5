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
use super::power_sync::{self, PowerReading};
use super::validate::InvalidSetting;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// A node whose last heartbeat is older than this is silent (and becomes Suspect).
    pub heartbeat_grace_ms: i64,
    /// A silent node may be fenced only after it has been silent this much longer. The
    /// nodes behind a failed switch stop heartbeating within one heartbeat interval of
    /// each other; waiting longer than that lets the rack guard see all of them before
    /// the first is fenced.
    pub fence_confirm_ms: i64,
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
    /// A pause (rack) or stop (fleet) holds this long after its condition last held.
    /// As a partition heals or power returns, nodes come back one by one; without the
    /// hold, the last few still-silent nodes of a recovering rack would look like lone
    /// deaths and be fenced.
    pub pause_hold_ms: i64,
    /// Each monitored node's BMC is asked for its power state at most this often (spread
    /// over the interval by uuid); 0 disables power sync. A node that should be running
    /// whose BMC reads Off is dead for certain and skips `fence_confirm_ms` (see
    /// `core::power_sync`).
    pub power_poll_interval_ms: i64,
    /// A node not heard from for this long is polled out of turn (once per silence), so
    /// its reading is in by the time the heartbeat grace runs out. Above the heartbeat interval plus its jitter (10 s + 2 s by default), so
    /// healthy nodes are not polled on every heartbeat.
    pub power_check_silence_ms: i64,
}

/// When each guard last tripped: the memory that gives the guards their hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardHistory {
    pub rack_paused_at_ms: BTreeMap<String, TimestampMs>,
    pub fleet_stopped_at_ms: Option<TimestampMs>,
}

impl GuardHistory {
    /// Remembers what `judgement` tripped at `now_ms`.
    pub fn record(&mut self, judgement: &Judgement, now_ms: TimestampMs) {
        for (rack, health) in &judgement.racks {
            if health.fencing_paused_now {
                self.rack_paused_at_ms.insert(rack.clone(), now_ms);
            }
        }
        if judgement.fleet_stopped_now {
            self.fleet_stopped_at_ms = Some(now_ms);
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat_grace_ms: 20_000,
            fence_confirm_ms: 14_000,
            rack_silent_fraction_max: 0.3,
            rack_nodes_min: 4,
            fleet_silent_fraction_max: 0.5,
            fleet_nodes_min: 4,
            pause_hold_ms: 60_000,
            power_poll_interval_ms: 60_000,
            power_check_silence_ms: 13_000,
        }
    }
}

impl HealthConfig {
    /// Rejects settings that would disable a guard by accident or make the judgement
    /// meaningless; the message names the key (under `[remediation.health]`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let positive = |key: &str, value: i64, max: i64| {
            if value <= 0 || value > max {
                Err(InvalidSetting::new(
                    format!("health.{key}"),
                    format!("{value} is outside 1-{max}"),
                ))
            } else {
                Ok(())
            }
        };
        positive("heartbeat_grace_ms", self.heartbeat_grace_ms, 3_600_000)?;
        if !(0..=3_600_000).contains(&self.fence_confirm_ms) {
            return Err(InvalidSetting::new(
                "health.fence_confirm_ms",
                format!("{} is outside 0-3600000", self.fence_confirm_ms),
            ));
        }
        positive("pause_hold_ms", self.pause_hold_ms, 86_400_000)?;
        for (key, fraction) in [
            ("rack_silent_fraction_max", self.rack_silent_fraction_max),
            ("fleet_silent_fraction_max", self.fleet_silent_fraction_max),
        ] {
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(InvalidSetting::new(
                    format!("health.{key}"),
                    format!("{fraction} is outside (0, 1]"),
                ));
            }
        }
        if self.power_poll_interval_ms != 0
            && !(1_000..=86_400_000).contains(&self.power_poll_interval_ms)
        {
            return Err(InvalidSetting::new(
                "health.power_poll_interval_ms",
                format!(
                    "{} must be 0 (power sync off) or 1000-86400000",
                    self.power_poll_interval_ms
                ),
            ));
        }
        if self.power_check_silence_ms <= 0 || self.power_check_silence_ms > self.heartbeat_grace_ms
        {
            return Err(InvalidSetting::new(
                "health.power_check_silence_ms", format!("{} must be above 0 and at most health.heartbeat_grace_ms ({}): the reading must be in before the grace runs out",
                self.power_check_silence_ms, self.heartbeat_grace_ms
            )));
        }
        Ok(())
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
    /// The rack meets the pause condition right now.
    pub fencing_paused_now: bool,
    /// Automatic fencing is paused in this rack (now, or within the hold).
    pub fencing_paused: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// Ready nodes that went silent: move them to Suspect.
    pub newly_silent: Vec<NodeUuid>,
    /// Silent nodes automatic fencing may act on (not in a paused rack, fleet not stopped).
    pub fenceable: Vec<NodeUuid>,
    /// Silent nodes whose BMC reads Off, outside any rack- or fleet-wide silence: dead for
    /// certain, fenceable without waiting out `fence_confirm_ms` (guards permitting).
    pub power_confirmed: Vec<NodeUuid>,
    pub racks: BTreeMap<String, RackHealth>,
    pub monitored: usize,
    pub silent: usize,
    /// The fleet meets the stop condition right now.
    pub fleet_stopped_now: bool,
    /// All automatic fencing is stopped (now, or within the hold).
    pub fleet_fencing_stopped: bool,
}

/// What health judgement needs of a node: a light record, cheap to list every tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub uuid: NodeUuid,
    pub rack: Option<String>,
    pub state: LifecycleState,
    /// When the node was last heard from (heartbeat; for one that never heartbeated,
    /// when it reported installed or was last updated).
    pub last_heard_at_ms: TimestampMs,
    /// The last BMC power reading (power sync), if any.
    pub power: Option<PowerReading>,
}

impl NodeHealth {
    pub fn of(node: &Node) -> Self {
        NodeHealth {
            uuid: node.uuid.clone(),
            rack: node.rack.clone(),
            state: node.state,
            last_heard_at_ms: node
                .last_heartbeat_at_ms
                .or(node.installed_at_ms)
                .unwrap_or(node.updated_at_ms),
            power: None,
        }
    }
}

pub fn judge(
    nodes: &[NodeHealth],
    now_ms: TimestampMs,
    config: &HealthConfig,
    history: &GuardHistory,
) -> Judgement {
    let mut judgement = Judgement::default();
    let mut silent_nodes: Vec<(&NodeHealth, &str, i64)> = Vec::new();
    // The controller judges every node every tick. Tallies go to a slot per rack, found
    // by name once per run of nodes in the same rack (lists come in rack order when the
    // store keeps them so, and the lookup borrows the name): string lookups per node
    // were most of this loop's cost.
    let mut slots: BTreeMap<&str, usize> = BTreeMap::new();
    let mut tallies: Vec<(&str, RackHealth)> = Vec::new();
    let mut current: Option<(&str, usize)> = None;
    for node in nodes.iter().filter(|n| is_monitored(n.state)) {
        let rack = node.rack.as_deref().unwrap_or_default();
        let slot = match current {
            Some((name, slot)) if name == rack => slot,
            _ => {
                let slot = *slots.entry(rack).or_insert_with(|| {
                    tallies.push((rack, RackHealth::default()));
                    tallies.len() - 1
                });
                current = Some((rack, slot));
                slot
            }
        };
        let entry = &mut tallies[slot].1;
        entry.monitored += 1;
        judgement.monitored += 1;
        let silence = now_ms - node.last_heard_at_ms;
        if silence > config.heartbeat_grace_ms {
            entry.silent += 1;
            judgement.silent += 1;
            if node.state == LifecycleState::Ready {
                judgement.newly_silent.push(node.uuid.clone());
            }
            silent_nodes.push((node, rack, silence));
        }
    }
    judgement.racks = tallies
        .into_iter()
        .map(|(name, health)| (name.to_string(), health))
        .collect();
    // A silent node whose BMC reads Off needs no confirmation period; the guards below
    // still decide whether anyone may be fenced at all.
    let power_confirmed: Vec<NodeUuid> = if config.power_poll_interval_ms > 0
        && silent_nodes.iter().any(|(n, _, _)| n.power.is_some())
    {
        let heard = power_sync::HeardIndex::new(nodes);
        silent_nodes
            .iter()
            .filter(|(node, _, _)| power_sync::confirmed_off(node, &heard, config))
            .map(|(node, _, _)| node.uuid.clone())
            .collect()
    } else {
        Vec::new()
    };
    let held = |tripped_at: Option<&TimestampMs>| {
        tripped_at.is_some_and(|at| now_ms - at < config.pause_hold_ms)
    };
    for (name, rack) in judgement.racks.iter_mut() {
        rack.fencing_paused_now = rack.monitored >= config.rack_nodes_min
            && rack.silent as f64 >= config.rack_silent_fraction_max * rack.monitored as f64;
        rack.fencing_paused = rack.fencing_paused_now || held(history.rack_paused_at_ms.get(name));
    }
    judgement.fleet_stopped_now = judgement.monitored >= config.fleet_nodes_min
        && judgement.silent as f64 >= config.fleet_silent_fraction_max * judgement.monitored as f64;
    judgement.fleet_fencing_stopped =
        judgement.fleet_stopped_now || held(history.fleet_stopped_at_ms.as_ref());
    if !judgement.fleet_fencing_stopped {
        let paused: BTreeSet<&str> = judgement
            .racks
            .iter()
            .filter(|(_, r)| r.fencing_paused)
            .map(|(name, _)| name.as_str())
            .collect();
        let confirmed_after = config.heartbeat_grace_ms + config.fence_confirm_ms;
        judgement.fenceable = silent_nodes
            .iter()
            .filter(|(_, rack, _)| !paused.contains(rack))
            .filter(|(node, _, silence)| {
                *silence > confirmed_after || power_confirmed.contains(&node.uuid)
            })
            .map(|(node, _, _)| node.uuid.clone())
            .collect();
    }
    judgement.power_confirmed = power_confirmed;
    judgement
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::NodeRole;
    use crate::core::power_sync::PowerReadingState;

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

    fn health(nodes: &[Node]) -> Vec<NodeHealth> {
        nodes.iter().map(NodeHealth::of).collect()
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
        let judgement = judge(
            &health(&nodes),
            100_000,
            &HealthConfig::default(),
            &GuardHistory::default(),
        );
        assert_eq!(judgement.newly_silent, vec![nodes[3].uuid.clone()]);
        assert_eq!(judgement.fenceable, vec![nodes[3].uuid.clone()]);
        assert!(!judgement.fleet_fencing_stopped);
        assert!(!judgement.racks["r0"].fencing_paused);
    }

    #[test]
    fn racks_are_tallied_alike_whatever_order_the_nodes_come_in() {
        // Nodes of three racks interleaved (the order a store keyed by random uuids
        // gives), some silent, some not monitored: the same judgement as rack by rack.
        let mut nodes: Vec<Node> = (0..30)
            .map(|i| {
                node(
                    i,
                    &format!("r{}", i % 3),
                    LifecycleState::Ready,
                    if i % 4 == 0 { 10_000 } else { 100_000 },
                )
            })
            .collect();
        nodes[5].state = LifecycleState::Maintenance;
        nodes[7].rack = None;
        let config = HealthConfig::default();
        let interleaved = judge(&health(&nodes), 100_000, &config, &GuardHistory::default());
        let mut by_rack = nodes.clone();
        by_rack.sort_by(|a, b| (&a.rack, &a.uuid).cmp(&(&b.rack, &b.uuid)));
        let sorted = judge(
            &health(&by_rack),
            100_000,
            &config,
            &GuardHistory::default(),
        );
        assert_eq!(interleaved.racks, sorted.racks);
        assert_eq!(
            interleaved.racks.keys().collect::<Vec<_>>(),
            vec!["", "r0", "r1", "r2"]
        );
        let monitored: Vec<usize> = interleaved.racks.values().map(|r| r.monitored).collect();
        assert_eq!(
            monitored,
            vec![1, 10, 9, 9],
            "node 7 has no rack, node 5 is not monitored"
        );
        assert_eq!(
            interleaved.racks.values().map(|r| r.silent).sum::<usize>(),
            interleaved.silent
        );
        assert_eq!((interleaved.monitored, interleaved.silent), (29, 8));
        let mut newly_silent = interleaved.newly_silent.clone();
        newly_silent.sort();
        let mut sorted_silent = sorted.newly_silent.clone();
        sorted_silent.sort();
        assert_eq!(newly_silent, sorted_silent);
    }

    #[test]
    fn a_freshly_silent_node_is_suspected_but_not_yet_fenceable() {
        let mut nodes = fleet(2, 10);
        let config = HealthConfig::default();
        nodes[3].last_heartbeat_at_ms = Some(100_000 - config.heartbeat_grace_ms - 1);
        let judgement = judge(&health(&nodes), 100_000, &config, &GuardHistory::default());
        assert_eq!(judgement.newly_silent, vec![nodes[3].uuid.clone()]);
        assert!(
            judgement.fenceable.is_empty(),
            "a rack-wide silence would not be visible yet"
        );
    }

    #[test]
    fn a_silent_rack_pauses_fencing_there_only() {
        let mut nodes = fleet(3, 10);
        for node in nodes.iter_mut().filter(|n| n.rack.as_deref() == Some("r1")) {
            node.last_heartbeat_at_ms = Some(10_000);
        }
        nodes[0].last_heartbeat_at_ms = Some(10_000);
        let judgement = judge(
            &health(&nodes),
            100_000,
            &HealthConfig::default(),
            &GuardHistory::default(),
        );
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
    fn a_rack_pause_holds_while_the_rack_comes_back() {
        let config = HealthConfig::default();
        let mut nodes = fleet(2, 10);
        for node in nodes.iter_mut().filter(|n| n.rack.as_deref() == Some("r1")) {
            node.last_heartbeat_at_ms = Some(10_000);
        }
        let mut history = GuardHistory::default();
        let partitioned = judge(&health(&nodes), 100_000, &config, &history);
        history.record(&partitioned, 100_000);
        assert!(partitioned.racks["r1"].fencing_paused);
        // The switch recovers: all but one node are heard again.
        for node in nodes
            .iter_mut()
            .filter(|n| n.rack.as_deref() == Some("r1"))
            .skip(1)
        {
            node.last_heartbeat_at_ms = Some(101_000);
        }
        let healing = judge(&health(&nodes), 102_000, &config, &history);
        assert!(!healing.racks["r1"].fencing_paused_now);
        assert!(healing.racks["r1"].fencing_paused, "held");
        assert!(
            healing.fenceable.is_empty(),
            "the straggler is not fenced during the hold"
        );
        // Later, everyone but the straggler keeps heartbeating.
        let later_ms = 100_000 + config.pause_hold_ms + 1;
        let straggler = nodes
            .iter()
            .find(|n| n.rack.as_deref() == Some("r1"))
            .unwrap()
            .uuid
            .clone();
        for node in nodes.iter_mut().filter(|n| n.uuid != straggler) {
            node.last_heartbeat_at_ms = Some(later_ms - 1_000);
        }
        let later = judge(&health(&nodes), later_ms, &config, &history);
        assert_eq!(
            later.fenceable.len(),
            1,
            "after the hold a node still silent is fair game"
        );
    }

    #[test]
    fn losing_most_of_the_fleet_stops_all_fencing() {
        let mut nodes = fleet(4, 10);
        for node in nodes.iter_mut().take(25) {
            node.last_heartbeat_at_ms = Some(10_000);
        }
        let judgement = judge(
            &health(&nodes),
            100_000,
            &HealthConfig::default(),
            &GuardHistory::default(),
        );
        assert!(judgement.fleet_fencing_stopped);
        assert!(judgement.fenceable.is_empty());
    }

    fn read(nodes: &mut [NodeHealth], index: usize, state: PowerReadingState, at: i64) {
        nodes[index].power = Some(PowerReading::known(state, at));
    }

    #[test]
    fn a_silent_node_read_off_is_fenceable_without_the_confirmation_wait() {
        let config = HealthConfig::default();
        let now = 100_000;
        let mut nodes = health(&fleet(2, 10));
        for node in nodes.iter_mut() {
            node.last_heard_at_ms = now - 2_000;
        }
        // Node 3 went silent just past the grace; its BMC read Off 5 s ago, and its rack
        // mates have been heard since.
        nodes[3].last_heard_at_ms = now - config.heartbeat_grace_ms - 1;
        read(&mut nodes, 3, PowerReadingState::Off, now - 5_000);
        let judgement = judge(&nodes, now, &config, &GuardHistory::default());
        assert_eq!(judgement.power_confirmed, vec![nodes[3].uuid.clone()]);
        assert_eq!(judgement.fenceable, vec![nodes[3].uuid.clone()]);
        // Read On (a hung OS) or not read at all: it waits out the confirmation period.
        for state in [PowerReadingState::On, PowerReadingState::Unknown] {
            read(&mut nodes, 3, state, now - 5_000);
            let judgement = judge(&nodes, now, &config, &GuardHistory::default());
            assert!(judgement.fenceable.is_empty(), "{state}: {judgement:?}");
            assert_eq!(judgement.newly_silent, vec![nodes[3].uuid.clone()]);
        }
        // Power sync off: the same Off reading is ignored.
        read(&mut nodes, 3, PowerReadingState::Off, now - 5_000);
        let disabled = HealthConfig {
            power_poll_interval_ms: 0,
            ..config
        };
        assert!(judge(&nodes, now, &disabled, &GuardHistory::default())
            .fenceable
            .is_empty());
    }

    #[test]
    fn a_rack_losing_power_is_not_fenced_early_even_though_it_reads_off() {
        let config = HealthConfig::default();
        let mut nodes = health(&fleet(3, 10));
        for node in nodes.iter_mut() {
            node.last_heard_at_ms = 89_000;
        }
        // Rack r1 loses power at 80 s; its nodes had last beaten between 68 and 79 s.
        // At 89.5 s only the first two are past the grace (not yet the rack threshold),
        // and every BMC of the rack reads Off.
        let rack: Vec<usize> = (10..20).collect();
        for (k, &i) in rack.iter().enumerate() {
            nodes[i].last_heard_at_ms = 68_000 + 1_200 * k as i64;
            read(
                &mut nodes,
                i,
                PowerReadingState::Off,
                82_000 + 500 * k as i64,
            );
        }
        let early = judge(&nodes, 89_500, &config, &GuardHistory::default());
        assert_eq!(early.silent, 2);
        assert!(
            !early.racks["r1"].fencing_paused,
            "threshold not reached yet"
        );
        assert!(
            early.power_confirmed.is_empty() && early.fenceable.is_empty(),
            "nobody in r1 was heard after its BMCs read Off: {early:?}"
        );
        // Later the rack guard sees the whole rack and pauses, as without power sync.
        for node in nodes.iter_mut().filter(|n| n.rack.as_deref() != Some("r1")) {
            node.last_heard_at_ms = 119_000;
        }
        let later = judge(&nodes, 120_000, &config, &GuardHistory::default());
        assert!(later.racks["r1"].fencing_paused);
        assert!(later.fenceable.is_empty());
    }

    #[test]
    fn nodes_not_expected_to_heartbeat_are_ignored() {
        let mut nodes = fleet(1, 5);
        nodes[0].state = LifecycleState::Maintenance;
        nodes[0].last_heartbeat_at_ms = Some(0);
        nodes[1].state = LifecycleState::Provisioning;
        nodes[1].last_heartbeat_at_ms = None;
        let judgement = judge(
            &health(&nodes),
            100_000,
            &HealthConfig::default(),
            &GuardHistory::default(),
        );
        assert_eq!(judgement.monitored, 3);
        assert!(judgement.newly_silent.is_empty());
    }
}
