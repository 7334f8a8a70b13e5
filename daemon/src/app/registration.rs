//! Registration: a machine in stage 1 reports its hardware; Bearman records it, gives it
//! its addresses and tells it how to set up its BMC — addresses, node and audit events in
//! one store transaction (`Store::node_register`), so a lost race or a crash can neither
//! free another node's addresses nor leave any behind.

use bearman_proto::uuid::NodeUuid;
use bearman_proto::{BmcSettings, FirmwareVersions, RegisterRequest};

use crate::core::firmware::{self, FirmwareBundle, FirmwareRollout};

use super::{App, AppError, NODE_ACTOR, NODE_WRITE_ATTEMPTS_MAX};
use crate::core::ipam;
use crate::core::lifecycle::LifecycleState;
use crate::core::model::{Action, NewEvent, Node, NodeFilter, PoolPurpose, TimestampMs};
use crate::core::registration::{plan_registration, RegistrationPlan, RegistrationRefused};
use crate::core::validate;
use crate::store::{RegistrationWrite, StoreError};

/// What a registration answers the machine.
#[derive(Clone, Debug)]
pub struct Registration {
    pub node: Node,
    /// How to configure its BMC's LAN, when Bearman gave it an address.
    pub bmc: Option<BmcSettings>,
    /// What its flavor expects, for the agent's firmware check.
    pub firmware_expected: FirmwareVersions,
    /// The machine is recorded but not accepted: no address, no boot files yet.
    pub awaiting_acceptance: bool,
    /// The firmware bundle stage 1 is ordered to apply now, and the version it updates
    /// from (`core::firmware::on_registration`).
    pub firmware_update: Option<(FirmwareBundle, Option<String>)>,
    /// Why stage 1 must wait instead of booting.
    pub firmware_hold: Option<String>,
}

/// How long the boot watchdog leaves a machine that waits in stage 1 for a firmware
/// rollout slot: it registers again well within this while it waits (its backoff is
/// capped far below), so only a machine that stopped asking is judged stalled.
pub const FIRMWARE_HOLD_WATCH_MS: TimestampMs = 10 * 60_000;

impl App {
    /// Records the hardware a machine reports about itself. A uuid whose recorded
    /// hardware differs is refused (and the refusal audited) until an operator accepts
    /// the new identity. A machine the enrollment policy does not admit is recorded,
    /// Discovered, and waits for acceptance with no address (`awaiting_acceptance`).
    pub async fn node_register_hardware(
        &self,
        uuid: &NodeUuid,
        request: &RegisterRequest,
    ) -> Result<Registration, AppError> {
        let result = self.register_hardware(uuid, request).await;
        self.metrics.registration(match &result {
            Ok(registration) if registration.awaiting_acceptance => "awaiting_acceptance",
            Ok(_) => "registered",
            Err(AppError::Store(_)) => "failed",
            Err(_) => "refused",
        });
        result
    }

