//! The PostgreSQL store, for several Keygate nodes sharing one database. The same records, contracts and
//! record mappers as the SQLite store; what differs is said where it differs:
//! - change numbers of key secrets come from a counter row whose lock the writer holds until it commits
//!   (SQLite gets commit order from its single writer);
//! - read-then-write transactions lock the rows they read (`FOR UPDATE`), where SQLite's write lock
//!   serialised whole transactions;
//! - migrations run under an advisory lock, so nodes starting together apply each one once.

use std::time::Duration;

use async_trait::async_trait;
use keygate_core::SecretHash;
use sqlx::PgPool;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};

pub(crate) use crate::rows::{json_text, opt_json};
use crate::{
    ApiKey, AuditEvent, AuditFilter, Consumer, ConsumerLookup, ConsumerPatch, ConsumersOf, Granularity,
    KeyPatch, KeyTotal, KeyUsage, LeakPolicy, NewAudit, NewEvent, Page, Plan, PlanPatch, Result,
    SecretRecord, Store, StoreError, StoredSecret, UsageQuery, UsageRow,
};

/// PostgreSQL migrations, applied in order, each exactly once. Never edit one that has shipped: add a
/// new one. Version 1 is the SQLite schema as of its 18th migration; version 2 is SQLite's 19th.
const MIGRATIONS: &[&str] = &[include_str!("pg_schema.sql"), include_str!("pg_schema_2.sql")];

/// The advisory lock migrations hold (any constant; "keygate" in ASCII).
const MIGRATION_LOCK: i64 = 0x006b_6579_6761_7465;

/// Options for opening the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// How long a request waits for a pooled connection, and for a lock or a statement, before giving
    /// up with `Unavailable`.
    pub busy_timeout: Duration,
    pub max_connections: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { busy_timeout: Duration::from_secs(5), max_connections: 16 }
    }
}

pub struct PgStore {
    pub(crate) pool: PgPool,
}

impl PgStore {
    /// Connects to the database a `postgres://` URL names. Nothing is created: the database must exist
    /// (the schema is created by [`Store::migrate`]).
    pub async fn open(url: &str, options: &PgOptions) -> Result<Self> {
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            StoreError::Other(format!("the PostgreSQL URL does not parse: {}", redact(&e.to_string())))
        })?;
        let timeout_ms = options.busy_timeout.as_millis().max(1).to_string();
        let connect = connect
            .application_name("keygate")
            .options([("lock_timeout", timeout_ms.as_str()), ("statement_timeout", "30000")]);
        // This node's name, on every connection: audit records carry it (`origin`).
        let node = format!("{:x}{:x}", std::process::id(), crate::pg::random_u64());
        let set_node = format!("SET keygate.node = '{node}'");
        let pool = PgPoolOptions::new()
            .after_connect(move |conn, _| {
                let sql = set_node.clone();
                Box::pin(async move {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn).await?;
                    Ok(())
                })
            })
            .max_connections(options.max_connections.max(2))
            .min_connections(1)
            .acquire_timeout(options.busy_timeout + Duration::from_secs(1))
            .idle_timeout(Some(Duration::from_secs(300)))
            .connect_with(connect)
            .await
            .map_err(map_err)?;
        Ok(PgStore { pool })
    }
}

/// 64 bits that differ between processes started at the same moment (for a node's name, not a secret).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.finish()
}

/// An error message with anything that looks like a URL's password replaced.
fn redact(s: &str) -> String {
    match (s.find("://"), s.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &s[..scheme], &s[at..]),
        _ => s.to_string(),
    }
}

/// Turns a database error into the store's vocabulary by SQLSTATE class: 08 connection, 53 insufficient
/// resources, 55 prerequisite state (lock not available, database not accepting connections), 57
/// operator intervention (shutdown, statement or lock timeout), 58 system error, 40 serialisation
/// failure or deadlock, 25006 read-only transaction: `Unavailable`; 23 integrity constraint: `Conflict`.
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let class = code.get(..2).unwrap_or("");
            match class {
                // 55: object not in prerequisite state (a database that refuses connections, a lock
                // not available); 58: system error (I/O).
                "08" | "53" | "55" | "57" | "58" | "40" => StoreError::Unavailable(db.message().to_string()),
                "25" if code == "25006" => StoreError::Unavailable(db.message().to_string()),
                "23" => StoreError::Conflict(db.message().to_string()),
                _ => StoreError::Other(e.to_string()),
            }
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Other(e.to_string()),
    }
}

/// The record mappers, for PostgreSQL rows.
pub(crate) mod rows {
    use super::map_err;
    crate::rows::row_mappers!(sqlx::postgres::PgRow);
}
pub(crate) use rows::*;

/// The key search statement, with one more condition (on `$6`, the consumer).
macro_rules! const_format_keys {
    ($consumer:literal) => {
        concat!(
            "SELECT * FROM api_keys WHERE id > $1 ",
            $consumer,
            " AND ((lower(name) >= $3 AND lower(name) < $4) OR id = $5 OR start = $5) ",
            "ORDER BY id LIMIT $2"
        )
    };
}

pub(crate) type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

