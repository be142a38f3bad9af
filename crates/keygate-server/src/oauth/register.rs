//! Dynamic client registration (RFC 7591) and its management (RFC 7592), for clients nobody registered
//! by hand: AI agents and other MCP clients. Off by default; open, or behind an initial access token.
//! Registered clients are made by the same constructor as the admin API's (`routes::clients::new_client`)
//! and live under one consumer, "Registered clients", where the operator sees, limits, disables or
//! deletes them like any other.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keygate_core::{PlainSecret, SecretHash, SecretKind};
use keygate_store::{ClientPatch, Consumer, ConsumerLookup};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::error::{OAuthError, OAuthErrorCode, OAuthPath};
use crate::auth::{Actor, ClientIp};
use crate::error::ApiError;
use crate::routes::clients::{CreateClient, new_client};
use crate::state::AppState;

/// Who may register clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RegistrationMode {
    /// No registration endpoint (the default).
    #[default]
    Off,
    /// Anyone (rate-limited per address).
    Open,
    /// Only with the operator's initial access token (RFC 7591 §3).
    Token,
}

impl RegistrationMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "open" => Some(Self::Open),
            "token" => Some(Self::Token),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Open => "open",
            Self::Token => "token",
        }
    }
}

/// Dynamic registration settings.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub mode: RegistrationMode,
    /// For `token` mode: the initial access token registrations must present.
    pub initial_token: Option<String>,
    /// The scopes a registered client may ask for (its default: all of them).
    pub scopes: Vec<String>,
    /// Registrations one address may make per hour.
    pub per_hour: u64,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            mode: RegistrationMode::Off,
            initial_token: None,
            scopes: Vec::new(),
            per_hour: 20,
        }
    }
}

/// The consumer registered clients belong to, found by this external id.
const REGISTERED_CONSUMER: &str = "keygate:registered-clients";
const ACTOR: &str = "oauth2/register";
const MAX_REDIRECT_URIS: usize = 10;

/// RFC 7591 §2 client metadata. Fields Keygate does not use (`client_uri`, `logo_uri`, `contacts`,
/// `software_id`, …) are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct ClientMetadata {
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    pub token_endpoint_auth_method: Option<String>,
    pub grant_types: Option<Vec<String>>,
    pub response_types: Option<Vec<String>>,
    pub client_name: Option<String>,
    /// Space-separated.
    pub scope: Option<String>,
}

fn bad_metadata(msg: impl Into<String>) -> OAuthError {
    OAuthError::new(OAuthErrorCode::InvalidClientMetadata, msg)
}

/// Registration's own redirect-URI rule, stricter than the admin API's: https, or http on a loopback
/// address (any port, RFC 8252 §7.3); no wildcards, fragments or credentials.
pub fn check_registered_redirect(u: &str) -> Result<(), OAuthError> {
    let bad = |m: String| OAuthError::new(OAuthErrorCode::InvalidRedirectUri, m);
    if u.len() > 1024 || u.contains('*') {
        return Err(bad(format!("{u:?}: at most 1024 characters, no wildcards")));
    }
    let parsed = url::Url::parse(u).map_err(|_| bad(format!("{u:?} is not an absolute URL")))?;
    let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if !(parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback)) {
        return Err(bad(format!(
            "{u:?}: registered clients redirect to https, or http on a loopback address"
        )));
    }
    if parsed.fragment().is_some() || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(format!("{u:?}: no fragment or credentials")));
    }
    Ok(())
}

