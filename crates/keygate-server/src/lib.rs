//! Keygate's HTTP server as a library: the binary and the tests start it the same way, with
//! [`launch`] on a listener they bound themselves (tests bind port 0).

pub mod auth;
pub mod cache;
pub mod cluster;
pub mod console;
pub mod decision_body;
pub mod error;
pub mod fsmode;
pub mod gateway;
pub mod hot;
pub mod mail;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod password;
pub mod peer;
pub mod routes;
pub mod runtime;
pub mod seal;
pub mod serve;
pub mod shared_limits;
pub mod state;
pub mod time;
pub mod timeout;
pub mod verify;
pub mod webhooks;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use tokio::net::TcpListener;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use state::{AppState, DatabaseUrl, ServerConfig, SignupMode, bootstrap, open_store};

use crate::error::{ApiError, ErrorCode};

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything (one listener, the default).
    All,
    /// What API consumers reach: verify, forward-auth, OAuth 2, discovery, JWKS, health.
    Public,
    /// What operators reach: the admin API, `/metrics`, the docs, health.
    Admin,
}

/// Builds the complete router for a state.
pub fn app(state: Arc<AppState>) -> axum::Router {
    app_for(state, Surface::All)
}

/// Builds the router of one surface.
pub fn app_for(state: Arc<AppState>, surface: Surface) -> axum::Router {
    let routes = match surface {
        Surface::All => public_routes().merge(admin_routes()),
        Surface::Public => public_routes(),
        Surface::Admin => admin_routes(),
    };
    let (mut routes, _) = routes.merge(routes::ops::router()).split_for_parts();
    if surface != Surface::Public {
        routes = routes
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::document()))
            .merge(console::router());
    }
    if surface != Surface::Admin {
        // The developer portal is for the API's audience: on the public listener.
        routes = routes.merge(console::portal::router());
    }
    with_layers(routes, state)
}

/// The router's fallbacks and per-route layers around `routes`.
fn with_layers(routes: axum::Router<Arc<AppState>>, state: Arc<AppState>) -> axum::Router {
    let body_limit = state.config.body_limit;
    let timeout = state.config.request_timeout;
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(timeout::RequestTimeoutLayer(timeout))
        // Outermost (the layers apply per route, so the matched path is known), with the panic guard:
        // a timed-out or panicked request is counted too, as on the hot routes.
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// What API consumers reach: verify, forward-auth, OAuth 2, discovery, JWKS (health is on every
/// listener and added by `app_for`). Routes are
/// registered with their OpenAPI operation (utoipa-axum), so the document cannot miss one.
fn public_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().merge(routes::verify::router()).merge(oauth::router()).merge(routes::leaks::router())
}

/// What operators reach: the admin API and `/metrics` (the docs are added by `app_for`).
pub(crate) fn admin_routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .merge(routes::consumers::router())
        .merge(routes::plans::router())
        .merge(routes::keys::router())
        .merge(routes::audit::router())
        .merge(routes::import::router())
        .merge(routes::usage::router())
        .merge(routes::clients::router())
        .merge(routes::users::router())
        .merge(routes::invitations::router())
        .merge(routes::webhooks::router())
        .merge(routes::leaks::admin_router())
        .merge(routes::ops::metrics_router())
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route; see /docs for the API")
}

async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    const MESSAGE: &str = "this route does not take this method; see /docs for the API";
    if oauth::speaks_rfc6749(uri.path()) {
        oauth::OAuthError::new(oauth::OAuthErrorCode::MethodNotAllowed, MESSAGE).into_response()
    } else {
        ApiError::new(ErrorCode::MethodNotAllowed, MESSAGE).into_response()
    }
}

/// The answer to a request whose handler panicked (`oauth`: in RFC 6749's error shape, see
/// [`oauth::speaks_rfc6749`]).
pub(crate) fn panic_response(_: Box<dyn std::any::Any + Send + 'static>, oauth: bool) -> Response {
    tracing::error!("a request handler panicked");
    const MESSAGE: &str = "internal error; the server log has the details";
    if oauth {
        oauth::OAuthError::new(oauth::OAuthErrorCode::ServerError, MESSAGE).into_response()
    } else {
        ApiError::new(ErrorCode::Internal, MESSAGE).into_response()
    }
}

