//! Admin API: webhook endpoints, their deliveries, the event outbox and the event catalogue.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::events::{EVENT_TYPES, is_event_filter};
use keygate_store::{Delivery, WebhookEndpoint, WebhookPatch};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::auth::AdminCaller;
use crate::error::ApiPath;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, ErrorCode};
use crate::routes::common::*;
use crate::state::AppState;
use crate::time::rfc3339;
use crate::webhooks::{new_secret, seal_context};

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create_webhook, list_webhooks))
        .routes(routes!(get_webhook, update_webhook, delete_webhook))
        .routes(routes!(rotate_webhook_secret))
        .routes(routes!(list_deliveries))
        .routes(routes!(list_events))
        .routes(routes!(event_types))
}

const MAX_FILTERS: usize = 64;

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    /// Event types sent to this endpoint (`*`: all).
    pub events: Vec<String>,
    pub description: Option<String>,
    pub enabled: bool,
    /// Since when every attempt has failed, if they have.
    pub failing_since: Option<String>,
    /// Why Keygate disabled the endpoint, if it did.
    pub disabled_reason: Option<String>,
    /// After a rotation with an overlap: until when the previous secret signs too.
    pub previous_secret_expires_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<WebhookEndpoint> for WebhookView {
    fn from(e: WebhookEndpoint) -> Self {
        WebhookView {
            id: e.id,
            url: e.url,
            events: e.events,
            description: e.description,
            enabled: e.enabled,
            failing_since: e.failing_since.map(rfc3339),
            disabled_reason: e.disabled_reason,
            previous_secret_expires_at: e.previous_secret_until.map(rfc3339),
            created_at: rfc3339(e.created_at),
            updated_at: rfc3339(e.updated_at),
        }
    }
}

