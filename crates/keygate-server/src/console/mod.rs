//! The web console at `/console/`: server-rendered pages (minijinja templates and SVG charts compiled
//! into the binary, one small script for the copy button) for operators.
//!
//! One implementation of every rule: each page reads, and each form changes, through the admin API's own
//! handlers, called in-process with the signed-in operator as the caller ([`ConsoleActor`]). So a
//! change made here is validated with the same messages and audited with the same action and actor as
//! the same change made through the API or the CLI.
//!
//! Sign-in takes an admin key (`keygate:admin`). The session lives in this node's memory (30 minutes
//! idle, 12 hours at most; signing out ends it), its cookie is `HttpOnly`, `SameSite=Strict`, and
//! `Secure` with the `__Host-` prefix on https. Every state-changing form carries the session's CSRF
//! token and is refused cross-site. Each request checks again that the admin key still works: revoking
//! or disabling it (or its consumer) ends its sessions at the next click.

// Handlers answer a page or a redirect on every path, errors included.
#![allow(clippy::result_large_err)]

pub mod chart;
pub mod portal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use keygate_core::{SecretHash, scope};
use minijinja::{Environment, Value as Ctx, context};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tower::ServiceExt;

use crate::auth::{Actor, ClientIp, ConsoleActor, check_credential};
use crate::error::ApiBytes;
use crate::error::ApiPath;
use crate::peer::Client;
use crate::state::AppState;

const IDLE: Duration = Duration::from_secs(30 * 60);
const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Sessions one node keeps at most (the oldest idle ones go first).
const MAX_SESSIONS: u64 = 10_000;
/// Secrets waiting to be shown, per session.
const MAX_REVEALS: usize = 16;
/// Rows per listing page.
const PAGE: u32 = 50;

/// Signed-in console sessions of this node, by the hash of their cookie.
pub struct Sessions {
    cache: moka::sync::Cache<SecretHash, Arc<Session>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            cache: moka::sync::Cache::builder()
                .max_capacity(MAX_SESSIONS)
                .time_to_idle(IDLE)
                .time_to_live(ABSOLUTE)
                .build(),
        }
    }
}

struct Session {
    /// Who signed in (an admin key's id, or a user's), the actor of every change made in the session.
    actor_id: String,
    /// The key's or user's name, for the page header.
    name: String,
    proof: Proof,
    csrf: String,
    /// A message for the next page (after a change), shown once.
    flash: Mutex<Option<Flash>>,
    /// New secrets waiting to be shown once, by a random id in the page's address (oldest first).
    reveals: Mutex<Vec<(String, Reveal)>>,
}

#[derive(Clone, serde::Serialize)]
struct Flash {
    /// `notice` or `error`.
    kind: &'static str,
    message: String,
}

#[derive(Clone, serde::Serialize)]
struct Reveal {
    label: String,
    secret: String,
    note: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console", get(|| async { redirect("/console/") }))
        .route("/console/", get(overview))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/assets/{name}", get(asset))
        .route("/console/consumers", listing("consumers").post(create_consumer))
        .route("/console/consumers/{id}", get(consumer))
        .route("/console/plans", get(plans).post(create_plan))
        .route("/console/keys", listing("keys"))
        .route("/console/keys/{id}", get(key))
        .route("/console/clients", listing("clients"))
        .route("/console/clients/{id}", get(client))
        .route("/console/users", listing("users").post(create_user))
        .route("/console/users/{id}", get(user))
        .route("/console/signing-keys", get(signing_keys))
        .route("/console/audit", get(audit))
        .route("/console/{kind}/{id}/{action}", post(action))
}

// ---------------------------------------------------------------------------------------------------
// Rendering

fn templates() -> &'static Environment<'static> {
    static ENV: std::sync::OnceLock<Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // Ids go into paths: `/` (a client id can be a URL) must be encoded too, which the built-in
        // `urlencode` leaves alone.
        env.add_filter("urlencode", |v: String| enc(&v));
        for (name, text) in [
            ("layout.html", include_str!("../../templates/console/layout.html")),
            ("macros.html", include_str!("../../templates/console/macros.html")),
            ("login.html", include_str!("../../templates/console/login.html")),
            ("overview.html", include_str!("../../templates/console/overview.html")),
            ("consumers.html", include_str!("../../templates/console/consumers.html")),
            ("consumer.html", include_str!("../../templates/console/consumer.html")),
            ("keys.html", include_str!("../../templates/console/keys.html")),
            ("key.html", include_str!("../../templates/console/key.html")),
            ("clients.html", include_str!("../../templates/console/clients.html")),
            ("client.html", include_str!("../../templates/console/client.html")),
            ("users.html", include_str!("../../templates/console/users.html")),
            ("user.html", include_str!("../../templates/console/user.html")),
            ("signing_keys.html", include_str!("../../templates/console/signing_keys.html")),
            ("audit.html", include_str!("../../templates/console/audit.html")),
            ("error.html", include_str!("../../templates/console/error.html")),
            ("plans.html", include_str!("../../templates/console/plans.html")),
            ("portal/layout.html", include_str!("../../templates/portal/layout.html")),
            ("portal/public.html", include_str!("../../templates/portal/public.html")),
            ("portal/login.html", include_str!("../../templates/portal/login.html")),
            ("portal/signup.html", include_str!("../../templates/portal/signup.html")),
            ("portal/message.html", include_str!("../../templates/portal/message.html")),
            ("portal/reset_request.html", include_str!("../../templates/portal/reset_request.html")),
            ("portal/reset.html", include_str!("../../templates/portal/reset.html")),
            ("portal/home.html", include_str!("../../templates/portal/home.html")),
            ("portal/app.html", include_str!("../../templates/portal/app.html")),
            ("portal/key.html", include_str!("../../templates/portal/key.html")),
            ("portal/tokens.html", include_str!("../../templates/portal/tokens.html")),
        ] {
            if let Err(e) = env.add_template(name, text) {
                tracing::error!(template = name, error = %e, "a built-in console template does not parse");
            }
        }
        env
    })
}

/// The console's headers: scripts and styles only from the console itself, no framing, no caching.
fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}

fn render(status: StatusCode, template: &str, ctx: Ctx) -> Response {
    let (status, body) = match templates().get_template(template).and_then(|t| t.render(ctx)) {
        Ok(b) => (status, b),
        Err(e) => {
            tracing::error!(template, error = %e, "rendering a console page failed");
            let page =
                "<!doctype html><title>Error</title><p>internal error; the server log has the details</p>";
            (StatusCode::INTERNAL_SERVER_ERROR, page.to_string())
        }
    };
    let mut resp = (status, Html(body)).into_response();
    secure_headers(resp.headers_mut());
    resp
}

fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    secure_headers(resp.headers_mut());
    resp
}

/// Percent-encodes one path segment or query value (a space as `%20`, which both read as a space; a
/// `+` as `%2B`).
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

fn error_page(status: StatusCode, message: &str) -> Response {
    render(status, "error.html", context! { message })
}

// ---------------------------------------------------------------------------------------------------
// Sessions and CSRF

fn secure(state: &AppState) -> bool {
    state.oauth.issuer().starts_with("https://")
}

fn cookie_name(state: &AppState, base: &'static str) -> String {
    if secure(state) { format!("__Host-{base}") } else { base.to_string() }
}

fn set_cookie(state: &AppState, base: &'static str, value: &str, max_age: u64) -> Option<HeaderValue> {
    let (name, secure) = (cookie_name(state, base), if secure(state) { "; Secure" } else { "" });
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .ok()
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    crate::oauth::authorize::cookie(headers, name)
}