/// Counts every request in the metrics and logs one line for it at `info` (target `keygate::access`):
/// method, route template (never the path itself: it may hold ids), status and latency. Never a header,
/// a query or a body, so never a secret. Turn it off with `KEYGATE_LOG=info,keygate::access=warn`.
async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = metrics::method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let oauth = oauth::speaks_rfc6749(req.uri().path());
    let resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => panic_response(panic, oauth),
    };
    record_request(&state, method, route.as_deref().unwrap_or("unmatched"), resp.status().as_u16(), started);
    resp
}

/// One request in the metrics and the access log (the router's and the hot routes' one place).
pub(crate) fn record_request(
    state: &AppState,
    method: &'static str,
    route: &str,
    status: u16,
    started: std::time::Instant,
) {
    state.metrics.record_request(method, route, status);
    access_log(method, route, status, started);
}

/// A hot route's request ([`hot`]) in the metrics (by the route's index) and the access log.
pub(crate) fn record_hot_request(
    state: &AppState,
    index: usize,
    method: &'static str,
    route: &'static str,
    status: u16,
    started: std::time::Instant,
) {
    state.metrics.record_hot_request(index, method, route, status);
    access_log(method, route, status, started);
}

fn access_log(method: &'static str, route: &str, status: u16, started: std::time::Instant) {
    tracing::info!(target: "keygate::access", method, route, status,
        latency_us = started.elapsed().as_micros() as u64, "request");
}

/// Serves `state` on `listener` until `shutdown` completes, then finishes in-flight requests and
/// flushes pending usage. Background work (usage flusher, known-hash follower, retention) runs while
/// serving.
pub async fn launch(
    state: Arc<AppState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    launch_split(state, listener, None, shutdown).await
}

/// Like [`launch`], with an optional second listener for the admin surface: then `listener` serves
/// only the public surface.
pub async fn launch_split(
    state: Arc<AppState>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    launch_all(state, listener, admin, None, shutdown).await
}

/// Like [`launch_split`], with an optional gateway listener and its routes ([`gateway`]).
pub async fn launch_all(
    state: Arc<AppState>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    gateway: Option<(TcpListener, Arc<gateway::Gateway>)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // On a shared database, changes other nodes commit from now on are applied after the loads below.
    let follow_from = if state.store.shared() { Some(cluster::starting_point(&state).await) } else { None };
    if let Err(e) = state.verifier.known.follow(state.store.as_ref()).await {
        tracing::warn!(error = %e, "could not load the known secret hashes; verify reads the store until it can");
    }
    if state.config.issuer.is_none() && state.config.listen.ip().is_unspecified() {
        tracing::warn!(addr = %state.config.listen, "listening on all interfaces without an issuer URL: set `issuer` (KEYGATE_ISSUER) to the URL clients use, or OAuth discovery and token validation will name an address they cannot reach");
    }
    let master = match seal::MasterKey::open(&state.config.master_key, &state.config.data_dir) {
        Ok((key, created)) => {
            if let Some(path) = created {
                tracing::warn!(path = %path.display(), "generated a new master key, which seals the JWT signing keys; back it up apart from the data directory: without it they cannot be opened");
            }
            Arc::new(key)
        }
        Err(e) => return Err(std::io::Error::other(format!("cannot load the master key: {e}"))),
    };
    state.webhooks.set_master(master.clone());
    if let Some(url) = &state.config.rate_limits_redis_url {
        let limiter = shared_limits::SharedLimits::connect(url.expose())
            .map_err(|e| std::io::Error::other(format!("rate_limits.redis_url {url}: {e}")))?;
        let _ = state.verifier.shared_limits.set(Arc::new(limiter));
        tracing::info!(redis = %url, "rate limits are shared by every node (Redis)");
    }
    if let Some(path) = &state.config.leak_reporter_keys {
        match routes::leaks::load_reporters(path) {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "leak reports accepted at /v1/leaks");
                state.webhooks.set_reporters(keys);
            }
            Err(e) => {
                return Err(std::io::Error::other(format!("cannot load the leak reporters' keys: {e}")));
            }
        }
    }
    if let Err(e) = state.oauth.load(state.store.as_ref(), master, state.now()).await {
        return Err(std::io::Error::other(format!("cannot load OAuth signing keys and clients: {e}")));
    }
    state.oauth.start(state.store.clone());
    let background = tokio::spawn(background(state.clone()));
    let follower = match follow_from {
        Some(from) => Some(cluster::start(state.clone(), from).await),
        None => None,
    };
    let deliveries = tokio::spawn(webhooks::run(state.clone()));
    let watcher = gateway.as_ref().map(|(_, g)| tokio::spawn(gateway::watch(g.clone())));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let options = serve::ServeOptions {
        header_read_timeout: state.config.request_timeout,
        shutdown_grace: std::time::Duration::from_secs(30),
    };
    let main_app = if admin.is_some() { app_for(state.clone(), Surface::Public) } else { app(state.clone()) };
    let main_app = hot::Served::with_hot_routes(main_app, state.clone());
    let main = serve::serve(listener, main_app, stopped.clone(), options);
    let admin = admin.map(|l| {
        serve::serve(l, hot::Served::router(app_for(state.clone(), Surface::Admin)), stopped.clone(), options)
    });
    let gated = gateway.map(|(l, g)| {
        serve::serve(
            l,
            hot::Served::gateway(gateway::GatewayState::new(state.clone(), g)),
            stopped.clone(),
            options,
        )
    });
    let trigger = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let admin = async move {
        match admin {
            Some(a) => a.await,
            None => Ok(()),
        }
    };
    let gated = async move {
        match gated {
            Some(g) => g.await,
            None => Ok(()),
        }
    };
    let (a, b, c, ()) = tokio::join!(main, admin, gated, trigger);
    let result = a.and(b).and(c);
    if let Some(w) = watcher {
        w.abort();
    }
    background.abort();
    deliveries.abort();
    if let Some(f) = follower {
        f.abort();
    }
    final_flush(&state).await;
    result
}

