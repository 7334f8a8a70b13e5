//! Operator power actions (`POST /api/v1/nodes/{uuid}/power`): the request checked, the
//! node put into Maintenance with the operator's reason together with the "power
//! requested" audit event (one store transaction, before any BMC call), the action run
//! through a [`PowerSwitch`] (the daemon's guarded BMCs), and its readback recorded as a
//! "power done" or "power failed" event.
//!
//! Architecture invariant: this module names no BMC. The daemon's assembly gives the `App`
//! a `PowerSwitch` (`controller::operator_power`, over the same `BmcProvider` and guards
//! the controller uses), so one call at a time per BMC holds across fencing, power polls
//! and operators.

use std::sync::Arc;

use async_trait::async_trait;
use bearman_proto::uuid::NodeUuid;
use serde::{Deserialize, Serialize};

use super::{App, AppError};
use crate::core::lifecycle::{apply_event, LifecycleEvent, LifecycleState};
use crate::core::model::{Action, MaintenanceHold, NewEvent, Node};
use crate::core::validate::FieldError;

/// Longest reason an operator may give for a power action, in bytes.
pub const POWER_REASON_BYTES_MAX: usize = crate::core::validate::REASON_BYTES_MAX;

/// What an operator may ask of a node's power.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// Power on, verified on.
    On,
    /// Hard power off, verified off.
    Off,
    /// Clean (ACPI) shutdown, verified off.
    SoftOff,
    /// Verified off, then on, verified on.
    Cycle,
    /// Next boot from the network, then powered on (or cycled), verified on.
    Pxe,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::SoftOff => "soft_off",
            PowerAction::Cycle => "cycle",
            PowerAction::Pxe => "pxe",
        }
    }
}

/// What the BMC read back after an action that was verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerDone {
    /// "on" or "off".
    pub power: String,
    /// Readbacks it took.
    pub readbacks: u32,
    /// What the operator should know (e.g. that PXE was set first).
    pub note: String,
}

/// Why a power action could not be run or verified; the text names the BMC and the last
/// reading, never a credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PowerSwitchError {
    /// The node's BMC settings name nothing this daemon can drive.
    #[error("{0}")]
    Unusable(String),
    /// The BMC refused, timed out, or did not read back the power asked for.
    #[error("{0}")]
    Failed(String),
}

/// The daemon's way to a node's BMC for operator actions.
#[async_trait]
pub trait PowerSwitch: Send + Sync {
    /// Whether `node`'s BMC can be driven at all (settings, driver, credentials), without
    /// calling it: checked before anything is written.
    fn check(&self, node: &Node) -> Result<(), PowerSwitchError>;
    /// Runs `action` on `node`'s BMC and verifies it by readback.
    async fn execute(
        &self,
        node: &Node,
        action: PowerAction,
    ) -> Result<PowerDone, PowerSwitchError>;
}

/// The answer to a power action that was verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerOutcome {
    pub uuid: NodeUuid,
    pub action: PowerAction,
    /// What the BMC read back: "on" or "off".
    pub power: String,
    pub readbacks: u32,
    pub elapsed_ms: i64,
    pub note: String,
    /// The node's state after the action (Maintenance for anything but `on`).
    pub state: LifecycleState,
    pub maintenance: Option<MaintenanceHold>,
}

/// An operator's reason for a power action: required, at most
/// [`POWER_REASON_BYTES_MAX`] bytes, no control characters.
pub fn check_power_reason(reason: &str) -> Result<String, FieldError> {
    crate::core::validate::required_reason(reason, "say why the power is changed")
}

/// Whether `action` may run on a node in `state`, and the lifecycle event it implies
/// first. Every action but `on` takes the node out of automation (Maintenance), so the
/// controller never suspects or fences what an operator switched off on purpose; `on`
/// changes nothing, except on a Fenced node, whose boot the lifecycle would refuse
/// outside Maintenance. Fencing (a saga owns the power) and Retired are refused.
pub fn power_plan(
    state: LifecycleState,
    action: PowerAction,
) -> Result<Option<LifecycleEvent>, String> {
    use LifecycleState as S;
    match state {
        S::Fencing => Err("it is being fenced: the remediation owns its power".into()),
        S::Retired => Err("it is retired".into()),
        S::Maintenance => Ok(None),
        S::Fenced => Ok(Some(LifecycleEvent::MaintenanceOn)),
        _ if action == PowerAction::On => Ok(None),
        _ => Ok(Some(LifecycleEvent::MaintenanceOn)),
    }
}

impl App {
    /// Gives the application the way to nodes' BMCs for operator power actions.
    pub fn with_power_switch(mut self, switch: Arc<dyn PowerSwitch>) -> Self {
        self.power = Some(switch);
        self
    }