    async fn register_hardware(
        &self,
        uuid: &NodeUuid,
        request: &RegisterRequest,
    ) -> Result<Registration, AppError> {
        validate::check_register(request)?;
        let now = self.now_ms();
        let mut last_conflict = None;
        for _ in 0..NODE_WRITE_ATTEMPTS_MAX {
            let existing = self.store.node_get(uuid).await?;
            let plan = match plan_registration(
                existing.as_ref(),
                uuid,
                request,
                &self.settings.defaults,
                &self.settings.enrollment,
                now,
            ) {
                Ok(plan) => plan,
                Err(RegistrationRefused::IdentityMismatch { detail, .. }) => {
                    let event = NewEvent::for_node(
                        uuid,
                        now,
                        NODE_ACTOR,
                        Action::IdentityRefused,
                        detail.clone(),
                    );
                    self.append_throttled(&format!("{uuid} identity_refused"), event)
                        .await?;
                    tracing::warn!(%uuid, %detail, "registration refused: identity mismatch");
                    return Err(AppError::IdentityMismatch {
                        uuid: uuid.clone(),
                        detail,
                    });
                }
                Err(RegistrationRefused::Illegal(error)) => return Err(error.into()),
            };
            let (mut node, newly_accepted) = match plan {
                RegistrationPlan::Register {
                    node,
                    newly_accepted,
                } => (node, newly_accepted),
                RegistrationPlan::Wait {
                    node,
                    first,
                    changed,
                } => match self
                    .enlist(existing.as_ref(), node, first, changed, now)
                    .await
                {
                    Ok(registration) => return Ok(registration),
                    Err(AppError::Store(
                        error @ (StoreError::GenerationMismatch { .. }
                        | StoreError::AlreadyExists { .. }),
                    )) => {
                        last_conflict = Some(error);
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            let pools = self.store.pool_list().await?;
            let addresses = ipam::address_requests(&pools, &node, request.bmc.is_some());
            let flavor = match &node.flavor {
                Some(name) => self.store.flavor_get(name).await?,
                None => None,
            };
            let expected = flavor
                .as_ref()
                .map(|f| f.firmware_expected.clone())
                .unwrap_or_default();
            let (firmware, rollout) = self
                .plan_firmware(&mut node, request, &expected, now)
                .await?;
            // A machine waiting in stage 1 for the rollout registers again every minute
            // or so: while nothing changes, its record is rewritten (and a `register`
            // event written) at most every half hold window, so a paused rollout over a
            // thousand machines is not a thousand writes a minute.
            if let (Some(existing), Some(hold)) = (&existing, &firmware.hold) {
                if rollout.is_none()
                    && firmware.events.is_empty()
                    && existing.state == node.state
                    && held_until(existing)
                        .is_some_and(|until| until - now > FIRMWARE_HOLD_WATCH_MS / 2)
                {
                    return Ok(Registration {
                        node: existing.clone(),
                        bmc: None,
                        firmware_expected: expected,
                        awaiting_acceptance: false,
                        firmware_update: None,
                        firmware_hold: Some(hold.clone()),
                    });
                }
            }
            let mut events = Vec::new();
            if let Some(by) = &newly_accepted {
                events.push(NewEvent::for_node(
                    uuid,
                    now,
                    NODE_ACTOR,
                    Action::Accepted,
                    format!("accepted by {by}"),
                ));
            }
            events.push(
                NewEvent::for_node(
                    uuid,
                    now,
                    NODE_ACTOR,
                    Action::Register,
                    format!(
                        "serial {}, {} NIC(s), rack {}",
                        node.serial,
                        node.hardware.nics.len(),
                        node.rack.as_deref().unwrap_or("unknown")
                    ),
                )
                .with_states(
                    existing
                        .as_ref()
                        .map_or(LifecycleState::Discovered, |n| n.state),
                    node.state,
                ),
            );
            events.extend(firmware.events);
            // Behind with no bundle to fix it: said at every registration, as before.
            if firmware.update.is_none() && firmware.hold.is_none() {
                if let Some(mismatch) = firmware_mismatch(&expected, &node.firmware) {
                    events.push(NewEvent::for_node(
                        uuid,
                        now,
                        NODE_ACTOR,
                        Action::FirmwareMismatch,
                        mismatch,
                    ));
                }
            }
            let write = RegistrationWrite {
                expected_generation: existing.as_ref().map(|n| n.generation),
                node,
                addresses,
                events,
                at_ms: now,
                rollout,
            };
            match self.store.node_register(&write).await {
                Ok(registered) => {
                    let bmc = registered
                        .address(PoolPurpose::Bmc)
                        .map(|held| ipam::bmc_settings(&held.pool, &held.allocation))
                        .transpose()
                        .map_err(|error| {
                            StoreError::Corrupt(format!("stored bmc pool: {error}"))
                        })?;
                    for unfilled in &registered.unfilled {
                        let reason = format!(
                            "every {} pool is full ({}); registered without a {} address",
                            unfilled.purpose.as_str(),
                            unfilled.pools.join(", "),
                            unfilled.purpose.as_str()
                        );
                        tracing::warn!(%uuid, %reason, "address pools full");
                        let event = NewEvent::for_node(
                            uuid,
                            now,
                            NODE_ACTOR,
                            Action::BmcPoolExhausted,
                            reason,
                        );
                        self.append_throttled(&format!("{uuid} bmc_pool_exhausted"), event)
                            .await?;
                    }
                    let node = registered.node;
                    tracing::info!(%uuid, hostname = %node.hostname, state = %node.state, "registered");
                    return Ok(Registration {
                        node,
                        bmc,
                        firmware_expected: expected,
                        awaiting_acceptance: false,
                        firmware_update: firmware.update,
                        firmware_hold: firmware.hold,
                    });
                }
                Err(
                    error @ (StoreError::GenerationMismatch { .. }
                    | StoreError::AlreadyExists { .. }
                    | StoreError::Conflict { .. }),
                ) => {
                    // Lost a race with a concurrent registration of the same node (or its
                    // default hostname is taken): look again from the top. The lost
                    // transaction left nothing behind.
                    last_conflict = Some(error);
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(match last_conflict {
            Some(error) => error.into(),
            None => AppError::Busy {
                what: format!("node {uuid}"),
            },
        })
    }

    /// Records a machine that waits for acceptance: nothing is written when the record
    /// already says it all (a machine retrying), and a new one is refused once
    /// `enrollment.pending_max` machines wait.
    async fn enlist(
        &self,
        existing: Option<&Node>,
        node: Node,
        first: bool,
        changed: bool,
        now: TimestampMs,
    ) -> Result<Registration, AppError> {
        let uuid = node.uuid.clone();
        let waiting = |node: Node| Registration {
            node,
            bmc: None,
            firmware_expected: FirmwareVersions::default(),
            awaiting_acceptance: true,
            firmware_update: None,
            firmware_hold: None,
        };
        if !changed {
            return Ok(waiting(node));
        }
        let limit = self.settings.enrollment.pending_max;
        if first && self.pending_count(limit).await? >= limit {
            let reason = format!(
                "{limit} machines already wait for acceptance (enrollment.pending_max);                  accept or retire some, or raise the limit"
            );
            let event = NewEvent::for_node(
                &uuid,
                now,
                NODE_ACTOR,
                Action::EnlistmentRefused,
                reason.clone(),
            );
            // One key for all of them: a flood of made-up uuids is one story.
            self.append_throttled("enlistment_refused", event).await?;
            tracing::warn!(%uuid, "enlistment refused: too many machines wait for acceptance");
            return Err(AppError::EnlistmentFull { limit });
        }
        let reason = if first {
            format!(
                "serial {}, NIC(s) {}: waits for acceptance (bearman node accept {uuid})",
                node.serial,
                node.mac_set().join(", ")
            )
        } else {
            format!(
                "registered again as serial {}, NIC(s) {}; still waits for acceptance",
                node.serial,
                node.mac_set().join(", ")
            )
        };
        let event = NewEvent::for_node(&uuid, now, NODE_ACTOR, Action::Enlisted, reason);
        let write = RegistrationWrite {
            expected_generation: existing.map(|n| n.generation),
            node,
            addresses: Vec::new(),
            events: vec![event],
            at_ms: now,
            rollout: None,
        };
        let registered = self.store.node_register(&write).await?;
        tracing::info!(%uuid, "enlisted; waits for acceptance");
        Ok(waiting(registered.node))
    }

    /// How many machines wait for acceptance, counted up to `limit`.
    async fn pending_count(&self, limit: usize) -> Result<usize, AppError> {
        const PAGE: usize = 500;
        let mut count = 0;
        let mut after = None;
        loop {
            let page = self
                .store
                .node_list(&NodeFilter {
                    state: Some(LifecycleState::Discovered),
                    after: after.clone(),
                    limit: PAGE,
                    ..NodeFilter::default()
                })
                .await?;
            count += page
                .iter()
                .filter(|node| node.pending_acceptance.is_some())
                .count();
            if count >= limit || page.len() < PAGE {
                return Ok(count);
            }
            after = page.last().map(|node| node.uuid.clone());
        }
    }

    /// An operator accepts a machine that waits: its next registration gets its
    /// addresses and boot files, and binds the identity it then reports.
    pub async fn node_accept(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        reason: Option<&str>,
    ) -> Result<Node, AppError> {
        let reason = validate::reason_or(reason, "accepted by an operator")?;
        let now = self.now_ms();
        self.mutate_node(uuid, |node| {
            if node.pending_acceptance.is_none() {
                return Err(AppError::NotAwaitingAcceptance { uuid: uuid.clone() });
            }
            node.pending_acceptance = None;
            node.updated_at_ms = now;
            Ok(vec![NewEvent::for_node(
                uuid,
                now,
                actor,
                Action::Accepted,
                format!(
                    "{reason} (serial {}, NIC(s) {})",
                    node.serial,
                    node.mac_set().join(", ")
                ),
            )])
        })
        .await
    }
}

/// Until when the boot watchdog leaves `node` waiting for a firmware rollout slot, when it
/// waits for one (and has no update in flight).
fn held_until(node: &Node) -> Option<TimestampMs> {
    let boot = node.boot?;
    let in_flight = node
        .firmware_update
        .as_ref()
        .is_some_and(|update| update.in_flight.is_some());
    (boot.phase == crate::core::model::BootPhase::Firmware && !in_flight)
        .then_some(boot.until_ms)
        .flatten()
}

/// What a registration decided about the node's firmware, for the write and the answer.
struct RegistrationFirmwarePlan {
    events: Vec<NewEvent>,
    update: Option<(FirmwareBundle, Option<String>)>,
    hold: Option<String>,
}

impl App {
    /// The firmware part of a registration (`core::firmware::on_registration`): records
    /// the inventory into `node`, ends an update in flight, orders the next one or holds
    /// the machine, and returns the rollout to write with the node when it changed.
    async fn plan_firmware(
        &self,
        node: &mut Node,
        request: &RegisterRequest,
        expected: &FirmwareVersions,
        now: TimestampMs,
    ) -> Result<(RegistrationFirmwarePlan, Option<FirmwareRollout>), AppError> {
        let uuid = node.uuid.clone();
        if *expected == FirmwareVersions::default() && node.firmware_update.is_none() {
            // Nothing expected and nothing in flight: the inventory is all there is; the
            // bundles and the rollout are not read on this path.
            let notes = firmware::record_inventory(node, &request.firmware, now);
            return Ok((
                RegistrationFirmwarePlan {
                    events: super::firmware::note_events(&uuid, &notes, now),
                    update: None,
                    hold: None,
                },
                None,
            ));
        }
        let bundles = self.store.firmware_bundle_list().await?;
        let mut rollout = self.store.firmware_rollout_get().await?;
        let decision = firmware::on_registration(
            node,
            &request.firmware,
            expected,
            &bundles,
            &mut rollout,
            &self.settings.firmware,
            now,
        );
        let mut events = super::firmware::note_events(&uuid, &decision.notes, now);
        if let Some(reason) = &decision.maintenance {
            events.extend(super::firmware::park(node, reason, now));
        }
        let update = decision.order.map(|bundle| {
            let from = node
                .firmware_update
                .as_ref()
                .and_then(|update| update.from_version.clone());
            (bundle, from)
        });
        if let Some(in_flight) = node
            .firmware_update
            .as_ref()
            .and_then(|update| update.in_flight)
            .filter(|_| update.is_some())
        {
            node.enter_firmware_update(now, in_flight.deadline_ms);
        } else if decision.hold.is_some() {
            node.enter_firmware_update(now, now + FIRMWARE_HOLD_WATCH_MS);
        }
        if let Some(hold) = &decision.hold {
            tracing::info!(%uuid, %hold, "firmware: machine held in stage 1");
        }
        Ok((
            RegistrationFirmwarePlan {
                events,
                update,
                hold: decision.hold,
            },
            decision.rollout_changed.then_some(rollout),
        ))
    }
}

/// Orphans named in the start-up report's log line and event, at most.
const ORPHANS_LISTED_MAX: usize = 10;

impl App {
    /// The start-up check: addresses allocated to nobody (left by a version that wrote
    /// registrations in two transactions). They are reported — a warning and one audit
    /// event — not freed: an operator decides. Returns how many there are.
    pub async fn report_orphan_addresses(&self) -> Result<usize, AppError> {
        let orphans = self.store.ip_orphans().await?;
        if orphans.is_empty() {
            return Ok(0);
        }
        let listed: Vec<String> = orphans
            .iter()
            .take(ORPHANS_LISTED_MAX)
            .map(|orphan| {
                format!(
                    "{} {} held by {} ({})",
                    orphan.allocation.pool,
                    orphan.allocation.address,
                    orphan.allocation.node_uuid,
                    orphan.reason.as_str()
                )
            })
            .collect();
        let more = orphans.len().saturating_sub(ORPHANS_LISTED_MAX);
        let reason = format!(
            "{} address allocation(s) held by no node record: {}{}",
            orphans.len(),
            listed.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
        tracing::warn!(orphans = orphans.len(), %reason, "orphan address allocations found");
        let event = NewEvent::global(
            self.now_ms(),
            super::SYSTEM_ACTOR,
            Action::OrphanAddresses,
            reason,
        );
        self.store.event_append(&[event]).await?;
        Ok(orphans.len())
    }
}

/// Describes how reported firmware differs from what the flavor expects, if it does.
fn firmware_mismatch(expected: &FirmwareVersions, reported: &FirmwareVersions) -> Option<String> {
    let differences = bearman_proto::firmware::differences(expected, reported);
    (!differences.is_empty()).then(|| {
        let listed: Vec<String> = differences.iter().map(ToString::to_string).collect();
        format!("firmware behind: {}", listed.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::core::model::{EventFilter, IpPool, NodeRole};
    use crate::core::registration::RegistrationDefaults;
    use crate::store::memory::MemoryStore;
    use crate::store::Store;

    struct FixedClock;
    impl crate::runtime::Clock for FixedClock {
        fn now_ms(&self) -> i64 {
            42
        }
    }

    #[tokio::test]
    async fn orphan_addresses_an_older_version_left_are_reported_once_at_start() {
        let store = Arc::new(MemoryStore::new());
        let app = App::new(
            store.clone(),
            Arc::new(FixedClock),
            super::super::Settings {
                defaults: RegistrationDefaults {
                    role: NodeRole::Compute,
                    flavor: None,
                },
                enrollment: crate::core::enrollment::EnrollmentPolicy::default(),
                heartbeat_fresh_ms: 0,
                firmware: Default::default(),
            },
        );
        assert_eq!(app.report_orphan_addresses().await.unwrap(), 0);
        let pool = IpPool {
            name: "fleet".into(),
            purpose: PoolPurpose::Node,
            vlan: None,
            cidr: "10.0.0.0/24".into(),
            range_start: "10.0.0.10".into(),
            range_end: "10.0.0.20".into(),
            gateway: None,
            dns: vec![],
            mtu: 1500,
        };
        store.pool_create(&pool, &[]).await.unwrap();
        // What the two-transaction registration left behind after a crash: an address
        // allocated to a uuid that never got a node record.
        let ghost = NodeUuid::from_index(9, 9);
        store
            .ip_allocate("fleet", &ghost, PoolPurpose::Node, 1)
            .await
            .unwrap();
        assert_eq!(app.report_orphan_addresses().await.unwrap(), 1);
        let events = store.event_list(&EventFilter::default()).await.unwrap();
        let reported: Vec<&str> = events
            .iter()
            .filter(|e| e.action == Action::OrphanAddresses)
            .map(|e| e.reason.as_str())
            .collect();
        assert_eq!(
            reported,
            vec![format!(
                "1 address allocation(s) held by no node record: fleet 10.0.0.10 held by {ghost} (node_missing)"
            )]
        );
        // Reported, not freed: an operator decides.
        assert_eq!(store.ip_list(None, None).await.unwrap().len(), 1);
    }
}
