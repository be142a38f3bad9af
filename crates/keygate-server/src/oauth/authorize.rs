//! The authorization endpoint (RFC 6749 §4.1, PKCE per RFC 7636, `iss` per RFC 9207) and its pages:
//! login and consent, rendered on the server (minijinja templates compiled into the binary; no
//! JavaScript, no network).
//!
//! Rules (RFC 9700, the OAuth 2.0 Security BCP):
//! - The redirect URI must equal one registered for the client, string for string. Until the client
//!   and its redirect URI are known to be good, errors go to an error page, never to a redirect.
//! - PKCE with S256 is required of every client; `plain` is refused.
//! - Codes are single use, bound to client, redirect URI, PKCE challenge and user, and live 60 s.
//! - Forms carry a per-request CSRF token; the consent form is accepted only from the session that
//!   logged in for that request. The session cookie is `HttpOnly`, `SameSite=Lax`, `Secure` when the
//!   issuer is https, and a new one is issued at every login.
//! - Pages are served with a `Content-Security-Policy` that allows no script and no framing.

// Helpers here return the page to show as their error: one response per browser request, never on a
// hot path, so the size of `Response` in a `Result` does not matter.
#![allow(clippy::result_large_err)]

use std::sync::{Arc, Mutex};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use keygate_core::oauth::Form;
use keygate_core::{PlainSecret, SecretHash, SecretKind};
use keygate_store::{AuthCode, GrantType, OAuthClient};
use minijinja::{Environment, context};
use subtle::ConstantTimeEq;

use super::flows::{AuthRequest, CookieNames, SESSION_ABSOLUTE, Session, cookie_names};
use crate::auth::{ClientIp, Peer};
use crate::error::ApiBytes;
use crate::state::AppState;

/// How long an authorization code is valid.
pub const CODE_TTL_MS: i64 = 60_000;
const LOGIN_ACTION: &str = "/oauth2/authorize/login";
/// Longest query string the authorization endpoint reads, and longest `state` it carries back.
const MAX_QUERY: usize = 8 * 1024;
const MAX_STATE: usize = 1024;
const CONSENT_ACTION: &str = "/oauth2/authorize/consent";

fn templates() -> &'static Environment<'static> {
    static ENV: std::sync::OnceLock<Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // `.html` templates escape every value (minijinja's default by file extension).
        for (name, text) in [
            ("base.html", include_str!("../../templates/base.html")),
            ("login.html", include_str!("../../templates/login.html")),
            ("consent.html", include_str!("../../templates/consent.html")),
            ("error.html", include_str!("../../templates/error.html")),
            ("device.html", include_str!("../../templates/device.html")),
            ("device_done.html", include_str!("../../templates/device_done.html")),
        ] {
            if let Err(e) = env.add_template(name, text) {
                tracing::error!(template = name, error = %e, "a built-in template does not parse");
            }
        }
        env
    })
}

/// Headers every page carries: no script, no framing, no caching, no referrer.
pub(super) fn page(status: StatusCode, template: &str, ctx: minijinja::Value) -> Response {
    let body = match templates().get_template(template).and_then(|t| t.render(ctx)) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(template, error = %e, "rendering a page failed");
            return (StatusCode::INTERNAL_SERVER_ERROR, "internal error; the server log has the details")
                .into_response();
        }
    };
    let mut resp = (status, Html(body)).into_response();
    secure_headers(resp.headers_mut());
    resp
}

fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

pub(super) fn error_page(status: StatusCode, message: &str) -> Response {
    page(status, "error.html", context! { message })
}

/// Where errors and codes go once the client and its redirect URI are known to be good.
struct Back {
    redirect_uri: String,
    state: Option<String>,
    iss: String,
    /// A device authorization: errors are shown on a page (there is nowhere to redirect to).
    device: bool,
}

impl Back {
    fn to(&self, params: &[(&str, &str)]) -> Response {
        let Ok(mut url) = url::Url::parse(&self.redirect_uri) else {
            return error_page(StatusCode::BAD_REQUEST, "the application's redirect URI is not valid");
        };
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
            if let Some(s) = &self.state {
                q.append_pair("state", s);
            }
            q.append_pair("iss", &self.iss);
        }
        let mut resp = StatusCode::SEE_OTHER.into_response();
        match HeaderValue::from_str(url.as_str()) {
            Ok(v) => {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Err(_) => {
                return error_page(StatusCode::BAD_REQUEST, "the application's redirect URI is not valid");
            }
        }
        secure_headers(resp.headers_mut());
        resp
    }

