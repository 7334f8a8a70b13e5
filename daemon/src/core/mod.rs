//! The pure core: domain model, lifecycle state machine, IP address management, boot
//! rendering, registration planning, health judgement, power sync, remediation sagas and
//! the controller's decisions (`controller`: what each tick and each saga step does).
//!
//! Architecture invariant: nothing in here does I/O or reads a clock. Time comes in as
//! `now_ms`; the daemon, the simulator and the tests all drive these same functions.

pub mod boot;
pub mod calendar;
pub mod cluster;
pub mod controller;
pub mod drill;
pub mod enrollment;
pub mod event_throttle;
pub mod firmware;
pub mod health;
pub mod ipam;
pub mod lifecycle;
pub mod model;
pub mod power_sync;
pub mod rate_limit;
pub mod registration;
pub mod remediation;
pub mod secret;
pub mod session;
pub mod validate;

pub use lifecycle::{LifecycleEvent, LifecycleState};
pub use model::*;
