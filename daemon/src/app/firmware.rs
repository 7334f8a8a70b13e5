//! Firmware: bundles (add, list, delete), the rollout (read, pause, resume), stage 1's
//! report of an update, an operator clearing a node's failed attempts, and the fleet's
//! drift report. The decisions are `core::firmware`'s; a node write and the rollout write
//! it implies go in one transaction (`Store::node_update_with_rollout`), retried on a
//! lost race a bounded number of times.

use bearman_proto::uuid::NodeUuid;
use bearman_proto::{FirmwareReport, FirmwareReportAnswer};

use super::power::PowerAction;
use super::{App, AppError, NODE_ACTOR, NODE_WRITE_ATTEMPTS_MAX, SYSTEM_ACTOR};
use crate::core::firmware::{
    self, DriftReport, FirmwareBundle, FirmwareNote, FirmwareRollout, NoteKind, RolloutPause,
    BUNDLES_MAX,
};
use crate::core::lifecycle::{self, LifecycleEvent, LifecycleState};
use crate::core::model::{Action, NewEvent, Node, NodeFilter, TimestampMs};
use crate::core::validate;
use crate::store::StoreError;

/// Nodes read per page for the drift report.
const STATUS_PAGE: usize = 500;

/// The audit action a firmware note is written as.
pub(crate) fn note_action(kind: NoteKind) -> Action {
    match kind {
        NoteKind::Changed => Action::FirmwareChanged,
        NoteKind::Started => Action::FirmwareUpdateStarted,
        NoteKind::Applied => Action::FirmwareApplied,
        NoteKind::Flashed => Action::FirmwareFlashed,
        NoteKind::Failed | NoteKind::Exhausted => Action::FirmwareUpdateFailed,
        NoteKind::RolloutPaused => Action::FirmwareRolloutPaused,
    }
}

/// The audit events for `notes` about node `uuid` (a rollout pause is the fleet's event).
pub(crate) fn note_events(
    uuid: &NodeUuid,
    notes: &[FirmwareNote],
    now: TimestampMs,
) -> Vec<NewEvent> {
    notes
        .iter()
        .map(|note| {
            if note.kind == NoteKind::RolloutPaused {
                NewEvent::global(
                    now,
                    SYSTEM_ACTOR,
                    Action::FirmwareRolloutPaused,
                    note.text.clone(),
                )
            } else {
                NewEvent::for_node(
                    uuid,
                    now,
                    NODE_ACTOR,
                    note_action(note.kind),
                    note.text.clone(),
                )
            }
        })
        .collect()
}

/// Takes `node` out of service for `reason` (the controller's hold), when its state
/// allows; the event, if it moved.
pub(crate) fn park(node: &mut Node, reason: &str, now: TimestampMs) -> Option<NewEvent> {
    if node.state == LifecycleState::Maintenance {
        return None;
    }
    lifecycle::apply_event(
        node,
        LifecycleEvent::MaintenanceOn,
        now,
        SYSTEM_ACTOR,
        reason,
    )
    .ok()
    .flatten()
}

impl App {
    /// Adds a bundle an operator submitted (validated; at most `BUNDLES_MAX`).
    pub async fn firmware_bundle_add(
        &self,
        actor: &str,
        mut bundle: FirmwareBundle,
    ) -> Result<FirmwareBundle, AppError> {
        bundle.validate()?;
        let existing = self.store.firmware_bundle_list().await?;
        if existing.len() >= BUNDLES_MAX {
            return Err(AppError::InvalidField(validate::FieldError::new(
                "name",
                format!("{BUNDLES_MAX} bundles exist, the most kept; delete some first"),
            )));
        }
        let now = self.now_ms();
        bundle.created_at_ms = now;
        let event = NewEvent::global(
            now,
            actor,
            Action::FirmwareBundleCreate,
            format!(
                "bundle {}: {} -> {} ({} bytes, sha256 {}, restart by {})",
                bundle.name,
                bundle.component,
                bundle.version,
                bundle.size_bytes,
                bundle.artifact.sha256,
                bundle.restart.as_str()
            ),
        );
        self.store
            .firmware_bundle_create(&bundle, &[event])
            .await
            .map_err(|error| match error {
                StoreError::AlreadyExists { .. } => AppError::FirmwareBundleExists {
                    name: bundle.name.clone(),
                },
                other => other.into(),
            })?;
        Ok(bundle)
    }

    pub async fn firmware_bundle_list(&self) -> Result<Vec<FirmwareBundle>, AppError> {
        Ok(self.store.firmware_bundle_list().await?)
    }

    pub async fn firmware_bundle_get(&self, name: &str) -> Result<FirmwareBundle, AppError> {
        self.store
            .firmware_bundle_list()
            .await?
            .into_iter()
            .find(|bundle| bundle.name == name)
            .ok_or_else(|| AppError::FirmwareBundleNotFound { name: name.into() })
    }