pub(crate) async fn fetch_by_id<T>(
    pool: &PgPool,
    sql: &'static str,
    id: &str,
    map: fn(&PgRow) -> Result<T>,
) -> Result<Option<T>> {
    let row = sqlx::query(sql).bind(id).fetch_optional(pool).await.map_err(map_err)?;
    row.as_ref().map(map).transpose()
}

fn search_terms(page: &Page) -> Option<(String, String, &str)> {
    let term = page.search.as_deref().map(str::trim).filter(|s| !s.is_empty())?;
    // ASCII only, as lower() on a "C" column and SQLite's NOCASE fold.
    let lower = term.to_ascii_lowercase();
    Some((lower.clone(), format!("{lower}\u{10FFFF}"), term))
}

/// A page of a listing: `plain` binds `$1` after and `$2` limit; `searched` also `$3`..`$5`, the lower
/// and upper bound of a lower-cased name prefix and the exact term.
pub(crate) async fn fetch_page<T>(
    pool: &PgPool,
    plain: &'static str,
    searched: &'static str,
    page: &Page,
    map: fn(&PgRow) -> Result<T>,
) -> Result<Vec<T>> {
    let after = page.after.as_deref().unwrap_or("");
    let query = match search_terms(page) {
        None => sqlx::query(plain).bind(after).bind(i64::from(page.limit)),
        Some((lo, hi, exact)) => sqlx::query(searched)
            .bind(after)
            .bind(i64::from(page.limit))
            .bind(lo)
            .bind(hi)
            .bind(exact.to_string()),
    };
    let rows = query.fetch_all(pool).await.map_err(map_err)?;
    rows.iter().map(map).collect()
}

/// The channel commits of audited changes are announced on.
pub(crate) const CHANGES_CHANNEL: &str = "keygate_changes";

/// Writes an audit record with the next change number (the counter row stays locked until this
/// transaction commits, so numbers are in commit order) and announces it to the other nodes: the
/// notification is delivered when the transaction commits, never before and never for a rollback.
pub(crate) async fn insert_audit(tx: &mut Tx<'_>, a: &NewAudit) -> Result<()> {
    sqlx::query(
        "WITH n AS (UPDATE change_counters SET value = value + 1 WHERE name = 'audit_events' RETURNING value) \
         INSERT INTO audit_events (id, at, actor, action, target_type, target_id, ip, details, seq) \
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, value FROM n",
    )
    .bind(&a.id)
    .bind(a.at)
    .bind(&a.actor)
    .bind(&a.action)
    .bind(&a.target_type)
    .bind(&a.target_id)
    .bind(&a.ip)
    .bind(json_text(&a.details))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANGES_CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    crate::pg_events::enqueue_audit_event(tx, a).await
}

/// [`ChangeListener`] over a PostgreSQL `LISTEN` connection (sqlx reconnects it when it drops).
struct PgChanges(sqlx::postgres::PgListener);

