//! The `Cloud` seam: the hypervisor control plane (OpenStack Nova in production, the
//! simulator's cloud in simulation) through which VMs are evacuated from a fenced node.
//!
//! Remediation forces a fenced host's compute service down and evacuates its VMs through
//! this trait. `nova` is the production driver; the simulator has its own.

pub mod nova;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Nova's `ComputeServiceInUse`: the host's compute service still looks alive.
    #[error("compute service on {host} is still up")]
    ServiceInUse { host: String },
    #[error("cloud api error: {0}")]
    Api(String),
}

/// Where the cloud has a VM and what it says the VM is doing (Nova's `status`:
/// `ACTIVE`, `REBUILD` while an evacuation brings it up, `ERROR`, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStatus {
    pub host: Option<String>,
    pub status: String,
}

#[async_trait]
pub trait Cloud: Send + Sync {
    /// VM ids running on `host`.
    async fn vms_on_host(&self, host: &str) -> Result<Vec<String>, CloudError>;
    /// Marks the host's compute service forced-down (Nova `os-services` force_down).
    async fn force_down(&self, host: &str) -> Result<(), CloudError>;
    /// Rebuilds `vm` on another host (Nova `evacuate`). Accepted is not done: see
    /// [`Cloud::vm_status`].
    async fn evacuate(&self, vm: &str) -> Result<(), CloudError>;
    /// Where `vm` is and what it is doing (Nova `GET /servers/{id}`).
    async fn vm_status(&self, vm: &str) -> Result<VmStatus, CloudError>;
}
