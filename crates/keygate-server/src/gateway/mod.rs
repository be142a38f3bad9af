//! The gateway: Keygate in front of an upstream API, on its own listener (`gateway.listen`).
//!
//! A request finds its route ([`routes`]); a protected route's credential is decided exactly as
//! `/v1/verify` and forward-auth decide it (the same function, so the same rate limits, quotas, usage
//! and audit of use); then the request goes upstream with:
//! - the credential removed (`Authorization: Bearer|DPoP …`, `X-API-Key`, the configured header, `DPoP`),
//!   and every `X-Keygate-*` header the client sent removed, so an upstream can trust the ones it sees;
//! - the identity headers forward-auth answers with, and optionally a short-lived JWT signed by Keygate;
//! - hop-by-hop headers (RFC 9110 §7.6.1, and any the `Connection` header names) removed both ways;
//! - `X-Forwarded-For`, `Forwarded`, `X-Forwarded-Proto` and `-Host`: appended to when the peer is a
//!   trusted proxy, else replaced (a client's own claims are never passed on as facts);
//! - bodies streamed both ways, never buffered; pooled keep-alive connections to the upstreams.
//!
//! Unmatched paths are 404 and never forwarded. The routes file reloads on `SIGHUP` and when the file
//! changes; a file that does not check is refused and the routes in use stay.

pub mod routes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use std::panic::AssertUnwindSafe;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keygate_core::{DecisionCode, SecretKind};
use rustls_platform_verifier::ConfigVerifierExt;

use crate::auth::presented_credential;
use crate::error::{ApiError, ErrorCode};
use crate::oauth::tokens::looks_like_jwt;
use crate::routes::verify::{
    DpopInput, decide_credential, forward_auth_response, identity_headers, is_failure, missing_credential,
    only_for_protected_resources, rate_limit_headers, record, wrong_audience,
};
use crate::state::AppState;
use crate::timeout::{ConnRequestTimer, OnConnTimer};
use crate::verify::{Context, Decision};
use routes::{Lookup, Route, Routes};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The routes in use and the client that reaches their upstreams.
pub struct Loaded {
    pub routes: Routes,
    client: Client<Connector, Body>,
}

/// The gateway's state: the routes file and what was last loaded from it.
pub struct Gateway {
    path: PathBuf,
    current: RwLock<Arc<Loaded>>,
    /// The file's modification time and length at the last load attempt, and at the last check.
    stamp: Mutex<(Option<Stamp>, Option<Stamp>)>,
}

/// A file's modification time and length.
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn client(connect_timeout: Duration) -> Result<Client<Connector, Body>, String> {
    crate::webhooks::install_tls();
    let tls = rustls::ClientConfig::with_platform_verifier()
        .map_err(|e| format!("cannot set up TLS for https upstreams: {e}"))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https))
}

