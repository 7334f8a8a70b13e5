//! The node lifecycle state machine.
//!
//! `transition(state, event)` is the only place that decides whether a node may move;
//! the HTTP layer maps [`IllegalTransition`] to 409. Every (state, event) pair is covered by
//! the table test at the bottom of this file.

use serde::{Deserialize, Serialize};

use super::model::{Action, MaintenanceHold, NewEvent, Node, TimestampMs};

/// Characters of the reason kept with a maintenance hold (the audit event has it whole).
const MAINTENANCE_REASON_MAX: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    /// Enrolled by an operator; the machine has not registered yet.
    Discovered,
    /// Registered its hardware; no OS boot started yet.
    Registered,
    /// Fetched its target OS; stage 2 is being brought up.
    Provisioning,
    /// Stage 2 reported `installed` and heartbeats.
    Ready,
    /// Missed heartbeats; not yet confirmed dead.
    Suspect,
    /// Being powered off through its BMC; power-off not yet verified.
    Fencing,
    /// Power-off verified by BMC readback; its workloads may move.
    Fenced,
    /// Being rebuilt: PXE next boot, powered on, expected back through stage 1.
    Rebuilding,
    /// Out of automation's reach until an operator releases it.
    Maintenance,
    /// Gone for good: addresses released, boots refused.
    Retired,
}

impl LifecycleState {
    pub const ALL: [LifecycleState; 10] = [
        LifecycleState::Discovered,
        LifecycleState::Registered,
        LifecycleState::Provisioning,
        LifecycleState::Ready,
        LifecycleState::Suspect,
        LifecycleState::Fencing,
        LifecycleState::Fenced,
        LifecycleState::Rebuilding,
        LifecycleState::Maintenance,
        LifecycleState::Retired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Discovered => "discovered",
            LifecycleState::Registered => "registered",
            LifecycleState::Provisioning => "provisioning",
            LifecycleState::Ready => "ready",
            LifecycleState::Suspect => "suspect",
            LifecycleState::Fencing => "fencing",
            LifecycleState::Fenced => "fenced",
            LifecycleState::Rebuilding => "rebuilding",
            LifecycleState::Maintenance => "maintenance",
            LifecycleState::Retired => "retired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

impl std::fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a node, from the node itself, the health judgement,
/// remediation, or an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// Stage 1 posted its hardware inventory.
    Register,
    /// Stage 1 fetched its target OS script (`GET /ipxe/{uuid}`).
    BootStarted,
    /// Stage 2 reported `installed`.
    Installed,
    /// Stage 2 is alive.
    Heartbeat,
    /// Health judgement: heartbeats stopped.
    HeartbeatsMissed,
    /// Remediation (or an operator) starts powering the node off.
    FenceStarted,
    /// BMC readback confirmed power off.
    FenceVerified,
    /// Power-off could not be verified within the retry budget.
    FenceFailed,
    /// Remediation or an operator asks for a rebuild.
    RebuildStarted,
    /// The rebuild gave up after its retry budget.
    RebuildFailed,
    MaintenanceOn,
    /// Leaving maintenance: `heartbeat_fresh` says whether the node is demonstrably up.
    MaintenanceOff {
        heartbeat_fresh: bool,
    },
    Retire,
}

impl LifecycleEvent {
    pub const ALL: [LifecycleEvent; 14] = [
        LifecycleEvent::Register,
        LifecycleEvent::BootStarted,
        LifecycleEvent::Installed,
        LifecycleEvent::Heartbeat,
        LifecycleEvent::HeartbeatsMissed,
        LifecycleEvent::FenceStarted,
        LifecycleEvent::FenceVerified,
        LifecycleEvent::FenceFailed,
        LifecycleEvent::RebuildStarted,
        LifecycleEvent::RebuildFailed,
        LifecycleEvent::MaintenanceOn,
        LifecycleEvent::MaintenanceOff {
            heartbeat_fresh: true,
        },
        LifecycleEvent::MaintenanceOff {
            heartbeat_fresh: false,
        },
        LifecycleEvent::Retire,
    ];

    pub fn name(self) -> &'static str {
        self.action().as_str()
    }

