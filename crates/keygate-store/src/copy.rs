//! Copying an SQLite installation into an empty PostgreSQL database (`keygate migrate-to-postgres`):
//! every table, row for row, in one PostgreSQL transaction (all or nothing), then the row counts of
//! both sides compared.
//!
//! Each table's columns are PostgreSQL's (from its catalogue), read from SQLite by name and converted by
//! PostgreSQL's type: `boolean` from SQLite's 0/1, `bigint`, `text`, `bytea`. Columns SQLite does not
//! have take their defaults, except the change numbers of audit records, which are given in id (= time)
//! order. Identity columns keep their values, and their sequences and the change counters continue
//! after them.

use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::pg::map_err as pg_err;
use crate::sqlite::map_err as sqlite_err;
use crate::{PgStore, Result, SqliteStore, StoreError};

/// Every table, parents before children.
pub const TABLES: &[&str] = &[
    "keygate_meta",
    "plans",
    "consumers",
    "api_keys",
    "key_secrets",
    "audit_events",
    "usage_buckets",
    "usage_rollups",
    "oauth_clients",
    "client_secrets",
    "signing_keys",
    "users",
    "scope_descriptions",
    "grants",
    "token_families",
    "access_tokens",
    "revoked_jtis",
    "auth_codes",
    "refresh_tokens",
    "personal_tokens",
    "device_codes",
    "webhook_endpoints",
    "events",
    "webhook_deliveries",
    "webhook_attempts",
    "leak_reports",
    "client_registrations",
];

/// Rows copied per progress report.
const BATCH: u64 = 1000;
/// Rows read from SQLite at a time.
const PAGE: usize = 5000;

/// One table's rows on both sides after the copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableCount {
    pub table: &'static str,
    pub sqlite: u64,
    pub postgres: u64,
}

enum Value {
    Int(Option<i64>),
    Bool(Option<bool>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

/// Copies everything in `from` into `to`, which must be migrated and empty. `progress(table, done,
/// total)` is called as rows are copied. Returns the row counts of both sides, which match (or the copy
/// is an error and PostgreSQL is left as it was).
pub async fn sqlite_to_postgres(
    from: &SqliteStore,
    to: &PgStore,
    mut progress: impl FnMut(&str, u64, u64),
) -> Result<Vec<TableCount>> {
    let existing: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM keygate_meta").fetch_one(&to.pool).await.map_err(pg_err)?;
    if existing > 0 {
        return Err(StoreError::Conflict(
            "the PostgreSQL database already holds a Keygate installation; give an empty database".into(),
        ));
    }
    let mut tx = to.pool.begin().await.map_err(pg_err)?;
    for &table in TABLES {
        let columns: Vec<(String, String, bool)> = sqlx::query(
            "SELECT column_name::TEXT AS name, data_type::TEXT AS ty, is_identity::TEXT = 'YES' AS ident \
             FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 \
             ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut *tx)
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| Ok((r.try_get("name")?, r.try_get("ty")?, r.try_get("ident")?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(pg_err)?;
        let sqlite_columns: Vec<String> =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT name FROM pragma_table_info('{table}')")))
                .fetch_all(&from.pool)
                .await
                .map_err(sqlite_err)?
                .iter()
                .map(|r| r.try_get::<String, _>("name"))
                .collect::<std::result::Result<_, _>>()
                .map_err(sqlite_err)?;
        // Audit records get their change numbers here, in id order.
        let numbered = table == "audit_events";
        let copied: Vec<&(String, String, bool)> =
            columns.iter().filter(|(name, _, _)| sqlite_columns.contains(name)).collect();
        let mut names: Vec<&str> = copied.iter().map(|(n, _, _)| n.as_str()).collect();
        if numbered {
            names.push("seq");
        }
        let identity = copied.iter().any(|(_, _, ident)| *ident);
        let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) {}VALUES ({})",
            names.join(", "),
            if identity { "OVERRIDING SYSTEM VALUE " } else { "" },
            placeholders.join(", ")
        );
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(&from.pool)
            .await
            .map_err(sqlite_err)?;
        let total = total.max(0) as u64;
        progress(table, 0, total);
        let order = if numbered { " ORDER BY id" } else { "" };
        // A page at a time, so that a large table never sits in memory whole (nothing writes to the
        // SQLite file meanwhile: the caller holds its data directory's lock).
        let page = format!("SELECT * FROM {table}{order} LIMIT {PAGE} OFFSET $1");
        let mut i: usize = 0;
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(page.clone()))
                .bind(i as i64)
                .fetch_all(&from.pool)
                .await
                .map_err(sqlite_err)?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
                for (name, ty, _) in &copied {
                    q = match read(row, name, ty)? {
                        Value::Int(v) => q.bind(v),
                        Value::Bool(v) => q.bind(v),
                        Value::Text(v) => q.bind(v),
                        Value::Bytes(v) => q.bind(v),
                    };
                }
                if numbered {
                    q = q.bind(i as i64 + 1);
                }
                q.execute(&mut *tx).await.map_err(pg_err)?;
                i += 1;
                let done = i as u64;
                if done.is_multiple_of(BATCH) {
                    progress(table, done, total);
                }
            }
        }
        if !total.is_multiple_of(BATCH) {
            progress(table, total, total);
        }
        // Identity columns continue after the copied values.
        for (name, _, ident) in &columns {
            if *ident {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', '{name}'), \
                     GREATEST((SELECT COALESCE(MAX({name}), 0) FROM {table}), 1), \
                     (SELECT COUNT(*) > 0 FROM {table}))"
                )))
                .execute(&mut *tx)
                .await
                .map_err(pg_err)?;
            }
        }
    }
    // The change counters continue after the copied numbers.
    sqlx::query(
        "UPDATE change_counters SET value = (SELECT COALESCE(MAX(seq), 0) FROM key_secrets) WHERE name = 'key_secrets'",
    )
    .execute(&mut *tx)
    .await
    .map_err(pg_err)?;
    sqlx::query(
        "UPDATE change_counters SET value = (SELECT COALESCE(MAX(seq), 0) FROM audit_events) WHERE name = 'audit_events'",
    )
    .execute(&mut *tx)
    .await
    .map_err(pg_err)?;
    let mut counts = Vec::with_capacity(TABLES.len());
    for &table in TABLES {
        let count = format!("SELECT COUNT(*) FROM {table}");
        let sqlite: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count.clone()))
            .fetch_one(&from.pool)
            .await
            .map_err(sqlite_err)?;
        let postgres: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(count)).fetch_one(&mut *tx).await.map_err(pg_err)?;
        counts.push(TableCount { table, sqlite: sqlite.max(0) as u64, postgres: postgres.max(0) as u64 });
    }
    if let Some(c) = counts.iter().find(|c| c.sqlite != c.postgres) {
        return Err(StoreError::Other(format!(
            "{}: {} rows in SQLite but {} copied; nothing was kept in PostgreSQL",
            c.table, c.sqlite, c.postgres
        )));
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(counts)
}

/// A column of an SQLite row, as the PostgreSQL column's type wants it.
fn read(row: &SqliteRow, name: &str, ty: &str) -> Result<Value> {
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(format!("column {name}: {e}"));
    Ok(match ty {
        "boolean" => Value::Bool(row.try_get::<Option<i64>, _>(name).map_err(corrupt)?.map(|v| v != 0)),
        "bigint" | "integer" | "smallint" => Value::Int(row.try_get(name).map_err(corrupt)?),
        "bytea" => Value::Bytes(row.try_get(name).map_err(corrupt)?),
        _ => Value::Text(row.try_get(name).map_err(corrupt)?),
    })
}