#[async_trait]
impl crate::ChangeListener for PgChanges {
    async fn next(&mut self) -> Result<bool> {
        match self.0.try_recv().await {
            Ok(Some(_)) => Ok(true),
            Ok(None) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }
}

async fn insert_consumer_tx(tx: &mut Tx<'_>, c: &Consumer) -> Result<()> {
    sqlx::query(
        "INSERT INTO consumers (id, name, metadata, disabled, system, rate_limits, external_id, leak_policy, \
         created_at, updated_at, owner_id, plan_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&c.id)
    .bind(&c.name)
    .bind(json_text(&c.metadata))
    .bind(c.disabled)
    .bind(c.system)
    .bind(opt_json(&c.rate_limits)?)
    .bind(&c.external_id)
    .bind(c.leak_policy.as_str())
    .bind(c.created_at)
    .bind(c.updated_at)
    .bind(&c.owner_id)
    .bind(&c.plan_id)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

async fn insert_key_tx(tx: &mut Tx<'_>, k: &ApiKey, s: &StoredSecret) -> Result<()> {
    let scopes = serde_json::to_string(&k.scopes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query(
        "INSERT INTO api_keys (id, consumer_id, name, environment, scopes, metadata, expires_at, disabled, \
         revoked_at, start, created_at, updated_at, rate_limits, allowed_ips, quota_remaining, quota_refill, \
         quota_refilled_at, imported) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(&k.id)
    .bind(&k.consumer_id)
    .bind(&k.name)
    .bind(k.environment.as_str())
    .bind(scopes)
    .bind(json_text(&k.metadata))
    .bind(k.expires_at)
    .bind(k.disabled)
    .bind(k.revoked_at)
    .bind(&k.start)
    .bind(k.created_at)
    .bind(k.updated_at)
    .bind(opt_json(&k.rate_limits)?)
    .bind(opt_json(&k.allowed_ips)?)
    .bind(k.quota.as_ref().map(|q| q.remaining as i64))
    .bind(opt_json(&k.quota.as_ref().and_then(|q| q.refill.clone()))?)
    .bind(k.quota.as_ref().map(|_| k.quota_refilled_at.unwrap_or(k.created_at)))
    .bind(k.imported)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    insert_secret_tx(tx, s).await
}

/// A key secret's change number is taken from the counter row, whose lock this transaction then holds
/// until it commits: a later number is always committed later.
pub(crate) const INSERT_KEY_SECRET: &str = "WITH n AS (UPDATE change_counters SET value = value + 1 WHERE name = 'key_secrets' RETURNING value) \
     INSERT INTO key_secrets (hash, key_id, start, created_at, expires_at, seq) SELECT $1, $2, $3, $4, $5, value FROM n";
pub(crate) const INSERT_CLIENT_SECRET: &str =
    "INSERT INTO client_secrets (hash, client_id, start, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)";

async fn insert_secret_tx(tx: &mut Tx<'_>, s: &StoredSecret) -> Result<()> {
    insert_secret_row(tx, INSERT_KEY_SECRET, s).await
}

pub(crate) async fn insert_secret_row(tx: &mut Tx<'_>, sql: &'static str, s: &StoredSecret) -> Result<()> {
    sqlx::query(sql)
        .bind(&s.hash.as_bytes()[..])
        .bind(&s.owner_id)
        .bind(&s.start)
        .bind(s.created_at)
        .bind(s.expires_at)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> Result<()> {
        // One transaction under an advisory lock: nodes that start together wait for each other, and the
        // second finds the versions the first applied.
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let done: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        if done > MIGRATIONS.len() as i64 {
            return Err(StoreError::Other(format!(
                "the database has schema version {done}, newer than this Keygate knows ({}); run a newer Keygate",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            if version <= done {
                continue;
            }
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(map_err)?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)",
            )
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            tracing::info!(version, "applied database migration");
        }
        tx.commit().await.map_err(map_err)
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn is_initialized(&self) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM keygate_meta WHERE key = 'initialized_at'")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(row.is_some())
    }

    async fn system_consumer_id(&self) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT value FROM keygate_meta WHERE key = 'system_consumer_id'")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn initialize(
        &self,
        consumer: &Consumer,
        key: &ApiKey,
        secret: &StoredSecret,
        audit: &NewAudit,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // The INSERT takes the write lock first, so two processes racing to initialise serialise here.
        let inserted = sqlx::query(
            "INSERT INTO keygate_meta (key, value) VALUES ('initialized_at', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(consumer.created_at.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO keygate_meta (key, value) VALUES ('system_consumer_id', $1)")
            .bind(&consumer.id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        insert_consumer_tx(&mut tx, consumer).await?;
        insert_key_tx(&mut tx, key, secret).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn insert_consumer(&self, consumer: &Consumer, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_consumer_tx(&mut tx, consumer).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_consumer(&self, id: &str) -> Result<Option<Consumer>> {
        fetch_by_id(&self.pool, "SELECT * FROM consumers_v WHERE id = $1", id, consumer_from_row).await
    }

    async fn list_consumers(&self, page: &Page) -> Result<Vec<Consumer>> {
        let plain = "SELECT * FROM consumers_v WHERE id > $1 ORDER BY id LIMIT $2";
        let searched = "SELECT * FROM consumers_v WHERE id > $1 AND ((lower(name) >= $3 \
                        AND lower(name) < $4) OR id = $5 OR external_id = $5) ORDER BY id LIMIT $2";
        fetch_page(&self.pool, plain, searched, page, consumer_from_row).await
    }

    async fn working_admin_keys(&self, now: i64, limit: u32) -> Result<Vec<(String, String)>> {
        sqlx::query_as(
            "SELECT k.id, k.consumer_id FROM api_keys k JOIN consumers_v c ON c.id = k.consumer_id \
             WHERE k.revoked_at IS NULL AND k.disabled = FALSE AND c.disabled = FALSE AND NOT c.owner_disabled \
             AND (k.expires_at IS NULL OR k.expires_at > $1) \
             AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(k.scopes::jsonb) s(value) WHERE s.value IN ('keygate:admin', 'keygate:*')) \
             ORDER BY k.id LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn find_consumer(&self, by: ConsumerLookup<'_>) -> Result<Option<Consumer>> {
        let (sql, value) = match by {
            ConsumerLookup::ExternalId(v) => ("SELECT * FROM consumers_v WHERE external_id = $1", v),
            ConsumerLookup::Name(v) => ("SELECT * FROM consumers_v WHERE name = $1 ORDER BY id LIMIT 1", v),
        };
        fetch_by_id(&self.pool, sql, value, consumer_from_row).await
    }

    async fn update_consumer(
        &self,
        id: &str,
        patch: &ConsumerPatch,
        audit: &NewAudit,
    ) -> Result<Option<Consumer>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE consumers SET name = COALESCE($1, name), metadata = COALESCE($2, metadata), \
             disabled = COALESCE($3, disabled), rate_limits = CASE WHEN $4 THEN $5 ELSE rate_limits END, \
             external_id = CASE WHEN $6 THEN $7 ELSE external_id END, leak_policy = COALESCE($8, leak_policy), \
             plan_id = CASE WHEN $9 THEN $10 ELSE plan_id END, owner_id = CASE WHEN $11 THEN $12 ELSE owner_id END, \
             updated_at = $13 WHERE id = $14 RETURNING id",
        )
        .bind(&patch.name)
        .bind(patch.metadata.as_ref().map(json_text))
        .bind(patch.disabled)
        .bind(patch.rate_limits.is_some())
        .bind(opt_json(&patch.rate_limits.clone().flatten())?)
        .bind(patch.external_id.is_some())
        .bind(patch.external_id.clone().flatten())
        .bind(patch.leak_policy.map(LeakPolicy::as_str))
        .bind(patch.plan_id.is_some())
        .bind(patch.plan_id.clone().flatten())
        .bind(patch.owner_id.is_some())
        .bind(patch.owner_id.clone().flatten())
        .bind(patch.updated_at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        if row.is_none() {
            return Ok(None);
        }
        let row = sqlx::query("SELECT * FROM consumers_v WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        let consumer = consumer_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(consumer))
    }

    async fn consumers_where(&self, of: ConsumersOf<'_>, page: &Page) -> Result<Vec<Consumer>> {
        let (sql, value) = match of {
            ConsumersOf::Owner(v) => {
                ("SELECT * FROM consumers_v WHERE owner_id = $1 AND id > $2 ORDER BY id LIMIT $3", v)
            }
            ConsumersOf::Plan(v) => {
                ("SELECT * FROM consumers_v WHERE plan_id = $1 AND id > $2 ORDER BY id LIMIT $3", v)
            }
        };
        let rows = sqlx::query(sql)
            .bind(value)
            .bind(page.after.as_deref().unwrap_or(""))
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(consumer_from_row).collect()
    }

    async fn insert_plan(&self, plan: &Plan, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        if plan.is_default {
            sqlx::query("UPDATE plans SET is_default = FALSE WHERE is_default")
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        sqlx::query(
            "INSERT INTO plans (id, name, name_key, description, rate_limits, quota, allowed_scopes, \
             key_lifetime_seconds, self_service, is_default, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&plan.id)
        .bind(&plan.name)
        .bind(plan.name.to_lowercase())
        .bind(&plan.description)
        .bind(opt_json(&plan.rate_limits)?)
        .bind(opt_json(&plan.quota)?)
        .bind(opt_json(&plan.allowed_scopes)?)
        .bind(plan.key_lifetime_seconds)
        .bind(plan.self_service)
        .bind(plan.is_default)
        .bind(plan.created_at)
        .bind(plan.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_plan(&self, id: &str) -> Result<Option<Plan>> {
        fetch_by_id(&self.pool, "SELECT * FROM plans WHERE id = $1", id, plan_from_row).await
    }

    async fn find_plan(&self, name: &str) -> Result<Option<Plan>> {
        fetch_by_id(
            &self.pool,
            "SELECT * FROM plans WHERE name_key = $1",
            &name.to_lowercase(),
            plan_from_row,
        )
        .await
    }

    async fn list_plans(&self) -> Result<Vec<Plan>> {
        let rows = sqlx::query("SELECT * FROM plans ORDER BY name_key LIMIT 1000")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(plan_from_row).collect()
    }

    async fn update_plan(&self, id: &str, p: &PlanPatch, audit: &NewAudit) -> Result<Option<Plan>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        if p.is_default == Some(true) {
            sqlx::query("UPDATE plans SET is_default = FALSE WHERE is_default AND id <> $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        let row = sqlx::query(
            "UPDATE plans SET name = COALESCE($1, name), name_key = COALESCE($2, name_key), \
             description = CASE WHEN $3 THEN $4 ELSE description END, \
             rate_limits = CASE WHEN $5 THEN $6 ELSE rate_limits END, \
             quota = CASE WHEN $7 THEN $8 ELSE quota END, \
             allowed_scopes = CASE WHEN $9 THEN $10 ELSE allowed_scopes END, \
             key_lifetime_seconds = CASE WHEN $11 THEN $12 ELSE key_lifetime_seconds END, \
             self_service = COALESCE($13, self_service), is_default = COALESCE($14, is_default), \
             updated_at = $15 WHERE id = $16 RETURNING *",
        )
        .bind(&p.name)
        .bind(p.name.as_ref().map(|n| n.to_lowercase()))
        .bind(p.description.is_some())
        .bind(p.description.clone().flatten())
        .bind(p.rate_limits.is_some())
        .bind(opt_json(&p.rate_limits.clone().flatten())?)
        .bind(p.quota.is_some())
        .bind(opt_json(&p.quota.clone().flatten())?)
        .bind(p.allowed_scopes.is_some())
        .bind(opt_json(&p.allowed_scopes.clone().flatten())?)
        .bind(p.key_lifetime_seconds.is_some())
        .bind(p.key_lifetime_seconds.flatten())
        .bind(p.self_service)
        .bind(p.is_default)
        .bind(p.updated_at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let plan = plan_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(plan))
    }

    async fn delete_plan(&self, id: &str, audit: &NewAudit) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM consumers WHERE plan_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        if used > 0 {
            return Err(StoreError::Conflict(format!("{used} consumer(s) are on this plan")));
        }
        let deleted = sqlx::query("DELETE FROM plans WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if deleted.rows_affected() == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn insert_key(&self, key: &ApiKey, secret: &StoredSecret, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_key_tx(&mut tx, key, secret).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_key(&self, id: &str) -> Result<Option<ApiKey>> {
        fetch_by_id(&self.pool, "SELECT * FROM api_keys WHERE id = $1", id, key_from_row).await
    }

    async fn list_keys(&self, consumer_id: Option<&str>, page: &Page) -> Result<Vec<ApiKey>> {
        // A statement per case, so that each uses its indexes: a consumer's keys through
        // `api_keys_by_consumer`, a search through the name, id and start indexes.
        let after = page.after.as_deref().unwrap_or("");
        let limit = i64::from(page.limit);
        let query = match (consumer_id, search_terms(page)) {
            (None, None) => sqlx::query("SELECT * FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(limit),
            (Some(c), None) => {
                sqlx::query("SELECT * FROM api_keys WHERE id > $1 AND consumer_id = $3 ORDER BY id LIMIT $2")
                    .bind(after)
                    .bind(limit)
                    .bind(c)
            }
            (c, Some((lo, hi, exact))) => {
                let sql: &'static str = if c.is_some() {
                    const_format_keys!("AND consumer_id = $6")
                } else {
                    const_format_keys!("AND $6::TEXT IS NULL")
                };
                sqlx::query(sql).bind(after).bind(limit).bind(lo).bind(hi).bind(exact.to_string()).bind(c)
            }
        };
        let rows = query.fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn update_key(&self, id: &str, patch: &KeyPatch, audit: &NewAudit) -> Result<Option<ApiKey>> {
        let scopes = patch
            .scopes
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE api_keys SET name = COALESCE($1, name), scopes = COALESCE($2, scopes), \
             metadata = COALESCE($3, metadata), \
             expires_at = CASE WHEN $4 THEN $5 ELSE expires_at END, \
             disabled = COALESCE($6, disabled), revoked_at = COALESCE($7, revoked_at), \
             rate_limits = CASE WHEN $8 THEN $9 ELSE rate_limits END, \
             allowed_ips = CASE WHEN $10 THEN $11 ELSE allowed_ips END, \
             quota_remaining = CASE WHEN $12 THEN $13 ELSE quota_remaining END, \
             quota_refill = CASE WHEN $14 THEN $15 ELSE quota_refill END, \
             quota_refilled_at = CASE WHEN $16 THEN $17 ELSE quota_refilled_at END, \
             quota_epoch = quota_epoch + CASE WHEN $12 THEN 1 ELSE 0 END, \
             updated_at = $18 \
             WHERE id = $19 AND revoked_at IS NULL RETURNING *",
        )
        .bind(&patch.name)
        .bind(scopes)
        .bind(patch.metadata.as_ref().map(json_text))
        .bind(patch.expires_at.is_some())
        .bind(patch.expires_at.flatten())
        .bind(patch.disabled)
        .bind(patch.revoked_at)
        .bind(patch.rate_limits.is_some())
        .bind(opt_json(&patch.rate_limits.clone().flatten())?)
        .bind(patch.allowed_ips.is_some())
        .bind(opt_json(&patch.allowed_ips.clone().flatten())?)
        .bind(patch.quota.is_some())
        .bind(patch.quota.as_ref().and_then(|q| q.as_ref()).map(|q| q.remaining as i64))
        .bind(patch.quota.is_some())
        .bind(opt_json(&patch.quota.as_ref().and_then(|q| q.as_ref()).and_then(|q| q.refill.clone()))?)
        .bind(patch.quota.is_some())
        .bind(
            patch
                .quota
                .as_ref()
                .and_then(|q| q.as_ref())
                .map(|_| patch.quota_refilled_at.unwrap_or(patch.updated_at)),
        )
        .bind(patch.updated_at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let key = key_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(key))
    }

    async fn rotate_key(
        &self,
        id: &str,
        new_secret: &StoredSecret,
        old_expires_at: i64,
        audit: &NewAudit,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let updated = sqlx::query(
            "UPDATE api_keys SET start = $1, updated_at = $2 WHERE id = $3 AND revoked_at IS NULL",
        )
        .bind(&new_secret.start)
        .bind(new_secret.created_at)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if updated == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE key_secrets SET expires_at = $1 WHERE key_id = $2 AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(old_expires_at)
        .bind(id)
        .bind(old_expires_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_secret_tx(&mut tx, new_secret).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn key_secret_hashes(&self, key_id: &str) -> Result<Vec<SecretHash>> {
        let rows = sqlx::query("SELECT hash FROM key_secrets WHERE key_id = $1")
            .bind(key_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(hash_from_row).collect()
    }

    async fn consumer_secret_hashes(&self, consumer_id: &str) -> Result<Vec<SecretHash>> {
        let rows = sqlx::query(
            "SELECT s.hash FROM key_secrets s JOIN api_keys k ON k.id = s.key_id WHERE k.consumer_id = $1",
        )
        .bind(consumer_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(hash_from_row).collect()
    }

    async fn find_secret(&self, hash: &SecretHash) -> Result<Option<SecretRecord>> {
        let row = sqlx::query(
            "SELECT s.hash AS hash, s.expires_at AS secret_expires_at, (c.disabled OR c.owner_disabled) AS consumer_disabled, \
             c.rate_limits AS consumer_rate_limits, k.* \
             FROM key_secrets s JOIN api_keys k ON k.id = s.key_id JOIN consumers_v c ON c.id = k.consumer_id \
             WHERE s.hash = $1",
        )
        .bind(&hash.as_bytes()[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(SecretRecord {
            hash: hash_from_row(&row)?,
            secret_expires_at: row.try_get("secret_expires_at").map_err(map_err)?,
            consumer_disabled: row.try_get("consumer_disabled").map_err(map_err)?,
            consumer_rate_limits: parse_opt(&row, "consumer_rate_limits")?,
            key: key_from_row(&row)?,
        }))
    }

    async fn import_keys(&self, keys: &[(ApiKey, StoredSecret)], audits: &[NewAudit]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for (key, secret) in keys {
            insert_key_tx(&mut tx, key, secret).await?;
        }
        for a in audits {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn existing_hashes(&self, hashes: &[SecretHash]) -> Result<Vec<SecretHash>> {
        let mut found = Vec::new();
        for chunk in hashes.chunks(500) {
            let list: Vec<&[u8]> = chunk.iter().map(|h| &h.as_bytes()[..]).collect();
            let rows = sqlx::query("SELECT hash FROM key_secrets WHERE hash = ANY($1)")
                .bind(list)
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)?;
            for row in &rows {
                found.push(hash_from_row(row)?);
            }
        }
        Ok(found)
    }

    async fn secret_changes_after(&self, seq: i64, limit: u32) -> Result<Vec<(i64, SecretHash)>> {
        let rows = sqlx::query("SELECT seq, hash FROM key_secrets WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(seq)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(|r| Ok((r.try_get("seq").map_err(map_err)?, hash_from_row(r)?))).collect()
    }

    async fn flush_usage(&self, batch: &[KeyUsage], events: &[NewEvent]) -> Result<()> {
        if batch.is_empty() && events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // In dedup-key order, as every node writes them: two flushes wait for each other, never deadlock.
        let mut events: Vec<&NewEvent> = events.iter().collect();
        events.sort_by(|a, b| a.dedup.cmp(&b.dedup));
        for e in events {
            crate::pg_events::insert_event_tx(
                &mut tx,
                &e.id,
                &e.event_type,
                e.at,
                &e.payload,
                Some(&e.dedup),
            )
            .await?;
        }
        // The roll-ups: all keys (scope '') and each consumer, summed over the batch first.
        let mut rollups: std::collections::BTreeMap<(&str, &str, i64), i64> =
            std::collections::BTreeMap::new();
        for u in batch {
            for (code, count) in &u.counts {
                for scope in ["", u.consumer_id.as_str()] {
                    *rollups.entry((scope, *code, u.at)).or_insert(0) += *count as i64;
                }
            }
        }
        for ((scope, code, at), count) in rollups {
            for g in Granularity::ALL {
                sqlx::query(
                    "INSERT INTO usage_rollups (scope, granularity, bucket_start, code, count) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (scope, granularity, bucket_start, code) DO UPDATE SET count = usage_rollups.count + excluded.count",
                )
                .bind(scope)
                .bind(g.as_str())
                .bind(g.bucket(at))
                .bind(code)
                .bind(count)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
        }
        // In key order, as every node does: two nodes' flushes of the same buckets wait for each other
        // instead of deadlocking.
        let mut batch: Vec<&KeyUsage> = batch.iter().collect();
        batch.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        for u in batch {
            for (code, count) in &u.counts {
                for g in Granularity::ALL {
                    sqlx::query(
                        "INSERT INTO usage_buckets (key_id, consumer_id, granularity, bucket_start, code, count) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (key_id, granularity, bucket_start, code) \
                         DO UPDATE SET count = usage_buckets.count + excluded.count",
                    )
                    .bind(&u.key_id)
                    .bind(&u.consumer_id)
                    .bind(g.as_str())
                    .bind(g.bucket(u.at))
                    .bind(*code)
                    .bind(*count as i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                }
            }
            if let Some((at, ip)) = &u.last_used {
                // Several nodes flush: the newest use wins, whichever node writes last.
                sqlx::query(
                    "UPDATE api_keys SET last_used_at = $1, last_used_ip = $2 \
                     WHERE id = $3 AND (last_used_at IS NULL OR last_used_at <= $1)",
                )
                .bind(at)
                .bind(ip)
                .bind(&u.key_id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
            // No quota write: on a shared database the stored quota is the pool nodes lease from, and
            // it changes only by leases (`lease_quota`), returns and admin changes. `u.quota` is this
            // node's view, from which the server derived the quota events written above.
        }
        tx.commit().await.map_err(map_err)
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        // One key: its own buckets (with its consumer, if one is named, as a filter). A consumer, or all
        // keys: the roll-ups, a few rows per bucket however many keys were busy.
        let (sql, key_or_scope) = match (&q.key_id, &q.consumer_id) {
            (Some(k), _) => (
                "SELECT bucket_start, code, count FROM usage_buckets \
                 WHERE key_id = $1 AND granularity = $2 AND bucket_start >= $3 AND bucket_start < $4 \
                 AND ($5 IS NULL OR consumer_id = $5) ORDER BY bucket_start, code",
                k.as_str(),
            ),
            (None, scope) => (
                "SELECT bucket_start, code, count FROM usage_rollups \
                 WHERE scope = $1 AND granularity = $2 AND bucket_start >= $3 AND bucket_start < $4 \
                 AND $5 IS NULL ORDER BY bucket_start, code",
                scope.as_deref().unwrap_or(""),
            ),
        };
        let filter = if q.key_id.is_some() { q.consumer_id.as_deref() } else { None };
        let rows = sqlx::query(sql)
            .bind(key_or_scope)
            .bind(q.granularity.as_str())
            .bind(q.granularity.bucket(q.from))
            .bind(q.to)
            .bind(filter)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    bucket_start: r.try_get("bucket_start").map_err(map_err)?,
                    code: r.try_get("code").map_err(map_err)?,
                    count: r.try_get("count").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn usage_by_key(&self, q: &UsageQuery) -> Result<Vec<KeyTotal>> {
        let rows = sqlx::query(
            "SELECT key_id, consumer_id, SUM(count)::BIGINT AS total, \
             SUM(CASE WHEN code = 'VALID' THEN 0 ELSE count END)::BIGINT AS failures FROM usage_buckets \
             WHERE granularity = $1 AND bucket_start >= $2 AND bucket_start < $3 \
             GROUP BY key_id, consumer_id ORDER BY key_id",
        )
        .bind(q.granularity.as_str())
        .bind(q.granularity.bucket(q.from))
        .bind(q.to)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(KeyTotal {
                    key_id: r.try_get("key_id").map_err(map_err)?,
                    consumer_id: r.try_get("consumer_id").map_err(map_err)?,
                    total: r.try_get("total").map_err(map_err)?,
                    failures: r.try_get("failures").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn keys_lowest_quota(&self, now: i64, limit: u32) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE quota_remaining IS NOT NULL AND revoked_at IS NULL AND disabled = FALSE \
             AND (expires_at IS NULL OR expires_at > $1) ORDER BY quota_remaining, id LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(key_from_row).collect()
    }

    async fn expire_usage(&self, before: &[(Granularity, i64)]) -> Result<u64> {
        let mut deleted = 0;
        // The buckets and their roll-ups go together.
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for (g, t) in before {
            deleted += sqlx::query("DELETE FROM usage_buckets WHERE granularity = $1 AND bucket_start < $2")
                .bind(g.as_str())
                .bind(t)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
            sqlx::query("DELETE FROM usage_rollups WHERE granularity = $1 AND bucket_start < $2")
                .bind(g.as_str())
                .bind(t)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(deleted)
    }

    async fn keys_expiring_between(&self, from: i64, to: i64, page: &Page) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(
            "SELECT * FROM api_keys WHERE revoked_at IS NULL AND disabled = FALSE AND expires_at > $1 \
             AND expires_at <= $2 AND id > $3 ORDER BY id LIMIT $4",
        )
        .bind(from)
        .bind(to)
        .bind(page.after.as_deref().unwrap_or(""))
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(key_from_row).collect()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn last_change(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT value FROM change_counters WHERE name = 'audit_events'")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn changes_after(&self, seq: i64, limit: u32) -> Result<Vec<crate::Change>> {
        let rows = sqlx::query(
            "SELECT seq, action, target_id, origin IS NOT DISTINCT FROM current_setting('keygate.node', true) \
             AS local FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(crate::Change {
                    seq: r.try_get("seq").map_err(map_err)?,
                    action: r.try_get("action").map_err(map_err)?,
                    target_id: r.try_get("target_id").map_err(map_err)?,
                    local: r.try_get("local").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn listen(&self) -> Result<Option<Box<dyn crate::ChangeListener>>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await.map_err(map_err)?;
        listener.listen(CHANGES_CHANNEL).await.map_err(map_err)?;
        Ok(Some(Box::new(PgChanges(listener))))
    }

    async fn lease_quota(&self, key_id: &str, min: u64, now: i64) -> Result<Option<crate::QuotaLease>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "SELECT quota_remaining, quota_refill, quota_refilled_at, quota_epoch, created_at FROM api_keys \
             WHERE id = $1 FOR UPDATE",
        )
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let Some(pool) = row.try_get::<Option<i64>, _>("quota_remaining").map_err(map_err)? else {
            return Ok(None);
        };
        let refill: Option<keygate_core::limits::Refill> = parse_opt(&row, "quota_refill")?;
        let created_at: i64 = row.try_get("created_at").map_err(map_err)?;
        let mut refilled_at: i64 =
            row.try_get::<Option<i64>, _>("quota_refilled_at").map_err(map_err)?.unwrap_or(created_at);
        let mut epoch: i64 = row.try_get("quota_epoch").map_err(map_err)?;
        let mut pool = pool.max(0) as u64;
        if let Some(r) = &refill
            && keygate_core::limits::apply_refills(&mut pool, &mut refilled_at, r, now)
        {
            epoch += 1;
        }
        let min = min.max(1);
        let granted = if pool < min { 0 } else { (pool / 8).clamp(min, min.max(1000)).min(pool) };
        sqlx::query(
            "UPDATE api_keys SET quota_remaining = $1, quota_refilled_at = $2, quota_epoch = $3 WHERE id = $4",
        )
        .bind((pool - granted) as i64)
        .bind(refilled_at)
        .bind(epoch)
        .bind(key_id)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(crate::QuotaLease { granted, pool_left: pool - granted, refilled_at, epoch }))
    }

    async fn adjust_quota(
        &self,
        key_id: &str,
        change: crate::QuotaChange,
        now: i64,
        audit: &NewAudit,
    ) -> Result<Option<ApiKey>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "SELECT quota_remaining, quota_refill, quota_refilled_at, created_at FROM api_keys \
             WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
        )
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let Some(pool) = row.try_get::<Option<i64>, _>("quota_remaining").map_err(map_err)? else {
            return Ok(None);
        };
        let refill: Option<keygate_core::limits::Refill> = parse_opt(&row, "quota_refill")?;
        let created_at: i64 = row.try_get("created_at").map_err(map_err)?;
        let mut refilled_at: i64 =
            row.try_get::<Option<i64>, _>("quota_refilled_at").map_err(map_err)?.unwrap_or(created_at);
        let mut pool = pool.max(0) as u64;
        if let Some(r) = &refill {
            keygate_core::limits::apply_refills(&mut pool, &mut refilled_at, r, now);
        }
        let before = pool;
        match change {
            crate::QuotaChange::Set(n) => pool = n,
            crate::QuotaChange::Add(n) => pool = pool.saturating_add(n).min(keygate_core::limits::MAX_LIMIT),
            crate::QuotaChange::Reset => {
                if let Some(r) = &refill {
                    pool = r.amount;
                    refilled_at = now;
                }
            }
        }
        let row = sqlx::query(
            "UPDATE api_keys SET quota_remaining = $1, quota_refilled_at = $2, quota_epoch = quota_epoch + 1, \
             updated_at = $3 WHERE id = $4 RETURNING *",
        )
        .bind(pool as i64)
        .bind(refilled_at)
        .bind(now)
        .bind(key_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let key = key_from_row(&row)?;
        let mut details = audit.details.clone();
        if let Some(d) = details.as_object_mut() {
            d.insert("before".into(), before.into());
            d.insert("after".into(), pool.into());
        }
        insert_audit(&mut tx, &NewAudit { details, ..audit.clone() }).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(key))
    }

    async fn exclusive(&self, name: &str) -> Result<Box<dyn std::any::Any + Send>> {
        // A session-level advisory lock on a connection taken out of the pool: dropping the guard
        // closes that connection, which ends the session and so releases the lock, even if this node
        // dies holding it.
        let mut conn = self.pool.acquire().await.map_err(map_err)?.detach();
        sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
            .bind(format!("keygate/{name}"))
            .execute(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(Box::new(conn))
    }

    async fn return_quota(&self, key_id: &str, units: u64, epoch: i64) -> Result<()> {
        sqlx::query(
            "UPDATE api_keys SET quota_remaining = LEAST(quota_remaining + $1, $2) \
             WHERE id = $3 AND quota_epoch = $4 AND quota_remaining IS NOT NULL",
        )
        .bind(units.min(i64::MAX as u64) as i64)
        .bind(keygate_core::limits::MAX_LIMIT as i64)
        .bind(key_id)
        .bind(epoch)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>> {
        // With a target, its index (`audit_events_by_target`); otherwise newest first by id.
        let sql = if filter.target_id.is_some() {
            "SELECT e.*, COALESCE(k.name, u.username) AS actor_name FROM audit_events e \
             LEFT JOIN api_keys k ON k.id = e.actor LEFT JOIN users u ON u.id = e.actor \
             WHERE e.target_id = $1 AND ($2 IS NULL OR e.action = $2) \
             AND ($3 IS NULL OR e.id < $3) AND ($5 IS NULL OR e.actor = $5) \
             AND ($6 IS NULL OR e.at >= $6) AND ($7 IS NULL OR e.at < $7) ORDER BY e.id DESC LIMIT $4"
        } else {
            "SELECT e.*, COALESCE(k.name, u.username) AS actor_name FROM audit_events e \
             LEFT JOIN api_keys k ON k.id = e.actor LEFT JOIN users u ON u.id = e.actor \
             WHERE $1 IS NULL AND ($2 IS NULL OR e.action = $2) \
             AND ($3 IS NULL OR e.id < $3) AND ($5 IS NULL OR e.actor = $5) \
             AND ($6 IS NULL OR e.at >= $6) AND ($7 IS NULL OR e.at < $7) ORDER BY e.id DESC LIMIT $4"
        };
        let rows = sqlx::query(sql)
            .bind(&filter.target_id)
            .bind(&filter.action)
            .bind(&filter.before)
            .bind(i64::from(filter.limit))
            .bind(&filter.actor)
            .bind(filter.from)
            .bind(filter.to)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(audit_from_row).collect()
    }
}
