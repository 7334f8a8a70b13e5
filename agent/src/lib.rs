//! The Bearman stage-1/stage-2 agent, as a library: the boot-protocol client that a real
//! stage-1 image runs before kexec, and that the simulator's virtual nodes run too.
//!
//! Architecture invariant: this crate depends on `bearman-proto` only, never on the
//! daemon, so the stage-1 binary stays small and static.

pub mod bmc;
pub mod client;
pub mod facts;
pub mod lldp;
pub mod net;
pub mod network;
pub mod plan;
pub mod stage1;

pub use client::{BootClient, BootPlan, ClientError, Connector};
