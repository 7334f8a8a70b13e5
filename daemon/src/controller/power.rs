//! Power sync in the controller's driver: run the BMC power polls the core says are due
//! (`core::controller` picks them with `core::power_sync`, bounded per tick and in
//! flight), record each reading, and write an audit event when a node's reading changes
//! (`power_sync::reading_changed`).
//!
//! Polls run as their own tasks, never inside the tick: a slow or hung BMC delays only
//! its own poll, for at most what the BMC guards allow (`bmc.queue_timeout_ms` +
//! `bmc.call_timeout_ms`), and the node is not polled again until that poll ends (or
//! panics: the in-flight slot is freed either way).

use std::sync::Arc;

use bearman_proto::uuid::NodeUuid;

use crate::bmc::PowerState;
use crate::core::model::{Action, NewEvent};
use crate::core::power_sync::{self, PowerReading, PowerReadingState};

use super::{panic_message, CatchUnwind, Controller, InFlight, SYSTEM_ACTOR};

impl Controller {
    /// Starts a poll of `uuid`'s power state in its own task, unless one is in flight.
    pub(super) fn spawn_power_poll(
        self: &Arc<Self>,
        uuid: NodeUuid,
        before: Option<PowerReading>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let in_flight = InFlight::claim(&self.polls_in_flight, uuid.clone())?;
        let controller = self.clone();
        Some(tokio::spawn(async move {
            let _in_flight = in_flight;
            if let Err(panic) = CatchUnwind::new(controller.poll_power(&uuid, before)).await {
                tracing::error!(%uuid, reason = %panic_message(panic), "power poll panicked");
            }
        }))
    }

    /// Polls in flight right now (for the guards view and tests).
    pub fn power_polls_in_flight(&self) -> usize {
        self.lock_polls().len()
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