fn random() -> Option<String> {
    keygate_core::credential::random_base62(32).ok()
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// What a session's sign-in rests on, checked again at every request.
enum Proof {
    /// The hash of the very secret presented: a rotation that ends that secret ends the session.
    Key(SecretHash),
    /// A user with the `admin` role: the hash of their password hash then (a new password ends it).
    User(SecretHash),
    /// A developer signed in to the portal: the hash of their password hash then (a new password, or
    /// their suspension, ends it).
    Developer(SecretHash),
}

/// The two signed-in areas: the operators' console and the developers' portal. Each has its own
/// sessions and cookies, so a session of one never opens the other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Area {
    Console,
    Portal,
}

impl Area {
    fn cookie(self) -> &'static str {
        match self {
            Area::Console => "kg_console",
            Area::Portal => "kg_portal",
        }
    }

    fn login_cookie(self) -> &'static str {
        match self {
            Area::Console => "kg_console_login",
            Area::Portal => "kg_portal_login",
        }
    }

    fn login(self) -> &'static str {
        match self {
            Area::Console => "/console/login",
            Area::Portal => "/portal/login",
        }
    }

    fn home(self) -> &'static str {
        match self {
            Area::Console => "/console/",
            Area::Portal => "/portal/",
        }
    }

    fn sessions(self, state: &AppState) -> &Sessions {
        match self {
            Area::Console => &state.console,
            Area::Portal => &state.portal,
        }
    }
}

/// The signed-in operator of a request: the session, and the caller the admin API sees (the key, and
/// this request's address).
struct Signed {
    session: Arc<Session>,
    actor: Actor,
}

enum Gate {
    In(Signed),
    Out(Response),
}

/// The request's session, if it has one whose admin key (and secret) still works from this address;
/// else the way to the login page.
async fn signed_in(state: &AppState, headers: &HeaderMap, client: Client) -> Gate {
    signed_in_at(state, Area::Console, headers, client).await
}

/// [`signed_in`] for either area: a session of that area, whose proof still holds.
async fn signed_in_at(state: &AppState, area: Area, headers: &HeaderMap, client: Client) -> Gate {
    let out = |why: Option<&str>| {
        let to = match why {
            Some(w) => format!("{}?why={w}", area.login()),
            None => area.login().to_string(),
        };
        Gate::Out(redirect(&to))
    };
    let Some(id) = cookie(headers, &cookie_name(state, area.cookie())).filter(|c| c.len() <= 64) else {
        return out(None);
    };
    let hash = SecretHash::of(id);
    let sessions = area.sessions(state);
    let Some(session) = sessions.cache.get(&hash) else { return out(Some("expired")) };
    let works = match (&session.proof, area) {
        (Proof::Key(secret), Area::Console) => {
            admin_key_works(state, &session.actor_id, secret, client.ip).await
        }
        (Proof::User(password), Area::Console) => admin_user_works(state, &session.actor_id, password).await,
        (Proof::Developer(password), Area::Portal) => {
            developer_works(state, &session.actor_id, password).await
        }
        _ => Ok(false),
    };
    match works {
        Ok(true) => {
            let actor = Actor { key_id: session.actor_id.clone(), ip: client.ip };
            Gate::In(Signed { session, actor })
        }
        Ok(false) => {
            sessions.cache.invalidate(&hash);
            out(Some("revoked"))
        }
        Err(()) => Gate::Out(error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is unavailable; try again shortly.",
        )),
    }
}

