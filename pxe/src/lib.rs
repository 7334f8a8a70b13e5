//! Bearman's network-boot services for machines whose NIC firmware does PXE: a proxyDHCP
//! answerer (UDP 67 and 4011) that tells PXE and HTTP-boot clients what to boot beside a
//! DHCP server it does not own, and a read-only TFTP server for the iPXE binaries.
//!
//! A crate of its own, not a daemon module: it runs only in production (the simulator
//! boots its virtual nodes from simulated firmware and never runs it), it owns its own
//! sockets (broadcast UDP, which the daemon's listener/connector seams do not model) and
//! its own dependency (`dhcproto`), and it needs nothing from the daemon but two URLs.
//!
//! Pure cores, thin edges: [`boot`] decides which file or URL a client gets, [`dhcp`]
//! turns a datagram into a reply, [`tftp`] parses requests, maps names to paths and runs
//! a transfer's state machine, [`limit`] bounds rates and logs — all with `now` passed
//! in. [`serve`] is the tokio edge: sockets, files, tasks.

pub mod boot;
pub mod config;
pub mod dhcp;
pub mod limit;
pub mod serve;
pub mod tftp;

pub use config::{PxeConfig, PxeFileConfig};
pub use serve::{start, PxeServices, PxeStats};
