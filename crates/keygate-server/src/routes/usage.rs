//! Usage analytics: verify counts per key (or consumer), outcome code and time bucket.

use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::State;
use keygate_store::{Granularity, KeyTotal, UsageQuery};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::AdminCaller;
use crate::error::ApiPath;
use crate::error::{ApiError, ApiQuery, ApiResult, ErrorBody};
use crate::routes::common::{load_consumer, load_key};
use crate::state::AppState;
use crate::time::{parse_rfc3339, rfc3339};

/// Most buckets one report may span.
const MAX_BUCKETS: i64 = 10_000;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(key_usage))
        .routes(routes!(consumer_usage))
        .routes(routes!(all_usage))
        .routes(routes!(usage_leaders))
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

/// A report's granularity and range, checked.
fn range(state: &AppState, p: &UsageParams) -> ApiResult<(Granularity, i64, i64)> {
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
    Ok((granularity, from, to))
}

async fn report(
    state: &AppState,
    key_id: Option<String>,
    consumer_id: Option<String>,
    p: UsageParams,
) -> ApiResult<UsageReport> {
    let (granularity, from, to) = range(state, &p)?;
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
    ApiPath(id): ApiPath<String>,
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
    ApiPath(id): ApiPath<String>,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> ApiResult<Json<UsageReport>> {
    load_consumer(&state, &id).await?;
    Ok(Json(report(&state, None, Some(id), p).await?))
}

/// Verify counts of every key, by outcome and time bucket.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", params(UsageParams),
    responses((status = 200, body = UsageReport), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn all_usage(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> ApiResult<Json<UsageReport>> {
    Ok(Json(report(&state, None, None, p).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LeaderParams {
    /// `key` (default) or `consumer`.
    pub group: Option<String>,
    /// `volume` (default: all verifications) or `failures` (those not `VALID`).
    pub order: Option<String>,
    /// `minute`, `hour` (default) or `day`.
    pub granularity: Option<String>,
    /// RFC 3339 start (default: 1 hour, 24 hours or 30 days before `to`, by granularity).
    pub from: Option<String>,
    /// RFC 3339 end, exclusive (default: now).
    pub to: Option<String>,
    /// How many, 1–100 (default 10).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeaderView {
    /// Key or consumer id.
    pub id: String,
    /// The key's or consumer's name, while it exists.
    pub name: Option<String>,
    pub total: i64,
    /// Verifications that did not answer `VALID`.
    pub failures: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LeaderBoard {
    pub group: String,
    pub order: String,
    pub from: String,
    pub to: String,
    pub items: Vec<LeaderView>,
}

/// The keys or consumers with the most verifications, or the most failures, in a time range.
#[utoipa::path(get, path = "/v1/usage/leaders", tag = "usage", params(LeaderParams),
    responses((status = 200, body = LeaderBoard), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn usage_leaders(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(p): ApiQuery<LeaderParams>,
) -> ApiResult<Json<LeaderBoard>> {
    let by_consumer = match p.group.as_deref() {
        None | Some("key") => false,
        Some("consumer") => true,
        Some(_) => return Err(ApiError::invalid("group", "must be key or consumer")),
    };
    let by_failures = match p.order.as_deref() {
        None | Some("volume") => false,
        Some("failures") => true,
        Some(_) => return Err(ApiError::invalid("order", "must be volume or failures")),
    };
    let limit = p.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 100"));
    }
    let params = UsageParams { granularity: p.granularity, from: p.from, to: p.to };
    let (granularity, from, to) = range(&state, &params)?;
    let totals = key_totals(&state, granularity, from, to).await?;
    // Per key, or summed per consumer; then the largest first (by id among equals).
    let mut rows: Vec<(String, i64, i64)> = if by_consumer {
        let mut sums: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for t in totals.iter() {
            let s = sums.entry(t.consumer_id.as_str()).or_insert((0, 0));
            (s.0, s.1) = (s.0 + t.total, s.1 + t.failures);
        }
        sums.into_iter().map(|(id, (t, f))| (id.to_string(), t, f)).collect()
    } else {
        totals.iter().map(|t| (t.key_id.clone(), t.total, t.failures)).collect()
    };
    let rank = |r: &(String, i64, i64)| if by_failures { r.2 } else { r.1 };
    rows.retain(|r| rank(r) > 0);
    rows.sort_by(|a, b| rank(b).cmp(&rank(a)).then_with(|| a.0.cmp(&b.0)));
    rows.truncate(limit as usize);
    let mut items = Vec::with_capacity(rows.len());
    for (id, total, failures) in rows {
        let name = if by_consumer {
            state.store.get_consumer(&id).await?.map(|c| c.name)
        } else {
            state.store.get_key(&id).await?.map(|k| k.name)
        };
        items.push(LeaderView { id, name, total, failures });
    }
    Ok(Json(LeaderBoard {
        group: if by_consumer { "consumer" } else { "key" }.into(),
        order: if by_failures { "failures" } else { "volume" }.into(),
        from: rfc3339(from),
        to: rfc3339(to),
        items,
    }))
}

/// Every key's totals in a range, from the database at most 30 seconds ago: the four boards of the
/// console's overview are one read of the range's buckets, not four. Day buckets of days that have ended
/// no longer change, so a range of days is read as its past days (kept an hour) plus today (30 seconds):
/// a 30-day board costs a scan of one day's buckets most of the time, not thirty.
async fn key_totals(state: &AppState, g: Granularity, from: i64, to: i64) -> ApiResult<Arc<Vec<KeyTotal>>> {
    // Ranges are read in whole buckets; only a range that ends on a bucket boundary (as the console's
    // do) is kept, so a caller moving `to` with the clock does not fill the cache.
    let from = g.bucket(from);
    let cache_key = (g.as_str(), from, to);
    let keep = g.bucket(to) == to;
    if let Some(hit) = state.usage_boards.get(&cache_key) {
        return Ok(hit);
    }
    state.flush().await?;
    let read = |from, to| {
        let query = UsageQuery { key_id: None, consumer_id: None, granularity: g, from, to };
        async move { state.store.usage_by_key(&query).await }
    };
    let today = Granularity::Day.bucket(state.now());
    let totals = if g == Granularity::Day && from < today && today < to {
        let past = match state.usage_boards_days.get(&(from, today)) {
            Some(p) => p,
            None => {
                let p = Arc::new(read(from, today).await?);
                state.usage_boards_days.insert((from, today), p.clone());
                p
            }
        };
        let mut sum: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
        for t in past.iter().cloned().chain(read(today, to).await?) {
            let e = sum.entry((t.key_id, t.consumer_id)).or_insert((0, 0));
            (e.0, e.1) = (e.0 + t.total, e.1 + t.failures);
        }
        sum.into_iter()
            .map(|((key_id, consumer_id), (total, failures))| KeyTotal {
                key_id,
                consumer_id,
                total,
                failures,
            })
            .collect()
    } else {
        read(from, to).await?
    };
    let totals = Arc::new(totals);
    if keep {
        state.usage_boards.insert(cache_key, totals.clone());
    }
    Ok(totals)
}
