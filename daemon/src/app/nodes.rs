//! Node records: enrolment and edits by operators, lifecycle actions, and what a node
//! says about itself after registering (boot started, installed, heartbeats).

use std::net::IpAddr;

use bearman_proto::uuid::NodeUuid;

use super::{App, AppError, NODE_ACTOR, SYSTEM_ACTOR};
use crate::core::lifecycle::{apply_event, transition, LifecycleEvent, LifecycleState};
use crate::core::model::{Action, BmcConfig, BootPhase, NewEvent, Node, NodeRole};
use crate::core::validate::{check_bmc, check_hostname, check_rack, FieldError};

/// Refuses a hostname that is another node's default (`node-<its uuid>`).
fn check_hostname_not_reserved(hostname: &str, uuid: &NodeUuid) -> Result<(), FieldError> {
    if crate::core::registration::hostname_reserved_for_other(hostname, uuid) {
        return Err(FieldError {
            field: "hostname".into(),
            problem: format!(
                "{hostname:?} is the default hostname of another node; default hostnames are reserved for the node whose uuid they name"
            ),
        });
    }
    Ok(())
}

/// How many nodes are in each state (`GET /api/v1/summary`).
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Eq)]
pub struct Summary {
    pub total: usize,
    pub by_state: std::collections::BTreeMap<String, usize>,
}

/// An operator's new node, before it ever booted.
#[derive(Clone, Debug)]
pub struct Enrollment {
    pub uuid: NodeUuid,
    pub hostname: Option<String>,
    pub role: Option<NodeRole>,
    pub rack: Option<String>,
    pub flavor: Option<String>,
    pub bmc: Option<BmcConfig>,
}

/// An operator's edit of a node; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct NodeChanges {
    pub hostname: Option<String>,
    pub role: Option<NodeRole>,
    pub rack: Option<String>,
    /// An empty string clears the flavor.
    pub flavor: Option<String>,
    pub bmc: Option<BmcConfig>,
    /// If given, the edit applies only while the node is still at this generation.
    pub generation: Option<i64>,
}

impl App {
    async fn check_flavor_exists(&self, flavor: &str) -> Result<(), AppError> {
        if self.store.flavor_get(flavor).await?.is_none() {
            return Err(FieldError {
                field: "flavor".into(),
                problem: format!("flavor {flavor} does not exist"),
            }
            .into());
        }
        Ok(())
    }

    pub async fn node_enroll(&self, actor: &str, enrollment: Enrollment) -> Result<Node, AppError> {
        let Enrollment {
            uuid,
            hostname,
            role,
            rack,
            flavor,
            bmc,
        } = enrollment;
        let hostname =
            hostname.unwrap_or_else(|| crate::core::registration::default_hostname(&uuid));
        check_hostname(&hostname)?;
        check_hostname_not_reserved(&hostname, &uuid)?;
        if let Some(rack) = &rack {
            check_rack(rack)?;
        }
        if let Some(flavor) = &flavor {
            self.check_flavor_exists(flavor).await?;
        }
        if let Some(bmc) = &bmc {
            check_bmc(bmc)?;
        }
        let now = self.now_ms();
        let defaults = &self.settings.defaults;
        let mut node = Node::new(uuid.clone(), hostname, role.unwrap_or(defaults.role), now);
        node.rack = rack;
        node.flavor = flavor.or_else(|| defaults.flavor.clone());
        if let Some(bmc) = bmc {
            node.bmc = bmc;
        }
        let event = NewEvent::for_node(&uuid, now, actor, Action::Enroll, "enrolled by operator");
        Ok(self.store.node_create(&node, &[event]).await?)
    }

