//! The developer portal at `/portal/`: the API's audience signs up, makes applications (consumers it
//! owns, on a plan the operator offers), gets keys and OAuth clients for them, and watches its usage.
//!
//! It is the console's machinery with a developer as the signed-in user: the same sessions (a store of
//! its own and its own cookie, so a developer's session never opens the console), the same CSRF
//! checks, templates, charts and secret reveals, and every change made through the admin API's own
//! handlers in-process with the developer as the actor (so each is validated by the same rules, the
//! plan's included, and audited with the developer's id). What the portal adds is the one rule the admin
//! API does not have: **a developer reaches only what they own** — every page and form first checks that
//! the application, key or client belongs to the signed-in developer, and answers 404 otherwise.
//!
//! Mail (verification, reset, invitation links) carries a link token sealed with the master key
//! (XChaCha20-Poly1305, the same key every node has): it names its purpose, subject and expiry, and is
//! bound to what it may change — a reset link to the password it replaces (so it works once), a
//! verification link to the address it verifies.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keygate_core::SecretHash;
use keygate_store::{ConsumersOf, Page, User};
use minijinja::{Value as Ctx, context};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    Area, Call, Form, Gate, Proof, QueryOr, Signed, chart_ctx, checked_form, cookie, cookie_name, ct_eq, enc,
    error_page, flash, page, perform, random, read, redirect, render, set_cookie, sign_out, signed_in_at,
    start_session, usage_query,
};
use crate::auth::{Actor, ClientIp};
use crate::error::ApiBytes;
use crate::error::ApiPath;
use crate::peer::Client;
use crate::state::{AppState, SignupMode};

/// How long a link in a mail works.
const VERIFY_TTL_MS: i64 = 24 * 3_600_000;
const RESET_TTL_MS: i64 = 3_600_000;
const INVITE_TTL_DAYS: i64 = 7;
/// Applications one developer may own.
const MAX_APPS: usize = 25;
/// Keys an application may have that are not revoked, and may have had in all (each new key starts with
/// the plan's quota: without a bound, making keys would multiply it).
const MAX_LIVE_KEYS: usize = 10;
const MAX_KEYS_EVER: usize = 100;
/// OAuth clients an application may have.
const MAX_CLIENTS: usize = 10;
/// The role that signs a user in to the portal.
pub(crate) const DEVELOPER_ROLE: &str = "developer";

pub(crate) fn is_developer(user: &User) -> bool {
    user.roles.iter().any(|r| r == DEVELOPER_ROLE)
}

/// May the portal reset this account's password by mail? A developer's, never an operator's (a password
/// that opens the console is not recovered through a mailbox).
fn recoverable(user: &User) -> bool {
    is_developer(user) && !user.roles.iter().any(|r| r == "admin")
}

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/portal", get(|| async { redirect("/portal/") }))
        .route("/portal/", get(home))
        .route("/portal/assets/{name}", get(super::asset))
        .route("/portal/login", get(login_page).post(login))
        .route("/portal/logout", post(logout))
        .route("/portal/signup", get(signup_page).post(signup))
        .route("/portal/verify", get(verify_email))
        .route("/portal/verify/resend", post(resend_verification))
        .route("/portal/reset", get(reset_request_page).post(reset_request))
        .route("/portal/reset/confirm", get(reset_page).post(reset))
        .route("/portal/apps", post(create_app))
        .route("/portal/apps/{id}", get(app))
        .route("/portal/apps/{id}/usage.csv", get(usage_csv))
        .route("/portal/keys/{id}", get(key))
        .route("/portal/tokens", get(tokens))
        .route("/portal/{kind}/{id}/{action}", post(action))
}

