//! Admin API: consumers, the applications or accounts that call the protected API. Every route needs
//! `keygate:admin`; every change is written with its audit event and reaches the caches of everything
//! under the consumer (its keys, and its OAuth clients' tokens) before the call returns.

use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::limits::RateLimit;
use keygate_store::{Consumer, ConsumerLookup, ConsumerPatch, ConsumersOf, LeakPolicy, Page};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Actor, AdminCaller};
use crate::error::ApiPath;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, ErrorCode};
use crate::routes::common::*;
use crate::state::AppState;
use crate::time::rfc3339;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create_consumer, list_consumers))
        .routes(routes!(get_consumer, update_consumer))
        .routes(routes!(disable_consumer))
        .routes(routes!(enable_consumer))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerView {
    pub id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub disabled: bool,
    /// Keygate's own consumer, which holds admin keys.
    pub system: bool,
    /// The plan: rate limits for keys that set none of their own.
    #[schema(value_type = Option<Vec<Object>>)]
    pub rate_limits: Option<Vec<RateLimit>>,
    /// Your own id for this account (unique).
    pub external_id: Option<String>,
    /// What Keygate does when one of this consumer's credentials is reported leaked: `revoke` (default)
    /// or `notify` (only the `credential.leaked` event).
    #[schema(value_type = String, example = "revoke")]
    pub leak_policy: LeakPolicy,
    /// The plan it is on (its rate limits are then the plan's).
    pub plan_id: Option<String>,
    /// The user who owns it (a developer of the portal: their "application").
    pub owner_id: Option<String>,
    /// The owner is disabled: this consumer's credentials stop as if it were disabled.
    pub owner_suspended: bool,
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
            rate_limits: c.rate_limits,
            external_id: c.external_id,
            leak_policy: c.leak_policy,
            plan_id: c.plan_id,
            owner_id: c.owner_id,
            owner_suspended: c.owner_disabled,
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerList {
    pub items: Vec<ConsumerView>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConsumer {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// The plan: `[{"name", "limit", "window_seconds"}]`, inherited by keys without their own.
    #[schema(value_type = Option<Vec<Object>>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<Vec<RateLimit>>,
    /// Your own id for this account (e.g. your customer id), unique among consumers; 1–200 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// `revoke` (default) or `notify`: what Keygate does when one of its credentials is reported leaked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub leak_policy: Option<LeakPolicy>,
    /// A plan (`GET /v1/plans`): its rate limits replace `rate_limits`, and it bounds the consumer's keys
    /// and clients.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// The user who owns the consumer (the developer portal's applications are owned by their developer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConsumer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// `null` removes the plan's limits.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    /// `null` removes the external id.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub external_id: Option<Option<String>>,
    /// `revoke` or `notify`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub leak_policy: Option<LeakPolicy>,
    /// `null` takes the consumer off its plan (its own `rate_limits` apply again).
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub plan_id: Option<Option<String>>,
    /// `null`: no owner.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub owner_id: Option<Option<String>>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsumerListQuery {
    /// Continue after this id (the previous page's `next_after`).
    pub after: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<u32>,
    /// Only the consumer with this external id (at most one).
    pub external_id: Option<String>,
    /// Only consumers whose name starts with this (ignoring case), or whose id or external id is exactly this.
    pub q: Option<String>,
    /// Only consumers owned by this user.
    pub owner_id: Option<String>,
    /// Only consumers on this plan.
    pub plan_id: Option<String>,
}

/// A plan a consumer may be put on (it exists), and an owner (an existing user).
async fn check_plan_and_owner(state: &AppState, plan: Option<&str>, owner: Option<&str>) -> ApiResult<()> {
    if let Some(p) = plan
        && state.store.get_plan(p).await?.is_none()
    {
        return Err(ApiError { field: Some("plan_id".into()), ..ApiError::not_found("plan", p) });
    }
    if let Some(u) = owner
        && state.store.get_user(u).await?.is_none()
    {
        return Err(ApiError { field: Some("owner_id".into()), ..ApiError::not_found("user", u) });
    }
    Ok(())
}

/// Does a live key or a client of the consumer hold a `keygate:` scope?
async fn holds_keygate_scopes(state: &AppState, id: &str) -> ApiResult<bool> {
    let keygate = |scopes: &[String]| scopes.iter().any(|s| s.starts_with("keygate:"));
    let mut page = Page { after: None, limit: 1000, search: None };
    loop {
        let keys = state.store.list_keys(Some(id), &page).await?;
        if keys.iter().any(|k| k.revoked_at.is_none() && keygate(&k.scopes)) {
            return Ok(true);
        }
        match next_cursor(&keys, page.limit, |k| &k.id) {
            Some(after) => page.after = Some(after),
            None => break,
        }
    }
    // A client listing searched by a consumer id lists that consumer's clients (and any named like it).
    let mut page = Page { after: None, limit: 1000, search: Some(id.to_string()) };
    loop {
        let clients = state.store.list_clients(&page).await?;
        if clients.iter().any(|c| c.consumer_id == id && keygate(&c.scopes)) {
            return Ok(true);
        }
        match next_cursor(&clients, page.limit, |c| &c.id) {
            Some(after) => page.after = Some(after),
            None => return Ok(false),
        }
    }
}

/// What every node caches about a consumer (its keys' answers, its clients' state) is read again.
pub async fn consumer_changed(state: &AppState, consumer: &Consumer) {
    state.oauth.consumer_changed(consumer);
    match state.store.consumer_secret_hashes(&consumer.id).await {
        Ok(hashes) => state.verifier.invalidate(&hashes),
        Err(e) => {
            // The change has committed: forget everything rather than answer from stale entries.
            tracing::warn!(error = %e, "cannot list a changed consumer's secrets; forgetting every cached verify answer");
            state.verifier.invalidate_all();
        }
    }
}

/// A user was suspended, enabled or deleted on this node: the consumers they own stop or work again at
/// once. The change has committed: if their consumers cannot be listed, every cached verify answer is
/// forgotten instead (and other nodes, following the change log, retry until they can).
pub async fn owner_changed_here(state: &AppState, user_id: &str) {
    if let Err(e) = owner_changed(state, user_id).await {
        tracing::warn!(error = %e, "cannot list a changed user's consumers; forgetting every cached verify answer");
        state.verifier.invalidate_all();
    }
}

/// The consumers a user owns are read again by this node's caches.
pub async fn owner_changed(state: &AppState, user_id: &str) -> Result<(), keygate_store::StoreError> {
    let mut page = Page { after: None, limit: 500, search: None };
    loop {
        let items = state.store.consumers_where(ConsumersOf::Owner(user_id), &page).await?;
        for c in &items {
            consumer_changed(state, c).await;
        }
        match next_cursor(&items, page.limit, |c| &c.id) {
            Some(after) => page.after = Some(after),
            None => return Ok(()),
        }
    }
}

pub fn check_external_id(e: &str) -> ApiResult<()> {
    if e.is_empty() || e.chars().count() > 200 || e.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "external_id",
            "must be 1 to 200 characters without control characters",
        ));
    }
    Ok(())
}

