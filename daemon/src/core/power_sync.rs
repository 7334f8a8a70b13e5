//! Power sync (Ironic's periodic power-state sync): which monitored nodes are due a BMC
//! power poll, and what a reading means for a silent node.
//!
//! Heartbeats say a node's operating system is alive; the BMC says whether the machine
//! has power. A node that should be running (Ready or Suspect) whose BMC reads **Off** is
//! dead for certain: a powered-off machine cannot be partitioned-but-running, so once it
//! is silent past the heartbeat grace it need not wait out `fence_confirm_ms`. A reading
//! of **On** changes nothing (the OS may be hung), and neither does a failed poll
//! (**Unknown**).
//!
//! The confirmation period also gives the rack and fleet guards time to see a correlated
//! silence (a rack losing power reads Off on every node of the rack). So an Off reading
//! confirms a death only when it is not part of such an event: when, replaying the guards
//! with "not heard since the reading was taken" as the notion of silence, neither the
//! node's rack nor the fleet would pause. The nodes behind a dead PDU can never be heard
//! after their BMCs read Off; a lone node's healthy rack mates are, within one heartbeat
//! interval. The guards themselves still apply to every fence, exactly as without power
//! sync.
//!
//! Architecture invariant: no I/O, no clock; `now_ms` comes in. The controller polls and
//! persists; this module only decides.

use std::collections::BTreeMap;

use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::health::{is_monitored, HealthConfig, NodeHealth};
use super::model::TimestampMs;

/// What the BMC last said about a node's power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerReadingState {
    On,
    Off,
    /// The poll failed or timed out, or the node has no reachable BMC driver.
    Unknown,
}

impl PowerReadingState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerReadingState::On => "on",
            PowerReadingState::Off => "off",
            PowerReadingState::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<PowerReadingState> {
        match text {
            "on" => Some(PowerReadingState::On),
            "off" => Some(PowerReadingState::Off),
            "unknown" => Some(PowerReadingState::Unknown),
            _ => None,
        }
    }
}

impl std::fmt::Display for PowerReadingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last power poll of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerReading {
    pub state: PowerReadingState,
    /// When the answer (or the failure) came back.
    pub read_at_ms: TimestampMs,
    /// Why the state is Unknown; `None` for On and Off.
    pub error: Option<String>,
}

/// Longest error text kept with a reading: BMC errors can quote whole HTTP bodies.
pub const POWER_ERROR_CHARS_MAX: usize = 500;

impl PowerReading {
    pub fn known(state: PowerReadingState, read_at_ms: TimestampMs) -> PowerReading {
        PowerReading {
            state,
            read_at_ms,
            error: None,
        }
    }

    pub fn unknown(error: &str, read_at_ms: TimestampMs) -> PowerReading {
        PowerReading {
            state: PowerReadingState::Unknown,
            read_at_ms,
            error: Some(error.chars().take(POWER_ERROR_CHARS_MAX).collect()),
        }
    }
}

/// Whether a new reading is worth an audit event: the state changed. The first reading
/// of a node is noteworthy only when it is not On (every node of a fresh fleet reading On
/// says nothing).
pub fn reading_changed(before: Option<&PowerReading>, after: &PowerReading) -> bool {
    match before {
        Some(before) => before.state != after.state,
        None => after.state != PowerReadingState::On,
    }
}

/// Why a node is due a poll; confirmations go first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PollReason {
    /// The node is late with its heartbeat and its BMC was not read since it fell late:
    /// ask now, so a dead node is confirmed by the time it is suspected.
    Confirm,
    /// The routine poll, once per `power_poll_interval_ms`.
    Routine,
}

/// A node's fixed place within the poll interval, from its uuid (FNV-1a), so a fleet is
/// not polled all at once and every run of the same fleet polls in the same order.
pub fn poll_phase_ms(uuid: &NodeUuid, interval_ms: i64) -> i64 {
    if interval_ms <= 0 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in uuid.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % interval_ms as u64) as i64
}

