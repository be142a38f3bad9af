//! Bulk import of existing keys, so that moving to Keygate does not mean rotating every key.
//!
//! Keys come as plaintext (hashed here, never stored) or as SHA-256 hashes. Each item is validated on
//! its own; the valid ones are written in one transaction, the invalid ones are reported by index and
//! write nothing. Imported keys verify like native ones, also without Keygate's prefix and checksum.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use keygate_core::credential::{self, visible_start};
use keygate_core::limits::{Quota, RateLimit};
use keygate_core::{Environment, SecretHash};
use keygate_store::{ApiKey, Consumer, StoredSecret};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::auth::AdminCaller;
use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody, ErrorCode};
use crate::routes::common::{KeySpec, NewKey, SecretSource, audit, new_key};
use crate::state::AppState;

/// Most keys in one import request.
pub const MAX_IMPORT: usize = 10_000;
/// Body limit of the import route (the rest of the API keeps the smaller default).
pub const IMPORT_BODY_LIMIT: usize = 16 * 1024 * 1024;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(import_keys)).layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// 1 to 10,000 keys.
    pub keys: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportItem {
    consumer_id: String,
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    /// The key in plaintext (hashed on arrival)…
    key: Option<String>,
    /// …or its SHA-256, 64 hex digits.
    sha256: Option<String>,
    expires_at: Option<String>,
    environment: Option<Environment>,
    metadata: Option<Value>,
    rate_limits: Option<Vec<RateLimit>>,
    quota: Option<Quota>,
    allowed_ips: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportResult {
    /// Position in the request's `keys`.
    pub index: usize,
    /// The new key's id, if imported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportResponse {
    pub imported: usize,
    pub failed: usize,
    /// One per request item, in order.
    pub results: Vec<ImportResult>,
}

struct Prepared {
    key: ApiKey,
    secret: StoredSecret,
}

/// The consumers the items name, with the plan each is on.
type Consumers = HashMap<String, (Consumer, Option<keygate_store::Plan>)>;

fn prepare(item: ImportItem, consumers: &Consumers, now: i64) -> ApiResult<Prepared> {
    let source = match (item.key, item.sha256) {
        (Some(plain), None) => {
            let environment = credential::classify_import(&plain).map_err(|e| ApiError::invalid("key", e))?;
            SecretSource::Imported { hash: SecretHash::of(&plain), start: visible_start(&plain), environment }
        }
        (None, Some(hex)) => {
            let hash = SecretHash::from_hex(hex.trim())
                .ok_or_else(|| ApiError::invalid("sha256", "must be 64 hexadecimal digits"))?;
            SecretSource::Imported {
                hash,
                start: format!("sha256:{}", &hash.to_hex()[..8]),
                environment: None,
            }
        }
        _ => return Err(ApiError::invalid("key", "give exactly one of key (plaintext) or sha256")),
    };
    let (consumer, plan) = consumers.get(&item.consumer_id).ok_or_else(|| ApiError {
        field: Some("consumer_id".into()),
        ..ApiError::not_found("consumer", &item.consumer_id)
    })?;
    let spec = KeySpec {
        name: item.name,
        scopes: item.scopes,
        environment: item.environment,
        metadata: item.metadata,
        expires_at: item.expires_at,
        rate_limits: item.rate_limits,
        quota: item.quota,
        allowed_ips: item.allowed_ips,
    };
    let NewKey { key, secret, .. } = new_key(spec, consumer, plan.as_ref(), source, now)?;
    Ok(Prepared { key, secret })
}

fn failure(index: usize, e: ApiError) -> ImportResult {
    ImportResult {
        index,
        id: None,
        error: Some(ErrorBody { code: e.code, message: e.message, field: e.field }),
    }
}

/// Import existing keys in bulk, as plaintext or SHA-256 hashes, with a result per item.
#[utoipa::path(post, path = "/v1/keys/import", tag = "keys", request_body = ImportRequest,
    responses((status = 200, body = ImportResponse), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn import_keys(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<ImportRequest>,
) -> ApiResult<Json<ImportResponse>> {
    if req.keys.is_empty() || req.keys.len() > MAX_IMPORT {
        return Err(ApiError::invalid("keys", format!("must hold 1 to {MAX_IMPORT} keys")));
    }
    let now = state.now();
    // Parse every item; look up each distinct consumer once.
    let items: Vec<Result<ImportItem, ApiError>> = req
        .keys
        .into_iter()
        .map(|v| {
            serde_json::from_value(v).map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.to_string()))
        })
        .collect();
    let mut consumers: Consumers = HashMap::new();
    for item in items.iter().flatten() {
        if !consumers.contains_key(&item.consumer_id)
            && let Some(c) = state.store.get_consumer(&item.consumer_id).await?
        {
            let plan = crate::routes::plans::plan_of(&state, &c).await?;
            consumers.insert(c.id.clone(), (c, plan));
        }
    }
    let mut results: Vec<Option<ImportResult>> = Vec::new();
    let mut prepared: Vec<(usize, Prepared)> = Vec::new();
    let mut seen = HashSet::new();
    for (index, item) in items.into_iter().enumerate() {
        match item.and_then(|i| prepare(i, &consumers, now)) {
            Ok(p) if !seen.insert(p.secret.hash) => {
                results.push(Some(failure(index, duplicate("the same key appears earlier in this request"))));
            }
            Ok(p) => {
                results.push(None);
                prepared.push((index, p));
            }
            Err(e) => results.push(Some(failure(index, e))),
        }
    }
    // Keys that already exist, natively or from an earlier import.
    let hashes: Vec<SecretHash> = prepared.iter().map(|(_, p)| p.secret.hash).collect();
    let existing: HashSet<SecretHash> = state.store.existing_hashes(&hashes).await?.into_iter().collect();
    let (taken, fresh): (Vec<_>, Vec<_>) =
        prepared.into_iter().partition(|(_, p)| existing.contains(&p.secret.hash));
    for (index, _) in taken {
        results[index] = Some(failure(index, duplicate("a key with this secret already exists")));
    }
    let mut audits = Vec::with_capacity(fresh.len());
    for (_, p) in &fresh {
        let details = json!({"consumer_id": p.key.consumer_id, "name": p.key.name, "scopes": p.key.scopes, "start": p.key.start});
        audits.push(audit(&actor, now, "key.import", "key", &p.key.id, details)?);
    }
    let rows: Vec<(ApiKey, StoredSecret)> =
        fresh.iter().map(|(_, p)| (p.key.clone(), p.secret.clone())).collect();
    state.store.import_keys(&rows, &audits).await?;
    state.verifier.added(&rows.iter().map(|(_, s)| s.hash).collect::<Vec<_>>());
    for (index, p) in fresh {
        results[index] = Some(ImportResult { index, id: Some(p.key.id), error: None });
    }
    let results: Vec<ImportResult> = results.into_iter().flatten().collect();
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    Ok(Json(ImportResponse { imported: results.len() - failed, failed, results }))
}

fn duplicate(message: &str) -> ApiError {
    ApiError { field: Some("key".into()), ..ApiError::new(ErrorCode::DuplicateKey, message) }
}
