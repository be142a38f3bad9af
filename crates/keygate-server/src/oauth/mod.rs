//! Keygate as an OAuth 2 authorization server for applications: client credentials, JWT (RFC 9068)
//! and opaque access tokens, introspection (RFC 7662), revocation (RFC 7009), discovery (RFC 8414) and
//! the JWKS.
//!
//! Errors on these endpoints have the RFC 6749 section 5.2 shape (`error`, `error_description`), and
//! token responses carry `Cache-Control: no-store`.

pub mod assertion;
pub mod authorize;
pub mod device;
pub mod dpop;
pub mod error;
pub mod exchange;
pub mod flows;
pub mod grants;
pub mod keys;
pub mod metadata_doc;
pub mod register;
pub mod resource;
pub mod tokens;

use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use crate::auth::{ClientIp, presented_credential};
use crate::peer::Client;
use crate::state::AppState;
use crate::verify::Context;
pub use error::{OAuthBody, OAuthError, OAuthErrorCode, OAuthPath};

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(token))
        .routes(routes!(authorize::authorize))
        .routes(routes!(authorize::login))
        .routes(routes!(authorize::consent))
        .routes(routes!(device::device_authorization))
        .routes(routes!(device::device_page, device::device_entry))
        .routes(routes!(introspect))
        .routes(routes!(revoke))
        .routes(routes!(discovery))
        .routes(routes!(jwks))
        .routes(routes!(register::register))
        .routes(routes!(
            register::read_registration,
            register::update_registration,
            register::delete_registration
        ))
        .routes(routes!(resource::metadata_root))
        .routes(routes!(resource::metadata_path))
}

/// Whether a path's errors take RFC 6749's shape (`error`, `error_description`, `Cache-Control:
/// no-store`) — the OAuth endpoints a client program calls, including RFC 7591/7592 registration — even
/// when Keygate answers for the handler (a request cut off at the time limit, a panic). The pages a
/// person's browser shows (`/oauth2/authorize…`, `/oauth2/device`) keep Keygate's shape.
pub(crate) fn speaks_rfc6749(path: &str) -> bool {
    path.strip_prefix("/oauth2/")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with("authorize") && rest != "device")
}

/// A form body, after checking its content type (the parsing rules are in `keygate_core::oauth`).
pub(crate) struct Form(keygate_core::oauth::Form, Option<String>);

impl Form {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Form, OAuthError> {
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidRequest,
                "send parameters as application/x-www-form-urlencoded",
            ));
        }
        Ok(Form(keygate_core::oauth::Form::parse(body), None))
    }

    /// A parameter that may appear at most once (RFC 6749 section 3.2).
    fn one(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        self.0.one(name).map_err(|e| OAuthError::new(OAuthErrorCode::InvalidRequest, e.to_string()))
    }

    /// At the token endpoint: the thumbprint of the key a valid DPoP proof showed (RFC 9449); the
    /// tokens issued are bound to it.
    fn dpop_jkt(&self) -> Option<&str> {
        self.1.as_deref()
    }

    fn all(&self, name: &str) -> &[String] {
        self.0.all(name)
    }
}

/// How a client presented itself.
enum Presented {
    /// A secret, by HTTP Basic (`basic`) or in the form.
    Secret { id: String, secret: String, basic: bool },
    /// A signed JWT (`private_key_jwt`), with the form's `client_id` if it sent one.
    Assertion { assertion: String, client_id: Option<String> },
}

/// Client authentication from `Authorization: Basic`, the form, or a client assertion; more than one
/// method at once is an error.
fn client_credentials(headers: &HeaderMap, form: &Form) -> Result<Option<Presented>, OAuthError> {
    if let Some(kind) = form.one("client_assertion_type")? {
        if kind != assertion::ASSERTION_TYPE {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidRequest,
                format!("client_assertion_type must be {}", assertion::ASSERTION_TYPE),
            ));
        }
        let jwt = form
            .one("client_assertion")?
            .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidRequest, "client_assertion is missing"))?;
        let basic = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().get(..6).is_some_and(|p| p.eq_ignore_ascii_case("basic ")));
        if basic || form.one("client_secret")?.is_some() {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidRequest,
                "use one client authentication method, not two",
            ));
        }
        return Ok(Some(Presented::Assertion {
            assertion: jwt.to_string(),
            client_id: form.one("client_id")?.map(str::to_owned),
        }));
    }
    Ok(secret_credentials(headers, form)?.map(|(id, secret, basic)| Presented::Secret { id, secret, basic }))
}

