//! Keygate's storage: one [`Store`] trait, one implementation per database.
//!
//! Policy:
//! - Every change to a consumer or a key is written in the same transaction as its audit event, so
//!   there is never a change without its audit record, nor a half-written record.
//! - A database that is busy, locked, full or unreachable is [`StoreError::Unavailable`] (HTTP 503):
//!   the caller learns that nothing was acknowledged and can retry.
//! - Times are integers: milliseconds since the Unix epoch, UTC. Secrets are stored only as SHA-256.

pub mod copy;
mod events;
mod model;
mod oauth;
mod pg;
mod pg_events;
mod pg_oauth;
mod pg_users;
mod rows;
mod sqlite;
mod sqlite_events;
mod sqlite_oauth;
mod sqlite_users;
#[cfg(feature = "testing")]
pub mod testing;
mod users;

pub use events::*;
pub use model::*;
pub use oauth::*;
pub use pg::{PgOptions, PgStore};
pub use sqlite::{SqliteOptions, SqliteStore};
pub use users::*;

use async_trait::async_trait;
use keygate_core::SecretHash;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot take the request now (busy, locked, disk full, I/O error, pool exhausted).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule was broken (for instance a secret hash that already exists).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored data could not be read back (a bug or a hand-edited database).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Anything else the database reported (a bug, or a database Keygate cannot use).
    #[error("database error: {0}")]
    Other(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How to open a store.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long a write waits for the database (SQLite's lock) before giving up with `Unavailable`.
    pub busy_timeout: std::time::Duration,
    pub max_connections: u32,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        let sqlite = SqliteOptions::default();
        ConnectOptions { busy_timeout: sqlite.busy_timeout, max_connections: sqlite.max_connections }
    }
}

/// Opens the store a location names, with its migrations applied: a file path or a `sqlite:PATH` URL
/// is the embedded SQLite database (created if missing); a `postgres://` (or `postgresql://`) URL is a
/// PostgreSQL database, which must exist. The server and the CLI see only the backend-neutral [`Backend`].
pub async fn connect(location: &str, options: &ConnectOptions) -> Result<std::sync::Arc<dyn Backend>> {
    let path = match location.split_once(':') {
        Some(("postgres" | "postgresql", _)) => {
            let pg =
                PgOptions { busy_timeout: options.busy_timeout, max_connections: options.max_connections };
            let store = PgStore::open(location, &pg).await?;
            store.migrate().await?;
            return Ok(std::sync::Arc::new(store));
        }
        Some(("sqlite", rest)) => rest.trim_start_matches("//"),
        Some((scheme, _))
            if scheme.len() > 1 && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') =>
        {
            return Err(StoreError::Other(format!(
                "unknown database URL scheme '{scheme}:'; give a file path, a sqlite:PATH URL or a postgres:// URL"
            )));
        }
        _ => location,
    };
    if path.is_empty() {
        return Err(StoreError::Other(
            "the database location is empty; give a file path, sqlite:PATH or a postgres:// URL".into(),
        ));
    }
    let sqlite =
        SqliteOptions { busy_timeout: options.busy_timeout, max_connections: options.max_connections };
    let store = SqliteStore::open(std::path::Path::new(path), &sqlite).await?;
    store.migrate().await?;
    Ok(std::sync::Arc::new(store))
}

/// Paging through a listing in id (= creation) order.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub after: Option<String>,
    pub limit: u32,
    /// Only records whose name starts with this (ignoring ASCII case), or whose id (or a consumer's
    /// external id) is exactly this.
    pub search: Option<String>,
}

/// One key's verifications in a time range (the usage boards rank keys and consumers by these).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyTotal {
    pub key_id: String,
    pub consumer_id: String,
    pub total: i64,
    /// Verifications that did not answer `VALID`.
    pub failures: i64,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub target_id: Option<String>,
    pub action: Option<String>,
    /// Only events made by this actor (a key id, or `system`).
    pub actor: Option<String>,
    /// Only events at or after this time (ms).
    pub from: Option<i64>,
    /// Only events before this time (ms).
    pub to: Option<i64>,
    /// Newest first; continue with the id of the last event seen.
    pub before: Option<String>,
    pub limit: u32,
}

/// Everything Keygate keeps: API keys ([`Store`]) and OAuth ([`OAuthStore`]).
pub trait Backend: Store + OAuthStore + EventStore {}
impl<T: Store + OAuthStore + EventStore> Backend for T {}

