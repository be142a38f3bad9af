//! The leaked-secret receiver: secret-scanning partners (GitHub's partner program and any scanner that
//! speaks its format) report Keygate secrets they found in public; each reported credential is found by
//! its hash and, by its consumer's policy, revoked at once. Reports are signed (ECDSA P-256 over the raw
//! body) with keys the operator configures: Keygate has no network to fetch them.

use std::path::Path as FsPath;
use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use keygate_core::{SecretHash, SecretKind, credential};
use keygate_store::{KeyPatch, LeakPolicy, LeakReport, NewAudit};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::{Actor, AdminCaller};
use crate::error::{ApiError, ApiQuery, ApiResult, ErrorBody, ErrorCode};
use crate::peer::client_of;
use crate::routes::common::*;
use crate::state::AppState;
use crate::time::rfc3339;

/// Largest report body: GitHub batches matches.
const MAX_REPORT_BYTES: usize = 1024 * 1024;
const MAX_ITEMS: usize = 1000;
/// The headers GitHub signs reports with.
const KEY_ID_HEADER: &str = "github-public-key-identifier";
const SIGNATURE_HEADER: &str = "github-public-key-signature";
/// The actor of changes made because of a report.
const ACTOR: &str = "secret-scanning";

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(receive_leaks)).layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
}

pub fn admin_router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(list_leaks))
}

/// A partner's public key, by its identifier.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub key_id: String,
    pub key: VerifyingKey,
}

#[derive(Deserialize)]
struct KeysFile {
    public_keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
struct KeyEntry {
    key_identifier: String,
    key: String,
}

/// Reads reporters' keys from a file in GitHub's form: `{"public_keys": [{"key_identifier", "key"}]}`
/// (the answer of `https://api.github.com/meta/public_keys/secret_scanning`, saved by the operator).
pub fn load_reporters(path: &FsPath) -> Result<Vec<Reporter>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: KeysFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: expected {{\"public_keys\": [{{\"key_identifier\": …, \"key\": PEM}}]}}: {e}",
            path.display()
        )
    })?;
    if file.public_keys.is_empty() {
        return Err(format!("{}: no public keys", path.display()));
    }
    file.public_keys
        .into_iter()
        .map(|k| {
            let key = VerifyingKey::from_public_key_pem(k.key.trim()).map_err(|e| {
                format!(
                    "{}: key {:?} is not a P-256 public key in PEM: {e}",
                    path.display(),
                    k.key_identifier
                )
            })?;
            Ok(Reporter { key_id: k.key_identifier, key })
        })
        .collect()
}

/// One match in a report.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ReportedToken {
    /// The secret found.
    pub token: String,
    /// The partner's name for the pattern that matched.
    #[serde(rename = "type")]
    pub token_type: String,
    /// Where it was found (may be empty).
    #[serde(default)]
    pub url: Option<String>,
    /// What kind of place it was found in (`content`, `commit`, `npm`, …).
    #[serde(default)]
    pub source: Option<String>,
}

/// Keygate's answer for one match: the partner program's feedback form.
#[derive(Debug, Serialize, ToSchema)]
pub struct Classification {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    pub token_type: String,
    /// `true_positive`: a credential Keygate issued; `false_positive`: anything else.
    pub label: &'static str,
}

fn unauthorized(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
    msg: &str,
) -> ApiError {
    let client = client_of(peer, headers, &state.config.trusted_proxies);
    state.throttle.record_failure(client.accountable, state.now());
    ApiError::new(ErrorCode::Unauthorized, msg)
}

/// Receive a report of exposed secrets (GitHub secret-scanning partner format), signed by a configured
/// partner key. Each Keygate credential in it is revoked at once (or only reported, by its consumer's
/// `leak_policy`) and `credential.leaked` is sent; the answer classifies every token.
#[utoipa::path(post, path = "/v1/leaks", tag = "leaks", request_body = Vec<ReportedToken>,
    params(("Github-Public-Key-Identifier" = String, Header), ("Github-Public-Key-Signature" = String, Header)),
    responses((status = 200, body = Vec<Classification>), (status = "4XX", body = ErrorBody)))]
