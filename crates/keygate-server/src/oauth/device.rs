//! The device authorization grant (RFC 8628), for CLIs, TVs and other devices without a browser: the
//! device gets a `device_code` to poll with and a short `user_code` the user enters at
//! `/oauth2/device` on another screen, where the usual login and consent pages follow.
//!
//! User codes are 8 characters from an alphabet without look-alikes (`BCDFGHJKLMNPQRSTVWXZ`: no vowels,
//! so no words either), shown as `XXXX-XXXX`; 20^8 ≈ 2.6·10^10 codes, and wrong guesses count against
//! the address's failure budget. Device codes are `kgdc_` secrets (SHA-256 at rest), valid 10 minutes.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keygate_core::oauth::Form as CoreForm;
use keygate_core::{PlainSecret, SecretKind};
use keygate_store::{DeviceAuth, GrantType, StoreError};
use minijinja::context;
use serde_json::json;

use super::authorize::{cookie, error_page, form_body, login_page, names, page, proceed, usable_client};
use super::flows::AuthRequest;
use super::{Form, OAuthBody, OAuthError, OAuthErrorCode, authenticate, no_store};
use crate::auth::ClientIp;
use crate::error::ApiBytes;
use crate::state::AppState;

/// How long a device code is valid.
pub const DEVICE_TTL_MS: i64 = 600_000;
const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
const ENTRY_ACTION: &str = "/oauth2/device";

fn new_user_code() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)?;
    // 256 % 20 = 16: rejection would remove the tiny bias; 20 divides 240, so drawing until below 240.
    let mut out = String::with_capacity(8);
    for mut b in bytes {
        while b >= 240 {
            let mut one = [0u8; 1];
            getrandom::fill(&mut one)?;
            b = one[0];
        }
        out.push(ALPHABET[usize::from(b % 20)] as char);
    }
    Ok(out)
}

/// What people type, normalized: upper case, without spaces and dashes; `None` unless it is 8
/// characters of the alphabet (so nothing else is looked up or shown back).
pub fn normalize_user_code(s: &str) -> Option<String> {
    let code: String =
        s.chars().filter(|c| !c.is_whitespace() && *c != '-').flat_map(char::to_uppercase).collect();
    (code.len() == 8 && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// `XXXX-XXXX` of a normalized code (ASCII by construction).
fn shown(code: &str) -> String {
    match (code.get(..4), code.get(4..)) {
        (Some(a), Some(b)) if code.len() == 8 => format!("{a}-{b}"),
        _ => String::new(),
    }
}

/// `POST /oauth2/device_authorization` (RFC 8628 §3.1).
#[utoipa::path(post, path = "/oauth2/device_authorization", tag = "oauth2",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "client_id (public clients) or client authentication; scope; resource"),
    responses((status = 200, description = "device_code, user_code, verification_uri, verification_uri_complete, expires_in, interval"),
        (status = "4XX", description = "RFC 6749 §5.2 error")))]
