//! The embedded SQLite store: one file, WAL mode, `synchronous=FULL` so that a write is durable
//! before Keygate acknowledges it.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use keygate_core::SecretHash;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::{
    ApiKey, AuditEvent, AuditFilter, Consumer, ConsumerLookup, ConsumerPatch, ConsumersOf, Granularity,
    KeyPatch, KeyTotal, KeyUsage, LeakPolicy, NewAudit, NewEvent, Page, Plan, PlanPatch, Result,
    SecretRecord, Store, StoreError, StoredSecret, UsageQuery, UsageRow,
};

/// Migrations, applied in order, each exactly once. Never edit one that has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: consumers, API keys with their secrets, and the audit log.
    r#"
    -- Small facts about this installation, e.g. when it was initialised.
    CREATE TABLE keygate_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE consumers (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        metadata   TEXT NOT NULL,              -- JSON object
        disabled   INTEGER NOT NULL DEFAULT 0,
        system     INTEGER NOT NULL DEFAULT 0, -- Keygate's own consumer, holder of admin keys
        created_at INTEGER NOT NULL,           -- ms since epoch
        updated_at INTEGER NOT NULL
    );

    CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        consumer_id TEXT NOT NULL REFERENCES consumers(id),
        name        TEXT NOT NULL,
        environment TEXT NOT NULL CHECK (environment IN ('live', 'test')),
        scopes      TEXT NOT NULL,             -- JSON array of strings, sorted
        metadata    TEXT NOT NULL,             -- JSON object
        expires_at  INTEGER,
        disabled    INTEGER NOT NULL DEFAULT 0,
        revoked_at  INTEGER,                   -- set once, never cleared
        start       TEXT NOT NULL,             -- visible start of the newest secret
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE INDEX api_keys_by_consumer ON api_keys (consumer_id, id);

    -- A key has one secret, or more while a rotation's overlap window is open.
    -- Only SHA-256 of each secret is kept; verify looks secrets up by that hash.
    CREATE TABLE key_secrets (
        hash       BLOB PRIMARY KEY,
        key_id     TEXT NOT NULL REFERENCES api_keys(id),
        start      TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER                     -- end of the overlap window after a rotation
    );
    CREATE INDEX key_secrets_by_key ON key_secrets (key_id);

    -- Append-only. Ids sort by time.
    CREATE TABLE audit_events (
        id          TEXT PRIMARY KEY,
        at          INTEGER NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        target_type TEXT NOT NULL,
        target_id   TEXT NOT NULL,
        ip          TEXT,
        details     TEXT NOT NULL              -- JSON object; never holds a secret
    );
    CREATE INDEX audit_events_by_target ON audit_events (target_id, id);
    "#,
    // 2: usage controls (rate limits, quotas, IP allow-lists), usage analytics, imported keys.
    r#"
    ALTER TABLE consumers ADD COLUMN rate_limits TEXT;   -- JSON array: the plan keys inherit; NULL = none
    ALTER TABLE api_keys ADD COLUMN rate_limits TEXT;    -- JSON array; NULL = inherit the consumer's
    ALTER TABLE api_keys ADD COLUMN allowed_ips TEXT;    -- JSON array of CIDRs; NULL = from anywhere
    ALTER TABLE api_keys ADD COLUMN quota_remaining INTEGER;   -- NULL = no quota
    ALTER TABLE api_keys ADD COLUMN quota_refill TEXT;         -- JSON object or NULL
    ALTER TABLE api_keys ADD COLUMN quota_refilled_at INTEGER; -- ms; refills count from here
    ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
    ALTER TABLE api_keys ADD COLUMN last_used_ip TEXT;
    ALTER TABLE api_keys ADD COLUMN imported INTEGER NOT NULL DEFAULT 0;

    -- Verify counts per key, outcome code and time bucket. Written by the batch flusher (never on the
    -- verify path): minute rows, plus hour and day roll-ups updated in the same transaction. Old rows
    -- are deleted by the retention job, per granularity.
    CREATE TABLE usage_buckets (
        key_id       TEXT NOT NULL,
        consumer_id  TEXT NOT NULL,
        granularity  TEXT NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
        bucket_start INTEGER NOT NULL,         -- ms since epoch, start of the bucket
        code         TEXT NOT NULL,            -- decision code
        count        INTEGER NOT NULL,
        PRIMARY KEY (key_id, granularity, bucket_start, code)
    );
    CREATE INDEX usage_by_consumer ON usage_buckets (consumer_id, granularity, bucket_start);
    CREATE INDEX usage_by_age ON usage_buckets (granularity, bucket_start);
    "#,
    // 3: OAuth 2: clients and their secrets, signing keys, opaque access tokens, revoked JWT ids.
    r#"
    CREATE TABLE oauth_clients (
        id                     TEXT PRIMARY KEY,     -- the client_id
        consumer_id            TEXT NOT NULL REFERENCES consumers(id),
        name                   TEXT NOT NULL,
        grant_types            TEXT NOT NULL,        -- JSON array
        scopes                 TEXT NOT NULL,        -- JSON array: scopes it may be granted
        audiences              TEXT NOT NULL,        -- JSON array: resources it may ask for
        token_format           TEXT NOT NULL CHECK (token_format IN ('jwt', 'opaque')),
        token_lifetime_seconds INTEGER NOT NULL,
        confidential           INTEGER NOT NULL,
        disabled               INTEGER NOT NULL DEFAULT 0,
        tokens_revoked_before  INTEGER,              -- ms; tokens issued earlier are revoked
        secret_start           TEXT,
        created_at             INTEGER NOT NULL,
        updated_at             INTEGER NOT NULL
    );
    CREATE INDEX oauth_clients_by_consumer ON oauth_clients (consumer_id);

    -- Client secrets are random and high-entropy, so SHA-256 suffices (as for API keys).
    CREATE TABLE client_secrets (
        hash       BLOB PRIMARY KEY,
        client_id  TEXT NOT NULL REFERENCES oauth_clients(id) ON DELETE CASCADE,
        start      TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER                           -- end of a rotation's overlap window
    );
    CREATE INDEX client_secrets_by_client ON client_secrets (client_id);

    CREATE TABLE signing_keys (
        kid           TEXT PRIMARY KEY,
        alg           TEXT NOT NULL,
        private_der   BLOB NOT NULL,                 -- PKCS#8; protect the data directory
        public_jwk    TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        active_from   INTEGER NOT NULL,
        retired_at    INTEGER,
        publish_until INTEGER
    );

    CREATE TABLE access_tokens (
        hash       BLOB PRIMARY KEY,
        jti        TEXT NOT NULL UNIQUE,
        client_id  TEXT NOT NULL REFERENCES oauth_clients(id) ON DELETE CASCADE,
        subject    TEXT NOT NULL,
        scopes     TEXT NOT NULL,
        audiences  TEXT NOT NULL,
        issued_at  INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX access_tokens_by_expiry ON access_tokens (expires_at);

    CREATE TABLE revoked_jtis (
        jti        TEXT PRIMARY KEY,
        client_id  TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER NOT NULL
    );
    "#,
    // 4: hardening. A change number per key secret, assigned in commit order (the known-hash filter
    // follows it); emergency revocation of signing keys; shorter visible starts of imported keys.
    r#"
    -- Assigned as MAX(seq) + 1 inside the writing transaction. SQLite has one writer at a time and a
    -- transaction's first write takes the write lock until commit, so seq order is commit order and a
    -- follower that has read up to N never later finds a new row at or below N.
    ALTER TABLE key_secrets ADD COLUMN seq INTEGER;
    UPDATE key_secrets SET seq = rowid;
    CREATE UNIQUE INDEX key_secrets_by_seq ON key_secrets (seq);

    -- Set by an emergency revocation: the key leaves the JWKS and its tokens stop verifying at once.
    ALTER TABLE signing_keys ADD COLUMN revoked_at INTEGER;

    -- Imported keys used to show everything up to their last '_'. Keep at most 4 characters (imported
    -- plaintext keys have at least 16, so that is never more than a quarter), here and in their audit events.
    UPDATE api_keys SET start = substr(start, 1, 4) WHERE imported = 1 AND start NOT LIKE 'sha256:%';
    UPDATE key_secrets SET start = (SELECT k.start FROM api_keys k WHERE k.id = key_secrets.key_id)
        WHERE key_id IN (SELECT id FROM api_keys WHERE imported = 1);
    UPDATE audit_events SET details = json_set(details, '$.start', substr(json_extract(details, '$.start'), 1, 4))
        WHERE action = 'key.import' AND json_extract(details, '$.start') NOT LIKE 'sha256:%';
    "#,
    // 5: the provider's own account id on consumers, unique when set; name look-ups.
    r#"
    ALTER TABLE consumers ADD COLUMN external_id TEXT;
    CREATE UNIQUE INDEX consumers_by_external_id ON consumers (external_id) WHERE external_id IS NOT NULL;
    CREATE INDEX consumers_by_name ON consumers (name);
    "#,
    // 6: private_key_jwt client authentication (RFC 7523): the client's public keys.
    r#"
    ALTER TABLE oauth_clients ADD COLUMN auth_method TEXT NOT NULL DEFAULT 'client_secret';
    ALTER TABLE oauth_clients ADD COLUMN jwks TEXT;   -- JSON {"keys": [...]}, public keys only
    "#,
    // 7: users and user-delegated tokens: authorization codes, grants (remembered consent), token
    // families with rotating refresh tokens; redirect URIs and refresh lifetimes of clients; scope
    // descriptions for the consent page.
    r#"
    CREATE TABLE users (
        id             TEXT PRIMARY KEY,
        username       TEXT NOT NULL,
        username_key   TEXT NOT NULL UNIQUE,          -- lower-cased: usernames are unique ignoring case
        email          TEXT,
        display_name   TEXT,
        password_hash  TEXT,                          -- Argon2id PHC string; NULL: cannot log in with a password
        allowed_scopes TEXT,                          -- JSON list; NULL: anything a client may request
        disabled       INTEGER NOT NULL DEFAULT 0,
        created_at     INTEGER NOT NULL,
        updated_at     INTEGER NOT NULL,
        last_login_at  INTEGER
    );

    ALTER TABLE oauth_clients ADD COLUMN redirect_uris TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE oauth_clients ADD COLUMN refresh_idle_seconds INTEGER NOT NULL DEFAULT 2592000;
    ALTER TABLE oauth_clients ADD COLUMN refresh_absolute_seconds INTEGER NOT NULL DEFAULT 7776000;

    CREATE TABLE scope_descriptions (
        scope       TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        updated_at  INTEGER NOT NULL
    );

    -- What a user consented to for a client; one live grant per user and client, widened when the user
    -- consents to more. Revoking it revokes every token family issued under it.
    CREATE TABLE grants (
        id         TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        client_id  TEXT NOT NULL REFERENCES oauth_clients(id) ON DELETE CASCADE,
        scopes     TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE UNIQUE INDEX grants_live ON grants (user_id, client_id) WHERE revoked_at IS NULL;

    -- One authorization (a redeemed code) and every refresh token descended from it.
    CREATE TABLE token_families (
        id         TEXT PRIMARY KEY,
        grant_id   TEXT NOT NULL REFERENCES grants(id) ON DELETE CASCADE,
        client_id  TEXT NOT NULL REFERENCES oauth_clients(id) ON DELETE CASCADE,
        user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,                  -- the refresh tokens' absolute lifetime
        revoked_at INTEGER
    );
    CREATE INDEX token_families_by_grant ON token_families (grant_id);
    CREATE INDEX token_families_by_expiry ON token_families (expires_at);

    CREATE TABLE auth_codes (
        hash           BLOB PRIMARY KEY,              -- SHA-256 of the code
        client_id      TEXT NOT NULL REFERENCES oauth_clients(id) ON DELETE CASCADE,
        user_id        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        grant_id       TEXT NOT NULL REFERENCES grants(id) ON DELETE CASCADE,
        redirect_uri   TEXT NOT NULL,
        code_challenge TEXT NOT NULL,                 -- PKCE S256
        scopes         TEXT NOT NULL,
        audiences      TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        expires_at     INTEGER NOT NULL,
        used_at        INTEGER,
        family_id      TEXT                           -- set when redeemed: a replay revokes this family
    );
    CREATE INDEX auth_codes_by_expiry ON auth_codes (expires_at);

    CREATE TABLE refresh_tokens (
        hash            BLOB PRIMARY KEY,             -- SHA-256 of the token
        family_id       TEXT NOT NULL REFERENCES token_families(id) ON DELETE CASCADE,
        scopes          TEXT NOT NULL,
        audiences       TEXT NOT NULL,
        issued_at       INTEGER NOT NULL,
        idle_expires_at INTEGER NOT NULL,
        used_at         INTEGER                       -- rotated: presenting it again is reuse
    );
    CREATE INDEX refresh_tokens_by_family ON refresh_tokens (family_id);

    ALTER TABLE access_tokens ADD COLUMN family_id TEXT;
    CREATE INDEX access_tokens_by_family ON access_tokens (family_id) WHERE family_id IS NOT NULL;
    "#,
    // 8: personal access tokens: a user's own long-lived, scoped tokens.
    r#"
    CREATE TABLE personal_tokens (
        id           TEXT PRIMARY KEY,
        user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name         TEXT NOT NULL,
        scopes       TEXT NOT NULL,
        audiences    TEXT NOT NULL DEFAULT '[]',
        hash         BLOB NOT NULL UNIQUE,            -- SHA-256 of the token
        start        TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        expires_at   INTEGER,                         -- NULL only where the operator allows tokens that never expire
        last_used_at INTEGER,
        last_used_ip TEXT,
        revoked_at   INTEGER
    );
    CREATE INDEX personal_tokens_by_user ON personal_tokens (user_id);
    CREATE INDEX personal_tokens_by_expiry ON personal_tokens (expires_at) WHERE revoked_at IS NULL;
    "#,
    // 9: device authorization (RFC 8628).
    r#"
    CREATE TABLE device_codes (
        hash           BLOB PRIMARY KEY,              -- SHA-256 of the device code
        user_code      TEXT NOT NULL UNIQUE,          -- what the user types, e.g. BCDF-GHJK (stored without the dash)
        client_id      TEXT NOT NULL REFERENCES oauth_clients(id) ON DELETE CASCADE,
        scopes         TEXT NOT NULL,
        audiences      TEXT NOT NULL,
        created_at     INTEGER NOT NULL,
        expires_at     INTEGER NOT NULL,
        interval_ms    INTEGER NOT NULL,
        last_polled_at INTEGER,
        status         TEXT NOT NULL,                 -- pending, approved, denied, used
        user_id        TEXT REFERENCES users(id) ON DELETE CASCADE,
        grant_id       TEXT REFERENCES grants(id) ON DELETE CASCADE,
        granted_scopes TEXT
    );
    CREATE INDEX device_codes_by_expiry ON device_codes (expires_at);
    "#,
    // 10: token exchange (RFC 8693): where an opaque exchanged token came from (JSON).
    r#"
    ALTER TABLE access_tokens ADD COLUMN source TEXT;
    "#,
    // 11: DPoP (RFC 9449): the thumbprint of the key an opaque token is bound to.
    r#"
    ALTER TABLE access_tokens ADD COLUMN jkt TEXT;
    "#,
    // 12: DPoP-bound refresh: the key a token family's refresh tokens must prove (RFC 9449 §5).
    r#"
    ALTER TABLE token_families ADD COLUMN jkt TEXT;
    "#,
    // 13: events. Webhook endpoints, the outbox of events (written in the transaction of the change they
    // report), deliveries and their attempts; leak reports from secret-scanning partners; what a
    // consumer wants done when one of its credentials is reported leaked.
    r#"
    CREATE TABLE webhook_endpoints (
        id              TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        events          TEXT NOT NULL,                -- JSON list of event types, or ["*"]
        description     TEXT,
        enabled         INTEGER NOT NULL DEFAULT 1,
        secret_sealed   BLOB NOT NULL,                -- sealed under the master key
        previous_secret_sealed BLOB,                  -- after a rotation with overlap: also signs until
        previous_secret_until  INTEGER,
        failing_since   INTEGER,                      -- start of the current run of failed attempts
        last_failure_at INTEGER,                      -- a failure long after the last one starts a new run
        disabled_reason TEXT,
        created_at      INTEGER NOT NULL,
        updated_at      INTEGER NOT NULL
    );
    CREATE TABLE events (
        seq        INTEGER PRIMARY KEY,
        id         TEXT NOT NULL UNIQUE,
        type       TEXT NOT NULL,
        at         INTEGER NOT NULL,
        payload    TEXT NOT NULL,                     -- the exact JSON body receivers get
        dedup      TEXT UNIQUE                        -- events written apart from a change: once per key
    );
    CREATE INDEX events_by_at ON events (at);
    CREATE TABLE webhook_deliveries (
        id          INTEGER PRIMARY KEY,
        endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
        event_id    TEXT NOT NULL,
        status      TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | failed
        attempts    INTEGER NOT NULL DEFAULT 0,
        next_at     INTEGER,                          -- NULL once finished
        leased_until INTEGER,                         -- set while a node is attempting it
        created_at  INTEGER NOT NULL,
        UNIQUE (event_id, endpoint_id)
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE status = 'pending';
    CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);
    CREATE INDEX webhook_deliveries_pending_by_endpoint ON webhook_deliveries (endpoint_id, next_at)
        WHERE status = 'pending';
    CREATE TABLE webhook_attempts (
        delivery_id INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
        at          INTEGER NOT NULL,
        status_code INTEGER,
        latency_ms  INTEGER NOT NULL,
        error       TEXT
    );
    CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id, at);
    CREATE TABLE leak_reports (
        id              TEXT PRIMARY KEY,
        at              INTEGER NOT NULL,
        reporter        TEXT NOT NULL,
        token_hash      TEXT NOT NULL,
        token_type      TEXT NOT NULL,
        url             TEXT,
        source          TEXT,
        label           TEXT NOT NULL,
        credential_type TEXT,
        credential_id   TEXT,
        action          TEXT NOT NULL
    );
    ALTER TABLE consumers ADD COLUMN leak_policy TEXT NOT NULL DEFAULT 'revoke';
    "#,
    // 14: dynamic client registration (RFC 7591/7592): the registration access token of a client that
    // registered itself.
    r#"
    CREATE TABLE client_registrations (
        client_id  TEXT PRIMARY KEY REFERENCES oauth_clients (id) ON DELETE CASCADE,
        token_hash BLOB NOT NULL,
                created_at INTEGER NOT NULL
    );
    "#,
    // 15: the console's "lowest quotas" board reads keys with a quota by uses left.
    r#"
    CREATE INDEX api_keys_by_quota ON api_keys (quota_remaining) WHERE quota_remaining IS NOT NULL;
    "#,
    // 16: usage roll-ups per consumer and for all keys (scope ''), written with the per-key buckets, so
    // that reports over many keys read a few rows per bucket; the per-key scan of a range (the usage
    // boards) reads only the index that covers it.
    r#"
    CREATE TABLE usage_rollups (
        scope        TEXT NOT NULL,            -- '' = all keys, else a consumer id
        granularity  TEXT NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
        bucket_start INTEGER NOT NULL,
        code         TEXT NOT NULL,
        count        INTEGER NOT NULL,
        PRIMARY KEY (scope, granularity, bucket_start, code)
    ) WITHOUT ROWID;
    INSERT INTO usage_rollups (scope, granularity, bucket_start, code, count)
        SELECT '', granularity, bucket_start, code, SUM(count) FROM usage_buckets
        GROUP BY granularity, bucket_start, code;
    INSERT INTO usage_rollups (scope, granularity, bucket_start, code, count)
        SELECT consumer_id, granularity, bucket_start, code, SUM(count) FROM usage_buckets
        GROUP BY consumer_id, granularity, bucket_start, code;
        DROP INDEX usage_by_consumer;
    DROP INDEX usage_by_age;
    CREATE INDEX usage_by_age ON usage_buckets (granularity, bucket_start, key_id, consumer_id, code, count);
    "#,
    // 17: keys by expiry, for `key.expiring` and the console's "expiring soon"; name prefixes (ignoring
    // case) and visible starts, for searches.
    r#"
    CREATE INDEX api_keys_by_expiry ON api_keys (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX api_keys_by_name ON api_keys (name COLLATE NOCASE);
    CREATE INDEX api_keys_by_start ON api_keys (start);
    CREATE INDEX consumers_by_name_nocase ON consumers (name COLLATE NOCASE);
    CREATE INDEX oauth_clients_by_name ON oauth_clients (name COLLATE NOCASE);
        CREATE INDEX users_by_name ON users (username COLLATE NOCASE);
    "#,
    // 18: users' roles in Keygate itself (JSON array; `admin` signs in to the web console).
    r#"
    ALTER TABLE users ADD COLUMN roles TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX users_by_email ON users (email) WHERE email IS NOT NULL;
    "#,
    // 19: plans (named usage controls consumers are put on), consumers owned by users (the developer
    // portal's applications), verified email addresses. `consumers_v` is what every read of a consumer
    // sees: the plan's rate limits for a consumer on a plan, and whether its owner is suspended (an
    // owner that no longer exists counts as suspended: an application never outlives its developer).
    r#"
    CREATE TABLE plans (
        id                   TEXT PRIMARY KEY,
        name                 TEXT NOT NULL,
        name_key             TEXT NOT NULL UNIQUE,
        description          TEXT,
        rate_limits          TEXT,
        quota                TEXT,
        allowed_scopes       TEXT,
        key_lifetime_seconds INTEGER,
        self_service         INTEGER NOT NULL DEFAULT 0,
        is_default           INTEGER NOT NULL DEFAULT 0,
        created_at           INTEGER NOT NULL,
        updated_at           INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX plans_one_default ON plans (is_default) WHERE is_default;
    ALTER TABLE consumers ADD COLUMN owner_id TEXT;
    ALTER TABLE consumers ADD COLUMN plan_id TEXT REFERENCES plans (id);
    CREATE INDEX consumers_by_owner ON consumers (owner_id) WHERE owner_id IS NOT NULL;
    CREATE INDEX consumers_by_plan ON consumers (plan_id) WHERE plan_id IS NOT NULL;
    ALTER TABLE users ADD COLUMN email_verified_at INTEGER;
    CREATE INDEX users_by_email_lower ON users (lower(email)) WHERE email IS NOT NULL;
    CREATE VIEW consumers_v AS
        SELECT c.id, c.name, c.metadata, c.disabled, c.system, c.created_at, c.updated_at,
               CASE WHEN c.plan_id IS NULL THEN c.rate_limits ELSE p.rate_limits END AS rate_limits,
               c.external_id, c.leak_policy, c.owner_id, c.plan_id,
               CASE WHEN c.owner_id IS NULL THEN 0 WHEN u.id IS NULL THEN 1 ELSE u.disabled END AS owner_disabled
        FROM consumers c LEFT JOIN plans p ON p.id = c.plan_id LEFT JOIN users u ON u.id = c.owner_id;
    "#,
];

/// The key search statement, with one more condition (on `?6`, the consumer).
macro_rules! const_format_keys {
    ($consumer:literal) => {
        concat!(
            "SELECT * FROM api_keys WHERE id > ?1 ",
            $consumer,
            " AND ((name >= ?3 COLLATE NOCASE AND name < ?4 COLLATE NOCASE) OR id = ?5 OR start = ?5) ",
            "ORDER BY id LIMIT ?2"
        )
    };
}

/// Options for opening the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long a write waits for the database lock before giving up with `Unavailable`.
    pub busy_timeout: Duration,
    pub max_connections: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { busy_timeout: Duration::from_secs(5), max_connections: 8 }
    }
}

