//! The user-delegated grants of the token endpoint: `authorization_code` (with PKCE) and
//! `refresh_token` (rotated on every use).
//!
//! Refresh-token rotation and reuse:
//! - Each use returns a new refresh token and marks the old one used, in one transaction.
//! - Presenting a used refresh token again revokes its whole family (every access and refresh token
//!   descended from the same authorization) — unless it is a retry within the grace period
//!   (`oauth.refresh_grace_seconds`, default 10 s): concurrent presentations of one token on this node
//!   share a single rotation and all get the same successor; a retry within the period that cannot be
//!   given that successor (it reached another node, or came after a restart) is refused without
//!   revoking anything.
//! - A refresh may narrow the scope of the access token it returns, never widen it; the new refresh
//!   token keeps the original scope (RFC 6749 §6).

use std::sync::Arc;

use keygate_core::oauth::pkce_s256_matches;
use keygate_core::{PlainSecret, SecretHash, SecretKind, scope};
use keygate_store::{GrantType, OAuthClient, Redeemed, RefreshRecord, TokenFamily};
use serde_json::{Value, json};

use super::flows::Refreshed;
use super::tokens::{IssueError, Issued, Subject};
use super::{Form, OAuthError, OAuthErrorCode};
use crate::state::AppState;

fn invalid_grant(message: &str) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidGrant, message.to_string())
}

fn issue_error(e: IssueError) -> OAuthError {
    match e {
        IssueError::Store(s) => OAuthError::from(s),
        IssueError::Internal(m) => {
            tracing::error!(error = %m, "issuing a token failed");
            OAuthError::new(OAuthErrorCode::ServerError, "internal error")
        }
    }
}

fn is_kind(s: &str, kind: SecretKind) -> bool {
    keygate_core::credential::parse(s).is_ok_and(|p| p.kind == kind)
}

/// A grant's required form parameter (`invalid_request` when missing).
fn required<'f>(form: &'f Form, name: &str) -> Result<&'f str, OAuthError> {
    form.one(name)?
        .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidRequest, format!("{name} is missing")))
}

fn response(issued: &Issued, refresh: Option<&PlainSecret>) -> Value {
    let mut body = json!({
        "access_token": issued.access_token,
        "token_type": issued.token_type,
        "expires_in": issued.expires_in,
        "scope": issued.scope,
    });
    if let Some(r) = refresh {
        body["refresh_token"] = Value::String(r.expose().to_string());
    }
    body
}

/// A new refresh token and its record, within `family`.
fn new_refresh(
    client: &OAuthClient,
    family: &TokenFamily,
    scopes: &[String],
    audiences: &[String],
    now: i64,
) -> Result<(PlainSecret, RefreshRecord), OAuthError> {
    let secret = PlainSecret::generate(SecretKind::RefreshToken)
        .map_err(|e| issue_error(IssueError::Internal(e.to_string())))?;
    let idle_end = now.saturating_add(client.refresh_idle_seconds.saturating_mul(1000));
    let record = RefreshRecord {
        hash: secret.hash(),
        family_id: family.id.clone(),
        scopes: scopes.to_vec(),
        audiences: audiences.to_vec(),
        issued_at: now,
        idle_expires_at: idle_end.min(family.expires_at),
        used_at: None,
    };
    Ok((secret, record))
}

/// The granted scopes the client and the user may still have.
fn still_allowed(granted: &[String], client: &OAuthClient, user: &super::tokens::UserState) -> Vec<String> {
    super::authorize::within_user_limit(granted, user.allowed_scopes.as_deref())
        .into_iter()
        .filter(|s| client.scopes.iter().any(|a| scope::covers(a, s)))
        .collect()
}

/// A new token family (one authorization) with its first tokens, not yet stored.
struct FirstTokens {
    family: TokenFamily,
    issued: Issued,
    access: Option<keygate_store::AccessTokenRecord>,
    refresh: Option<(PlainSecret, RefreshRecord)>,
}