pub async fn receive_leaks(
    State(state): State<Arc<AppState>>,
    parts: axum::http::request::Parts,
    crate::error::ApiBytes(body): crate::error::ApiBytes,
) -> ApiResult<Json<Vec<Classification>>> {
    let peer = crate::auth::peer_ip(&parts);
    let headers = &parts.headers;
    let Some(reporters) = state.webhooks.reporters() else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "leak reports are not enabled here; the operator sets leaks.reporter_keys_file",
        ));
    };
    let client = client_of(peer, headers, &state.config.trusted_proxies);
    if let Some(retry) = state.throttle.blocked(client.accountable, state.now()) {
        return Err(ApiError::throttled(retry));
    }
    let key_id = headers.get(KEY_ID_HEADER).and_then(|v| v.to_str().ok());
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
    let (Some(key_id), Some(signature)) = (key_id, signature) else {
        return Err(unauthorized(
            &state,
            headers,
            peer,
            "the report must be signed (Github-Public-Key-Identifier and Github-Public-Key-Signature)",
        ));
    };
    let Some(reporter) = reporters.iter().find(|r| r.key_id == key_id) else {
        return Err(unauthorized(
            &state,
            headers,
            peer,
            "the report is signed with a key this server does not know",
        ));
    };
    let signature = B64.decode(signature.trim()).ok().and_then(|der| Signature::from_der(&der).ok());
    if signature.is_none_or(|s| reporter.key.verify(&body, &s).is_err()) {
        return Err(unauthorized(&state, headers, peer, "the report's signature does not verify"));
    }
    // A fixed message: serde's would quote the offending value, which may be a secret.
    let items: Vec<ReportedToken> = serde_json::from_slice(&body).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            "expected a JSON array of {\"token\", \"type\", \"url\", \"source\"}",
        )
    })?;
    if items.len() > MAX_ITEMS {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("at most {MAX_ITEMS} tokens per report"),
        ));
    }
    let mut answer = Vec::with_capacity(items.len());
    for item in &items {
        answer.push(handle(&state, &reporter.key_id, item).await?);
    }
    Ok(Json(answer))
}

/// What a reported token is, if Keygate issued it: (credential type, id, consumer id, policy).
struct Found {
    kind: &'static str,
    id: String,
    consumer_id: Option<String>,
    policy: LeakPolicy,
    /// Already revoked, disabled or expired: nothing to do.
    dead: bool,
}

/// The consumer that owns a client, and its leak policy (the default when either is gone).
async fn client_owner(state: &AppState, client_id: &str) -> ApiResult<(Option<String>, LeakPolicy)> {
    let Some(client) = state.store.get_client(client_id).await? else {
        return Ok((None, LeakPolicy::default()));
    };
    let policy =
        state.store.get_consumer(&client.consumer_id).await?.map(|c| c.leak_policy).unwrap_or_default();
    Ok((Some(client.consumer_id), policy))
}