/// Client id and secret from `Authorization: Basic` or the form; both at once is an error.
fn secret_credentials(
    headers: &HeaderMap,
    form: &Form,
) -> Result<Option<(String, String, bool)>, OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, b64)| b64.trim().to_string());
    let post = (form.one("client_id")?, form.one("client_secret")?);
    match (basic, post) {
        (Some(_), (_, Some(_))) => Err(OAuthError::new(
            OAuthErrorCode::InvalidRequest,
            "use one client authentication method, not two",
        )),
        (Some(b64), _) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| OAuthError::invalid_client(true))?;
            let (id, secret) = decoded.split_once(':').ok_or_else(|| OAuthError::invalid_client(true))?;
            // RFC 6749 section 2.3.1: both parts are form-urlencoded.
            let dec = |s: &str| {
                form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned())
            };
            Ok(Some((dec(id).unwrap_or_default(), dec(secret).unwrap_or_default(), true)))
        }
        (None, (Some(id), Some(secret))) => Ok(Some((id.to_string(), secret.to_string(), false))),
        // A public client names itself and has no secret (token_endpoint_auth_method "none").
        (None, (Some(id), None)) => Ok(Some((id.to_string(), String::new(), false))),
        (None, (None, _)) => Ok(None),
    }
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// A failed credential check: 429 `slow_down` once the address has spent its failure budget, else
/// `failure` (and the failure is counted). Good credentials never get here, so an address shared with an
/// attacker (NAT, a proxy) still works for callers whose credentials verify.
fn failed_check(state: &AppState, client: Client, now: i64, failure: OAuthError) -> OAuthError {
    if let Some(retry) = state.throttle.blocked(client.accountable, now) {
        let secs = (retry.max(0) as u64).div_ceil(1000);
        return OAuthError::new(
            OAuthErrorCode::SlowDown,
            format!("too many failed attempts; retry in {secs} s"),
        );
    }
    state.throttle.record_failure(client.accountable, now);
    failure
}

/// Authenticates the client of a request, throttling failures per address.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    client: Client,
    now: i64,
) -> Result<Option<keygate_store::OAuthClient>, OAuthError> {
    let (found, basic) = match client_credentials(headers, form)? {
        None => return Ok(None),
        Some(Presented::Secret { id, secret, basic }) if secret.is_empty() && !basic => {
            // A metadata-document client stops when the feature is turned off or its host denied.
            let found = if metadata_doc::permitted(state, &id) {
                state.oauth.authenticate_public(state.store.as_ref(), &id).await?
            } else {
                None
            };
            (found, false)
        }
        Some(Presented::Secret { id, secret, basic }) => {
            (state.oauth.authenticate_client(state.store.as_ref(), &id, &secret, now).await?, basic)
        }
        Some(Presented::Assertion { assertion, client_id }) => (
            state
                .oauth
                .authenticate_assertion(state.store.as_ref(), &assertion, client_id.as_deref(), now)
                .await?,
            false,
        ),
    };
    match found {
        Some(c) => Ok(Some(c)),
        None => Err(failed_check(state, client, now, OAuthError::invalid_client(basic))),
    }
}

/// The token endpoint: `grant_type=client_credentials`.
#[utoipa::path(post, path = "/oauth2/token", tag = "oauth2", request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "grant_type=client_credentials[&scope=…][&resource=…]; client authentication by HTTP Basic or client_id/client_secret"),
    responses((status = 200, description = "an access token (RFC 6749 section 5.1)"), (status = "4XX", description = "RFC 6749 section 5.2 error: invalid_request, invalid_client (401), invalid_grant, unauthorized_client, unsupported_grant_type, invalid_scope, invalid_target; slow_down (429) after repeated failed client authentication")))]
