//! Carrying out one step of a remediation saga: record the attempt, act through the BMC
//! or the cloud, record the outcome — each write together with the node's lifecycle
//! change, in one transaction.

use std::sync::Arc;

use crate::bmc::PowerState;
use crate::cloud::CloudError;
use crate::core::lifecycle::{LifecycleEvent, LifecycleState};
use crate::core::model::{Action, NewEvent, Node, NodeRole};
use crate::core::remediation::{self, Outcome, Remediation, RemediationKind, Status, Step};
use crate::store::StoreError;

use super::{Controller, SYSTEM_ACTOR};

/// Applies lifecycle `events` to a copy of `node`; the audit events go with them.
fn apply_events(
    node: &Node,
    events: &[LifecycleEvent],
    now: i64,
    why: &str,
) -> Result<(Node, Vec<NewEvent>), crate::core::lifecycle::IllegalTransition> {
    let (mut next, audit) =
        crate::core::lifecycle::apply_events(node, events, now, SYSTEM_ACTOR, why)?;
    next.updated_at_ms = now;
    Ok((next, audit))
}

impl Controller {
    /// Runs the current step of remediation `id` once, if it is still active and due.
    pub async fn run_step(self: Arc<Self>, id: i64) {
        for _ in 0..4 {
            match self.try_step(id).await {
                Ok(()) => return,
                // Someone (an operator, a heartbeat) changed the node or the saga under us:
                // read again and decide again.
                Err(StoreError::GenerationMismatch { .. } | StoreError::Conflict { .. }) => {
                    continue
                }
                Err(error) => {
                    tracing::warn!(id, %error, "remediation step could not be recorded");
                    return;
                }
            }
        }
    }