/// An endpoint with its signing secret, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookWithSecret {
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// The signing secret (`whsec_…`, Standard Webhooks). Shown only now: store it in the receiver.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub items: Vec<WebhookView>,
    pub next_after: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// Where events are POSTed: https (http only with `webhooks.allow_private`).
    pub url: String,
    /// Event types to send (see `GET /v1/event-types`), or `["*"]` for all.
    pub events: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Default true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWebhook {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// `null` removes it.
    #[serde(skip_serializing_if = "Option::is_none", default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    /// Enabling clears a failure run and Keygate's reason for disabling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub at: String,
    /// The receiver's status code, if it answered.
    pub status_code: Option<u16>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    pub id: i64,
    /// The event's id, sent as `webhook-id` (the same on every attempt).
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (given up).
    pub status: String,
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    pub attempts: Vec<AttemptView>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        DeliveryView {
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type,
            status: d.status,
            next_attempt_at: d.next_attempt_at.map(rfc3339),
            created_at: rfc3339(d.created_at),
            attempts: d
                .attempts
                .into_iter()
                .map(|a| AttemptView {
                    at: rfc3339(a.at),
                    status_code: a.status_code,
                    latency_ms: a.latency_ms,
                    error: a.error,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    pub items: Vec<DeliveryView>,
    /// Pass as `before` for older deliveries; absent on the last page.
    pub next_before: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    pub before: Option<i64>,
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub at: String,
    /// The body receivers get.
    #[schema(value_type = Object)]
    pub payload: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub items: Vec<EventView>,
    pub next_before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    pub before: Option<String>,
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventType {
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub description: &'static str,
}

fn check_events(events: &[String]) -> ApiResult<()> {
    if events.is_empty() || events.len() > MAX_FILTERS {
        return Err(ApiError::invalid("events", format!("list 1–{MAX_FILTERS} event types, or [\"*\"]")));
    }
    if let Some(bad) = events.iter().find(|e| !is_event_filter(e)) {
        let shown: String = bad.chars().take(64).collect();
        return Err(ApiError::invalid(
            "events",
            format!("{shown:?} is not an event type; GET /v1/event-types lists them"),
        ));
    }
    Ok(())
}

fn check_description(d: &str) -> ApiResult<()> {
    if d.chars().count() > 500 || d.chars().any(char::is_control) {
        return Err(ApiError::invalid("description", "at most 500 characters, no control characters"));
    }
    Ok(())
}

/// A URL for the audit log: its query may hold a token of the receiver's.
fn without_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_string()
}

fn check_url(state: &AppState, url: &str) -> ApiResult<String> {
    state.config.webhooks.check_url(url).map(|u| u.to_string()).map_err(|e| ApiError::invalid("url", e))
}

/// A new secret, sealed for `endpoint_id`.
fn sealed_secret(state: &AppState, endpoint_id: &str) -> ApiResult<(String, Vec<u8>)> {
    let (shown, raw) = new_secret().map_err(|e| ApiError::internal("random source failed", e))?;
    let master = state
        .webhooks
        .master()
        .ok_or_else(|| ApiError::internal("sealing a webhook secret", "the master key is not loaded"))?;
    let sealed = master
        .seal(&seal_context(endpoint_id), &raw)
        .map_err(|e| ApiError::internal("sealing a webhook secret", e))?;
    Ok((shown, sealed))
}

async fn load_webhook(state: &AppState, id: &str) -> ApiResult<WebhookEndpoint> {
    state
        .store
        .get_webhook(id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no webhook endpoint with this id"))
}

/// Register a webhook endpoint. Its signing secret is in the answer, and only there.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = CreateWebhook,
    responses((status = 201, body = WebhookWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_webhook(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreateWebhook>,
) -> ApiResult<(StatusCode, Json<WebhookWithSecret>)> {
    let url = check_url(&state, &req.url)?;
    check_events(&req.events)?;
    if let Some(d) = &req.description {
        check_description(d)?;
    }
    let now = state.now();
    let id = new_id("whk", now)?;
    let (secret, secret_sealed) = sealed_secret(&state, &id)?;
    let endpoint = WebhookEndpoint {
        id: id.clone(),
        url,
        events: req.events,
        description: req.description,
        enabled: req.enabled.unwrap_or(true),
        secret_sealed,
        previous_secret_until: None,
        failing_since: None,
        disabled_reason: None,
        created_at: now,
        updated_at: now,
    };
    let details = json!({"url": without_query(&endpoint.url), "events": endpoint.events});
    let audit = audit(&actor, now, "webhook.create", "webhook", &id, details)?;
    state.store.insert_webhook(&endpoint, &audit).await?;
    Ok((StatusCode::CREATED, Json(WebhookWithSecret { webhook: endpoint.into(), secret })))
}

/// List webhook endpoints.
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", params(PageQuery),
    responses((status = 200, body = WebhookList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_webhooks(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<WebhookList>> {
    let page = searched_page(q.after, q.limit, q.q)?;
    let items = state.store.list_webhooks(&page).await?;
    let next_after = next_cursor(&items, page.limit, |w| &w.id);
    Ok(Json(WebhookList { items: items.into_iter().map(Into::into).collect(), next_after }))
}

/// Get one webhook endpoint.
#[utoipa::path(get, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 200, body = WebhookView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_webhook(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<WebhookView>> {
    Ok(Json(load_webhook(&state, &id).await?.into()))
}

/// Change an endpoint's URL, events, description, or enable/disable it.
#[utoipa::path(patch, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    request_body = UpdateWebhook,
    responses((status = 200, body = WebhookView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_webhook(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateWebhook>,
) -> ApiResult<Json<WebhookView>> {
    if req.url.is_none() && req.events.is_none() && req.description.is_none() && req.enabled.is_none() {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "the update changes nothing; send url, events, description or enabled",
        ));
    }
    let url = req.url.as_deref().map(|u| check_url(&state, u)).transpose()?;
    if let Some(events) = &req.events {
        check_events(events)?;
    }
    if let Some(Some(d)) = &req.description {
        check_description(d)?;
    }
    let now = state.now();
    let details =
        json!({"url": url.as_deref().map(without_query), "events": req.events, "enabled": req.enabled});
    let audit = audit(&actor, now, "webhook.update", "webhook", &id, details)?;
    let patch = WebhookPatch {
        url,
        events: req.events,
        description: req.description,
        enabled: req.enabled,
        updated_at: now,
        ..WebhookPatch::default()
    };
    let updated = state
        .store
        .update_webhook(&id, &patch, &audit)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no webhook endpoint with this id"))?;
    state.webhooks.wake.notify_one();
    Ok(Json(updated.into()))
}

/// Delete an endpoint; its pending deliveries are dropped.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_webhook(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let now = state.now();
    let audit = audit(&actor, now, "webhook.delete", "webhook", &id, json!({}))?;
    if !state.store.delete_webhook(&id, &audit).await? {
        return Err(ApiError::new(ErrorCode::NotFound, "no webhook endpoint with this id"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How long the previous secret keeps signing after a rotation.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateWebhookSecret {
    /// 0 (default) to 604800 (7 days): deliveries carry both signatures meanwhile.
    #[serde(default)]
    pub overlap_seconds: u64,
}

const MAX_SECRET_OVERLAP: u64 = 7 * 86_400;

/// Replace an endpoint's signing secret (shown once). With `overlap_seconds`, deliveries carry a
/// signature with each secret until the overlap ends, so the receiver can switch without a gap.
#[utoipa::path(post, path = "/v1/webhooks/{id}/rotate-secret", tag = "webhooks", params(("id" = String, Path)),
    request_body(content = Option<RotateWebhookSecret>),
    responses((status = 200, body = WebhookWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_webhook_secret(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    crate::error::ApiBytes(body): crate::error::ApiBytes,
) -> ApiResult<Json<WebhookWithSecret>> {
    let req: RotateWebhookSecret = optional_json(&body)?;
    if req.overlap_seconds > MAX_SECRET_OVERLAP {
        return Err(ApiError::invalid(
            "overlap_seconds",
            format!("must be at most {MAX_SECRET_OVERLAP} (7 days)"),
        ));
    }
    load_webhook(&state, &id).await?;
    let now = state.now();
    let (secret, sealed) = sealed_secret(&state, &id)?;
    let details = json!({"overlap_seconds": req.overlap_seconds});
    let audit = audit(&actor, now, "webhook.rotate_secret", "webhook", &id, details)?;
    let patch = WebhookPatch {
        secret_sealed: Some(sealed),
        previous_until: (req.overlap_seconds > 0).then(|| now + (req.overlap_seconds * 1000) as i64),
        updated_at: now,
        ..WebhookPatch::default()
    };
    let updated = state
        .store
        .update_webhook(&id, &patch, &audit)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no webhook endpoint with this id"))?;
    Ok(Json(WebhookWithSecret { webhook: updated.into(), secret }))
}

/// An endpoint's deliveries, newest first, each with its attempts (status code, latency, error).
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = String, Path), DeliveryQuery),
    responses((status = 200, body = DeliveryList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_deliveries(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> ApiResult<Json<DeliveryList>> {
    load_webhook(&state, &id).await?;
    let limit = page(None, q.limit)?.limit;
    let items = state.store.list_deliveries(&id, q.before, limit).await?;
    let next_before = (items.len() == limit as usize).then(|| items.last().map(|d| d.id)).flatten();
    Ok(Json(DeliveryList { items: items.into_iter().map(Into::into).collect(), next_before }))
}

/// Events Keygate has recorded (the outbox), newest first.
#[utoipa::path(get, path = "/v1/events", tag = "webhooks", params(EventQuery),
    responses((status = 200, body = EventList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_events(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> ApiResult<Json<EventList>> {
    let limit = page(None, q.limit)?.limit;
    let items = state.store.list_events(q.before.as_deref(), limit).await?;
    let next_before = (items.len() == limit as usize).then(|| items.last().map(|e| e.id.clone())).flatten();
    let items = items
        .into_iter()
        .map(|e| EventView {
            payload: serde_json::from_str(&e.payload).unwrap_or(Value::Null),
            id: e.id,
            event_type: e.event_type,
            at: rfc3339(e.at),
        })
        .collect();
    Ok(Json(EventList { items, next_before }))
}

/// Every event type a webhook can take.
#[utoipa::path(get, path = "/v1/event-types", tag = "webhooks",
    responses((status = 200, body = Vec<EventType>), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn event_types(AdminCaller(_): AdminCaller) -> Json<Vec<EventType>> {
    Json(EVENT_TYPES.iter().map(|(t, d)| EventType { event_type: t, description: d }).collect())
}
