//! Power actions on one BMC, each verified by readback ([`act`]): what the daemon runs for
//! `POST /api/v1/nodes/{uuid}/power` (`controller::operator_power`, through the node's
//! guarded driver) and what `bearman bmc …` runs straight from an operator's machine when
//! the daemon is down (only with `--direct-bypassing-audit`); and `check_all`, which
//! probes many BMCs with bounded parallelism for a table.
//!
//! Architecture invariant: nothing here prints or parses arguments; the CLI wires clap to
//! these functions and prints what they return. Power changes are reported done only
//! when the BMC reads back the state asked for.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::guard::{await_power, power_off_verified, power_word};
use super::provider::{driver_name, node_label, ConnectError, DriverBmcs};
use super::{Bmc, BmcError, PowerState};
use crate::bmc::BmcProvider;
use crate::core::model::Node;

/// What `bearman bmc` can do to one BMC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// Read the power state.
    Status,
    /// Power on, then read back until on.
    On,
    /// Hard power off, then read back until off (a fence).
    Off,
    /// Verified off, then on and read back until on.
    Cycle,
    /// Network boot (PXE) at the next boot only; the power is left as it is.
    Pxe,
    /// Clean (ACPI) power off, then read back until off. A hung OS never shuts down: the
    /// readback then fails and a hard `Off` is the next step.
    SoftOff,
    /// Network boot (PXE) now: next boot from the network, then powered on (from off) or
    /// cycled (verified off, then on), read back until on.
    PxeBoot,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Status => "status",
            PowerAction::On => "on",
            PowerAction::Off => "off",
            PowerAction::Cycle => "cycle",
            PowerAction::Pxe => "pxe",
            PowerAction::SoftOff => "soft_off",
            PowerAction::PxeBoot => "pxe_boot",
        }
    }
}

/// How power changes are verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Readback {
    /// Reads of the power state before giving up (at least one).
    pub readbacks_max: u32,
    /// Wait before the first read; doubled up to 8× for later ones.
    pub backoff: Duration,
}

impl Default for Readback {
    fn default() -> Self {
        Readback {
            readbacks_max: 8,
            backoff: Duration::from_secs(1),
        }
    }
}

/// The outcome of one action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReport {
    pub bmc: String,
    pub action: PowerAction,
    /// The power state the BMC last reported: "on" or "off".
    pub power: String,
    /// Readbacks it took to verify the change (0 for status and pxe).
    pub readbacks: u32,
    pub elapsed_ms: u64,
    /// What the operator should know, e.g. that PXE takes effect at the next boot.
    pub note: String,
}

impl ActionReport {
    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "{}: {} done; power is {} ({} ms",
            self.bmc,
            self.action.as_str(),
            self.power,
            self.elapsed_ms
        );
        if self.readbacks > 0 {
            line.push_str(&format!(", verified after {} readbacks", self.readbacks));
        }
        line.push(')');
        if !self.note.is_empty() {
            line.push_str("; ");
            line.push_str(&self.note);
        }
        line
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Bmc(#[from] BmcError),
}

fn elapsed_ms(started: tokio::time::Instant) -> u64 {
    started.elapsed().as_millis().min(u64::MAX as u128) as u64
}

/// Does `action` to `bmc` (named `name` in reports and errors), verifying power changes.
pub async fn act(
    bmc: &dyn Bmc,
    name: &str,
    action: PowerAction,
    readback: Readback,
) -> Result<ActionReport, BmcError> {
    let started = tokio::time::Instant::now();
    let mut note = String::new();
    let (power, readbacks) = match action {
        PowerAction::Status => (bmc.power_state().await?, 0),
        PowerAction::On => {
            bmc.power_on().await?;
            let readbacks = await_power(
                bmc,
                name,
                PowerState::On,
                "power_on",
                readback.readbacks_max,
                readback.backoff,
            )
            .await?;
            (PowerState::On, readbacks)
        }
        PowerAction::Off => {
            let readbacks =
                power_off_verified(bmc, name, readback.readbacks_max, readback.backoff).await?;
            (PowerState::Off, readbacks)
        }
        PowerAction::Cycle => {
            let off =
                power_off_verified(bmc, name, readback.readbacks_max, readback.backoff).await?;
            bmc.power_on().await?;
            let on = await_power(
                bmc,
                name,
                PowerState::On,
                "power_cycle",
                readback.readbacks_max,
                readback.backoff,
            )
            .await?;
            note = "powered off (verified) and on again".into();
            (PowerState::On, off + on)
        }
        PowerAction::Pxe => {
            bmc.set_next_boot_pxe().await?;
            let power = bmc.power_state().await?;
            note = match power {
                PowerState::On => {
                    "boots from the network at its next boot; `bearman bmc power cycle` to boot now"
                }
                PowerState::Off => "boots from the network when powered on",
            }
            .into();
            (power, 0)
        }
        PowerAction::SoftOff => {
            bmc.power_off_soft().await?;
            let readbacks = await_power(
                bmc,
                name,
                PowerState::Off,
                "power_off_soft",
                readback.readbacks_max,
                readback.backoff,
            )
            .await?;
            (PowerState::Off, readbacks)
        }
        PowerAction::PxeBoot => {
            bmc.set_next_boot_pxe().await?;
            let mut readbacks = 0;
            if bmc.power_state().await? == PowerState::On {
                readbacks +=
                    power_off_verified(bmc, name, readback.readbacks_max, readback.backoff).await?;
                note = "set to boot from the network, powered off (verified) and on again".into();
            } else {
                note = "set to boot from the network and powered on".into();
            }
            bmc.power_on().await?;
            readbacks += await_power(
                bmc,
                name,
                PowerState::On,
                "pxe_boot",
                readback.readbacks_max,
                readback.backoff,
            )
            .await?;
            (PowerState::On, readbacks)
        }
    };
    Ok(ActionReport {
        bmc: name.to_string(),
        action,
        power: power_word(power).to_string(),
        readbacks,
        elapsed_ms: elapsed_ms(started),
        note,
    })
}