#[allow(clippy::too_many_arguments)]
fn first_tokens(
    state: &AppState,
    client: &OAuthClient,
    form: &Form,
    grant_id: &str,
    user_id: &str,
    scopes: &[String],
    audiences: &[String],
    now: i64,
) -> Result<FirstTokens, OAuthError> {
    let family = TokenFamily {
        id: crate::routes::common::new_id("fam", now)
            .map_err(|_| issue_error(IssueError::Internal("random source failed".into())))?,
        grant_id: grant_id.to_string(),
        client_id: client.id.clone(),
        user_id: user_id.to_string(),
        created_at: now,
        expires_at: now.saturating_add(client.refresh_absolute_seconds.saturating_mul(1000)),
        revoked_at: None,
        jkt: form.dpop_jkt().map(str::to_owned),
    };
    let subject = Subject::User { user_id, family_id: &family.id };
    let (issued, access) =
        state.oauth.mint(client, subject, scopes, audiences, form.dpop_jkt(), now).map_err(issue_error)?;
    let refresh = if client.grant_types.contains(&GrantType::RefreshToken) {
        Some(new_refresh(client, &family, scopes, audiences, now)?)
    } else {
        None
    };
    Ok(FirstTokens { family, issued, access, refresh })
}

impl FirstTokens {
    /// What the store writes in one transaction when the code (or device code) is redeemed.
    fn redemption(&self, hash: SecretHash, now: i64) -> keygate_store::Redemption {
        keygate_store::Redemption {
            hash,
            at: now,
            family: self.family.clone(),
            refresh: self.refresh.as_ref().map(|(_, r)| r.clone()),
            access: self.access.clone(),
        }
    }

    /// Stored: remember an opaque token, count the grant, answer.
    fn issued(self, state: &AppState, client: &OAuthClient) -> Value {
        if let Some(a) = self.access {
            state.oauth.opaque_issued(a);
        }
        state.metrics.record_grant(client.token_format.as_str());
        response(&self.issued, self.refresh.as_ref().map(|(s, _)| s))
    }
}

/// `grant_type=authorization_code`.
pub(crate) async fn authorization_code(
    state: &AppState,
    client: &OAuthClient,
    form: &Form,
    now: i64,
) -> Result<Value, OAuthError> {
    let code = required(form, "code")?;
    let invalid = || {
        invalid_grant(
            "the code is not valid: unknown, expired, already used, or issued to another client or redirect URI",
        )
    };
    if !is_kind(code, SecretKind::AuthCode) {
        return Err(invalid());
    }
    let hash = SecretHash::of(code);
    let store = state.store.as_ref();
    let Some(record) = store.get_code(&hash).await? else { return Err(invalid()) };
    if record.used_at.is_some() {
        // RFC 6749 §4.1.2: a code used twice revokes what was issued from it.
        let audit = match &record.family_id {
            Some(family) => Some(super::tokens::token_audit(
                now,
                "system",
                "token_family",
                family,
                serde_json::json!({"client_id": client.id, "reason": "authorization code used twice"}),
            )?),
            None => None,
        };
        if let Some(family) = &record.family_id
            && store.revoke_family(family, now, audit.as_ref()).await?
        {
            tracing::warn!(client = %client.id, family = %family, "an authorization code was used twice; its tokens are revoked");
        }
        if let Some(family) = record.family_id {
            state.oauth.families_revoked(&[(family, now + client.refresh_absolute_seconds * 1000)]);
        }
        return Err(invalid());
    }
    // Anything wrong with the binding burns the code: a stolen code gets one try.
    let redirect_ok = match form.one("redirect_uri")? {
        Some(r) => r == record.redirect_uri,
        None => client.redirect_uris.len() == 1 && client.redirect_uris[0] == record.redirect_uri,
    };
    if record.client_id != client.id || !redirect_ok {
        store.burn_code(&hash, now).await?;
        return Err(invalid());
    }
    let Some(verifier) = form.one("code_verifier")? else {
        store.burn_code(&hash, now).await?;
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidRequest,
            "code_verifier is missing (PKCE is required)",
        ));
    };
    if !pkce_s256_matches(verifier, &record.code_challenge) {
        store.burn_code(&hash, now).await?;
        return Err(invalid_grant(
            "PKCE verification failed: the code_verifier does not match the code_challenge",
        ));
    }
    if record.expires_at <= now || client.tokens_revoked_before.is_some_and(|t| record.created_at < t) {
        return Err(invalid());
    }
    let user = match state.oauth.user(store, &record.user_id).await? {
        Some(u) if !u.disabled => u,
        _ => return Err(invalid_grant("the user may not sign in")),
    };
    // What the client and the user may have now (either may have changed in the last minute).
    let scopes = still_allowed(&record.scopes, client, &user);
    if scopes.is_empty() && !record.scopes.is_empty() {
        return Err(invalid_grant("none of the granted scopes may be issued any more"));
    }
    let first = first_tokens(
        state,
        client,
        form,
        &record.grant_id,
        &record.user_id,
        &scopes,
        &record.audiences,
        now,
    )?;
    let outcome = state.oauth.redeem_code(store, first.redemption(hash, now)).await?;
    match outcome {
        Redeemed::Issued => Ok(first.issued(state, client)),
        Redeemed::Replayed { family_id } => {
            if let Some(f) = family_id {
                state.oauth.families_revoked(&[(f.clone(), first.family.expires_at)]);
                // Recorded (after the revocation committed) so that other nodes sharing the database
                // forget the family's tokens too.
                let details = serde_json::json!({"reason": "authorization code replayed"});
                match crate::oauth::tokens::token_audit(now, "system", "token_family", &f, details) {
                    Ok(audit) => {
                        if let Err(e) = state.store.record_audit(&audit).await {
                            tracing::warn!(error = %e, "could not record the revocation of a replayed code's tokens");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record the revocation of a replayed code's tokens")
                    }
                }
            }
            Err(invalid())
        }
        Redeemed::Unknown => Err(invalid()),
    }
}