/// Would the secret the session signed in with still open the admin API from this address: the secret
/// not ended by a rotation, the key not revoked, disabled or expired, `keygate:admin`, the address in its
/// allow-list, its consumer enabled? One read of the verify path's record, from the database (not a
/// cache), so a change made on this node counts at once.
async fn admin_key_works(
    state: &AppState,
    key_id: &str,
    secret: &SecretHash,
    ip: Option<std::net::IpAddr>,
) -> Result<bool, ()> {
    let Some(rec) = state.store.find_secret(secret).await.map_err(|_| ())? else { return Ok(false) };
    let (key, now) = (&rec.key, state.now());
    let live = |t: Option<i64>| t.is_none_or(|t| t > now);
    if rec.key.id != key_id
        || rec.consumer_disabled
        || key.revoked_at.is_some()
        || key.disabled
        || !live(key.expires_at)
        || !live(rec.secret_expires_at)
        || !key.scopes.iter().any(|s| scope::covers(s, scope::ADMIN))
    {
        return Ok(false);
    }
    if let Some(list) = &key.allowed_ips {
        let ranges = keygate_core::limits::parse_allowed_ips(list).unwrap_or_default();
        if !ip.is_some_and(|ip| keygate_core::limits::ip_allowed(&ranges, ip)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Is this user still an enabled console admin with the password they signed in with?
async fn admin_user_works(state: &AppState, user_id: &str, password: &SecretHash) -> Result<bool, ()> {
    let Some(user) = state.store.get_user(user_id).await.map_err(|_| ())? else { return Ok(false) };
    Ok(!user.disabled
        && user.roles.iter().any(|r| r == ADMIN_ROLE)
        && user.password_hash.as_deref().map(SecretHash::of).as_ref() == Some(password))
}

/// Is this developer still enabled, with the password they signed in with?
async fn developer_works(state: &AppState, user_id: &str, password: &SecretHash) -> Result<bool, ()> {
    let Some(user) = state.store.get_user(user_id).await.map_err(|_| ())? else { return Ok(false) };
    Ok(!user.disabled
        && portal::is_developer(&user)
        && user.password_hash.as_deref().map(SecretHash::of).as_ref() == Some(password))
}

/// The role that signs a user in to the console.
const ADMIN_ROLE: &str = "admin";

/// A form post's fields, after the CSRF check: the session's token, and never cross-site.
fn checked_form(signed: &Signed, headers: &HeaderMap, body: &[u8]) -> Result<Form, Response> {
    let forged = || {
        error_page(
            StatusCode::FORBIDDEN,
            "The form's security check failed (a missing or stale CSRF token). Reload the page and try again.",
        )
    };
    if crate::oauth::authorize::cross_site(headers) {
        return Err(forged());
    }
    let form = Form::parse(headers, body).ok_or_else(forged)?;
    if !ct_eq(form.get("csrf"), &signed.session.csrf) {
        return Err(forged());
    }
    Ok(form)
}

struct Form(HashMap<String, Vec<String>>);

impl Form {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Option<Form> {
        let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded") {
            return None;
        }
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Some(Form(map))
    }

    fn get(&self, name: &str) -> &str {
        self.0.get(name).and_then(|v| v.first()).map(String::as_str).unwrap_or("")
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0.get(name).cloned().unwrap_or_default()
    }

    /// A field with one entry per line.
    fn lines(&self, name: &str) -> Vec<String> {
        self.get(name).lines().map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    }

    /// A field that names a list: split on commas, spaces and new lines.
    fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .split([',', ' ', '\n', '\r', '\t'])
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }
}

fn flash(signed: &Signed, kind: &'static str, message: impl Into<String>) {
    *lock(&signed.session.flash) = Some(Flash { kind, message: message.into() });
}

/// Keeps a new secret for the next page to show once; the id to put in its address.
fn reveal(signed: &Signed, label: &str, secret: &str, note: Option<String>) -> String {
    let id = random().unwrap_or_default();
    let mut reveals = lock(&signed.session.reveals);
    if reveals.len() >= MAX_REVEALS {
        reveals.remove(0);
    }
    reveals.push((id.clone(), Reveal { label: label.into(), secret: secret.into(), note }));
    id
}

/// What every signed-in page has: the operator, the CSRF token, the flash message and (once) a secret.
fn base(signed: &Signed, nav: &str, reveal_id: Option<&str>) -> Vec<(&'static str, Ctx)> {
    let flash = lock(&signed.session.flash).take();
    let revealed = reveal_id.and_then(|id| {
        let mut reveals = lock(&signed.session.reveals);
        let at = reveals.iter().position(|(r, _)| r == id)?;
        Some(reveals.remove(at).1)
    });
    vec![
        ("nav", Ctx::from(nav)),
        ("csrf", Ctx::from(signed.session.csrf.clone())),
        ("actor", Ctx::from(signed.actor.key_id.clone())),
        ("actor_name", Ctx::from(signed.session.name.clone())),
        ("flash", Ctx::from_serialize(&flash)),
        ("revealed", Ctx::from_serialize(&revealed)),
    ]
}

fn page(
    signed: &Signed,
    template: &str,
    nav: &str,
    reveal_id: Option<&str>,
    extra: Vec<(&'static str, Ctx)>,
) -> Response {
    let mut ctx = base(signed, nav, reveal_id);
    ctx.extend(extra);
    render(StatusCode::OK, template, Ctx::from_iter(ctx))
}

// ---------------------------------------------------------------------------------------------------
// The admin API, in-process

/// An admin API error, as its JSON body says.
struct Failure {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl Failure {
    fn text(&self) -> String {
        match &self.field {
            Some(f) => format!("{f}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

fn admin_api() -> &'static Router<Arc<AppState>> {
    static API: std::sync::OnceLock<Router<Arc<AppState>>> = std::sync::OnceLock::new();
    API.get_or_init(|| crate::admin_routes().split_for_parts().0)
}

/// Calls an admin API route as the signed-in operator. `path` holds only encoded ids ([`enc`]).
async fn api(
    state: &Arc<AppState>,
    signed: &Signed,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let internal =
        |m: &str| Failure { status: StatusCode::INTERNAL_SERVER_ERROR, message: m.into(), field: None };
    let body = match body {
        Some(v) => Body::from(serde_json::to_vec(&v).map_err(|_| internal("could not encode the request"))?),
        None => Body::empty(),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|_| internal("could not build the request"))?;
    req.extensions_mut().insert(ConsoleActor(signed.actor.clone()));
    let started = std::time::Instant::now();
    let resp = admin_api()
        .clone()
        .with_state(state.clone())
        .oneshot(req)
        .await
        .map_err(|_| internal("the admin API did not answer"))?;
    let status = resp.status();
    // The route template only (ids stay out of logs).
    tracing::debug!(target: "keygate::console", route = path.split('?').next().unwrap_or(""), status = status.as_u16(),
        latency_us = started.elapsed().as_micros() as u64, "admin API call");
    let bytes = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
        .await
        .map_err(|_| internal("the admin API's answer was too large"))?;
    let v: Value =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    if status.is_success() {
        Ok(v)
    } else {
        Err(Failure {
            status,
            message: v["message"].as_str().unwrap_or("the request failed").to_string(),
            field: v["field"].as_str().map(String::from),
        })
    }
}

/// A read for a page: an error becomes the error page (404 stays 404).
async fn read(state: &Arc<AppState>, signed: &Signed, path: &str) -> Result<Value, Response> {
    api(state, signed, Method::GET, path, None).await.map_err(|f| error_page(f.status, &f.text()))
}

/// A page's query string, read leniently: a value that does not parse (or a repeated one) leaves the
/// defaults, so a hand-edited address still gets the page (not a bare 400 without the console's headers).
struct QueryOr<T>(T);

impl<T: serde::de::DeserializeOwned + Default, S: Send + Sync> axum::extract::FromRequestParts<S>
    for QueryOr<T>
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(QueryOr(serde_urlencoded_query(parts.uri.query()).unwrap_or_default()))
    }
}

// ---------------------------------------------------------------------------------------------------
// Sign-in

#[derive(serde::Deserialize, Default)]
struct LoginQuery {
    why: Option<String>,
}

async fn login_page(State(state): State<Arc<AppState>>, QueryOr(q): QueryOr<LoginQuery>) -> Response {
    let message = match q.why.as_deref() {
        Some("expired") => Some("Your session ended. Sign in again."),
        Some("revoked") => Some(
            "What you signed in with no longer opens the console (the key was revoked, disabled or rotated, or the account changed). Sign in again.",
        ),
        Some("out") => Some("You are signed out."),
        _ => None,
    };
    login_form(&state, StatusCode::OK, message)
}

/// The login form, with a fresh login CSRF token (double submit: the same value in a cookie).
fn login_form(state: &AppState, status: StatusCode, message: Option<&str>) -> Response {
    let Some(token) = random() else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "The server cannot make random numbers.");
    };
    let mut resp = render(status, "login.html", context! { message, csrf => token.clone() });
    if let Some(c) = set_cookie(state, "kg_console_login", &token, 3600) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

async fn login(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let Some(form) = Form::parse(&headers, &body) else {
        return login_form(&state, StatusCode::BAD_REQUEST, Some("Send the form as a browser does."));
    };
    let expected = cookie(&headers, &cookie_name(&state, "kg_console_login")).unwrap_or("");
    if crate::oauth::authorize::cross_site(&headers)
        || expected.is_empty()
        || !ct_eq(form.get("csrf"), expected)
    {
        return login_form(&state, StatusCode::FORBIDDEN, Some("The form expired. Sign in again."));
    }
    if !form.get("username").trim().is_empty() {
        return user_login(&state, client, &headers, &form).await;
    }
    let key = form.get("key").trim();
    let actor = match check_credential(&state, Some(key).filter(|k| !k.is_empty()), client, scope::ADMIN)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            let status = e.code.status();
            let message = match status {
                StatusCode::TOO_MANY_REQUESTS => "Too many failed sign-ins from this address. Wait a minute.",
                StatusCode::FORBIDDEN => "This key works but is not an admin key (it lacks keygate:admin).",
                StatusCode::SERVICE_UNAVAILABLE => "The database is unavailable; try again shortly.",
                _ => "This is not a working admin key.",
            };
            return login_form(&state, status, Some(message));
        }
    };
    let name = match state.store.get_key(&actor.key_id).await {
        Ok(Some(k)) => k.name,
        _ => actor.key_id.clone(),
    };
    start_session(&state, Area::Console, &headers, actor.key_id, name, Proof::Key(SecretHash::of(key)))
}

/// Signs in with a user account that has the `admin` role: the same throttles and Argon2 limits as the
/// authorization endpoint's login page.
async fn user_login(state: &AppState, client: Client, headers: &HeaderMap, form: &Form) -> Response {
    let username = form.get("username").trim().to_string();
    let refuse = |status: StatusCode, message: &str| login_form(state, status, Some(message));
    let wrong = "Wrong username or password, or the account is disabled.";
    let user = match crate::password::login(
        state,
        &state.console_login_throttle,
        client,
        &username,
        form.get("password").to_string(),
    )
    .await
    {
        Ok(u) => u,
        Err(r) => {
            let (status, message) = refusal(r);
            return refuse(status, message);
        }
    };
    if !user.roles.iter().any(|r| r == ADMIN_ROLE) {
        return refuse(
            StatusCode::FORBIDDEN,
            "This account has no admin role; an operator can give it one (keygate users update USER --role admin).",
        );
    }
    let Some(hash) = user.password_hash.as_deref().map(SecretHash::of) else {
        return refuse(StatusCode::UNAUTHORIZED, wrong);
    };
    if let Err(e) = state.store.record_login(&user.id, state.now()).await {
        tracing::warn!(error = %e, "could not record a console sign-in's time");
    }
    start_session(state, Area::Console, headers, user.id, user.username, Proof::User(hash))
}

/// What a sign-in form says when a password sign-in is refused.
fn refusal(r: crate::password::LoginRefusal) -> (StatusCode, &'static str) {
    use crate::password::LoginRefusal;
    match r {
        LoginRefusal::Throttled => {
            (StatusCode::TOO_MANY_REQUESTS, "Too many failed sign-ins. Wait a minute.")
        }
        LoginRefusal::Unavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "The database is unavailable; try again shortly.")
        }
        LoginRefusal::Busy => {
            (StatusCode::SERVICE_UNAVAILABLE, "Too many sign-ins at this moment. Try again shortly.")
        }
        LoginRefusal::Wrong => {
            (StatusCode::UNAUTHORIZED, "Wrong username or password, or the account is disabled.")
        }
    }
}