    pub async fn node_update(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        changes: NodeChanges,
    ) -> Result<Node, AppError> {
        if let Some(hostname) = &changes.hostname {
            check_hostname(hostname)?;
            check_hostname_not_reserved(hostname, uuid)?;
        }
        if let Some(rack) = &changes.rack {
            check_rack(rack)?;
        }
        if let Some(bmc) = &changes.bmc {
            check_bmc(bmc)?;
        }
        if let Some(flavor) = changes.flavor.as_deref().filter(|f| !f.is_empty()) {
            self.check_flavor_exists(flavor).await?;
        }
        let now = self.now_ms();
        self.mutate_node(uuid, |node| {
            if let Some(expected) = changes.generation {
                if node.generation != expected {
                    return Err(AppError::GenerationMismatch {
                        uuid: uuid.clone(),
                        expected,
                        found: node.generation,
                    });
                }
            }
            let described = apply_changes(node, &changes);
            if described.is_empty() {
                return Ok(vec![]);
            }
            Ok(vec![NewEvent::for_node(
                uuid,
                now,
                actor,
                Action::Update,
                described.join(", "),
            )])
        })
        .await
    }

    /// An operator's lifecycle action (maintenance on, retire): who asked and why are
    /// recorded with the change.
    pub async fn node_lifecycle(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        event: LifecycleEvent,
        reason: &str,
    ) -> Result<Node, AppError> {
        let now = self.now_ms();
        let node = self
            .mutate_node(uuid, |node| {
                Ok(apply_event(node, event, now, actor, reason)?
                    .into_iter()
                    .collect())
            })
            .await?;
        tracing::info!(%uuid, action = event.name(), actor = %actor, state = %node.state, "operator action");
        Ok(node)
    }

    /// Leaves maintenance: to Ready when the node is heartbeating, else to Registered (it
    /// must boot again before it is trusted).
    pub async fn node_maintenance_off(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        reason: &str,
    ) -> Result<Node, AppError> {
        let now = self.now_ms();
        let fresh_ms = self.settings.heartbeat_fresh_ms;
        let node = self
            .mutate_node(uuid, |node| {
                let heartbeat_fresh = node
                    .last_heartbeat_at_ms
                    .is_some_and(|at| now - at <= fresh_ms);
                let event = LifecycleEvent::MaintenanceOff { heartbeat_fresh };
                Ok(apply_event(node, event, now, actor, reason)?
                    .into_iter()
                    .collect())
            })
            .await?;
        tracing::info!(%uuid, action = "maintenance_off", actor = %actor, state = %node.state, "operator action");
        Ok(node)
    }

    /// Forgets the recorded serial and MACs so the next registration binds the node to
    /// the hardware that answers to its uuid (after a board swap or NIC replacement).
    pub async fn node_accept_identity(
        &self,
        actor: &str,
        uuid: &NodeUuid,
        reason: &str,
    ) -> Result<Node, AppError> {
        let now = self.now_ms();
        self.mutate_node(uuid, |node| {
            node.serial.clear();
            node.hardware.nics.clear();
            Ok(vec![NewEvent::for_node(
                uuid,
                now,
                actor,
                Action::AcceptIdentity,
                reason,
            )])
        })
        .await
    }

    /// Whether a `GET /ipxe/{uuid}` from `node` would write nothing: its state stays and
    /// the fetch is already its boot milestone. A boot storm's repeated fetches then cost
    /// a read (and may be served from the script cache).
    pub fn boot_started_is_noop(node: &Node) -> bool {
        transition(node.state, LifecycleEvent::BootStarted).is_ok_and(|next| next == node.state)
            && node
                .boot
                .is_some_and(|boot| boot.phase == BootPhase::OsFetched)
    }

    /// The node fetched its target OS (`GET /ipxe/{uuid}`): the lifecycle moves and the
    /// boot milestone is recorded, only when either changes.
    pub async fn node_boot_started(&self, node: &Node) -> Result<Node, AppError> {
        if Self::boot_started_is_noop(node) {
            return Ok(node.clone());
        }
        let now = self.now_ms();
        self.mutate_node(&node.uuid, |node| {
            let events = apply_event(
                node,
                LifecycleEvent::BootStarted,
                now,
                NODE_ACTOR,
                "fetched its target OS",
            )?;
            node.reach_boot_phase(BootPhase::OsFetched, now);
            Ok(events.into_iter().collect())
        })
        .await
    }

