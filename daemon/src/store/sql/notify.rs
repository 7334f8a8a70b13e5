//! Cache invalidation across replicas on PostgreSQL: every committed write of a node or a
//! flavor sends `pg_notify('bearman_cache', …)` in its own transaction (so it is delivered
//! only if the write commits), and each replica's listener applies what it hears to its
//! [`CachedStore`]. SQLite sends nothing: one daemon per file.
//!
//! Heartbeats are not announced: PostgreSQL serialises the commits of notifying
//! transactions, which measured halved heartbeat writes per second, and a heartbeat only
//! moves `last_heartbeat_at_ms`, which the boot path does not serve; another replica's
//! cached copy of it is at most the cache's maximum age old (and a node write never moves
//! it backwards).
//!
//! Architecture invariant: a notification only ever makes a cache forget; it never
//! carries a record to serve. So a lost, duplicated, reordered or garbled notification
//! can make a cache colder, never wrong; the cache's maximum age bounds how long a lost
//! one can leave a stale copy.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bearman_proto::uuid::NodeUuid;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

use super::{backend_error, Backend};
use crate::store::cached::CachedStore;
use crate::store::StoreError;

/// The channel every replica of one database listens on.
pub const CACHE_CHANNEL: &str = "bearman_cache";

/// Longest payload sent (PostgreSQL's own limit is 8000 bytes); a longer one (an absurd
/// flavor name) is sent as [`CacheChange::All`] instead of failing the write.
pub const CACHE_PAYLOAD_BYTES_MAX: usize = 1024;

/// Waits between attempts to (re)connect the listener: doubling from the first to the last.
const LISTENER_RETRY_MS_MIN: u64 = 100;
const LISTENER_RETRY_MS_MAX: u64 = 5_000;

/// What a committed write changed, as far as a replica's cache is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheChange {
    /// The node record changed (created, updated, registered, a saga step).
    Node(NodeUuid),
    /// The flavor was created, replaced or deleted.
    Flavor(String),
    /// Anything may have changed: empty the cache.
    All,
}

/// What a listener does with one notification.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    Change(CacheChange),
    /// Sent for another schema on the same database (another deployment): not ours.
    Elsewhere,
}

impl CacheChange {
    /// The payload after the schema prefix: `node:<uuid>`, `flavor:<name>`, `all`.
    pub fn encode(&self) -> String {
        let encoded = match self {
            CacheChange::Node(uuid) => format!("node:{uuid}"),
            CacheChange::Flavor(name) => format!("flavor:{name}"),
            CacheChange::All => "all".to_string(),
        };
        if encoded.len() > CACHE_PAYLOAD_BYTES_MAX {
            return "all".to_string();
        }
        encoded
    }

    /// The inverse of [`CacheChange::encode`]; anything it does not understand (a newer
    /// replica's kind, a hand-sent `NOTIFY`) is [`CacheChange::All`], never an error.
    pub fn decode(encoded: &str) -> CacheChange {
        let decoded = match encoded.split_once(':') {
            Some(("node", uuid)) => NodeUuid::parse(uuid).ok().map(CacheChange::Node),
            Some(("flavor", name)) if !name.is_empty() => {
                Some(CacheChange::Flavor(name.to_string()))
            }
            _ => None,
        };
        decoded.unwrap_or(CacheChange::All)
    }
}

/// Reads one payload as sent by [`send`]: `<schema> <change>`. A payload of another
/// schema is [`Heard::Elsewhere`]; one without the schema prefix empties the cache.
pub fn hear(schema: &str, payload: &str) -> Heard {
    if let Some(change) = payload
        .strip_prefix(schema)
        .and_then(|rest| rest.strip_prefix(' '))
    {
        return Heard::Change(CacheChange::decode(change));
    }
    match payload.split_once(' ') {
        Some((other, _)) if !other.is_empty() => Heard::Elsewhere,
        _ => Heard::Change(CacheChange::All),
    }
}

/// Announces `change` inside `tx`, delivered when (and only if) it commits. The schema
/// prefix keeps deployments that share a database (one schema each) apart.
pub(super) async fn send(
    backend: Backend,
    tx: &mut sqlx::AnyConnection,
    change: &CacheChange,
) -> Result<(), StoreError> {
    if backend != Backend::Postgres {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, COALESCE(current_schema()::text, '') || ' ' || $2)")
        .bind(CACHE_CHANNEL)
        .bind(change.encode())
        .execute(&mut *tx)
        .await
        .map_err(backend_error)?;
    Ok(())
}

/// Applies one notification to `cache`.
fn apply(cache: &CachedStore, heard: Heard) {
    match heard {
        Heard::Elsewhere => {}
        Heard::Change(CacheChange::Node(uuid)) => cache.evict_node(&uuid),
        Heard::Change(CacheChange::Flavor(name)) => cache.evict_flavor(&name),
        Heard::Change(CacheChange::All) => cache.clear(),
    }
}