pub async fn token(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    OAuthBody(body): OAuthBody,
) -> Result<Response, OAuthError> {
    let now = state.now();
    let peer_ip = client.ip;
    let mut form = Form::parse(&headers, &body)?;
    let grant = form
        .one("grant_type")?
        .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidRequest, "grant_type is missing"))?
        .to_owned();
    let client = authenticate(&state, &headers, &form, client, now)
        .await?
        .ok_or_else(|| OAuthError::invalid_client(false))?;
    // RFC 9449: a DPoP proof binds the tokens issued here to the client's key.
    if let Some(proof) = dpop_header(&headers)? {
        let url = format!("{}/oauth2/token", state.oauth.issuer());
        let check = dpop::ProofCheck { proof, method: "POST", url: &url, access_token: None };
        let jkt = state
            .oauth
            .dpop
            .verify(&check, now)
            .map_err(|why| OAuthError::new(OAuthErrorCode::InvalidDpopProof, why))?;
        form.1 = Some(jkt);
    }
    let Some(grant) = keygate_store::GrantType::parse(&grant) else {
        return Err(OAuthError::new(
            OAuthErrorCode::UnsupportedGrantType,
            format!("grant_type {grant:?} is not supported"),
        ));
    };
    if !client.grant_types.contains(&grant) {
        return Err(OAuthError::new(
            OAuthErrorCode::UnauthorizedClient,
            "the client may not use this grant type",
        ));
    }
    let body = match grant {
        keygate_store::GrantType::ClientCredentials => {
            client_credentials_grant(&state, &client, &form, now).await?
        }
        keygate_store::GrantType::AuthorizationCode => {
            grants::authorization_code(&state, &client, &form, now).await?
        }
        keygate_store::GrantType::RefreshToken => grants::refresh_token(&state, &client, &form, now).await?,
        keygate_store::GrantType::DeviceCode => grants::device_code(&state, &client, &form, now).await?,
        keygate_store::GrantType::TokenExchange => {
            exchange::token_exchange(&state, &client, &form, peer_ip, now).await?
        }
    };
    Ok(no_store(Json(body).into_response()))
}

async fn client_credentials_grant(
    state: &AppState,
    client: &keygate_store::OAuthClient,
    form: &Form,
    now: i64,
) -> Result<Value, OAuthError> {
    let scopes = tokens::OAuth::grant_scopes(client, form.one("scope")?)
        .map_err(|d| OAuthError::new(OAuthErrorCode::InvalidScope, d))?;
    let resources = form.all("resource");
    for r in resources {
        if !client.audiences.iter().any(|a| a == r) {
            return Err(OAuthError::new(
                OAuthErrorCode::InvalidTarget,
                format!("the client may not ask for the resource {r:?}"),
            ));
        }
    }
    let audiences: Vec<String> = if resources.is_empty() {
        if client.audiences.is_empty() { vec![state.oauth.issuer()] } else { client.audiences.clone() }
    } else {
        resources.to_vec()
    };
    let issued = state
        .oauth
        .issue(state.store.as_ref(), client, &scopes, &audiences, form.dpop_jkt(), now)
        .await
        .map_err(|e| match e {
            tokens::IssueError::Store(s) => OAuthError::from(s),
            tokens::IssueError::Internal(m) => {
                tracing::error!(error = %m, "issuing a token failed");
                OAuthError::new(OAuthErrorCode::ServerError, "internal error")
            }
        })?;
    state.metrics.record_grant(client.token_format.as_str());
    Ok(json!({
        "access_token": issued.access_token,
        "token_type": issued.token_type,
        "expires_in": issued.expires_in,
        "scope": issued.scope,
    }))
}