/// Turns RFC 7591 metadata into the admin API's request, checking registration's own limits.
fn to_request(state: &AppState, m: ClientMetadata, consumer_id: String) -> Result<CreateClient, OAuthError> {
    if m.redirect_uris.is_empty() || m.redirect_uris.len() > MAX_REDIRECT_URIS {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidRedirectUri,
            format!("register 1 to {MAX_REDIRECT_URIS} redirect_uris"),
        ));
    }
    for u in &m.redirect_uris {
        check_registered_redirect(u)?;
    }
    let grants = m.grant_types.unwrap_or_else(|| vec!["authorization_code".into(), "refresh_token".into()]);
    if grants.is_empty() || grants.iter().any(|g| g != "authorization_code" && g != "refresh_token") {
        return Err(bad_metadata(
            "grant_types: registered clients use authorization_code (and refresh_token)",
        ));
    }
    if !grants.iter().any(|g| g == "authorization_code") {
        return Err(bad_metadata("grant_types must include authorization_code"));
    }
    if m.response_types.as_ref().is_some_and(|r| r.iter().any(|t| t != "code")) {
        return Err(bad_metadata("response_types: only code"));
    }
    let public = match m.token_endpoint_auth_method.as_deref() {
        None | Some("none") => true,
        Some("client_secret_basic" | "client_secret_post") => false,
        Some(other) => {
            let shown: String = other.chars().take(40).collect();
            return Err(bad_metadata(format!(
                "token_endpoint_auth_method {shown:?}: use none, client_secret_basic or client_secret_post"
            )));
        }
    };
    let allowed = &state.config.registration.scopes;
    let scopes: Vec<String> = match m.scope.as_deref() {
        None => allowed.clone(),
        Some(s) => {
            let asked: Vec<String> = s.split(' ').filter(|x| !x.is_empty()).map(str::to_owned).collect();
            if let Some(no) = asked.iter().find(|a| !allowed.contains(a)) {
                let shown: String = no.chars().take(64).collect();
                return Err(bad_metadata(format!("scope {shown:?} is not open to registered clients")));
            }
            asked
        }
    };
    let name = m.client_name.unwrap_or_else(|| "Registered client".into());
    keygate_core::validate::validate_name(&name).map_err(|e| bad_metadata(format!("client_name: {e}")))?;
    Ok(CreateClient {
        consumer_id,
        name,
        grant_types: Some(grants),
        scopes,
        // The protected resources this server guards: an agent asks for the one it wants (RFC 8707).
        audiences: state.config.protected_resources.clone(),
        redirect_uris: m.redirect_uris,
        public,
        token_endpoint_auth_method: (!public).then(|| "client_secret_basic".into()),
        ..CreateClient::default()
    })
}

