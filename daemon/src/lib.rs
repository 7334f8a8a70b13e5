//! Bearman: a bare-metal fleet manager for diskless hypervisor clouds.
//!
//! The crate is the production daemon and the library the simulator and tests drive:
//! a pure [`core`], persistence behind [`store::Store`], every state change in the
//! application layer [`app`], the HTTP surface in [`api`], the [`controller`] loop, and
//! the seams to the outside world ([`runtime`], [`bmc`], [`cloud`], [`images`]).

pub mod api;
pub mod app;
pub mod bmc;
pub mod cloud;
pub mod controller;
pub mod core;
pub mod edge;
pub mod images;
pub mod runtime;
pub mod server;
pub mod store;
pub mod telemetry;