/// A new session (a new id at every sign-in: one planted before it is worthless), and the way in.
fn start_session(
    state: &AppState,
    area: Area,
    headers: &HeaderMap,
    actor_id: String,
    name: String,
    proof: Proof,
) -> Response {
    let (Some(id), Some(csrf)) = (random(), random()) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "The server cannot make random numbers.");
    };
    let sessions = area.sessions(state);
    if let Some(old) = cookie(headers, &cookie_name(state, area.cookie())) {
        sessions.cache.invalidate(&SecretHash::of(old));
    }
    let session =
        Session { actor_id, name, proof, csrf, flash: Mutex::new(None), reveals: Mutex::new(Vec::new()) };
    sessions.cache.insert(SecretHash::of(&id), Arc::new(session));
    let mut resp = redirect(area.home());
    for c in [
        set_cookie(state, area.cookie(), &id, ABSOLUTE.as_secs()),
        set_cookie(state, area.login_cookie(), "", 0),
    ]
    .into_iter()
    .flatten()
    {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

async fn logout(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    sign_out(&state, Area::Console, client, &headers, &body).await
}

/// Ends the request's session of `area` (a form post with its CSRF token), and back to its sign-in page.
async fn sign_out(
    state: &AppState,
    area: Area,
    client: Client,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let signed = match signed_in_at(state, area, headers, client).await {
        Gate::In(s) => s,
        Gate::Out(r) => return r,
    };
    if let Err(r) = checked_form(&signed, headers, body) {
        return r;
    }
    if let Some(id) = cookie(headers, &cookie_name(state, area.cookie())) {
        area.sessions(state).cache.invalidate(&SecretHash::of(id));
    }
    let mut resp = redirect(&format!("{}?why=out", area.login()));
    if let Some(c) = set_cookie(state, area.cookie(), "", 0) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

async fn asset(ApiPath(name): ApiPath<String>) -> Response {
    let (body, ct) = match name.as_str() {
        "console.css" => (include_str!("../../assets/console.css"), "text/css; charset=utf-8"),
        "console.js" => (include_str!("../../assets/console.js"), "text/javascript; charset=utf-8"),
        _ => return error_page(StatusCode::NOT_FOUND, "No such file."),
    };
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

// ---------------------------------------------------------------------------------------------------
// Pages

macro_rules! signed {
    ($state:expr, $headers:expr, $client:expr) => {
        match signed_in(&$state, &$headers, $client).await {
            Gate::In(s) => s,
            Gate::Out(r) => return r,
        }
    };
}

macro_rules! ok {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(r) => return r,
        }
    };
}

/// A chart range: its name, the granularity and span it asks the usage API for.
fn range(name: Option<&str>) -> (&'static str, &'static str, i64) {
    match name {
        Some("1h") => ("1h", "minute", 3_600_000),
        Some("7d") => ("7d", "hour", 7 * 86_400_000),
        Some("30d") => ("30d", "day", 30 * 86_400_000),
        _ => ("24h", "hour", 86_400_000),
    }
}

/// The usage query of a range, ending now (rounded up to the next bucket, so the current one shows).
fn usage_query(state: &AppState, range_name: Option<&str>) -> (String, &'static str) {
    let (name, granularity, span) = range(range_name);
    (span_query(state, granularity, span), name)
}

/// The usage boards' query of a range: whole days from 7 days up (a day bucket per key and day is
/// read, not 24 hour buckets), the chart's buckets below.
fn board_query(state: &AppState, range_name: Option<&str>) -> String {
    let (_, granularity, span) = range(range_name);
    let granularity = if span >= 7 * 86_400_000 { "day" } else { granularity };
    span_query(state, granularity, span)
}

/// `granularity`, `from` and `to` covering `span` up to the end of the current bucket.
fn span_query(state: &AppState, granularity: &str, span: i64) -> String {
    let step = match granularity {
        "minute" => 60_000,
        "day" => 86_400_000,
        _ => 3_600_000,
    };
    let now = state.now();
    let to = now - now.rem_euclid(step) + step;
    let from = to - span;
    format!(
        "granularity={granularity}&from={}&to={}",
        enc(&crate::time::rfc3339(from)),
        enc(&crate::time::rfc3339(to))
    )
}

fn chart_ctx(report: &Value, label: &str) -> Vec<(&'static str, Ctx)> {
    let s = chart::series(report);
    let legend: Vec<Value> =
        s.totals.iter().map(|(c, n)| json!({"code": c, "count": n, "colour": chart::colour(c)})).collect();
    vec![
        ("chart", Ctx::from_safe_string(chart::stacked(&s, label))),
        ("legend", Ctx::from_serialize(&legend)),
        ("total", Ctx::from(report["total"].as_i64().unwrap_or(0))),
    ]
}

#[derive(serde::Deserialize, Default)]
struct RangeQuery {
    range: Option<String>,
    reveal: Option<String>,
}

async fn overview(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let signed = signed!(state, headers, client);
    let (usage_q, range_name) = usage_query(&state, q.range.as_deref());
    let report = ok!(read(&state, &signed, &format!("/v1/usage?{usage_q}")).await);
    let board_q = board_query(&state, q.range.as_deref());
    let board =
        |group: &str, order: &str| format!("/v1/usage/leaders?group={group}&order={order}&limit=5&{board_q}");
    let top_keys = ok!(read(&state, &signed, &board("key", "volume")).await);
    let failing_keys = ok!(read(&state, &signed, &board("key", "failures")).await);
    let top_consumers = ok!(read(&state, &signed, &board("consumer", "volume")).await);
    let failing_consumers = ok!(read(&state, &signed, &board("consumer", "failures")).await);
    let low_quota = ok!(read(&state, &signed, "/v1/keys/lowest-quota?limit=5").await);
    // The ten expiring soonest (the listing is in id order).
    let expiring = ok!(read(&state, &signed, "/v1/keys/expiring?within_days=7&limit=1000").await);
    let mut soonest: Vec<Value> = expiring["items"].as_array().cloned().unwrap_or_default();
    soonest.sort_by(|a, b| a["expires_at"].as_str().cmp(&b["expires_at"].as_str()));
    let more_expiring =
        soonest.len().saturating_sub(10) + if expiring["next_after"].is_null() { 0 } else { 1 };
    soonest.truncate(10);
    let mut extra = chart_ctx(&report, "Verifications by outcome");
    extra.extend([
        ("range", Ctx::from(range_name)),
        ("top_keys", Ctx::from_serialize(&top_keys["items"])),
        ("failing_keys", Ctx::from_serialize(&failing_keys["items"])),
        ("top_consumers", Ctx::from_serialize(&top_consumers["items"])),
        ("failing_consumers", Ctx::from_serialize(&failing_consumers["items"])),
        ("low_quota", Ctx::from_serialize(&low_quota["items"])),
        ("expiring", Ctx::from_serialize(&soonest)),
        ("more_expiring", Ctx::from(more_expiring)),
        ("latency", Ctx::from_serialize(latency_view(&state.metrics.verify_latency()))),
        ("tokens_issued", Ctx::from(state.metrics.tokens_issued())),
    ]);
    page(&signed, "overview.html", "overview", None, extra)
}

/// Verify latency for the overview: each percentile as text (`–` before any verification, `> 250 ms`
/// above the largest bucket).
fn latency_view(l: &crate::metrics::LatencySummary) -> Value {
    let show = |v: Option<f64>| match v {
        _ if l.count == 0 => "–".to_string(),
        None => format!("> {} ms", crate::metrics::VERIFY_BUCKETS.last().map_or(0.0, |b| b * 1000.0)),
        Some(s) if s < 0.001 => format!("≤ {} µs", (s * 1e6).round()),
        Some(s) => format!("≤ {} ms", (s * 1e4).round() / 10.0),
    };
    json!({"count": l.count, "p50": show(l.p50), "p90": show(l.p90), "p99": show(l.p99)})
}

#[derive(serde::Deserialize, Default)]
struct ListQuery {
    q: Option<String>,
    after: Option<String>,
    /// The keys page: only this consumer's keys.
    consumer: Option<String>,
}

fn list_path(base: &str, q: &ListQuery, more: &str) -> String {
    let mut path = format!("{base}?limit={PAGE}{more}");
    if let Some(c) = q.consumer.as_deref().filter(|s| !s.is_empty()) {
        path.push_str(&format!("&consumer_id={}", enc(c)));
    }
    if let Some(s) = q.q.as_deref().filter(|s| !s.is_empty()) {
        path.push_str(&format!("&q={}", enc(s)));
    }
    if let Some(a) = q.after.as_deref().filter(|s| !s.is_empty()) {
        path.push_str(&format!("&after={}", enc(a)));
    }
    path
}

fn list_ctx(list: &Value, q: &ListQuery) -> Vec<(&'static str, Ctx)> {
    vec![
        ("items", Ctx::from_serialize(&list["items"])),
        ("next_after", Ctx::from_serialize(&list["next_after"])),
        ("q", Ctx::from(q.q.clone().unwrap_or_default())),
        ("paged", Ctx::from(q.after.is_some())),
    ]
}

/// The handler of a listing page: `/v1/{kind}` through the API, `{kind}.html`.
fn listing(kind: &'static str) -> axum::routing::MethodRouter<Arc<AppState>> {
    get(
        move |State(state): State<Arc<AppState>>,
              ClientIp(client): ClientIp,
              headers: HeaderMap,
              QueryOr(q): QueryOr<ListQuery>| async move {
            let signed = signed!(state, headers, client);
            // Only the keys page takes a consumer.
            let q = if kind == "keys" { q } else { ListQuery { consumer: None, ..q } };
            let list = ok!(read(&state, &signed, &list_path(&format!("/v1/{kind}"), &q, "")).await);
            let mut extra = list_ctx(&list, &q);
            extra.push(("consumer", Ctx::from(q.consumer.clone().unwrap_or_default())));
            page(&signed, &format!("{kind}.html"), kind, None, extra)
        },
    )
}

async fn consumer(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let signed = signed!(state, headers, client);
    let c = ok!(read(&state, &signed, &format!("/v1/consumers/{}", enc(&id))).await);
    let keys = ok!(read(&state, &signed, &format!("/v1/keys?consumer_id={}&limit=200", enc(&id))).await);
    let clients = ok!(read(&state, &signed, &format!("/v1/clients?q={}&limit=200", enc(&id))).await);
    let (usage_q, range_name) = usage_query(&state, q.range.as_deref());
    let report = ok!(read(&state, &signed, &format!("/v1/consumers/{}/usage?{usage_q}", enc(&id))).await);
    let clients: Vec<&Value> =
        clients["items"].as_array().into_iter().flatten().filter(|x| x["consumer_id"] == c["id"]).collect();
    let plan = match c["plan_id"].as_str() {
        Some(p) => read(&state, &signed, &format!("/v1/plans/{}", enc(p))).await.ok(),
        None => None,
    };
    let mut extra = chart_ctx(&report, "Verifications of this consumer's keys");
    extra.extend([
        ("plan", Ctx::from_serialize(&plan)),
        ("c", Ctx::from_serialize(&c)),
        ("c_json", json_ctx(&c, &["rate_limits", "metadata"])),
        ("keys", Ctx::from_serialize(&keys["items"])),
        ("clients", Ctx::from_serialize(&clients)),
        ("range", Ctx::from(range_name)),
    ]);
    page(&signed, "consumer.html", "consumers", q.reveal.as_deref(), extra)
}

/// A key's quota gauge: uses left of what a refill gives (or of the most seen, without a refill).
fn quota_gauge(k: &Value) -> Option<Value> {
    k["quota"]["remaining"].as_u64().map(|remaining| {
        let max = k["quota"]["refill"]["amount"].as_u64().unwrap_or(remaining).max(remaining).max(1);
        json!({"remaining": remaining, "max": max, "percent": remaining.saturating_mul(100) / max})
    })
}

/// Pretty JSON of some of an object's fields, for the edit forms' text areas (empty for `null`).
fn json_ctx(v: &Value, fields: &[&str]) -> Ctx {
    let mut out = serde_json::Map::new();
    for f in fields {
        let text = match &v[*f] {
            Value::Null => String::new(),
            x => serde_json::to_string_pretty(x).unwrap_or_default(),
        };
        out.insert((*f).to_string(), Value::String(text));
    }
    Ctx::from_serialize(Value::Object(out))
}

async fn key(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let signed = signed!(state, headers, client);
    let k = ok!(read(&state, &signed, &format!("/v1/keys/{}", enc(&id))).await);
    let (usage_q, range_name) = usage_query(&state, q.range.as_deref());
    let report = ok!(read(&state, &signed, &format!("/v1/keys/{}/usage?{usage_q}", enc(&id))).await);
    let c = ok!(read(
        &state,
        &signed,
        &format!("/v1/consumers/{}", enc(k["consumer_id"].as_str().unwrap_or("")))
    )
    .await);
    let gauge = quota_gauge(&k);
    let mut extra = chart_ctx(&report, "Verifications of this key");
    extra.extend([
        ("k", Ctx::from_serialize(&k)),
        ("k_json", json_ctx(&k, &["rate_limits", "quota", "metadata"])),
        ("consumer", Ctx::from_serialize(&c)),
        ("gauge", Ctx::from_serialize(&gauge)),
        ("range", Ctx::from(range_name)),
    ]);
    page(&signed, "key.html", "keys", q.reveal.as_deref(), extra)
}

async fn client(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let signed = signed!(state, headers, client);
    let c = ok!(read(&state, &signed, &format!("/v1/clients/{}", enc(&id))).await);
    page(&signed, "client.html", "clients", q.reveal.as_deref(), vec![("c", Ctx::from_serialize(&c))])
}

async fn user(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Response {
    let signed = signed!(state, headers, client);
    let u = ok!(read(&state, &signed, &format!("/v1/users/{}", enc(&id))).await);
    let grants = ok!(read(&state, &signed, &format!("/v1/users/{}/grants", enc(&id))).await);
    let apps = ok!(read(&state, &signed, &format!("/v1/consumers?owner_id={}&limit=200", enc(&id))).await);
    // What the edit form showed, as JSON (escaped into the attributes like any text).
    let extra = vec![
        ("orig_allowed_scopes", Ctx::from(u["allowed_scopes"].to_string())),
        ("orig_roles", Ctx::from(u["roles"].to_string())),
        ("u", Ctx::from_serialize(&u)),
        ("grants", Ctx::from_serialize(&grants["items"])),
        ("apps", Ctx::from_serialize(&apps["items"])),
    ];
    page(&signed, "user.html", "users", None, extra)
}

async fn signing_keys(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
) -> Response {
    let signed = signed!(state, headers, client);
    let list = ok!(read(&state, &signed, "/v1/signing-keys").await);
    page(&signed, "signing_keys.html", "signing-keys", None, vec![("items", Ctx::from_serialize(&list))])
}

#[derive(serde::Deserialize)]
struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    from: Option<String>,
    to: Option<String>,
    before: Option<String>,
}

async fn audit(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let signed = signed!(state, headers, client);
    let q: AuditQuery = match serde_urlencoded_query(raw.as_deref()) {
        Some(q) => q,
        None => return error_page(StatusCode::BAD_REQUEST, "The filter is not valid."),
    };
    let mut path = format!("/v1/audit?limit={PAGE}");
    let mut filters = serde_json::Map::new();
    // Dates from the form's date inputs (YYYY-MM-DD) are days in UTC; full RFC 3339 times pass through.
    let as_time = |s: &str| if s.len() == 10 { format!("{s}T00:00:00Z") } else { s.to_string() };
    for (name, param, value) in [
        ("actor", "actor", q.actor.clone()),
        ("action", "action", q.action.clone()),
        ("target", "target_id", q.target.clone()),
        ("from", "from", q.from.as_deref().map(as_time)),
        ("to", "to", q.to.as_deref().map(as_time)),
        ("before", "before", q.before.clone()),
    ] {
        if let Some(v) = value.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
            path.push_str(&format!("&{param}={}", enc(&v)));
            if name != "before" {
                filters.insert(name.into(), Value::String(v));
            }
        }
    }
    let (list, error) = match api(&state, &signed, Method::GET, &path, None).await {
        Ok(l) => (l, None),
        Err(f) => (json!({"items": []}), Some(f.text())),
    };
    let shown = |k: &str| q_value(&filters, k);
    let extra = vec![
        ("items", Ctx::from_serialize(&list["items"])),
        ("next_before", Ctx::from_serialize(&list["next_before"])),
        ("filter_error", Ctx::from_serialize(&error)),
        ("f_actor", Ctx::from(shown("actor"))),
        ("f_action", Ctx::from(shown("action"))),
        ("f_target", Ctx::from(shown("target"))),
        ("f_from", Ctx::from(q.from.unwrap_or_default())),
        ("f_to", Ctx::from(q.to.unwrap_or_default())),
        ("filter_query", Ctx::from(filter_query(&filters))),
    ];
    page(&signed, "audit.html", "audit", None, extra)
}