/// The consumer of registered clients, made on first use.
pub(crate) async fn registered_consumer(state: &AppState) -> Result<Consumer, OAuthError> {
    let lookup = ConsumerLookup::ExternalId(REGISTERED_CONSUMER);
    if let Some(c) = state.store.find_consumer(lookup).await? {
        return Ok(c);
    }
    let now = state.now();
    let id = keygate_core::id::new_id("cons", now)
        .map_err(|e| OAuthError::new(OAuthErrorCode::ServerError, e.to_string()))?;
    let consumer = Consumer {
        external_id: Some(REGISTERED_CONSUMER.into()),
        ..Consumer::new(
            id.clone(),
            "Registered clients".into(),
            json!({"note": "OAuth clients that registered themselves (RFC 7591) or introduced themselves with a metadata document"}),
            now,
        )
    };
    let audit = crate::routes::common::audit(
        &system_actor(None),
        now,
        "consumer.create",
        "consumer",
        &id,
        json!({"name": consumer.name, "external_id": consumer.external_id}),
    )
    .map_err(api_to_oauth)?;
    match state.store.insert_consumer(&consumer, &audit).await {
        Ok(()) => Ok(consumer),
        // Made by a concurrent registration meanwhile.
        Err(keygate_store::StoreError::Conflict(_)) => {
            state.store.find_consumer(lookup).await?.ok_or_else(|| {
                OAuthError::new(OAuthErrorCode::ServerError, "the registered-clients consumer vanished")
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Did this client register itself, or introduce itself with a metadata document? (Such clients must
/// name the one resource they want, and always ask the user.)
pub(crate) async fn is_self_registered(state: &AppState, client: &keygate_store::OAuthClient) -> bool {
    super::metadata_doc::is_document_id(&client.id)
        || state
            .store
            .get_consumer(&client.consumer_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| c.external_id.as_deref() == Some(REGISTERED_CONSUMER))
}

fn system_actor(ip: Option<std::net::IpAddr>) -> Actor {
    Actor { key_id: ACTOR.into(), ip }
}

pub(crate) fn api_to_oauth(e: ApiError) -> OAuthError {
    let code = match e.code.status() {
        StatusCode::SERVICE_UNAVAILABLE => OAuthErrorCode::TemporarilyUnavailable,
        StatusCode::INTERNAL_SERVER_ERROR => OAuthErrorCode::ServerError,
        _ if e.field.as_deref() == Some("redirect_uris") => OAuthErrorCode::InvalidRedirectUri,
        _ => OAuthErrorCode::InvalidClientMetadata,
    };
    OAuthError::new(code, e.message)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn same_secret(a: &str, b: &str) -> bool {
    SecretHash::of(a).as_bytes().ct_eq(SecretHash::of(b).as_bytes()).into()
}

/// The registration response (RFC 7591 §3.2.1, RFC 7592 §3): the client's metadata as registered.
fn client_info(state: &AppState, c: &keygate_store::OAuthClient) -> Value {
    json!({
        "client_id": c.id,
        "client_id_issued_at": c.created_at / 1000,
        "client_name": c.name,
        "redirect_uris": c.redirect_uris,
        "grant_types": c.grant_types.iter().map(|g| g.as_str()).collect::<Vec<_>>(),
        "response_types": ["code"],
        "token_endpoint_auth_method": if c.confidential { "client_secret_basic" } else { "none" },
        "scope": c.scopes.join(" "),
        "registration_client_uri": format!("{}/oauth2/register/{}", state.oauth.issuer(), c.id),
    })
}

fn no_store(status: StatusCode, body: Value) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    resp
}

/// Register a client (RFC 7591). Returns its `client_id`, a `client_secret` for confidential clients,
/// and a `registration_access_token` to read, update or delete the registration (RFC 7592).
#[utoipa::path(post, path = "/oauth2/register", tag = "oauth2",
    responses((status = 201, description = "registered"), (status = 400, description = "invalid_redirect_uri or invalid_client_metadata"),
              (status = 401, description = "invalid_token: the initial access token is missing or wrong"),
              (status = 404, description = "registration is off"), (status = 429, description = "slow_down: too many registrations from this address")))]
pub async fn register(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    super::OAuthBody(body): super::OAuthBody,
) -> Result<Response, OAuthError> {
    let config = &state.config.registration;
    match config.mode {
        RegistrationMode::Off => {
            return Ok(not_found("dynamic client registration is off here (oauth.registration)".into()));
        }
        RegistrationMode::Token => {
            if let Some(retry) = state.throttle.blocked(client.accountable, state.now()) {
                return Err(OAuthError::new(
                    OAuthErrorCode::SlowDown,
                    format!("too many failed attempts; retry in {} s", retry / 1000 + 1),
                ));
            }
            let ok = matches!((bearer(&headers), config.initial_token.as_deref()), (Some(t), Some(want)) if same_secret(t, want));
            if !ok {
                state.throttle.record_failure(client.accountable, state.now());
                return Err(OAuthError::new(
                    OAuthErrorCode::InvalidToken,
                    "registration needs the initial access token (Authorization: Bearer …)",
                ));
            }
        }
        RegistrationMode::Open => {}
    }
    let now = state.now();
    // Checked and spent at once, refused attempts too: a flood cannot overdraw it.
    if !state.registrations.try_take(client.accountable, now) {
        return Err(OAuthError::new(
            OAuthErrorCode::SlowDown,
            "too many registrations from this address; try again later",
        ));
    }
    let metadata: ClientMetadata = serde_json::from_slice(&body)
        .map_err(|_| bad_metadata("send the client metadata as a JSON object (RFC 7591 section 2)"))?;
    let consumer = registered_consumer(&state).await?;
    let req = to_request(&state, metadata, consumer.id)?;
    let made = new_client(&state, &system_actor(client.ip), req).await.map_err(api_to_oauth)?;
    let id = made.client.client_id.clone();
    let token = PlainSecret::generate(SecretKind::ClientSecret)
        .map_err(|e| OAuthError::new(OAuthErrorCode::ServerError, e.to_string()))?;
    if let Err(e) = state.store.set_registration_token(&id, &token.hash(), now).await {
        // No way to manage it: take the client away again rather than leave it half made.
        let audit = crate::routes::common::audit(
            &system_actor(client.ip),
            now,
            "client.delete",
            "client",
            &id,
            json!({"reason": "registration failed"}),
        )
        .map_err(api_to_oauth)?;
        let _ = state.store.delete_client(&id, &audit).await;
        return Err(e.into());
    }
    let stored = state
        .store
        .get_client(&id)
        .await?
        .ok_or_else(|| OAuthError::new(OAuthErrorCode::ServerError, "the registered client vanished"))?;
    let mut body = client_info(&state, &stored);
    body["registration_access_token"] = json!(token.expose());
    if let Some(secret) = made.client_secret {
        body["client_secret"] = json!(secret);
        body["client_secret_expires_at"] = json!(0);
    }
    Ok(no_store(StatusCode::CREATED, body))
}

fn not_found(message: String) -> Response {
    ApiError::new(crate::error::ErrorCode::NotFound, message).into_response()
}

/// The client a registration access token manages, or `invalid_token`.
async fn managed(
    state: &AppState,
    headers: &HeaderMap,
    client_id: &str,
    accountable: Option<std::net::IpAddr>,
) -> Result<keygate_store::OAuthClient, OAuthError> {
    if state.config.registration.mode == RegistrationMode::Off {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidRequest,
            "dynamic client registration is off here",
        ));
    }
    if let Some(retry) = state.throttle.blocked(accountable, state.now()) {
        return Err(OAuthError::new(
            OAuthErrorCode::SlowDown,
            format!("too many failed attempts; retry in {} s", retry / 1000 + 1),
        ));
    }
    let refuse = || {
        state.throttle.record_failure(accountable, state.now());
        OAuthError::new(OAuthErrorCode::InvalidToken, "a registration access token for this client is needed")
    };
    let Some(presented) = bearer(headers) else { return Err(refuse()) };
    let Some(stored) = state.store.registration_token(client_id).await? else { return Err(refuse()) };
    if !bool::from(SecretHash::of(presented).as_bytes().ct_eq(stored.as_bytes())) {
        return Err(refuse());
    }
    state.store.get_client(client_id).await?.ok_or_else(refuse)
}

/// Read a registration (RFC 7592 §2.1).
#[utoipa::path(get, path = "/oauth2/register/{client_id}", tag = "oauth2", params(("client_id" = String, Path)),
    responses((status = 200, description = "the client's metadata"), (status = 401, description = "invalid_token")))]
