//! The PostgreSQL implementation of [`UserStore`].

use async_trait::async_trait;
use keygate_core::SecretHash;
use sqlx::Row;

use crate::pg::{Tx, fetch_by_id, fetch_page, insert_audit, map_err, opt_json};
use crate::pg::{
    code_from_row, device_from_row, family_from_row, grant_from_row, pat_from_row, refresh_from_row,
    user_from_row,
};
use crate::pg_oauth::insert_access_token_rows;
use crate::rows::to_json;
use crate::users::{
    AuthCode, DeviceAuth, Grant, PersonalToken, Redeemed, Redemption, RefreshRecord, Rotation, TokenFamily,
    User, UserPatch, UserStore,
};
use crate::{NewAudit, Page, PgStore, Result};

async fn insert_refresh(tx: &mut Tx<'_>, r: &RefreshRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (hash, family_id, scopes, audiences, issued_at, idle_expires_at, used_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&r.hash.as_bytes()[..])
    .bind(&r.family_id)
    .bind(to_json(&r.scopes)?)
    .bind(to_json(&r.audiences)?)
    .bind(r.issued_at)
    .bind(r.idle_expires_at)
    .bind(r.used_at)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Which families [`revoke_families_where`] revokes.
#[derive(Clone, Copy)]
enum Families {
    Id,
    OfGrant,
    OfUser,
}

/// Revokes families and their opaque access tokens; returns the families revoked, with their absolute
/// ends.
async fn revoke_families_where(
    tx: &mut Tx<'_>,
    which: Families,
    arg: &str,
    at: i64,
) -> Result<Vec<(String, i64)>> {
    let sql = match which {
        Families::Id => {
            "UPDATE token_families SET revoked_at = $1 WHERE revoked_at IS NULL AND id = $2 RETURNING id, expires_at"
        }
        Families::OfGrant => {
            "UPDATE token_families SET revoked_at = $1 WHERE revoked_at IS NULL AND grant_id = $2 RETURNING id, expires_at"
        }
        Families::OfUser => {
            "UPDATE token_families SET revoked_at = $1 WHERE revoked_at IS NULL AND user_id = $2 RETURNING id, expires_at"
        }
    };
    let rows = sqlx::query(sql).bind(at).bind(arg).fetch_all(&mut **tx).await.map_err(map_err)?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get("id").map_err(map_err)?;
        let expires: i64 = row.try_get("expires_at").map_err(map_err)?;
        sqlx::query("UPDATE access_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL")
            .bind(at)
            .bind(&id)
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
        out.push((id, expires));
    }
    Ok(out)
}

/// Widens the live grant of a user for a client to include `scopes`, or creates one with `new_id`;
/// returns its id. Two consents for the same user and client (on any nodes) take turns on an advisory
/// lock, so the second finds the grant the first created instead of breaking `grants_live`.
async fn upsert_grant(
    tx: &mut Tx<'_>,
    new_id: &str,
    user_id: &str,
    client_id: &str,
    scopes: &[String],
    at: i64,
) -> Result<String> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("grant/{user_id}/{client_id}"))
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    let existing = sqlx::query(
        "UPDATE grants SET updated_at = $1 WHERE user_id = $2 AND client_id = $3 AND revoked_at IS NULL RETURNING *",
    )
    .bind(at)
    .bind(user_id)
    .bind(client_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    if let Some(mut g) = existing.as_ref().map(grant_from_row).transpose()? {
        let before = g.scopes.len();
        for s in scopes {
            if !g.scopes.contains(s) {
                g.scopes.push(s.clone());
            }
        }
        if g.scopes.len() != before {
            sqlx::query("UPDATE grants SET scopes = $1 WHERE id = $2")
                .bind(to_json(&g.scopes)?)
                .bind(&g.id)
                .execute(&mut **tx)
                .await
                .map_err(map_err)?;
        }
        return Ok(g.id);
    }
    sqlx::query("INSERT INTO grants (id, user_id, client_id, scopes, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(new_id)
        .bind(user_id)
        .bind(client_id)
        .bind(to_json(&scopes)?)
        .bind(at)
        .bind(at)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(new_id.to_string())
}

/// One redemption inside a batch's transaction (see [`UserStore::redeem_codes`]).
async fn redeem_one(tx: &mut Tx<'_>, r: &Redemption) -> Result<Redeemed> {
    let (hash, at, family) = (&r.hash, r.at, &r.family);
    // The row lock this update takes makes a second redemption of the code wait, then find it used.
    let first = sqlx::query(
        "UPDATE auth_codes SET used_at = $1, family_id = $2 WHERE hash = $3 AND used_at IS NULL RETURNING hash",
    )
    .bind(at)
    .bind(&family.id)
    .bind(&hash.as_bytes()[..])
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    if first.is_none() {
        let row = sqlx::query("SELECT family_id FROM auth_codes WHERE hash = $1")
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)?;
        let Some(row) = row else { return Ok(Redeemed::Unknown) };
        let family_id: Option<String> = row.try_get("family_id").map_err(map_err)?;
        if let Some(f) = &family_id {
            revoke_families_where(tx, Families::Id, f, at).await?;
        }
        return Ok(Redeemed::Replayed { family_id });
    }
    if create_family(tx, r).await? { Ok(Redeemed::Issued) } else { Ok(Redeemed::Unknown) }
}

