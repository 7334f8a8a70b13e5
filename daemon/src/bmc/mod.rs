//! The `Bmc` seam: power control of one physical server through its baseboard management
//! controller. Drivers (IPMI, Redfish, QEMU QMP, the simulator's) implement this trait;
//! fencing and rebuild (remediation) are written against it alone.
//!
//! Remediation (fencing, rebuild) uses this trait; the simulator implements it over its
//! BMC fabric. Production drivers live in submodules as they land.

pub mod credentials;
pub mod guard;
pub mod ipmi;
pub mod ops;
pub mod provider;
pub mod qmp;

pub mod redfish;

use async_trait::async_trait;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    On,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    /// The node's BMC settings name no driver this daemon can use.
    #[error(transparent)]
    Connect(#[from] provider::ConnectError),
    /// Another provider (the simulator's) has no BMC for this node.
    #[error("node {node}: no BMC: {detail}")]
    NoDriver { node: String, detail: String },
    #[error("bmc {bmc}: {operation} timed out")]
    Timeout {
        bmc: String,
        operation: &'static str,
    },
    /// The driver cannot do this at all (a chaos drill's fault its BMC has no command
    /// for): nothing was sent.
    #[error("bmc {bmc}: {operation} is not supported by the {driver} driver")]
    Unsupported {
        bmc: String,
        driver: &'static str,
        operation: &'static str,
    },
    #[error("bmc {bmc}: {operation} failed: {detail}")]
    Failed {
        bmc: String,
        operation: &'static str,
        detail: String,
    },
}

/// Finds the driver for a node's BMC: the production one from its settings
/// (`provider::DriverBmcs`), the simulator's over its fabric.
pub trait BmcProvider: Send + Sync + 'static {
    fn bmc_for(&self, node: &crate::core::model::Node)
        -> Result<std::sync::Arc<dyn Bmc>, BmcError>;
}

#[async_trait]
pub trait Bmc: Send + Sync {
    async fn power_state(&self) -> Result<PowerState, BmcError>;
    async fn power_on(&self) -> Result<(), BmcError>;
    /// Hard power off (STONITH). Accepted is not done: callers verify with `power_state`.
    async fn power_off(&self) -> Result<(), BmcError>;
    /// Clean power off (ACPI): asks the operating system to shut down, which a hung one
    /// never will. Drivers without one do nothing; fencing always follows with
    /// `power_off`.
    async fn power_off_soft(&self) -> Result<(), BmcError> {
        Ok(())
    }
    /// Network boot (PXE) on the next boot only.
    async fn set_next_boot_pxe(&self) -> Result<(), BmcError>;
    /// Whether [`Bmc::inject_nmi`] is a real command on this driver (a chaos drill's
    /// preflight asks before it plans a `kernel_panic`).
    fn supports_nmi(&self) -> bool {
        false
    }
    /// Sends a non-maskable interrupt to the host (IPMI `chassis power diag`, Redfish
    /// `ResetType: Nmi`, QMP `inject-nmi`): with `unknown_nmi_panic=1` on its kernel
    /// command line the operating system panics — a chaos drill's `kernel_panic`, sent
    /// out of band only. Drivers without one refuse without sending anything.
    async fn inject_nmi(&self) -> Result<(), BmcError> {
        Err(BmcError::Unsupported {
            bmc: "unknown".into(),
            driver: "this",
            operation: "inject_nmi",
        })
    }
}