    /// What the audit trail records when this event moves a node.
    pub fn action(self) -> Action {
        match self {
            LifecycleEvent::Register => Action::Register,
            LifecycleEvent::BootStarted => Action::BootStarted,
            LifecycleEvent::Installed => Action::Installed,
            LifecycleEvent::Heartbeat => Action::Heartbeat,
            LifecycleEvent::HeartbeatsMissed => Action::HeartbeatsMissed,
            LifecycleEvent::FenceStarted => Action::FenceStarted,
            LifecycleEvent::FenceVerified => Action::FenceVerified,
            LifecycleEvent::FenceFailed => Action::FenceFailed,
            LifecycleEvent::RebuildStarted => Action::RebuildStarted,
            LifecycleEvent::RebuildFailed => Action::RebuildFailed,
            LifecycleEvent::MaintenanceOn => Action::MaintenanceOn,
            LifecycleEvent::MaintenanceOff { .. } => Action::MaintenanceOff,
            LifecycleEvent::Retire => Action::Retire,
        }
    }
}

/// Applies `event` to `node` (its state only), returning the audit event when the state
/// moved. The one way every writer changes a node's state.
pub fn apply_event(
    node: &mut Node,
    event: LifecycleEvent,
    now_ms: TimestampMs,
    actor: &str,
    reason: &str,
) -> Result<Option<NewEvent>, IllegalTransition> {
    let from = node.state;
    let to = transition(from, event)?;
    if from == to {
        return Ok(None);
    }
    node.state = to;
    if to == LifecycleState::Maintenance {
        node.maintenance = Some(MaintenanceHold {
            by: actor.to_string(),
            at_ms: now_ms,
            reason: reason.chars().take(MAINTENANCE_REASON_MAX).collect(),
        });
    } else {
        node.maintenance = None;
    }
    if to == LifecycleState::Retired {
        // The store releases the node's allocations in the same write; the record must
        // not go on naming addresses another node may now hold.
        super::ipam::forget_addresses(node);
        node.pending_acceptance = None;
    }
    Ok(Some(
        NewEvent::for_node(&node.uuid, now_ms, actor, event.action(), reason).with_states(from, to),
    ))
}

/// Applies `events` in order to a copy of `node`: all of them or, at the first illegal
/// one, none (the error names it).
pub fn apply_events(
    node: &Node,
    events: &[LifecycleEvent],
    now_ms: TimestampMs,
    actor: &str,
    reason: &str,
) -> Result<(Node, Vec<NewEvent>), IllegalTransition> {
    let mut next = node.clone();
    let mut audit = Vec::new();
    for event in events {
        audit.extend(apply_event(&mut next, *event, now_ms, actor, reason)?);
    }
    Ok((next, audit))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event} is not allowed while the node is {state}")]
pub struct IllegalTransition {
    pub state: LifecycleState,
    pub event: &'static str,
}