/// `grant_type=refresh_token`: concurrent presentations of one token share one rotation.
pub(crate) async fn refresh_token(
    state: &AppState,
    client: &OAuthClient,
    form: &Form,
    now: i64,
) -> Result<Value, OAuthError> {
    let token = required(form, "refresh_token")?;
    if !is_kind(token, SecretKind::RefreshToken) {
        return Err(invalid_grant("the refresh token is not valid"));
    }
    let hash = SecretHash::of(token);
    let scope = form.one("scope")?.map(str::to_owned);
    let cell = state.oauth.flows.refreshing.get_with(hash, || Arc::new(tokio::sync::OnceCell::new()));
    let grace = i64::try_from(state.config.refresh_grace.as_millis()).unwrap_or(i64::MAX);
    if cell.get().is_some_and(|done| now.saturating_sub(done.at) > grace) {
        // Past the grace period: a presentation of the used token is reuse (rotate() decides).
        return rotate(state, client, hash, scope.clone(), form.dpop_jkt(), now).await.map(|r| r.response);
    }
    let out =
        cell.get_or_try_init(|| rotate(state, client, hash, scope.clone(), form.dpop_jkt(), now)).await?;
    if out.client_id != client.id {
        return Err(invalid_grant("the refresh token is not valid"));
    }
    // A retry sharing the rotation proves the same key the rotation did.
    if out.jkt.is_some() && out.jkt.as_deref() != form.dpop_jkt() {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidDpopProof,
            "the refresh token is DPoP-bound: send a proof of its key",
        ));
    }
    Ok(out.response.clone())
}

async fn rotate(
    state: &AppState,
    client: &OAuthClient,
    hash: SecretHash,
    scope_param: Option<String>,
    jkt: Option<&str>,
    now: i64,
) -> Result<Refreshed, OAuthError> {
    let store = state.store.as_ref();
    let Some((record, family)) = store.find_refresh(&hash).await? else {
        return Err(invalid_grant("the refresh token is not valid"));
    };
    if family.client_id != client.id {
        return Err(invalid_grant("the refresh token is not valid"));
    }
    // RFC 9449 §5: refresh tokens issued with a DPoP proof are refreshed only with a proof of that key.
    if family.jkt.is_some() && family.jkt.as_deref() != jkt {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidDpopProof,
            "the refresh token is DPoP-bound: send a proof of its key",
        ));
    }
    if family.revoked_at.is_some() || state.oauth.family_revoked(&family.id) {
        return Err(invalid_grant("the refresh token was revoked"));
    }
    if let Some(used) = record.used_at {
        let grace = i64::try_from(state.config.refresh_grace.as_millis()).unwrap_or(i64::MAX);
        if now.saturating_sub(used) <= grace {
            return Err(invalid_grant(
                "the refresh token was just used; use the refresh token that use returned",
            ));
        }
        let audit = super::tokens::token_audit(
            now,
            "system",
            "token_family",
            &family.id,
            serde_json::json!({"client_id": client.id, "user_id": family.user_id, "reason": "refresh token reused"}),
        )?;
        if store.revoke_family(&family.id, now, Some(&audit)).await? {
            tracing::warn!(client = %client.id, family = %family.id, "a refresh token was used twice; its family is revoked");
        }
        state.oauth.families_revoked(&[(family.id.clone(), family.expires_at)]);
        return Err(invalid_grant(
            "the refresh token was already used; every token of this authorization is now revoked",
        ));
    }
    if record.idle_expires_at <= now || family.expires_at <= now {
        return Err(invalid_grant("the refresh token has expired"));
    }
    let user = match state.oauth.user(store, &family.user_id).await? {
        Some(u) if !u.disabled => u,
        _ => return Err(invalid_grant("the user may not sign in")),
    };
    // What may still be granted: the original scope, within what the client and the user may have now.
    let still = still_allowed(&record.scopes, client, &user);
    if still.is_empty() && !record.scopes.is_empty() {
        return Err(invalid_grant("none of the granted scopes may be issued any more"));
    }
    let scopes = match scope_param.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => still,
        Some(requested) => {
            let mut out = Vec::new();
            for s in requested.split(' ').filter(|s| !s.is_empty()) {
                if !record.scopes.iter().any(|r| r == s) {
                    return Err(OAuthError::new(
                        OAuthErrorCode::InvalidScope,
                        format!("a refresh may narrow the scope, not widen it: {s:?} was not granted"),
                    ));
                }
                if still.iter().any(|x| x == s) && !out.iter().any(|x: &String| x == s) {
                    out.push(s.to_string());
                }
            }
            out
        }
    };
    let subject = Subject::User { user_id: &family.user_id, family_id: &family.id };
    let (issued, access) =
        state.oauth.mint(client, subject, &scopes, &record.audiences, jkt, now).map_err(issue_error)?;
    let (secret, successor) = new_refresh(client, &family, &record.scopes, &record.audiences, now)?;
    let rotation = keygate_store::Rotation { old: hash, at: now, successor, access: access.clone() };
    if !state.oauth.rotate_refresh(store, rotation).await? {
        // Another rotation of this token won (on another node): not reuse, but nothing to hand out.
        return Err(invalid_grant(
            "the refresh token was just used; use the refresh token that use returned",
        ));
    }
    if let Some(a) = access {
        state.oauth.opaque_issued(a);
    }
    state.metrics.record_grant(client.token_format.as_str());
    Ok(Refreshed {
        client_id: client.id.clone(),
        response: response(&issued, Some(&secret)),
        at: now,
        jkt: family.jkt,
    })
}