/// External ids are unique; names too when `unique_consumer_names` is on. Checked before writing for a
/// clear message; the database's unique index decides races ([`unique_violation`]).
async fn check_unique_consumer(
    state: &AppState,
    this: Option<&str>,
    name: Option<&str>,
    external_id: Option<&str>,
) -> ApiResult<()> {
    let taken = |c: &Option<Consumer>| c.as_ref().is_some_and(|c| Some(c.id.as_str()) != this);
    if let Some(e) = external_id
        && taken(&state.store.find_consumer(ConsumerLookup::ExternalId(e)).await?)
    {
        return Err(ApiError {
            field: Some("external_id".into()),
            ..ApiError::new(ErrorCode::Conflict, "another consumer has this external_id")
        });
    }
    if state.config.unique_consumer_names
        && let Some(n) = name
        && taken(&state.store.find_consumer(ConsumerLookup::Name(n)).await?)
    {
        return Err(ApiError {
            field: Some("name".into()),
            ..ApiError::new(
                ErrorCode::Conflict,
                "another consumer has this name (this installation requires unique consumer names)",
            )
        });
    }
    Ok(())
}

fn unique_violation(e: keygate_store::StoreError) -> ApiError {
    match e {
        keygate_store::StoreError::Conflict(_) => ApiError {
            field: Some("external_id".into()),
            ..ApiError::new(ErrorCode::Conflict, "another consumer has this external_id")
        },
        other => other.into(),
    }
}

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
    if let Some(limits) = &req.rate_limits {
        check_rate_limits(limits)?;
    }
    if let Some(e) = &req.external_id {
        check_external_id(e)?;
    }
    if req.plan_id.is_some() && req.rate_limits.is_some() {
        return Err(ApiError::invalid(
            "rate_limits",
            "a consumer on a plan has the plan's rate limits; give plan_id or rate_limits, not both",
        ));
    }
    check_plan_and_owner(&state, req.plan_id.as_deref(), req.owner_id.as_deref()).await?;
    check_unique_consumer(&state, None, Some(&req.name), req.external_id.as_deref()).await?;
    let now = state.now();
    let consumer = Consumer {
        rate_limits: req.rate_limits,
        external_id: req.external_id,
        leak_policy: req.leak_policy.unwrap_or_default(),
        plan_id: req.plan_id,
        owner_id: req.owner_id,
        ..Consumer::new(new_id("cons", now)?, req.name, metadata, now)
    };
    let details = json!({"name": consumer.name, "external_id": consumer.external_id,
        "leak_policy": consumer.leak_policy, "plan_id": consumer.plan_id, "owner_id": consumer.owner_id});
    let audit = audit(&actor, now, "consumer.create", "consumer", &consumer.id, details)?;
    state.store.insert_consumer(&consumer, &audit).await.map_err(unique_violation)?;
    // As every read sees it (a plan's limits, an owner's state).
    let stored = state.store.get_consumer(&consumer.id).await?.unwrap_or(consumer);
    Ok((StatusCode::CREATED, Json(stored.into())))
}