    /// An operator's power action on one node: refused (writing nothing) when the node
    /// has an active remediation, is being fenced, is retired or has no usable BMC;
    /// otherwise the node goes to Maintenance (all but `on`) with the "power requested"
    /// event in one transaction, the action runs through the guarded BMC and is verified
    /// by readback, and the outcome is recorded either way.
    pub async fn power_action(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        action: PowerAction,
        reason: &str,
    ) -> Result<PowerOutcome, AppError> {
        let reason = check_power_reason(reason)?;
        let switch = self.power.clone().ok_or(AppError::PowerUnavailable)?;
        let node = self.node(uuid).await?;
        let refused = |why: String| AppError::PowerRefused {
            uuid: uuid.clone(),
            why,
        };
        if !self
            .store
            .remediation_list(true, Some(uuid), 1)
            .await?
            .is_empty()
        {
            return Err(refused(
                "it has an active remediation, which owns its power; cancel it first".into(),
            ));
        }
        power_plan(node.state, action).map_err(&refused)?;
        if node
            .bmc
            .address
            .as_deref()
            .is_none_or(|a| a.trim().is_empty())
        {
            return Err(AppError::NoBmc { uuid: uuid.clone() });
        }
        switch
            .check(&node)
            .map_err(|error| refused(error.to_string()))?;

        let started = self.now_ms();
        let maintenance_reason = format!("power {}: {reason}", action.as_str());
        let node = self
            .mutate_node(uuid, |node| {
                let mut events: Vec<NewEvent> = Vec::new();
                if let Some(event) = power_plan(node.state, action).map_err(&refused)? {
                    events.extend(apply_event(
                        node,
                        event,
                        started,
                        actor,
                        &maintenance_reason,
                    )?);
                }
                events.push(NewEvent::for_node(
                    uuid,
                    started,
                    actor,
                    Action::PowerRequested,
                    format!("{}: {reason}", action.as_str()),
                ));
                Ok(events)
            })
            .await?;
        tracing::info!(%uuid, action = action.as_str(), actor = %actor, state = %node.state, "operator power action");

        let result = switch.execute(&node, action).await;
        let now = self.now_ms();
        let elapsed_ms = now - started;
        let (event, answer) = match result {
            Ok(done) => (
                NewEvent::for_node(
                    uuid,
                    now,
                    actor,
                    Action::PowerDone,
                    format!(
                        "{} verified: power reads {} after {} readbacks ({elapsed_ms} ms)",
                        action.as_str(),
                        done.power,
                        done.readbacks
                    ),
                ),
                Ok(PowerOutcome {
                    uuid: uuid.clone(),
                    action,
                    power: done.power,
                    readbacks: done.readbacks,
                    elapsed_ms,
                    note: done.note,
                    state: node.state,
                    maintenance: node.maintenance.clone(),
                }),
            ),
            Err(error) => {
                tracing::warn!(%uuid, action = action.as_str(), %error, "operator power action failed");
                (
                    NewEvent::for_node(
                        uuid,
                        now,
                        actor,
                        Action::PowerFailed,
                        format!("{} failed after {elapsed_ms} ms: {error}", action.as_str()),
                    ),
                    Err(AppError::PowerFailed {
                        uuid: uuid.clone(),
                        action: action.as_str(),
                        detail: error.to_string(),
                    }),
                )
            }
        };
        self.store.event_append(&[event]).await?;
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleState as S;

    #[test]
    fn every_action_but_on_takes_a_watched_node_into_maintenance() {
        let hold = Ok(Some(LifecycleEvent::MaintenanceOn));
        for state in [
            S::Discovered,
            S::Registered,
            S::Provisioning,
            S::Ready,
            S::Suspect,
        ] {
            for action in [
                PowerAction::Off,
                PowerAction::SoftOff,
                PowerAction::Cycle,
                PowerAction::Pxe,
            ] {
                assert_eq!(power_plan(state, action), hold, "{state} {action:?}");
            }
            assert_eq!(power_plan(state, PowerAction::On), Ok(None), "{state}");
        }
        assert_eq!(power_plan(S::Fenced, PowerAction::On), hold);
        assert_eq!(power_plan(S::Maintenance, PowerAction::Off), Ok(None));
        assert_eq!(power_plan(S::Maintenance, PowerAction::On), Ok(None));
        assert!(power_plan(S::Fencing, PowerAction::On).is_err());
        assert!(power_plan(S::Retired, PowerAction::Off).is_err());
    }

    #[test]
    fn a_reason_is_required_bounded_and_printable() {
        assert_eq!(check_power_reason(" dimm swap ").unwrap(), "dimm swap");
        assert!(check_power_reason("  ").is_err());
        assert!(check_power_reason("a\u{1b}[2Jb").is_err());
        assert!(check_power_reason(&"x".repeat(POWER_REASON_BYTES_MAX + 1)).is_err());
        assert!(check_power_reason(&"x".repeat(POWER_REASON_BYTES_MAX)).is_ok());
    }
}