    fn error(&self, code: &str, description: &str) -> Response {
        if self.device {
            return error_page(StatusCode::FORBIDDEN, description);
        }
        self.to(&[("error", code), ("error_description", description)])
    }

    fn of(req: &AuthRequest, iss: String) -> Back {
        Back {
            redirect_uri: req.redirect_uri.clone(),
            state: req.state.clone(),
            iss,
            device: req.device.is_some(),
        }
    }
}

pub(super) fn random_token() -> Result<String, Response> {
    keygate_core::credential::random_base62(32)
        .map_err(|_| error_page(StatusCode::SERVICE_UNAVAILABLE, "the server cannot make random numbers"))
}

pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

pub(super) fn names(state: &AppState) -> CookieNames {
    cookie_names(state.oauth.issuer().starts_with("https://"))
}

pub(super) fn set_cookie(names: &CookieNames, name: &str, value: &str, max_age: u64) -> Option<HeaderValue> {
    let secure = if names.secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={}; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
        names.path
    ))
    .ok()
}

/// A new pending request's id and CSRF token, and the browser opening it: its existing `kg_browser`
/// cookie (several tabs may be signing in), or a new one to set.
pub(super) fn new_request_ids(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(String, String, SecretHash, Option<HeaderValue>), Response> {
    let (request_id, csrf) = (random_token()?, random_token()?);
    let n = names(state);
    match cookie(headers, n.browser) {
        Some(b) if b.len() <= 64 => Ok((request_id, csrf, SecretHash::of(b), None)),
        _ => {
            let fresh = random_token()?;
            let set = set_cookie(&n, n.browser, &fresh, SESSION_ABSOLUTE.as_secs());
            Ok((request_id, csrf, SecretHash::of(&fresh), set))
        }
    }
}

/// A new login session for `user_id`, bound to this request: the cookie to set. A new id at every
/// login, so a session id planted before the login is worthless.
pub(super) fn new_session(
    state: &AppState,
    req: &AuthRequest,
    user_id: &str,
    now: i64,
) -> Result<Option<HeaderValue>, Response> {
    let session_id = random_token()?;
    let hash = SecretHash::of(&session_id);
    state
        .oauth
        .flows
        .sessions
        .insert(hash, Arc::new(Session { user_id: user_id.to_string(), created_at: now }));
    *lock(&req.session) = Some(hash);
    let n = names(state);
    Ok(set_cookie(&n, n.session, &session_id, SESSION_ABSOLUTE.as_secs()))
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A client usable for the authorization code flow right now (enabled, its consumer enabled).
pub(super) async fn usable_client(state: &AppState, id: &str) -> Result<Option<OAuthClient>, Response> {
    let client = state.store.get_client(id).await.map_err(|e| {
        tracing::warn!(error = %e, "authorization endpoint: store unavailable");
        error_page(StatusCode::SERVICE_UNAVAILABLE, "the service is unavailable; try again shortly")
    })?;
    Ok(client.filter(|c| !c.disabled && state.oauth.consumer(&c.consumer_id).is_some_and(|s| !s.disabled)))
}

/// `GET /oauth2/authorize`: validates the request, then shows the login page, the consent page, or
/// (when the user is logged in and already consented to these scopes) sends the code back at once.
#[utoipa::path(get, path = "/oauth2/authorize", tag = "oauth2",
    params(
        ("response_type" = String, Query, description = "code"),
        ("client_id" = String, Query),
        ("redirect_uri" = Option<String>, Query, description = "exactly as registered; may be left out when the client has exactly one"),
        ("scope" = Option<String>, Query),
        ("state" = Option<String>, Query),
        ("code_challenge" = String, Query, description = "PKCE: BASE64URL(SHA-256(code_verifier))"),
        ("code_challenge_method" = String, Query, description = "S256 (plain is refused)"),
        ("resource" = Option<String>, Query, description = "RFC 8707; repeatable"),
    ),
    responses(
        (status = 200, description = "the login or consent page (HTML)", content_type = "text/html"),
        (status = 303, description = "back to the redirect URI with code, state and iss, or error, state and iss"),
        (status = 400, description = "an error page: the client or redirect URI is not valid (never redirected)", content_type = "text/html"),
    ))]
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let now = state.now();
    let query = query.unwrap_or_default();
    if query.len() > MAX_QUERY {
        return error_page(StatusCode::BAD_REQUEST, "the request is too long");
    }
    let form = Form::parse(query.as_bytes());
    let client_id = match form.one("client_id") {
        Ok(Some(c)) => c,
        Ok(None) => {
            return error_page(StatusCode::BAD_REQUEST, "the request names no application (client_id)");
        }
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    // A client known by its metadata document's URL: fetched, checked and stored before it is used.
    if super::metadata_doc::is_document_id(client_id) {
        let ip = crate::peer::client_of(peer, &headers, &state.config.trusted_proxies).accountable;
        if let Err(why) = super::metadata_doc::ensure(&state, client_id, ip).await {
            return error_page(StatusCode::BAD_REQUEST, &why);
        }
    }
    let client = match usable_client(&state, client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return error_page(StatusCode::BAD_REQUEST, "no such application, or it is disabled"),
        Err(r) => return r,
    };
    let redirect_uri = match form.one("redirect_uri") {
        Ok(Some(r)) if client.redirect_uris.iter().any(|u| u == r) => r.to_string(),
        Ok(Some(_)) => {
            return error_page(
                StatusCode::BAD_REQUEST,
                "the redirect URI is not registered for this application",
            );
        }
        Ok(None) if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        Ok(None) => return error_page(StatusCode::BAD_REQUEST, "the request names no redirect URI"),
        Err(e) => return error_page(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let state_param = form.one("state").ok().flatten();
    if state_param.is_some_and(|s| s.len() > MAX_STATE) {
        return error_page(StatusCode::BAD_REQUEST, "the state parameter is too long");
    }
    let back = Back {
        redirect_uri,
        state: state_param.map(str::to_owned),
        iss: state.oauth.issuer(),
        device: false,
    };
    // Clients that registered themselves (or came with a metadata document) get tokens for the one
    // resource they name (RFC 8707), never for every resource by default, and always ask the user.
    let self_registered = super::register::is_self_registered(&state, &client).await;
    let one = |name: &str| form.one(name).map_err(|e| back.error("invalid_request", &e.to_string()));
    let checked = (|| {
        let rt = one("response_type")?;
        if rt != Some("code") {
            return Err(back.error("unsupported_response_type", "response_type must be code"));
        }
        if !client.grant_types.contains(&GrantType::AuthorizationCode) {
            return Err(
                back.error("unauthorized_client", "the client may not use the authorization code grant")
            );
        }
        one("state")?;
        if one("code_challenge_method")? != Some("S256") {
            return Err(back.error("invalid_request", "PKCE is required: code_challenge_method must be S256"));
        }
        let challenge = one("code_challenge")?.unwrap_or_default();
        if challenge.len() != 43 || !keygate_core::oauth::pkce_value_ok(challenge) {
            return Err(
                back.error("invalid_request", "code_challenge must be BASE64URL(SHA-256(code_verifier))")
            );
        }
        let scopes = super::tokens::OAuth::grant_scopes(&client, one("scope")?)
            .map_err(|d| back.error("invalid_scope", &d))?;
        let resources = form.all("resource");
        if resources.iter().any(|r| !client.audiences.iter().any(|a| a == r)) {
            return Err(back.error("invalid_target", "the client may not ask for one of the resources"));
        }
        if self_registered && !client.audiences.is_empty() && resources.len() != 1 {
            return Err(back
                .error("invalid_target", "name the one resource the token is for (the resource parameter)"));
        }
        let audiences = if resources.is_empty() {
            if client.audiences.is_empty() { vec![state.oauth.issuer()] } else { client.audiences.clone() }
        } else {
            resources.to_vec()
        };
        Ok((challenge.to_string(), scopes, audiences))
    })();
    let (code_challenge, scopes, audiences) = match checked {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (request_id, csrf, browser, browser_cookie) = match new_request_ids(&state, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let n = names(&state);
    let always_ask = self_registered || (!client.confidential && !back.redirect_uri.starts_with("https://"));
    let req = Arc::new(AuthRequest {
        client_id: client.id.clone(),
        client_name: client.name.clone(),
        redirect_uri: back.redirect_uri.clone(),
        state: back.state.clone(),
        scopes,
        audiences,
        code_challenge,
        csrf,
        browser,
        always_ask,
        session: Mutex::new(None),
        device: None,
    });
    state.oauth.flows.requests.insert(request_id.clone(), req.clone());

    // Who is the user? A live session, or (when configured) a trusted front proxy's header.
    let mut resp =
        if let Some((session, user_id)) = state.oauth.flows.session_user(cookie(&headers, n.session)) {
            *lock(&req.session) = Some(session);
            proceed(&state, &request_id, &req, &user_id, now, None).await
        } else if let Some(user_id) = trusted_header_user(&state, peer, &headers).await {
            match new_session(&state, &req, &user_id, now) {
                Ok(cookie) => proceed(&state, &request_id, &req, &user_id, now, cookie).await,
                Err(r) => r,
            }
        } else {
            login_page(StatusCode::OK, &request_id, &req, "", None)
        };
    if let Some(c) = browser_cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

/// The scopes a user may grant: all of `scopes`, or those their `allowed_scopes` cover.
pub fn within_user_limit(scopes: &[String], allowed: Option<&[String]>) -> Vec<String> {
    match allowed {
        None => scopes.to_vec(),
        Some(allowed) => scopes
            .iter()
            .filter(|s| allowed.iter().any(|a| keygate_core::scope::covers(a, s)))
            .cloned()
            .collect(),
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn login_page(
    status: StatusCode,
    request_id: &str,
    req: &AuthRequest,
    username: &str,
    error: Option<&str>,
) -> Response {
    page(
        status,
        "login.html",
        context! { client_name => req.client_name, request_id, csrf => req.csrf, username, error, action => LOGIN_ACTION },
    )
}

/// `login.trusted_header`: a front proxy that already authenticated the user names them in a header.
/// Believed only from a peer in `trusted_proxies`, and only for an existing, enabled user.
async fn trusted_header_user(
    state: &AppState,
    peer: Option<std::net::IpAddr>,
    headers: &HeaderMap,
) -> Option<String> {
    let name = state.config.login_trusted_header.as_deref()?;
    let peer = peer?;
    if !state.config.trusted_proxies.iter().any(|n| n.contains(&peer)) {
        return None;
    }
    let username = headers.get(name)?.to_str().ok()?.trim();
    if username.is_empty() || username.len() > 256 {
        return None;
    }
    let user = state.store.find_user(username).await.ok().flatten()?;
    (!user.disabled).then_some(user.id)
}

/// The user is known: send a code back if they already consented to these scopes, else ask.
pub(super) async fn proceed(
    state: &AppState,
    request_id: &str,
    req: &AuthRequest,
    user_id: &str,
    now: i64,
    login: Option<HeaderValue>,
) -> Response {
    // `login`: the user just logged in here (the new session's cookie to set, and a login time to record).
    let back = Back::of(req, state.oauth.issuer());
    let unavailable =
        || error_page(StatusCode::SERVICE_UNAVAILABLE, "the service is unavailable; try again shortly");
    let user = match state.store.get_user(user_id).await {
        Ok(Some(u)) if !u.disabled => u,
        Ok(_) => return back.error("access_denied", "the user may not sign in"),
        Err(_) => return unavailable(),
    };
    let scopes = within_user_limit(&req.scopes, user.allowed_scopes.as_deref());
    if scopes.is_empty() && !req.scopes.is_empty() {
        return back.error("access_denied", "the user may not grant any of the requested scopes");
    }
    let grant = match state.store.find_grant(user_id, &req.client_id).await {
        Ok(g) => g,
        Err(_) => return unavailable(),
    };
    let mut resp = match grant {
        Some(g) if !req.always_ask && scopes.iter().all(|s| g.scopes.contains(s)) => {
            let grant = Granted::Existing(&g.id);
            issue_code(state, request_id, req, user_id, grant, scopes, now, login.is_some()).await
        }
        _ => {
            if login.is_some()
                && let Err(e) = state.store.record_login(user_id, now).await
            {
                tracing::warn!(error = %e, "recording a login time failed");
            }
            let descriptions = state.store.scope_descriptions().await.unwrap_or_default();
            let listed: Vec<minijinja::Value> = scopes
                .iter()
                .map(|s| {
                    let d = descriptions.iter().find(|(k, _)| k == s).map(|(_, d)| d.as_str());
                    context! { name => s, description => d }
                })
                .collect();
            page(
                StatusCode::OK,
                "consent.html",
                context! { client_name => req.client_name, client_host => client_host(&req.client_id), resources => req.audiences, username => user.username, scopes => listed, device_code => req.device.as_deref().map(|c| format!("{}-{}", c.get(..4).unwrap_or(""), c.get(4..).unwrap_or(""))),
                request_id, csrf => req.csrf, action => CONSENT_ACTION },
            )
        }
    };
    if let Some(c) = login {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

/// For a client known by its metadata document's URL: the host that vouches for it, shown beside the
/// name it gives itself.
fn client_host(client_id: &str) -> Option<String> {
    if !client_id.starts_with("https://") && !client_id.starts_with("http://") {
        return None;
    }
    url::Url::parse(client_id).ok().and_then(|u| u.host_str().map(str::to_owned))
}

/// Which grant a new code belongs to.
enum Granted<'a> {
    /// Consent given before, covering the code's scopes.
    Existing(&'a str),
    /// Consent given just now: widen the live grant, or create one with this id.
    New(&'a str),
}

/// Writes the code (with the consent and login time that led to it, in one transaction) and sends it
/// back to the client.
#[allow(clippy::too_many_arguments)]
async fn issue_code(
    state: &AppState,
    request_id: &str,
    req: &AuthRequest,
    user_id: &str,
    granted: Granted<'_>,
    scopes: Vec<String>,
    now: i64,
    logged_in_now: bool,
) -> Response {
    if let Some(user_code) = &req.device {
        // RFC 8628: the answer goes to the device through the store; the browser gets a page.
        let approved = match granted {
            Granted::New(id) => Some((id, scopes.as_slice())),
            // Devices always ask (`always_ask`), so there is no earlier consent to reuse.
            Granted::Existing(_) => None,
        };
        if approved.is_none() {
            return error_page(
                StatusCode::BAD_REQUEST,
                "this device request needs your answer on the consent page",
            );
        }
        return match state.store.answer_device(user_code, user_id, approved, now).await {
            Ok(true) => {
                state.oauth.flows.requests.invalidate(request_id);
                page(
                    StatusCode::OK,
                    "device_done.html",
                    context! { approved => true, client_name => req.client_name },
                )
            }
            Ok(false) => error_page(
                StatusCode::BAD_REQUEST,
                "this code has expired or was already used; start again on the device",
            ),
            Err(_) => {
                error_page(StatusCode::SERVICE_UNAVAILABLE, "the service is unavailable; try again shortly")
            }
        };
    }
    let back = Back::of(req, state.oauth.issuer());
    let Ok(code) = PlainSecret::generate(SecretKind::AuthCode) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "the server cannot make random numbers");
    };
    let record = AuthCode {
        hash: code.hash(),
        client_id: req.client_id.clone(),
        user_id: user_id.to_string(),
        grant_id: match granted {
            Granted::Existing(id) | Granted::New(id) => id.to_string(),
        },
        redirect_uri: req.redirect_uri.clone(),
        code_challenge: req.code_challenge.clone(),
        scopes,
        audiences: req.audiences.clone(),
        created_at: now,
        expires_at: now + CODE_TTL_MS,
        used_at: None,
        family_id: None,
    };
    let consent = match granted {
        Granted::New(id) => Some(id),
        Granted::Existing(_) => None,
    };
    if state.store.issue_code(&record, consent, logged_in_now.then_some(now)).await.is_err() {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "the service is unavailable; try again shortly");
    }
    state.oauth.flows.requests.invalidate(request_id);
    back.to(&[("code", code.expose())])
}

/// The pending request a form names, after checking that it comes from the browser that opened it
/// (its cookie, and no cross-site submission) with the right CSRF token. `take`: remove it, so that a
/// double submission cannot get two codes.
fn pending(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    take: bool,
) -> Result<(String, Arc<AuthRequest>), Response> {
    let expired = || {
        error_page(
            StatusCode::BAD_REQUEST,
            "this page has expired or was already used; go back to the application and start again",
        )
    };
    let forged = || {
        error_page(
            StatusCode::FORBIDDEN,
            "the form's security check failed; go back to the application and start again",
        )
    };
    if cross_site(headers) {
        return Err(forged());
    }
    let id = form.one("request_id").ok().flatten().ok_or_else(expired)?;
    let req = state.oauth.flows.requests.get(id).ok_or_else(expired)?;
    let csrf = form.one("csrf").ok().flatten().unwrap_or_default();
    let browser = cookie(headers, names(state).browser).map(SecretHash::of);
    if !ct_eq(csrf, &req.csrf) || browser != Some(req.browser) {
        return Err(forged());
    }
    if take && state.oauth.flows.requests.remove(id).is_none() {
        return Err(expired());
    }
    Ok((id.to_string(), req))
}

/// Did the browser say this form was submitted from another site (`Sec-Fetch-Site: cross-site`)? Forms
/// of these pages are never submitted from elsewhere.
pub(crate) fn cross_site(headers: &HeaderMap) -> bool {
    headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("cross-site")
}

pub(super) fn form_body(headers: &HeaderMap, body: &[u8]) -> Result<Form, Response> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
        return Err(error_page(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the form as a browser does"));
    }
    Ok(Form::parse(body))
}

/// `POST /oauth2/authorize/login`: the login form.
#[utoipa::path(post, path = "/oauth2/authorize/login", tag = "oauth2",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "request_id, csrf, username, password (the login page's form)"),
    responses((status = 200, description = "the consent page, or the login page again with an error (HTML)", content_type = "text/html"),
        (status = 303, description = "back to the redirect URI (already consented)"),
        (status = 401, description = "wrong username or password: the login page again", content_type = "text/html"),
        (status = 429, description = "too many failed logins for this address or username", content_type = "text/html")))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let now = state.now();
    let form = match form_body(&headers, &body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (request_id, req) = match pending(&state, &headers, &form, false) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let username = form.one("username").ok().flatten().unwrap_or_default().trim().to_string();
    let password = form.one("password").ok().flatten().unwrap_or_default().to_string();
    use crate::password::LoginRefusal;
    let again =
        |status: StatusCode, message: &str| login_page(status, &request_id, &req, &username, Some(message));
    let user = match crate::password::login(&state, &state.login_throttle, client, &username, password).await
    {
        Ok(u) => u,
        Err(LoginRefusal::Throttled) => {
            return again(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed sign-ins. Wait a minute and try again.",
            );
        }
        Err(LoginRefusal::Unavailable) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "the service is unavailable; try again shortly",
            );
        }
        Err(LoginRefusal::Busy) => {
            return again(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many sign-ins at this moment. Try again in a few seconds.",
            );
        }
        Err(LoginRefusal::Wrong) => {
            return again(
                StatusCode::UNAUTHORIZED,
                "Wrong username or password, or the account is disabled.",
            );
        }
    };
    // A new session at every login (session fixation): any cookie the browser had is replaced.
    let set_cookie = match new_session(&state, &req, &user.id, now) {
        Ok(c) => c,
        Err(r) => return r,
    };
    proceed(&state, &request_id, &req, &user.id, now, set_cookie).await
}

/// `POST /oauth2/authorize/consent`: the consent form.
#[utoipa::path(post, path = "/oauth2/authorize/consent", tag = "oauth2",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "request_id, csrf, decision=allow|deny (the consent page's form)"),
    responses((status = 303, description = "back to the redirect URI with a code (allow) or error=access_denied (deny)"),
        (status = 403, description = "missing or wrong CSRF token, or not the session that logged in", content_type = "text/html")))]
pub async fn consent(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let now = state.now();
    let form = match form_body(&headers, &body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (request_id, req) = match pending(&state, &headers, &form, true) {
        Ok(p) => p,
        Err(r) => return r,
    };
    // Only the browser that logged in for this request may answer it.
    let expected = *lock(&req.session);
    let Some((session, user_id)) = state.oauth.flows.session_user(cookie(&headers, names(&state).session))
    else {
        return error_page(StatusCode::FORBIDDEN, "you are not signed in any more; start again");
    };
    if expected != Some(session) {
        return error_page(StatusCode::FORBIDDEN, "this form belongs to another sign-in; start again");
    }
    let back = Back::of(&req, state.oauth.issuer());
    match form.one("decision").ok().flatten() {
        Some("allow") => {}
        Some("deny") => {
            state.oauth.flows.requests.invalidate(&request_id);
            if let Some(user_code) = &req.device {
                return match state.store.answer_device(user_code, &user_id, None, now).await {
                    Ok(_) => page(
                        StatusCode::OK,
                        "device_done.html",
                        context! { approved => false, client_name => req.client_name },
                    ),
                    Err(_) => error_page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the service is unavailable; try again shortly",
                    ),
                };
            }
            return back.error("access_denied", "the user denied the request");
        }
        _ => return error_page(StatusCode::BAD_REQUEST, "choose Allow or Deny"),
    }
    let user = match state.store.get_user(&user_id).await {
        Ok(Some(u)) if !u.disabled => u,
        Ok(_) => return back.error("access_denied", "the user may not sign in"),
        Err(_) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "the service is unavailable; try again shortly",
            );
        }
    };
    let scopes = within_user_limit(&req.scopes, user.allowed_scopes.as_deref());
    let Ok(grant_id) = crate::routes::common::new_id("grt", now) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "the server cannot make random numbers");
    };
    issue_code(&state, &request_id, &req, &user.id, Granted::New(&grant_id), scopes, now, false).await
}
