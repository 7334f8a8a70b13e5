//! Remediations an operator starts or cancels.

use bearman_proto::uuid::NodeUuid;

use super::{App, AppError};
use crate::core::lifecycle::{apply_event, LifecycleEvent};
use crate::core::model::{Action, NewEvent};
use crate::core::remediation::{may_start, Remediation, RemediationKind, Status};
use crate::store::StoreError;

/// Attempts at cancelling a remediation that keeps changing under us.
const CANCEL_ATTEMPTS_MAX: usize = 4;

impl App {
    /// Starts an operator-requested remediation. Operator requests bypass the automatic
    /// guards (rack pause, fleet stop, rate limit): a human decided. Whether the node's
    /// state allows it is the core's [`may_start`].
    pub async fn remediation_start(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        kind: RemediationKind,
        reason: &str,
    ) -> Result<Remediation, AppError> {
        let node = self.node(uuid).await?;
        may_start(kind, node.state).map_err(|refused| AppError::RemediationRefused {
            uuid: uuid.clone(),
            refused,
        })?;
        let now = self.now_ms();
        let remediation = Remediation::new(uuid.clone(), kind, actor, reason, now);
        let event = NewEvent::for_node(
            uuid,
            now,
            actor,
            Action::RemediationStarted,
            format!("{}: {reason}", kind.as_str()),
        );
        let created = self
            .store
            .remediation_create(&remediation, &[event], None)
            .await
            .map_err(|error| match error {
                StoreError::AlreadyExists { .. } => {
                    AppError::RemediationActive { uuid: uuid.clone() }
                }
                other => other.into(),
            })?;
        self.metrics.remediation_started(kind.as_str());
        tracing::info!(%uuid, id = created.id, kind = kind.as_str(), actor = %actor, "operator remediation");
        Ok(created)
    }

    /// Cancels an active remediation, unless it is mid power-off. Cancelling between
    /// fence retry rounds puts the node in maintenance (see below).
    pub async fn remediation_cancel(
        &self,
        actor: &str,
        id: i64,
        reason: &str,
    ) -> Result<Remediation, AppError> {
        for _ in 0..CANCEL_ATTEMPTS_MAX {
            let remediation = self
                .store
                .remediation_get(id)
                .await?
                .ok_or(AppError::RemediationNotFound { id })?;
            let Some(step) = remediation.step() else {
                return Err(AppError::RemediationNotActive {
                    id,
                    status: remediation.status.as_str(),
                });
            };
            if !remediation.cancellable() {
                return Err(AppError::RemediationNotCancellable {
                    id,
                    step: step.as_str(),
                });
            }
            let now = self.now_ms();
            let mut cancelled = remediation.clone();
            cancelled.status = Status::Cancelled;
            cancelled.finished_at_ms = Some(now);
            cancelled.updated_at_ms = now;
            let mut events = vec![NewEvent::for_node(
                &remediation.node_uuid,
                now,
                actor,
                Action::RemediationCancelled,
                format!("remediation {id}: {reason}"),
            )];
            // Stopping fence retries leaves a silent node whose power is in doubt: it
            // goes to maintenance, held by whoever stopped them, or the controller would
            // start fencing it again at its next look.
            let node = if remediation.awaiting_fence_retry() {
                let mut node = self.node(&remediation.node_uuid).await?;
                let why = format!("fence retries of remediation {id} cancelled: {reason}");
                events.extend(apply_event(
                    &mut node,
                    LifecycleEvent::MaintenanceOn,
                    now,
                    actor,
                    &why,
                )?);
                node.updated_at_ms = now;
                Some(node)
            } else {
                None
            };
            match self
                .store
                .remediation_update(&cancelled, node.as_ref(), &events, None)
                .await
            {
                Ok((stored, _)) => {
                    self.count_if_finished(&stored);
                    return Ok(stored);
                }
                Err(StoreError::Conflict { .. } | StoreError::GenerationMismatch { .. }) => {
                    continue
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(AppError::Busy {
            what: format!("remediation {id}"),
        })
    }
}