/// Everything Keygate keeps about consumers and API keys. Implementations must be safe to share between request handlers.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations. Safe to call on every start.
    async fn migrate(&self) -> Result<()>;
    /// Cheap liveness check of the database, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Closes the connections, after the last use (a graceful stop).
    async fn close(&self);

    /// Has the bootstrap admin credential been created?
    async fn is_initialized(&self) -> Result<bool>;
    /// Id of Keygate's own consumer, which holds admin keys (set by [`Store::initialize`]).
    async fn system_consumer_id(&self) -> Result<Option<String>>;
    /// Creates the system consumer and the bootstrap admin key, once. Returns false, changing
    /// nothing, if the store was already initialised.
    async fn initialize(
        &self,
        consumer: &Consumer,
        key: &ApiKey,
        secret: &StoredSecret,
        audit: &NewAudit,
    ) -> Result<bool>;

    async fn insert_consumer(&self, consumer: &Consumer, audit: &NewAudit) -> Result<()>;
    async fn get_consumer(&self, id: &str) -> Result<Option<Consumer>>;
    async fn list_consumers(&self, page: &Page) -> Result<Vec<Consumer>>;
    /// A consumer by external id or by name.
    async fn find_consumer(&self, by: ConsumerLookup<'_>) -> Result<Option<Consumer>>;
    /// Applies a patch; `None` if there is no such consumer.
    async fn update_consumer(
        &self,
        id: &str,
        patch: &ConsumerPatch,
        audit: &NewAudit,
    ) -> Result<Option<Consumer>>;

    /// Consumers owned by a user, or on a plan, in id order.
    async fn consumers_where(&self, of: ConsumersOf<'_>, page: &Page) -> Result<Vec<Consumer>>;

    /// Inserts a plan with its audit event; `Conflict` if the name (ignoring case) is taken. A default
    /// plan takes the default from any other.
    async fn insert_plan(&self, plan: &Plan, audit: &NewAudit) -> Result<()>;
    async fn get_plan(&self, id: &str) -> Result<Option<Plan>>;
    /// By name, ignoring case.
    async fn find_plan(&self, name: &str) -> Result<Option<Plan>>;
    /// Every plan (at most 1000), by name.
    async fn list_plans(&self) -> Result<Vec<Plan>>;
    /// `None` if there is no such plan; `Conflict` if a new name is taken.
    async fn update_plan(&self, id: &str, patch: &PlanPatch, audit: &NewAudit) -> Result<Option<Plan>>;
    /// False if there was none; `Conflict` while any consumer is on it.
    async fn delete_plan(&self, id: &str, audit: &NewAudit) -> Result<bool>;

    async fn insert_key(&self, key: &ApiKey, secret: &StoredSecret, audit: &NewAudit) -> Result<()>;
    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>>;
    async fn list_keys(&self, consumer_id: Option<&str>, page: &Page) -> Result<Vec<ApiKey>>;
    /// Applies a patch to a key that is not revoked. `None` if the key does not exist or is revoked
    /// (look it up to tell which).
    async fn update_key(&self, id: &str, patch: &KeyPatch, audit: &NewAudit) -> Result<Option<ApiKey>>;
    /// Adds `new_secret` to a key that is not revoked and makes every other live secret of it expire at
    /// `old_expires_at` (or earlier, if it already expires earlier). False if there is no such live key.
    async fn rotate_key(
        &self,
        id: &str,
        new_secret: &StoredSecret,
        old_expires_at: i64,
        audit: &NewAudit,
    ) -> Result<bool>;

    /// Up to `limit` keys that can use the admin API now: `keygate:admin` (or `keygate:*`), not revoked, disabled or
    /// expired at `now`, consumer enabled. As `(key id, consumer id)`.
    async fn working_admin_keys(&self, now: i64, limit: u32) -> Result<Vec<(String, String)>>;

    /// The hashes of every secret of a key, for cache invalidation.
    async fn key_secret_hashes(&self, key_id: &str) -> Result<Vec<SecretHash>>;
    /// The hashes of every secret of every key of a consumer, for cache invalidation.
    async fn consumer_secret_hashes(&self, consumer_id: &str) -> Result<Vec<SecretHash>>;
    /// The verify path's one read: a secret by its hash, with its key and consumer state.
    async fn find_secret(&self, hash: &SecretHash) -> Result<Option<SecretRecord>>;

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>>;
    /// Keys that are neither revoked nor disabled and expire in `(from, to]`, in id order.
    async fn keys_expiring_between(&self, from: i64, to: i64, page: &Page) -> Result<Vec<ApiKey>>;

    /// Inserts imported keys and their audit events in one transaction: all or none.
    async fn import_keys(&self, keys: &[(ApiKey, StoredSecret)], audits: &[NewAudit]) -> Result<()>;
    /// Which of these secret hashes are already stored.
    async fn existing_hashes(&self, hashes: &[SecretHash]) -> Result<Vec<SecretHash>>;
    /// Key-secret hashes with a change number above `seq`, in change-number order, with their change
    /// numbers (for the known-hash filter: loaded at start, then followed).
    ///
    /// Contract: change numbers are assigned in **commit order**. Once a reader has seen change number N,
    /// no secret committed later gets a number at or below N, so following "everything after the last
    /// number seen" never skips a row, with any number of concurrent writers or nodes. (Row ids and
    /// sequences do not promise this: a transaction can take a lower id and commit after a higher one.)
    async fn secret_changes_after(&self, seq: i64, limit: u32) -> Result<Vec<(i64, SecretHash)>>;

    /// Writes a batch of usage counts, last-used times and quota states, with the events they give rise
    /// to (quota and rate-limit events, each once per dedup key), in one transaction.
    async fn flush_usage(&self, batch: &[KeyUsage], events: &[NewEvent]) -> Result<()>;
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;
    /// Every key with verifications in the query's range, at its granularity (the query's key and
    /// consumer are ignored), in key id order. Reads only the covering index of the range.
    async fn usage_by_key(&self, query: &UsageQuery) -> Result<Vec<KeyTotal>>;
    /// Up to `limit` keys with a quota that work at `now` (not revoked, disabled or expired), fewest uses
    /// left first.
    async fn keys_lowest_quota(&self, now: i64, limit: u32) -> Result<Vec<ApiKey>>;
    /// Deletes usage buckets of each granularity older than its time. Returns how many.
    async fn expire_usage(&self, before: &[(Granularity, i64)]) -> Result<u64>;

    /// May several Keygate nodes share this database? Then each follows the others' changes
    /// ([`Store::changes_after`], [`Store::listen`]) to keep its caches true.
    fn shared(&self) -> bool {
        false
    }
    /// The newest change number of [`Store::changes_after`] (0 when there is none).
    async fn last_change(&self) -> Result<i64> {
        Ok(0)
    }
    /// The audited changes with a change number above `seq`, oldest first: every change to a consumer,
    /// key, client, user, token, grant or signing key is audited in its own transaction, so this is
    /// every change another node may hold a stale copy of. Same contract as
    /// [`Store::secret_changes_after`]: numbers in commit order, so following never skips one. Empty for
    /// a store that is not [`Store::shared`].
    async fn changes_after(&self, _seq: i64, _limit: u32) -> Result<Vec<Change>> {
        Ok(Vec::new())
    }
    /// A subscription to commits of audited changes (on any node); `None` for a store that is not
    /// [`Store::shared`].
    async fn listen(&self) -> Result<Option<Box<dyn ChangeListener>>> {
        Ok(None)
    }

    /// For a shared store: takes quota from a key's pool for this node to admit on its own, atomically
    /// (after applying any refill due at `now`): an eighth of the pool, at least `min` and at most
    /// 1000 units, never more than the pool; nothing if the pool has less than `min`. `None`: the key
    /// has no quota (or does not exist).
    async fn lease_quota(&self, _key_id: &str, _min: u64, _now: i64) -> Result<Option<QuotaLease>> {
        Err(StoreError::Other("quota leases need a shared store".into()))
    }
    /// For a shared store: changes a key's pool in one locked read-modify-write (after applying a refill
    /// that is due), starting a new epoch, with its audit record, whose details gain `before` and
    /// `after`. `None`: the key does not exist, is revoked or has no quota.
    async fn adjust_quota(
        &self,
        _key_id: &str,
        _change: QuotaChange,
        _now: i64,
        _audit: &NewAudit,
    ) -> Result<Option<ApiKey>> {
        Err(StoreError::Other("quota leases need a shared store".into()))
    }
    /// For a shared store: waits for, and holds until the returned guard is dropped, a lock that every
    /// node sharing the database takes for the same `name` (one holder at a time across nodes). A store
    /// that is not shared has nothing to lock: the guard is empty.
    async fn exclusive(&self, _name: &str) -> Result<Box<dyn std::any::Any + Send>> {
        Ok(Box::new(()))
    }
    /// For a shared store: puts unused leased units back, unless the pool changed epoch since.
    async fn return_quota(&self, _key_id: &str, _units: u64, _epoch: i64) -> Result<()> {
        Err(StoreError::Other("quota leases need a shared store".into()))
    }
}

/// Wakes a follower when changes may have been committed (PostgreSQL `LISTEN`).
#[async_trait]
pub trait ChangeListener: Send {
    /// Waits for the next notification. `Ok(false)`: the connection was lost and has been made again,
    /// so notifications may have been missed (read the changes after the last one seen). An error: the
    /// connection cannot be made now (try again later).
    async fn next(&mut self) -> Result<bool>;
}
