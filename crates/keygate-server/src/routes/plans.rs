//! Admin API: plans, the named usage controls a consumer is put on (`plan_id`), and what the developer
//! portal offers: rate limits of the consumer's keys and clients, the quota each new key starts with,
//! the scopes its keys and clients may hold, and the longest a new key may live. Every rule of a plan
//! is enforced where keys and clients are made and changed ([`check_plan_scopes`], [`plan_key_terms`]),
//! for the admin API, the CLI, the console and the portal alike.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::limits::{Quota, RateLimit};
use keygate_core::scope;
use keygate_store::{Consumer, ConsumersOf, Page, Plan, PlanPatch, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::AdminCaller;
use crate::error::ApiPath;
use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody, ErrorCode};
use crate::routes::common::*;
use crate::state::AppState;
use crate::time::rfc3339;

/// Longest key lifetime a plan may cap at: ten years.
const MAX_KEY_LIFETIME: i64 = 10 * 365 * 86_400;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(create_plan, list_plans)).routes(routes!(
        get_plan,
        update_plan,
        delete_plan
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    /// Rate limits of the keys (without their own) and clients of every consumer on the plan.
    #[schema(value_type = Option<Vec<Object>>)]
    pub rate_limits: Option<Vec<RateLimit>>,
    /// The quota each new key of a consumer on the plan starts with, with its refill.
    #[schema(value_type = Option<Object>)]
    pub quota: Option<Quota>,
    /// The scopes keys and clients of its consumers may hold; absent: any.
    pub allowed_scopes: Option<Vec<String>>,
    /// The longest a new key may live; absent: no cap.
    pub key_lifetime_seconds: Option<i64>,
    /// Offered to the developer portal's developers.
    pub self_service: bool,
    /// What a new portal application gets when its developer chooses no plan.
    pub is_default: bool,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Plan> for PlanView {
    fn from(p: Plan) -> Self {
        PlanView {
            id: p.id,
            name: p.name,
            description: p.description,
            rate_limits: p.rate_limits,
            quota: p.quota,
            allowed_scopes: p.allowed_scopes,
            key_lifetime_seconds: p.key_lifetime_seconds,
            self_service: p.self_service,
            is_default: p.is_default,
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    pub items: Vec<PlanView>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePlan {
    /// Unique, ignoring case.
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<Vec<RateLimit>>,
    /// `{"remaining": N, "refill": {...}}`, as a key's quota.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_lifetime_seconds: Option<i64>,
    #[serde(default)]
    pub self_service: bool,
    #[serde(default)]
    pub is_default: bool,
}

/// Fields to change; `null` clears an optional one.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePlan {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub rate_limits: Option<Option<Vec<RateLimit>>>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<Object>)]
    pub quota: Option<Option<Quota>>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allowed_scopes: Option<Option<Vec<String>>>,
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    pub key_lifetime_seconds: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_service: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_default: Option<bool>,
}

fn check_lifetime(s: i64) -> ApiResult<()> {
    if !(60..=MAX_KEY_LIFETIME).contains(&s) {
        return Err(ApiError::invalid(
            "key_lifetime_seconds",
            format!("must be between 60 and {MAX_KEY_LIFETIME} (ten years)"),
        ));
    }
    Ok(())
}

fn check_description(d: &str) -> ApiResult<()> {
    if d.chars().count() > 500 || d.chars().any(|c| c.is_control() && c != '\n') {
        return Err(ApiError::invalid(
            "description",
            "must be at most 500 characters, without control characters",
        ));
    }
    Ok(())
}

fn name_taken(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict(_) => ApiError {
            field: Some("name".into()),
            ..ApiError::new(ErrorCode::Conflict, "a plan with this name exists; choose another name")
        },
        other => other.into(),
    }
}

pub async fn load_plan(state: &AppState, id: &str) -> ApiResult<Plan> {
    state.store.get_plan(id).await?.ok_or_else(|| ApiError::not_found("plan", id))
}

/// The plan a consumer is on, if any. A plan that cannot be found is an error, never "no plan" (which
/// would lift its bounds).
pub async fn plan_of(state: &AppState, consumer: &Consumer) -> ApiResult<Option<Plan>> {
    match &consumer.plan_id {
        Some(id) => match state.store.get_plan(id).await? {
            Some(p) => Ok(Some(p)),
            None => Err(ApiError::new(
                ErrorCode::Conflict,
                format!("the consumer's plan {id} no longer exists; put the consumer on another plan"),
            )),
        },
        None => Ok(None),
    }
}

/// Keygate's own permissions (`keygate:…`: admin, verify, introspect, metrics) are never held by a key or
/// client of a consumer a user owns (a developer's application), whoever asks.
pub fn check_owned_scopes(consumer: &Consumer, field: &str, scopes: &[String]) -> ApiResult<()> {
    if consumer.owner_id.is_some()
        && let Some(s) = scopes.iter().find(|s| s.starts_with("keygate:"))
    {
        return Err(ApiError::invalid(
            field,
            format!(
                "'{s}' is one of Keygate's own permissions, which an application a developer owns never holds"
            ),
        ));
    }
    Ok(())
}

/// Every scope must be within the plan's allowed scopes (a wildcard the plan allows covers its names).
pub fn check_plan_scopes(plan: Option<&Plan>, field: &str, scopes: &[String]) -> ApiResult<()> {
    let Some(allowed) = plan.and_then(|p| p.allowed_scopes.as_ref()) else { return Ok(()) };
    if let Some(s) = scopes.iter().find(|s| !allowed.iter().any(|a| scope::covers(a, s))) {
        let plan = plan.map(|p| p.name.as_str()).unwrap_or_default();
        return Err(ApiError::invalid(
            field,
            format!(
                "'{s}' is not among the scopes plan '{plan}' allows ({}); ask the operator for another plan",
                if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") }
            ),
        ));
    }
    Ok(())
}

/// A new key's expiry and quota under a plan: the expiry at most the plan's lifetime cap from now (the
/// cap itself when none is asked for), and the plan's quota when the key sets none.
pub fn plan_key_terms(
    plan: Option<&Plan>,
    expires_at: Option<i64>,
    quota: Option<Quota>,
    now: i64,
) -> ApiResult<(Option<i64>, Option<Quota>)> {
    let Some(plan) = plan else { return Ok((expires_at, quota)) };
    let expires_at =
        check_plan_expiry(Some(plan), expires_at, now)?.or(plan.key_lifetime_seconds.map(|s| now + s * 1000));
    Ok((expires_at, quota.or_else(|| plan.quota.clone())))
}

/// An expiry within the plan's key lifetime cap; `None` stays `None` (the caller decides).
pub fn check_plan_expiry(plan: Option<&Plan>, expires_at: Option<i64>, now: i64) -> ApiResult<Option<i64>> {
    if let (Some(plan), Some(t)) = (plan, expires_at)
        && let Some(cap) = plan.key_lifetime_seconds
        && t > now + cap * 1000
    {
        return Err(ApiError::invalid(
            "expires_at",
            format!("plan '{}' lets a key live at most {cap} seconds; choose an earlier expiry", plan.name),
        ));
    }
    Ok(expires_at)
}

/// Everything cached about the consumers on a plan is read again (their keys' and clients' limits).
async fn plan_changed(state: &AppState, plan_id: &str) -> ApiResult<()> {
    state.verifier.invalidate_all();
    let mut page = Page { after: None, limit: 500, search: None };
    loop {
        let items = state.store.consumers_where(ConsumersOf::Plan(plan_id), &page).await?;
        for c in &items {
            state.oauth.consumer_changed(c);
        }
        match next_cursor(&items, page.limit, |c| &c.id) {
            Some(after) => page.after = Some(after),
            None => return Ok(()),
        }
    }
}

/// On another node: a plan changed.
pub async fn apply_plan_change(state: &AppState, plan_id: &str) -> Result<(), StoreError> {
    plan_changed(state, plan_id).await.map_err(|e| StoreError::Unavailable(e.message))
}

/// Create a plan.
#[utoipa::path(post, path = "/v1/plans", tag = "plans", request_body = CreatePlan,
    responses((status = 201, body = PlanView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_plan(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreatePlan>,
) -> ApiResult<(StatusCode, Json<PlanView>)> {
    check_name(&req.name)?;
    if let Some(d) = &req.description {
        check_description(d)?;
    }
    if let Some(l) = &req.rate_limits {
        check_rate_limits(l)?;
    }
    if let Some(q) = &req.quota {
        check_quota(q)?;
    }
    let allowed_scopes = req.allowed_scopes.map(check_scopes).transpose()?;
    if let Some(s) = req.key_lifetime_seconds {
        check_lifetime(s)?;
    }
    let now = state.now();
    let plan = Plan {
        id: new_id("plan", now)?,
        name: req.name,
        description: req.description,
        rate_limits: req.rate_limits,
        quota: req.quota,
        allowed_scopes,
        key_lifetime_seconds: req.key_lifetime_seconds,
        self_service: req.self_service || req.is_default,
        is_default: req.is_default,
        created_at: now,
        updated_at: now,
    };
    let details = json!({"name": plan.name, "rate_limits": plan.rate_limits, "quota": plan.quota,
        "allowed_scopes": plan.allowed_scopes, "key_lifetime_seconds": plan.key_lifetime_seconds,
        "self_service": plan.self_service, "is_default": plan.is_default});
    let audit = audit(&actor, now, "plan.create", "plan", &plan.id, details)?;
    state.store.insert_plan(&plan, &audit).await.map_err(name_taken)?;
    Ok((StatusCode::CREATED, Json(plan.into())))
}

/// List plans, by name.
#[utoipa::path(get, path = "/v1/plans", tag = "plans",
    responses((status = 200, body = PlanList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_plans(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
) -> ApiResult<Json<PlanList>> {
    let items = state.store.list_plans().await?;
    Ok(Json(PlanList { items: items.into_iter().map(Into::into).collect() }))
}

/// Get one plan, by id or `name:<name>`.
#[utoipa::path(get, path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path)),
    responses((status = 200, body = PlanView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_plan(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<PlanView>> {
    if let Some(name) = id.strip_prefix("name:") {
        let plan = state.store.find_plan(name).await?.ok_or_else(|| ApiError::not_found("plan", &id))?;
        return Ok(Json(plan.into()));
    }
    Ok(Json(load_plan(&state, &id).await?.into()))
}

/// Change a plan. New rate limits apply at once to every consumer on it; a new quota, scope list or
/// lifetime cap applies to keys and clients made or changed from now on.
#[utoipa::path(patch, path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path)),
    request_body = UpdatePlan,
    responses((status = 200, body = PlanView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_plan(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdatePlan>,
) -> ApiResult<Json<PlanView>> {
    if let Some(n) = &req.name {
        check_name(n)?;
    }
    if let Some(Some(d)) = &req.description {
        check_description(d)?;
    }
    if let Some(Some(l)) = &req.rate_limits {
        check_rate_limits(l)?;
    }
    if let Some(Some(q)) = &req.quota {
        check_quota(q)?;
    }
    let allowed_scopes = match req.allowed_scopes {
        Some(Some(s)) => Some(Some(check_scopes(s)?)),
        other => other,
    };
    if let Some(Some(s)) = req.key_lifetime_seconds {
        check_lifetime(s)?;
    }
    let now = state.now();
    let details = json!({"name": req.name, "rate_limits": req.rate_limits, "quota": req.quota,
        "allowed_scopes": allowed_scopes, "key_lifetime_seconds": req.key_lifetime_seconds,
        "self_service": req.self_service, "is_default": req.is_default});
    let patch = PlanPatch {
        name: req.name,
        description: req.description,
        rate_limits: req.rate_limits,
        quota: req.quota,
        allowed_scopes,
        key_lifetime_seconds: req.key_lifetime_seconds,
        // The default plan is offered.
        self_service: if req.is_default == Some(true) { Some(true) } else { req.self_service },
        is_default: req.is_default,
        updated_at: now,
    };
    let audit = audit(&actor, now, "plan.update", "plan", &id, details)?;
    let plan = state
        .store
        .update_plan(&id, &patch, &audit)
        .await
        .map_err(name_taken)?
        .ok_or_else(|| ApiError::not_found("plan", &id))?;
    plan_changed(&state, &id).await?;
    Ok(Json(plan.into()))
}

/// Delete a plan no consumer is on.
#[utoipa::path(delete, path = "/v1/plans/{id}", tag = "plans", params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_plan(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let now = state.now();
    let audit = audit(&actor, now, "plan.delete", "plan", &id, json!({}))?;
    match state.store.delete_plan(&id, &audit).await {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::not_found("plan", &id)),
        Err(StoreError::Conflict(m)) => Err(ApiError::new(
            ErrorCode::Conflict,
            format!("{m}; move them to another plan (PATCH /v1/consumers/{{id}} with plan_id) first"),
        )),
        Err(e) => Err(e.into()),
    }
}