pub async fn device_authorization(
    State(state): State<Arc<AppState>>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    OAuthBody(body): OAuthBody,
) -> Result<Response, OAuthError> {
    let now = state.now();
    let form = Form::parse(&headers, &body)?;
    let client = authenticate(&state, &headers, &form, peer, now)
        .await?
        .ok_or_else(|| OAuthError::invalid_client(false))?;
    if !client.grant_types.contains(&GrantType::DeviceCode) {
        return Err(OAuthError::new(
            OAuthErrorCode::UnauthorizedClient,
            "the client may not use the device grant",
        ));
    }
    let scopes = super::tokens::OAuth::grant_scopes(&client, form.one("scope")?)
        .map_err(|d| OAuthError::new(OAuthErrorCode::InvalidScope, d))?;
    let resources = form.all("resource");
    if resources.iter().any(|r| !client.audiences.iter().any(|a| a == r)) {
        return Err(OAuthError::new(
            OAuthErrorCode::InvalidTarget,
            "the client may not ask for one of the resources",
        ));
    }
    let audiences = if resources.is_empty() {
        if client.audiences.is_empty() { vec![state.oauth.issuer()] } else { client.audiences.clone() }
    } else {
        resources.to_vec()
    };
    let internal = |e: String| {
        tracing::error!(error = %e, "device authorization failed");
        OAuthError::new(OAuthErrorCode::ServerError, "internal error")
    };
    let device_code = PlainSecret::generate(SecretKind::DeviceCode).map_err(|e| internal(e.to_string()))?;
    let interval_ms = i64::try_from(state.config.device_poll_interval.as_millis()).unwrap_or(5000);
    // A user code collision is astronomically rare, but the column is unique: try again.
    let mut stored = None;
    for _ in 0..3 {
        let user_code = new_user_code().map_err(|e| internal(e.to_string()))?;
        let record = DeviceAuth {
            hash: device_code.hash(),
            user_code,
            client_id: client.id.clone(),
            scopes: scopes.clone(),
            audiences: audiences.clone(),
            created_at: now,
            expires_at: now + DEVICE_TTL_MS,
            interval_ms,
            last_polled_at: None,
            status: "pending".into(),
            user_id: None,
            grant_id: None,
            granted_scopes: None,
        };
        match state.store.insert_device(&record).await {
            Ok(()) => {
                stored = Some(record);
                break;
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let record = stored.ok_or_else(|| internal("no free user code".into()))?;
    let iss = state.oauth.issuer();
    let user_code = shown(&record.user_code);
    let complete = format!("{iss}{ENTRY_ACTION}?user_code={}", record.user_code);
    Ok(no_store(
        Json(json!({
            "device_code": device_code.expose(),
            "user_code": user_code,
            "verification_uri": format!("{iss}{ENTRY_ACTION}"),
            "verification_uri_complete": complete,
            "expires_in": DEVICE_TTL_MS / 1000,
            "interval": interval_ms / 1000,
        }))
        .into_response(),
    ))
}

fn entry_page(status: StatusCode, user_code: &str, error: Option<&str>) -> Response {
    page(status, "device.html", context! { user_code, error, action => ENTRY_ACTION })
}

/// `GET /oauth2/device`: where the user enters the code their device shows.
#[utoipa::path(get, path = "/oauth2/device", tag = "oauth2",
    params(("user_code" = Option<String>, Query, description = "prefills the form (verification_uri_complete)")),
    responses((status = 200, description = "the code entry page (HTML)", content_type = "text/html")))]
pub async fn device_page(RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    let form = CoreForm::parse(query.as_bytes());
    let code = form
        .one("user_code")
        .ok()
        .flatten()
        .and_then(normalize_user_code)
        .map(|c| shown(&c))
        .unwrap_or_default();
    entry_page(StatusCode::OK, &code, None)
}

/// `POST /oauth2/device`: the entered code; then login and consent as for the authorization endpoint.
#[utoipa::path(post, path = "/oauth2/device", tag = "oauth2",
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "user_code"),
    responses((status = 200, description = "the login or consent page (HTML)", content_type = "text/html"),
        (status = 400, description = "unknown or expired code: the entry page again", content_type = "text/html"),
        (status = 429, description = "too many wrong codes from this address", content_type = "text/html")))]
pub async fn device_entry(
    State(state): State<Arc<AppState>>,
    ClientIp(peer): ClientIp,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Response {
    let now = state.now();
    let form = match form_body(&headers, &body) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if super::authorize::cross_site(&headers) {
        return error_page(StatusCode::FORBIDDEN, "the form's security check failed; open this page again");
    }
    if state.throttle.blocked(peer.accountable, now).is_some() {
        return entry_page(
            StatusCode::TOO_MANY_REQUESTS,
            "",
            Some("Too many wrong codes. Wait a minute and try again."),
        );
    }
    let entered = form.one("user_code").ok().flatten().and_then(normalize_user_code);
    let found = match &entered {
        Some(code) => state.store.find_device(code, now).await,
        None => Ok(None),
    };
    let device = match found {
        Ok(Some(d)) => d,
        Ok(None) => {
            state.throttle.record_failure(peer.accountable, now);
            return entry_page(
                StatusCode::BAD_REQUEST,
                &entered.as_deref().map(shown).unwrap_or_default(),
                Some("That code is not valid or has expired. Check your device and try again."),
            );
        }
        Err(_) => {
            return error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "the service is unavailable; try again shortly",
            );
        }
    };
    let client = match usable_client(&state, &device.client_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return error_page(StatusCode::BAD_REQUEST, "the application is disabled"),
        Err(r) => return r,
    };
    let (request_id, csrf, browser, browser_cookie) =
        match super::authorize::new_request_ids(&state, &headers) {
            Ok(v) => v,
            Err(r) => return r,
        };
    let n = names(&state);
    let req = Arc::new(AuthRequest {
        client_id: client.id.clone(),
        client_name: client.name.clone(),
        redirect_uri: String::new(),
        state: None,
        scopes: device.scopes.clone(),
        audiences: device.audiences.clone(),
        code_challenge: String::new(),
        csrf,
        browser,
        // A device is somewhere else: the user always confirms what it gets.
        always_ask: true,
        session: Mutex::new(None),
        device: Some(device.user_code.clone()),
    });
    state.oauth.flows.requests.insert(request_id.clone(), req.clone());
    let mut resp = match state.oauth.flows.session_user(cookie(&headers, n.session)) {
        Some((session, user_id)) => {
            *super::authorize::lock(&req.session) = Some(session);
            proceed(&state, &request_id, &req, &user_id, now, None).await
        }
        None => login_page(StatusCode::OK, &request_id, &req, "", None),
    };
    if let Some(c) = browser_cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}