/// A listener on its own connection, named after the URL's `application_name` (or
/// `bearman`) plus ` cache-listener` so an operator can tell it apart, and the schema
/// its search path resolves to.
async fn connect(url: &str) -> Result<(PgListener, String), sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let name = format!(
        "{} cache-listener",
        options.get_application_name().unwrap_or("bearman")
    );
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options.application_name(&name));
    let mut listener = PgListener::connect_with(&pool).await?;
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&mut listener)
        .await?;
    listener.listen(CACHE_CHANNEL).await?;
    Ok((listener, schema.unwrap_or_default()))
}

/// Keeps `cache` told of other replicas' writes until the cache is dropped. Never gives
/// up: a failed or lost connection is logged at warn (without the URL) and retried with
/// backoff (reset once a notification arrives, so a connection that keeps failing at
/// once is not retried in a tight loop) while the cache's maximum age bounds staleness.
/// Each time the listener is (re)connected the cache is emptied, since notifications
/// sent while it was away are lost.
pub async fn listen_for_cache_changes(url: String, cache: Weak<CachedStore>) {
    let mut retry_ms = LISTENER_RETRY_MS_MIN;
    loop {
        let (mut listener, schema) = match connect(&url).await {
            Ok(connected) => connected,
            Err(error) => {
                tracing::warn!(%error, retry_ms, "cache listener cannot connect; the cache falls back to its maximum age");
                backoff(&mut retry_ms).await;
                continue;
            }
        };
        let Some(live) = cache.upgrade() else { return };
        // Whatever was cached before LISTEN took effect may have missed a notification.
        live.clear();
        drop(live);
        tracing::debug!("cache listener listening");
        loop {
            let received = listener.try_recv().await;
            let Some(live) = cache.upgrade() else { return };
            match received {
                Ok(Some(notification)) => {
                    apply(&live, hear(&schema, notification.payload()));
                    retry_ms = LISTENER_RETRY_MS_MIN;
                }
                // sqlx reconnected and listens again; what was sent meanwhile is lost.
                // (What arrives during the backoff waits in the socket, in order.)
                Ok(None) => {
                    tracing::warn!(retry_ms, "cache listener reconnected after losing its connection; emptying the cache");
                    live.clear();
                    drop(live);
                    backoff(&mut retry_ms).await;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_ms, "cache listener failed; emptying the cache and reconnecting");
                    live.clear();
                    drop(live);
                    backoff(&mut retry_ms).await;
                    break;
                }
            }
        }
    }
}

/// Waits `retry_ms`, and doubles it up to the maximum for the next time.
fn backoff(retry_ms: &mut u64) -> tokio::time::Sleep {
    let wait = Duration::from_millis(*retry_ms);
    *retry_ms = (*retry_ms * 2).min(LISTENER_RETRY_MS_MAX);
    tokio::time::sleep(wait)
}

/// Starts [`listen_for_cache_changes`] for `cache`; the task ends when the cache is dropped.
pub fn spawn_cache_listener(url: &str, cache: &Arc<CachedStore>) {
    let task = tokio::spawn(listen_for_cache_changes(
        url.to_string(),
        Arc::downgrade(cache),
    ));
    cache.stop_on_drop(task.abort_handle());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid() -> NodeUuid {
        NodeUuid::from_index(3, 1)
    }

    #[test]
    fn every_change_survives_its_payload() {
        for change in [
            CacheChange::Node(uuid()),
            CacheChange::Flavor("hv gpu:2".into()),
            CacheChange::All,
        ] {
            let payload = format!("public {}", change.encode());
            assert_eq!(hear("public", &payload), Heard::Change(change));
        }
    }

    #[test]
    fn a_payload_it_cannot_read_empties_the_cache() {
        let u = uuid();
        for payload in [
            "",
            " ",
            "public",
            "public ",
            "public node:",
            "public node:not-a-uuid",
            &format!("public node:{u}:1"),
            &format!("public node: {u}"),
            "public flavor:",
            "public pool:x",
            "public NODE:x",
            "garbage",
            "public\u{0}node:\u{ffff}",
        ] {
            assert_eq!(
                hear("public", payload),
                Heard::Change(CacheChange::All),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn another_schemas_payload_is_not_ours() {
        let payload = format!("other {}", CacheChange::Node(uuid()).encode());
        assert_eq!(hear("public", &payload), Heard::Elsewhere);
        // A prefix of our schema's name is another schema, not ours.
        assert_eq!(hear("pub", &payload), Heard::Elsewhere);
        assert_eq!(hear("publicx", "public all"), Heard::Elsewhere);
    }

    #[test]
    fn an_oversized_payload_is_sent_as_all() {
        let huge = CacheChange::Flavor("f".repeat(CACHE_PAYLOAD_BYTES_MAX));
        assert_eq!(huge.encode(), "all");
        assert!(CacheChange::Node(uuid()).encode().len() < CACHE_PAYLOAD_BYTES_MAX);
    }
}