fn q_value(m: &serde_json::Map<String, Value>, k: &str) -> String {
    m.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

/// The audit filters as a query string, for the next page's link.
fn filter_query(m: &serde_json::Map<String, Value>) -> String {
    m.iter().map(|(k, v)| format!("{k}={}", enc(v.as_str().unwrap_or("")))).collect::<Vec<_>>().join("&")
}

fn serde_urlencoded_query<T: serde::de::DeserializeOwned>(raw: Option<&str>) -> Option<T> {
    let map: serde_json::Map<String, Value> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    serde_json::from_value(Value::Object(map)).ok()
}

// ---------------------------------------------------------------------------------------------------
// Changes

async fn create_consumer(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let signed = signed!(state, headers, client);
    let form = ok!(checked_form(&signed, &headers, &body));
    let mut req = json!({"name": form.get("name").trim()});
    if !form.get("external_id").trim().is_empty() {
        req["external_id"] = json!(form.get("external_id").trim());
    }
    match api(&state, &signed, Method::POST, "/v1/consumers", Some(req)).await {
        Ok(c) => {
            flash(&signed, "notice", "Consumer created.");
            redirect(&format!("/console/consumers/{}", enc(c["id"].as_str().unwrap_or(""))))
        }
        Err(f) => {
            flash(&signed, "error", f.text());
            redirect("/console/consumers")
        }
    }
}

async fn plans(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
) -> Response {
    let signed = signed!(state, headers, client);
    let list = ok!(read(&state, &signed, "/v1/plans").await);
    page(&signed, "plans.html", "plans", None, vec![("items", Ctx::from_serialize(&list["items"]))])
}

async fn create_plan(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let signed = signed!(state, headers, client);
    let form = ok!(checked_form(&signed, &headers, &body));
    let back = |m: String| {
        flash(&signed, "error", m);
        redirect("/console/plans")
    };
    let mut req = json!({"name": form.get("name").trim(), "self_service": form.get("self_service") == "on",
        "is_default": form.get("is_default") == "on"});
    for (field, conv) in [
        ("description", Conv::OptText),
        ("rate_limits", Conv::Json),
        ("quota", Conv::Json),
        ("allowed_scopes", Conv::OptList),
    ] {
        match convert(form.get(field), field, conv) {
            Ok(Value::Null) => {}
            Ok(v) => req[field] = v,
            Err(m) => return back(m),
        }
    }
    let days = form.get("key_lifetime_days").trim();
    if !days.is_empty() {
        match days.parse::<i64>() {
            Ok(d) if d > 0 => req["key_lifetime_seconds"] = json!(d.saturating_mul(86_400)),
            _ => return back("key_lifetime_days: must be a whole number of days".into()),
        }
    }
    match api(&state, &signed, Method::POST, "/v1/plans", Some(req)).await {
        Ok(_) => {
            flash(&signed, "notice", "Plan created.");
            redirect("/console/plans")
        }
        Err(f) => back(f.text()),
    }
}

async fn create_user(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let signed = signed!(state, headers, client);
    let form = ok!(checked_form(&signed, &headers, &body));
    let mut req = json!({"username": form.get("username").trim()});
    for f in ["password", "email", "display_name"] {
        if !form.get(f).is_empty() {
            req[f] = json!(form.get(f));
        }
    }
    match api(&state, &signed, Method::POST, "/v1/users", Some(req)).await {
        Ok(u) => {
            flash(&signed, "notice", "User created.");
            redirect(&format!("/console/users/{}", enc(u["id"].as_str().unwrap_or(""))))
        }
        Err(f) => {
            flash(&signed, "error", f.text());
            redirect("/console/users")
        }
    }
}

/// What a form post asks of the admin API, and where the browser goes afterwards.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
    back: String,
    done: &'static str,
}

