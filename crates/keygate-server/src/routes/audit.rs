//! Admin API: the audit log, newest first.

use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::State;
use keygate_store::{AuditEvent, AuditFilter};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::auth::AdminCaller;
use crate::error::{ApiError, ApiQuery, ApiResult, ErrorBody};
use crate::routes::common::*;
use crate::state::AppState;
use crate::time::{parse_rfc3339, rfc3339};

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(list_audit))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    pub id: String,
    pub at: String,
    /// Id of the key that made the change, or `system`.
    pub actor: String,
    /// The name of that key, while it exists.
    pub actor_name: Option<String>,
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
            actor_name: e.actor_name,
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only events about this consumer or key.
    pub target_id: Option<String>,
    /// Only this action, e.g. `key.revoke`.
    pub action: Option<String>,
    /// Only events made by this actor: a key id, or `system`.
    pub actor: Option<String>,
    /// RFC 3339: only events at or after this time.
    pub from: Option<String>,
    /// RFC 3339: only events before this time.
    pub to: Option<String>,
    /// Continue with events older than this id (the previous page's `next_before`).
    pub before: Option<String>,
    pub limit: Option<u32>,
}

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
    let time = |field: &str, v: Option<String>| -> ApiResult<Option<i64>> {
        v.map(|t| parse_rfc3339(&t).ok_or_else(|| ApiError::invalid(field, "must be an RFC 3339 time")))
            .transpose()
    };
    let filter = AuditFilter {
        target_id: q.target_id,
        action: q.action,
        actor: q.actor,
        from: time("from", q.from)?,
        to: time("to", q.to)?,
        before: q.before,
        limit: page.limit,
    };
    let items = state.store.list_audit(&filter).await?;
    let next_before = next_cursor(&items, page.limit, |e| &e.id);
    Ok(Json(AuditList { items: items.into_iter().map(Into::into).collect(), next_before }))
}