/// Creates a redemption's family with its first tokens, unless its grant was revoked meanwhile (then
/// nothing is issued: false).
async fn create_family(tx: &mut Tx<'_>, r: &Redemption) -> Result<bool> {
    let family = &r.family;
    // The grant may have been revoked while the code was outstanding: the code is spent, nothing is
    // issued. The share lock makes a concurrent revocation of the grant wait for this commit, so that it
    // then finds (and revokes) the family created here.
    let live = sqlx::query("SELECT 1 AS live FROM grants WHERE id = $1 AND revoked_at IS NULL FOR SHARE")
        .bind(&family.grant_id)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    if live.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO token_families (id, grant_id, client_id, user_id, created_at, expires_at, revoked_at, jkt) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
    )
    .bind(&family.id)
    .bind(&family.grant_id)
    .bind(&family.client_id)
    .bind(&family.user_id)
    .bind(family.created_at)
    .bind(family.expires_at)
    .bind(&family.jkt)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    if let Some(refresh) = &r.refresh {
        insert_refresh(tx, refresh).await?;
    }
    if let Some(a) = &r.access {
        insert_access_token_rows(tx, std::slice::from_ref(a)).await?;
    }
    Ok(true)
}

#[async_trait]
impl UserStore for PgStore {
    async fn insert_user(&self, u: &User, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
                        "INSERT INTO users (id, username, username_key, email, display_name, password_hash, allowed_scopes, \
             roles, disabled, created_at, updated_at, last_login_at, email_verified_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&u.id)
        .bind(&u.username)
        .bind(u.username.to_lowercase())
        .bind(&u.email)
        .bind(&u.display_name)
        .bind(&u.password_hash)
                .bind(opt_json(&u.allowed_scopes)?)
        .bind(to_json(&u.roles)?)
        .bind(u.disabled)
        .bind(u.created_at)
        .bind(u.updated_at)
        .bind(u.last_login_at)
        .bind(u.email_verified_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_user(&self, id: &str) -> Result<Option<User>> {
        fetch_by_id(&self.pool, "SELECT * FROM users WHERE id = $1", id, user_from_row).await
    }

    async fn find_user(&self, username: &str) -> Result<Option<User>> {
        fetch_by_id(
            &self.pool,
            "SELECT * FROM users WHERE username_key = $1",
            &username.to_lowercase(),
            user_from_row,
        )
        .await
    }

    async fn find_user_by_email(&self, email: &str) -> Result<Option<User>> {
        fetch_by_id(
            &self.pool,
            "SELECT * FROM users WHERE lower(email) = $1 ORDER BY created_at, id LIMIT 1",
            &email.to_ascii_lowercase(),
            user_from_row,
        )
        .await
    }

    async fn list_users(&self, page: &Page) -> Result<Vec<User>> {
        let plain = "SELECT * FROM users WHERE id > $1 ORDER BY id LIMIT $2";
        let searched = "SELECT * FROM users WHERE id > $1 AND ((lower(username) >= $3 \
                        AND lower(username) < $4) OR id = $5 OR email = $5) ORDER BY id LIMIT $2";
        fetch_page(&self.pool, plain, searched, page, user_from_row).await
    }

    async fn update_user(&self, id: &str, p: &UserPatch, audit: &NewAudit) -> Result<Option<User>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // Optional fields: a flag says whether to touch them, so that `Some(None)` can clear them.
        let row = sqlx::query(
            "UPDATE users SET username = COALESCE($1, username), username_key = COALESCE($2, username_key), \
             email = CASE WHEN $3 THEN $4 ELSE email END, \
             display_name = CASE WHEN $5 THEN $6 ELSE display_name END, \
                          allowed_scopes = CASE WHEN $7 THEN $8 ELSE allowed_scopes END, \
             roles = COALESCE($9, roles), disabled = COALESCE($10, disabled), password_hash = COALESCE($11, password_hash), \
             email_verified_at = CASE WHEN $14 THEN $15 ELSE email_verified_at END, updated_at = $12 \
             WHERE id = $13 RETURNING *",
        )
        .bind(&p.username)
        .bind(p.username.as_ref().map(|u| u.to_lowercase()))
        .bind(p.email.is_some())
        .bind(p.email.clone().flatten())
        .bind(p.display_name.is_some())
        .bind(p.display_name.clone().flatten())
        .bind(p.allowed_scopes.is_some())
                .bind(opt_json(&p.allowed_scopes.clone().flatten())?)
        .bind(p.roles.as_ref().map(to_json).transpose()?)
        .bind(p.disabled)
        .bind(&p.password_hash)
        .bind(p.updated_at)
        .bind(id)
        .bind(p.email_verified_at.is_some())
        .bind(p.email_verified_at.flatten())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let user = user_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(user))
    }