/// `POST /console/{kind}/{id}/{action}`: each of the detail pages' buttons and forms.
async fn action(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath((kind, id, act)): ApiPath<(String, String, String)>,
    ApiBytes(body): ApiBytes,
) -> Response {
    let signed = signed!(state, headers, client);
    let form = ok!(checked_form(&signed, &headers, &body));
    let e = enc(&id);
    let plan = match plan(&state, &signed, &kind, &id, &e, &act, &form).await {
        Ok(p) => p,
        Err((back, message)) => {
            flash(&signed, "error", message);
            return redirect(&back);
        }
    };
    let back = plan.back.clone();
    perform(&state, &signed, plan, |v| match (kind.as_str(), act.as_str()) {
        ("consumers", "keys") => format!("/console/keys/{}", enc(v["id"].as_str().unwrap_or(""))),
        ("consumers", "clients") => {
            format!("/console/clients/{}", enc(v["client_id"].as_str().unwrap_or("")))
        }
        _ => back.clone(),
    })
    .await
}

/// Runs a form's admin API call. A new secret in the answer is kept to be shown once on the page
/// `secret_page` names for the answer; otherwise the call's message (or the API's error) is flashed on
/// the page it goes back to.
async fn perform(
    state: &Arc<AppState>,
    signed: &Signed,
    call: Call,
    secret_page: impl Fn(&Value) -> String,
) -> Response {
    let Call { method, path, body, back, done } = call;
    match api(state, signed, method, &path, body).await {
        Ok(v) => {
            let secret = [("key", "API key"), ("client_secret", "Client secret")]
                .into_iter()
                .find_map(|(field, label)| v[field].as_str().map(|s| (label, s.to_string())));
            let back = match secret {
                Some((label, s)) => {
                    let note = v["previous_expires_at"]
                        .as_str()
                        .map(|t| format!("The previous secret works until {t}."));
                    let rid = reveal(signed, label, &s, note);
                    format!("{}?reveal={rid}", secret_page(&v))
                }
                None => {
                    flash(signed, "notice", done);
                    back
                }
            };
            redirect(&back)
        }
        Err(f) => {
            flash(signed, "error", f.text());
            redirect(&back)
        }
    }
}

