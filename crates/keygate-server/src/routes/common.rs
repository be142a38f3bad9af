//! What the admin routes share: paging, ids, audit events, input checks, loading by id, and the rule
//! that an installation always keeps one working admin key, and the one constructor of new API keys
//! ([`new_key`]).

use keygate_core::limits::{Quota, RateLimit, parse_allowed_ips, validate_quota, validate_rate_limits};
use keygate_core::validate::{validate_metadata, validate_name};
use keygate_core::{Environment, PlainSecret, SecretHash, SecretKind, id, scope};
use keygate_store::{ApiKey, Consumer, NewAudit, Page, StoredSecret};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use utoipa::IntoParams;

use crate::auth::Actor;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::state::AppState;
use crate::time::parse_rfc3339;

/// Longest overlap window of a rotation: 30 days.
pub const MAX_OVERLAP_SECONDS: u64 = 30 * 24 * 3600;
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Continue after this id (the previous page's `next_after`).
    pub after: Option<String>,
    /// Page size, 1–1000 (default 100).
    pub limit: Option<u32>,
    /// Only records whose name starts with this (ignoring case), or whose id is exactly this.
    pub q: Option<String>,
}

/// Longest search term a listing takes.
pub const MAX_SEARCH: usize = 200;

pub fn page(after: Option<String>, limit: Option<u32>) -> ApiResult<Page> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("must be between 1 and {MAX_PAGE}")));
    }
    Ok(Page { after, limit, search: None })
}

/// A page of a listing that can be searched (`q`).
pub fn searched_page(after: Option<String>, limit: Option<u32>, q: Option<String>) -> ApiResult<Page> {
    if q.as_ref().is_some_and(|q| q.len() > MAX_SEARCH) {
        return Err(ApiError::invalid("q", format!("must be at most {MAX_SEARCH} bytes")));
    }
    Ok(Page { search: q.filter(|q| !q.trim().is_empty()), ..page(after, limit)? })
}

pub fn next_cursor<T>(items: &[T], limit: u32, id: impl Fn(&T) -> &str) -> Option<String> {
    if items.len() == limit as usize { items.last().map(|i| id(i).to_string()) } else { None }
}

pub fn new_id(prefix: &str, now: i64) -> ApiResult<String> {
    id::new_id(prefix, now).map_err(|e| ApiError::internal("random source failed", e))
}

pub fn audit(
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
        ip: actor.ip.map(|i| i.to_string()),
        details,
    })
}

/// A JSON body that may be left out (no body, or only whitespace, is `T::default()`).
pub fn optional_json<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::new(ErrorCode::InvalidRequest, e.to_string())
        } else {
            ApiError::new(ErrorCode::MalformedJson, format!("the body is not valid JSON: {e}"))
        }
    })
}

pub fn check_name(name: &str) -> ApiResult<()> {
    validate_name(name).map_err(|e| ApiError::invalid("name", e))
}

pub fn check_metadata(metadata: &Value) -> ApiResult<()> {
    validate_metadata(metadata).map_err(|e| ApiError::invalid("metadata", e))
}

pub fn check_scopes(scopes: Vec<String>) -> ApiResult<Vec<String>> {
    scope::normalize_scopes(scopes).map_err(|e| ApiError::invalid("scopes", e))
}

pub fn check_rate_limits(limits: &[RateLimit]) -> ApiResult<()> {
    validate_rate_limits(limits).map_err(|e| ApiError::invalid("rate_limits", e))
}

pub fn check_quota(quota: &Quota) -> ApiResult<()> {
    validate_quota(quota).map_err(|e| ApiError::invalid("quota", e))
}

/// Validates an allow-list and returns it normalised (`10.1.2.3/8` → `10.0.0.0/8`).
pub fn check_ips(entries: &[String]) -> ApiResult<Vec<String>> {
    parse_allowed_ips(entries)
        .map(|nets| nets.iter().map(ToString::to_string).collect())
        .map_err(|e| ApiError::invalid("allowed_ips", e))
}

pub fn check_expiry(value: &str, now: i64) -> ApiResult<i64> {
    let t = parse_rfc3339(value).ok_or_else(|| {
        ApiError::invalid("expires_at", "must be an RFC 3339 time, e.g. 2030-01-31T00:00:00Z")
    })?;
    if t <= now {
        return Err(ApiError::invalid("expires_at", "must be in the future"));
    }
    Ok(t)
}

pub async fn load_consumer(state: &AppState, id: &str) -> ApiResult<Consumer> {
    state.store.get_consumer(id).await?.ok_or_else(|| ApiError::not_found("consumer", id))
}

pub async fn load_key(state: &AppState, id: &str) -> ApiResult<ApiKey> {
    state.store.get_key(id).await?.ok_or_else(|| ApiError::not_found("key", id))
}

pub fn key_revoked() -> ApiError {
    ApiError::new(ErrorCode::KeyRevoked, "the key is revoked; revocation is permanent, create a new key")
}

