//! Keygate as an OAuth 2 authorization server for applications: client credentials, JWT (RFC 9068)
//! and opaque access tokens, introspection (RFC 7662), revocation (RFC 7009), discovery (RFC 8414) and
//! the JWKS.
//!
//! Errors on these endpoints have the RFC 6749 section 5.2 shape (`error`, `error_description`), and
//! token responses carry `Cache-Control: no-store`.

pub mod keys;
pub mod tokens;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};

use crate::auth::{ClientIp, presented_credential};
use crate::state::AppState;
use crate::time::now_ms;
use crate::verify::Context;

pub fn router() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/oauth2/token", post(token))
        .route("/oauth2/introspect", post(introspect))
        .route("/oauth2/revoke", post(revoke))
        .route("/.well-known/oauth-authorization-server", get(discovery))
        .route("/.well-known/jwks.json", get(jwks))
}

/// An RFC 6749 error response.
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    basic_challenge: bool,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
            basic_challenge: false,
        }
    }

    fn invalid_client(basic: bool) -> Self {
        OAuthError {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: "client authentication failed".into(),
            basic_challenge: basic,
        }
    }
}

impl From<keygate_store::StoreError> for OAuthError {
    fn from(e: keygate_store::StoreError) -> Self {
        let api = crate::error::ApiError::from(e);
        OAuthError {
            status: api.code.status(),
            error: if api.code.status() == StatusCode::SERVICE_UNAVAILABLE {
                "temporarily_unavailable"
            } else {
                "server_error"
            },
            description: api.message,
            basic_challenge: false,
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut resp =
            (self.status, Json(json!({"error": self.error, "error_description": self.description})))
                .into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge =
                if self.basic_challenge { "Basic realm=\"keygate\"" } else { "Bearer realm=\"keygate\"" };
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        resp
    }
}

/// A form body: each parameter with all its values.
struct Form(HashMap<String, Vec<String>>);

impl Form {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Result<Form, OAuthError> {
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
            return Err(OAuthError::new(
                "invalid_request",
                "send parameters as application/x-www-form-urlencoded",
            ));
        }
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Ok(Form(map))
    }

    /// A parameter that may appear at most once (RFC 6749 section 3.2).
    fn one(&self, name: &str) -> Result<Option<&str>, OAuthError> {
        match self.0.get(name).map(Vec::as_slice) {
            None => Ok(None),
            Some([v]) => Ok(Some(v.as_str())),
            Some(_) => Err(OAuthError::new(
                "invalid_request",
                format!("the parameter {name} appears more than once"),
            )),
        }
    }

    fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Client credentials from `Authorization: Basic` or the form; both at once is an error.
fn client_credentials(
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
        (Some(_), (_, Some(_))) => {
            Err(OAuthError::new("invalid_request", "use one client authentication method, not two"))
        }
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
        (None, (Some(_), None)) => Err(OAuthError::invalid_client(false)),
        (None, (None, _)) => Ok(None),
    }
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// Authenticates the client of a request, throttling failures per address.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    ip: Option<std::net::IpAddr>,
    now: i64,
) -> Result<Option<keygate_store::OAuthClient>, OAuthError> {
    let Some((id, secret, basic)) = client_credentials(headers, form)? else { return Ok(None) };
    if let Some(retry) = state.throttle.blocked(ip, now) {
        return Err(OAuthError {
            status: StatusCode::TOO_MANY_REQUESTS,
            error: "slow_down",
            description: format!(
                "too many failed attempts; retry in {} s",
                (retry.max(0) as u64).div_ceil(1000)
            ),
            basic_challenge: false,
        });
    }
    match state.oauth.authenticate_client(state.store.as_ref(), &id, &secret, now).await? {
        Some(c) => Ok(Some(c)),
        None => {
            state.throttle.record_failure(ip, now);
            Err(OAuthError::invalid_client(basic))
        }
    }
}