/// Does `action` to `node`'s BMC, resolving its driver and credentials through `bmcs`.
pub async fn act_on_node(
    bmcs: &DriverBmcs,
    node: &Node,
    action: PowerAction,
) -> Result<ActionReport, OpsError> {
    let label = node_label(node);
    let bmc = bmcs.connect(&label, &node.bmc)?;
    let readback = Readback {
        readbacks_max: bmcs.settings().readbacks_max,
        backoff: bmcs.settings().readback_backoff(),
    };
    let name = bmc.name().to_string();
    Ok(act(bmc.as_ref(), &name, action, readback).await?)
}

/// One BMC probed by [`check_all`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRow {
    pub node: String,
    pub uuid: String,
    pub address: String,
    pub driver: String,
    /// "on" or "off" when the BMC answered.
    pub power: Option<String>,
    /// Why there is no power state.
    pub error: Option<String>,
    pub latency_ms: u64,
}

/// Column headers for [`check_rows_table`].
pub const CHECK_HEADERS: [&str; 5] = ["NODE", "ADDRESS", "DRIVER", "POWER", "LATENCY"];

/// Table cells for `rows`: POWER shows the error when the BMC did not answer.
pub fn check_rows_table(rows: &[CheckRow]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| {
            vec![
                row.node.clone(),
                row.address.clone(),
                row.driver.clone(),
                match (&row.power, &row.error) {
                    (Some(power), _) => power.clone(),
                    (None, Some(error)) => format!("error: {error}"),
                    (None, None) => "-".into(),
                },
                format!("{} ms", row.latency_ms),
            ]
        })
        .collect()
}

/// Reads the power state of every node's BMC, at most `parallelism` at a time (and
/// within whatever fleet-wide limit `bmcs` imposes). Rows come back in `nodes` order; a
/// BMC that cannot be reached or configured is a row with an error, never a failure of
/// the whole check.
pub async fn check_all(
    bmcs: &dyn BmcProvider,
    nodes: &[Node],
    parallelism: usize,
) -> Vec<CheckRow> {
    let parallelism = parallelism.max(1);
    let mut rows: Vec<CheckRow> = nodes
        .iter()
        .map(|node| CheckRow {
            node: node_label(node),
            uuid: node.uuid.to_string(),
            address: node.bmc.address.clone().unwrap_or_else(|| "-".into()),
            driver: driver_name(node.bmc.driver).to_string(),
            power: None,
            error: None,
            latency_ms: 0,
        })
        .collect();
    let mut pending: Vec<(usize, Arc<dyn Bmc>)> = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        match bmcs.bmc_for(node) {
            Ok(bmc) => pending.push((index, bmc)),
            Err(error) => rows[index].error = Some(error.to_string()),
        }
    }
    let mut running = JoinSet::new();
    let mut queue = pending.into_iter();
    loop {
        while running.len() < parallelism {
            let Some((index, bmc)) = queue.next() else {
                break;
            };
            running.spawn(async move {
                let started = tokio::time::Instant::now();
                let result = bmc.power_state().await;
                (index, result, elapsed_ms(started))
            });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        match joined {
            Ok((index, result, latency_ms)) => {
                let row = &mut rows[index];
                row.latency_ms = latency_ms;
                match result {
                    Ok(power) => row.power = Some(power_word(power).to_string()),
                    Err(error) => row.error = Some(error.to_string()),
                }
            }
            // A probe panicked: its row keeps no power and says nothing more precise.
            Err(error) => tracing::warn!(%error, "bmc check task failed"),
        }
    }
    for row in rows.iter_mut() {
        if row.power.is_none() && row.error.is_none() {
            row.error = Some("probe did not finish".into());
        }
    }
    rows
}
