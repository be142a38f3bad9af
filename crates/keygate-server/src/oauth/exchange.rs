//! Token exchange (RFC 8693): a client allowed the grant trades a credential it holds — an API key or
//! an access token (JWT, `kgat_`, or a personal access token) — for a short-lived access token with
//! narrower scopes and a chosen audience. This is how a backend turns a long-lived key into a
//! least-privilege token for a downstream service.
//!
//! Rules:
//! - The subject must verify now, and (except personal access tokens, which belong to a user) belong
//!   to the exchanging client's consumer: a client cannot mint tokens for another tenant's credentials.
//! - Scopes: requested ⊆ the subject's ∩ what the client may have (default: all of that); audience: one
//!   of the client's audiences (`resource` or `audience`).
//! - The new token never outlives the subject, records `act` (the exchanging client) and its source;
//!   every verification checks the source again, so revoking, disabling or expiring the subject (or its
//!   user, client or consumer) stops the exchanged token at once.
//! - An exchanged token cannot be exchanged again (one hop keeps the revocation chain checkable).

use keygate_core::{SecretHash, SecretKind, scope};
use keygate_store::{OAuthClient, StoreError};
use serde_json::{Value, json};
use std::sync::Arc;

use super::tokens::{Source, Subject, TokenInfo, TokenKind, looks_like_jwt};
use super::{Form, OAuthError, OAuthErrorCode};
use crate::state::AppState;
use crate::verify::Context;
use keygate_core::DecisionCode;
use keygate_store::TokenFormat;

pub const TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Keygate's own type for API keys (RFC 8693 lets issuers define types); API keys are also accepted as
/// `access_token` type, since they are bearer credentials.
pub const TYPE_API_KEY: &str = "urn:keygate:params:oauth:token-type:api_key";

fn invalid_request(m: &str) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidRequest, m.to_string())
}

/// Verifies an access token and, if it was exchanged, its source: the one entry point for every
/// place that accepts tokens (`/v1/verify`, `/v1/auth`, introspection, exchange itself).
pub async fn verify_token(
    state: &AppState,
    token: &str,
    audience: Option<&str>,
    now: i64,
) -> Result<Result<Arc<TokenInfo>, DecisionCode>, StoreError> {
    let info = match state.oauth.verify(state.store.as_ref(), token, audience, now).await? {
        Ok(info) => info,
        Err(code) => return Ok(Err(code)),
    };
    if let Some(source) = &info.source
        && !source_alive(state, source, now).await?
    {
        return Ok(Err(DecisionCode::Revoked));
    }
    Ok(Ok(info))
}

async fn source_alive(state: &AppState, source: &Source, now: i64) -> Result<bool, StoreError> {
    if let Source::ApiKey { h } = source {
        let Some(hash) = SecretHash::from_hex(h) else { return Ok(false) };
        return Ok(state
            .verifier
            .key_by_hash(&hash)
            .await?
            .is_some_and(|k| !k.revoked && !k.disabled && k.expires_at.is_none_or(|e| e > now)));
    }
    state.oauth.source_alive(state.store.as_ref(), source, now).await
}

/// What the subject token says, once verified.
struct Subj {
    sub: String,
    /// Audiences the subject is limited to (personal access tokens); empty: none.
    audiences: Vec<String>,
    consumer_id: Option<String>,
    family_id: Option<String>,
    scopes: Vec<String>,
    expires_at: i64,
    source: Source,
}

/// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`.
pub(crate) async fn token_exchange(
    state: &AppState,
    client: &OAuthClient,
    form: &Form,
    ip: Option<std::net::IpAddr>,
    now: i64,
) -> Result<Value, OAuthError> {
    let subject = form.one("subject_token")?.ok_or_else(|| invalid_request("subject_token is missing"))?;
    let kind =
        form.one("subject_token_type")?.ok_or_else(|| invalid_request("subject_token_type is missing"))?;
    if form.one("actor_token")?.is_some() {
        return Err(invalid_request("actor_token is not supported"));
    }
    if let Some(t) = form.one("requested_token_type")?
        && t != TYPE_ACCESS_TOKEN
    {
        return Err(invalid_request(
            "requested_token_type must be urn:ietf:params:oauth:token-type:access_token",
        ));
    }
    let bad_subject = || OAuthError::new(OAuthErrorCode::InvalidGrant, "the subject_token is not valid");
    let is_token = looks_like_jwt(subject)
        || subject.starts_with(SecretKind::AccessToken.prefix())
        || subject.starts_with(SecretKind::PersonalToken.prefix());
    let subj = match kind {
        TYPE_ACCESS_TOKEN if is_token => {
            let info = verify_token(state, subject, None, now).await?.map_err(|_| bad_subject())?;
            if info.source.is_some() {
                return Err(OAuthError::new(
                    OAuthErrorCode::InvalidGrant,
                    "an exchanged token cannot be exchanged again",
                ));
            }
            // A DPoP-bound subject is exchanged only with a proof of its key (else exchange would strip
            // the binding).
            if let Some(jkt) = &info.jkt
                && form.dpop_jkt() != Some(jkt.as_str())
            {
                return Err(OAuthError::new(
                    OAuthErrorCode::InvalidDpopProof,
                    "the subject_token is DPoP-bound: send a DPoP proof of its key",
                ));
            }
            let hex = SecretHash::of(subject).to_hex();
            let source = match (info.kind, info.format) {
                (TokenKind::Personal, _) => Source::PersonalToken { h: hex },
                (TokenKind::Access, TokenFormat::Opaque) => Source::OpaqueToken { h: hex },
                (TokenKind::Access, TokenFormat::Jwt) => Source::Jwt {
                    jti: info.jti.clone(),
                    client_id: info.client_id.clone(),
                    iat: info.issued_at,
                },
            };
            Subj {
                sub: info.subject.clone(),
                audiences: if info.kind == TokenKind::Personal { info.audiences.clone() } else { Vec::new() },
                consumer_id: (!info.consumer_id.is_empty()).then(|| info.consumer_id.clone()),
                family_id: info.family_id.clone(),
                scopes: info.scopes.clone(),
                expires_at: info.expires_at,
                source,
            }
        }
        TYPE_ACCESS_TOKEN | TYPE_API_KEY => {
            let d =
                state.verifier.verify(subject, &[] as &[&str], Context { ip, cost: 0, now_ms: now }).await?;
            let key = match (d.code, d.key) {
                (DecisionCode::Valid, Some(k)) => k,
                _ => return Err(bad_subject()),
            };
            // What an exchanged token cannot carry: the key's address list and quota.
            if key.allowed_ips.is_some() || key.has_quota {
                return Err(OAuthError::new(
                    OAuthErrorCode::InvalidGrant,
                    "a key with an IP allow-list or a quota cannot be exchanged (the new token could not keep them)",
                ));
            }
            Subj {
                sub: key.key_id.clone(),
                audiences: Vec::new(),
                consumer_id: Some(key.consumer_id.clone()),
                family_id: None,
                scopes: key.scopes.clone(),
                expires_at: key.expires_at.unwrap_or(i64::MAX),
                source: Source::ApiKey { h: SecretHash::of(subject).to_hex() },
            }
        }
        _ => {
            return Err(invalid_request(
                "subject_token_type must be urn:ietf:params:oauth:token-type:access_token or urn:keygate:params:oauth:token-type:api_key",
            ));
        }
    };
    if subj.consumer_id.as_ref().is_some_and(|c| *c != client.consumer_id) {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidGrant,
            "the subject_token belongs to another consumer than the exchanging client",
        ));
    }
    // Scopes: within the subject's and the client's.
    let allowed: Vec<String> =
        subj.scopes.iter().filter(|s| client.scopes.iter().any(|a| scope::covers(a, s))).cloned().collect();
    let scopes = match form.one("scope")?.map(str::trim).filter(|s| !s.is_empty()) {
        None => allowed,
        Some(requested) => {
            let mut out: Vec<String> = Vec::new();
            for s in requested.split(' ').filter(|s| !s.is_empty()) {
                if !allowed.iter().any(|a| scope::covers(a, s)) {
                    return Err(OAuthError::new(
                        OAuthErrorCode::InvalidScope,
                        "a requested scope is beyond the subject's or the client's",
                    ));
                }
                if !out.iter().any(|o| o == s) {
                    out.push(s.to_string());
                }
            }
            out
        }
    };
    if scopes.is_empty() {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidScope,
            "no scope of the subject may be exchanged by this client",
        ));
    }
    let mut wanted: Vec<String> = form.all("resource").to_vec();
    wanted.extend(form.all("audience").iter().cloned());
    if wanted.iter().any(|r| !client.audiences.iter().any(|a| a == r)) {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidTarget,
            "the client may not ask for one of the audiences",
        ));
    }
    let audiences = if wanted.is_empty() {
        if !subj.audiences.is_empty() {
            subj.audiences.clone()
        } else if client.audiences.is_empty() {
            vec![state.oauth.issuer()]
        } else {
            client.audiences.clone()
        }
    } else {
        wanted
    };
    if !subj.audiences.is_empty() && audiences.iter().any(|a| !subj.audiences.contains(a)) {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidTarget,
            "the subject_token is limited to other audiences",
        ));
    }
    if subj.expires_at <= now + 1000 {
        return Err(OAuthError::new(OAuthErrorCode::InvalidGrant, "the subject_token is about to expire"));
    }
    let subject = Subject::Exchanged {
        sub: &subj.sub,
        family_id: subj.family_id.as_deref(),
        source: &subj.source,
        not_after: subj.expires_at,
    };
    let (issued, record) = state
        .oauth
        .mint(client, subject, &scopes, &audiences, form.dpop_jkt(), now)
        .map_err(|e| match e {
            super::tokens::IssueError::Store(s) => OAuthError::from(s),
            super::tokens::IssueError::Internal(m) => {
                tracing::error!(error = %m, "issuing an exchanged token failed");
                OAuthError::new(OAuthErrorCode::ServerError, "internal error")
            }
        })?;
    if let Some(record) = record {
        state.oauth.store_opaque(state.store.as_ref(), record).await?;
    }
    state.metrics.record_grant(client.token_format.as_str());
    Ok(json!({
        "access_token": issued.access_token,
        "issued_token_type": TYPE_ACCESS_TOKEN,
        "token_type": issued.token_type,
        "expires_in": issued.expires_in,
        "scope": issued.scope,
    }))
}