/// The token endpoint: `grant_type=client_credentials`.
pub async fn token(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let now = now_ms();
    let form = Form::parse(&headers, &body)?;
    let grant =
        form.one("grant_type")?.ok_or_else(|| OAuthError::new("invalid_request", "grant_type is missing"))?;
    let client = authenticate(&state, &headers, &form, ip, now)
        .await?
        .ok_or_else(|| OAuthError::invalid_client(false))?;
    if grant != "client_credentials" {
        return Err(OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type {grant:?} is not supported"),
        ));
    }
    if !client.grant_types.iter().any(|g| g == grant) {
        return Err(OAuthError::new("unauthorized_client", "the client may not use this grant type"));
    }
    let scopes = tokens::OAuth::grant_scopes(&client, form.one("scope")?)
        .map_err(|d| OAuthError::new("invalid_scope", d))?;
    let resources = form.all("resource");
    for r in resources {
        if !client.audiences.iter().any(|a| a == r) {
            return Err(OAuthError::new(
                "invalid_target",
                format!("the client may not ask for the resource {r:?}"),
            ));
        }
    }
    let audiences: Vec<String> = if resources.is_empty() {
        if client.audiences.is_empty() { vec![state.oauth.issuer()] } else { client.audiences.clone() }
    } else {
        resources.to_vec()
    };
    let issued = state.oauth.issue(state.store.as_ref(), &client, &scopes, &audiences, now).await.map_err(
        |e| match e {
            tokens::IssueError::Store(s) => OAuthError::from(s),
            tokens::IssueError::Internal(m) => {
                tracing::error!(error = %m, "issuing a token failed");
                OAuthError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    error: "server_error",
                    description: "internal error".into(),
                    basic_challenge: false,
                }
            }
        },
    )?;
    state.metrics.record_grant(&client.token_format);
    Ok(no_store(
        Json(json!({
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": issued.expires_in,
            "scope": issued.scope,
        }))
        .into_response(),
    ))
}

/// Who may introspect or revoke: a client, or a Keygate credential with the verify permission.
async fn caller_may_inspect(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    ip: Option<std::net::IpAddr>,
    now: i64,
) -> Result<Option<String>, OAuthError> {
    if let Some(client) = authenticate(state, headers, form, ip, now).await? {
        return Ok(Some(client.id));
    }
    let credential = presented_credential(headers).ok_or_else(|| OAuthError::invalid_client(false))?;
    let d = state
        .verifier
        .verify(credential, &[keygate_core::scope::VERIFY], Context { ip, cost: 0, now_ms: now })
        .await?;
    if d.is_valid() { Ok(None) } else { Err(OAuthError::invalid_client(false)) }
}

/// RFC 7662 token introspection.
pub async fn introspect(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let now = now_ms();
    let form = Form::parse(&headers, &body)?;
    caller_may_inspect(&state, &headers, &form, ip, now).await?;
    let token = form.one("token")?.ok_or_else(|| OAuthError::new("invalid_request", "token is missing"))?;
    let body = match state.oauth.verify(state.store.as_ref(), token, None, now).await? {
        Ok(info) => json!({
            "active": true,
            "scope": info.scopes.join(" "),
            "client_id": info.client_id,
            "sub": info.subject,
            "aud": if info.audiences.len() == 1 { Value::String(info.audiences[0].clone()) } else { json!(info.audiences) },
            "iss": state.oauth.issuer(),
            "exp": info.expires_at / 1000,
            "iat": info.issued_at / 1000,
            "jti": info.jti,
            "token_type": "Bearer",
        }),
        Err(_) => json!({"active": false}),
    };
    Ok(no_store(Json(body).into_response()))
}

/// RFC 7009 token revocation: 200 also for unknown tokens.
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OAuthError> {
    let now = now_ms();
    let form = Form::parse(&headers, &body)?;
    let client = caller_may_inspect(&state, &headers, &form, ip, now).await?;
    let token = form.one("token")?.ok_or_else(|| OAuthError::new("invalid_request", "token is missing"))?;
    state.oauth.revoke(state.store.as_ref(), token, client.as_deref(), now).await?;
    Ok(no_store(StatusCode::OK.into_response()))
}

/// RFC 8414 authorization server metadata.
pub async fn discovery(State(state): State<Arc<AppState>>) -> Response {
    let iss = state.oauth.issuer();
    let scopes = state.oauth_scopes().await;
    Json(json!({
        "issuer": iss,
        "token_endpoint": format!("{iss}/oauth2/token"),
        "introspection_endpoint": format!("{iss}/oauth2/introspect"),
        "revocation_endpoint": format!("{iss}/oauth2/revoke"),
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "bearer"],
        "scopes_supported": scopes,
        "access_token_signing_alg_values_supported": [state.oauth.alg.as_str()],
    }))
    .into_response()
}

/// The published signing keys.
pub async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    let mut resp = Json(state.oauth.keys.jwks(now_ms())).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
    resp
}