pub struct SqliteStore {
    pub(crate) pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path, options: &SqliteOptions) -> Result<Self> {
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| StoreError::Other(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.busy_timeout + Duration::from_secs(1))
            .connect_with(connect)
            .await
            .map_err(map_err)?;
        Ok(SqliteStore { pool })
    }
}

/// Turns a database error into the store's vocabulary. SQLite's primary result codes are the low
/// byte of its extended codes: 5 BUSY, 6 LOCKED, 8 READONLY, 10 IOERR, 13 FULL, 14 CANTOPEN,
/// 19 CONSTRAINT.
pub(crate) fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0) & 0xff;
            match code {
                5 | 6 | 8 | 10 | 13 | 14 => StoreError::Unavailable(db.message().to_string()),
                19 => StoreError::Conflict(db.message().to_string()),
                _ => StoreError::Other(e.to_string()),
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Other(e.to_string()),
    }
}

/// The record mappers, for SQLite rows.
pub(crate) mod rows {
    use super::map_err;
    crate::rows::row_mappers!(sqlx::sqlite::SqliteRow);
}
pub(crate) use crate::rows::{json_text, opt_json};
pub(crate) use rows::*;

pub(crate) type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

/// One row by id, mapped; `sql` selects with a single `?` for the id.
pub(crate) async fn fetch_by_id<T>(
    pool: &SqlitePool,
    sql: &'static str,
    id: &str,
    map: fn(&SqliteRow) -> Result<T>,
) -> Result<Option<T>> {
    let row = sqlx::query(sql).bind(id).fetch_optional(pool).await.map_err(map_err)?;
    row.as_ref().map(map).transpose()
}