    async fn delete_user(&self, id: &str, audit: &NewAudit) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        revoke_families_where(&mut tx, Families::OfUser, id, audit.at).await?;
        // Their applications stop with them (and stay, disabled, with the owner's id, for the record).
        sqlx::query("UPDATE consumers SET disabled = TRUE, updated_at = $1 WHERE owner_id = $2")
            .bind(audit.at)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        // Grants, codes, families and refresh tokens go with the user (foreign keys cascade).
        let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
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

    async fn record_login(&self, id: &str, at: i64) -> Result<()> {
        sqlx::query("UPDATE users SET last_login_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn find_grant(&self, user_id: &str, client_id: &str) -> Result<Option<Grant>> {
        let row =
            sqlx::query("SELECT * FROM grants WHERE user_id = $1 AND client_id = $2 AND revoked_at IS NULL")
                .bind(user_id)
                .bind(client_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        row.as_ref().map(grant_from_row).transpose()
    }

    async fn list_grants(&self, user_id: &str) -> Result<Vec<Grant>> {
        let rows = sqlx::query("SELECT * FROM grants WHERE user_id = $1 AND revoked_at IS NULL ORDER BY id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(grant_from_row).collect()
    }

    async fn get_grant(&self, id: &str) -> Result<Option<Grant>> {
        fetch_by_id(&self.pool, "SELECT * FROM grants WHERE id = $1", id, grant_from_row).await
    }

    async fn revoke_grant(
        &self,
        user_id: &str,
        grant_id: &str,
        at: i64,
        audit: &NewAudit,
    ) -> Result<Option<Vec<(String, i64)>>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let updated = sqlx::query(
            "UPDATE grants SET revoked_at = $1, updated_at = $2 WHERE id = $3 AND user_id = $4 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(at)
        .bind(grant_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        let families = revoke_families_where(&mut tx, Families::OfGrant, grant_id, at).await?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(families))
    }

    async fn issue_code(&self, c: &AuthCode, consent: Option<&str>, login_at: Option<i64>) -> Result<String> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let grant_id = match consent {
            Some(new_id) => {
                upsert_grant(&mut tx, new_id, &c.user_id, &c.client_id, &c.scopes, c.created_at).await?
            }
            None => c.grant_id.clone(),
        };
        sqlx::query(
            "INSERT INTO auth_codes (hash, client_id, user_id, grant_id, redirect_uri, code_challenge, scopes, \
             audiences, created_at, expires_at, used_at, family_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&c.hash.as_bytes()[..])
        .bind(&c.client_id)
        .bind(&c.user_id)
        .bind(&grant_id)
        .bind(&c.redirect_uri)
        .bind(&c.code_challenge)
        .bind(to_json(&c.scopes)?)
        .bind(to_json(&c.audiences)?)
        .bind(c.created_at)
        .bind(c.expires_at)
        .bind(c.used_at)
        .bind(&c.family_id)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if let Some(at) = login_at {
            sqlx::query("UPDATE users SET last_login_at = $1 WHERE id = $2")
                .bind(at)
                .bind(&c.user_id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(grant_id)
    }

    async fn get_code(&self, hash: &SecretHash) -> Result<Option<AuthCode>> {
        let row = sqlx::query("SELECT * FROM auth_codes WHERE hash = $1")
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(code_from_row).transpose()
    }

    async fn burn_code(&self, hash: &SecretHash, at: i64) -> Result<bool> {
        let r = sqlx::query("UPDATE auth_codes SET used_at = $1 WHERE hash = $2 AND used_at IS NULL")
            .bind(at)
            .bind(&hash.as_bytes()[..])
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(r.rows_affected() == 1)
    }

    async fn redeem_codes(&self, redemptions: &[Redemption]) -> Result<Vec<Redeemed>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let mut out = Vec::with_capacity(redemptions.len());
        for r in redemptions {
            out.push(redeem_one(&mut tx, r).await?);
        }
        tx.commit().await.map_err(map_err)?;
        Ok(out)
    }

    async fn find_refresh(&self, hash: &SecretHash) -> Result<Option<(RefreshRecord, TokenFamily)>> {
        let row = sqlx::query(
            "SELECT r.*, f.id AS f_id, f.grant_id AS f_grant_id, f.client_id AS f_client_id, \
             f.user_id AS f_user_id, f.created_at AS f_created_at, f.expires_at AS f_expires_at, \
             f.revoked_at AS f_revoked_at, f.jkt AS f_jkt FROM refresh_tokens r JOIN token_families f ON f.id = r.family_id \
             WHERE r.hash = $1",
        )
        .bind(&hash.as_bytes()[..])
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        match row {
            Some(row) => Ok(Some((refresh_from_row(&row)?, family_from_row(&row)?))),
            None => Ok(None),
        }
    }

    async fn rotate_refreshes(&self, rotations: &[Rotation]) -> Result<Vec<bool>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let mut out = Vec::with_capacity(rotations.len());
        for r in rotations {
            // The family is share-locked first: a concurrent revocation of it waits for this commit and
            // then revokes the access token issued here too; one that committed first is seen here.
            let live = sqlx::query(
                "SELECT f.id FROM token_families f JOIN refresh_tokens t ON t.family_id = f.id \
                 WHERE t.hash = $1 AND f.revoked_at IS NULL FOR SHARE OF f",
            )
            .bind(&r.old.as_bytes()[..])
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_err)?;
            if live.is_none() {
                out.push(false);
                continue;
            }
            let won = sqlx::query(
                "UPDATE refresh_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL \
                 AND (SELECT f.revoked_at FROM token_families f WHERE f.id = refresh_tokens.family_id) IS NULL",
            )
            .bind(r.at)
            .bind(&r.old.as_bytes()[..])
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected()
                == 1;
            if won {
                insert_refresh(&mut tx, &r.successor).await?;
                if let Some(a) = &r.access {
                    insert_access_token_rows(&mut tx, std::slice::from_ref(a)).await?;
                }
            }
            out.push(won);
        }
        tx.commit().await.map_err(map_err)?;
        Ok(out)
    }

    async fn revoke_family(&self, family_id: &str, at: i64, audit: Option<&NewAudit>) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let revoked = revoke_families_where(&mut tx, Families::Id, family_id, at).await?;
        if let (false, Some(a)) = (revoked.is_empty(), audit) {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(!revoked.is_empty())
    }

    async fn revoked_families(&self, now: i64) -> Result<Vec<(String, i64)>> {
        // A family's access tokens live at most a day past its absolute end.
        let rows = sqlx::query(
            "SELECT id, expires_at FROM token_families WHERE revoked_at IS NOT NULL AND expires_at > $1",
        )
        .bind(now - 86_400_000)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| Ok((r.try_get("id").map_err(map_err)?, r.try_get("expires_at").map_err(map_err)?)))
            .collect()
    }

    async fn insert_pat(&self, p: &PersonalToken, audit: &NewAudit) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO personal_tokens (id, user_id, name, scopes, audiences, hash, start, created_at, updated_at, \
             expires_at, last_used_at, last_used_ip, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&p.id)
        .bind(&p.user_id)
        .bind(&p.name)
        .bind(to_json(&p.scopes)?)
        .bind(to_json(&p.audiences)?)
        .bind(&p.hash.as_bytes()[..])
        .bind(&p.start)
        .bind(p.created_at)
        .bind(p.updated_at)
        .bind(p.expires_at)
        .bind(p.last_used_at)
        .bind(&p.last_used_ip)
        .bind(p.revoked_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn list_pats(&self, user_id: &str) -> Result<Vec<PersonalToken>> {
        let rows = sqlx::query("SELECT * FROM personal_tokens WHERE user_id = $1 ORDER BY id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter().map(pat_from_row).collect()
    }

    async fn get_pat(&self, id: &str) -> Result<Option<PersonalToken>> {
        fetch_by_id(&self.pool, "SELECT * FROM personal_tokens WHERE id = $1", id, pat_from_row).await
    }

    async fn find_pat(&self, hash: &SecretHash) -> Result<Option<PersonalToken>> {
        let row = sqlx::query("SELECT * FROM personal_tokens WHERE hash = $1")
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(pat_from_row).transpose()
    }

    async fn rotate_pat(
        &self,
        id: &str,
        hash: &SecretHash,
        start: &str,
        at: i64,
        audit: &NewAudit,
    ) -> Result<Option<PersonalToken>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE personal_tokens SET hash = $1, start = $2, updated_at = $3 WHERE id = $4 AND revoked_at IS NULL \
             RETURNING *",
        )
        .bind(&hash.as_bytes()[..])
        .bind(start)
        .bind(at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let token = pat_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(token))
    }

    async fn revoke_pat(&self, id: &str, at: i64, audit: &NewAudit) -> Result<Option<PersonalToken>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE personal_tokens SET revoked_at = $1, updated_at = $2 WHERE id = $3 AND revoked_at IS NULL RETURNING *",
        )
        .bind(at)
        .bind(at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let token = pat_from_row(&row)?;
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Some(token))
    }

    async fn touch_pats(&self, uses: &[(String, i64, Option<String>)]) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        for (id, at, ip) in uses {
            sqlx::query(
                "UPDATE personal_tokens SET last_used_at = $1, last_used_ip = COALESCE($2, last_used_ip) \
                 WHERE id = $3 AND (last_used_at IS NULL OR last_used_at < $4)",
            )
            .bind(at)
            .bind(ip)
            .bind(id)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn expiring_pats(&self, now: i64, before: i64, limit: u32) -> Result<Vec<PersonalToken>> {
        let rows = sqlx::query(
            "SELECT * FROM personal_tokens WHERE revoked_at IS NULL AND expires_at > $1 AND expires_at <= $2 \
             ORDER BY expires_at LIMIT $3",
        )
        .bind(now)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(pat_from_row).collect()
    }

    async fn insert_device(&self, d: &DeviceAuth) -> Result<()> {
        sqlx::query(
            "INSERT INTO device_codes (hash, user_code, client_id, scopes, audiences, created_at, expires_at, \
             interval_ms, last_polled_at, status, user_id, grant_id, granted_scopes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&d.hash.as_bytes()[..])
        .bind(&d.user_code)
        .bind(&d.client_id)
        .bind(to_json(&d.scopes)?)
        .bind(to_json(&d.audiences)?)
        .bind(d.created_at)
        .bind(d.expires_at)
        .bind(d.interval_ms)
        .bind(d.last_polled_at)
        .bind(&d.status)
        .bind(&d.user_id)
        .bind(&d.grant_id)
        .bind(opt_json(&d.granted_scopes)?)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn find_device(&self, user_code: &str, now: i64) -> Result<Option<DeviceAuth>> {
        let row = sqlx::query(
            "SELECT * FROM device_codes WHERE user_code = $1 AND status = 'pending' AND expires_at > $2",
        )
        .bind(user_code)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn answer_device(
        &self,
        user_code: &str,
        user_id: &str,
        approved: Option<(&str, &[String])>,
        at: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let row = sqlx::query(
            "UPDATE device_codes SET status = $1, user_id = $2 WHERE user_code = $3 AND status = 'pending' \
             AND expires_at > $4 RETURNING client_id",
        )
        .bind(if approved.is_some() { "approved" } else { "denied" })
        .bind(user_id)
        .bind(user_code)
        .bind(at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(false) };
        if let Some((new_grant, scopes)) = approved {
            let client_id: String = row.try_get("client_id").map_err(map_err)?;
            let grant_id = upsert_grant(&mut tx, new_grant, user_id, &client_id, scopes, at).await?;
            sqlx::query("UPDATE device_codes SET grant_id = $1, granted_scopes = $2 WHERE user_code = $3")
                .bind(&grant_id)
                .bind(to_json(&scopes)?)
                .bind(user_code)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn get_device(&self, hash: &SecretHash) -> Result<Option<DeviceAuth>> {
        let row = sqlx::query("SELECT * FROM device_codes WHERE hash = $1")
            .bind(&hash.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn note_poll(&self, hash: &SecretHash, at: i64, slow_down: bool) -> Result<()> {
        sqlx::query(
            "UPDATE device_codes SET last_polled_at = $1, interval_ms = interval_ms + $2 WHERE hash = $3",
        )
        .bind(at)
        .bind(if slow_down { 5000 } else { 0 })
        .bind(&hash.as_bytes()[..])
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn redeem_device(&self, hash: &SecretHash, r: &Redemption) -> Result<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let won =
            sqlx::query("UPDATE device_codes SET status = 'used' WHERE hash = $1 AND status = 'approved'")
                .bind(&hash.as_bytes()[..])
                .execute(&mut *tx)
                .await
                .map_err(map_err)?
                .rows_affected()
                == 1;
        let issued = won && create_family(&mut tx, r).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(issued)
    }

    async fn set_scope_description(
        &self,
        scope: &str,
        description: Option<&str>,
        at: i64,
        audit: &NewAudit,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        match description {
            Some(d) => {
                sqlx::query(
                    "INSERT INTO scope_descriptions (scope, description, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (scope) DO UPDATE SET description = excluded.description, updated_at = excluded.updated_at",
                )
                .bind(scope)
                .bind(d)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
            }
            None => {
                sqlx::query("DELETE FROM scope_descriptions WHERE scope = $1")
                    .bind(scope)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
            }
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn scope_descriptions(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT scope, description FROM scope_descriptions ORDER BY scope")
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|r| Ok((r.try_get("scope").map_err(map_err)?, r.try_get("description").map_err(map_err)?)))
            .collect()
    }
}