macro_rules! signed {
    ($state:expr, $headers:expr, $client:expr) => {
        match developer(&$state, &$headers, $client).await {
            Ok(d) => d,
            Err(r) => return r,
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

// ---------------------------------------------------------------------------------------------------
// Links in mail

#[derive(serde::Serialize, serde::Deserialize)]
struct Link {
    /// `verify`, `reset` or `invite`.
    purpose: String,
    /// A user id (verify, reset) or an email address (invite).
    subject: String,
    /// What the link is bound to (see [`binding`]).
    binding: String,
    expires_at: i64,
}

/// A short digest of what a link may change.
fn binding(value: &str) -> String {
    let d = Sha256::digest(value.as_bytes());
    d[..12].iter().map(|b| format!("{b:02x}")).collect()
}

const LINK_CONTEXT: &[u8] = b"keygate portal link v1";

fn seal_link(state: &AppState, link: &Link) -> Option<String> {
    let master = state.oauth.keys.master().ok()?;
    let plain = serde_json::to_vec(link).ok()?;
    master.seal(LINK_CONTEXT, &plain).ok().map(|s| URL_SAFE_NO_PAD.encode(s))
}

/// The link of a token, if it opens, is for `purpose` and has not expired.
fn open_link(state: &AppState, purpose: &str, token: &str) -> Option<Link> {
    if token.len() > 2048 {
        return None;
    }
    let master = state.oauth.keys.master().ok()?;
    let sealed = URL_SAFE_NO_PAD.decode(token.trim()).ok()?;
    let link: Link = serde_json::from_slice(&master.unseal(LINK_CONTEXT, &sealed).ok()?).ok()?;
    (link.purpose == purpose && link.expires_at > state.now()).then_some(link)
}

fn link_url(state: &AppState, path: &str, token: &str) -> String {
    format!("{}{path}?token={token}", state.oauth.issuer())
}

/// An invitation to sign up (for `portal.signup = "invite"`): its link, and when it ends.
pub(crate) fn invitation(state: &AppState, email: &str, days: Option<i64>) -> Option<(String, i64)> {
    let expires_at = state.now() + days.unwrap_or(INVITE_TTL_DAYS).clamp(1, 90) * 86_400_000;
    let link = Link {
        purpose: "invite".into(),
        subject: email.trim().to_ascii_lowercase(),
        binding: String::new(),
        expires_at,
    };
    let token = seal_link(state, &link)?;
    Some((link_url(state, "/portal/signup", &token), expires_at))
}

async fn send_verification(state: &AppState, user: &User) -> Result<(), String> {
    let Some(email) = &user.email else { return Err("the account has no email address".into()) };
    let link = Link {
        purpose: "verify".into(),
        subject: user.id.clone(),
        binding: binding(&email.to_ascii_lowercase()),
        expires_at: state.now() + VERIFY_TTL_MS,
    };
    let token = seal_link(state, &link).ok_or("the server cannot seal a link")?;
    let url = link_url(state, "/portal/verify", &token);
    let body = format!(
        "Hello {},\n\nconfirm your email address for the developer portal by opening this link (it works for 24 hours):\n\n{url}\n\nIf you did not sign up, ignore this message.\n",
        user.username
    );
    state.mailer.send(email, "Confirm your email address", &body).await
}

// ---------------------------------------------------------------------------------------------------
// Signed-out pages: sign in, sign up, verify, reset

#[derive(serde::Deserialize, Default)]
struct WhyQuery {
    why: Option<String>,
    token: Option<String>,
}

/// A signed-out form page with a fresh CSRF token (double submit: the same value in a cookie).
fn public_form(
    state: &AppState,
    status: StatusCode,
    template: &str,
    extra: Vec<(&'static str, Ctx)>,
) -> Response {
    let Some(token) = random() else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "The server cannot make random numbers.");
    };
    let mut ctx =
        vec![("csrf", Ctx::from(token.clone())), ("signup", Ctx::from(state.config.portal.signup.as_str()))];
    ctx.extend(extra);
    let mut resp = render(status, template, Ctx::from_iter(ctx));
    if let Some(c) = set_cookie(state, Area::Portal.login_cookie(), &token, 3600) {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    render(status, "portal/message.html", context! { title, message })
}

/// A signed-out form's fields, after its CSRF check; `None`: forged or stale.
fn public_post(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Option<Form> {
    let form = Form::parse(headers, body)?;
    let expected = cookie(headers, &cookie_name(state, Area::Portal.login_cookie())).unwrap_or("");
    if crate::oauth::authorize::cross_site(headers)
        || expected.is_empty()
        || !ct_eq(form.get("csrf"), expected)
    {
        return None;
    }
    Some(form)
}

fn msg(m: &str) -> Vec<(&'static str, Ctx)> {
    vec![("message", Ctx::from(m))]
}

async fn login_page(State(state): State<Arc<AppState>>, QueryOr(q): QueryOr<WhyQuery>) -> Response {
    let notice = match q.why.as_deref() {
        Some("expired") => Some("Your session ended. Sign in again."),
        Some("revoked") => Some("Your account changed (a new password, or it was suspended). Sign in again."),
        Some("out") => Some("You are signed out."),
        Some("verified") => Some("Your email address is confirmed. Sign in."),
        Some("reset") => Some("Your password is changed. Sign in with it."),
        _ => None,
    };
    public_form(&state, StatusCode::OK, "portal/login.html", vec![("notice", Ctx::from(notice))])
}

async fn login(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let refuse = |status: StatusCode, m: &str| public_form(&state, status, "portal/login.html", msg(m));
    let Some(form) = public_post(&state, &headers, &body) else {
        return refuse(StatusCode::FORBIDDEN, "The form expired. Sign in again.");
    };
    let username = form.get("username").trim().to_string();
    let user = match crate::password::login(
        &state,
        &state.portal_throttle,
        client,
        &username,
        form.get("password").to_string(),
    )
    .await
    {
        Ok(u) => u,
        Err(r) => {
            let (status, message) = super::refusal(r);
            return refuse(status, message);
        }
    };
    let Some(hash) = user.password_hash.as_deref().map(SecretHash::of) else {
        let (status, message) = super::refusal(crate::password::LoginRefusal::Wrong);
        return refuse(status, message);
    };
    if !is_developer(&user) {
        return refuse(
            StatusCode::FORBIDDEN,
            "This account is not a developer account (an operator can give it the developer role).",
        );
    }
    if let Err(e) = state.store.record_login(&user.id, state.now()).await {
        tracing::warn!(error = %e, "could not record a portal sign-in's time");
    }
    start_session(&state, Area::Portal, &headers, user.id, user.username, Proof::Developer(hash))
}

async fn logout(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    sign_out(&state, Area::Portal, client, &headers, &body).await
}

/// The invitation a sign-up holds, when sign-up is by invitation: its address.
fn invited(state: &AppState, token: Option<&str>) -> Option<String> {
    token.and_then(|t| open_link(state, "invite", t)).map(|l| l.subject)
}

async fn signup_page(State(state): State<Arc<AppState>>, QueryOr(q): QueryOr<WhyQuery>) -> Response {
    match state.config.portal.signup {
        SignupMode::Closed => {
            return message_page(
                StatusCode::FORBIDDEN,
                "Sign-up is closed",
                "Accounts are made by the operator of this API. Ask them for one.",
            );
        }
        SignupMode::Invite if invited(&state, q.token.as_deref()).is_none() => {
            return message_page(
                StatusCode::FORBIDDEN,
                "Sign-up is by invitation",
                "This link is not a working invitation (it may have expired). Ask the operator for a new one.",
            );
        }
        _ => {}
    }
    let email = invited(&state, q.token.as_deref());
    public_form(
        &state,
        StatusCode::OK,
        "portal/signup.html",
        vec![("email", Ctx::from(email)), ("token", Ctx::from(q.token.unwrap_or_default()))],
    )
}

async fn signup(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let Some(form) = public_post(&state, &headers, &body) else {
        return public_form(
            &state,
            StatusCode::FORBIDDEN,
            "portal/signup.html",
            msg("The form expired. Try again."),
        );
    };
    let token = form.get("token").to_string();
    let invited_email = invited(&state, Some(token.as_str()).filter(|t| !t.is_empty()));
    let again = |status: StatusCode, m: String| {
        public_form(
            &state,
            status,
            "portal/signup.html",
            vec![
                ("message", Ctx::from(m)),
                ("email", Ctx::from(invited_email.clone())),
                ("token", Ctx::from(token.clone())),
                ("username", Ctx::from(form.get("username"))),
            ],
        )
    };
    match state.config.portal.signup {
        SignupMode::Closed => {
            return message_page(
                StatusCode::FORBIDDEN,
                "Sign-up is closed",
                "Ask the operator for an account.",
            );
        }
        SignupMode::Invite if invited_email.is_none() => {
            return message_page(
                StatusCode::FORBIDDEN,
                "Sign-up is by invitation",
                "This invitation does not work (it may have expired).",
            );
        }
        _ => {}
    }
    // Sign-ups count against the address like failed sign-ins: no mass account creation.
    let now = state.now();
    if state.throttle.blocked(client.accountable, now).is_some() {
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts from your address. Wait a minute.".into(),
        );
    }
    state.throttle.record_failure(client.accountable, now);
    let email = invited_email.clone().unwrap_or_else(|| form.get("email").trim().to_string());
    if email.is_empty() || !email.contains('@') {
        return again(StatusCode::BAD_REQUEST, "Give the email address where you receive mail.".into());
    }
    if form.get("password") != form.get("password2") {
        return again(StatusCode::BAD_REQUEST, "The two passwords differ.".into());
    }
    // One account per address (an invitation is for one account).
    match state.store.find_user_by_email(&email).await {
        Ok(Some(_)) => {
            return again(
                StatusCode::CONFLICT,
                "An account with this email address exists. Sign in, or reset its password.".into(),
            );
        }
        Ok(None) => {}
        Err(_) => {
            return again(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is unavailable; try again shortly.".into(),
            );
        }
    }
    let req = crate::routes::users::CreateUser {
        username: form.get("username").trim().to_string(),
        password: Some(form.get("password").to_string()),
        email: Some(email),
        roles: Some(vec![DEVELOPER_ROLE.into()]),
        // A developer account manages applications; it grants nothing through OAuth consent until an
        // operator widens it.
        allowed_scopes: Some(Vec::new()),
        ..Default::default()
    };
    // An invited address is proved by the invitation's delivery; otherwise a link proves it, if asked.
    let verified = invited_email.is_some().then_some(now);
    let user = match crate::routes::users::insert_new_user(&state, None, req, verified).await {
        Ok(u) => u,
        Err(e) => {
            let text = match &e.field {
                Some(f) => format!("{f}: {}", e.message),
                None => e.message,
            };
            return again(e.code.status(), text);
        }
    };
    let Some(hash) = user.password_hash.as_deref().map(SecretHash::of) else {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "The account has no password.");
    };
    if user.email_verified_at.is_none()
        && state.config.portal.verify_email
        && let Err(e) = send_verification(&state, &user).await
    {
        tracing::warn!(error = %e, "could not send a portal verification mail");
    }
    start_session(&state, Area::Portal, &headers, user.id, user.username, Proof::Developer(hash))
}

async fn verify_email(State(state): State<Arc<AppState>>, QueryOr(q): QueryOr<WhyQuery>) -> Response {
    let bad = || {
        message_page(
            StatusCode::BAD_REQUEST,
            "This link does not work",
            "It may have expired, or the address changed since it was sent. Sign in and send a new one.",
        )
    };
    let Some(link) = q.token.as_deref().and_then(|t| open_link(&state, "verify", t)) else { return bad() };
    let user = match state.store.get_user(&link.subject).await {
        Ok(Some(u)) => u,
        Ok(None) => return bad(),
        Err(_) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is unavailable; try again shortly.",
            );
        }
    };
    if user.email.as_deref().map(|e| binding(&e.to_ascii_lowercase())) != Some(link.binding) {
        return bad();
    }
    if user.email_verified_at.is_none() {
        let now = state.now();
        let actor = Actor { key_id: user.id.clone(), ip: None };
        let patch = keygate_store::UserPatch {
            email_verified_at: Some(Some(now)),
            updated_at: now,
            ..Default::default()
        };
        let Ok(audit) =
            crate::routes::common::audit(&actor, now, "user.verify_email", "user", &user.id, json!({}))
        else {
            return error_page(StatusCode::SERVICE_UNAVAILABLE, "The server cannot make random numbers.");
        };
        if state.store.update_user(&user.id, &patch, &audit).await.is_err() {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is unavailable; try again shortly.",
            );
        }
    }
    redirect("/portal/?why=verified")
}

