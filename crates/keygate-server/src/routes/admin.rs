//! Admin REST API: consumers, API keys and the audit log. Every route needs `keygate:admin`, and every
//! change is written together with its audit event and invalidates the verify cache before answering.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use keygate_core::validate::{validate_metadata, validate_name};
use keygate_core::{Environment, PlainSecret, SecretKind, id, scope};
use keygate_store::{
    ApiKey, AuditEvent, AuditFilter, Consumer, ConsumerPatch, KeyPatch, KeySecret, NewAudit, Page,
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Actor, AdminCaller};
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, ErrorCode};
use crate::state::AppState;
use crate::time::{now_ms, parse_rfc3339, rfc3339};

/// Longest overlap window of a rotation: 30 days.
pub const MAX_OVERLAP_SECONDS: u64 = 30 * 24 * 3600;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub fn router() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/v1/consumers", post(create_consumer).get(list_consumers))
        .route("/v1/consumers/{id}", get(get_consumer).patch(update_consumer))
        .route("/v1/consumers/{id}/disable", post(disable_consumer))
        .route("/v1/consumers/{id}/enable", post(enable_consumer))
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", get(get_key).patch(update_key))
        .route("/v1/keys/{id}/disable", post(disable_key))
        .route("/v1/keys/{id}/enable", post(enable_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/audit", get(list_audit))
}

// ---------------------------------------------------------------------------------------------
// Views

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerView {
    pub id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub disabled: bool,
    /// Keygate's own consumer, which holds admin keys.
    pub system: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Consumer> for ConsumerView {
    fn from(c: Consumer) -> Self {
        ConsumerView {
            id: c.id,
            name: c.name,
            metadata: c.metadata,
            disabled: c.disabled,
            system: c.system,
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

/// An API key as listings show it: never the secret, only its visible start.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub consumer_id: String,
    pub name: String,
    #[schema(value_type = String, example = "live")]
    pub environment: Environment,
    /// The first characters of the newest secret, e.g. `kg_live_3xAb`.
    pub start: String,
    pub scopes: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub expires_at: Option<String>,
    /// `active`, `disabled`, `expired` or `revoked`.
    pub status: &'static str,
    pub disabled: bool,
    pub revoked_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl KeyView {
    fn from_key(k: ApiKey, now: i64) -> Self {
        let status = if k.revoked_at.is_some() {
            "revoked"
        } else if k.disabled {
            "disabled"
        } else if k.expires_at.is_some_and(|t| t <= now) {
            "expired"
        } else {
            "active"
        };
        KeyView {
            id: k.id,
            consumer_id: k.consumer_id,
            name: k.name,
            environment: k.environment,
            start: k.start,
            scopes: k.scopes,
            metadata: k.metadata,
            expires_at: k.expires_at.map(rfc3339),
            status,
            disabled: k.disabled,
            revoked_at: k.revoked_at.map(rfc3339),
            created_at: rfc3339(k.created_at),
            updated_at: rfc3339(k.updated_at),
        }
    }
}

/// A key with its secret: the one time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyWithSecret {
    /// The secret. Store it now: Keygate keeps only its hash and cannot show it again.
    pub key: String,
    /// After a rotation: when the previous secret stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<String>,
    #[serde(flatten)]
    pub view: KeyView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerList {
    pub items: Vec<ConsumerView>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub items: Vec<KeyView>,
    pub next_after: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: String,
    pub at: String,
    /// Id of the key that made the change, or `system`.
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub ip: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
}

impl From<AuditEvent> for AuditView {
    fn from(e: AuditEvent) -> Self {
        AuditView {
            id: e.id,
            at: rfc3339(e.at),
            actor: e.actor,
            action: e.action,
            target_type: e.target_type,
            target_id: e.target_id,
            ip: e.ip,
            details: e.details,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub items: Vec<AuditView>,
    /// Pass as `before` to get older events; absent on the last page.
    pub next_before: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConsumer {
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConsumer {
    pub name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub consumer_id: String,
    pub name: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 3339; must be in the future.
    pub expires_at: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "live")]
    pub environment: Option<Environment>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
}

/// Fields to change; absent fields stay as they are. `expires_at: null` removes the expiry.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<Option<String>>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old secret keeps working, in seconds (0 ends it at once; at most 30 days).
    #[serde(default)]
    pub overlap_seconds: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Continue after this id (the previous page's `next_after`).
    pub after: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct KeyListQuery {
    /// Only keys of this consumer.
    pub consumer_id: Option<String>,
    pub after: Option<String>,
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only events about this consumer or key.
    pub target_id: Option<String>,
    /// Only this action, e.g. `key.revoke`.
    pub action: Option<String>,
    /// Continue with events older than this id (the previous page's `next_before`).
    pub before: Option<String>,
    pub limit: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn page(after: Option<String>, limit: Option<u32>) -> ApiResult<Page> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {MAX_PAGE}"),
        ));
    }
    Ok(Page { after, limit })
}

fn next_cursor<T>(items: &[T], limit: u32, id: impl Fn(&T) -> &str) -> Option<String> {
    if items.len() == limit as usize {
        items.last().map(|i| id(i).to_string())
    } else {
        None
    }
}

fn new_id(prefix: &str, now: i64) -> ApiResult<String> {
    id::new_id(prefix, now).map_err(|e| ApiError::internal("random source failed", e))
}

fn audit(
    actor: &Actor,
    now: i64,
    action: &str,
    target_type: &str,
    target_id: &str,
    details: Value,
) -> ApiResult<NewAudit> {
    Ok(NewAudit {
        id: new_id("evt", now)?,
        at: now,
        actor: actor.key_id.clone(),
        action: action.into(),
        target_type: target_type.into(),
        target_id: target_id.into(),
        ip: actor.ip.clone(),
        details,
    })
}

fn check_name(name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|e| ApiError::invalid("name", e))
}

fn check_metadata(metadata: &Value) -> ApiResult<()> {
    validate_metadata(metadata).map_err(|e| ApiError::invalid("metadata", e))
}

fn check_scopes(scopes: Vec<String>) -> ApiResult<Vec<String>> {
    scope::normalize_scopes(scopes).map_err(|e| ApiError::invalid("scopes", e))
}

fn check_expiry(value: &str, now: i64) -> ApiResult<i64> {
    let t = parse_rfc3339(value).ok_or_else(|| {
        ApiError::invalid(
            "expires_at",
            "must be an RFC 3339 time, e.g. 2030-01-31T00:00:00Z",
        )
    })?;
    if t <= now {
        return Err(ApiError::invalid("expires_at", "must be in the future"));
    }
    Ok(t)
}

async fn load_consumer(state: &AppState, id: &str) -> ApiResult<Consumer> {
    state
        .store
        .get_consumer(id)
        .await?
        .ok_or_else(|| ApiError::not_found("consumer", id))
}

async fn load_key(state: &AppState, id: &str) -> ApiResult<ApiKey> {
    state
        .store
        .get_key(id)
        .await?
        .ok_or_else(|| ApiError::not_found("key", id))
}

/// Drops every cached verify entry of a key, so the next verify sees the change.
async fn invalidate_key(state: &AppState, key_id: &str) -> ApiResult<()> {
    let hashes = state.store.key_secret_hashes(key_id).await?;
    state.verifier.invalidate(&hashes);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Consumers

/// Create a consumer: an application or account that calls the protected API.
#[utoipa::path(post, path = "/v1/consumers", tag = "consumers", request_body = CreateConsumer,
    responses((status = 201, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreateConsumer>,
) -> ApiResult<(StatusCode, Json<ConsumerView>)> {
    check_name(&req.name)?;
    let metadata = req.metadata.unwrap_or_else(|| json!({}));
    check_metadata(&metadata)?;
    let now = now_ms();
    let consumer = Consumer {
        id: new_id("cons", now)?,
        name: req.name,
        metadata,
        disabled: false,
        system: false,
        created_at: now,
        updated_at: now,
    };
    let audit = audit(
        &actor,
        now,
        "consumer.create",
        "consumer",
        &consumer.id,
        json!({"name": consumer.name}),
    )?;
    state.store.insert_consumer(&consumer, &audit).await?;
    Ok((StatusCode::CREATED, Json(consumer.into())))
}

/// List consumers in creation order.
#[utoipa::path(get, path = "/v1/consumers", tag = "consumers", params(PageQuery),
    responses((status = 200, body = ConsumerList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_consumers(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ConsumerList>> {
    let page = page(q.after, q.limit)?;
    let items = state.store.list_consumers(&page).await?;
    let next_after = next_cursor(&items, page.limit, |c| &c.id);
    Ok(Json(ConsumerList {
        items: items.into_iter().map(Into::into).collect(),
        next_after,
    }))
}

/// Get one consumer.
#[utoipa::path(get, path = "/v1/consumers/{id}", tag = "consumers", params(("id" = String, Path)),
    responses((status = 200, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    Ok(Json(load_consumer(&state, &id).await?.into()))
}

/// Change a consumer's name or metadata.
#[utoipa::path(patch, path = "/v1/consumers/{id}", tag = "consumers", params(("id" = String, Path)),
    request_body = UpdateConsumer,
    responses((status = 200, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateConsumer>,
) -> ApiResult<Json<ConsumerView>> {
    if req.name.is_none() && req.metadata.is_none() {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "the update changes nothing; send name or metadata",
        ));
    }
    if let Some(name) = &req.name {
        check_name(name)?;
    }
    if let Some(metadata) = &req.metadata {
        check_metadata(metadata)?;
    }
    let now = now_ms();
    let details = json!({"name": req.name, "metadata_changed": req.metadata.is_some()});
    let patch = ConsumerPatch {
        name: req.name,
        metadata: req.metadata,
        disabled: None,
        updated_at: now,
    };
    set_consumer(&state, &actor, &id, patch, "consumer.update", details).await
}

async fn set_consumer(
    state: &AppState,
    actor: &Actor,
    id: &str,
    patch: ConsumerPatch,
    action: &str,
    details: Value,
) -> ApiResult<Json<ConsumerView>> {
    let audit = audit(actor, patch.updated_at, action, "consumer", id, details)?;
    let consumer = state
        .store
        .update_consumer(id, &patch, &audit)
        .await?
        .ok_or_else(|| ApiError::not_found("consumer", id))?;
    if patch.disabled.is_some() {
        let hashes = state.store.consumer_secret_hashes(id).await?;
        state.verifier.invalidate(&hashes);
    }
    Ok(Json(consumer.into()))
}

/// Disable a consumer: every key it holds verifies as `DISABLED` until it is enabled again.
#[utoipa::path(post, path = "/v1/consumers/{id}/disable", tag = "consumers", params(("id" = String, Path)),
    responses((status = 200, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disable_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    let consumer = load_consumer(&state, &id).await?;
    if consumer.system {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the system consumer holds the admin keys and cannot be disabled; disable or revoke single keys instead",
        ));
    }
    let patch = ConsumerPatch {
        disabled: Some(true),
        updated_at: now_ms(),
        ..ConsumerPatch::default()
    };
    set_consumer(&state, &actor, &id, patch, "consumer.disable", json!({})).await
}

/// Enable a disabled consumer.
#[utoipa::path(post, path = "/v1/consumers/{id}/enable", tag = "consumers", params(("id" = String, Path)),
    responses((status = 200, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enable_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<ConsumerView>> {
    let patch = ConsumerPatch {
        disabled: Some(false),
        updated_at: now_ms(),
        ..ConsumerPatch::default()
    };
    set_consumer(&state, &actor, &id, patch, "consumer.enable", json!({})).await
}

// ---------------------------------------------------------------------------------------------
// Keys

/// Create an API key. The secret is in the response's `key` field, this one time only.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKey,
    responses((status = 201, body = KeyWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreateKey>,
) -> ApiResult<(StatusCode, Json<KeyWithSecret>)> {
    let now = now_ms();
    check_name(&req.name)?;
    let scopes = check_scopes(req.scopes)?;
    let expires_at = req
        .expires_at
        .as_deref()
        .map(|t| check_expiry(t, now))
        .transpose()?;
    let metadata = req.metadata.unwrap_or_else(|| json!({}));
    check_metadata(&metadata)?;
    let environment = req.environment.unwrap_or(Environment::Live);
    let consumer = state
        .store
        .get_consumer(&req.consumer_id)
        .await?
        .ok_or_else(|| ApiError {
            field: Some("consumer_id".into()),
            ..ApiError::not_found("consumer", &req.consumer_id)
        })?;
    if consumer.disabled {
        return Err(ApiError::new(
            ErrorCode::ConsumerDisabled,
            "the consumer is disabled; enable it before creating keys for it",
        ));
    }
    let secret = PlainSecret::generate(SecretKind::ApiKey(environment))
        .map_err(|e| ApiError::internal("random source failed", e))?;
    let key = ApiKey {
        id: new_id("key", now)?,
        consumer_id: consumer.id,
        name: req.name,
        environment,
        scopes,
        metadata,
        expires_at,
        disabled: false,
        revoked_at: None,
        created_at: now,
        updated_at: now,
        start: secret.visible_start(),
    };
    let key_secret = KeySecret {
        hash: secret.hash(),
        key_id: key.id.clone(),
        start: key.start.clone(),
        created_at: now,
        expires_at: None,
    };
    let details = json!({
        "consumer_id": key.consumer_id, "name": key.name, "scopes": key.scopes,
        "environment": environment.as_str(), "expires_at": expires_at.map(rfc3339), "start": key.start,
    });
    let audit = audit(&actor, now, "key.create", "key", &key.id, details)?;
    state.store.insert_key(&key, &key_secret, &audit).await?;
    // Someone may have tried this exact secret before it existed; forget that answer.
    state.verifier.invalidate(&[key_secret.hash]);
    let view = KeyView::from_key(key, now);
    Ok((
        StatusCode::CREATED,
        Json(KeyWithSecret {
            key: secret.expose().to_string(),
            previous_expires_at: None,
            view,
        }),
    ))
}

/// List API keys (never their secrets), optionally of one consumer.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", params(KeyListQuery),
    responses((status = 200, body = KeyList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<KeyListQuery>,
) -> ApiResult<Json<KeyList>> {
    let page = page(q.after, q.limit)?;
    let items = state.store.list_keys(q.consumer_id.as_deref(), &page).await?;
    let next_after = next_cursor(&items, page.limit, |k| &k.id);
    let now = now_ms();
    Ok(Json(KeyList {
        items: items.into_iter().map(|k| KeyView::from_key(k, now)).collect(),
        next_after,
    }))
}

/// Get one API key (never its secret).
#[utoipa::path(get, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = KeyView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyView>> {
    Ok(Json(KeyView::from_key(load_key(&state, &id).await?, now_ms())))
}

async fn patch_key(
    state: &AppState,
    actor: &Actor,
    id: &str,
    patch: KeyPatch,
    action: &str,
    details: Value,
) -> ApiResult<Json<KeyView>> {
    let audit = audit(actor, patch.updated_at, action, "key", id, details)?;
    let Some(key) = state.store.update_key(id, &patch, &audit).await? else {
        load_key(state, id).await?;
        return Err(ApiError::new(
            ErrorCode::KeyRevoked,
            "the key is revoked; revocation is permanent, create a new key",
        ));
    };
    invalidate_key(state, id).await?;
    Ok(Json(KeyView::from_key(key, patch.updated_at)))
}

/// Change a key's name, scopes, metadata or expiry. Takes effect on the next verify.
#[utoipa::path(patch, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path)),
    request_body = UpdateKey,
    responses((status = 200, body = KeyView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UpdateKey>,
) -> ApiResult<Json<KeyView>> {
    let now = now_ms();
    if req.name.is_none() && req.scopes.is_none() && req.metadata.is_none() && req.expires_at.is_none() {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "the update changes nothing; send name, scopes, metadata or expires_at",
        ));
    }
    if let Some(name) = &req.name {
        check_name(name)?;
    }
    let scopes = req.scopes.map(check_scopes).transpose()?;
    if let Some(metadata) = &req.metadata {
        check_metadata(metadata)?;
    }
    let expires_at = match &req.expires_at {
        None => None,
        Some(None) => Some(None),
        Some(Some(t)) => Some(Some(check_expiry(t, now)?)),
    };
    let details = json!({
        "name": req.name, "scopes": scopes, "metadata_changed": req.metadata.is_some(),
        "expires_at": expires_at.map(|e| e.map(rfc3339)),
    });
    let patch = KeyPatch {
        name: req.name,
        scopes,
        metadata: req.metadata,
        expires_at,
        updated_at: now,
        ..KeyPatch::default()
    };
    patch_key(&state, &actor, &id, patch, "key.update", details).await
}

/// Disable a key: it verifies as `DISABLED` until enabled again.
#[utoipa::path(post, path = "/v1/keys/{id}/disable", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = KeyView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn disable_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyView>> {
    let patch = KeyPatch {
        disabled: Some(true),
        updated_at: now_ms(),
        ..KeyPatch::default()
    };
    patch_key(&state, &actor, &id, patch, "key.disable", json!({})).await
}

/// Enable a disabled key.
#[utoipa::path(post, path = "/v1/keys/{id}/enable", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = KeyView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enable_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyView>> {
    let patch = KeyPatch {
        disabled: Some(false),
        updated_at: now_ms(),
        ..KeyPatch::default()
    };
    patch_key(&state, &actor, &id, patch, "key.enable", json!({})).await
}

/// Revoke a key, permanently. Revoking a revoked key answers its current state.
#[utoipa::path(post, path = "/v1/keys/{id}/revoke", tag = "keys", params(("id" = String, Path)),
    responses((status = 200, body = KeyView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<KeyView>> {
    let now = now_ms();
    let patch = KeyPatch {
        revoked_at: Some(now),
        updated_at: now,
        ..KeyPatch::default()
    };
    match patch_key(&state, &actor, &id, patch, "key.revoke", json!({})).await {
        Err(ApiError {
            code: ErrorCode::KeyRevoked,
            ..
        }) => Ok(Json(KeyView::from_key(load_key(&state, &id).await?, now))),
        other => other,
    }
}

/// Rotate a key: a new secret now, the old one working until the overlap window ends.
#[utoipa::path(post, path = "/v1/keys/{id}/rotate", tag = "keys", params(("id" = String, Path)),
    request_body(content = Option<RotateKey>),
    responses((status = 200, body = KeyWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<KeyWithSecret>> {
    // The body is optional: no body means an overlap of 0.
    let req: RotateKey = if body.iter().all(u8::is_ascii_whitespace) {
        RotateKey::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            if e.is_data() {
                ApiError::new(ErrorCode::InvalidRequest, e.to_string())
            } else {
                ApiError::new(
                    ErrorCode::MalformedJson,
                    format!("the body is not valid JSON: {e}"),
                )
            }
        })?
    };
    if req.overlap_seconds > MAX_OVERLAP_SECONDS {
        return Err(ApiError::invalid(
            "overlap_seconds",
            format!("must be at most {MAX_OVERLAP_SECONDS} (30 days)"),
        ));
    }
    let key = load_key(&state, &id).await?;
    if key.revoked_at.is_some() {
        return Err(ApiError::new(
            ErrorCode::KeyRevoked,
            "the key is revoked; revocation is permanent, create a new key",
        ));
    }
    let now = now_ms();
    // `overlap_seconds` is at most 30 days, so this cannot overflow.
    let old_expires_at = now + (req.overlap_seconds as i64) * 1000;
    let secret = PlainSecret::generate(SecretKind::ApiKey(key.environment))
        .map_err(|e| ApiError::internal("random source failed", e))?;
    let new_secret = KeySecret {
        hash: secret.hash(),
        key_id: key.id.clone(),
        start: secret.visible_start(),
        created_at: now,
        expires_at: None,
    };
    let details = json!({"overlap_seconds": req.overlap_seconds, "start": new_secret.start, "previous_start": key.start});
    let audit = audit(&actor, now, "key.rotate", "key", &id, details)?;
    if !state
        .store
        .rotate_key(&id, &new_secret, old_expires_at, &audit)
        .await?
    {
        return Err(ApiError::new(
            ErrorCode::KeyRevoked,
            "the key is revoked; revocation is permanent, create a new key",
        ));
    }
    invalidate_key(&state, &id).await?;
    let key = load_key(&state, &id).await?;
    Ok(Json(KeyWithSecret {
        key: secret.expose().to_string(),
        previous_expires_at: Some(rfc3339(old_expires_at)),
        view: KeyView::from_key(key, now),
    }))
}

// ---------------------------------------------------------------------------------------------
// Audit

/// The audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_audit(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditList>> {
    let page = page(None, q.limit)?;
    let filter = AuditFilter {
        target_id: q.target_id,
        action: q.action,
        before: q.before,
        limit: page.limit,
    };
    let items = state.store.list_audit(&filter).await?;
    let next_before = next_cursor(&items, page.limit, |e| &e.id);
    Ok(Json(AuditList {
        items: items.into_iter().map(Into::into).collect(),
        next_before,
    }))
}
