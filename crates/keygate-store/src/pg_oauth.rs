//! The PostgreSQL implementation of [`OAuthStore`].

use async_trait::async_trait;
use keygate_core::SecretHash;
use sqlx::Row;

use crate::oauth::{
    AccessTokenRecord, ClientPatch, GrantType, OAuthClient, OAuthStore, SigningKey, TokenFormat,
};

fn grant_names(g: &[GrantType]) -> Vec<&'static str> {
    g.iter().map(|g| g.as_str()).collect()
}
use crate::pg::{
    INSERT_CLIENT_SECRET, client_from_row, fetch_by_id, fetch_page, hash_from_row, insert_audit,
    insert_secret_row, map_err, signing_key_from_row, token_from_row,
};
use crate::rows::to_json;
use crate::{NewAudit, Page, PgStore, Result, StoredSecret};

pub(crate) async fn insert_access_token_rows(
    tx: &mut crate::pg::Tx<'_>,
    tokens: &[AccessTokenRecord],
) -> Result<()> {
    for t in tokens {
        sqlx::query(
            "INSERT INTO access_tokens (hash, jti, client_id, subject, scopes, audiences, issued_at, \
             expires_at, revoked_at, family_id, source, jkt) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&t.hash.as_bytes()[..])
        .bind(&t.jti)
        .bind(&t.client_id)
        .bind(&t.subject)
        .bind(to_json(&t.scopes)?)
        .bind(to_json(&t.audiences)?)
        .bind(t.issued_at)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .bind(&t.family_id)
        .bind(&t.source)
        .bind(&t.jkt)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    }
    Ok(())
}

async fn insert_client_secret(tx: &mut crate::pg::Tx<'_>, s: &StoredSecret) -> Result<()> {
    insert_secret_row(tx, INSERT_CLIENT_SECRET, s).await
}

#[async_trait]
impl OAuthStore for PgStore {
    async fn insert_client(
        &self,
        c: &OAuthClient,
        secret: Option<&StoredSecret>,
        audit: &NewAudit,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO oauth_clients (id, consumer_id, name, grant_types, scopes, audiences, token_format, \
             token_lifetime_seconds, confidential, disabled, tokens_revoked_before, secret_start, auth_method, jwks, \
             redirect_uris, refresh_idle_seconds, refresh_absolute_seconds, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)",
        )
        .bind(&c.id)
        .bind(&c.consumer_id)
        .bind(&c.name)
        .bind(to_json(&grant_names(&c.grant_types))?)
        .bind(to_json(&c.scopes)?)
        .bind(to_json(&c.audiences)?)
        .bind(c.token_format.as_str())
        .bind(c.token_lifetime_seconds)
        .bind(c.confidential)
        .bind(c.disabled)
        .bind(c.tokens_revoked_before)
        .bind(&c.secret_start)
        .bind(&c.auth_method)
        .bind(c.jwks.as_ref().map(|j| j.to_string()))
        .bind(to_json(&c.redirect_uris)?)
        .bind(c.refresh_idle_seconds)
        .bind(c.refresh_absolute_seconds)
        .bind(c.created_at)
        .bind(c.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(s) = secret {
            insert_client_secret(&mut tx, s).await?;
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_client(&self, id: &str) -> Result<Option<OAuthClient>> {
        fetch_by_id(&self.pool, "SELECT * FROM oauth_clients WHERE id = $1", id, client_from_row).await
    }

    async fn list_clients(&self, page: &Page) -> Result<Vec<OAuthClient>> {
        let plain = "SELECT * FROM oauth_clients WHERE id > $1 ORDER BY id LIMIT $2";
        let searched = "SELECT * FROM oauth_clients WHERE id > $1 AND ((lower(name) >= $3 \
                        AND lower(name) < $4) OR id = $5 OR consumer_id = $5) ORDER BY id LIMIT $2";
        fetch_page(&self.pool, plain, searched, page, client_from_row).await
    }

    async fn update_client(
        &self,
        id: &str,
        p: &ClientPatch,
        audit: &NewAudit,
    ) -> Result<Option<OAuthClient>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE oauth_clients SET name = COALESCE($1, name), grant_types = COALESCE($2, grant_types), \
             scopes = COALESCE($3, scopes), audiences = COALESCE($4, audiences), \
             token_format = COALESCE($5, token_format), \
             token_lifetime_seconds = COALESCE($6, token_lifetime_seconds), disabled = COALESCE($7, disabled), \
             tokens_revoked_before = COALESCE($8, tokens_revoked_before), jwks = COALESCE($9, jwks), \
             redirect_uris = COALESCE($10, redirect_uris), refresh_idle_seconds = COALESCE($11, refresh_idle_seconds), \
             refresh_absolute_seconds = COALESCE($12, refresh_absolute_seconds), updated_at = $13 \
             WHERE id = $14 RETURNING *",
        )
        .bind(&p.name)
        .bind(p.grant_types.as_ref().map(|g| to_json(&grant_names(g))).transpose()?)
        .bind(p.scopes.as_ref().map(to_json).transpose()?)
        .bind(p.audiences.as_ref().map(to_json).transpose()?)
        .bind(p.token_format.map(TokenFormat::as_str))
        .bind(p.token_lifetime_seconds)
        .bind(p.disabled)
        .bind(p.tokens_revoked_before)
        .bind(p.jwks.as_ref().map(|j| j.to_string()))
        .bind(p.redirect_uris.as_ref().map(to_json).transpose()?)
        .bind(p.refresh_idle_seconds)
        .bind(p.refresh_absolute_seconds)
        .bind(p.updated_at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let client = client_from_row(&row)?;
        if p.tokens_revoked_before.is_some() {
            // Every token so far: access tokens, and the refresh-token families that would mint more.
            for sql in [
                "UPDATE access_tokens SET revoked_at = $1 WHERE client_id = $2 AND revoked_at IS NULL",
                "UPDATE token_families SET revoked_at = $1 WHERE client_id = $2 AND revoked_at IS NULL",
            ] {
                sqlx::query(sql).bind(p.updated_at).bind(id).execute(&mut *tx).await.map_err(map_err)?;
            }
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(client))
    }

    async fn delete_client(&self, id: &str, audit: &NewAudit) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for sql in [
            "DELETE FROM client_secrets WHERE client_id = $1",
            "DELETE FROM access_tokens WHERE client_id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await.map_err(map_err)?;
        }
        let deleted = sqlx::query("DELETE FROM oauth_clients WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn rotate_client_secret(
        &self,
        id: &str,
        secret: &StoredSecret,
        old_expires_at: i64,
        audit: &NewAudit,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let updated =
            sqlx::query("UPDATE oauth_clients SET secret_start = $1, updated_at = $2 WHERE id = $3")
                .bind(&secret.start)
                .bind(secret.created_at)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected();
        if updated == 0 {
            return Ok(false);
        }
        sqlx::query(
            "UPDATE client_secrets SET expires_at = $1 WHERE client_id = $2 AND (expires_at IS NULL OR expires_at > $3)",
        )
        .bind(old_expires_at)
        .bind(id)
        .bind(old_expires_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_client_secret(&mut tx, secret).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn find_client_secret(&self, hash: &SecretHash) -> Result<Option<(OAuthClient, Option<i64>)>> {
        let row = sqlx::query(
            "SELECT s.expires_at AS secret_expires_at, c.* FROM client_secrets s \
             JOIN oauth_clients c ON c.id = s.client_id WHERE s.hash = $1",
        )
        .bind(&hash.as_bytes()[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some((client_from_row(&row)?, row.try_get("secret_expires_at").map_err(map_err)?)))
    }

    async fn insert_access_tokens(&self, tokens: &[AccessTokenRecord]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        insert_access_token_rows(&mut tx, tokens).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn find_access_token(&self, hash: &SecretHash) -> Result<Option<AccessTokenRecord>> {
        let row = sqlx::query("SELECT * FROM access_tokens WHERE hash = $1")
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn revoke_access_token(
        &self,
        hash: &SecretHash,
        at: i64,
        audit: Option<&NewAudit>,
    ) -> Result<Option<AccessTokenRecord>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE access_tokens SET revoked_at = $1 WHERE hash = $2 AND revoked_at IS NULL RETURNING *",
        )
        .bind(at)
        .bind(&hash.as_bytes()[..])
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let record = row.as_ref().map(token_from_row).transpose()?;
        if let (Some(_), Some(a)) = (&record, audit) {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(record)
    }

    async fn revoke_jti(
        &self,
        jti: &str,
        client_id: &str,
        expires_at: i64,
        at: i64,
        audit: Option<&NewAudit>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let new = sqlx::query(
            "INSERT INTO revoked_jtis (jti, client_id, expires_at, revoked_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (jti) DO NOTHING",
        )
        .bind(jti)
        .bind(client_id)
        .bind(expires_at)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?
        .rows_affected();
        if let (1, Some(a)) = (new, audit) {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn revoked_jtis(&self, now: i64) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT jti, expires_at FROM revoked_jtis WHERE expires_at > $1")
            .bind(now)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|r| Ok((r.try_get("jti").map_err(map_err)?, r.try_get("expires_at").map_err(map_err)?)))
            .collect()
    }

    async fn expire_tokens(&self, now: i64) -> Result<u64> {
        let mut n = 0;
        for sql in [
            "DELETE FROM access_tokens WHERE expires_at < $1",
            "DELETE FROM revoked_jtis WHERE expires_at < $1",
        ] {
            n += sqlx::query(sql).bind(now).execute(&self.pool).await.map_err(map_err)?.rows_affected();
        }
        // Codes and families are kept a day past their expiry: a replayed code is then still recognised
        // (and revokes its family), and a family's last access tokens (at most a day long) still see
        // whether it was revoked.
        let day_ago = now - 86_400_000;
        for sql in [
            "DELETE FROM auth_codes WHERE expires_at < $1",
            "DELETE FROM device_codes WHERE expires_at < $1",
            "DELETE FROM refresh_tokens WHERE family_id IN (SELECT id FROM token_families WHERE expires_at < $1)",
            "DELETE FROM token_families WHERE expires_at < $1",
        ] {
            n += sqlx::query(sql).bind(day_ago).execute(&self.pool).await.map_err(map_err)?.rows_affected();
        }
        Ok(n)
    }

    async fn set_registration_token(&self, client_id: &str, hash: &SecretHash, at: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO client_registrations (client_id, token_hash, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (client_id) DO UPDATE SET token_hash = excluded.token_hash",
        )
        .bind(client_id)
        .bind(&hash.as_bytes()[..])
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn registration_token(&self, client_id: &str) -> Result<Option<SecretHash>> {
        let row = sqlx::query("SELECT token_hash AS hash FROM client_registrations WHERE client_id = $1")
            .bind(client_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(hash_from_row).transpose()
    }

    async fn insert_signing_key(&self, k: &SigningKey, audit: Option<&NewAudit>) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, alg, private_der, public_jwk, created_at, active_from, retired_at, \
             publish_until) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&k.kid)
        .bind(&k.alg)
        .bind(&k.private_der)
        .bind(k.public_jwk.to_string())
        .bind(k.created_at)
        .bind(k.active_from)
        .bind(k.retired_at)
        .bind(k.publish_until)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(a) = audit {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn list_signing_keys(&self) -> Result<Vec<SigningKey>> {
        let rows = sqlx::query("SELECT * FROM signing_keys ORDER BY active_from")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(signing_key_from_row).collect()
    }

    async fn retire_signing_key(&self, kid: &str, retired_at: i64, publish_until: i64) -> Result<()> {
        sqlx::query("UPDATE signing_keys SET retired_at = $1, publish_until = $2 WHERE kid = $3")
            .bind(retired_at)
            .bind(publish_until)
            .bind(kid)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn reseal_signing_key(&self, kid: &str, sealed: &[u8]) -> Result<()> {
        // (PostgreSQL has no secure_delete: the old row version stays until VACUUM reclaims it. Keys
        // stored in clear come only from SQLite installations of older versions.)
        sqlx::query("UPDATE signing_keys SET private_der = $1 WHERE kid = $2")
            .bind(sealed)
            .bind(kid)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn revoke_signing_key(&self, kid: &str, at: i64, audit: &NewAudit) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let done =
            sqlx::query("UPDATE signing_keys SET revoked_at = $1 WHERE kid = $2 AND revoked_at IS NULL")
                .bind(at)
                .bind(kid)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected()
                > 0;
        if done {
            insert_audit(&mut tx, audit).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(done)
    }
}
