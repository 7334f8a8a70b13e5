//! Several daemons on one database: which one leads (runs the controller), and for how
//! long it may act on that belief. Pure: the elector (`cluster.rs` at the top of the
//! crate) reads the lease through the store and the local clock, and asks this module.
//!
//! The lease row lives in the database and its expiry is computed on the **database's**
//! clock, so replicas whose clocks disagree still agree on who holds it. Each new holder
//! (and each holder whose lease lapsed) gets a larger **epoch**: the fencing token every
//! saga write carries and the store checks in the same transaction, so a leader that
//! lost its lease without knowing it cannot advance a saga. Locally, a leader acts only
//! until `renew_deadline_ms` after the moment it *sent* its last successful renewal: the
//! database set the expiry `lease_ttl_ms` after it *received* it, later still, so a leader
//! stops acting `lease_ttl_ms - renew_deadline_ms` (5 s by default) before anyone else can
//! take the lease — assuming only that the two clocks run at about the same rate (not
//! that they agree), which is what leases always assume.

use serde::{Deserialize, Serialize};

use super::model::TimestampMs;
use super::validate::InvalidSetting;

/// `[cluster]`: off (one daemon per database) unless enabled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Run as one of several replicas on one PostgreSQL database: every replica serves,
    /// the lease holder alone runs the controller.
    pub enabled: bool,
    /// This replica's name in the lease and `bearman cluster status`; default: the host
    /// name and the listen address.
    pub replica_name: Option<String>,
    /// How long a lease lasts after the database last renewed it.
    pub lease_ttl_ms: i64,
    /// How often the holder renews (and the others try to take it).
    pub renew_every_ms: i64,
    /// A holder acts only this long after it sent its last successful renewal: below the
    /// TTL, so it stops before its lease can expire and pass to someone else.
    pub renew_deadline_ms: i64,
    /// The boot path's read cache on a replica: what other replicas wrote is served at
    /// most this late (its own writes at once). 0: no cache, every read goes to the
    /// database.
    pub cache_max_age_ms: i64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        // Kubernetes' leader election defaults (15 s / 10 s) and River's 5 s cadence.
        ClusterConfig {
            enabled: false,
            replica_name: None,
            lease_ttl_ms: 15_000,
            renew_every_ms: 5_000,
            renew_deadline_ms: 10_000,
            cache_max_age_ms: 1_000,
        }
    }
}

/// Characters of a replica name, at most.
pub const REPLICA_NAME_MAX: usize = 200;

impl ClusterConfig {
    /// Rejects impossible settings; the message names the key under `[cluster]`.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(1_000..=300_000).contains(&self.lease_ttl_ms) {
            return Err(InvalidSetting::new(
                "lease_ttl_ms",
                format!("{} is outside 1000-300000", self.lease_ttl_ms),
            ));
        }
        if !(100..self.renew_deadline_ms).contains(&self.renew_every_ms) {
            return Err(InvalidSetting::new(
                "renew_every_ms",
                format!(
                    "{} must be at least 100 and below renew_deadline_ms ({}): a holder must get more than one try at renewing",
                    self.renew_every_ms, self.renew_deadline_ms
                ),
            ));
        }
        if self.renew_deadline_ms >= self.lease_ttl_ms {
            return Err(InvalidSetting::new(
                "renew_deadline_ms",
                format!(
                    "{} must be below lease_ttl_ms ({}): a holder must stop acting before its lease can pass to another",
                    self.renew_deadline_ms, self.lease_ttl_ms
                ),
            ));
        }
        if !(0..=60_000).contains(&self.cache_max_age_ms) {
            return Err(InvalidSetting::new(
                "cache_max_age_ms",
                format!("{} is outside 0-60000", self.cache_max_age_ms),
            ));
        }
        if let Some(name) = &self.replica_name {
            if name.trim().is_empty()
                || name.len() > REPLICA_NAME_MAX
                || name.chars().any(char::is_control)
            {
                return Err(InvalidSetting::new(
                    "replica_name",
                    format!("must be 1-{REPLICA_NAME_MAX} characters without control characters"),
                ));
            }
        }
        Ok(())
    }
}

/// The lease row as the database has it, with the database's clock at the read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub epoch: i64,
    /// When the current holder took it (database clock).
    pub acquired_at_ms: TimestampMs,
    pub expires_at_ms: TimestampMs,
    /// The database's clock when this was read.
    pub db_now_ms: TimestampMs,
    /// What the holder's controller remembers between ticks (JSON), saved with each
    /// renewal: a new holder starts from it, not from nothing. Internal; never shown.
    #[serde(skip)]
    pub controller_memory: Option<String>,
}

impl Lease {
    pub fn expired(&self) -> bool {
        self.expires_at_ms <= self.db_now_ms
    }
}

