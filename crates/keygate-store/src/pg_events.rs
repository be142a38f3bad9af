//! The PostgreSQL implementation of [`EventStore`], and the outbox writes every audited change makes.

use async_trait::async_trait;
use keygate_core::events::{audit_data, event_for_action, payload};
use sqlx::Row;

use crate::events::{
    Attempt, AttemptOutcome, Delivery, DueDelivery, EventStore, LeakReport, NewEvent, StoredEvent,
    WebhookEndpoint, WebhookPatch,
};
use crate::pg::{Tx, endpoint_from_row, fetch_by_id, fetch_page, insert_audit, leak_from_row, map_err};
use crate::rows::to_json;
use crate::{NewAudit, Page, PgStore, Result};

/// Writes the event an audited change reports, if it reports one, with its deliveries (called by
/// `insert_audit`, in the change's transaction).
pub(crate) async fn enqueue_audit_event(tx: &mut Tx<'_>, a: &NewAudit) -> Result<()> {
    let Some(event_type) = event_for_action(&a.action) else { return Ok(()) };
    let body = payload(event_type, a.at, audit_data(&a.target_type, &a.target_id, &a.actor, &a.details));
    insert_event_tx(tx, &a.id, event_type, a.at, &body, None).await?;
    Ok(())
}

/// Inserts an event (ignored if its id or dedup key exists) and a pending delivery for each enabled
/// endpoint that takes it. True if the event is new.
pub(crate) async fn insert_event_tx(
    tx: &mut Tx<'_>,
    id: &str,
    event_type: &str,
    at: i64,
    body: &str,
    dedup: Option<&str>,
) -> Result<bool> {
    let inserted =
        sqlx::query("INSERT INTO events (id, type, at, payload, dedup) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
            .bind(id)
            .bind(event_type)
            .bind(at)
            .bind(body)
            .bind(dedup)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?
            .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO webhook_deliveries (endpoint_id, event_id, next_at, created_at) \
         SELECT w.id, $1, $2, $3 FROM webhook_endpoints w WHERE EXISTS (SELECT 1 FROM jsonb_array_elements_text(w.events::jsonb) j(value) WHERE j.value = $4 OR j.value = '*')",
    )
    .bind(id)
    .bind(at)
    .bind(at)
    .bind(event_type)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(true)
}

