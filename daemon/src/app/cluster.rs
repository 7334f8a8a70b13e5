//! Several replicas on one database: the leader board (whether this replica may run the
//! controller now, and under which epoch) and the operations on the lease — one election
//! round, resigning, and the cluster's status for the API. The round itself is decided by
//! `core::cluster`; the loop that runs it is `controller::elector`.

use std::sync::Mutex;

use crate::core::cluster::{
    after_attempt, next_round_in_ms, ClusterConfig, ClusterStatus, Leadership, Replica,
};
use crate::core::model::TimestampMs;
use crate::store::StoreError;

use super::App;

/// Whether this process may run the controller's actions now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acting {
    /// Not clustered: the only daemon on its database, always acting, unfenced.
    Alone,
    /// Holds the lease: acts, every saga write fenced by `epoch`.
    Leader { epoch: i64 },
    /// Another replica leads (or this one's belief lapsed): act on nothing.
    Standby,
}

impl Acting {
    /// The fencing token saga writes carry.
    pub fn fence(self) -> Option<i64> {
        match self {
            Acting::Leader { epoch } => Some(epoch),
            Acting::Alone | Acting::Standby => None,
        }
    }

    pub fn may_act(self) -> bool {
        !matches!(self, Acting::Standby)
    }
}

/// What one election round left: this replica's leadership, and when to run the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElectionRound {
    pub leadership: Option<Leadership>,
    pub next_in_ms: i64,
}

#[derive(Debug, Default)]
struct Board {
    /// This replica's name and settings, once clustered.
    clustered: Option<(String, ClusterConfig)>,
    leadership: Option<Leadership>,
    /// What this replica's controller remembers (JSON), saved with each renewal.
    memory: Option<String>,
    /// What the previous holder's controller remembered, when this replica took the lease
    /// under this epoch: the controller starts its term from it.
    handed_over: Option<(i64, String)>,
}

/// What the elector last won, for the controller (may I act?) and the API (who am I?).
#[derive(Debug, Default)]
pub struct LeaderBoard {
    board: Mutex<Board>,
}

impl LeaderBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes this replica one of several: from now on it acts only while it leads.
    pub fn join(&self, name: &str, config: &ClusterConfig) {
        self.lock().clustered = Some((name.to_string(), config.clone()));
    }

    /// This replica's name, when clustered.
    pub fn replica_name(&self) -> Option<String> {
        self.lock().clustered.as_ref().map(|(name, _)| name.clone())
    }

    /// The controller's memory, to save with the next renewal.
    pub fn save_memory(&self, memory: String) {
        self.lock().memory = Some(memory);
    }

    /// What the previous holder's controller remembered, if this replica took the lease
    /// under `epoch` with some (taken once).
    pub fn take_handed_over(&self, epoch: i64) -> Option<String> {
        let mut board = self.lock();
        match board.handed_over.take() {
            Some((at, memory)) if at == epoch => Some(memory),
            _ => None,
        }
    }

    /// Whether (and how) this replica may act at `local_now_ms`.
    pub fn acting(&self, local_now_ms: TimestampMs) -> Acting {
        let board = self.lock();
        if board.clustered.is_none() {
            return Acting::Alone;
        }
        match board.leadership {
            Some(leadership) if leadership.valid_at(local_now_ms) => Acting::Leader {
                epoch: leadership.epoch,
            },
            _ => Acting::Standby,
        }
    }
}

impl App {
    /// One election round for this replica: report it alive, then take or renew the
    /// controller's lease, and publish what that means on the leader board. A store that
    /// does not answer leaves the earlier leadership standing until its own deadline.
    pub async fn cluster_elect(&self, replica: &Replica) -> Option<Leadership> {
        self.cluster_round(replica).await.leadership
    }

    /// [`App::cluster_elect`], also saying when the next round is due
    /// ([`next_round_in_ms`]).
    pub async fn cluster_round(&self, replica: &Replica) -> ElectionRound {
        let Some((name, config)) = self.leader.lock().clustered.clone() else {
            return ElectionRound {
                leadership: None,
                next_in_ms: ClusterConfig::default().renew_every_ms,
            };
        };
        let sent_at = self.clock.now_ms();
        if let Err(error) = self.store.replica_report(replica, sent_at).await {
            tracing::warn!(%error, "could not report this replica alive");
        }
        let memory = self.leader.lock().memory.clone();
        let lease = match self
            .store
            .lease_acquire(&name, config.lease_ttl_ms, sent_at, memory.as_deref())
            .await
        {
            Ok(lease) => Some(lease),
            Err(error) => {
                tracing::warn!(%error, "could not take or renew the controller lease");
                None
            }
        };
        let mut board = self.leader.lock();
        let before = board.leadership;
        let after = after_attempt(&name, sent_at, lease.as_ref(), before, &config);
        match (before.map(|l| l.epoch), after.map(|l| l.epoch)) {
            (None, Some(epoch)) => {
                tracing::warn!(epoch, replica = %name, "leading: this replica runs the controller")
            }
            (Some(old), Some(new)) if old != new => {
                tracing::warn!(old, new, replica = %name, "leading under a new epoch")
            }
            (Some(epoch), None) => tracing::warn!(
                epoch,
                holder = lease
                    .as_ref()
                    .map_or("unknown (store unreachable)", |l| l.holder.as_str()),
                "no longer leading: the controller stops acting"
            ),
            _ => {}
        }
        if let (Some(lease), Some(now)) = (&lease, after) {
            if before.map(|l| l.epoch) != Some(now.epoch) {
                // A new term: its controller starts from what the last holder's knew.
                board.handed_over = lease
                    .controller_memory
                    .clone()
                    .map(|memory| (now.epoch, memory));
                board.memory = None;
            }
        }
        board.leadership = after;
        ElectionRound {
            leadership: after,
            next_in_ms: next_round_in_ms(&name, lease.as_ref(), &config),
        }
    }

    /// Gives the lease up at once (a clean shutdown), so another replica need not wait
    /// out its TTL.
    pub async fn cluster_resign(&self) -> Result<(), StoreError> {
        let (name, epoch) = {
            let mut board = self.leader.lock();
            let Some((name, _)) = board.clustered.clone() else {
                return Ok(());
            };
            let Some(leadership) = board.leadership.take() else {
                return Ok(());
            };
            (name, leadership.epoch)
        };
        self.store
            .lease_release(&name, epoch, self.clock.now_ms())
            .await
    }

    /// The lease and the replicas as the database has them.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, StoreError> {
        let mut status = self.store.cluster_read(self.clock.now_ms()).await?;
        status.enabled = self.leader.lock().clustered.is_some();
        Ok(status)
    }
}