    async fn try_step(&self, id: i64) -> Result<(), StoreError> {
        let store = &self.app.store;
        let Some(remediation) = store.remediation_get(id).await? else {
            return Ok(());
        };
        let Some(step) = remediation.step() else {
            return Ok(());
        };
        let now = self.app.clock.now_ms();
        if remediation.next_attempt_at_ms > now {
            return Ok(());
        }
        let node = store
            .node_get(&remediation.node_uuid)
            .await?
            .ok_or_else(|| StoreError::not_found(format!("node {}", remediation.node_uuid)))?;

        // An automatic remediation whose node spoke again before anything was done stands
        // down: it was a blip, not a death.
        if remediation.kind == RemediationKind::Automatic
            && remediation.step_index == 0
            && remediation.attempts == 0
            && node.state == LifecycleState::Ready
        {
            let mut cancelled = remediation.clone();
            cancelled.status = Status::Cancelled;
            cancelled.finished_at_ms = Some(now);
            let event = NewEvent::for_node(
                &node.uuid,
                now,
                SYSTEM_ACTOR,
                Action::RemediationCancelled,
                "node heartbeating again before the fence",
            );
            store.remediation_update(&cancelled, None, &[event]).await?;
            return Ok(());
        }

        // Record the attempt before acting, with the lifecycle change entering the step
        // implies, so a crash mid-step resumes here and the attempt budget holds.
        let mut attempt = remediation.clone();
        attempt.attempts += 1;
        attempt.updated_at_ms = now;
        let entering = if remediation.attempts == 0 {
            remediation::entering(step, node.state)
        } else {
            vec![]
        };
        let why = format!(
            "remediation {id} ({}) step {}",
            remediation.kind.as_str(),
            step.as_str()
        );
        let (node_after, mut audit) =
            apply_events(&node, &entering, now, &why).unwrap_or((node.clone(), vec![]));
        let node_write = (!audit.is_empty()).then_some(&node_after);
        if remediation.attempts == 0 {
            audit.push(NewEvent::for_node(
                &node.uuid,
                now,
                SYSTEM_ACTOR,
                Action::RemediationStep,
                why.clone(),
            ));
        }
        let (attempt, written) = store
            .remediation_update(&attempt, node_write, &audit)
            .await?;
        let node = written.unwrap_or(node_after);

        let outcome = self.execute(step, &attempt, &node).await;

        // Record the outcome and what it means for the node.
        for _ in 0..4 {
            let now = self.app.clock.now_ms();
            let advance = remediation::advance(&attempt, &outcome, now, &self.config.limits);
            let current = store
                .node_get(&attempt.node_uuid)
                .await?
                .ok_or_else(|| StoreError::not_found(format!("node {}", attempt.node_uuid)))?;
            let (node_next, mut audit) = match apply_events(
                &current,
                &advance.node_events,
                now,
                &advance.note,
            ) {
                Ok(applied) => applied,
                Err(illegal) => {
                    tracing::warn!(id, %illegal, "remediation outcome does not fit the node's state");
                    (current.clone(), vec![])
                }
            };
            let node_write = (!audit.is_empty()).then_some(&node_next);
            let done = advance.remediation.status != Status::Active;
            let noteworthy = matches!(outcome, Outcome::Done) || done;
            if noteworthy {
                let action = match advance.remediation.status {
                    Status::Active => Action::RemediationProgress,
                    Status::Done => Action::RemediationDone,
                    Status::Failed => Action::RemediationFailed,
                    Status::Cancelled => Action::RemediationCancelled,
                };
                audit.push(NewEvent::for_node(
                    &current.uuid,
                    now,
                    SYSTEM_ACTOR,
                    action,
                    format!("remediation {id}: {}", advance.note),
                ));
            }
            match store
                .remediation_update(&advance.remediation, node_write, &audit)
                .await
            {
                Ok(_) => {
                    if done {
                        tracing::info!(id, status = advance.remediation.status.as_str(), note = %advance.note, "remediation finished");
                    }
                    return Ok(());
                }
                // The node changed between our read and write (a heartbeat that moved it,
                // an operator): decide again with the fresh copy.
                Err(StoreError::GenerationMismatch { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Performs `step` once. Every step is idempotent.
    async fn execute(&self, step: Step, remediation: &Remediation, node: &Node) -> Outcome {
        let bmc = || self.bmcs.bmc_for(node);
        match step {
            Step::SoftOff => {
                if self.config.limits.soft_off_grace_ms <= 0 || remediation.attempts > 1 {
                    return Outcome::Done;
                }
                // Best effort: a BMC that fails here gets the hard power-off next anyway.
                match bmc() {
                    Ok(bmc) => match bmc.power_off_soft().await {
                        Ok(()) => Outcome::NotYet(
                            "clean shutdown requested; waiting before the hard power-off".into(),
                        ),
                        Err(_) => Outcome::Done,
                    },
                    Err(_) => Outcome::Done,
                }
            }
            Step::PowerOff => match bmc() {
                Err(error) => Outcome::Failed(error.to_string()),
                Ok(bmc) => match bmc.power_off().await {
                    Ok(()) => Outcome::Done,
                    Err(error) => Outcome::Failed(error.to_string()),
                },
            },
            Step::VerifyOff => match bmc() {
                Err(error) => Outcome::Failed(error.to_string()),
                Ok(bmc) => {
                    // A power-off can be lost (metal3 #290): ask again now and then.
                    if remediation.attempts.is_multiple_of(3) {
                        let _ = bmc.power_off().await;
                    }
                    match bmc.power_state().await {
                        Ok(PowerState::Off) => Outcome::Done,
                        Ok(PowerState::On) => Outcome::NotYet("BMC still reports power on".into()),
                        Err(error) => Outcome::Failed(error.to_string()),
                    }
                }
            },
            Step::ForceDown => match (&self.cloud, node.role) {
                (Some(cloud), NodeRole::Compute) => match cloud.force_down(&node.hostname).await {
                    Ok(()) => Outcome::Done,
                    Err(error) => Outcome::Failed(error.to_string()),
                },
                // No hypervisor API, or no VMs by role: nothing to force down.
                _ => Outcome::Done,
            },
            Step::Evacuate => match (&self.cloud, node.role) {
                (Some(cloud), NodeRole::Compute) => {
                    evacuate_all(cloud.as_ref(), &node.hostname).await
                }
                _ => Outcome::Done,
            },
            Step::Rebuild => match bmc() {
                Err(error) => Outcome::Failed(error.to_string()),
                Ok(bmc) => {
                    if let Err(error) = bmc.set_next_boot_pxe().await {
                        return Outcome::Failed(error.to_string());
                    }
                    // A rebuild retry finds the machine on but stuck (it never came back):
                    // power-on alone would do nothing, so make sure it is off first.
                    match bmc.power_state().await {
                        Ok(PowerState::Off) => match bmc.power_on().await {
                            Ok(()) => Outcome::Done,
                            Err(error) => Outcome::Failed(error.to_string()),
                        },
                        Ok(PowerState::On) => match bmc.power_off().await {
                            Ok(()) => {
                                Outcome::NotYet("powering off before the rebuild power-on".into())
                            }
                            Err(error) => Outcome::Failed(error.to_string()),
                        },
                        Err(error) => Outcome::Failed(error.to_string()),
                    }
                }
            },
            Step::AwaitReady => {
                if node.state == LifecycleState::Ready {
                    Outcome::Done
                } else {
                    Outcome::NotYet(format!("node is {}", node.state))
                }
            }
            Step::Maintenance => Outcome::Done,
        }
    }
}

/// Evacuates every VM still on `host`; done when none is left.
async fn evacuate_all(cloud: &dyn crate::cloud::Cloud, host: &str) -> Outcome {
    let vms = match cloud.vms_on_host(host).await {
        Ok(vms) => vms,
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    if vms.is_empty() {
        return Outcome::Done;
    }
    let mut problems = Vec::new();
    for vm in &vms {
        match cloud.evacuate(vm).await {
            Ok(()) => {}
            Err(CloudError::ServiceInUse { .. }) => {
                return Outcome::NotYet(format!(
                    "cloud still considers {host}'s compute service up"
                ))
            }
            Err(error) => problems.push(format!("{vm}: {error}")),
        }
    }
    match cloud.vms_on_host(host).await {
        Ok(left) if left.is_empty() => Outcome::Done,
        Ok(left) => Outcome::NotYet(format!(
            "{} VM(s) still on {host}{}",
            left.len(),
            if problems.is_empty() {
                String::new()
            } else {
                format!(": {}", problems.join("; "))
            }
        )),
        Err(error) => Outcome::Failed(error.to_string()),
    }
}
