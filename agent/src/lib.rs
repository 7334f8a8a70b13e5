//! The Bearman stage-1/stage-2 agent, as a library: the boot-protocol client that a real
//! stage-1 image runs before kexec, and that the simulator's virtual nodes run too.
//! [`stages`] holds the stage-1 and stage-2 sequences, generic over a [`host::Host`];
//! [`stage1`] is the production host (the only code here that touches the OS).
//!
//! Architecture invariant: this crate depends on `bearman-proto` only, never on the
//! daemon, so the stage-1 binary stays small and static.

pub mod bmc;
pub mod client;
pub mod facts;
pub mod firmware;
pub mod host;
pub mod lldp;
pub mod net;
pub mod network;
pub mod plan;
pub mod stage1;
pub mod stages;

pub use client::{BootClient, BootPlan, ClientError, Connector, Prepared};