async fn resend_verification(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let dev = signed!(state, headers, client);
    ok!(checked_form(&dev.signed, &headers, &body));
    let now = state.now();
    if state.throttle.blocked(client.accountable, now).is_some() {
        flash(&dev.signed, "error", "Too many requests from your address. Wait a minute.");
        return redirect("/portal/");
    }
    state.throttle.record_failure(client.accountable, now);
    match send_verification(&state, &dev.user).await {
        Ok(()) => flash(&dev.signed, "notice", "A new link is on its way to your address."),
        Err(e) => flash(&dev.signed, "error", format!("The mail could not be sent: {e}")),
    }
    redirect("/portal/")
}

async fn reset_request_page(State(state): State<Arc<AppState>>) -> Response {
    public_form(&state, StatusCode::OK, "portal/reset_request.html", vec![])
}

async fn reset_request(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let Some(form) = public_post(&state, &headers, &body) else {
        return public_form(
            &state,
            StatusCode::FORBIDDEN,
            "portal/reset_request.html",
            msg("The form expired. Try again."),
        );
    };
    let now = state.now();
    if state.throttle.blocked(client.accountable, now).is_some() {
        return public_form(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "portal/reset_request.html",
            msg("Too many requests from your address. Wait a minute."),
        );
    }
    state.throttle.record_failure(client.accountable, now);
    // The same answer whether or not the address has an account (no account discovery).
    let done = message_page(
        StatusCode::OK,
        "Check your mail",
        "If an account has this address, a link to choose a new password is on its way. It works for one hour, once.",
    );
    // Only developer accounts are reset here (an operator's account is not the portal's to recover).
    let user = match state.store.find_user_by_email(form.get("email").trim()).await {
        Ok(Some(u)) if !u.disabled && recoverable(&u) => u,
        Ok(_) => return done,
        Err(_) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The database is unavailable; try again shortly.",
            );
        }
    };
    let link = Link {
        purpose: "reset".into(),
        subject: user.id.clone(),
        binding: binding(user.password_hash.as_deref().unwrap_or("")),
        expires_at: now + RESET_TTL_MS,
    };
    if let (Some(token), Some(email)) = (seal_link(&state, &link), user.email.as_deref()) {
        let url = link_url(&state, "/portal/reset/confirm", &token);
        let body = format!(
            "Hello {},\n\nchoose a new password for the developer portal with this link (it works for one hour, once):\n\n{url}\n\nIf you did not ask for it, ignore this message: your password stays as it is.\n",
            user.username
        );
        // Sent in the background: the answer takes as long whether or not the address has an account.
        let (state, email) = (state.clone(), email.to_string());
        tokio::spawn(async move {
            if let Err(e) = state.mailer.send(&email, "Choose a new password", &body).await {
                tracing::warn!(error = %e, "could not send a portal password-reset mail");
            }
        });
    }
    done
}