/// When `node` is next due a poll and why; `None` when polling is disabled or the node is
/// not expected to be running.
pub fn poll_due(
    node: &NodeHealth,
    now_ms: TimestampMs,
    config: &HealthConfig,
) -> Option<(PollReason, TimestampMs)> {
    let interval = config.power_poll_interval_ms;
    if interval <= 0 || !is_monitored(node.state) {
        return None;
    }
    // One confirmation per silence, taken once the node is late: a reading from between
    // its last heartbeat and the moment it fell late may predate its death.
    let late_at = node.last_heard_at_ms + config.power_check_silence_ms;
    let read_since_late = node.power.as_ref().is_some_and(|r| r.read_at_ms >= late_at);
    if !read_since_late && now_ms >= late_at {
        return Some((PollReason::Confirm, late_at));
    }
    let routine_at = match &node.power {
        // Never more often than once per interval.
        Some(reading) => reading.read_at_ms + interval,
        // First poll: at the node's phase within the current interval.
        None => now_ms - now_ms.rem_euclid(interval) + poll_phase_ms(&node.uuid, interval),
    };
    Some((PollReason::Routine, routine_at))
}

/// The nodes to poll now, most urgent first (confirmations, then the longest overdue),
/// at most `max`; `skip` says which nodes not to poll (a poll already in flight, a
/// remediation reading the BMC itself).
pub fn due_polls<'a>(
    nodes: &'a [NodeHealth],
    now_ms: TimestampMs,
    config: &HealthConfig,
    max: usize,
    skip: impl Fn(&NodeUuid) -> bool,
) -> Vec<&'a NodeHealth> {
    // Whether a node is due is arithmetic; `skip` looks it up: ask it only of the few
    // that are due, not of every node every tick.
    let mut due: Vec<(PollReason, TimestampMs, &NodeUuid, &NodeHealth)> = nodes
        .iter()
        .filter_map(|node| {
            let (reason, at) = poll_due(node, now_ms, config)?;
            (at <= now_ms && !skip(&node.uuid)).then_some((reason, at, &node.uuid, node))
        })
        .collect();
    // Only the first `max` are polled: pick them before sorting (the order is total,
    // uuids being unique, so this is the head of the full sort), not sort all of a fleet
    // whose polls fell due together.
    let order = |a: &(PollReason, TimestampMs, &NodeUuid, _),
                 b: &(PollReason, TimestampMs, &NodeUuid, _)| {
        (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2))
    };
    if due.len() > max {
        due.select_nth_unstable_by(max, order);
        due.truncate(max);
    }
    due.sort_unstable_by(order);
    due.into_iter().map(|(_, _, _, node)| node).collect()
}

/// Last-heard times of the monitored nodes, sorted, per rack and fleet-wide: answers "how
/// many were not heard after time R" in O(log n). Racks are keyed by the names the nodes
/// hold (built on ticks with silent nodes, for the whole fleet: no string per node).
pub struct HeardIndex<'a> {
    racks: BTreeMap<&'a str, Vec<TimestampMs>>,
    fleet: Vec<TimestampMs>,
}

