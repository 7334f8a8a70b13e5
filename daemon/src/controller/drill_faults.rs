//! The daemon's [`FaultInjector`] for chaos drills: the node's driver from the same
//! `BmcProvider` the controller fences through (so the per-BMC guard serialises a drill's
//! calls with fencing and power polls), and `bmc::ops::act`'s verified power-on for an
//! aborted power loss. Faults go out of band only: nothing here talks to the node.

use std::sync::Arc;

use async_trait::async_trait;

use crate::app::drill::{FaultInjector, HostVms};
use crate::bmc::ops::{self, Readback};
use crate::bmc::provider::node_label;
use crate::bmc::{BmcProvider, PowerState};
use crate::core::drill::FaultKind;
use crate::core::model::Node;

pub struct BmcFaults {
    bmcs: Arc<dyn BmcProvider>,
    readback: Readback,
}

impl BmcFaults {
    pub fn new(bmcs: Arc<dyn BmcProvider>, readback: Readback) -> BmcFaults {
        BmcFaults { bmcs, readback }
    }
}

#[async_trait]
impl FaultInjector for BmcFaults {
    async fn probe(&self, node: &Node, fault: FaultKind) -> Result<(), String> {
        let bmc = self.bmcs.bmc_for(node).map_err(|error| error.to_string())?;
        if fault == FaultKind::KernelPanic && !bmc.supports_nmi() {
            return Err(format!(
                "{}: its BMC driver cannot send an NMI, so kernel_panic is not possible",
                node_label(node)
            ));
        }
        match bmc.power_state().await.map_err(|error| error.to_string())? {
            PowerState::On => Ok(()),
            PowerState::Off => Err(format!("{}: its BMC reads power off", node_label(node))),
        }
    }

    async fn inject(&self, node: &Node, fault: FaultKind) -> Result<(), String> {
        let bmc = self.bmcs.bmc_for(node).map_err(|error| error.to_string())?;
        let result = match fault {
            FaultKind::PowerLoss => bmc.power_off().await,
            FaultKind::KernelPanic => bmc.inject_nmi().await,
            FaultKind::Silence => {
                return Err("silence is the daemon's own fault, not the BMC's".into())
            }
        };
        result.map_err(|error| error.to_string())
    }

    async fn power_on(&self, node: &Node) -> Result<(), String> {
        let bmc = self.bmcs.bmc_for(node).map_err(|error| error.to_string())?;
        ops::act(
            bmc.as_ref(),
            &node_label(node),
            ops::PowerAction::On,
            self.readback,
        )
        .await
        .map(drop)
        .map_err(|error| error.to_string())
    }
}

/// The drill twin's VM counts from the cloud seam.
pub struct CloudVms(pub Arc<dyn crate::cloud::Cloud>);

#[async_trait]
impl HostVms for CloudVms {
    async fn vms_on_host(&self, host: &str) -> Result<usize, String> {
        self.0
            .vms_on_host(host)
            .await
            .map(|vms| vms.len())
            .map_err(|error| error.to_string())
    }
}
