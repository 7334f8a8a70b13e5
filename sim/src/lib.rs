//! bearman-sim: a deterministic fleet simulator that runs the real Bearman daemon (router,
//! lifecycle, store trait) on turmoil, with racks of virtual nodes running the real agent
//! boot-protocol client, a simulated BMC fabric and a Nova-like cloud.
//!
//! Topology: one turmoil host per rack (its top-of-rack switch; the nodes are tasks
//! inside it), one "bmc" host for the out-of-band network, one "cloud" host, and the
//! "daemon" host whose store lives outside the host so it survives a restart.

pub mod bmc;
pub mod check;
pub mod cloud;
pub mod db;
pub mod drill;
pub mod fleet;
pub mod host;
pub mod net;
pub mod node;
pub mod ops;
pub mod recovery;
pub mod rehearse;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod sweep;
pub mod trace;
pub mod watch;