impl<'a> HeardIndex<'a> {
    pub fn new(nodes: &'a [NodeHealth]) -> HeardIndex<'a> {
        let mut racks: BTreeMap<&'a str, Vec<TimestampMs>> = BTreeMap::new();
        let mut fleet = Vec::new();
        for node in nodes.iter().filter(|n| is_monitored(n.state)) {
            racks
                .entry(node.rack.as_deref().unwrap_or_default())
                .or_default()
                .push(node.last_heard_at_ms);
            fleet.push(node.last_heard_at_ms);
        }
        for heard in racks.values_mut() {
            heard.sort_unstable();
        }
        fleet.sort_unstable();
        HeardIndex { racks, fleet }
    }

    /// (monitored, not heard after `at_ms`) in `rack`.
    fn rack_silent_since(&self, rack: &str, at_ms: TimestampMs) -> (usize, usize) {
        self.racks.get(rack).map_or((0, 0), |heard| {
            (heard.len(), heard.partition_point(|h| *h <= at_ms))
        })
    }

    fn fleet_silent_since(&self, at_ms: TimestampMs) -> (usize, usize) {
        (
            self.fleet.len(),
            self.fleet.partition_point(|h| *h <= at_ms),
        )
    }
}

/// Whether `node`'s BMC confirms it dead: it reads Off, the reading was taken after the
/// node was last heard, and the silence it belongs to is not rack- or fleet-wide (see the
/// module comment). Always false while polling is disabled.
pub fn confirmed_off(node: &NodeHealth, heard: &HeardIndex<'_>, config: &HealthConfig) -> bool {
    if config.power_poll_interval_ms <= 0 {
        return false;
    }
    let Some(reading) = &node.power else {
        return false;
    };
    if reading.state != PowerReadingState::Off || reading.read_at_ms <= node.last_heard_at_ms {
        return false;
    }
    let at = reading.read_at_ms;
    let (rack_monitored, rack_silent) =
        heard.rack_silent_since(node.rack.as_deref().unwrap_or_default(), at);
    let rack_would_pause = rack_monitored >= config.rack_nodes_min
        && rack_silent as f64 >= config.rack_silent_fraction_max * rack_monitored as f64;
    let (fleet_monitored, fleet_silent) = heard.fleet_silent_since(at);
    let fleet_would_stop = fleet_monitored >= config.fleet_nodes_min
        && fleet_silent as f64 >= config.fleet_silent_fraction_max * fleet_monitored as f64;
    !rack_would_pause && !fleet_would_stop
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lifecycle::LifecycleState;

    fn health(index: u64, rack: &str, heard: i64, power: Option<PowerReading>) -> NodeHealth {
        NodeHealth {
            uuid: NodeUuid::from_index(5, index),
            rack: Some(rack.into()),
            state: LifecycleState::Ready,
            last_heard_at_ms: heard,
            power,
        }
    }

    fn on(at: i64) -> Option<PowerReading> {
        Some(PowerReading::known(PowerReadingState::On, at))
    }

    fn off(at: i64) -> Option<PowerReading> {
        Some(PowerReading::known(PowerReadingState::Off, at))
    }

    fn unknown(at: i64) -> Option<PowerReading> {
        Some(PowerReading::unknown("bmc timed out", at))
    }

    /// One row of the schedule table: a node heard at `heard` with `power`, asked at `now`.
    fn check_due(heard: i64, power: Option<PowerReading>, now: i64, expect: Option<PollReason>) {
        let config = HealthConfig::default();
        let node = health(1, "r0", heard, power.clone());
        let got = poll_due(&node, now, &config).and_then(|(r, at)| (at <= now).then_some(r));
        assert_eq!(
            got, expect,
            "heard {heard}, power {power:?}, now {now}: due {got:?}, expected {expect:?}"
        );
    }

    #[test]
    fn schedule_table() {
        let interval = HealthConfig::default().power_poll_interval_ms;
        let late = HealthConfig::default().power_check_silence_ms;
        let t = 1_000_000;
        // Heard recently, read recently: nothing to do.
        check_due(t, on(t - 1_000), t + 1_000, None);
        // A routine poll comes one interval after the last reading, not before.
        check_due(t + interval, on(t), t + interval - 1, None);
        check_due(t + interval, on(t), t + interval, Some(PollReason::Routine));
        // A failed poll is retried on the routine schedule only.
        check_due(t + interval, unknown(t), t + interval - 1, None);
        check_due(
            t + interval,
            unknown(t),
            t + interval,
            Some(PollReason::Routine),
        );
        // Late with its heartbeat and not read since: confirm now, out of turn.
        check_due(t, on(t - 1_000), t + late - 1, None);
        check_due(t, on(t - 1_000), t + late, Some(PollReason::Confirm));
        check_due(t, None, t + late, Some(PollReason::Confirm));
        // A reading between the last heartbeat and falling late may predate a death.
        check_due(t, on(t + 5_000), t + late, Some(PollReason::Confirm));
        // Already read since it fell late: back to the routine schedule.
        check_due(t, off(t + late + 500), t + late + 1_000, None);
        check_due(t, unknown(t + late + 500), t + late + 1_000, None);
    }

    #[test]
    fn polling_disabled_at_zero_and_for_nodes_not_running() {
        let config = HealthConfig {
            power_poll_interval_ms: 0,
            ..Default::default()
        };
        let node = health(1, "r0", 0, None);
        assert_eq!(poll_due(&node, 10_000_000, &config), None);
        let mut maintenance = health(2, "r0", 0, None);
        maintenance.state = LifecycleState::Maintenance;
        assert_eq!(
            poll_due(&maintenance, 10_000_000, &HealthConfig::default()),
            None
        );
    }

    #[test]
    fn first_polls_are_spread_over_the_interval() {
        let config = HealthConfig::default();
        let interval = config.power_poll_interval_ms;
        let now = 50 * interval; // the start of an interval
        let nodes: Vec<NodeHealth> = (0..1_000).map(|i| health(i, "r0", now, None)).collect();
        let mut per_tenth = [0usize; 10];
        for node in &nodes {
            let (reason, at) = poll_due(node, now, &config).unwrap();
            assert_eq!(reason, PollReason::Routine);
            assert!((now..now + interval).contains(&at));
            per_tenth[((at - now) * 10 / interval) as usize] += 1;
        }
        assert!(
            per_tenth.iter().all(|n| (50..=150).contains(n)),
            "first polls bunch up: {per_tenth:?}"
        );
        // Deterministic: the same uuid always lands in the same place.
        assert_eq!(
            poll_phase_ms(&nodes[7].uuid, interval),
            poll_phase_ms(&nodes[7].uuid, interval)
        );
        assert_eq!(
            due_polls(&nodes, now + interval / 10 - 1, &config, usize::MAX, |_| {
                false
            })
            .len(),
            per_tenth[0]
        );
    }

    #[test]
    fn due_polls_are_bounded_and_confirmations_go_first() {
        let config = HealthConfig::default();
        let now = 10_000_000;
        let mut nodes: Vec<NodeHealth> = (0..20)
            .map(|i| {
                health(
                    i,
                    "r0",
                    now,
                    on(now - config.power_poll_interval_ms - i as i64),
                )
            })
            .collect();
        // Node 19 is late and not read since; node 18's poll is in flight.
        nodes[19].last_heard_at_ms = now - config.power_check_silence_ms;
        nodes[19].power = on(now - config.power_check_silence_ms - 1);
        let in_flight = nodes[18].uuid.clone();
        let uuids = |due: Vec<&NodeHealth>| -> Vec<NodeUuid> {
            due.into_iter().map(|node| node.uuid.clone()).collect()
        };
        let due = uuids(due_polls(&nodes, now, &config, 8, |uuid| {
            *uuid == in_flight
        }));
        assert_eq!(due.len(), 8);
        assert_eq!(due[0], nodes[19].uuid, "the confirmation first");
        assert_eq!(due[1], nodes[17].uuid, "then the longest overdue");
        assert!(!due.contains(&in_flight));
        // Exactly the head of the whole order, in that order.
        let all = uuids(due_polls(&nodes, now, &config, usize::MAX, |uuid| {
            *uuid == in_flight
        }));
        assert!(all.len() > 8);
        assert_eq!(due, all[..8]);
    }

    /// One row of the judgement table: rack r0 of `rack_size` nodes (node 0 the subject,
    /// with `power`; `mates_heard` of its mates heard at `mates_at`, the rest at 0), plus
    /// rack r1 of 10 nodes heard at `now`.
    fn check_confirmed(
        power: Option<PowerReading>,
        rack_size: u64,
        mates_heard: u64,
        mates_at: i64,
        expect: bool,
    ) {
        let config = HealthConfig::default();
        let now = 100_000;
        let mut nodes = vec![health(0, "r0", 10_000, power.clone())];
        for i in 1..rack_size {
            let at = if i <= mates_heard { mates_at } else { 10_000 };
            nodes.push(health(i, "r0", at, None));
        }
        for i in 100..110 {
            nodes.push(health(i, "r1", now, None));
        }
        let heard = HeardIndex::new(&nodes);
        assert_eq!(
            confirmed_off(&nodes[0], &heard, &config),
            expect,
            "power {power:?}, rack of {rack_size}, {mates_heard} mates heard at {mates_at}"
        );
    }

    #[test]
    fn judgement_table() {
        // Read Off after the node went silent, rack mates heard since: dead for certain.
        check_confirmed(off(30_000), 10, 9, 95_000, true);
        // On (maybe hung) and Unknown (poll failed) confirm nothing.
        check_confirmed(on(30_000), 10, 9, 95_000, false);
        check_confirmed(unknown(30_000), 10, 9, 95_000, false);
        check_confirmed(None, 10, 9, 95_000, false);
        // An Off reading from before the node was last heard is stale.
        check_confirmed(off(9_000), 10, 9, 95_000, false);
        // The whole rack went silent together (a PDU): not a lone death, leave it to the
        // guards.
        check_confirmed(off(30_000), 10, 0, 0, false);
        // Rack mates not yet heard since the reading (their next heartbeat is still
        // coming): 3 of 10 silent since is the rack guard's threshold.
        check_confirmed(off(30_000), 10, 7, 95_000, false);
        check_confirmed(off(30_000), 10, 8, 95_000, true);
        // Mates heard, but before the reading: that says nothing about after it.
        check_confirmed(off(30_000), 10, 9, 29_000, false);
        // A rack below the guard's minimum size has no rack guard; the fleet still counts.
        check_confirmed(off(30_000), 3, 0, 0, true);
    }

    #[test]
    fn fleet_wide_silence_confirms_nothing() {
        let config = HealthConfig::default();
        // Two racks of five; everyone but one rack mate was last heard before the reading.
        let mut nodes: Vec<NodeHealth> = (0..10)
            .map(|i| health(i, if i < 5 { "r0" } else { "r1" }, 10_000, None))
            .collect();
        nodes[0].power = off(30_000);
        nodes[1].last_heard_at_ms = 40_000;
        let relaxed = HealthConfig {
            rack_nodes_min: 100,
            ..config.clone()
        };
        let heard = HeardIndex::new(&nodes);
        assert!(!confirmed_off(&nodes[0], &heard, &relaxed));
        // Disabled polling: stored readings are ignored.
        for node in nodes.iter_mut().skip(1) {
            node.last_heard_at_ms = 40_000;
        }
        let heard = HeardIndex::new(&nodes);
        assert!(confirmed_off(&nodes[0], &heard, &config));
        let disabled = HealthConfig {
            power_poll_interval_ms: 0,
            ..config
        };
        assert!(!confirmed_off(&nodes[0], &heard, &disabled));
    }

    #[test]
    fn only_changes_are_noteworthy() {
        let on_reading = PowerReading::known(PowerReadingState::On, 1);
        let off_reading = PowerReading::known(PowerReadingState::Off, 2);
        assert!(!reading_changed(None, &on_reading));
        assert!(reading_changed(None, &off_reading));
        assert!(!reading_changed(Some(&on_reading), &on_reading));
        assert!(reading_changed(Some(&on_reading), &off_reading));
        assert!(reading_changed(
            Some(&off_reading),
            &PowerReading::unknown("x", 3)
        ));
        assert_eq!(
            PowerReading::unknown(&"e".repeat(2_000), 1)
                .error
                .unwrap()
                .len(),
            POWER_ERROR_CHARS_MAX
        );
    }
}
