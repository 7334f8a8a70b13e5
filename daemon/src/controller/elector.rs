//! The election loop of a clustered replica: every `renew_every_ms` one round
//! (`App::cluster_elect`: report alive, take or renew the lease), whose result the
//! controller reads from the leader board before it acts. Nothing is decided here.

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
    let every = Duration::from_millis(config.renew_every_ms.max(100) as u64);
    tokio::spawn(async move {
        let app = Arc::new(app);
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            app.cluster_elect(&replica).await;
        }
    })
}