/// The one `DPoP` header of a request, if any (RFC 9449 §4.3: more than one is an error).
fn dpop_header(headers: &HeaderMap) -> Result<Option<&str>, OAuthError> {
    let mut all = headers.get_all("dpop").iter();
    let Some(first) = all.next() else { return Ok(None) };
    if all.next().is_some() {
        return Err(OAuthError::new(OAuthErrorCode::InvalidDpopProof, "send one DPoP proof, not several"));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| OAuthError::new(OAuthErrorCode::InvalidDpopProof, "the DPoP proof is not ASCII"))
}

/// Who is asking to introspect or revoke a token.
enum Inspector {
    /// An OAuth client: only tokens issued to it.
    Client(String),
    /// A Keygate credential with the needed permission: any token.
    Keygate,
}

impl Inspector {
    fn may_see(&self, token_client_id: &str) -> bool {
        match self {
            Inspector::Client(id) => id == token_client_id,
            Inspector::Keygate => true,
        }
    }
}

/// Authenticates the caller of introspection or revocation: a client (which may act on its own tokens),
/// or a Keygate credential holding `permission` (`keygate:introspect` for introspection,
/// `keygate:admin` for revoking others' tokens). Every failed credential counts against the address.
async fn inspector(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    client: Client,
    now: i64,
    permission: &str,
) -> Result<Inspector, OAuthError> {
    if let Some(client) = authenticate(state, headers, form, client, now).await? {
        return Ok(Inspector::Client(client.id));
    }
    let credential = presented_credential(headers).ok_or_else(|| OAuthError::invalid_client(false))?;
    let d = state
        .verifier
        .verify(credential, &[permission], Context { ip: client.ip, cost: 0, now_ms: now })
        .await?;
    match d.code {
        keygate_core::DecisionCode::Valid => Ok(Inspector::Keygate),
        keygate_core::DecisionCode::InsufficientScope => Err(OAuthError::new(
            OAuthErrorCode::InsufficientScope,
            format!(
                "the credential is valid but lacks the '{permission}' permission; a client may only act on its own tokens"
            ),
        )),
        keygate_core::DecisionCode::Malformed | keygate_core::DecisionCode::NotFound => {
            Err(failed_check(state, client, now, OAuthError::invalid_client(false)))
        }
        _ => Err(OAuthError::invalid_client(false)),
    }
}

/// RFC 7662 token introspection. A client sees only its own tokens (others are `{"active": false}`); a
/// resource server that must introspect every client's tokens uses a Keygate credential with
/// `keygate:introspect`.
#[utoipa::path(post, path = "/oauth2/introspect", tag = "oauth2", request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "token=…; the caller is a client (its own tokens only) or a Keygate credential with keygate:introspect (any token)"),
    responses((status = 200, description = "RFC 7662 response; exactly {\"active\": false} for anything inactive or not the calling client's"), (status = 401, description = "invalid_client"), (status = 403, description = "insufficient_scope: a Keygate credential without keygate:introspect"), (status = 429, description = "slow_down")),
    security(("bearer" = [])))]
pub async fn introspect(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    OAuthBody(body): OAuthBody,
) -> Result<Response, OAuthError> {
    let now = state.now();
    let form = Form::parse(&headers, &body)?;
    let caller = inspector(&state, &headers, &form, client, now, keygate_core::scope::INTROSPECT).await?;
    let token = form
        .one("token")?
        .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidRequest, "token is missing"))?;
    let body = match exchange::verify_token(&state, token, None, now).await? {
        Ok(info) if caller.may_see(&info.client_id) => json!({
            "active": true,
            "scope": info.scopes.join(" "),
            "client_id": info.client_id,
            "consumer_id": info.consumer_id,
            "sub": info.subject,
            "user_id": info.user_id,
            "cnf": info.jkt.as_ref().map(|j| json!({"jkt": j})),
            "aud": if info.audiences.len() == 1 { Value::String(info.audiences[0].clone()) } else { json!(info.audiences) },
            "iss": state.oauth.issuer(),
            "exp": info.expires_at / 1000,
            "iat": info.issued_at / 1000,
            "jti": info.jti,
            "token_type": if info.jkt.is_some() { "DPoP" } else { "Bearer" },
        }),
        _ => json!({"active": false}),
    };
    Ok(no_store(Json(body).into_response()))
}