    /// The stage-1 agent announced itself (`POST /ipxe/{uuid}/progress`): a boot
    /// milestone no other request shows. Recorded (with an audit event) once per boot,
    /// and only for a node that is booting; anything else changes nothing. `None` for a
    /// machine not known yet (its first boot: it registers next).
    pub async fn node_boot_progress(
        &self,
        uuid: &NodeUuid,
        phase: BootPhase,
    ) -> Result<Option<Node>, AppError> {
        if phase != BootPhase::Stage1 {
            return Err(FieldError {
                field: "phase".into(),
                problem: format!(
                    "{} is witnessed by the daemon itself; only stage1 is reported",
                    phase.as_str()
                ),
            }
            .into());
        }
        let Some(node) = self.store.node_get(uuid).await? else {
            return Ok(None);
        };
        if node.boot.is_some_and(|boot| boot.phase == phase) || !booting(node.state) {
            return Ok(Some(node));
        }
        let now = self.now_ms();
        self.mutate_node(uuid, |node| {
            if !booting(node.state) || !node.reach_boot_phase(phase, now) {
                return Ok(vec![]);
            }
            Ok(vec![NewEvent::for_node(
                uuid,
                now,
                NODE_ACTOR,
                Action::BootProgress,
                "stage 1 started",
            )])
        })
        .await
        .map(Some)
    }

    /// Stage 2 is up (`POST …/installed`).
    pub async fn node_installed(
        &self,
        uuid: &NodeUuid,
        os_release: Option<&str>,
    ) -> Result<Node, AppError> {
        if let Some(release) = os_release {
            crate::core::validate::check_reported_text("os_release", release)?;
        }
        let now = self.now_ms();
        let reason = match os_release {
            Some(release) => format!(
                "stage 2 up: {}",
                release.chars().take(120).collect::<String>()
            ),
            None => "stage 2 up".to_string(),
        };
        self.mutate_node(uuid, |node| {
            let events: Vec<NewEvent> =
                apply_event(node, LifecycleEvent::Installed, now, NODE_ACTOR, &reason)?
                    .into_iter()
                    .collect();
            if !events.is_empty() {
                node.installed_at_ms = Some(now);
                node.last_heartbeat_at_ms = Some(now);
                node.reach_boot_phase(BootPhase::Installed, now);
            }
            Ok(events)
        })
        .await
        .inspect(|_| self.metrics.installed())
    }