#[async_trait]
impl EventStore for PgStore {
    async fn insert_webhook(&self, e: &WebhookEndpoint, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (id, url, events, description, enabled, secret_sealed, failing_since, \
             disabled_reason, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&e.id)
        .bind(&e.url)
        .bind(to_json(&e.events)?)
        .bind(&e.description)
        .bind(e.enabled)
        .bind(&e.secret_sealed)
        .bind(e.failing_since)
        .bind(&e.disabled_reason)
        .bind(e.created_at)
        .bind(e.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_webhook(&self, id: &str) -> Result<Option<WebhookEndpoint>> {
        fetch_by_id(&self.pool, "SELECT * FROM webhook_endpoints WHERE id = $1", id, endpoint_from_row).await
    }

    async fn list_webhooks(&self, page: &Page) -> Result<Vec<WebhookEndpoint>> {
        fetch_page(
            &self.pool,
            "SELECT * FROM webhook_endpoints WHERE id > $1 ORDER BY id LIMIT $2",
            "SELECT * FROM webhook_endpoints WHERE id > $1 AND ((lower(url) >= $3 AND lower(url) < $4) OR id = $5) \
             ORDER BY id LIMIT $2",
            page,
            endpoint_from_row,
        )
        .await
    }

    async fn update_webhook(
        &self,
        id: &str,
        p: &WebhookPatch,
        audit: &NewAudit,
    ) -> Result<Option<WebhookEndpoint>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let events = p.events.as_ref().map(to_json).transpose()?;
        // Enabling clears the failure run and Keygate's reason; disabling keeps the reason given.
        let row = sqlx::query(
            "UPDATE webhook_endpoints SET url = COALESCE($1, url), events = COALESCE($2, events), \
             description = CASE WHEN $3 THEN $4 ELSE description END, enabled = COALESCE($5, enabled), \
             previous_secret_sealed = CASE WHEN $6 IS NULL THEN previous_secret_sealed \
               WHEN $7 IS NULL THEN NULL ELSE secret_sealed END, \
             previous_secret_until = CASE WHEN $8 IS NULL THEN previous_secret_until ELSE $9 END, \
             secret_sealed = COALESCE($10, secret_sealed), \
             failing_since = CASE WHEN $11 = TRUE OR $12 OR $13 THEN NULL ELSE failing_since END, \
             last_failure_at = CASE WHEN $14 = TRUE OR $15 OR $16 THEN NULL ELSE last_failure_at END, \
             disabled_reason = CASE WHEN $17 = TRUE THEN NULL WHEN $18 = FALSE THEN $19 ELSE disabled_reason END, \
             updated_at = $20 WHERE id = $21 RETURNING *",
        )
        .bind(&p.url)
        .bind(events)
        .bind(p.description.is_some())
        .bind(p.description.clone().flatten())
        .bind(p.enabled)
        .bind(&p.secret_sealed)
        .bind(p.previous_until)
        .bind(&p.secret_sealed)
        .bind(p.previous_until)
        .bind(&p.secret_sealed)
        .bind(p.enabled)
        .bind(p.url.is_some())
        .bind(p.secret_sealed.is_some())
        .bind(p.enabled)
        .bind(p.url.is_some())
        .bind(p.secret_sealed.is_some())
        .bind(p.enabled)
        .bind(p.enabled)
        .bind(&p.disabled_reason)
        .bind(p.updated_at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let endpoint = endpoint_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(endpoint))
    }

    async fn delete_webhook(&self, id: &str, audit: &NewAudit) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let n = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn record_audit(&self, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn insert_events(&self, events: &[NewEvent]) -> Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let mut new = 0;
        for e in events {
            if insert_event_tx(&mut tx, &e.id, &e.event_type, e.at, &e.payload, Some(&e.dedup)).await? {
                new += 1;
            }
        }
        tx.commit().await.map_err(map_err)?;
        Ok(new)
    }

    async fn list_events(&self, before: Option<&str>, limit: u32) -> Result<Vec<StoredEvent>> {
        let rows = sqlx::query(
            "SELECT id, type, at, payload FROM events \
             WHERE $1 IS NULL OR seq < (SELECT seq FROM events WHERE id = $2) ORDER BY seq DESC LIMIT $3",
        )
        .bind(before)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(StoredEvent {
                    id: r.try_get("id").map_err(map_err)?,
                    event_type: r.try_get("type").map_err(map_err)?,
                    at: r.try_get("at").map_err(map_err)?,
                    payload: r.try_get("payload").map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn claim_deliveries(&self, now: i64, lease_until: i64, limit: u32) -> Result<Vec<DueDelivery>> {
        // A read first: an idle worker does not take the write lock.
        let due: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM webhook_deliveries WHERE status = 'pending' AND next_at <= $1)",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        if !due {
            return Ok(Vec::new());
        }
        // Per endpoint (there are few): room for more leases (at most 16 at once, 1 while it is failing, so
        // one dead receiver cannot hold every slot), then its oldest due deliveries, by index. Reads
        // outside the write transaction; the lease itself re-checks that each delivery is still due, so
        // two nodes never lease one delivery (the per-endpoint cap is soft across nodes).
        let endpoints = sqlx::query(
            "SELECT w.id, CASE WHEN w.failing_since IS NULL THEN 16 ELSE 1 END - \
               (SELECT COUNT(*) FROM webhook_deliveries x WHERE x.endpoint_id = w.id AND x.status = 'pending' \
                  AND x.next_at > $1 AND x.leased_until > $2) AS room, \
               (SELECT MIN(next_at) FROM webhook_deliveries x WHERE x.endpoint_id = w.id AND x.status = 'pending') \
                  AS oldest \
             FROM webhook_endpoints w WHERE w.enabled = TRUE ORDER BY oldest",
        )
        .bind(now)
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut chosen: Vec<i64> = Vec::new();
        for e in &endpoints {
            let left = i64::from(limit) - chosen.len() as i64;
            let room: i64 = e.try_get("room").map_err(map_err)?;
            if left <= 0 {
                break;
            }
            if room <= 0 {
                continue;
            }
            let id: String = e.try_get("id").map_err(map_err)?;
            let due: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'pending' AND next_at <= $2 \
                 ORDER BY next_at, id LIMIT $3",
            )
            .bind(&id)
            .bind(now)
            .bind(room.min(left))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
            chosen.extend(due);
        }
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "UPDATE webhook_deliveries SET next_at = $1, leased_until = $2 \
             WHERE id IN (SELECT value::BIGINT FROM jsonb_array_elements_text($3::jsonb) j(value)) AND status = 'pending' AND next_at <= $4 RETURNING id",
        )
        .bind(lease_until)
        .bind(lease_until)
        .bind(to_json(&chosen)?)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT d.id, d.endpoint_id, w.url, w.secret_sealed, \
             CASE WHEN w.previous_secret_until > $1 THEN w.previous_secret_sealed END AS previous_secret_sealed, \
             d.event_id, e.type, e.at, e.payload, d.attempts, \
             d.created_at FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
             JOIN events e ON e.id = d.event_id WHERE d.id IN (SELECT value::BIGINT FROM jsonb_array_elements_text($2::jsonb) j(value)) ORDER BY d.id",
        )
        .bind(now)
        .bind(to_json(&ids)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        rows.iter()
            .map(|r| {
                let attempts: i64 = r.try_get("attempts").map_err(map_err)?;
                Ok(DueDelivery {
                    id: r.try_get("id").map_err(map_err)?,
                    endpoint_id: r.try_get("endpoint_id").map_err(map_err)?,
                    url: r.try_get("url").map_err(map_err)?,
                    secret_sealed: r.try_get("secret_sealed").map_err(map_err)?,
                    previous_secret_sealed: r.try_get("previous_secret_sealed").map_err(map_err)?,
                    event_id: r.try_get("event_id").map_err(map_err)?,
                    event_type: r.try_get("type").map_err(map_err)?,
                    event_at: r.try_get("at").map_err(map_err)?,
                    payload: r.try_get("payload").map_err(map_err)?,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    created_at: r.try_get("created_at").map_err(map_err)?,
                    leased_until: lease_until,
                })
            })
            .collect()
    }