    /// Deletes a bundle. Nodes flashing it finish their attempt; no node is ordered it
    /// again.
    pub async fn firmware_bundle_delete(
        &self,
        actor: &str,
        name: &str,
        reason: Option<&str>,
    ) -> Result<(), AppError> {
        let reason = validate::reason_or(reason, "deleted by an operator")?;
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::FirmwareBundleDelete,
            format!("bundle {name}: {reason}"),
        );
        self.store
            .firmware_bundle_delete(name, &[event])
            .await
            .map_err(|error| match error {
                StoreError::NotFound { .. } => {
                    AppError::FirmwareBundleNotFound { name: name.into() }
                }
                other => other.into(),
            })
    }

    pub async fn firmware_rollout(&self) -> Result<FirmwareRollout, AppError> {
        Ok(self.store.firmware_rollout_get().await?)
    }

    /// Pauses the rollout: no node starts an update until it is resumed; those flashing
    /// finish. Refused when it is already paused (the answer says by whom).
    pub async fn firmware_rollout_pause(
        &self,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<FirmwareRollout, AppError> {
        let reason = validate::reason_or(reason, "paused by an operator")?;
        self.change_rollout(|rollout, now| {
            if let Some(pause) = &rollout.paused {
                return Err(AppError::RolloutPaused {
                    by: pause.by.clone(),
                    reason: pause.reason.clone(),
                });
            }
            rollout.paused = Some(RolloutPause {
                by: actor.to_string(),
                at_ms: now,
                reason: reason.clone(),
            });
            Ok(NewEvent::global(
                now,
                actor,
                Action::FirmwareRolloutPaused,
                reason.clone(),
            ))
        })
        .await
    }

    /// Resumes a paused rollout (an automatic pause too: the operator has looked).
    pub async fn firmware_rollout_resume(
        &self,
        actor: &str,
        reason: Option<&str>,
    ) -> Result<FirmwareRollout, AppError> {
        let reason = validate::reason_or(reason, "resumed by an operator")?;
        self.change_rollout(|rollout, now| {
            let Some(pause) = rollout.paused.take() else {
                return Err(AppError::RolloutNotPaused);
            };
            Ok(NewEvent::global(
                now,
                actor,
                Action::FirmwareRolloutResumed,
                format!("{reason} (was paused by {}: {})", pause.by, pause.reason),
            ))
        })
        .await
    }

    async fn change_rollout<F>(&self, mut decide: F) -> Result<FirmwareRollout, AppError>
    where
        F: FnMut(&mut FirmwareRollout, TimestampMs) -> Result<NewEvent, AppError>,
    {
        for _ in 0..NODE_WRITE_ATTEMPTS_MAX {
            let mut rollout = self.store.firmware_rollout_get().await?;
            let now = self.now_ms();
            let event = decide(&mut rollout, now)?;
            match self.store.firmware_rollout_put(&rollout, &[event]).await {
                Ok(stored) => return Ok(stored),
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(AppError::Busy {
            what: "the firmware rollout".into(),
        })
    }

    /// Stage 1's report of the update it was ordered. Applied: the node restarts onto
    /// the new firmware (power-cycled here through its BMC when the bundle says so).
    /// Failed: counted; the node registers again and is retried or, past
    /// `firmware.attempts_max`, taken out of service.
    ///
    /// The answer comes back at once; a power cycle the bundle asks for is returned as
    /// the node to cycle, for the caller to run with [`App::firmware_power_cycle`] where a
    /// dropped request cannot cut it short (the machine may be half-way through it).
    pub async fn node_firmware_report(
        &self,
        uuid: &NodeUuid,
        report: &FirmwareReport,
    ) -> Result<(FirmwareReportAnswer, Option<Node>), AppError> {
        if report.detail.len() > bearman_proto::FIRMWARE_REPORT_DETAIL_MAX {
            return Err(AppError::InvalidField(validate::FieldError::new(
                "detail",
                format!(
                    "longer than {} bytes",
                    bearman_proto::FIRMWARE_REPORT_DETAIL_MAX
                ),
            )));
        }
        let bundles = self.store.firmware_bundle_list().await?;
        for _ in 0..NODE_WRITE_ATTEMPTS_MAX {
            let original = self.node(uuid).await?;
            let mut node = original.clone();
            let mut rollout = self.store.firmware_rollout_get().await?;
            let now = self.now_ms();
            // A bundle deleted mid-flight restarts the way an ordinary reboot does.
            let restart = bundles
                .iter()
                .find(|bundle| bundle.name == report.bundle)
                .map_or(bearman_proto::FirmwareRestart::Reboot, |bundle| {
                    bundle.restart
                });
            let effect = firmware::on_report(
                &mut node,
                report,
                restart,
                &mut rollout,
                &self.settings.firmware,
                now,
            )
            .map_err(|refused| AppError::FirmwareReportRefused {
                uuid: uuid.clone(),
                refused,
            })?;
            let mut events = note_events(uuid, &effect.notes, now);
            if let Some(reason) = &effect.maintenance {
                events.extend(park(&mut node, reason, now));
            }
            node.updated_at_ms = now;
            match self
                .store
                .node_update_with_rollout(&node, &rollout, &events)
                .await
            {
                Ok(stored) => {
                    return Ok((
                        FirmwareReportAnswer { next: effect.next },
                        effect.power_cycle.then_some(stored),
                    ));
                }
                Err(StoreError::GenerationMismatch { .. } | StoreError::Conflict { .. }) => {
                    continue
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(AppError::Busy {
            what: format!("node {uuid}"),
        })
    }

    /// Power-cycles a node (next boot from the network) for its new firmware, through the
    /// same guarded BMC path as every power action, and audits what came of it. A failure
    /// is only reported: the update's deadline then counts the attempt as failed.
    pub async fn firmware_power_cycle(&self, node: &Node) {
        let now = self.now_ms();
        let reason = match &self.power {
            None => "no BMC access in this daemon; the machine must be power-cycled by hand".to_string(),
            Some(power) => match power.check(node) {
                Err(error) => format!("cannot power-cycle: {error}"),
                Ok(()) => match power.execute(node, PowerAction::Pxe).await {
                    Ok(done) => format!(
                        "power-cycled for its new firmware (next boot from the network): reads {} after {} readback(s)",
                        done.power, done.readbacks
                    ),
                    Err(error) => format!("power cycle failed: {error}"),
                },
            },
        };
        tracing::info!(uuid = %node.uuid, %reason, "firmware power cycle");
        let event = NewEvent::for_node(
            &node.uuid,
            now,
            SYSTEM_ACTOR,
            Action::FirmwarePowerCycle,
            reason,
        );
        if let Err(error) = self.store.event_append(&[event]).await {
            tracing::warn!(uuid = %node.uuid, %error, "could not record the firmware power cycle");
        }
    }

    /// Clears a node's failed attempts so its next registration tries the update again,
    /// and releases it from the maintenance the failures put it in.
    pub async fn firmware_retry(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        reason: Option<&str>,
    ) -> Result<Node, AppError> {
        let reason = validate::reason_or(reason, "retry asked by an operator")?;
        let now = self.now_ms();
        let fresh_ms = self.settings.heartbeat_fresh_ms;
        self.mutate_node(uuid, |node| {
            let Some(update) = node.firmware_update.as_mut() else {
                return Err(AppError::NoFirmwareFailures { uuid: uuid.clone() });
            };
            if update.failures == 0 {
                return Err(AppError::NoFirmwareFailures { uuid: uuid.clone() });
            }
            let cleared = update.failures;
            update.failures = 0;
            update.last_failure = None;
            let mut events = vec![NewEvent::for_node(
                uuid,
                now,
                actor,
                Action::FirmwareRetry,
                format!(
                    "{reason}: {cleared} failed attempt(s) of bundle {} cleared",
                    update.bundle
                ),
            )];
            let parked_for_firmware = node.maintenance.as_ref().is_some_and(|hold| {
                hold.parked_by_controller() && hold.reason.starts_with("firmware update")
            });
            if parked_for_firmware {
                let heartbeat_fresh = node
                    .last_heartbeat_at_ms
                    .is_some_and(|at| now - at < fresh_ms);
                events.extend(lifecycle::apply_event(
                    node,
                    LifecycleEvent::MaintenanceOff { heartbeat_fresh },
                    now,
                    actor,
                    &reason,
                )?);
            }
            node.updated_at_ms = now;
            Ok(events)
        })
        .await
    }

    /// The fleet's firmware drift against each node's flavor, read a page at a time.
    pub async fn firmware_status(&self) -> Result<DriftReport, AppError> {
        let flavors = self.store.flavor_list().await?;
        let bundles = self.store.firmware_bundle_list().await?;
        let mut report = DriftReport::default();
        let mut after = None;
        loop {
            let page = self
                .store
                .node_list(&NodeFilter {
                    after: after.clone(),
                    limit: STATUS_PAGE,
                    ..NodeFilter::default()
                })
                .await?;
            for node in &page {
                if node.state == LifecycleState::Retired {
                    continue;
                }
                let Some(flavor) = node
                    .flavor
                    .as_ref()
                    .and_then(|name| flavors.iter().find(|f| &f.name == name))
                else {
                    continue;
                };
                report.add(
                    node,
                    &flavor.name,
                    &flavor.firmware_expected,
                    &bundles,
                    &self.settings.firmware,
                );
            }
            if page.len() < STATUS_PAGE {
                break;
            }
            after = page.last().map(|node| node.uuid.clone());
        }
        report.finish();
        Ok(report)
    }
}
