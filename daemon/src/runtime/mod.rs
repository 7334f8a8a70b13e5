//! The seams between the daemon and the machine it runs on: the wall clock and the network
//! listener. Production fills them with [`system`]; the simulator with turmoil's virtual
//! clock and sockets.
//!
//! Architecture invariant: code outside `runtime::system`, `main.rs` and `cli` never reads
//! the system clock or opens an OS socket; the tidy test enforces it.

pub mod http_client;
pub mod system;

use crate::core::model::TimestampMs;

/// Wall-clock time for timestamps. Durations and timers use `tokio::time`, which turmoil
/// virtualises; this trait exists because `tokio::time` has no notion of calendar time.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> TimestampMs;
}

/// A clock that starts at a fixed epoch and advances with `tokio::time` — virtual time under
/// turmoil or a paused tokio runtime, real time otherwise. Deterministic under simulation.
pub struct TokioClock {
    epoch_ms: TimestampMs,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn starting_at(epoch_ms: TimestampMs) -> Self {
        TokioClock {
            epoch_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> TimestampMs {
        self.epoch_ms + self.start.elapsed().as_millis() as TimestampMs
    }
}
