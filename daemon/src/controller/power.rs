//! Power sync in the controller: each tick, start the BMC power polls `core::power_sync`
//! says are due (bounded per tick and in flight), record each reading, and write an audit
//! event when a node's reading changes.
//!
//! Polls run as their own tasks, never inside the tick: a slow or hung BMC delays only
//! its own poll, for at most what the BMC guards allow (`bmc.queue_timeout_ms` +
//! `bmc.call_timeout_ms`), and the node is not polled again until that poll ends.

use std::collections::BTreeSet;
use std::sync::Arc;

use bearman_proto::uuid::NodeUuid;

use crate::bmc::PowerState;
use crate::core::health::NodeHealth;
use crate::core::model::{Action, NewEvent, TimestampMs};
use crate::core::power_sync::{self, PowerReading, PowerReadingState};
use crate::core::remediation::Remediation;

use super::{Controller, SYSTEM_ACTOR};

impl Controller {
    /// Starts the power polls due now: not for nodes with a poll in flight or an active
    /// remediation (the saga reads the BMC itself, and a BMC takes one call at a time).
    pub(super) fn start_power_polls(
        self: &Arc<Self>,
        nodes: &[NodeHealth],
        active: &[Remediation],
        now: TimestampMs,
    ) {
        if self.config.health.power_poll_interval_ms <= 0 {
            return;
        }
        let busy: BTreeSet<&str> = active.iter().map(|r| r.node_uuid.as_str()).collect();
        let due = {
            let in_flight = self
                .polls_in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let room = self
                .config
                .power_polls_in_flight_max
                .saturating_sub(in_flight.len())
                .min(self.config.power_polls_per_tick_max);
            if room == 0 {
                return;
            }
            power_sync::due_polls(nodes, now, &self.config.health, room, |uuid| {
                in_flight.contains(uuid) || busy.contains(uuid.as_str())
            })
        };
        for uuid in due {
            let before = nodes
                .iter()
                .find(|n| n.uuid == uuid)
                .and_then(|n| n.power.clone());
            self.polls_in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uuid.clone());
            let controller = self.clone();
            tokio::spawn(async move {
                controller.poll_power(&uuid, before).await;
                controller
                    .polls_in_flight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&uuid);
            });
        }
    }

    /// Polls in flight right now (for the guards view and tests).
    pub fn power_polls_in_flight(&self) -> usize {
        self.polls_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Asks `uuid`'s BMC for its power state once and records the answer (or why there
    /// is none) as its last reading.
    async fn poll_power(&self, uuid: &NodeUuid, before: Option<PowerReading>) {
        let store = &self.app.store;
        let node = match store.node_get(uuid).await {
            Ok(Some(node)) => node,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%uuid, %error, "power poll: cannot read node");
                return;
            }
        };
        let answer = match self.bmcs.bmc_for(&node) {
            Ok(bmc) => bmc.power_state().await.map_err(|error| error.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let now = self.app.clock.now_ms();
        let reading = match answer {
            Ok(PowerState::On) => PowerReading::known(PowerReadingState::On, now),
            Ok(PowerState::Off) => PowerReading::known(PowerReadingState::Off, now),
            Err(error) => PowerReading::unknown(&error, now),
        };
        let mut events = Vec::new();
        if power_sync::reading_changed(before.as_ref(), &reading) {
            let was = before
                .as_ref()
                .map_or("no reading".to_string(), |b| format!("was {}", b.state));
            let reason = match &reading.error {
                Some(error) => format!("BMC power state unknown ({was}): {error}"),
                None => format!("BMC reads power {} ({was})", reading.state),
            };
            if reading.state == PowerReadingState::Off {
                tracing::warn!(%uuid, hostname = %node.hostname, state = %node.state, "BMC reads power off for a node that should be running");
            }
            events.push(NewEvent::for_node(
                uuid,
                now,
                SYSTEM_ACTOR,
                Action::PowerStateChanged,
                reason,
            ));
        }
        if let Err(error) = store.node_power_record(uuid, &reading, &events).await {
            tracing::warn!(%uuid, %error, "power poll: cannot record the reading");
        }
    }
}