pub async fn read_registration(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    OAuthPath(client_id): OAuthPath<String>,
    headers: HeaderMap,
) -> Result<Response, OAuthError> {
    let c = managed(&state, &headers, &client_id, client.accountable).await?;
    Ok(no_store(StatusCode::OK, client_info(&state, &c)))
}

/// Update a registration (RFC 7592 §2.2): the metadata sent replaces what was registered; the answer
/// carries a new registration access token (the old one stops working).
#[utoipa::path(put, path = "/oauth2/register/{client_id}", tag = "oauth2", params(("client_id" = String, Path)),
    responses((status = 200, description = "the client's new metadata"), (status = 400, description = "invalid_redirect_uri or invalid_client_metadata"), (status = 401, description = "invalid_token")))]
pub async fn update_registration(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    OAuthPath(client_id): OAuthPath<String>,
    headers: HeaderMap,
    super::OAuthBody(body): super::OAuthBody,
) -> Result<Response, OAuthError> {
    let current = managed(&state, &headers, &client_id, client.accountable).await?;
    let metadata: ClientMetadata = serde_json::from_slice(&body)
        .map_err(|_| bad_metadata("send the client metadata as a JSON object (RFC 7592 section 2.2)"))?;
    let wanted_public = matches!(metadata.token_endpoint_auth_method.as_deref(), None | Some("none"));
    if wanted_public == current.confidential {
        return Err(bad_metadata("token_endpoint_auth_method cannot change; register a new client"));
    }
    let req = to_request(&state, metadata, current.consumer_id.clone())?;
    let now = state.now();
    let grants = req
        .grant_types
        .unwrap_or_default()
        .iter()
        .filter_map(|g| keygate_store::GrantType::parse(g))
        .collect();
    let patch = ClientPatch {
        name: Some(req.name),
        grant_types: Some(grants),
        scopes: Some(req.scopes),
        redirect_uris: Some(req.redirect_uris),
        updated_at: now,
        ..ClientPatch::default()
    };
    let details = json!({"via": "registration management (RFC 7592)"});
    let _ = crate::routes::clients::patch_client(
        &state,
        &system_actor(client.ip),
        &client_id,
        patch,
        "client.update",
        details,
    )
    .await
    .map_err(api_to_oauth)?;
    let c = state
        .store
        .get_client(&client_id)
        .await?
        .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidToken, "the client is gone"))?;
    // A new registration access token with every update (RFC 7592 §2.2): the old one stops, so a
    // leaked token is good at most until the client's next update.
    let token = PlainSecret::generate(SecretKind::ClientSecret)
        .map_err(|e| OAuthError::new(OAuthErrorCode::ServerError, e.to_string()))?;
    state.store.set_registration_token(&client_id, &token.hash(), now).await?;
    let mut body = client_info(&state, &c);
    body["registration_access_token"] = json!(token.expose());
    Ok(no_store(StatusCode::OK, body))
}

/// Delete a registration (RFC 7592 §2.3): the client and its tokens stop working.
#[utoipa::path(delete, path = "/oauth2/register/{client_id}", tag = "oauth2", params(("client_id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 401, description = "invalid_token")))]
pub async fn delete_registration(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    OAuthPath(client_id): OAuthPath<String>,
    headers: HeaderMap,
) -> Result<Response, OAuthError> {
    managed(&state, &headers, &client_id, client.accountable).await?;
    crate::routes::clients::remove_client(&state, &system_actor(client.ip), &client_id)
        .await
        .map_err(api_to_oauth)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