async fn background(state: Arc<AppState>) {
    let mut flush = tokio::time::interval(state.config.flush_interval);
    let mut follow = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut retention = tokio::time::interval(std::time::Duration::from_secs(600));
    // `key.expiring` events: at start, then hourly.
    let mut expiring = tokio::time::interval(std::time::Duration::from_secs(3600));
    // Signing keys are checked often enough for the configured rotation interval, at most once a minute.
    let key_check = (state.config.key_rotation_interval / 4)
        .clamp(std::time::Duration::from_millis(100), std::time::Duration::from_secs(60));
    let mut keys = tokio::time::interval(key_check);
    for t in [&mut flush, &mut follow, &mut retention, &mut keys, &mut expiring] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = flush.tick() => {
                if let Err(e) = state.flush().await {
                    tracing::warn!(error = %e, "usage flush failed; the counts are kept and retried");
                }
            }
            _ = follow.tick() => {
                if let Err(e) = state.verifier.known.follow(state.store.as_ref()).await {
                    tracing::warn!(error = %e, "following new secrets failed; retrying");
                }
            }
            _ = keys.tick() => {
                let now = state.now();
                // Other nodes' key changes arrive as changes; this also catches what no change reports
                // (a key retired after the change that made its successor).
                if state.store.shared()
                    && let Err(e) = state.oauth.keys.load(state.store.as_ref(), state.oauth.alg, now).await
                {
                    tracing::warn!(error = %e, "reloading the signing keys failed; retrying");
                }
                state.oauth.prune(now);
                let every = state.config.key_rotation_interval.as_millis() as i64;
                let newest = state.oauth.keys.records().iter().filter(|k| k.revoked_at.is_none()).map(|k| k.active_from).max().unwrap_or(now);
                if every > 0 && now - newest >= every {
                    let ahead = state.config.key_publish_ahead.as_millis() as i64;
                    let audit = scheduled_rotation_audit(now);
                    match state.oauth.keys.rotate(state.store.as_ref(), state.oauth.alg, now, ahead, audit.as_ref()).await {
                        Ok(k) => tracing::info!(kid = %k.kid, "rotated the JWT signing key on schedule"),
                        Err(e) => tracing::warn!(error = %e, "scheduled signing-key rotation failed; retrying"),
                    }
                }
            }
            _ = expiring.tick() => {
                if let Err(e) = webhooks::sweep_expiring(&state).await {
                    tracing::warn!(error = %e, "looking for keys about to expire failed; retrying in an hour");
                }
            }
            _ = retention.tick() => {
                // Finished deliveries and their events are kept 30 days.
                if let Err(e) = state.store.expire_events(state.now() - 30 * 86_400_000).await {
                    tracing::warn!(error = %e, "expiring old webhook deliveries failed; retrying later");
                }
                if let Err(e) = state.store.expire_tokens(state.now()).await {
                    tracing::warn!(error = %e, "expiring old tokens failed; retrying later");
                }
                match state.expire_usage(state.now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "expired old usage buckets"),
                    Err(e) => tracing::warn!(error = %e, "usage retention failed; retrying later"),
                }
            }
        }
    }
}