    /// A heartbeat from `source` (the peer address; `None` when the caller has none). The
    /// hot path (a Ready node heard from where it was last heard from) records liveness
    /// without a generation bump; one that moves the state (a Suspect node heard again)
    /// or comes from a new address is a full write, the latter with a
    /// `heartbeat_source_changed` event; one from a node that should be silent (fenced,
    /// never installed) is refused and recorded loudly. Answers the node's state after it.
    pub async fn node_heartbeat(
        &self,
        uuid: &NodeUuid,
        source: Option<IpAddr>,
    ) -> Result<LifecycleState, AppError> {
        let now = self.now_ms();
        // The shared copy: a steady heartbeat reads the record and writes one timestamp,
        // and copying the whole record (hardware facts and all) was most of its cost.
        let node = self
            .store
            .node_get_shared(uuid)
            .await?
            .ok_or_else(|| AppError::NodeNotRegistered { uuid: uuid.clone() })?;
        if node
            .drill_silenced_until_ms
            .is_some_and(|until| now < until)
        {
            // A drill's `silence`: the daemon does not hear this node (nothing recorded,
            // so its health judgement sees it go quiet, exactly as behind a partition).
            return Ok(node.state);
        }
        let steady =
            transition(node.state, LifecycleEvent::Heartbeat).is_ok_and(|next| next == node.state);
        if steady && node.heartbeat_source_change(source, now).is_none() {
            let state = node.state;
            // Let go of the shared copy first: a caching store moves its copy's timestamp
            // in place only while no one else holds it, and copies it otherwise.
            drop(node);
            self.store.node_record_heartbeat(uuid, now).await?;
            self.metrics.heartbeat();
            return Ok(state);
        }
        let result = self
            .mutate_node(uuid, |node| {
                let mut events: Vec<NewEvent> = apply_event(
                    node,
                    LifecycleEvent::Heartbeat,
                    now,
                    NODE_ACTOR,
                    "heartbeat resumed",
                )
                .inspect_err(|_| {
                    tracing::warn!(%uuid, state = %node.state, "heartbeat from a node that should be silent");
                })?
                .into_iter()
                .collect();
                node.last_heartbeat_at_ms = Some(now);
                if let Some(change) = node.heartbeat_source_change(source, now) {
                    let reason = match node.heartbeat_source {
                        Some(before) => format!(
                            "heartbeats from {} (were from {})",
                            change.address, before.address
                        ),
                        None => format!("heartbeats from {}", change.address),
                    };
                    tracing::info!(%uuid, source = %change.address, "{reason}");
                    events.push(NewEvent::for_node(
                        uuid,
                        now,
                        NODE_ACTOR,
                        Action::HeartbeatSourceChanged,
                        reason,
                    ));
                    node.heartbeat_source = Some(change);
                }
                Ok(events)
            })
            .await;
        if result.is_ok() {
            self.metrics.heartbeat();
        }
        if let Err(AppError::IllegalTransition(illegal)) = &result {
            let event = NewEvent::for_node(
                uuid,
                now,
                NODE_ACTOR,
                Action::UnexpectedHeartbeat,
                illegal.to_string(),
            );
            // A silent node's agent heartbeats every few seconds: one event a window.
            self.append_throttled(&format!("{uuid} unexpected_heartbeat"), event)
                .await?;
        }
        result.map(|node| node.state)
    }

    /// The controller's verdict on a Ready node that stopped heartbeating. A node that
    /// is no longer Ready (heard again, taken by an operator) is left alone.
    pub async fn node_mark_suspect(&self, uuid: &NodeUuid, grace_s: i64) -> Result<Node, AppError> {
        let now = self.now_ms();
        self.mutate_node(uuid, |node| {
            if node.state != crate::core::lifecycle::LifecycleState::Ready {
                return Ok(vec![]);
            }
            Ok(apply_event(
                node,
                LifecycleEvent::HeartbeatsMissed,
                now,
                SYSTEM_ACTOR,
                &format!("no heartbeat for more than {grace_s} s"),
            )?
            .into_iter()
            .collect())
        })
        .await
    }
}

/// Applies an operator's edit to `node`, describing each change for the audit trail.
fn apply_changes(node: &mut Node, changes: &NodeChanges) -> Vec<String> {
    let mut described = Vec::new();
    if let Some(hostname) = &changes.hostname {
        if &node.hostname != hostname {
            described.push(format!("hostname {} -> {hostname}", node.hostname));
            node.hostname = hostname.clone();
        }
    }
    if let Some(role) = changes.role {
        if node.role != role {
            described.push(format!("role {} -> {}", node.role.as_str(), role.as_str()));
            node.role = role;
        }
    }
    if let Some(rack) = &changes.rack {
        if node.rack.as_ref() != Some(rack) {
            described.push(format!("rack -> {rack}"));
            node.rack = Some(rack.clone());
        }
    }
    if let Some(flavor) = &changes.flavor {
        let new = (!flavor.is_empty()).then(|| flavor.clone());
        if node.flavor != new {
            described.push(format!("flavor -> {}", new.as_deref().unwrap_or("(none)")));
            node.flavor = new;
        }
    }
    if let Some(bmc) = &changes.bmc {
        if &node.bmc != bmc {
            described.push("bmc settings".to_string());
            node.bmc = bmc.clone();
        }
    }
    described
}

/// Whether a node in `state` may be on its way through a boot: not one being fenced or
/// fenced (it must stay off; its own heartbeat is refused the same way) or retired.
fn booting(state: LifecycleState) -> bool {
    !matches!(
        state,
        LifecycleState::Fencing | LifecycleState::Fenced | LifecycleState::Retired
    )
}
