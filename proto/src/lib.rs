//! The Bearman boot protocol, shared by the daemon, the stage-1 agent and the simulator:
//! the JSON bodies of the `/ipxe/{uuid}/…` endpoints, the iPXE script grammar both sides
//! speak, and a minimal HTTP/1.1 client small enough to ship inside every stage-1 image.

pub mod firmware;
pub mod http;
pub mod ipxe;
pub mod types;
pub mod uuid;

pub use types::*;