impl Gateway {
    /// Loads and checks the routes file; the error says what is wrong in it.
    pub fn open(path: PathBuf) -> Result<Arc<Gateway>, String> {
        let first = stamp(&path);
        let routes = Routes::load(&path)?;
        for w in routes.warnings() {
            tracing::warn!(path = %path.display(), "{w}");
        }
        let client = client(routes.connect_timeout)?;
        Ok(Arc::new(Gateway {
            path,
            current: RwLock::new(Arc::new(Loaded { routes, client })),
            stamp: Mutex::new((first, first)),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads the file again; on success the new routes serve the next request (requests in flight
    /// finish on the old ones). On failure nothing changes.
    pub fn reload(&self) -> Result<usize, String> {
        let now = stamp(&self.path);
        *self.stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (now, now);
        let routes = Routes::load(&self.path)?;
        for w in routes.warnings() {
            tracing::warn!(path = %self.path.display(), "{w}");
        }
        let old = self.current();
        let client = if old.routes.connect_timeout == routes.connect_timeout {
            old.client.clone()
        } else {
            client(routes.connect_timeout)?
        };
        let n = routes.routes.len();
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Arc::new(Loaded { routes, client });
        Ok(n)
    }

    /// Has the file changed since the last load attempt, and stayed the same since the last check? (An
    /// editor that truncates, then writes, is not read half-way; saving by rename is safest.)
    fn changed(&self) -> bool {
        let now = stamp(&self.path);
        let mut s = self.stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let settled = s.1 == now;
        s.1 = now;
        settled && s.0 != now
    }
}

/// Reloads the routes on `SIGHUP` and when the file changes (checked every 2 s).
pub async fn watch(gateway: Arc<Gateway>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let mut hangup: Option<()> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = tokio::select! {
            () = async {
                match hangup.as_mut() {
                    #[cfg(unix)]
                    Some(s) => { s.recv().await; }
                    #[cfg(not(unix))]
                    Some(()) => std::future::pending::<()>().await,
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = tick.tick() => false,
        };
        if !signalled && !gateway.changed() {
            continue;
        }
        let path = gateway.path.display().to_string();
        match gateway.reload() {
            Ok(n) => tracing::info!(routes = n, %path, signalled, "reloaded the gateway routes"),
            Err(e) => {
                tracing::error!(error = %e, "the changed routes file was refused; the routes in use stay")
            }
        }
    }
}

/// The gateway listener's service: every request is decided and forwarded by [`GatewayState::handle`],
/// called directly by the serving loop (no router: there is nothing to route but by the routes file).
#[derive(Clone)]
pub struct GatewayState {
    app: Arc<AppState>,
    gateway: Arc<Gateway>,
}

impl GatewayState {
    pub fn new(app: Arc<AppState>, gateway: Arc<Gateway>) -> Self {
        GatewayState { app, gateway }
    }

    /// One request from `peer`, with the panic guard of every listener; `timer` is the connection's.
    pub(crate) async fn handle(&self, peer: SocketAddr, req: Request, timer: &ConnRequestTimer) -> Response {
        let started = Instant::now();
        let method = crate::metrics::method_label(req.method());
        let loaded = self.gateway.current();
        // The route's label as soon as it is known, for a request whose handling panicked.
        let mut matched = UNMATCHED;
        let forwarded = AssertUnwindSafe(forward(&self.app, &loaded, peer, req, timer, &mut matched))
            .catch_unwind()
            .await;
        let (label, resp) = match forwarded {
            Ok(r) => r,
            Err(panic) => (matched, crate::panic_response(panic, false)),
        };
        crate::record_request(&self.app, method, label, resp.status().as_u16(), started);
        resp
    }
}

const UNMATCHED: &str = "gateway:unmatched";

fn is_token(credential: &str) -> bool {
    looks_like_jwt(credential)
        || credential.starts_with(SecretKind::AccessToken.prefix())
        || credential.starts_with(SecretKind::PersonalToken.prefix())
}

/// Decides, then forwards. Returns the metrics label (the route's, from the file) and the response.
async fn forward<'a>(
    app: &AppState,
    loaded: &'a Loaded,
    peer: SocketAddr,
    req: Request,
    timer: &ConnRequestTimer,
    matched: &mut &'a str,
) -> (&'a str, Response) {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let Ok(segments) = routes::segments(parts.uri.path()) else {
        let e = ApiError::new(
            ErrorCode::AmbiguousPath,
            "the path has an empty, '.' or '..' segment, or an encoded '/' or '\\'; it was not forwarded",
        );
        return (UNMATCHED, e.into_response());
    };
    // An absolute-form target's authority wins over `Host` (RFC 9112 §3.2.2).
    let host = match parts.uri.authority() {
        Some(a) => Some(a.as_str().to_owned()),
        None => parts.headers.get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    let route = match loaded.routes.lookup(host.as_deref(), &segments, &parts.method) {
        Lookup::Found(r) => r,
        Lookup::MethodNotAllowed(allow) => {
            let e = ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take this method");
            let mut resp = e.into_response();
            if let Ok(v) = HeaderValue::from_str(&allow)
                && !allow.is_empty()
            {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return (UNMATCHED, resp);
        }
        Lookup::NotFound => {
            let e = ApiError::new(ErrorCode::NotFound, "no gateway route matches this request");
            return (UNMATCHED, e.into_response());
        }
    };
    let label = route.label.as_str();
    *matched = label;
    let trusted = app.config.trusted_proxies.iter().any(|n| n.contains(&peer.ip()));
    let decision = if route.public {
        None
    } else {
        match authorize(app, loaded, route, peer, trusted, &parts, host.as_deref(), started).await {
            Ok(d) => Some(d),
            Err(resp) => return (label, resp),
        }
    };
    let mut headers = std::mem::take(&mut parts.headers);
    strip_request_headers(&mut headers, &loaded.routes);
    if let Some(d) = &decision {
        identity_headers(&mut headers, d);
        if route.internal_jwt
            && let Err(e) = internal_jwt(app, loaded, route, d, &mut headers)
        {
            return (label, e.into_response());
        }
    }
    forwarding_headers(&mut headers, peer, trusted, host.as_deref());
    let upstream = route.upstream();
    if !route.preserve_host {
        // `Host` from the upstream's URL (as the HTTP client would set it, made once per route).
        headers.insert(header::HOST, upstream.host_header.clone());
    }
    let rest =
        if route.strip_path { strip_segments(parts.uri.path(), route.depth()) } else { parts.uri.path() };
    let mut path = String::with_capacity(upstream.base_path.len() + rest.len() + 1);
    path.push_str(&upstream.base_path);
    path.push_str(rest);
    if path.is_empty() {
        path.push('/');
    }
    if let Some(q) = parts.uri.query() {
        path.push('?');
        path.push_str(q);
    }
    let uri = match Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path)
        .build()
    {
        Ok(u) => u,
        Err(_) => {
            let e = ApiError::new(ErrorCode::AmbiguousPath, "the path cannot be sent upstream");
            return (label, e.into_response());
        }
    };
    parts.uri = uri;
    parts.headers = headers;
    parts.version = Version::HTTP_11;
    parts.extensions = axum::http::Extensions::new();
    let sent = loaded.client.request(Request::from_parts(parts, body));
    let deadline = tokio::time::Instant::now() + route.timeout;
    let resp = match OnConnTimer::new(sent, deadline, timer).await {
        None => {
            let e = ApiError::new(
                ErrorCode::UpstreamTimeout,
                format!("the upstream did not answer within {} s", route.timeout.as_secs()),
            );
            return (label, e.into_response());
        }
        Some(Err(e)) => {
            tracing::warn!(route = %route.name, error = %e, connect = e.is_connect(), "upstream request failed");
            let e = ApiError::new(ErrorCode::UpstreamUnavailable, "the upstream could not be reached");
            return (label, e.into_response());
        }
        Some(Ok(resp)) => resp,
    };
    let (mut rp, incoming) = resp.into_parts();
    // The client's connection has its own version (an HTTP/1.0 upstream must not downgrade it).
    rp.version = Version::HTTP_11;
    strip_hop_by_hop(&mut rp.headers);
    if let Some(d) = &decision {
        rate_limit_headers(&mut rp.headers, d);
    }
    let body = IdleTimeout::new(incoming, route.timeout);
    (label, Response::from_parts(rp, Body::new(body)))
}

/// An upstream's response body that fails when no data arrives for `idle` (the route's timeout): a
/// stalled upstream does not hold the client's connection, and the upstream's, forever.
///
/// The timer is made only when the body has to wait, and moved only when it waits again after data came:
/// a small response, read with its headers, never touches the runtime's timer wheel (each registration
/// and removal there takes the driver's lock).
struct IdleTimeout {
    inner: hyper::body::Incoming,
    idle: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Data came since the timer was last set: the next wait starts a new idle period.
    progressed: bool,
}

impl IdleTimeout {
    fn new(inner: hyper::body::Incoming, idle: Duration) -> Self {
        IdleTimeout { inner, idle, sleep: None, progressed: false }
    }
}

impl hyper::body::Body for IdleTimeout {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.progressed = true;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let idle = this.idle;
        let sleep = match &mut this.sleep {
            Some(sleep) => {
                if std::mem::take(&mut this.progressed) {
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                sleep
            }
            None => {
                this.progressed = false;
                this.sleep.insert(Box::pin(tokio::time::sleep(idle)))
            }
        };
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::warn!(idle_s = this.idle.as_secs(), "upstream response body stalled; closing it");
                Poll::Ready(Some(Err("the upstream's response body stalled".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The credential check of a protected route: a valid decision, or the refusal to answer with.
#[allow(clippy::too_many_arguments)]
async fn authorize(
    app: &AppState,
    loaded: &Loaded,
    route: &Route,
    peer: SocketAddr,
    trusted: bool,
    parts: &axum::http::request::Parts,
    host: Option<&str>,
    started: Instant,
) -> Result<Decision, Response> {
    let headers = &parts.headers;
    let credential = custom_credential(headers, &loaded.routes)
        .or_else(|| presented_credential(headers))
        .filter(|c| !c.is_empty());
    let Some(credential) = credential else { return Err(missing_credential(None, None)) };
    let token = is_token(credential);
    if (token && !route.accept_tokens) || (!token && !route.accept_keys) {
        let message =
            if token { "this route accepts only API keys" } else { "this route accepts only access tokens" };
        return Err(ApiError::new(ErrorCode::Unauthorized, message).into_response());
    }
    let client = crate::peer::client_of(Some(peer.ip()), headers, &app.config.trusted_proxies);
    let now = app.now();
    // The URL the client called, for a DPoP proof's `htu`: behind a trusted proxy (which terminates TLS
    // or rewrites `Host`), the scheme and host it forwarded.
    // One proof at most (RFC 9449 §4.3); a trusted proxy's headers count in their last (its own) element.
    let mut proofs = headers.get_all("dpop").iter();
    let proof = match (proofs.next(), proofs.next()) {
        (Some(p), None) => p.to_str().ok(),
        _ => None,
    };
    let dpop = proof.map(|proof| {
        let forwarded = |name: &HeaderName| {
            trusted
                .then(|| headers.get(name).and_then(|v| v.to_str().ok()))
                .flatten()
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let scheme = match forwarded(&X_FORWARDED_PROTO) {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            _ => "http",
        };
        let host = forwarded(&X_FORWARDED_HOST).or(host).unwrap_or_default();
        DpopInput {
            proof: proof.to_string(),
            method: parts.method.to_string(),
            url: format!("{scheme}://{host}{}", parts.uri.path()),
        }
    });
    let required = route.required_scopes(&parts.method);
    let ctx = Context { ip: client.ip, cost: route.cost, now_ms: now };
    let decision =
        match decide_credential(app, credential, &required, ctx, route.audience.as_deref(), dpop.as_ref())
            .await
        {
            Ok(d) => d,
            Err(e) => return Err(ApiError::from(e).into_response()),
        };
    if is_failure(&decision) {
        if let Some(retry) = app.throttle.blocked(client.accountable, now) {
            return Err(ApiError::throttled(retry).into_response());
        }
        app.throttle.record_failure(client.accountable, now);
    }
    if only_for_protected_resources(app, &decision, route.audience.as_deref()) {
        return Err(wrong_audience());
    }
    record(app, &decision, started);
    if decision.code != DecisionCode::Valid || (decision.key.is_none() && decision.token.is_none()) {
        let mut resp = forward_auth_response(&decision, None);
        if resp.status() == StatusCode::OK {
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
        }
        return Err(resp);
    }
    Ok(decision)
}

/// `[internal_jwt]`: a JWT for the upstream, signed with Keygate's current signing key.
fn internal_jwt(
    app: &AppState,
    loaded: &Loaded,
    route: &Route,
    d: &Decision,
    headers: &mut HeaderMap,
) -> Result<(), ApiError> {
    let (Some(spec), Some(name)) = (&loaded.routes.internal_jwt, &loaded.routes.internal_jwt_header) else {
        return Ok(());
    };
    let now = app.now();
    let unavailable = || ApiError::internal("gateway internal JWT", "no signing key is active");
    let signer = app.oauth.keys.signer(now).ok_or_else(unavailable)?;
    let secs = now / 1000;
    let mut claims = serde_json::json!({
        "iss": app.oauth.issuer(),
        "aud": spec.audience,
        "iat": secs,
        "exp": secs + spec.lifetime_seconds as i64,
        "jti": keygate_core::id::new_id("gwt", now).map_err(|_| unavailable())?,
        "route": route.name,
    });
    if let Some(t) = &d.token {
        claims["sub"] = t.subject.clone().into();
        claims["scope"] = t.scopes.join(" ").into();
        claims["client_id"] = t.client_id.clone().into();
        if !t.consumer_id.is_empty() {
            claims["consumer_id"] = t.consumer_id.clone().into();
        }
        if let Some(u) = &t.user_id {
            claims["user_id"] = u.clone().into();
        }
    } else if let Some(k) = &d.key {
        claims["sub"] = k.key_id.clone().into();
        claims["scope"] = k.scopes_header.clone().into();
        claims["key_id"] = k.key_id.clone().into();
        claims["consumer_id"] = k.consumer_id.clone().into();
    }
    let jwt = signer.sign_jwt_typed("keygate-gateway+jwt", &claims).map_err(|_| unavailable())?;
    let value = HeaderValue::from_str(&jwt).map_err(|_| unavailable())?;
    headers.insert(name.clone(), value);
    Ok(())
}

/// The configured credential header's value, which wins over `Authorization` (so an upstream can keep
/// its own `Authorization` scheme).
fn custom_credential<'h>(headers: &'h HeaderMap, routes: &Routes) -> Option<&'h str> {
    let name = routes.credential_header.as_ref()?;
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), besides those the `Connection` header names.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Claims a client could make that an upstream framework may believe: method overrides (a POST checked
/// as a POST must not become a DELETE upstream), client addresses, original URLs.
fn client_claim(name: &str) -> bool {
    matches!(
        name,
        "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-real-ip"
            | "true-client-ip"
            | "x-client-ip"
            | "cf-connecting-ip"
            | "x-original-url"
            | "x-rewrite-url"
            | "x-original-uri"
    )
}

/// The names `Connection` lists (at most 64).
fn connection_listed(h: &HeaderMap) -> impl Iterator<Item = HeaderName> + '_ {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .take(64)
}

/// Removes hop-by-hop headers (from an upstream's response). One pass over the headers present: most
/// responses have none to remove, and then nothing is allocated.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut gone: Vec<HeaderName> = connection_listed(h).collect();
    gone.extend(h.keys().filter(|n| hop_by_hop(n.as_str())).cloned());
    for name in gone {
        h.remove(name);
    }
}

/// Prepares a client's request headers for the upstream. Removed on every route, public ones included
/// (clients often send their key on every request):
/// - hop-by-hop headers (RFC 9110 §7.6.1) and those `Connection` names;
/// - the credential: the configured header, `X-API-Key`, `DPoP`, and `Authorization: Bearer|DPoP` (kept
///   when the configured credential header carried the credential: then `Authorization` is the
///   upstream's own);
/// - `X-Keygate-*` (identity; the gateway adds its own) and the internal JWT's header;
/// - Keygate's session cookies (console and login), which a browser sends to every port of a host;
/// - [`client_claim`]s.
fn strip_request_headers(h: &mut HeaderMap, routes: &Routes) {
    let custom = routes.credential_header.as_ref();
    // `Authorization` is the upstream's own only when the configured header carried the credential.
    let custom_used = custom_credential(h, routes).is_some();
    let mut gone: Vec<HeaderName> = connection_listed(h).collect();
    let mut cookies = false;
    for (name, value) in h.iter() {
        let n = name.as_str();
        let drop = hop_by_hop(n)
            || client_claim(n)
            || n == "x-api-key"
            || n == "dpop"
            || n.starts_with("x-keygate-")
            || Some(name) == custom
            || Some(name) == routes.internal_jwt_header.as_ref()
            || (name == header::AUTHORIZATION
                && !custom_used
                && value.to_str().ok().and_then(|v| v.trim().split_once(' ')).is_some_and(|(scheme, _)| {
                    scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("dpop")
                }));
        if drop {
            gone.push(name.clone());
        }
        cookies |= name == header::COOKIE;
    }
    for name in gone {
        h.remove(name);
    }
    if cookies {
        strip_keygate_cookies(h);
    }
}

/// Keygate's own cookies (`kg_*`, `__Host-kg_*`) out of `Cookie`; the others stay, byte for byte (a
/// value may hold bytes that are not ASCII). Untouched when there is none of Keygate's.
fn strip_keygate_cookies(h: &mut HeaderMap) {
    fn ours(pair: &[u8]) -> bool {
        let pair = pair.trim_ascii_start();
        pair.starts_with(b"kg_") || pair.starts_with(b"__Host-kg_")
    }
    if !h.get_all(header::COOKIE).iter().any(|v| v.as_bytes().split(|b| *b == b';').any(ours)) {
        return;
    }
    let mut kept: Vec<u8> = Vec::new();
    for value in h.get_all(header::COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() || ours(pair) {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    h.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_bytes(&kept)
    {
        h.insert(header::COOKIE, v);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// `X-Forwarded-For`, `Forwarded`, `X-Forwarded-Proto`, `X-Forwarded-Host`: a trusted proxy's are
/// extended, anyone else's replaced.
fn forwarding_headers(h: &mut HeaderMap, peer: SocketAddr, trusted: bool, host: Option<&str>) {
    let ip = peer.ip();
    let joined = |h: &HeaderMap, name: &HeaderName| -> Option<String> {
        let parts: Vec<&str> = h.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    };
    let ip_text = ip.to_string();
    let prior = |name: &HeaderName| if trusted { joined(h, name) } else { None };
    let xff = match prior(&X_FORWARDED_FOR) {
        Some(prior) => format!("{prior}, {ip_text}"),
        None => ip_text.clone(),
    };
    let node = if ip.is_ipv6() { format!("\"[{ip_text}]\"") } else { ip_text };
    // The scheme the client used: a trusted proxy's word, else this listener's (plain HTTP).
    let proto = match h.get(&X_FORWARDED_PROTO).and_then(|v| v.to_str().ok()).filter(|_| trusted) {
        Some("https") => "https",
        _ => "http",
    };
    let mut this_hop = format!("for={node};proto={proto}");
    if let Some(host) = host {
        this_hop.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
    }
    let forwarded = match prior(&header::FORWARDED) {
        Some(prior) => format!("{prior}, {this_hop}"),
        None => this_hop,
    };
    // `insert` replaces every earlier value.
    let set = |h: &mut HeaderMap, name: HeaderName, v: &str| match HeaderValue::from_str(v) {
        Ok(v) => {
            h.insert(name, v);
        }
        Err(_) => {
            h.remove(name);
        }
    };
    set(h, X_FORWARDED_FOR, &xff);
    set(h, header::FORWARDED, &forwarded);
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !(trusted && h.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(host) => set(h, X_FORWARDED_HOST, host),
            None => {
                h.remove(X_FORWARDED_HOST);
            }
        }
    }
}

/// The path after its first `n` segments (with its leading `/`), or "" when nothing is left.
fn strip_segments(path: &str, n: usize) -> &str {
    let mut at = 0;
    for _ in 0..n {
        match path.get(at + 1..).and_then(|rest| rest.find('/')) {
            Some(i) => at = at + 1 + i,
            None => return "",
        }
    }
    &path[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripping_keeps_what_follows_the_route() {
        assert_eq!(strip_segments("/v1/articles/7", 2), "/7");
        assert_eq!(strip_segments("/v1/articles", 2), "");
        assert_eq!(strip_segments("/v1/articles/", 2), "/");
        assert_eq!(strip_segments("/x", 0), "/x");
    }

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, vec!["x-kept"]);
    }

    #[test]
    fn forwarding_headers_trust_only_trusted_peers() {
        let peer: SocketAddr = ([10, 0, 0, 9], 5000).into();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let mut untrusted = h.clone();
        forwarding_headers(&mut untrusted, peer, false, Some("api.example.com"));
        assert_eq!(untrusted["x-forwarded-for"], "10.0.0.9");
        assert_eq!(untrusted["x-forwarded-proto"], "http");
        assert_eq!(untrusted["forwarded"], "for=10.0.0.9;proto=http;host=\"api.example.com\"");
        forwarding_headers(&mut h, peer, true, Some("api.example.com"));
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