/// List consumers in creation order, or find one by `external_id`.
#[utoipa::path(get, path = "/v1/consumers", tag = "consumers", params(ConsumerListQuery),
    responses((status = 200, body = ConsumerList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_consumers(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<ConsumerListQuery>,
) -> ApiResult<Json<ConsumerList>> {
    if let Some(e) = &q.external_id {
        let found = state.store.find_consumer(ConsumerLookup::ExternalId(e)).await?;
        return Ok(Json(ConsumerList {
            items: found.into_iter().map(Into::into).collect(),
            next_after: None,
        }));
    }
    let page = searched_page(q.after, q.limit, q.q)?;
    let items = match (&q.owner_id, &q.plan_id) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("owner_id", "filter by owner_id or by plan_id, not both"));
        }
        (Some(u), None) => state.store.consumers_where(ConsumersOf::Owner(u), &page).await?,
        (None, Some(p)) => state.store.consumers_where(ConsumersOf::Plan(p), &page).await?,
        (None, None) => state.store.list_consumers(&page).await?,
    };
    let next_after = next_cursor(&items, page.limit, |c| &c.id);
    Ok(Json(ConsumerList { items: items.into_iter().map(Into::into).collect(), next_after }))
}

/// Get one consumer.
#[utoipa::path(get, path = "/v1/consumers/{id}", tag = "consumers", params(("id" = String, Path)),
    responses((status = 200, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
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
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateConsumer>,
) -> ApiResult<Json<ConsumerView>> {
    if req.name.is_none()
        && req.metadata.is_none()
        && req.rate_limits.is_none()
        && req.external_id.is_none()
        && req.leak_policy.is_none()
        && req.plan_id.is_none()
        && req.owner_id.is_none()
    {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "the update changes nothing; send name, metadata, rate_limits, external_id, leak_policy, plan_id or owner_id",
        ));
    }
    let current = load_consumer(&state, &id).await?;
    let on_plan = match &req.plan_id {
        Some(p) => p.is_some(),
        None => current.plan_id.is_some(),
    };
    if on_plan && matches!(req.rate_limits, Some(Some(_))) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the consumer is on a plan, whose rate limits it has; change the plan, or take the consumer off it (plan_id: null)",
        ));
    }
    if current.system && (matches!(req.plan_id, Some(Some(_))) || matches!(req.owner_id, Some(Some(_)))) {
        return Err(ApiError::new(ErrorCode::Conflict, "the system consumer has no plan and no owner"));
    }
    check_plan_and_owner(
        &state,
        req.plan_id.clone().flatten().as_deref(),
        req.owner_id.clone().flatten().as_deref(),
    )
    .await?;
    if matches!(req.owner_id, Some(Some(_))) && holds_keygate_scopes(&state, &id).await? {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "a key or client of this consumer holds one of Keygate's own permissions (keygate:…), which an application a developer owns never holds; revoke it first",
        ));
    }
    if let Some(Some(e)) = &req.external_id {
        check_external_id(e)?;
    }
    check_unique_consumer(
        &state,
        Some(&id),
        req.name.as_deref(),
        req.external_id.clone().flatten().as_deref(),
    )
    .await?;
    if let Some(Some(limits)) = &req.rate_limits {
        check_rate_limits(limits)?;
    }
    if let Some(name) = &req.name {
        check_name(name)?;
    }
    if let Some(metadata) = &req.metadata {
        check_metadata(metadata)?;
    }
    let now = state.now();
    let details = json!({"name": req.name, "metadata_changed": req.metadata.is_some(),
        "rate_limits": req.rate_limits, "external_id": req.external_id, "leak_policy": req.leak_policy,
        "plan_id": req.plan_id, "owner_id": req.owner_id});
    let patch = ConsumerPatch {
        name: req.name,
        metadata: req.metadata,
        disabled: None,
        rate_limits: req.rate_limits,
        external_id: req.external_id,
        leak_policy: req.leak_policy,
        plan_id: req.plan_id,
        owner_id: req.owner_id,
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
        .await
        .map_err(unique_violation)?
        .ok_or_else(|| ApiError::not_found("consumer", id))?;
    // Keys cache their consumer's state and plan; the token path keeps them for the consumer's clients.
    if patch.disabled.is_some()
        || patch.rate_limits.is_some()
        || patch.plan_id.is_some()
        || patch.owner_id.is_some()
    {
        consumer_changed(state, &consumer).await;
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
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ConsumerView>> {
    let consumer = load_consumer(&state, &id).await?;
    if consumer.system {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "the system consumer holds the admin keys and cannot be disabled; disable or revoke single keys instead",
        ));
    }
    let now = state.now();
    let _one_at_a_time = keep_an_admin_key(&state, now, |_, consumer_id| consumer_id != id).await?;
    let patch = ConsumerPatch { disabled: Some(true), updated_at: now, ..ConsumerPatch::default() };
    set_consumer(&state, &actor, &id, patch, "consumer.disable", json!({})).await
}

/// Enable a disabled consumer.
#[utoipa::path(post, path = "/v1/consumers/{id}/enable", tag = "consumers", params(("id" = String, Path)),
    responses((status = 200, body = ConsumerView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn enable_consumer(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ConsumerView>> {
    let patch = ConsumerPatch { disabled: Some(false), updated_at: state.now(), ..ConsumerPatch::default() };
    set_consumer(&state, &actor, &id, patch, "consumer.enable", json!({})).await
}
