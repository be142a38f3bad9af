//! Usage analytics: verify counts per key (or consumer), outcome code and time bucket.

use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::{Path, State};
use keygate_store::{Granularity, UsageQuery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::AdminCaller;
use crate::error::{ApiError, ApiQuery, ApiResult, ErrorBody};
use crate::routes::common::{load_consumer, load_key};
use crate::state::AppState;
use crate::time::{parse_rfc3339, rfc3339};

/// Most buckets one report may span.
const MAX_BUCKETS: i64 = 10_000;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(key_usage)).routes(routes!(consumer_usage))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// `minute`, `hour` (default) or `day`.
    pub granularity: Option<String>,
    /// RFC 3339 start (default: 1 hour, 24 hours or 30 days before `to`, by granularity).
    pub from: Option<String>,
    /// RFC 3339 end, exclusive (default: now).
    pub to: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageBucket {
    pub start: String,
    pub total: i64,
    /// Count per decision code, e.g. `{"VALID": 120, "RATE_LIMITED": 3}`.
    pub codes: BTreeMap<String, i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub granularity: String,
    pub from: String,
    pub to: String,
    pub total: i64,
    pub codes: BTreeMap<String, i64>,
    /// Buckets with any count, oldest first.
    pub buckets: Vec<UsageBucket>,
}

async fn report(
    state: &AppState,
    key_id: Option<String>,
    consumer_id: Option<String>,
    p: UsageParams,
) -> ApiResult<UsageReport> {
    let granularity = match p.granularity.as_deref() {
        None => Granularity::Hour,
        Some(g) => Granularity::parse(g)
            .ok_or_else(|| ApiError::invalid("granularity", "must be minute, hour or day"))?,
    };
    let time = |field: &str, v: &Option<String>| -> ApiResult<Option<i64>> {
        v.as_deref()
            .map(|t| parse_rfc3339(t).ok_or_else(|| ApiError::invalid(field, "must be an RFC 3339 time")))
            .transpose()
    };
    let to = time("to", &p.to)?.unwrap_or_else(|| state.now() + 1);
    let default_span = match granularity {
        Granularity::Minute => 3_600_000,
        Granularity::Hour => 86_400_000,
        Granularity::Day => 30 * 86_400_000,
    };
    let from = time("from", &p.from)?.unwrap_or(to - default_span);
    if from >= to {
        return Err(ApiError::invalid("from", "must be before to"));
    }
    if (to - from) / granularity.millis() > MAX_BUCKETS {
        return Err(ApiError::invalid(
            "from",
            format!("the range spans more than {MAX_BUCKETS} buckets; use a coarser granularity"),
        ));
    }
    // Counts still in memory go to the database first, so the report is current.
    state.flush().await?;
    let rows = state.store.usage(&UsageQuery { key_id, consumer_id, granularity, from, to }).await?;
    let mut buckets: Vec<UsageBucket> = Vec::new();
    let mut codes = BTreeMap::new();
    let mut total = 0;
    for row in rows {
        let start = rfc3339(row.bucket_start);
        if buckets.last().is_none_or(|b| b.start != start) {
            buckets.push(UsageBucket { start, total: 0, codes: BTreeMap::new() });
        }
        if let Some(b) = buckets.last_mut() {
            b.total += row.count;
            *b.codes.entry(row.code.clone()).or_insert(0) += row.count;
        }
        total += row.count;
        *codes.entry(row.code).or_insert(0) += row.count;
    }
    Ok(UsageReport {
        granularity: granularity.as_str().into(),
        from: rfc3339(from),
        to: rfc3339(to),
        total,
        codes,
        buckets,
    })
}

/// Verify counts of one key, by outcome and time bucket.
#[utoipa::path(get, path = "/v1/keys/{id}/usage", tag = "usage", params(("id" = String, Path), UsageParams),
    responses((status = 200, body = UsageReport), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn key_usage(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> ApiResult<Json<UsageReport>> {
    load_key(&state, &id).await?;
    Ok(Json(report(&state, Some(id), None, p).await?))
}

/// Verify counts of all keys of one consumer, by outcome and time bucket.
#[utoipa::path(get, path = "/v1/consumers/{id}/usage", tag = "usage", params(("id" = String, Path), UsageParams),
    responses((status = 200, body = UsageReport), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn consumer_usage(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> ApiResult<Json<UsageReport>> {
    load_consumer(&state, &id).await?;
    Ok(Json(report(&state, None, Some(id), p).await?))
}