/// Builds the admin API call of a form post, or says (with the page to go back to) why not.
async fn plan(
    state: &Arc<AppState>,
    signed: &Signed,
    kind: &str,
    id: &str,
    e: &str,
    act: &str,
    form: &Form,
) -> Result<Call, (String, String)> {
    let back = match kind {
        "signing-keys" | "plans" => format!("/console/{kind}"),
        _ => format!("/console/{kind}/{e}"),
    };
    let call = |method: Method, path: String, body: Option<Value>, done: &'static str| Call {
        method,
        path,
        body,
        back: back.clone(),
        done,
    };
    let fail = |m: String| (back.clone(), m);
    let overlap = || -> Result<u64, (String, String)> {
        let s = form.get("overlap_seconds").trim();
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse().map_err(|_| fail("overlap_seconds: must be a number of seconds".into()))
        }
    };
    // A destructive action needs its target typed out.
    let confirmed = |expected: &str| -> Result<(), (String, String)> {
        if form.get("confirm").trim() == expected {
            Ok(())
        } else {
            Err(fail(format!("Type {expected} to confirm; nothing was changed.")))
        }
    };
    // An edit form: a PATCH of the fields changed from what the page showed, if any.
    let edit_patch =
        |fields: &[(&str, Conv)], path: String, done: &'static str| -> Result<Call, (String, String)> {
            let mut body = serde_json::Map::new();
            for (field, conv) in fields {
                edited(&mut body, form, field, *conv).map_err(fail)?;
            }
            if body.is_empty() {
                return Err(fail("Nothing changed.".into()));
            }
            Ok(call(Method::PATCH, path, Some(Value::Object(body)), done))
        };
    Ok(match (kind, act) {
        ("consumers", "disable" | "enable") => {
            call(Method::POST, format!("/v1/consumers/{e}/{act}"), None, "Consumer updated.")
        }
        ("consumers", "update") => edit_patch(
            &[
                ("name", Conv::Text),
                ("external_id", Conv::OptText),
                ("leak_policy", Conv::Text),
                ("rate_limits", Conv::Json),
                ("metadata", Conv::Object),
            ],
            format!("/v1/consumers/{e}"),
            "Consumer updated.",
        )?,
        ("consumers", "keys") => {
            let mut body =
                json!({"consumer_id": id, "name": form.get("name").trim(), "scopes": form.list("scopes")});
            if !form.get("environment").is_empty() {
                body["environment"] = json!(form.get("environment"));
            }
            if !form.get("expires_at").trim().is_empty() {
                body["expires_at"] = json!(form.get("expires_at").trim());
            }
            call(Method::POST, "/v1/keys".into(), Some(body), "Key created.")
        }
        ("consumers", "clients") => {
            let mut body = json!({
                "consumer_id": id, "name": form.get("name").trim(), "scopes": form.list("scopes"),
                "grant_types": form.all("grant_types"), "redirect_uris": form.lines("redirect_uris"),
            });
            if !form.get("token_format").is_empty() {
                body["token_format"] = json!(form.get("token_format"));
            }
            call(Method::POST, "/v1/clients".into(), Some(body), "Client created.")
        }
        ("keys", "disable" | "enable") => {
            call(Method::POST, format!("/v1/keys/{e}/{act}"), None, "Key updated.")
        }
        ("keys", "revoke") => {
            confirmed(id)?;
            call(Method::POST, format!("/v1/keys/{e}/revoke"), None, "Key revoked.")
        }
        ("keys", "rotate") => call(
            Method::POST,
            format!("/v1/keys/{e}/rotate"),
            Some(json!({"overlap_seconds": overlap()?})),
            "Key rotated.",
        ),
        ("keys", "update") => edit_patch(
            &[
                ("name", Conv::Text),
                ("scopes", Conv::List),
                ("expires_at", Conv::OptText),
                ("allowed_ips", Conv::OptList),
                ("rate_limits", Conv::Json),
                ("quota", Conv::Json),
                ("metadata", Conv::Object),
            ],
            format!("/v1/keys/{e}"),
            "Key updated.",
        )?,
        ("clients", "disable" | "enable" | "revoke-tokens") => {
            call(Method::POST, format!("/v1/clients/{e}/{act}"), None, "Client updated.")
        }
        ("clients", "update") => edit_patch(
            &[
                ("name", Conv::Text),
                ("scopes", Conv::List),
                ("audiences", Conv::List),
                ("redirect_uris", Conv::Lines),
                ("token_lifetime_seconds", Conv::Int),
            ],
            format!("/v1/clients/{e}"),
            "Client updated.",
        )?,
        ("users", "update") => {
            let mut body = serde_json::Map::new();
            for (field, conv) in [("email", Conv::OptText), ("display_name", Conv::OptText)] {
                edited(&mut body, form, field, conv).map_err(fail)?;
            }
            // "Any scope" is `null`; otherwise the list, which may be empty (nothing).
            let scopes = if form.get("any_scope") == "on" {
                Value::Null
            } else {
                convert(form.get("allowed_scopes"), "allowed_scopes", Conv::List).map_err(fail)?
            };
            let roles: Vec<&str> = [("role_admin", ADMIN_ROLE), ("role_developer", portal::DEVELOPER_ROLE)]
                .into_iter()
                .filter(|(field, _)| form.get(field) == "on")
                .map(|(_, role)| role)
                .collect();
            let roles = json!(roles);
            for (field, value) in [("allowed_scopes", scopes), ("roles", roles)] {
                let orig = serde_json::from_str::<Value>(form.get(&format!("orig_{field}"))).ok();
                if orig.as_ref() != Some(&value) {
                    body.insert(field.into(), value);
                }
            }
            if body.is_empty() {
                return Err(fail("Nothing changed.".into()));
            }
            call(Method::PATCH, format!("/v1/users/{e}"), Some(Value::Object(body)), "User updated.")
        }
        ("clients", "rotate-secret") => call(
            Method::POST,
            format!("/v1/clients/{e}/rotate-secret"),
            Some(json!({"overlap_seconds": overlap()?})),
            "Secret rotated.",
        ),
        ("clients", "delete") => {
            confirmed(id)?;
            let c = api(state, signed, Method::GET, &format!("/v1/clients/{e}"), None)
                .await
                .map_err(|f| fail(f.text()))?;
            Call {
                back: format!("/console/consumers/{}", enc(c["consumer_id"].as_str().unwrap_or(""))),
                ..call(Method::DELETE, format!("/v1/clients/{e}"), None, "Client deleted.")
            }
        }
        ("users", "disable" | "enable") => {
            call(Method::POST, format!("/v1/users/{e}/{act}"), None, "User updated.")
        }
        ("users", "revoke-grant") => {
            let grant = enc(form.get("grant_id"));
            call(Method::DELETE, format!("/v1/users/{e}/grants/{grant}"), None, "Grant revoked.")
        }
        ("plans", "update") => edit_patch(
            &[
                ("name", Conv::Text),
                ("description", Conv::OptText),
                ("rate_limits", Conv::Json),
                ("quota", Conv::Json),
                ("allowed_scopes", Conv::OptList),
                ("key_lifetime_seconds", Conv::OptDays),
                ("self_service", Conv::Flag),
            ],
            format!("/v1/plans/{e}"),
            "Plan updated.",
        )?,
        ("plans", "default") => call(
            Method::PATCH,
            format!("/v1/plans/{e}"),
            Some(json!({"is_default": true})),
            "The portal's default plan changed.",
        ),
        ("plans", "delete") => {
            confirmed(id)?;
            call(Method::DELETE, format!("/v1/plans/{e}"), None, "Plan deleted.")
        }
        ("signing-keys", "revoke") => {
            confirmed(id)?;
            call(Method::POST, format!("/v1/signing-keys/{e}/revoke"), None, "Signing key revoked.")
        }
        ("signing-keys", "rotate") => call(
            Method::POST,
            "/v1/signing-keys/rotate".into(),
            Some(json!({})),
            "A new signing key is published.",
        ),
        _ => return Err(("/console/".into(), "No such action.".into())),
    })
}