    async fn finish_attempt(
        &self,
        d: &DueDelivery,
        a: &Attempt,
        outcome: AttemptOutcome,
        new_run_after: i64,
    ) -> Result<Option<Option<i64>>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let next_at = match outcome {
            AttemptOutcome::Retry(at) => Some(at),
            AttemptOutcome::Delivered | AttemptOutcome::Failed => None,
        };
        // Only under our lease: a finisher whose lease ran out (the delivery was leased again, or its
        // endpoint deleted) changes nothing.
        let held = sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, attempts = attempts + 1, next_at = $2, leased_until = NULL \
             WHERE id = $3 AND status = 'pending' AND leased_until = $4",
        )
        .bind(outcome.status())
        .bind(next_at)
        .bind(d.id)
        .bind(d.leased_until)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if held == 0 {
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, at, status_code, latency_ms, error) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(d.id)
        .bind(a.at)
        .bind(a.status_code.map(i64::from))
        .bind(a.latency_ms)
        .bind(&a.error)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let delivered = outcome == AttemptOutcome::Delivered;
        let failing: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE webhook_endpoints SET \
               failing_since = CASE WHEN $1 THEN NULL \
                 WHEN failing_since IS NULL OR last_failure_at IS NULL OR last_failure_at < $2 THEN $3 \
                 ELSE failing_since END, \
               last_failure_at = CASE WHEN $4 THEN NULL ELSE $5 END \
             WHERE id = $6 RETURNING failing_since",
        )
        .bind(delivered)
        .bind(a.at - new_run_after)
        .bind(a.at)
        .bind(delivered)
        .bind(a.at)
        .bind(&d.endpoint_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(failing.flatten()))
    }

    async fn disable_failing_webhook(
        &self,
        id: &str,
        failing_since: i64,
        reason: &str,
        audit: &NewAudit,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let n = sqlx::query(
            "UPDATE webhook_endpoints SET enabled = FALSE, disabled_reason = $1, updated_at = $2 \
             WHERE id = $3 AND enabled = TRUE AND failing_since = $4",
        )
        .bind(reason)
        .bind(audit.at)
        .bind(id)
        .bind(failing_since)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn list_deliveries(
        &self,
        endpoint_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        let rows = sqlx::query(
            "SELECT d.id, d.endpoint_id, d.event_id, e.type, d.status, d.next_at, d.created_at \
             FROM webhook_deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.endpoint_id = $1 AND ($2 IS NULL OR d.id < $3) ORDER BY d.id DESC LIMIT $4",
        )
        .bind(endpoint_id)
        .bind(before)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let mut out: Vec<Delivery> = rows
            .iter()
            .map(|r| {
                Ok(Delivery {
                    id: r.try_get("id").map_err(map_err)?,
                    endpoint_id: r.try_get("endpoint_id").map_err(map_err)?,
                    event_id: r.try_get("event_id").map_err(map_err)?,
                    event_type: r.try_get("type").map_err(map_err)?,
                    status: r.try_get("status").map_err(map_err)?,
                    next_attempt_at: r.try_get("next_at").map_err(map_err)?,
                    created_at: r.try_get("created_at").map_err(map_err)?,
                    attempts: Vec::new(),
                })
            })
            .collect::<Result<_>>()?;
        if out.is_empty() {
            return Ok(out);
        }
        let ids: Vec<i64> = out.iter().map(|d| d.id).collect();
        let attempts = sqlx::query(
            "SELECT delivery_id, at, status_code, latency_ms, error FROM webhook_attempts \
             WHERE delivery_id IN (SELECT value::BIGINT FROM jsonb_array_elements_text($1::jsonb) j(value)) ORDER BY delivery_id, at",
        )
        .bind(to_json(&ids)?)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        for r in attempts {
            let id: i64 = r.try_get("delivery_id").map_err(map_err)?;
            let code: Option<i64> = r.try_get("status_code").map_err(map_err)?;
            let attempt = Attempt {
                at: r.try_get("at").map_err(map_err)?,
                status_code: code.and_then(|c| u16::try_from(c).ok()),
                latency_ms: r.try_get("latency_ms").map_err(map_err)?,
                error: r.try_get("error").map_err(map_err)?,
            };
            if let Some(d) = out.iter_mut().find(|d| d.id == id) {
                d.attempts.push(attempt);
            }
        }
        Ok(out)
    }

    async fn expire_events(&self, before: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "UPDATE webhook_deliveries SET status = 'failed', next_at = NULL, leased_until = NULL \
             WHERE status = 'pending' AND created_at < $1",
        )
        .bind(before)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let a = sqlx::query("DELETE FROM webhook_deliveries WHERE status != 'pending' AND created_at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        let b = sqlx::query(
            "DELETE FROM events WHERE at < $1 AND NOT EXISTS \
             (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = events.id)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        tx.commit().await.map_err(map_err)?;
        Ok(a + b)
    }

    async fn insert_leak_report(&self, r: &LeakReport, audit: Option<&NewAudit>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO leak_reports (id, at, reporter, token_hash, token_type, url, source, label, \
             credential_type, credential_id, action) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&r.id)
        .bind(r.at)
        .bind(&r.reporter)
        .bind(&r.token_hash)
        .bind(&r.token_type)
        .bind(&r.url)
        .bind(&r.source)
        .bind(&r.label)
        .bind(r.credential.as_ref().map(|c| c.0.as_str()))
        .bind(r.credential.as_ref().map(|c| c.1.as_str()))
        .bind(&r.action)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(a) = audit {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn leak_reported(&self, token_hash: &str, url: Option<&str>) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM leak_reports WHERE token_hash = $1 AND token_hash != '' AND url IS NOT DISTINCT FROM $2)",
        )
        .bind(token_hash)
        .bind(url)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)
    }

    async fn list_leak_reports(&self, before: Option<&str>, limit: u32) -> Result<Vec<LeakReport>> {
        let rows =
            sqlx::query("SELECT * FROM leak_reports WHERE $1 IS NULL OR id < $2 ORDER BY id DESC LIMIT $3")
                .bind(before)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(map_err)?;
        rows.iter().map(leak_from_row).collect()
    }
}
