//! The election loop of a clustered replica: one round at a time (`App::cluster_round`:
//! report alive, take or renew the lease), whose result the controller reads from the
//! leader board before it acts, the next when the round says (`core::cluster::
//! next_round_in_ms`: the holder every `renew_every_ms`, a standby just after the lease
//! it saw expires). Nothing is decided here.

use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::core::cluster::{ClusterConfig, Replica};

/// Joins the cluster as `replica` and runs the election until aborted.
pub fn spawn_elector(
    app: App,
    replica: Replica,
    config: ClusterConfig,
) -> tokio::task::JoinHandle<()> {
    app.leader.join(&replica.name, &config);
    tokio::spawn(async move {
        let app = Arc::new(app);
        loop {
            // Each round is due from the start of the last (the holder's cadence does
            // not drift by the round trip's length).
            let started = tokio::time::Instant::now();
            let round = app.cluster_round(&replica).await;
            let next = Duration::from_millis(round.next_in_ms.max(100) as u64);
            tokio::time::sleep_until(started + next).await;
        }
    })
}
