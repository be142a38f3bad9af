//! Who is calling: Keygate's own routes are protected by Keygate credentials.
//!
//! An admin route needs a key with `keygate:admin`; `/v1/verify` needs `keygate:verify` (which
//! `keygate:admin` covers). The credential comes from `Authorization: Bearer <key>` or `X-API-Key`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use keygate_core::{DecisionCode, scope};

use crate::error::{ApiError, ErrorCode};
use crate::peer::{Client, client_of};
use crate::state::AppState;
use crate::verify::Context;

/// The credential presented in a request's headers, if any.
pub fn presented_credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some((scheme, token)) = v.split_once(' ')
            && (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("dpop"))
        {
            return Some(token.trim());
        }
    }
    headers.get(X_API_KEY).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Header names parsed once (a `&str` name is parsed and hashed on every lookup).
pub const X_API_KEY: axum::http::HeaderName = axum::http::HeaderName::from_static("x-api-key");
pub const DPOP: axum::http::HeaderName = axum::http::HeaderName::from_static("dpop");

/// The peer address of the request, if the server recorded one.
pub fn peer_ip(parts: &Parts) -> Option<IpAddr> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ci| ci.0.ip())
}

/// The peer's own address (not what a proxy says): for deciding whether a proxy's headers are believed.
pub struct Peer(pub Option<IpAddr>);

impl FromRequestParts<Arc<AppState>> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        Ok(Peer(peer_ip(parts)))
    }
}

/// The request's client: its address (the peer, or behind a trusted proxy the address it forwarded) and
/// the address that answers for its failures.
pub struct ClientIp(pub Client);

impl FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_of(peer_ip(parts), &parts.headers, &state.config.trusted_proxies)))
    }
}

/// An authenticated caller: the key it used, and where it called from.
#[derive(Debug, Clone)]
pub struct Actor {
    pub key_id: String,
    pub ip: Option<IpAddr>,
}

/// The web console's signed-in operator, put in the extensions of the admin API requests the console
/// makes in-process (a client cannot set extensions): the admin routes take it as their caller, so the
/// console runs every change through the same handlers, and audits it with the same actor.
#[derive(Debug, Clone)]
pub struct ConsoleActor(pub Actor);

async fn authenticate(parts: &Parts, state: &AppState, permission: &str) -> Result<Actor, ApiError> {
    if let Some(ConsoleActor(actor)) = parts.extensions.get::<ConsoleActor>() {
        return Ok(actor.clone());
    }
    let client = client_of(peer_ip(parts), &parts.headers, &state.config.trusted_proxies);
    check_credential(state, presented_credential(&parts.headers), client, permission).await
}

/// Checks a presented Keygate credential for `permission`, counting failures against the client's
/// address (and refusing it while it is throttled).
pub async fn check_credential(
    state: &AppState,
    secret: Option<&str>,
    client: Client,
    permission: &str,
) -> Result<Actor, ApiError> {
    let (ip, accountable) = (client.ip, client.accountable);
    let now = state.now();
    let Some(secret) = secret else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "this route needs a Keygate credential: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
        ));
    };
    // The credential first: one that verifies is never refused for its address's earlier failures.
    let decision = state.verifier.verify(secret, &[permission], Context { ip, cost: 0, now_ms: now }).await?;
    match (decision.code, decision.key) {
        // A key's rate limits and quota govern verifications of it, not its use as Keygate's caller.
        (DecisionCode::Valid | DecisionCode::RateLimited | DecisionCode::QuotaExceeded, Some(key)) => {
            Ok(Actor { key_id: key.key_id.clone(), ip })
        }
        (DecisionCode::InsufficientScope, _) => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("the credential is valid but lacks the '{permission}' permission; use an admin key"),
        )),
        (code, _) => {
            if matches!(code, DecisionCode::Malformed | DecisionCode::NotFound) {
                if let Some(retry) = state.throttle.blocked(accountable, now) {
                    return Err(ApiError::throttled(retry));
                }
                state.throttle.record_failure(accountable, now);
            }
            // A known key that no longer works: say how to get back in.
            let recover = if matches!(
                code,
                DecisionCode::Revoked | DecisionCode::Disabled | DecisionCode::Expired
            ) && permission == scope::ADMIN
            {
                "; if no admin key works any more, make a new one on the server with `keygate admin-key --data-dir <data dir>`"
            } else {
                ""
            };
            Err(ApiError::new(
                ErrorCode::Unauthorized,
                format!(
                    "the credential in the request header was rejected: {} ({}){recover}",
                    code.as_str(),
                    code.message()
                ),
            ))
        }
    }
}

/// A caller holding `keygate:metrics` (or admin), when the configuration asks for one.
pub struct MetricsCaller;

impl FromRequestParts<Arc<AppState>> for MetricsCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        if state.config.metrics_need_auth() {
            authenticate(parts, state, scope::METRICS).await?;
        }
        Ok(MetricsCaller)
    }
}

/// A caller holding `keygate:admin`.
pub struct AdminCaller(pub Actor);

impl FromRequestParts<Arc<AppState>> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        authenticate(parts, state, scope::ADMIN).await.map(AdminCaller)
    }
}

/// A caller holding `keygate:verify` (or admin).
pub struct VerifyCaller(pub Actor);

impl FromRequestParts<Arc<AppState>> for VerifyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        authenticate(parts, state, scope::VERIFY).await.map(VerifyCaller)
    }
}