async fn find(state: &AppState, token: &str) -> ApiResult<Option<Found>> {
    let Ok(parsed) = credential::parse(token) else { return Ok(None) };
    let hash = SecretHash::of(token);
    let now = state.now();
    let policy_of =
        |consumer: Option<keygate_store::Consumer>| consumer.map(|c| c.leak_policy).unwrap_or_default();
    Ok(match parsed.kind {
        SecretKind::ApiKey(_) => match state.store.find_secret(&hash).await? {
            None => None,
            Some(r) => {
                let consumer = state.store.get_consumer(&r.key.consumer_id).await?;
                Some(Found {
                    kind: "key",
                    dead: r.key.revoked_at.is_some() || r.secret_expires_at.is_some_and(|t| t <= now),
                    id: r.key.id,
                    consumer_id: Some(r.key.consumer_id),
                    policy: policy_of(consumer),
                })
            }
        },
        SecretKind::ClientSecret => match state.store.find_client_secret(&hash).await? {
            None => None,
            Some((c, expires)) => {
                let consumer = state.store.get_consumer(&c.consumer_id).await?;
                Some(Found {
                    kind: "client",
                    dead: c.disabled || expires.is_some_and(|t| t <= now),
                    id: c.id,
                    consumer_id: Some(c.consumer_id),
                    policy: policy_of(consumer),
                })
            }
        },
        SecretKind::AccessToken => match state.store.find_access_token(&hash).await? {
            None => None,
            Some(t) => {
                let (consumer_id, policy) = client_owner(state, &t.client_id).await?;
                Some(Found {
                    kind: "access_token",
                    dead: t.revoked_at.is_some() || t.expires_at <= now,
                    id: t.jti,
                    consumer_id,
                    policy,
                })
            }
        },
        SecretKind::RefreshToken => match state.store.find_refresh(&hash).await? {
            None => None,
            Some((_, family)) => {
                let (consumer_id, policy) = client_owner(state, &family.client_id).await?;
                Some(Found {
                    kind: "refresh_token",
                    dead: family.revoked_at.is_some() || family.expires_at <= now,
                    id: family.id,
                    consumer_id,
                    policy,
                })
            }
        },
        // A user's own token: users have no consumer, so no policy but the default.
        SecretKind::PersonalToken => state.store.find_pat(&hash).await?.map(|p| Found {
            kind: "personal_token",
            dead: p.revoked_at.is_some() || p.expires_at.is_some_and(|t| t <= now),
            id: p.id,
            consumer_id: None,
            policy: LeakPolicy::Revoke,
        }),
        // Codes live minutes and are single-use: a found one is spent or about to expire.
        SecretKind::AuthCode | SecretKind::DeviceCode => None,
    })
}

/// Revokes what `found` names (the revocation writes its own audit record and event).
async fn revoke(state: &AppState, found: &Found, token: &str, why: serde_json::Value) -> ApiResult<()> {
    let actor = Actor { key_id: ACTOR.into(), ip: None };
    let now = state.now();
    match found.kind {
        "key" => {
            let patch = KeyPatch { revoked_at: Some(now), updated_at: now, ..KeyPatch::default() };
            let _view =
                crate::routes::keys::patch_key(state, &actor, &found.id, patch, "key.revoke", why).await?;
        }
        "client" => {
            // The leaked secret can mint tokens: the client stops until an admin rotates its secret
            // and enables it again.
            let patch =
                keygate_store::ClientPatch { disabled: Some(true), updated_at: now, ..Default::default() };
            let _view =
                crate::routes::clients::patch_client(state, &actor, &found.id, patch, "client.disable", why)
                    .await?;
        }
        _ => {
            state.oauth.revoke(state.store.as_ref(), token, None, now, ACTOR, "leaked").await?;
        }
    }
    Ok(())
}

/// What one report item was, as it is kept: the report's metadata, and for a Keygate credential its
/// hash and what was done.
struct Seen<'a> {
    reporter: &'a str,
    token_hash: String,
    token_type: String,
    url: Option<String>,
    source: Option<String>,
}

impl Seen<'_> {
    /// The one constructor of a kept report. `found`: the credential and the action taken, for a
    /// true positive (only then is the token's hash kept).
    fn report(&self, now: i64, found: Option<(&Found, &str)>) -> ApiResult<LeakReport> {
        Ok(LeakReport {
            id: new_id("leak", now)?,
            at: now,
            reporter: self.reporter.into(),
            token_hash: if found.is_some() { self.token_hash.clone() } else { String::new() },
            token_type: self.token_type.clone(),
            url: self.url.clone(),
            source: self.source.clone(),
            label: if found.is_some() { "true_positive" } else { "false_positive" }.into(),
            credential: found.map(|(f, _)| (f.kind.to_string(), f.id.clone())),
            action: found.map_or("none", |(_, a)| a).into(),
        })
    }

    fn answer(self, label: &'static str) -> Classification {
        Classification { token_hash: self.token_hash, token_type: self.token_type, label }
    }
}