/// What `holder` asking for the lease for `ttl_ms` at `now_ms` (the store's clock) makes
/// of `current`: renewed when it is theirs and unexpired (saving `memory`, its
/// controller's), taken (a new term, epoch + 1, the previous holder's memory handed over)
/// when it lapsed, whoever held it, or created at epoch 1; `None` when another holds it
/// unexpired (nothing to write). One rule for every store.
pub fn claim(
    current: Option<&Lease>,
    holder: &str,
    ttl_ms: i64,
    now_ms: TimestampMs,
    memory: Option<&str>,
) -> Option<Lease> {
    let expires_at_ms = now_ms + ttl_ms;
    match current {
        None => Some(Lease {
            holder: holder.to_string(),
            epoch: 1,
            acquired_at_ms: now_ms,
            expires_at_ms,
            db_now_ms: now_ms,
            controller_memory: None,
        }),
        Some(lease) if lease.expires_at_ms > now_ms && lease.holder != holder => None,
        Some(lease) if lease.expires_at_ms > now_ms => Some(Lease {
            expires_at_ms,
            db_now_ms: now_ms,
            controller_memory: memory
                .map(str::to_string)
                .or_else(|| lease.controller_memory.clone()),
            ..lease.clone()
        }),
        Some(lease) => Some(Lease {
            holder: holder.to_string(),
            epoch: lease.epoch + 1,
            acquired_at_ms: now_ms,
            expires_at_ms,
            db_now_ms: now_ms,
            controller_memory: lease.controller_memory.clone(),
        }),
    }
}

/// This replica's belief that it leads: under which epoch, and until when (local clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub epoch: i64,
    pub act_until_local_ms: TimestampMs,
}

impl Leadership {
    pub fn valid_at(&self, local_now_ms: TimestampMs) -> bool {
        local_now_ms < self.act_until_local_ms
    }
}

/// What one attempt to take or renew the lease means for this replica: `sent_at_local_ms`
/// is the local clock read *before* the request went out; `lease` is the row after it
/// (`None`: the store did not answer). With no answer the previous belief stands until
/// its own deadline — it was earned before, and it is never extended without one.
pub fn after_attempt(
    me: &str,
    sent_at_local_ms: TimestampMs,
    lease: Option<&Lease>,
    previous: Option<Leadership>,
    config: &ClusterConfig,
) -> Option<Leadership> {
    match lease {
        Some(lease) if lease.holder == me && !lease.expired() => Some(Leadership {
            epoch: lease.epoch,
            act_until_local_ms: sent_at_local_ms + config.renew_deadline_ms,
        }),
        Some(_) => None,
        None => previous.filter(|p| p.valid_at(sent_at_local_ms)),
    }
}

/// A replica that failed to renew retries this soon (Kubernetes' retry period), so a
/// blip of the database does not cost it its deadline.
pub const RENEW_RETRY_MS: i64 = 2_000;
/// A standby tries this long after the lease's expiry (database clock), not a whole
/// `renew_every_ms` later.
pub const TAKEOVER_MARGIN_MS: i64 = 100;

/// When the next election round is due, in milliseconds from this one: a holder renews
/// every `renew_every_ms`; a replica whose attempt got no answer retries within
/// [`RENEW_RETRY_MS`]; a standby tries again just after the lease it saw expires (by the
/// database's own reading of its clock, so clock offsets do not matter), at the latest
/// after `renew_every_ms`. A dead leader's lease is thus taken within about
/// `lease_ttl_ms` of its last renewal, not `lease_ttl_ms + renew_every_ms`.
pub fn next_round_in_ms(me: &str, lease: Option<&Lease>, config: &ClusterConfig) -> i64 {
    let every = config.renew_every_ms.max(100);
    match lease {
        None => every.min(RENEW_RETRY_MS),
        Some(lease) if lease.holder == me && !lease.expired() => every,
        Some(lease) => {
            (lease.expires_at_ms - lease.db_now_ms + TAKEOVER_MARGIN_MS).clamp(100, every)
        }
    }
}

/// A replica as `bearman cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub name: String,
    /// Where it serves (its listen address), as it said.
    pub address: String,
    pub version: String,
    pub started_at_ms: TimestampMs,
    /// Database clock.
    pub last_seen_at_ms: TimestampMs,
}

