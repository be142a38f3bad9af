//! Admin API for OAuth clients and JWT signing keys.

use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use keygate_core::{PlainSecret, SecretKind};
use keygate_store::{ClientPatch, GrantType, OAuthClient, StoredSecret, TokenFormat};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::auth::{Actor, AdminCaller};
use crate::error::ApiPath;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, ErrorBody, ErrorCode};
use crate::oauth::keys::{KeyAlg, MAX_TOKEN_LIFETIME_SECONDS};
use crate::routes::common::{
    MAX_OVERLAP_SECONDS, PageQuery, audit, check_name, check_scopes, load_consumer, new_id, next_cursor,
    searched_page,
};
use crate::state::AppState;
use crate::time::rfc3339;

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create_client, list_clients))
        .routes(routes!(get_client, update_client, delete_client))
        .routes(routes!(disable_client))
        .routes(routes!(enable_client))
        .routes(routes!(rotate_secret))
        .routes(routes!(revoke_tokens))
        .routes(routes!(list_signing_keys))
        .routes(routes!(rotate_signing_key))
        .routes(routes!(revoke_signing_key))
}

/// Grant types a client may be allowed.
pub const GRANTS: &[&str] = &[
    "client_credentials",
    "authorization_code",
    "refresh_token",
    "urn:ietf:params:oauth:grant-type:device_code",
    "urn:ietf:params:oauth:grant-type:token-exchange",
];
const _: () = assert!(GRANTS.len() == GrantType::ALL.len(), "GRANTS names every GrantType");
const DEFAULT_LIFETIME: i64 = 3600;

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientView {
    pub client_id: String,
    pub consumer_id: String,
    pub name: String,
    #[schema(value_type = Vec<String>, example = json!(["client_credentials"]))]
    pub grant_types: Vec<GrantType>,
    pub scopes: Vec<String>,
    pub audiences: Vec<String>,
    /// `jwt` or `opaque`.
    #[schema(value_type = String, example = "jwt")]
    pub token_format: TokenFormat,
    pub token_lifetime_seconds: i64,
    pub confidential: bool,
    /// A public client (SPA, mobile or CLI app): no secret, PKCE only.
    pub public: bool,
    pub disabled: bool,
    /// Visible start of the newest client secret.
    pub secret_start: Option<String>,
    /// `client_secret_basic` (also accepts `client_secret_post`), `private_key_jwt`, or `none` (public).
    pub token_endpoint_auth_method: &'static str,
    /// Where the authorization endpoint may send users back (exact match).
    pub redirect_uris: Vec<String>,
    pub refresh_idle_seconds: i64,
    pub refresh_absolute_seconds: i64,
    /// For `private_key_jwt`: the client's public keys.
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<Value>,
    pub tokens_revoked_before: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<OAuthClient> for ClientView {
    fn from(c: OAuthClient) -> Self {
        ClientView {
            client_id: c.id,
            consumer_id: c.consumer_id,
            name: c.name,
            grant_types: c.grant_types,
            scopes: c.scopes,
            audiences: c.audiences,
            token_format: c.token_format,
            token_lifetime_seconds: c.token_lifetime_seconds,
            confidential: c.confidential,
            public: !c.confidential,
            disabled: c.disabled,
            secret_start: c.secret_start,
            token_endpoint_auth_method: if !c.confidential {
                "none"
            } else if c.auth_method == PRIVATE_KEY_JWT {
                PRIVATE_KEY_JWT
            } else {
                "client_secret_basic"
            },
            redirect_uris: c.redirect_uris,
            refresh_idle_seconds: c.refresh_idle_seconds,
            refresh_absolute_seconds: c.refresh_absolute_seconds,
            jwks: c.jwks,
            tokens_revoked_before: c.tokens_revoked_before.map(rfc3339),
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientWithSecret {
    /// Shown this once; Keygate keeps only its SHA-256.
    pub client_secret: Option<String>,
    /// After a rotation: when the previous secret stops working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<String>,
    #[serde(flatten)]
    pub client: ClientView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClientList {
    pub items: Vec<ClientView>,
    pub next_after: Option<String>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateClient {
    pub consumer_id: String,
    pub name: String,
    /// Default: `["client_credentials"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_types: Option<Vec<String>>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Resources (RFC 8707) the client may ask tokens for; they become the token's `aud`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// `jwt` (default) or `opaque`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_format: Option<String>,
    /// 1 to 86400 (default 3600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_lifetime_seconds: Option<i64>,
    /// `client_secret_basic` (default; `client_secret_post` works too) or `private_key_jwt` (RFC 7523:
    /// the client signs a JWT with its own private key; it gets no secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_endpoint_auth_method: Option<String>,
    /// For `private_key_jwt`: the client's public keys as a JWKS, `{"keys": [...]}` (RSA, P-256 or
    /// Ed25519; at most 10; public parts only).
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    /// For the authorization code grant: where users are sent back, compared exactly (no wildcards);
    /// https, http only on loopback hosts, or a private-use scheme of a native app (RFC 8252).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_uris: Vec<String>,
    /// A public client (SPA, mobile or CLI app) gets no secret and authenticates with PKCE only; it may
    /// use only the authorization code and refresh token grants.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// A refresh token unused this long expires: 60 to 31536000 (default 2592000, 30 days).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_idle_seconds: Option<i64>,
    /// Every refresh token of one authorization expires this long after the user consented: 60 to
    /// 31536000 (default 7776000, 90 days).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_absolute_seconds: Option<i64>,
    /// Set only inside Keygate: a client known by its metadata document's URL has that URL as its id.
    #[serde(skip)]
    #[schema(ignore)]
    pub id: Option<String>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateClient {
    /// Replace a `private_key_jwt` client's public keys (to rotate them).
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audiences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_lifetime_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_uris: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_idle_seconds: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_absolute_seconds: Option<i64>,
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// How long the old secret keeps working, in seconds (0 ends it at once).
    #[serde(default)]
    pub overlap_seconds: u64,
}

/// The `private_key_jwt` authentication method (RFC 7523).
pub const PRIVATE_KEY_JWT: &str = "private_key_jwt";

/// A client's JWKS: 1 to 10 public keys Keygate can verify with, each with a `kid` when there are
/// several, and no private parts.
fn check_jwks(v: &Value) -> ApiResult<()> {
    let bad = |m: &str| ApiError::invalid("jwks", m.to_string());
    let keys = v.get("keys").and_then(Value::as_array).ok_or_else(|| bad("must be {\"keys\": [...]}"))?;
    if keys.is_empty() || keys.len() > 10 || v.to_string().len() > 16 * 1024 {
        return Err(bad("must hold 1 to 10 keys, at most 16 KiB"));
    }
    for k in keys {
        if ["d", "p", "q", "dp", "dq", "qi", "k"].iter().any(|f| k.get(f).is_some()) {
            return Err(bad("holds private key material; register only the public keys"));
        }
        if keys.len() > 1 && k.get("kid").and_then(Value::as_str).is_none() {
            return Err(bad("with several keys, each needs a \"kid\""));
        }
        crate::oauth::assertion::decoding_key(k).map_err(|e| bad(&e))?;
    }
    Ok(())
}

fn check_grants(g: &[String]) -> ApiResult<Vec<GrantType>> {
    let parsed: Option<Vec<GrantType>> = g.iter().map(|x| GrantType::parse(x)).collect();
    match parsed {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(ApiError::invalid("grant_types", format!("supported grant types: {}", GRANTS.join(", ")))),
    }
}

fn check_format(f: &str) -> ApiResult<TokenFormat> {
    TokenFormat::parse(f).ok_or_else(|| ApiError::invalid("token_format", "must be jwt or opaque"))
}

fn check_lifetime(s: i64) -> ApiResult<()> {
    if (1..=MAX_TOKEN_LIFETIME_SECONDS).contains(&s) {
        Ok(())
    } else {
        Err(ApiError::invalid("token_lifetime_seconds", format!("must be 1 to {MAX_TOKEN_LIFETIME_SECONDS}")))
    }
}

fn check_audiences(a: &[String]) -> ApiResult<()> {
    if a.len() > 20 || a.iter().any(|x| x.is_empty() || x.len() > 512 || x.chars().any(char::is_control)) {
        return Err(ApiError::invalid("audiences", "at most 20 non-empty URIs of up to 512 characters"));
    }
    Ok(())
}

const DEFAULT_REFRESH_IDLE: i64 = 30 * 86_400;
const DEFAULT_REFRESH_ABSOLUTE: i64 = 90 * 86_400;
const MAX_REFRESH_SECONDS: i64 = 365 * 86_400;

/// Redirect URIs (RFC 9700 §4.1): absolute, no fragment, compared exactly; https, or http on a loopback
/// host, or a private-use scheme with a dot (`com.example.app:/cb`, RFC 8252 §7.1).
fn check_redirect_uris(list: &[String]) -> ApiResult<()> {
    let bad = |m: String| ApiError::invalid("redirect_uris", m);
    if list.len() > 20 {
        return Err(bad("at most 20".into()));
    }
    for u in list {
        if u.len() > 1024 || u.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad(format!("{u:?} is longer than 1024 characters or holds spaces")));
        }
        let parsed = url::Url::parse(u).map_err(|_| bad(format!("{u:?} is not an absolute URI")))?;
        if parsed.fragment().is_some() {
            return Err(bad(format!("{u:?} has a fragment (#…), which redirect URIs must not have")));
        }
        let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        let ok = match parsed.scheme() {
            "https" => true,
            "http" => loopback,
            "javascript" | "data" | "file" | "vbscript" | "blob" | "about" => false,
            other => other.contains('.'),
        };
        if !ok {
            return Err(bad(format!(
                "{u:?}: use https, http on localhost/127.0.0.1/[::1], or a private-use scheme such as com.example.app:/callback"
            )));
        }
    }
    Ok(())
}

fn check_refresh_lifetimes(idle: i64, absolute: i64) -> ApiResult<()> {
    for (field, v) in [("refresh_idle_seconds", idle), ("refresh_absolute_seconds", absolute)] {
        if !(60..=MAX_REFRESH_SECONDS).contains(&v) {
            return Err(ApiError::invalid(field, format!("must be 60 to {MAX_REFRESH_SECONDS}")));
        }
    }
    if idle > absolute {
        return Err(ApiError::invalid("refresh_idle_seconds", "must not exceed refresh_absolute_seconds"));
    }
    Ok(())
}

/// How grants, redirect URIs and the public flag fit together.
fn check_flow(grants: &[GrantType], redirect_uris: &[String], public: bool) -> ApiResult<()> {
    if grants.contains(&GrantType::AuthorizationCode) && redirect_uris.is_empty() {
        return Err(ApiError::invalid(
            "redirect_uris",
            "the authorization_code grant needs at least one redirect URI",
        ));
    }
    if public && grants.contains(&GrantType::ClientCredentials) {
        return Err(ApiError::invalid(
            "grant_types",
            "a public client has no secret, so it cannot use client_credentials; use authorization_code",
        ));
    }
    if public && grants.contains(&GrantType::TokenExchange) {
        return Err(ApiError::invalid(
            "grant_types",
            "token exchange needs a client that can keep a secret; a public client cannot use it",
        ));
    }
    if grants == [GrantType::RefreshToken] {
        return Err(ApiError::invalid(
            "grant_types",
            "refresh_token needs authorization_code or the device grant too",
        ));
    }
    Ok(())
}

async fn load_client(state: &AppState, id: &str) -> ApiResult<OAuthClient> {
    state.store.get_client(id).await?.ok_or_else(|| ApiError::not_found("client", id))
}

/// Register an OAuth client. The `client_secret` is in the response this one time only.
#[utoipa::path(post, path = "/v1/clients", tag = "clients", request_body = CreateClient,
    responses((status = 201, body = ClientWithSecret), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_client(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<CreateClient>,
) -> ApiResult<(StatusCode, Json<ClientWithSecret>)> {
    Ok((StatusCode::CREATED, Json(new_client(&state, &actor, req).await?)))
}

/// The one constructor of OAuth clients: every rule of the admin API, for every way a client is made
/// (the admin API, dynamic registration).
pub(crate) async fn new_client(
    state: &AppState,
    actor: &Actor,
    req: CreateClient,
) -> ApiResult<ClientWithSecret> {
    check_name(&req.name)?;
    let grants = match &req.grant_types {
        Some(g) => check_grants(g)?,
        None => vec![GrantType::ClientCredentials],
    };
    let scopes = check_scopes(req.scopes)?;
    check_audiences(&req.audiences)?;
    let format = req.token_format.as_deref().map(check_format).transpose()?.unwrap_or(TokenFormat::Jwt);
    let lifetime = req.token_lifetime_seconds.unwrap_or(DEFAULT_LIFETIME);
    check_lifetime(lifetime)?;
    let private_key_jwt = match req.token_endpoint_auth_method.as_deref() {
        None | Some("client_secret_basic" | "client_secret_post") => false,
        Some("none") if req.public => false,
        Some(PRIVATE_KEY_JWT) if !req.public => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "token_endpoint_auth_method",
                "must be client_secret_basic, client_secret_post, private_key_jwt, or none with public: true",
            ));
        }
    };
    check_redirect_uris(&req.redirect_uris)?;
    check_flow(&grants, &req.redirect_uris, req.public)?;
    let refresh_idle = req.refresh_idle_seconds.unwrap_or(DEFAULT_REFRESH_IDLE);
    let refresh_absolute = req.refresh_absolute_seconds.unwrap_or(DEFAULT_REFRESH_ABSOLUTE.max(refresh_idle));
    check_refresh_lifetimes(refresh_idle, refresh_absolute)?;
    // A public client has no secret; private_key_jwt clients have keys instead.
    let has_secret = !private_key_jwt && !req.public;
    match (&req.jwks, private_key_jwt) {
        (Some(j), true) => check_jwks(j)?,
        (None, true) => {
            return Err(ApiError::invalid("jwks", "private_key_jwt needs the client's public keys"));
        }
        (Some(_), false) => {
            return Err(ApiError::invalid(
                "jwks",
                "only private_key_jwt clients have keys; set token_endpoint_auth_method",
            ));
        }
        (None, false) => {}
    }
    let consumer = load_consumer(state, &req.consumer_id)
        .await
        .map_err(|e| ApiError { field: Some("consumer_id".into()), ..e })?;
    if consumer.stopped() {
        return Err(ApiError::new(
            ErrorCode::ConsumerDisabled,
            "the consumer is disabled (or its owner suspended); enable it first",
        ));
    }
    let plan = crate::routes::plans::plan_of(state, &consumer).await?;
    crate::routes::plans::check_plan_scopes(plan.as_ref(), "scopes", &scopes)?;
    crate::routes::plans::check_owned_scopes(&consumer, "scopes", &scopes)?;
    let now = state.now();
    let secret = PlainSecret::generate(SecretKind::ClientSecret)
        .map_err(|e| ApiError::internal("random source failed", e))?;
    let id = match req.id {
        Some(id) => id,
        None => new_id("kgc", now)?,
    };
    let consumer_state = consumer.clone();
    let client = OAuthClient {
        id: id.clone(),
        consumer_id: consumer.id,
        name: req.name,
        grant_types: grants,
        scopes,
        audiences: req.audiences,
        token_format: format,
        token_lifetime_seconds: lifetime,
        confidential: !req.public,
        disabled: false,
        tokens_revoked_before: None,
        secret_start: has_secret.then(|| secret.visible_start()),
        auth_method: if private_key_jwt { PRIVATE_KEY_JWT.into() } else { "client_secret".into() },
        jwks: req.jwks,
        redirect_uris: req.redirect_uris,
        refresh_idle_seconds: refresh_idle,
        refresh_absolute_seconds: refresh_absolute,
        created_at: now,
        updated_at: now,
    };
    let key_secret = StoredSecret::new(secret.hash(), &id, &secret.visible_start(), now);
    let details = json!({"consumer_id": client.consumer_id, "name": client.name, "scopes": client.scopes,
        "audiences": client.audiences, "token_format": client.token_format, "public": req.public,
        "redirect_uris": client.redirect_uris});
    let audit = audit(actor, now, "client.create", "client", &id, details)?;
    // A private_key_jwt client has no secret: nothing to store, nothing to show.
    let stored_secret = has_secret.then_some(&key_secret);
    state.store.insert_client(&client, stored_secret, &audit).await?;
    // The consumer as it is now (it may have changed since it was read above); an older snapshot never
    // overwrites a newer one.
    let consumer_now =
        state.store.get_consumer(&client.consumer_id).await.ok().flatten().unwrap_or(consumer_state);
    state.oauth.consumer_changed(&consumer_now);
    state.oauth.client_changed(&client);
    Ok(ClientWithSecret {
        client_secret: has_secret.then(|| secret.expose().to_string()),
        previous_expires_at: None,
        client: client.into(),
    })
}

/// List OAuth clients (never their secrets).
#[utoipa::path(get, path = "/v1/clients", tag = "clients", params(PageQuery),
    responses((status = 200, body = ClientList), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_clients(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<ClientList>> {
    let page = searched_page(q.after, q.limit, q.q)?;
    let items = state.store.list_clients(&page).await?;
    let next_after = next_cursor(&items, page.limit, |c| &c.id);
    Ok(Json(ClientList { items: items.into_iter().map(Into::into).collect(), next_after }))
}

/// Get one OAuth client.
#[utoipa::path(get, path = "/v1/clients/{id}", tag = "clients", params(("id" = String, Path)),
    responses((status = 200, body = ClientView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_client(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ClientView>> {
    Ok(Json(load_client(&state, &id).await?.into()))
}

pub(crate) async fn patch_client(
    state: &AppState,
    actor: &crate::auth::Actor,
    id: &str,
    patch: ClientPatch,
    action: &str,
    details: serde_json::Value,
) -> ApiResult<Json<ClientView>> {
    let audit = audit(actor, patch.updated_at, action, "client", id, details)?;
    let client = state
        .store
        .update_client(id, &patch, &audit)
        .await?
        .ok_or_else(|| ApiError::not_found("client", id))?;
    state.oauth.client_changed(&client);
    Ok(Json(client.into()))
}

/// Change a client's name, grants, scopes, audiences, token format or lifetime.
#[utoipa::path(patch, path = "/v1/clients/{id}", tag = "clients", params(("id" = String, Path)),
    request_body = UpdateClient,
    responses((status = 200, body = ClientView), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_client(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateClient>,
) -> ApiResult<Json<ClientView>> {
    if let Some(n) = &req.name {
        check_name(n)?;
    }
    let grant_types = req.grant_types.as_deref().map(check_grants).transpose()?;
    let scopes = req.scopes.map(check_scopes).transpose()?;
    if let Some(a) = &req.audiences {
        check_audiences(a)?;
    }
    let token_format = req.token_format.as_deref().map(check_format).transpose()?;
    if let Some(l) = req.token_lifetime_seconds {
        check_lifetime(l)?;
    }
    if let Some(j) = &req.jwks {
        check_jwks(j)?;
        if load_client(&state, &id).await?.auth_method != PRIVATE_KEY_JWT {
            return Err(ApiError::invalid("jwks", "only private_key_jwt clients have keys"));
        }
    }
    if let Some(r) = &req.redirect_uris {
        check_redirect_uris(r)?;
    }
    if let Some(s) = &scopes {
        let current = load_client(&state, &id).await?;
        if let Some(consumer) = state.store.get_consumer(&current.consumer_id).await? {
            let plan = crate::routes::plans::plan_of(&state, &consumer).await?;
            crate::routes::plans::check_plan_scopes(plan.as_ref(), "scopes", s)?;
            crate::routes::plans::check_owned_scopes(&consumer, "scopes", s)?;
        }
    }
    if grant_types.is_some()
        || req.redirect_uris.is_some()
        || req.refresh_idle_seconds.is_some()
        || req.refresh_absolute_seconds.is_some()
    {
        let current = load_client(&state, &id).await?;
        let grants = grant_types.as_deref().unwrap_or(&current.grant_types);
        check_flow(
            grants,
            req.redirect_uris.as_deref().unwrap_or(&current.redirect_uris),
            !current.confidential,
        )?;
        check_refresh_lifetimes(
            req.refresh_idle_seconds.unwrap_or(current.refresh_idle_seconds),
            req.refresh_absolute_seconds.unwrap_or(current.refresh_absolute_seconds),
        )?;
    }
    let details = json!({"name": req.name, "scopes": scopes, "audiences": req.audiences,
        "token_format": req.token_format, "jwks_changed": req.jwks.is_some(), "redirect_uris": req.redirect_uris});
    let patch = ClientPatch {
        name: req.name,
        grant_types,
        scopes,
        audiences: req.audiences,
        token_format,
        token_lifetime_seconds: req.token_lifetime_seconds,
        jwks: req.jwks,
        redirect_uris: req.redirect_uris,
        refresh_idle_seconds: req.refresh_idle_seconds,
        refresh_absolute_seconds: req.refresh_absolute_seconds,
        updated_at: state.now(),
        ..ClientPatch::default()
    };
    patch_client(&state, &actor, &id, patch, "client.update", details).await
}

/// Disable a client: it gets no tokens, and its tokens stop verifying.
#[utoipa::path(post, path = "/v1/clients/{id}/disable", tag = "clients", params(("id" = String, Path)),
    responses((status = 200, body = ClientView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn disable_client(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ClientView>> {
    let patch = ClientPatch { disabled: Some(true), updated_at: state.now(), ..ClientPatch::default() };
    patch_client(&state, &actor, &id, patch, "client.disable", json!({})).await
}

/// Enable a disabled client.
#[utoipa::path(post, path = "/v1/clients/{id}/enable", tag = "clients", params(("id" = String, Path)),
    responses((status = 200, body = ClientView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn enable_client(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ClientView>> {
    let patch = ClientPatch { disabled: Some(false), updated_at: state.now(), ..ClientPatch::default() };
    patch_client(&state, &actor, &id, patch, "client.enable", json!({})).await
}

/// Revoke every token issued to a client so far.
#[utoipa::path(post, path = "/v1/clients/{id}/revoke-tokens", tag = "clients", params(("id" = String, Path)),
    responses((status = 200, body = ClientView), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke_tokens(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ClientView>> {
    // Tokens carry their issue time in milliseconds (JWTs in `kg_iat`): the cut-off is exactly now, so
    // a token issued after this call is never caught by it.
    let now = state.now();
    let patch = ClientPatch { tokens_revoked_before: Some(now), updated_at: now, ..ClientPatch::default() };
    patch_client(&state, &actor, &id, patch, "client.revoke_tokens", json!({})).await
}

/// Delete a client, its secrets and its tokens.
#[utoipa::path(delete, path = "/v1/clients/{id}", tag = "clients", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn delete_client(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    remove_client(&state, &actor, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a client (and with it its secrets and tokens); every node's caches forget it.
pub(crate) async fn remove_client(state: &AppState, actor: &Actor, id: &str) -> ApiResult<()> {
    let now = state.now();
    let audit = audit(actor, now, "client.delete", "client", id, json!({}))?;
    if !state.store.delete_client(id, &audit).await? {
        return Err(ApiError::not_found("client", id));
    }
    state.oauth.client_deleted(id);
    Ok(())
}

/// Rotate a client's secret; the old one keeps working for `overlap_seconds`.
#[utoipa::path(post, path = "/v1/clients/{id}/rotate-secret", tag = "clients", params(("id" = String, Path)),
    request_body = RotateSecret,
    responses((status = 200, body = ClientWithSecret), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn rotate_secret(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RotateSecret>,
) -> ApiResult<Json<ClientWithSecret>> {
    if req.overlap_seconds > MAX_OVERLAP_SECONDS {
        return Err(ApiError::invalid("overlap_seconds", "must be at most 30 days"));
    }
    let current = load_client(&state, &id).await?;
    if !current.confidential {
        return Err(ApiError::new(ErrorCode::Conflict, "a public client has no secret to rotate"));
    }
    if current.auth_method == PRIVATE_KEY_JWT {
        return Err(ApiError::new(
            crate::error::ErrorCode::Conflict,
            "a private_key_jwt client has no secret; rotate its keys with PATCH {\"jwks\": …}",
        ));
    }
    let now = state.now();
    let secret = PlainSecret::generate(SecretKind::ClientSecret)
        .map_err(|e| ApiError::internal("random source failed", e))?;
    let new = StoredSecret::new(secret.hash(), &id, &secret.visible_start(), now);
    let old_expires_at = now + req.overlap_seconds as i64 * 1000;
    let audit = audit(
        &actor,
        now,
        "client.rotate_secret",
        "client",
        &id,
        json!({"overlap_seconds": req.overlap_seconds}),
    )?;
    if !state.store.rotate_client_secret(&id, &new, old_expires_at, &audit).await? {
        return Err(ApiError::not_found("client", &id));
    }
    let client = load_client(&state, &id).await?;
    state.oauth.client_changed(&client);
    Ok(Json(ClientWithSecret {
        client_secret: Some(secret.expose().to_string()),
        previous_expires_at: Some(rfc3339(old_expires_at)),
        client: client.into(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKeyView {
    pub kid: String,
    pub alg: String,
    /// `pending` (published, not yet signing), `active`, `retired` (published, not signing), `expired`
    /// or `revoked` (emergency revocation: unpublished, its tokens do not verify).
    pub status: &'static str,
    pub active_from: String,
    pub retired_at: Option<String>,
    pub publish_until: Option<String>,
}

fn key_views(state: &AppState) -> Vec<SigningKeyView> {
    let now = state.now();
    let signer = state.oauth.keys.signer(now).map(|k| k.record.kid.clone());
    state
        .oauth
        .keys
        .records()
        .into_iter()
        .map(|k| SigningKeyView {
            status: if k.revoked_at.is_some() {
                "revoked"
            } else if signer.as_deref() == Some(k.kid.as_str()) {
                "active"
            } else if k.active_from > now {
                "pending"
            } else if k.publish_until.is_some_and(|t| t <= now) {
                "expired"
            } else {
                "retired"
            },
            kid: k.kid,
            alg: k.alg,
            active_from: rfc3339(k.active_from),
            retired_at: k.retired_at.map(rfc3339),
            publish_until: k.publish_until.map(rfc3339),
        })
        .collect()
}

/// The JWT signing keys and their stage.
#[utoipa::path(get, path = "/v1/signing-keys", tag = "clients",
    responses((status = 200, body = Vec<SigningKeyView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn list_signing_keys(
    State(state): State<Arc<AppState>>,
    AdminCaller(_): AdminCaller,
) -> Json<Vec<SigningKeyView>> {
    Json(key_views(&state))
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSigningKey {
    /// Seconds the new key is published before it signs (default: the configured value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish_ahead_seconds: Option<u64>,
    /// `EdDSA`, `ES256` or `RS256` (default: the configured algorithm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

/// Start a signing-key rotation: a new key is published now and signs after `publish_ahead_seconds`.
#[utoipa::path(post, path = "/v1/signing-keys/rotate", tag = "clients", request_body = RotateSigningKey,
    responses((status = 200, body = Vec<SigningKeyView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn rotate_signing_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiJson(req): ApiJson<RotateSigningKey>,
) -> ApiResult<Json<Vec<SigningKeyView>>> {
    let alg = match req.alg.as_deref() {
        None => state.oauth.alg,
        Some(a) => {
            KeyAlg::parse(a).ok_or_else(|| ApiError::invalid("alg", "must be EdDSA, ES256 or RS256"))?
        }
    };
    let ahead = req
        .publish_ahead_seconds
        .map_or(state.config.key_publish_ahead.as_millis() as i64, |s| (s.min(30 * 86_400) * 1000) as i64);
    let now = state.now();
    let audit = audit(
        &actor,
        now,
        "signing_key.rotate",
        "signing_key",
        "-",
        json!({"alg": alg.as_str(), "publish_ahead_ms": ahead}),
    )?;
    state.oauth.keys.rotate(state.store.as_ref(), alg, now, ahead, Some(&audit)).await.map_err(
        |e| match e {
            crate::oauth::keys::KeyError::Store(s) => ApiError::from(s),
            other => ApiError::internal("signing key rotation failed", other),
        },
    )?;
    Ok(Json(key_views(&state)))
}

/// Emergency revocation of a signing key (for example after its key material leaked): it leaves the JWKS
/// now and no token it signed verifies from the next request on; if it was signing, a new key signs at
/// once. Services that validate JWTs offline drop it when they next fetch the JWKS.
#[utoipa::path(post, path = "/v1/signing-keys/{kid}/revoke", tag = "clients", params(("kid" = String, Path)),
    responses((status = 200, body = Vec<SigningKeyView>), (status = "4XX", body = ErrorBody)), security(("bearer" = [])))]
pub async fn revoke_signing_key(
    State(state): State<Arc<AppState>>,
    AdminCaller(actor): AdminCaller,
    ApiPath(kid): ApiPath<String>,
) -> ApiResult<Json<Vec<SigningKeyView>>> {
    let now = state.now();
    let audit = audit(&actor, now, "signing_key.revoke", "signing_key", &kid, json!({}))?;
    let revoked = state
        .oauth
        .keys
        .revoke(state.store.as_ref(), &kid, state.oauth.alg, now, &audit, || {
            state.oauth.signing_key_revoked()
        })
        .await
        .map_err(|e| match e {
            crate::oauth::keys::KeyError::Store(s) => ApiError::from(s),
            other => ApiError::internal("signing key revocation failed", other),
        })?;
    if !revoked {
        return Err(ApiError::not_found("signing key", &kid));
    }
    Ok(Json(key_views(&state)))
}