/// Decides the state after `event`; `Ok(state)` unchanged means the event is accepted
/// but moves nothing (e.g. a heartbeat from a Ready node).
pub fn transition(
    state: LifecycleState,
    event: LifecycleEvent,
) -> Result<LifecycleState, IllegalTransition> {
    use LifecycleEvent as E;
    use LifecycleState as S;
    let next = match (state, event) {
        (S::Retired, _) => None,

        // A node that boots by itself (after a crash or an operator's power cycle) clears
        // any suspicion; a node being fenced or already fenced must not come back on its
        // own: that would mean the fence failed or someone bypassed it.
        (S::Discovered | S::Registered | S::Provisioning | S::Ready | S::Suspect, E::Register) => {
            Some(S::Registered)
        }
        (S::Rebuilding | S::Maintenance, E::Register) => Some(state),

        (S::Registered | S::Provisioning | S::Ready | S::Suspect, E::BootStarted) => {
            Some(S::Provisioning)
        }
        (S::Rebuilding | S::Maintenance, E::BootStarted) => Some(state),

        (S::Provisioning | S::Rebuilding | S::Ready, E::Installed) => Some(S::Ready),
        (S::Maintenance, E::Installed) => Some(S::Maintenance),

        (S::Ready | S::Suspect, E::Heartbeat) => Some(S::Ready),
        (S::Maintenance, E::Heartbeat) => Some(S::Maintenance),

        (S::Ready, E::HeartbeatsMissed) => Some(S::Suspect),
        (S::Suspect, E::HeartbeatsMissed) => Some(S::Suspect),

        // Automatic fencing starts from Ready/Suspect; an operator may also fence a node
        // stuck mid-boot (Registered, Provisioning) or fence an already fenced one again
        // (its power state is in doubt until verified anew).
        (S::Registered | S::Provisioning | S::Ready | S::Suspect | S::Fenced, E::FenceStarted) => {
            Some(S::Fencing)
        }
        (S::Fencing, E::FenceVerified) => Some(S::Fenced),
        (S::Fencing, E::FenceFailed) => Some(S::Suspect),

        (
            S::Registered | S::Provisioning | S::Ready | S::Fenced | S::Maintenance,
            E::RebuildStarted,
        ) => Some(S::Rebuilding),
        (S::Rebuilding, E::RebuildStarted) => Some(S::Rebuilding),
        (S::Rebuilding, E::RebuildFailed) => Some(S::Maintenance),

        // An operator may take any node out of automation, except mid-fence: a half-done
        // power-off must finish (or fail) first so nobody is left guessing the power state.
        (S::Fencing, E::MaintenanceOn) => None,
        (_, E::MaintenanceOn) => Some(S::Maintenance),
        (S::Maintenance, E::MaintenanceOff { heartbeat_fresh }) => Some(if heartbeat_fresh {
            S::Ready
        } else {
            S::Registered
        }),

        (S::Fencing, E::Retire) => None,
        (_, E::Retire) => Some(S::Retired),

        _ => None,
    };
    next.ok_or(IllegalTransition {
        state,
        event: event.name(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleState::*;

    /// One row per state; columns follow `LifecycleEvent::ALL`:
    /// register, boot, installed, heartbeat, missed, fence, verified, fence_failed,
    /// rebuild, rebuild_failed, maint_on, maint_off(fresh), maint_off(stale), retire.
    /// `None` is an illegal transition.
    const TABLE: [(LifecycleState, [Option<LifecycleState>; 14]); 10] = [
        (
            Discovered,
            [
                Some(Registered),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Registered,
            [
                Some(Registered),
                Some(Provisioning),
                None,
                None,
                None,
                Some(Fencing),
                None,
                None,
                Some(Rebuilding),
                None,
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Provisioning,
            [
                Some(Registered),
                Some(Provisioning),
                Some(Ready),
                None,
                None,
                Some(Fencing),
                None,
                None,
                Some(Rebuilding),
                None,
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Ready,
            [
                Some(Registered),
                Some(Provisioning),
                Some(Ready),
                Some(Ready),
                Some(Suspect),
                Some(Fencing),
                None,
                None,
                Some(Rebuilding),
                None,
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Suspect,
            [
                Some(Registered),
                Some(Provisioning),
                None,
                Some(Ready),
                Some(Suspect),
                Some(Fencing),
                None,
                None,
                None,
                None,
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Fencing,
            [
                None,
                None,
                None,
                None,
                None,
                None,
                Some(Fenced),
                Some(Suspect),
                None,
                None,
                None,
                None,
                None,
                None,
            ],
        ),
        (
            Fenced,
            [
                None,
                None,
                None,
                None,
                None,
                Some(Fencing),
                None,
                None,
                Some(Rebuilding),
                None,
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Rebuilding,
            [
                Some(Rebuilding),
                Some(Rebuilding),
                Some(Ready),
                None,
                None,
                None,
                None,
                None,
                Some(Rebuilding),
                Some(Maintenance),
                Some(Maintenance),
                None,
                None,
                Some(Retired),
            ],
        ),
        (
            Maintenance,
            [
                Some(Maintenance),
                Some(Maintenance),
                Some(Maintenance),
                Some(Maintenance),
                None,
                None,
                None,
                None,
                Some(Rebuilding),
                None,
                Some(Maintenance),
                Some(Ready),
                Some(Registered),
                Some(Retired),
            ],
        ),
        (Retired, [None; 14]),
    ];

    #[test]
    fn every_state_event_pair_matches_the_table() {
        assert_eq!(TABLE.len(), LifecycleState::ALL.len());
        for (row, (state, expected_row)) in TABLE.iter().enumerate() {
            assert_eq!(
                *state,
                LifecycleState::ALL[row],
                "table rows follow ALL order"
            );
            for (column, event) in LifecycleEvent::ALL.iter().enumerate() {
                let got = transition(*state, *event).ok();
                assert_eq!(
                    got,
                    expected_row[column],
                    "transition({state}, {}) column {column}",
                    event.name()
                );
            }
        }
    }

    #[test]
    fn illegal_transition_names_state_and_event() {
        let error = transition(Fenced, LifecycleEvent::Heartbeat).unwrap_err();
        assert_eq!(
            error.to_string(),
            "illegal transition: heartbeat is not allowed while the node is fenced"
        );
    }

    #[test]
    fn state_names_round_trip() {
        for state in LifecycleState::ALL {
            assert_eq!(LifecycleState::parse(state.as_str()), Some(state));
        }
        assert_eq!(LifecycleState::parse("bogus"), None);
    }
}