/// A page of rows in id order; `sql` takes `?` for the id to start after and `?` for the limit.
/// A page's search: names starting with the term, ignoring ASCII case, as a range for a
/// `COLLATE NOCASE` index (`?3` ≤ name < `?4`), and the term itself for exact matches (`?5`).
fn search_terms(page: &Page) -> Option<(String, String, &str)> {
    let term = page.search.as_deref().map(str::trim).filter(|s| !s.is_empty())?;
    Some((term.to_string(), format!("{term}\u{10FFFF}"), term))
}

/// A page of rows in id order: `plain` binds `?1` = the id to start after and `?2` = the limit;
/// `searched`, used when the page has a search, binds `?3`–`?5` too ([`search_terms`]). Two statements,
/// so that each can use its indexes (an `?3 IS NULL OR …` would defeat them).
pub(crate) async fn fetch_page<T>(
    pool: &SqlitePool,
    plain: &'static str,
    searched: &'static str,
    page: &Page,
    map: fn(&SqliteRow) -> Result<T>,
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

pub(crate) async fn insert_audit(tx: &mut Tx<'_>, a: &NewAudit) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_events (id, at, actor, action, target_type, target_id, ip, details) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
    crate::sqlite_events::enqueue_audit_event(tx, a).await
}

async fn insert_consumer_tx(tx: &mut Tx<'_>, c: &Consumer) -> Result<()> {
    sqlx::query(
        "INSERT INTO consumers (id, name, metadata, disabled, system, rate_limits, external_id, leak_policy, \
         created_at, updated_at, owner_id, plan_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
         quota_refilled_at, imported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

/// Secrets of keys and of OAuth clients have the same shape; only the table differs.
pub(crate) const INSERT_KEY_SECRET: &str = "INSERT INTO key_secrets (hash, key_id, start, created_at, expires_at, seq) \
     VALUES (?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM key_secrets))";
pub(crate) const INSERT_CLIENT_SECRET: &str =
    "INSERT INTO client_secrets (hash, client_id, start, created_at, expires_at) VALUES (?, ?, ?, ?, ?)";

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
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        let done: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(map_err)?;
        drop(conn);
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            if version <= done {
                continue;
            }
            let mut tx = self.pool.begin().await.map_err(map_err)?;
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(map_err)?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))",
            )
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            tx.commit().await.map_err(map_err)?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
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
            "INSERT INTO keygate_meta (key, value) VALUES ('initialized_at', ?) ON CONFLICT (key) DO NOTHING",
        )
        .bind(consumer.created_at.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if inserted == 0 {
            return Ok(false);
        }
        sqlx::query("INSERT INTO keygate_meta (key, value) VALUES ('system_consumer_id', ?)")
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
        fetch_by_id(&self.pool, "SELECT * FROM consumers_v WHERE id = ?", id, consumer_from_row).await
    }

    async fn list_consumers(&self, page: &Page) -> Result<Vec<Consumer>> {
        let plain = "SELECT * FROM consumers_v WHERE id > ?1 ORDER BY id LIMIT ?2";
        let searched = "SELECT * FROM consumers_v WHERE id > ?1 AND ((name >= ?3 COLLATE NOCASE \
                        AND name < ?4 COLLATE NOCASE) OR id = ?5 OR external_id = ?5) ORDER BY id LIMIT ?2";
        fetch_page(&self.pool, plain, searched, page, consumer_from_row).await
    }

    async fn working_admin_keys(&self, now: i64, limit: u32) -> Result<Vec<(String, String)>> {
        sqlx::query_as(
            "SELECT k.id, k.consumer_id FROM api_keys k JOIN consumers_v c ON c.id = k.consumer_id \
             WHERE k.revoked_at IS NULL AND k.disabled = 0 AND c.disabled = 0 AND NOT c.owner_disabled \
             AND (k.expires_at IS NULL OR k.expires_at > ?) \
             AND EXISTS (SELECT 1 FROM json_each(k.scopes) WHERE value IN ('keygate:admin', 'keygate:*')) \
             ORDER BY k.id LIMIT ?",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn find_consumer(&self, by: ConsumerLookup<'_>) -> Result<Option<Consumer>> {
        let (sql, value) = match by {
            ConsumerLookup::ExternalId(v) => ("SELECT * FROM consumers_v WHERE external_id = ?", v),
            ConsumerLookup::Name(v) => ("SELECT * FROM consumers_v WHERE name = ? ORDER BY id LIMIT 1", v),
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
            "UPDATE consumers SET name = COALESCE(?, name), metadata = COALESCE(?, metadata), \
             disabled = COALESCE(?, disabled), rate_limits = CASE WHEN ? THEN ? ELSE rate_limits END, \
             external_id = CASE WHEN ? THEN ? ELSE external_id END, leak_policy = COALESCE(?, leak_policy), \
             plan_id = CASE WHEN ? THEN ? ELSE plan_id END, owner_id = CASE WHEN ? THEN ? ELSE owner_id END, \
             updated_at = ? WHERE id = ? RETURNING id",
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
        let row = sqlx::query("SELECT * FROM consumers_v WHERE id = ?")
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
                ("SELECT * FROM consumers_v WHERE owner_id = ? AND id > ? ORDER BY id LIMIT ?", v)
            }
            ConsumersOf::Plan(v) => {
                ("SELECT * FROM consumers_v WHERE plan_id = ? AND id > ? ORDER BY id LIMIT ?", v)
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        fetch_by_id(&self.pool, "SELECT * FROM plans WHERE id = ?", id, plan_from_row).await
    }

    async fn find_plan(&self, name: &str) -> Result<Option<Plan>> {
        fetch_by_id(&self.pool, "SELECT * FROM plans WHERE name_key = ?", &name.to_lowercase(), plan_from_row)
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
            sqlx::query("UPDATE plans SET is_default = FALSE WHERE is_default AND id <> ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        let row = sqlx::query(
            "UPDATE plans SET name = COALESCE(?, name), name_key = COALESCE(?, name_key), \
             description = CASE WHEN ? THEN ? ELSE description END, \
             rate_limits = CASE WHEN ? THEN ? ELSE rate_limits END, \
             quota = CASE WHEN ? THEN ? ELSE quota END, \
             allowed_scopes = CASE WHEN ? THEN ? ELSE allowed_scopes END, \
             key_lifetime_seconds = CASE WHEN ? THEN ? ELSE key_lifetime_seconds END, \
             self_service = COALESCE(?, self_service), is_default = COALESCE(?, is_default), \
             updated_at = ? WHERE id = ? RETURNING *",
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
        let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM consumers WHERE plan_id = ?")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        if used > 0 {
            return Err(StoreError::Conflict(format!("{used} consumer(s) are on this plan")));
        }
        let deleted = sqlx::query("DELETE FROM plans WHERE id = ?")
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
        fetch_by_id(&self.pool, "SELECT * FROM api_keys WHERE id = ?", id, key_from_row).await
    }

    async fn list_keys(&self, consumer_id: Option<&str>, page: &Page) -> Result<Vec<ApiKey>> {
        // A statement per case, so that each uses its indexes: a consumer's keys through
        // `api_keys_by_consumer`, a search through the name, id and start indexes.
        let after = page.after.as_deref().unwrap_or("");
        let limit = i64::from(page.limit);
        let query = match (consumer_id, search_terms(page)) {
            (None, None) => sqlx::query("SELECT * FROM api_keys WHERE id > ?1 ORDER BY id LIMIT ?2")
                .bind(after)
                .bind(limit),
            (Some(c), None) => {
                sqlx::query("SELECT * FROM api_keys WHERE id > ?1 AND consumer_id = ?3 ORDER BY id LIMIT ?2")
                    .bind(after)
                    .bind(limit)
                    .bind(c)
            }
            (c, Some((lo, hi, exact))) => {
                let sql: &'static str = if c.is_some() {
                    const_format_keys!("AND consumer_id = ?6")
                } else {
                    const_format_keys!("AND ?6 IS NULL")
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
            "UPDATE api_keys SET name = COALESCE(?, name), scopes = COALESCE(?, scopes), \
             metadata = COALESCE(?, metadata), \
             expires_at = CASE WHEN ? THEN ? ELSE expires_at END, \
             disabled = COALESCE(?, disabled), revoked_at = COALESCE(?, revoked_at), \
             rate_limits = CASE WHEN ? THEN ? ELSE rate_limits END, \
             allowed_ips = CASE WHEN ? THEN ? ELSE allowed_ips END, \
             quota_remaining = CASE WHEN ? THEN ? ELSE quota_remaining END, \
             quota_refill = CASE WHEN ? THEN ? ELSE quota_refill END, \
             quota_refilled_at = CASE WHEN ? THEN ? ELSE quota_refilled_at END, \
             updated_at = ? \
             WHERE id = ? AND revoked_at IS NULL RETURNING *",
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
        let updated =
            sqlx::query("UPDATE api_keys SET start = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL")
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
            "UPDATE key_secrets SET expires_at = ? WHERE key_id = ? AND (expires_at IS NULL OR expires_at > ?)",
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
        let rows = sqlx::query("SELECT hash FROM key_secrets WHERE key_id = ?")
            .bind(key_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(hash_from_row).collect()
    }

    async fn consumer_secret_hashes(&self, consumer_id: &str) -> Result<Vec<SecretHash>> {
        let rows = sqlx::query(
            "SELECT s.hash FROM key_secrets s JOIN api_keys k ON k.id = s.key_id WHERE k.consumer_id = ?",
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
             WHERE s.hash = ?",
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
            let placeholders = vec!["?"; chunk.len()].join(",");
            let sql = format!("SELECT hash FROM key_secrets WHERE hash IN ({placeholders})");
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for h in chunk {
                q = q.bind(&h.as_bytes()[..]);
            }
            let rows = q.fetch_all(&self.pool).await.map_err(map_err)?;
            for row in &rows {
                found.push(hash_from_row(row)?);
            }
        }
        Ok(found)
    }

    async fn secret_changes_after(&self, seq: i64, limit: u32) -> Result<Vec<(i64, SecretHash)>> {
        let rows = sqlx::query("SELECT seq, hash FROM key_secrets WHERE seq > ? ORDER BY seq LIMIT ?")
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
        for e in events {
            crate::sqlite_events::insert_event_tx(
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
                    "INSERT INTO usage_rollups (scope, granularity, bucket_start, code, count) VALUES (?, ?, ?, ?, ?) \
                     ON CONFLICT (scope, granularity, bucket_start, code) DO UPDATE SET count = count + excluded.count",
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
        for u in batch {
            for (code, count) in &u.counts {
                for g in Granularity::ALL {
                    sqlx::query(
                        "INSERT INTO usage_buckets (key_id, consumer_id, granularity, bucket_start, code, count) \
                         VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, granularity, bucket_start, code) \
                         DO UPDATE SET count = count + excluded.count",
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
                sqlx::query("UPDATE api_keys SET last_used_at = ?, last_used_ip = ? WHERE id = ?")
                    .bind(at)
                    .bind(ip)
                    .bind(&u.key_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
            if let Some((remaining, refilled_at)) = u.quota {
                // Only while the key still has a quota: an admin may have removed it meanwhile.
                sqlx::query(
                    "UPDATE api_keys SET quota_remaining = ?, quota_refilled_at = ? \
                     WHERE id = ? AND quota_remaining IS NOT NULL",
                )
                .bind(remaining as i64)
                .bind(refilled_at)
                .bind(&u.key_id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>> {
        // One key: its own buckets (with its consumer, if one is named, as a filter). A consumer, or all
        // keys: the roll-ups, a few rows per bucket however many keys were busy.
        let (sql, key_or_scope) = match (&q.key_id, &q.consumer_id) {
            (Some(k), _) => (
                "SELECT bucket_start, code, count FROM usage_buckets \
                 WHERE key_id = ?1 AND granularity = ?2 AND bucket_start >= ?3 AND bucket_start < ?4 \
                 AND (?5 IS NULL OR consumer_id = ?5) ORDER BY bucket_start, code",
                k.as_str(),
            ),
            (None, scope) => (
                "SELECT bucket_start, code, count FROM usage_rollups \
                 WHERE scope = ?1 AND granularity = ?2 AND bucket_start >= ?3 AND bucket_start < ?4 \
                 AND ?5 IS NULL ORDER BY bucket_start, code",
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
            "SELECT key_id, consumer_id, SUM(count) AS total, \
             SUM(CASE WHEN code = 'VALID' THEN 0 ELSE count END) AS failures FROM usage_buckets \
             WHERE granularity = ? AND bucket_start >= ? AND bucket_start < ? \
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
            "SELECT * FROM api_keys WHERE quota_remaining IS NOT NULL AND revoked_at IS NULL AND disabled = 0 \
             AND (expires_at IS NULL OR expires_at > ?) ORDER BY quota_remaining, id LIMIT ?",
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
            deleted += sqlx::query("DELETE FROM usage_buckets WHERE granularity = ? AND bucket_start < ?")
                .bind(g.as_str())
                .bind(t)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
            sqlx::query("DELETE FROM usage_rollups WHERE granularity = ? AND bucket_start < ?")
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
            "SELECT * FROM api_keys WHERE revoked_at IS NULL AND disabled = 0 AND expires_at > ? \
             AND expires_at <= ? AND id > ? ORDER BY id LIMIT ?",
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

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>> {
        // With a target, its index (`audit_events_by_target`); otherwise newest first by id.
        let sql = if filter.target_id.is_some() {
            "SELECT e.*, COALESCE(k.name, u.username) AS actor_name FROM audit_events e \
             LEFT JOIN api_keys k ON k.id = e.actor LEFT JOIN users u ON u.id = e.actor \
             WHERE e.target_id = ?1 AND (?2 IS NULL OR e.action = ?2) \
             AND (?3 IS NULL OR e.id < ?3) AND (?5 IS NULL OR e.actor = ?5) \
             AND (?6 IS NULL OR e.at >= ?6) AND (?7 IS NULL OR e.at < ?7) ORDER BY e.id DESC LIMIT ?4"
        } else {
            "SELECT e.*, COALESCE(k.name, u.username) AS actor_name FROM audit_events e \
             LEFT JOIN api_keys k ON k.id = e.actor LEFT JOIN users u ON u.id = e.actor \
             WHERE ?1 IS NULL AND (?2 IS NULL OR e.action = ?2) \
             AND (?3 IS NULL OR e.id < ?3) AND (?5 IS NULL OR e.actor = ?5) \
             AND (?6 IS NULL OR e.at >= ?6) AND (?7 IS NULL OR e.at < ?7) ORDER BY e.id DESC LIMIT ?4"
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