/// The audit record (and `signing_key.rotated` event) of a rotation on schedule.
fn scheduled_rotation_audit(now: i64) -> Option<keygate_store::NewAudit> {
    Some(keygate_store::NewAudit {
        id: keygate_core::id::new_id("evt", now).ok()?,
        at: now,
        actor: "system".into(),
        action: "signing_key.rotate".into(),
        target_type: "signing_key".into(),
        target_id: "scheduled".into(),
        ip: None,
        details: serde_json::json!({"scheduled": true}),
    })
}

async fn final_flush(state: &AppState) {
    if state.store.shared() {
        match state.verifier.runtimes.return_leases(state.store.as_ref()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(units = n, "gave unused quota leases back to the shared pool"),
            Err(e) => {
                tracing::warn!(error = %e, "could not give quota leases back; they are lost until the next refill")
            }
        }
    }
    for attempt in 1..=5u64 {
        match state.flush().await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, attempt, "final usage flush failed");
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    tracing::error!("usage since the last successful flush could not be written");
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn json_of(resp: Response) -> (u16, serde_json::Value, Option<String>) {
        let status = resp.status().as_u16();
        let cache = resp.headers().get("cache-control").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.expect("a body");
        (status, serde_json::from_slice(&body).expect("JSON"), cache)
    }

    /// Through the router's own layers: a handler that panics is answered in its endpoint's shape, and
    /// counted.
    #[tokio::test]
    async fn a_panic_answers_in_the_shape_of_its_endpoint() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
        let state = AppState::new(open_store(&config).await.expect("a store"), config);
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let routes = axum::Router::new()
            .route("/oauth2/token", axum::routing::post(boom))
            .route("/v1/boom", axum::routing::get(boom));
        let app = with_layers(routes, state.clone());
        let call = |method: &str, path: &str| {
            let req = Request::builder().method(method).uri(path).body(axum::body::Body::empty());
            app.clone().oneshot(req.expect("a request"))
        };
        let (status, body, _) = json_of(call("GET", "/v1/boom").await.expect("an answer")).await;
        assert_eq!((status, body["code"].as_str()), (500, Some("internal")));
        let (status, body, cache) = json_of(call("POST", "/oauth2/token").await.expect("an answer")).await;
        assert_eq!((status, body["error"].as_str()), (500, Some("server_error")));
        assert_eq!(cache.as_deref(), Some("no-store"));
        let metrics = state.metrics.render();
        for line in [
            r#"keygate_http_requests_total{method="GET",route="/v1/boom",status="500"} 1"#,
            r#"keygate_http_requests_total{method="POST",route="/oauth2/token",status="500"} 1"#,
        ] {
            assert!(metrics.contains(line), "{line}\n{metrics}");
        }
    }

    #[test]
    fn oauth_endpoints_for_programs_speak_rfc6749_and_browser_pages_do_not() {
        for path in [
            "/oauth2/token",
            "/oauth2/introspect",
            "/oauth2/revoke",
            "/oauth2/device_authorization",
            "/oauth2/register",
            "/oauth2/register/cl_1",
        ] {
            assert!(oauth::speaks_rfc6749(path), "{path}");
        }
        for path in [
            "/oauth2/authorize",
            "/oauth2/authorize/login",
            "/oauth2/device",
            "/oauth2/",
            "/v1/verify",
            "/oauth2",
        ] {
            assert!(!oauth::speaks_rfc6749(path), "{path}");
        }
    }
}
