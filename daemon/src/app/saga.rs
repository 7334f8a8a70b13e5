//! The controller's persisted writes: an automatic remediation's start, a step's attempt
//! (before it acts) and a step's outcome (after), each read-decide-write under
//! optimistic concurrency with its audit events in one transaction; and the guard alerts.
//! What each write contains is `core::controller`'s decision ([`begin_step`],
//! [`handle_outcome`]); this module sequences reads, those decisions and writes, and
//! bounds the retries when others write the same records.
//!
//! Exhausting a retry budget is an error, with an audit event and a warn log, never a
//! silent success: the step's attempt is recorded (or not) and the saga stays active,
//! so the step runs again (it is idempotent), and the trail says why.

use crate::core::controller::{begin_step, handle_outcome, OutcomeWrite, StepStart};
use crate::core::model::{Action, NewEvent, Node};
use crate::core::remediation::{Limits, Outcome, Remediation};
use crate::store::StoreError;

use super::{App, SYSTEM_ACTOR};

/// Attempts at recording a step's attempt while others keep writing the remediation or
/// its node (an operator, a heartbeat that moves the node) before giving up this tick.
pub const ATTEMPT_WRITES_MAX: usize = 4;
/// Attempts at recording a step's outcome while the node keeps changing under us.
pub const OUTCOME_WRITES_MAX: usize = 4;

/// Why a saga write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error("remediation {id}: {what} not recorded after {attempts} write conflicts")]
    WriteConflicts {
        id: i64,
        what: &'static str,
        attempts: usize,
    },
    #[error("remediation {id}: its node {uuid} does not exist")]
    NodeMissing { id: i64, uuid: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`App::saga_begin_step`] did.
#[derive(Debug)]
pub enum Begun {
    /// Nothing was due (not active, not yet, gone).
    Idle,
    /// The automatic remediation stood down (its node spoke again before the fence).
    StoodDown,
    /// The attempt is recorded: act now. `node` is as written with it.
    Attempt { attempt: Remediation, node: Node },
    /// Entering the step implied an illegal lifecycle event: the saga failed before
    /// acting (recorded).
    Refused(OutcomeWrite),
}

/// What [`App::saga_record_outcome`] did.
// One per step, moved once: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Recorded {
    /// The outcome and what it means for the node are recorded.
    Written(OutcomeWrite),
    /// The remediation moved on without us (an operator cancelled it mid-step): the
    /// outcome is moot; `now` is the record as it is.
    Superseded { now: Option<Remediation> },
}

/// `remediation` marked with the leader epoch it is written under.
fn stamped(remediation: Remediation, fence: Option<i64>) -> Remediation {
    Remediation {
        epoch: fence.or(remediation.epoch),
        ..remediation
    }
}

fn conflict(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::GenerationMismatch { .. } | StoreError::Conflict { .. }
    )
}