/// The user a reset link is for, while it still works (the password it was made for unchanged).
async fn reset_target(state: &AppState, token: &str) -> Option<User> {
    let link = open_link(state, "reset", token)?;
    let user = state.store.get_user(&link.subject).await.ok()??;
    (!user.disabled
        && recoverable(&user)
        && binding(user.password_hash.as_deref().unwrap_or("")) == link.binding)
        .then_some(user)
}

fn dead_reset_link() -> Response {
    message_page(
        StatusCode::BAD_REQUEST,
        "This link does not work",
        "It may have expired or been used already. Ask for a new one on the sign-in page.",
    )
}

async fn reset_page(State(state): State<Arc<AppState>>, QueryOr(q): QueryOr<WhyQuery>) -> Response {
    let token = q.token.unwrap_or_default();
    if reset_target(&state, &token).await.is_none() {
        return dead_reset_link();
    }
    public_form(&state, StatusCode::OK, "portal/reset.html", vec![("token", Ctx::from(token))])
}

async fn reset(State(state): State<Arc<AppState>>, headers: HeaderMap, ApiBytes(body): ApiBytes) -> Response {
    let Some(form) = public_post(&state, &headers, &body) else {
        return message_page(
            StatusCode::FORBIDDEN,
            "The form expired",
            "Open the link from your mail again.",
        );
    };
    let token = form.get("token").to_string();
    let Some(user) = reset_target(&state, &token).await else { return dead_reset_link() };
    let again = |m: &str| {
        public_form(
            &state,
            StatusCode::BAD_REQUEST,
            "portal/reset.html",
            vec![("token", Ctx::from(token.clone())), ("message", Ctx::from(m))],
        )
    };
    if form.get("password") != form.get("password2") {
        return again("The two passwords differ.");
    }
    let hash = match crate::routes::users::new_password_hash(form.get("password").to_string(), &user.username)
        .await
    {
        Ok(h) => h,
        Err(e) => return again(&e.message),
    };
    let now = state.now();
    let actor = Actor { key_id: user.id.clone(), ip: None };
    let patch = keygate_store::UserPatch { password_hash: Some(hash), updated_at: now, ..Default::default() };
    let Ok(audit) =
        crate::routes::common::audit(&actor, now, "user.reset_password", "user", &user.id, json!({}))
    else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "The server cannot make random numbers.");
    };
    if state.store.update_user(&user.id, &patch, &audit).await.is_err() {
        return error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is unavailable; try again shortly.",
        );
    }
    // Sessions rest on the old password: they end at their next request.
    state.oauth.flows.end_sessions_of(&user.id);
    redirect("/portal/login?why=reset")
}

// ---------------------------------------------------------------------------------------------------
// Signed in: the developer and what they own

/// A signed-in developer: the session and the account as it is now.
struct Developer {
    signed: Signed,
    user: User,
}