/// RFC 7009 token revocation: 200 also for unknown tokens. A client revokes only its own tokens; others'
/// need a Keygate admin credential.
#[utoipa::path(post, path = "/oauth2/revoke", tag = "oauth2", request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "token=…; the caller is a client (its own tokens only) or a Keygate credential with keygate:admin (any token)"),
    responses((status = 200, description = "revoked, or nothing to revoke (RFC 7009)"), (status = 401, description = "invalid_client"), (status = 403, description = "insufficient_scope: a Keygate credential without keygate:admin"), (status = 429, description = "slow_down")),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    OAuthBody(body): OAuthBody,
) -> Result<Response, OAuthError> {
    let now = state.now();
    let form = Form::parse(&headers, &body)?;
    let caller = inspector(&state, &headers, &form, client, now, keygate_core::scope::ADMIN).await?;
    let token = form
        .one("token")?
        .ok_or_else(|| OAuthError::new(OAuthErrorCode::InvalidRequest, "token is missing"))?;
    let client = match &caller {
        Inspector::Client(id) => Some(id.as_str()),
        Inspector::Keygate => None,
    };
    let actor = client.unwrap_or("oauth2/revoke");
    state.oauth.revoke(state.store.as_ref(), token, client, now, actor, "revocation request").await?;
    Ok(no_store(StatusCode::OK.into_response()))
}

/// RFC 8414 authorization server metadata. Built once and kept until a client changes (it lists the
/// scopes clients may be granted, unless `publish_scopes` is off).
#[utoipa::path(get, path = "/.well-known/oauth-authorization-server", tag = "oauth2",
    responses((status = 200, description = "RFC 8414 metadata"), (status = 503, description = "temporarily_unavailable: the database did not answer")))]
pub async fn discovery(State(state): State<Arc<AppState>>) -> Result<Response, OAuthError> {
    let generation = match state.oauth.discovery() {
        Ok(doc) => return Ok(Json(doc.as_ref()).into_response()),
        Err(generation) => generation,
    };
    let doc = Arc::new(discovery_document(&state).await?);
    state.oauth.keep_discovery(generation, doc.clone());
    Ok(Json(doc.as_ref()).into_response())
}

async fn discovery_document(state: &AppState) -> Result<Value, OAuthError> {
    let iss = state.oauth.issuer();
    let mut scopes = std::collections::BTreeSet::new();
    if state.config.publish_scopes {
        for c in tokens::all_clients(state.store.as_ref()).await? {
            scopes.extend(c.scopes);
        }
    }
    let mut doc = json!({
        "issuer": iss,
        "token_endpoint": format!("{iss}/oauth2/token"),
        "introspection_endpoint": format!("{iss}/oauth2/introspect"),
        "revocation_endpoint": format!("{iss}/oauth2/revoke"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "grant_types_supported": keygate_store::GrantType::ALL.map(keygate_store::GrantType::as_str),
        "authorization_endpoint": format!("{iss}/oauth2/authorize"),
        "device_authorization_endpoint": format!("{iss}/oauth2/device_authorization"),

        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": true,
        "dpop_signing_alg_values_supported": dpop::ALGS,
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "access_token_signing_alg_values_supported": [state.oauth.alg.as_str()],
    });
    if state.config.publish_scopes {
        doc["scopes_supported"] = json!(scopes);
    }
    if state.config.registration.mode != register::RegistrationMode::Off {
        doc["registration_endpoint"] = json!(format!("{iss}/oauth2/register"));
    }
    if state.config.metadata_docs.enabled {
        doc["client_id_metadata_document_supported"] = json!(true);
    }
    Ok(doc)
}

/// The published signing keys.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "oauth2", responses((status = 200, description = "the published signing keys (RFC 7517)")))]
pub async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    let mut resp = Json(state.oauth.keys.jwks(state.now())).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    resp
}