/// The cluster as the database sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub enabled: bool,
    /// The database's clock at the read (replicas' ages are measured against it).
    pub db_now_ms: TimestampMs,
    pub lease: Option<Lease>,
    pub replicas: Vec<Replica>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_tries_just_after_the_lease_it_saw_expires() {
        let config = ClusterConfig::default();
        // Held by another, 3.2 s left on the database's clock: try at expiry + margin.
        let other = lease("b", 4, 10_000 + 3_200, 10_000);
        assert_eq!(next_round_in_ms("a", Some(&other), &config), 3_300);
        // Far from expiry: the usual cadence, never longer.
        let fresh = lease("b", 4, 10_000 + 15_000, 10_000);
        assert_eq!(next_round_in_ms("a", Some(&fresh), &config), 5_000);
        // Already expired (another was faster): soon, but not in a busy loop.
        let lapsed = lease("b", 4, 9_000, 10_000);
        assert_eq!(next_round_in_ms("a", Some(&lapsed), &config), 100);
        // The holder renews on its cadence; no answer: retry soon.
        let mine = lease("a", 4, 25_000, 10_000);
        assert_eq!(next_round_in_ms("a", Some(&mine), &config), 5_000);
        assert_eq!(next_round_in_ms("a", None, &config), RENEW_RETRY_MS);
    }

    fn lease(holder: &str, epoch: i64, expires_at_ms: i64, db_now_ms: i64) -> Lease {
        Lease {
            holder: holder.into(),
            epoch,
            acquired_at_ms: 0,
            expires_at_ms,
            db_now_ms,
            controller_memory: None,
        }
    }

    #[test]
    fn defaults_are_valid_and_bad_settings_name_their_key() {
        assert_eq!(ClusterConfig::default().validate(), Ok(()));
        let bad = |config: ClusterConfig| config.validate().unwrap_err().key;
        let base = ClusterConfig::default();
        assert_eq!(
            bad(ClusterConfig {
                renew_deadline_ms: 15_000,
                ..base.clone()
            }),
            "renew_deadline_ms"
        );
        assert_eq!(
            bad(ClusterConfig {
                renew_every_ms: 10_000,
                ..base.clone()
            }),
            "renew_every_ms"
        );
        assert_eq!(
            bad(ClusterConfig {
                lease_ttl_ms: 500,
                ..base.clone()
            }),
            "lease_ttl_ms"
        );
        assert_eq!(
            bad(ClusterConfig {
                replica_name: Some("a\u{1b}[31m".into()),
                ..base
            }),
            "replica_name"
        );
    }

    #[test]
    fn a_lease_is_renewed_by_its_holder_taken_when_lapsed_and_never_stolen() {
        let first = claim(None, "a", 15_000, 1_000, Some("m0")).unwrap();
        assert_eq!(
            first.controller_memory, None,
            "a first holder has nothing handed over"
        );
        assert_eq!((first.holder.as_str(), first.epoch), ("a", 1));
        assert_eq!(first.expires_at_ms, 16_000);
        // Held by a: b gets nothing; a renews within its term, same epoch.
        assert_eq!(claim(Some(&first), "b", 15_000, 10_000, None), None);
        let renewed = claim(Some(&first), "a", 15_000, 10_000, Some("m1")).unwrap();
        assert_eq!(renewed.controller_memory.as_deref(), Some("m1"));
        assert_eq!(
            (renewed.epoch, renewed.acquired_at_ms, renewed.expires_at_ms),
            (1, 1_000, 25_000)
        );
        // Lapsed: b takes it under a new epoch; so would a itself (a new term).
        let taken = claim(Some(&renewed), "b", 15_000, 25_000, Some("b's")).unwrap();
        assert_eq!(
            (taken.holder.as_str(), taken.epoch, taken.acquired_at_ms),
            ("b", 2, 25_000)
        );
        assert_eq!(
            taken.controller_memory.as_deref(),
            Some("m1"),
            "the new holder starts from the old one's memory"
        );
        assert_eq!(
            claim(Some(&renewed), "a", 15_000, 25_000, None)
                .unwrap()
                .epoch,
            2
        );
    }

    #[test]
    fn a_replica_leads_only_while_it_holds_an_unexpired_lease_and_never_past_its_deadline() {
        let config = ClusterConfig::default();
        let held = lease("a", 3, 20_000, 5_000);
        // Renewed: acts until the deadline after it *sent* the renewal.
        let leading = after_attempt("a", 1_000, Some(&held), None, &config).unwrap();
        assert_eq!(leading.epoch, 3);
        assert_eq!(leading.act_until_local_ms, 1_000 + config.renew_deadline_ms);
        assert!(leading.valid_at(10_999) && !leading.valid_at(11_000));
        // Someone else holds it, or ours lapsed: not leading, whatever we believed.
        assert_eq!(
            after_attempt("b", 1_000, Some(&held), Some(leading), &config),
            None
        );
        let lapsed = lease("a", 3, 5_000, 5_000);
        assert_eq!(
            after_attempt("a", 1_000, Some(&lapsed), Some(leading), &config),
            None
        );
        // The store did not answer: the earlier belief stands until its own deadline,
        // never extended.
        assert_eq!(
            after_attempt("a", 6_000, None, Some(leading), &config),
            Some(leading)
        );
        assert_eq!(
            after_attempt("a", 11_000, None, Some(leading), &config),
            None
        );
        assert_eq!(after_attempt("a", 6_000, None, None, &config), None);
    }
}