/// `grant_type=urn:ietf:params:oauth:grant-type:device_code` (RFC 8628 §3.4–3.5): the device polls.
pub(crate) async fn device_code(
    state: &AppState,
    client: &OAuthClient,
    form: &Form,
    now: i64,
) -> Result<Value, OAuthError> {
    let code = required(form, "device_code")?;
    if !is_kind(code, SecretKind::DeviceCode) {
        return Err(invalid_grant("the device code is not valid"));
    }
    let hash = SecretHash::of(code);
    let store = state.store.as_ref();
    let Some(device) = store.get_device(&hash).await? else {
        return Err(invalid_grant("the device code is not valid"));
    };
    if device.client_id != client.id {
        return Err(invalid_grant("the device code is not valid"));
    }
    if device.expires_at <= now {
        return Err(OAuthError::new(
            OAuthErrorCode::ExpiredToken,
            "the device code has expired; start again",
        ));
    }
    if client.tokens_revoked_before.is_some_and(|t| device.created_at < t) {
        return Err(invalid_grant("the device code was revoked with the client's tokens; start again"));
    }
    match device.status.as_str() {
        "pending" => {
            let too_soon = device.last_polled_at.is_some_and(|last| now - last < device.interval_ms);
            store.note_poll(&hash, now, too_soon).await?;
            return Err(if too_soon {
                OAuthError::new(
                    OAuthErrorCode::PollSlowDown,
                    "polling too fast: wait 5 seconds more between polls",
                )
            } else {
                OAuthError::new(OAuthErrorCode::AuthorizationPending, "the user has not answered yet")
            });
        }
        "denied" => return Err(OAuthError::new(OAuthErrorCode::AccessDenied, "the user denied the device")),
        "approved" => {}
        _ => return Err(invalid_grant("the device code was already used")),
    }
    let (Some(user_id), Some(grant_id), Some(granted)) =
        (&device.user_id, &device.grant_id, &device.granted_scopes)
    else {
        return Err(invalid_grant("the device code is not valid"));
    };
    let user = match state.oauth.user(store, user_id).await? {
        Some(u) if !u.disabled => u,
        _ => return Err(invalid_grant("the user may not sign in")),
    };
    let scopes = still_allowed(granted, client, &user);
    if scopes.is_empty() && !granted.is_empty() {
        return Err(invalid_grant("none of the granted scopes may be issued any more"));
    }
    let first = first_tokens(state, client, form, grant_id, user_id, &scopes, &device.audiences, now)?;
    if !store.redeem_device(&hash, &first.redemption(hash, now)).await? {
        return Err(invalid_grant("the device code was already used"));
    }
    Ok(first.issued(state, client))
}
