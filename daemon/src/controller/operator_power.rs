//! The daemon's [`PowerSwitch`] for operator power actions: the node's driver from the
//! same `BmcProvider` the controller fences and polls through (so its guard — one call
//! at a time per BMC, the fleet-wide limit, the call bound — holds across both), and
//! `bmc::ops::act`'s verified sequences. Not leader-gated: any replica may run an
//! operator's action, because the app put the node in Maintenance first and the
//! leader's controller leaves such nodes alone.

use std::sync::Arc;

use async_trait::async_trait;

use crate::app::power::{PowerAction, PowerDone, PowerSwitch, PowerSwitchError};
use crate::bmc::ops::{self, Readback};
use crate::bmc::provider::node_label;
use crate::bmc::BmcProvider;
use crate::core::model::Node;

pub struct OperatorPower {
    bmcs: Arc<dyn BmcProvider>,
    readback: Readback,
}

impl OperatorPower {
    /// Over `bmcs` (the controller's own provider), verifying with `readback`.
    pub fn new(bmcs: Arc<dyn BmcProvider>, readback: Readback) -> OperatorPower {
        OperatorPower { bmcs, readback }
    }
}

#[async_trait]
impl PowerSwitch for OperatorPower {
    fn check(&self, node: &Node) -> Result<(), PowerSwitchError> {
        self.bmcs
            .bmc_for(node)
            .map(drop)
            .map_err(|error| PowerSwitchError::Unusable(error.to_string()))
    }

    async fn execute(
        &self,
        node: &Node,
        action: PowerAction,
    ) -> Result<PowerDone, PowerSwitchError> {
        let bmc = self
            .bmcs
            .bmc_for(node)
            .map_err(|error| PowerSwitchError::Unusable(error.to_string()))?;
        let ops_action = match action {
            PowerAction::On => ops::PowerAction::On,
            PowerAction::Off => ops::PowerAction::Off,
            PowerAction::SoftOff => ops::PowerAction::SoftOff,
            PowerAction::Cycle => ops::PowerAction::Cycle,
            PowerAction::Pxe => ops::PowerAction::PxeBoot,
        };
        let report = ops::act(bmc.as_ref(), &node_label(node), ops_action, self.readback)
            .await
            .map_err(|error| PowerSwitchError::Failed(error.to_string()))?;
        Ok(PowerDone {
            power: report.power,
            readbacks: report.readbacks,
            note: report.note,
        })
    }
}