/// A change by a developer: one at a time per developer on this node (so the per-application bounds hold
/// against parallel posts), and at most `failures_per_minute` a minute (each rotation, for one, leaves
/// another live secret until its overlap ends).
async fn one_change_at_a_time(
    state: &AppState,
    dev: &Developer,
) -> Result<tokio::sync::OwnedMutexGuard<()>, Response> {
    let now = state.now();
    let account = Some(SecretHash::of(&format!("portal-change:{}", dev.user.id)));
    if state.portal_throttle.blocked(account, now).is_some() {
        return Err(error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many changes in a minute. Wait a little.",
        ));
    }
    state.portal_throttle.record_failure(account, now);
    let lock = state.portal_locks.get_with(dev.user.id.clone(), || Arc::new(tokio::sync::Mutex::new(())));
    Ok(lock.lock_owned().await)
}

async fn developer(state: &AppState, headers: &HeaderMap, client: Client) -> Result<Developer, Response> {
    let signed = match signed_in_at(state, Area::Portal, headers, client).await {
        Gate::In(s) => s,
        Gate::Out(r) => return Err(r),
    };
    match state.store.get_user(&signed.actor.key_id).await {
        Ok(Some(user)) => Ok(Developer { signed, user }),
        Ok(None) => Err(redirect("/portal/login?why=revoked")),
        Err(_) => Err(error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is unavailable; try again shortly.",
        )),
    }
}

fn not_yours() -> Response {
    error_page(StatusCode::NOT_FOUND, "No such application, key or client among yours.")
}

fn unavailable() -> Response {
    error_page(StatusCode::SERVICE_UNAVAILABLE, "The database is unavailable; try again shortly.")
}

/// A record read for a developer that must be theirs (`mine`): 404 when it is not, or there is none;
/// 503 when the store cannot say.
fn theirs<T>(
    read: Result<Option<T>, keygate_store::StoreError>,
    mine: impl FnOnce(&T) -> bool,
) -> Result<T, Response> {
    match read {
        Ok(Some(t)) if mine(&t) => Ok(t),
        Ok(_) => Err(not_yours()),
        Err(_) => Err(unavailable()),
    }
}

/// An application (consumer) the developer owns; 404 for any other id.
async fn owned_app(state: &AppState, dev: &Developer, id: &str) -> Result<keygate_store::Consumer, Response> {
    theirs(state.store.get_consumer(id).await, |c| c.owner_id.as_deref() == Some(dev.user.id.as_str()))
}

/// A key of one of the developer's applications; 404 otherwise.
async fn owned_key(state: &AppState, dev: &Developer, id: &str) -> Result<keygate_store::ApiKey, Response> {
    let key = theirs(state.store.get_key(id).await, |_| true)?;
    owned_app(state, dev, &key.consumer_id).await?;
    Ok(key)
}

/// An OAuth client of one of the developer's applications; 404 otherwise.
async fn owned_client(
    state: &AppState,
    dev: &Developer,
    id: &str,
) -> Result<keygate_store::OAuthClient, Response> {
    let client = theirs(state.store.get_client(id).await, |_| true)?;
    owned_app(state, dev, &client.consumer_id).await?;
    Ok(client)
}

/// The scopes a developer asked for, if the application's plan offers each of them: a developer chooses
/// among the plan's listed scopes only (a plan that lists none, or no plan, offers none; "any scope" is
/// for operators, through the admin API).
async fn offered_scopes(
    state: &AppState,
    dev: &Developer,
    app: &keygate_store::Consumer,
    asked: &[String],
) -> Result<Vec<String>, Response> {
    let plan = match crate::routes::plans::plan_of(state, app).await {
        Ok(p) => p,
        Err(e) => {
            flash(&dev.signed, "error", e.message);
            return Err(redirect(&format!("/portal/apps/{}", enc(&app.id))));
        }
    };
    let offered = plan.and_then(|p| p.allowed_scopes).unwrap_or_default();
    if let Some(s) = asked.iter().find(|s| !offered.contains(s)) {
        flash(
            &dev.signed,
            "error",
            format!(
                "'{}' is not among the scopes your application's plan offers.",
                s.chars().take(128).collect::<String>()
            ),
        );
        return Err(redirect(&format!("/portal/apps/{}", enc(&app.id))));
    }
    Ok(asked.to_vec())
}

async fn my_apps(state: &AppState, dev: &Developer) -> Result<Vec<keygate_store::Consumer>, Response> {
    let page = Page { after: None, limit: MAX_APPS as u32 * 2, search: None };
    state.store.consumers_where(ConsumersOf::Owner(&dev.user.id), &page).await.map_err(|_| unavailable())
}

/// The plans a developer may choose, the default first.
async fn offered_plans(state: &AppState) -> Result<Vec<keygate_store::Plan>, Response> {
    let mut plans: Vec<_> = state
        .store
        .list_plans()
        .await
        .map_err(|_| unavailable())?
        .into_iter()
        .filter(|p| p.self_service)
        .collect();
    plans.sort_by_key(|p| !p.is_default);
    Ok(plans)
}

fn needs_verification(state: &AppState, dev: &Developer) -> bool {
    state.config.portal.verify_email && dev.user.email_verified_at.is_none()
}