async fn handle(state: &AppState, reporter: &str, item: &ReportedToken) -> ApiResult<Classification> {
    let seen = Seen {
        reporter,
        token_hash: SecretHash::of(&item.token).to_hex(),
        token_type: item.token_type.chars().take(100).collect(),
        url: item.url.as_ref().filter(|u| !u.is_empty()).map(|u| u.chars().take(2000).collect()),
        source: item.source.as_ref().map(|s| s.chars().take(100).collect()),
    };
    let now = state.now();
    let found = if item.token.len() <= 1000 { find(state, &item.token).await? } else { None };
    let Some(found) = found else {
        // Not ours: only the report's metadata is kept, not even the token's hash.
        state.store.insert_leak_report(&seen.report(now, None)?, None).await?;
        return Ok(seen.answer("false_positive"));
    };
    // A partner's retry or a replayed report (the same token found at the same place): recorded, but
    // acted on and reported once.
    if state.store.leak_reported(&seen.token_hash, seen.url.as_deref()).await? {
        state.store.insert_leak_report(&seen.report(now, Some((&found, "none")))?, None).await?;
        return Ok(seen.answer("true_positive"));
    }
    let why = json!({"reason": "leaked", "url": seen.url, "source": seen.source, "reporter": reporter});
    let action = if found.dead {
        "none"
    } else if found.policy == LeakPolicy::Revoke {
        match revoke(state, &found, &item.token, why).await {
            Ok(()) => "revoked",
            // E.g. the last working admin key: kept, and the event tells the operator to act.
            Err(e) if e.code != ErrorCode::StorageUnavailable => {
                tracing::error!(credential = found.kind, id = %found.id, error = %e.message,
                    "a leaked credential was reported but could not be revoked; revoke or rotate it by hand");
                "notified"
            }
            Err(e) => return Err(e),
        }
    } else {
        "notified"
    };
    let details = json!({
        "credential_type": found.kind, "credential_id": found.id, "consumer_id": found.consumer_id,
        "url": seen.url, "source": seen.source, "reporter": reporter, "token_type": seen.token_type,
        "action": action,
    });
    let audit = NewAudit {
        id: new_id("evt", now)?,
        at: now,
        actor: ACTOR.into(),
        action: "credential.leak".into(),
        target_type: found.kind.into(),
        target_id: found.id.clone(),
        ip: None,
        details,
    };
    state.store.insert_leak_report(&seen.report(now, Some((&found, action)))?, Some(&audit)).await?;
    Ok(seen.answer("true_positive"))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeakView {
    pub id: String,
    pub at: String,
    /// The partner key that signed the report.
    pub reporter: String,
    /// SHA-256 of the token, hex (empty for tokens that were not Keygate's).
    pub token_hash: String,
    pub token_type: String,
    pub url: Option<String>,
    pub source: Option<String>,
    pub label: String,
    pub credential_type: Option<String>,
    pub credential_id: Option<String>,
    /// `revoked`, `notified` or `none`.
    pub action: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeakList {
    pub items: Vec<LeakView>,
    pub next_before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LeakQuery {
    pub before: Option<String>,
    pub limit: Option<u32>,
}

/// Leak reports received, newest first.
#[utoipa::path(get, path = "/v1/leaks", tag = "leaks", params(LeakQuery),
    responses((status = 200, body = LeakList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_leaks(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<LeakQuery>,
) -> ApiResult<Json<LeakList>> {
    let limit = page(None, q.limit)?.limit;
    let items = state.store.list_leak_reports(q.before.as_deref(), limit).await?;
    let next_before = (items.len() == limit as usize).then(|| items.last().map(|r| r.id.clone())).flatten();
    let items = items
        .into_iter()
        .map(|r| {
            let (credential_type, credential_id) = r.credential.unzip();
            LeakView {
                id: r.id,
                at: rfc3339(r.at),
                reporter: r.reporter,
                token_hash: r.token_hash,
                token_type: r.token_type,
                url: r.url,
                source: r.source,
                label: r.label,
                credential_type,
                credential_id,
                action: r.action,
            }
        })
        .collect();
    Ok(Json(LeakList { items, next_before }))
}