/// Refuses a change after which no key could use the admin API. `stays` says which of today's working
/// admin keys (id, consumer id) still work after the change. Changes that could take away admin access
/// run one at a time, on this node and (on a shared database) across all nodes: hold the returned guard
/// until the change is written, so that two concurrent revocations cannot each leave the other as "the
/// last one".
pub async fn keep_an_admin_key<'a>(
    state: &'a AppState,
    now: i64,
    stays: impl Fn(&str, &str) -> bool,
) -> ApiResult<AdminChangeGuard<'a>> {
    let node = state.admin_changes.lock().await;
    let cluster = state.store.exclusive("admin_changes").await?;
    let working = state.store.working_admin_keys(now, 1000).await?;
    if working.iter().any(|(k, c)| stays(k, c)) {
        return Ok(AdminChangeGuard { _node: node, _cluster: cluster });
    }
    Err(ApiError::new(
        ErrorCode::Conflict,
        "this would leave no working admin key: this is the last admin key; create another first \
         (keygate keys create --consumer <system consumer> --scope keygate:admin) or use `keygate admin-key` \
         on the server",
    ))
}

/// Held while a change that could take away admin access is written (see [`keep_an_admin_key`]).
pub struct AdminChangeGuard<'a> {
    _node: tokio::sync::MutexGuard<'a, ()>,
    _cluster: Box<dyn std::any::Any + Send>,
}

/// Everything a new API key can be given, as a request states it (not yet checked).
#[derive(Debug, Default)]
pub struct KeySpec {
    pub name: String,
    pub scopes: Vec<String>,
    pub environment: Option<Environment>,
    pub metadata: Option<Value>,
    /// RFC 3339, in the future.
    pub expires_at: Option<String>,
    pub rate_limits: Option<Vec<RateLimit>>,
    pub quota: Option<Quota>,
    pub allowed_ips: Option<Vec<String>>,
}

/// Where a new key's secret comes from.
pub enum SecretSource {
    /// Generated now; the plaintext is returned once.
    Generate,
    /// Brought in by import: only its hash is known, and what it shows of itself.
    Imported { hash: SecretHash, start: String, environment: Option<Environment> },
}

/// A key ready to store, with its secret (and the plaintext, when it was generated).
pub struct NewKey {
    pub key: ApiKey,
    pub secret: StoredSecret,
    pub plain: Option<PlainSecret>,
}

/// The one way a key is made (admin API, import, bootstrap and `keygate admin-key`): every field checked
/// by the same rules, the consumer must be enabled, and the secret made or taken as `source` says.
pub fn new_key(
    spec: KeySpec,
    consumer: &Consumer,
    plan: Option<&keygate_store::Plan>,
    source: SecretSource,
    now: i64,
) -> ApiResult<NewKey> {
    check_name(&spec.name)?;
    let scopes = check_scopes(spec.scopes)?;
    crate::routes::plans::check_plan_scopes(plan, "scopes", &scopes)?;
    crate::routes::plans::check_owned_scopes(consumer, "scopes", &scopes)?;
    let expires_at = spec.expires_at.as_deref().map(|t| check_expiry(t, now)).transpose()?;
    let (expires_at, quota) = crate::routes::plans::plan_key_terms(plan, expires_at, spec.quota, now)?;
    let metadata = spec.metadata.unwrap_or_else(|| json!({}));
    check_metadata(&metadata)?;
    if let Some(limits) = &spec.rate_limits {
        check_rate_limits(limits)?;
    }
    if let Some(quota) = &quota {
        check_quota(quota)?;
    }
    let allowed_ips = spec.allowed_ips.as_deref().map(check_ips).transpose()?;
    if consumer.stopped() {
        return Err(ApiError {
            field: Some("consumer_id".into()),
            ..ApiError::new(
                ErrorCode::ConsumerDisabled,
                if consumer.disabled {
                    "the consumer is disabled; enable it before adding keys to it"
                } else {
                    "the consumer's owner is suspended; enable the user before adding keys to it"
                },
            )
        });
    }
    let (plain, hash, start, environment, imported) = match source {
        SecretSource::Generate => {
            let environment = spec.environment.unwrap_or(Environment::Live);
            let plain = PlainSecret::generate(SecretKind::ApiKey(environment))
                .map_err(|e| ApiError::internal("random source failed", e))?;
            let (hash, start) = (plain.hash(), plain.visible_start());
            (Some(plain), hash, start, environment, false)
        }
        SecretSource::Imported { hash, start, environment } => {
            (None, hash, start, environment.or(spec.environment).unwrap_or(Environment::Live), true)
        }
    };
    let mut key = ApiKey::new(
        new_id("key", now)?,
        consumer.id.clone(),
        spec.name,
        environment,
        scopes,
        metadata,
        expires_at,
        start,
        now,
    );
    key.rate_limits = spec.rate_limits;
    key.quota_refilled_at = quota.as_ref().map(|_| now);
    key.quota = quota;
    key.allowed_ips = allowed_ips;
    key.imported = imported;
    let secret = StoredSecret::new(hash, &key.id, &key.start, now);
    Ok(NewKey { key, secret, plain })
}