impl App {
    /// Creates an automatic remediation with its event; `None` when the node already has
    /// an active one (an operator got there first). Every saga write takes `fence`: the
    /// leader epoch it is made under (`None` for a daemon alone on its database); the
    /// store refuses it (`StoreError::Fenced`) once the lease moved on.
    pub async fn saga_start_automatic(
        &self,
        remediation: &Remediation,
        event: NewEvent,
        fence: Option<i64>,
    ) -> Result<Option<Remediation>, StoreError> {
        let remediation = Remediation {
            epoch: fence,
            ..remediation.clone()
        };
        match self
            .store
            .remediation_create(&remediation, &[event], fence)
            .await
        {
            Ok(created) => {
                self.metrics.remediation_started(created.kind.as_str());
                Ok(Some(created))
            }
            Err(StoreError::AlreadyExists { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Records the controller's guard alerts.
    pub async fn saga_alerts_record(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.store.event_append(events).await
    }

    async fn saga_node(&self, remediation: &Remediation) -> Result<Node, SagaError> {
        self.store
            .node_get(&remediation.node_uuid)
            .await?
            .ok_or_else(|| SagaError::NodeMissing {
                id: remediation.id,
                uuid: remediation.node_uuid.to_string(),
            })
    }

    /// Reads remediation `id` and its node, lets the core decide what to do before
    /// acting ([`begin_step`]), and records it: a stand-down, the attempt (with the
    /// lifecycle change entering the step implies), or a refusal. Deciding again with
    /// fresh copies when someone else wrote first, at most [`ATTEMPT_WRITES_MAX`] times.
    pub async fn saga_begin_step(&self, id: i64, fence: Option<i64>) -> Result<Begun, SagaError> {
        for _ in 0..ATTEMPT_WRITES_MAX {
            let Some(remediation) = self.store.remediation_get(id).await? else {
                return Ok(Begun::Idle);
            };
            if remediation.step().is_none() {
                return Ok(Begun::Idle);
            }
            let node = self.saga_node(&remediation).await?;
            let now = self.clock.now_ms();
            let written = match begin_step(now, &remediation, &node) {
                StepStart::Idle => return Ok(Begun::Idle),
                StepStart::StandDown { cancelled, event } => self
                    .store
                    .remediation_update(&stamped(cancelled, fence), None, &[event], fence)
                    .await
                    .map(|(stored, _)| {
                        self.count_if_finished(&stored);
                        Begun::StoodDown
                    }),
                StepStart::Attempt {
                    attempt,
                    node: moved,
                    audit,
                } => self
                    .store
                    .remediation_update(&stamped(attempt, fence), moved.as_ref(), &audit, fence)
                    .await
                    .map(|(attempt, written)| Begun::Attempt {
                        attempt,
                        node: written.or(moved).unwrap_or(node),
                    }),
                StepStart::Refused(write) => self
                    .store
                    .remediation_update(
                        &write.remediation,
                        write.node.as_ref(),
                        &write.audit,
                        fence,
                    )
                    .await
                    .map(|(stored, _)| {
                        self.count_if_finished(&stored);
                        Begun::Refused(write)
                    }),
            };
            match written {
                Ok(begun) => return Ok(begun),
                Err(error) if conflict(&error) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        let remediation = self.store.remediation_get(id).await?;
        self.saga_exhausted(
            id,
            remediation.as_ref(),
            "step attempt",
            ATTEMPT_WRITES_MAX,
            "nothing was done; the step is tried again next tick",
        )
        .await
    }

    /// Records `outcome` of `attempt` (as [`App::saga_begin_step`] returned it) with what
    /// it means for the node ([`handle_outcome`]; an illegal lifecycle event fails the
    /// saga there). Decides again with a fresh node when it changed under us, at most
    /// [`OUTCOME_WRITES_MAX`] times; exhausting that is an error with an audit event.
    pub async fn saga_record_outcome(
        &self,
        attempt: &Remediation,
        outcome: &Outcome,
        limits: &Limits,
        fence: Option<i64>,
    ) -> Result<Recorded, SagaError> {
        let id = attempt.id;
        let mut attempt = attempt.clone();
        for _ in 0..OUTCOME_WRITES_MAX {
            let node = self.saga_node(&attempt).await?;
            let now = self.clock.now_ms();
            let write = handle_outcome(now, &attempt, outcome, &node, limits);
            match self
                .store
                .remediation_update(
                    &stamped(write.remediation.clone(), fence),
                    write.node.as_ref(),
                    &write.audit,
                    fence,
                )
                .await
            {
                Ok((stored, _)) => {
                    self.count_if_finished(&stored);
                    return Ok(Recorded::Written(OutcomeWrite {
                        remediation: stored,
                        ..write
                    }));
                }
                // The node changed between our read and write (a heartbeat that moved
                // it, an operator): decide again with the fresh copy.
                Err(StoreError::GenerationMismatch { .. }) => continue,
                // The remediation changed: ours only if it is still this attempt.
                Err(StoreError::Conflict { .. }) => {
                    let now = self.store.remediation_get(id).await?;
                    match &now {
                        Some(fresh)
                            if fresh.step().is_some()
                                && fresh.step_index == attempt.step_index
                                && fresh.attempts == attempt.attempts =>
                        {
                            attempt.generation = fresh.generation;
                            continue;
                        }
                        _ => return Ok(Recorded::Superseded { now }),
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
        self.saga_exhausted(
            id,
            Some(&attempt),
            "step outcome",
            OUTCOME_WRITES_MAX,
            "the step acted; it runs again (it is idempotent) once its attempt is due",
        )
        .await
    }

    /// A retry budget ran out: an audit event and a warn log, then the error.
    async fn saga_exhausted<T>(
        &self,
        id: i64,
        remediation: Option<&Remediation>,
        what: &'static str,
        attempts: usize,
        consequence: &str,
    ) -> Result<T, SagaError> {
        let error = SagaError::WriteConflicts { id, what, attempts };
        tracing::warn!(id, %error, consequence, "remediation write gave up");
        if let Some(remediation) = remediation {
            let step = remediation.step().map_or("none", |s| s.as_str());
            let event = NewEvent::for_node(
                &remediation.node_uuid,
                self.clock.now_ms(),
                SYSTEM_ACTOR,
                Action::RemediationWriteAbandoned,
                format!(
                    "remediation {id}: {what} of step {step} attempt {} not recorded after {attempts} write conflicts (others kept changing the node or the remediation); {consequence}",
                    remediation.attempts
                ),
            );
            self.store.event_append(&[event]).await?;
        }
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_core_names_the_controller_as_the_application_does() {
        assert_eq!(crate::core::controller::SYSTEM_ACTOR, super::SYSTEM_ACTOR);
    }
}