fn portal_page(
    state: &AppState,
    dev: &Developer,
    template: &str,
    nav: &str,
    reveal: Option<&str>,
    mut extra: Vec<(&'static str, Ctx)>,
) -> Response {
    extra.push(("unverified", Ctx::from(needs_verification(state, dev))));
    extra.push(("email", Ctx::from(dev.user.email.clone())));
    extra.push(("mail_test_mode", Ctx::from(state.mailer.logs_only())));
    page(&dev.signed, template, nav, reveal, extra)
}

#[derive(serde::Deserialize, Default)]
struct RangeQuery {
    range: Option<String>,
    reveal: Option<String>,
    why: Option<String>,
}

async fn home(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let dev = signed!(state, headers, client);
    if q.why.as_deref() == Some("verified") {
        flash(&dev.signed, "notice", "Your email address is confirmed.");
    }
    let apps = ok!(my_apps(&state, &dev).await);
    let plans = ok!(offered_plans(&state).await);
    let all_plans = state.store.list_plans().await.unwrap_or_default();
    let plan_name = |id: &Option<String>| {
        id.as_ref().and_then(|id| all_plans.iter().find(|p| &p.id == id)).map(|p| p.name.clone())
    };
    let apps: Vec<Value> = apps
        .iter()
        .map(|c| json!({"id": c.id, "name": c.name, "plan": plan_name(&c.plan_id), "disabled": c.stopped(), "created_at": crate::time::rfc3339(c.created_at)}))
        .collect();
    let plans: Vec<Value> = plans.iter().map(plan_json).collect();
    portal_page(
        &state,
        &dev,
        "portal/home.html",
        "apps",
        None,
        vec![
            ("apps", Ctx::from_serialize(&apps)),
            ("plans", Ctx::from_serialize(&plans)),
            ("max_apps", Ctx::from(MAX_APPS)),
        ],
    )
}

fn plan_json(p: &keygate_store::Plan) -> Value {
    json!({"id": p.id, "name": p.name, "description": p.description, "rate_limits": p.rate_limits,
        "quota": p.quota, "allowed_scopes": p.allowed_scopes, "key_lifetime_seconds": p.key_lifetime_seconds,
        "is_default": p.is_default})
}

async fn create_app(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let dev = signed!(state, headers, client);
    let form = ok!(checked_form(&dev.signed, &headers, &body));
    let _turn = ok!(one_change_at_a_time(&state, &dev).await);
    let back = |m: String| {
        flash(&dev.signed, "error", m);
        redirect("/portal/")
    };
    if needs_verification(&state, &dev) {
        return back("Confirm your email address first (the link in the mail we sent).".into());
    }
    if ok!(my_apps(&state, &dev).await).len() >= MAX_APPS {
        return back(format!("You have {MAX_APPS} applications, the most one developer may have."));
    }
    let plans = ok!(offered_plans(&state).await);
    let chosen = form.get("plan");
    let plan = if chosen.is_empty() { plans.first() } else { plans.iter().find(|p| p.id == chosen) };
    let Some(plan) = plan else {
        return back(if chosen.is_empty() {
            "The operator offers no plan yet, so no application can be made. Ask them.".into()
        } else {
            "That plan is not offered.".into()
        });
    };
    let body = json!({"name": form.get("name").trim(), "plan_id": plan.id, "owner_id": dev.user.id});
    let call = Call {
        method: Method::POST,
        path: "/v1/consumers".into(),
        body: Some(body),
        back: "/portal/".into(),
        done: "Application created.",
    };
    match super::api(&state, &dev.signed, call.method, &call.path, call.body).await {
        Ok(v) => {
            flash(&dev.signed, "notice", "Application created. Make it a key.");
            redirect(&format!("/portal/apps/{}", enc(v["id"].as_str().unwrap_or(""))))
        }
        Err(f) => back(f.text()),
    }
}

async fn app(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let dev = signed!(state, headers, client);
    let c = ok!(owned_app(&state, &dev, &id).await);
    let e = enc(&c.id);
    let keys = ok!(read(&state, &dev.signed, &format!("/v1/keys?consumer_id={e}&limit=200")).await);
    let clients = ok!(read(&state, &dev.signed, &format!("/v1/clients?q={e}&limit=200")).await);
    let clients: Vec<&Value> = clients["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["consumer_id"] == c.id.as_str())
        .collect();
    let (usage_q, range_name) = usage_query(&state, q.range.as_deref());
    let report = ok!(read(&state, &dev.signed, &format!("/v1/consumers/{e}/usage?{usage_q}")).await);
    let plan = match &c.plan_id {
        Some(p) => state.store.get_plan(p).await.ok().flatten(),
        None => None,
    };
    let month = crate::time::rfc3339(state.now()).get(..7).unwrap_or("").to_string();
    let mut extra = chart_ctx(&report, "Verifications of this application's keys");
    extra.extend([
        ("app", Ctx::from_serialize(json!({"id": c.id, "name": c.name, "disabled": c.stopped()}))),
        ("plan", Ctx::from_serialize(plan.as_ref().map(plan_json))),
        ("keys", Ctx::from_serialize(&keys["items"])),
        ("clients", Ctx::from_serialize(&clients)),
        ("range", Ctx::from(range_name)),
        ("month", Ctx::from(month)),
        ("redirect_clients", Ctx::from(state.config.portal.authorization_code_clients)),
    ]);
    portal_page(&state, &dev, "portal/app.html", "apps", q.reveal.as_deref(), extra)
}

async fn key(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    QueryOr(q): QueryOr<RangeQuery>,
) -> Response {
    let dev = signed!(state, headers, client);
    let key = ok!(owned_key(&state, &dev, &id).await);
    let e = enc(&key.id);
    let k = ok!(read(&state, &dev.signed, &format!("/v1/keys/{e}")).await);
    let (usage_q, range_name) = usage_query(&state, q.range.as_deref());
    let report = ok!(read(&state, &dev.signed, &format!("/v1/keys/{e}/usage?{usage_q}")).await);
    let app = ok!(owned_app(&state, &dev, &key.consumer_id).await);
    let gauge = super::quota_gauge(&k);
    let limited = report["codes"]["RATE_LIMITED"].as_i64().unwrap_or(0);
    let mut extra = chart_ctx(&report, "Verifications of this key");
    extra.extend([
        ("k", Ctx::from_serialize(&k)),
        ("app", Ctx::from_serialize(json!({"id": app.id, "name": app.name}))),
        ("gauge", Ctx::from_serialize(&gauge)),
        ("rate_limited", Ctx::from(limited)),
        ("range", Ctx::from(range_name)),
    ]);
    portal_page(&state, &dev, "portal/key.html", "apps", q.reveal.as_deref(), extra)
}

#[derive(serde::Deserialize, Default)]
struct MonthQuery {
    month: Option<String>,
}

/// The month `YYYY-MM` as `[from, to)` in RFC 3339.
fn month_range(month: &str) -> Option<(String, String)> {
    let (y, m) = month.split_once('-')?;
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    if !(1..=12).contains(&m) || !(1970..=9999).contains(&y) {
        return None;
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    Some((format!("{y:04}-{m:02}-01T00:00:00Z"), format!("{ny:04}-{nm:02}-01T00:00:00Z")))
}

/// A month of an application's verifications, per key, day and outcome, as CSV.
async fn usage_csv(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    QueryOr(q): QueryOr<MonthQuery>,
) -> Response {
    let dev = signed!(state, headers, client);
    let c = ok!(owned_app(&state, &dev, &id).await);
    let month = q.month.unwrap_or_default();
    let Some((from, to)) = month_range(&month) else {
        return error_page(StatusCode::BAD_REQUEST, "Give the month as YYYY-MM, e.g. 2026-11.");
    };
    let keys =
        ok!(read(&state, &dev.signed, &format!("/v1/keys?consumer_id={}&limit=1000", enc(&c.id))).await);
    let mut out = String::from("date,key_id,key_name,outcome,count\n");
    for k in keys["items"].as_array().into_iter().flatten() {
        let kid = k["id"].as_str().unwrap_or("");
        let path = format!("/v1/keys/{}/usage?granularity=day&from={}&to={}", enc(kid), enc(&from), enc(&to));
        let report = ok!(read(&state, &dev.signed, &path).await);
        for b in report["buckets"].as_array().into_iter().flatten() {
            let day = b["start"].as_str().unwrap_or("").get(..10).unwrap_or("");
            for (code, n) in b["codes"].as_object().into_iter().flatten() {
                out.push_str(&format!(
                    "{day},{kid},{},{code},{}\n",
                    csv_field(k["name"].as_str().unwrap_or("")),
                    n
                ));
            }
        }
    }
    let mut resp = out.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"usage-{}-{month}.csv\"",
        c.id.replace(|ch: char| !ch.is_ascii_alphanumeric() && ch != '_', "")
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    resp
}

/// A CSV field: quoted when it needs to be, and never a formula a spreadsheet would run.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}

async fn tokens(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
) -> Response {
    let dev = signed!(state, headers, client);
    let e = enc(&dev.user.id);
    let pats = ok!(read(&state, &dev.signed, &format!("/v1/users/{e}/tokens")).await);
    let grants = ok!(read(&state, &dev.signed, &format!("/v1/users/{e}/grants")).await);
    portal_page(
        &state,
        &dev,
        "portal/tokens.html",
        "tokens",
        None,
        vec![
            ("pats", Ctx::from_serialize(&pats["items"])),
            ("grants", Ctx::from_serialize(&grants["items"])),
        ],
    )
}

/// `POST /portal/{kind}/{id}/{action}`: every change a developer makes, each to something they own.
async fn action(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    ApiPath((kind, id, act)): ApiPath<(String, String, String)>,
    ApiBytes(body): ApiBytes,
) -> Response {
    let dev = signed!(state, headers, client);
    let form = ok!(checked_form(&dev.signed, &headers, &body));
    let _turn = ok!(one_change_at_a_time(&state, &dev).await);
    let e = enc(&id);
    let fail = |back: String, m: &str| {
        flash(&dev.signed, "error", m);
        redirect(&back)
    };
    let call = |method: Method, path: String, body: Option<Value>, back: String, done: &'static str| Call {
        method,
        path,
        body,
        back,
        done,
    };
    let me = enc(&dev.user.id);
    let call = match (kind.as_str(), act.as_str()) {
        ("apps", "keys") => {
            let app = ok!(owned_app(&state, &dev, &id).await);
            if needs_verification(&state, &dev) {
                return fail(format!("/portal/apps/{e}"), "Confirm your email address first.");
            }
            let page = Page { after: None, limit: MAX_KEYS_EVER as u32, search: None };
            let keys = ok!(state.store.list_keys(Some(&app.id), &page).await.map_err(|_| unavailable()));
            if keys.iter().filter(|k| k.revoked_at.is_none()).count() >= MAX_LIVE_KEYS {
                return fail(
                    format!("/portal/apps/{e}"),
                    &format!("An application has at most {MAX_LIVE_KEYS} keys; revoke one first."),
                );
            }
            if keys.len() >= MAX_KEYS_EVER {
                return fail(
                    format!("/portal/apps/{e}"),
                    &format!(
                        "This application has had {MAX_KEYS_EVER} keys, the most one may have; make another application or ask the operator."
                    ),
                );
            }
            let scopes = ok!(offered_scopes(&state, &dev, &app, &form.all("scopes")).await);
            let mut body = json!({"consumer_id": app.id, "name": form.get("name").trim(), "scopes": scopes});
            if let Some(days) = form.get("expires_in_days").trim().parse::<i64>().ok().filter(|d| *d > 0) {
                body["expires_at"] = json!(crate::time::rfc3339(state.now() + days.min(36_500) * 86_400_000));
            }
            call(Method::POST, "/v1/keys".into(), Some(body), format!("/portal/apps/{e}"), "Key created.")
        }
        ("apps", "clients") => {
            let app = ok!(owned_app(&state, &dev, &id).await);
            if needs_verification(&state, &dev) {
                return fail(format!("/portal/apps/{e}"), "Confirm your email address first.");
            }
            let page = Page { after: None, limit: 1000, search: Some(app.id.clone()) };
            let clients = ok!(state.store.list_clients(&page).await.map_err(|_| unavailable()));
            if clients.iter().filter(|c| c.consumer_id == app.id).count() >= MAX_CLIENTS {
                return fail(
                    format!("/portal/apps/{e}"),
                    &format!("An application has at most {MAX_CLIENTS} OAuth clients; delete one first."),
                );
            }
            let scopes = ok!(offered_scopes(&state, &dev, &app, &form.all("scopes")).await);
            let redirect_uris = form.lines("redirect_uris");
            let mut body = json!({"consumer_id": app.id, "name": form.get("name").trim(), "scopes": scopes});
            if !redirect_uris.is_empty() {
                if !state.config.portal.authorization_code_clients {
                    return fail(
                        format!("/portal/apps/{e}"),
                        "This portal offers client-credentials clients only.",
                    );
                }
                body["grant_types"] = json!(["authorization_code", "refresh_token"]);
                body["redirect_uris"] = json!(redirect_uris);
            }
            call(
                Method::POST,
                "/v1/clients".into(),
                Some(body),
                format!("/portal/apps/{e}"),
                "Client created.",
            )
        }
        ("apps", "rename") => {
            ok!(owned_app(&state, &dev, &id).await);
            let body = json!({"name": form.get("name").trim()});
            call(
                Method::PATCH,
                format!("/v1/consumers/{e}"),
                Some(body),
                format!("/portal/apps/{e}"),
                "Application renamed.",
            )
        }
        ("keys", "rotate") => {
            ok!(owned_key(&state, &dev, &id).await);
            let overlap = form.get("overlap_seconds").trim().parse::<u64>().unwrap_or(0);
            call(
                Method::POST,
                format!("/v1/keys/{e}/rotate"),
                Some(json!({"overlap_seconds": overlap})),
                format!("/portal/keys/{e}"),
                "Key rotated.",
            )
        }
        ("keys", "revoke") => {
            let key = ok!(owned_key(&state, &dev, &id).await);
            if form.get("confirm").trim() != key.id {
                return fail(
                    format!("/portal/keys/{e}"),
                    &format!("Type {} to confirm; nothing was changed.", key.id),
                );
            }
            call(
                Method::POST,
                format!("/v1/keys/{e}/revoke"),
                None,
                format!("/portal/keys/{e}"),
                "Key revoked: it stops working now.",
            )
        }
        ("keys", "rename") => {
            ok!(owned_key(&state, &dev, &id).await);
            let body = json!({"name": form.get("name").trim()});
            call(
                Method::PATCH,
                format!("/v1/keys/{e}"),
                Some(body),
                format!("/portal/keys/{e}"),
                "Key renamed.",
            )
        }
        ("clients", "rotate") => {
            let c = ok!(owned_client(&state, &dev, &id).await);
            let overlap = form.get("overlap_seconds").trim().parse::<u64>().unwrap_or(0);
            let back = format!("/portal/apps/{}", enc(&c.consumer_id));
            call(
                Method::POST,
                format!("/v1/clients/{e}/rotate-secret"),
                Some(json!({"overlap_seconds": overlap})),
                back,
                "Client secret rotated.",
            )
        }
        ("clients", "delete") => {
            let c = ok!(owned_client(&state, &dev, &id).await);
            let back = format!("/portal/apps/{}", enc(&c.consumer_id));
            if form.get("confirm").trim() != c.id {
                return fail(back, &format!("Type {} to confirm; nothing was changed.", c.id));
            }
            call(
                Method::DELETE,
                format!("/v1/clients/{e}"),
                None,
                back,
                "Client deleted: its tokens stop working now.",
            )
        }
        ("tokens", "revoke") => {
            ok!(theirs(state.store.get_pat(&id).await, |t| t.user_id == dev.user.id));
            call(
                Method::DELETE,
                format!("/v1/users/{me}/tokens/{e}"),
                None,
                "/portal/tokens".into(),
                "Token revoked.",
            )
        }
        ("grants", "revoke") => {
            ok!(theirs(state.store.get_grant(&id).await, |g| g.user_id == dev.user.id));
            call(
                Method::DELETE,
                format!("/v1/users/{me}/grants/{e}"),
                None,
                "/portal/tokens".into(),
                "Access revoked: the application's tokens stop working now.",
            )
        }
        _ => return error_page(StatusCode::NOT_FOUND, "No such action."),
    };
    let kind2 = kind.clone();
    let id2 = e.clone();
    perform(&state, &dev.signed, call, move |v| match kind2.as_str() {
        "apps" if v["id"].as_str().is_some_and(|k| k.starts_with("key_")) => {
            format!("/portal/keys/{}", enc(v["id"].as_str().unwrap_or("")))
        }
        "keys" => format!("/portal/keys/{id2}"),
        _ => match v["consumer_id"].as_str() {
            Some(c) => format!("/portal/apps/{}", enc(c)),
            None => "/portal/".into(),
        },
    })
    .await
}