/// How an edit form's field becomes the API's JSON.
#[derive(Clone, Copy)]
enum Conv {
    /// Trimmed text.
    Text,
    /// Trimmed text; empty is `null`.
    OptText,
    /// Words separated by spaces, commas or new lines.
    List,
    /// The same; empty is `null`.
    OptList,
    /// JSON text; empty is `null`.
    Json,
    /// A JSON object; empty is `{}`.
    Object,
    /// One entry per line.
    Lines,
    /// A whole number.
    Int,
    /// Whole days, sent as seconds; empty is `null`.
    OptDays,
    /// A checkbox: `on` is true, anything else false.
    Flag,
}

fn convert(text: &str, field: &str, conv: Conv) -> Result<Value, String> {
    let words = || text.split([',', ' ', '\n', '\r', '\t']).filter(|w| !w.is_empty()).collect::<Vec<_>>();
    Ok(match conv {
        Conv::Text => json!(text.trim()),
        Conv::OptText => opt_text(text),
        Conv::List => json!(words()),
        Conv::OptList => {
            let w = words();
            if w.is_empty() { Value::Null } else { json!(w) }
        }
        Conv::Lines => json!(text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>()),
        Conv::Int => {
            json!(text.trim().parse::<i64>().map_err(|_| format!("{field}: must be a whole number"))?)
        }
        Conv::OptDays => match text.trim() {
            "" => Value::Null,
            t => json!(
                t.parse::<i64>()
                    .ok()
                    .filter(|d| *d > 0)
                    .ok_or_else(|| format!("{field}: must be a whole number of days"))?
                    .saturating_mul(86_400)
            ),
        },
        Conv::Flag => json!(text == "on"),
        Conv::Json | Conv::Object => {
            let t = text.trim();
            if t.is_empty() {
                if matches!(conv, Conv::Object) { json!({}) } else { Value::Null }
            } else {
                serde_json::from_str(t).map_err(|e| format!("{field}: not valid JSON ({e})"))?
            }
        }
    })
}

/// Adds an edit form's field to the patch when it differs from what the page showed (`orig_<field>`):
/// only what the operator changed is sent, so a change someone else made meanwhile to another field
/// stays, and a quota left as it was is not set back to the value the page was drawn with.
fn edited(
    body: &mut serde_json::Map<String, Value>,
    form: &Form,
    field: &str,
    conv: Conv,
) -> Result<(), String> {
    let orig_name = format!("orig_{field}");
    // A field the form does not have at all (neither it nor what the page showed) is not changed.
    if !form.0.contains_key(field) && !form.0.contains_key(&orig_name) {
        return Ok(());
    }
    let value = convert(form.get(field), field, conv)?;
    let unchanged = form.0.contains_key(&orig_name)
        && convert(form.get(&orig_name), field, conv).is_ok_and(|orig| orig == value);
    if !unchanged {
        body.insert(field.into(), value);
    }
    Ok(())
}

fn opt_text(s: &str) -> Value {
    let s = s.trim();
    if s.is_empty() { Value::Null } else { json!(s) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;

    #[test]
    fn ids_in_paths_are_one_segment_whatever_they_hold() {
        let out = templates()
            .render_str(
                "/console/clients/{{ id|urlencode }}",
                context! { id => "https://agent.example/c.json?x=1#y" },
            )
            .unwrap();
        assert_eq!(out, "/console/clients/https%3A%2F%2Fagent.example%2Fc.json%3Fx%3D1%23y");
    }

    #[test]
    fn an_edit_sends_only_what_changed_from_what_the_page_showed() {
        let form = |pairs: &[(&str, &str)]| {
            let mut m: HashMap<String, Vec<String>> = HashMap::new();
            for (k, v) in pairs {
                m.entry(k.to_string()).or_default().push(v.to_string());
            }
            Form(m)
        };
        let mut body = serde_json::Map::new();
        let f = form(&[
            ("quota", "{\"remaining\": 5}"),
            ("orig_quota", "{ \"remaining\": 5 }"),
            ("name", "a"),
            ("orig_name", " a "),
        ]);
        edited(&mut body, &f, "quota", Conv::Json).unwrap();
        edited(&mut body, &f, "name", Conv::Text).unwrap();
        assert!(body.is_empty(), "{body:?}");
        let f = form(&[
            ("allowed_ips", "10.0.0.0/8\n"),
            ("orig_allowed_ips", ""),
            ("metadata", ""),
            ("orig_metadata", "{}"),
        ]);
        edited(&mut body, &f, "allowed_ips", Conv::OptList).unwrap();
        edited(&mut body, &f, "metadata", Conv::Object).unwrap();
        assert_eq!(Value::Object(body.clone()), json!({"allowed_ips": ["10.0.0.0/8"]}));
        let f = form(&[("rate_limits", "[oops")]);
        assert!(
            edited(&mut body, &f, "rate_limits", Conv::Json)
                .unwrap_err()
                .starts_with("rate_limits: not valid JSON")
        );
        let f = form(&[("token_lifetime_seconds", "ten")]);
        assert!(edited(&mut body, &f, "token_lifetime_seconds", Conv::Int).is_err());
    }
}
