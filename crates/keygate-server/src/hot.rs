//! The hot routes — `POST /v1/verify`, `GET /v1/auth`, `GET /v1/auth/{*path}`, `POST /oauth2/token` and
//! `POST /oauth2/introspect` — served before the router on the public surface.
//!
//! They are the same handlers with the same extractors, body limit, time limit, panic guard, metrics
//! and access log as through the router; what is skipped is the router's per-request work (path
//! matching, the matched-path extension, the boxed middleware chain), measured at several
//! microseconds of a cached verify's 16–20 (docs/BENCHMARKS.md). The routes stay registered in the
//! router too, for the OpenAPI document and for everything the match below does not take (HEAD, other
//! methods → 405, a bare `/v1/auth/` → 404).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::Method;
use axum::response::Response;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;

use crate::routes::verify::{forward_auth, forward_auth_path, verify};
use crate::state::AppState;

type Hot = BoxCloneSyncService<Request, Response, Infallible>;

/// The services of the hot routes, each built once.
pub struct HotRoutes {
    state: Arc<AppState>,
    verify: Hot,
    auth: Hot,
    auth_path: Hot,
    token: Hot,
    introspect: Hot,
}

impl HotRoutes {
    pub fn new(state: Arc<AppState>) -> Self {
        fn stack<H, T>(handler: H, state: &Arc<AppState>) -> Hot
        where
            H: Handler<T, Arc<AppState>> + Clone + Send + Sync + 'static,
            T: 'static,
        {
            BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .map_response(|r: Response<_>| r.map(Body::new))
                    .layer(CatchPanicLayer::custom(crate::panic_response))
                    .layer(crate::timeout::RequestTimeoutLayer(state.config.request_timeout))
                    .layer(DefaultBodyLimit::max(state.config.body_limit))
                    .service(handler.with_state(state.clone())),
            )
        }
        HotRoutes {
            verify: stack(verify, &state),
            auth: stack(forward_auth, &state),
            auth_path: stack(forward_auth_path, &state),
            token: stack(crate::oauth::token, &state),
            introspect: stack(crate::oauth::introspect, &state),
            state,
        }
    }

    /// The hot route a request is for, with its route template (the metrics label), if any.
    fn pick(&self, req: &Request) -> Option<(&'static str, &Hot)> {
        let path = req.uri().path();
        match *req.method() {
            Method::POST if path == "/v1/verify" => Some(("/v1/verify", &self.verify)),
            Method::POST if path == "/oauth2/token" => Some(("/oauth2/token", &self.token)),
            Method::POST if path == "/oauth2/introspect" => Some(("/oauth2/introspect", &self.introspect)),
            Method::GET if path == "/v1/auth" => Some(("/v1/auth", &self.auth)),
            Method::GET if path.len() > "/v1/auth/".len() && path.starts_with("/v1/auth/") => {
                Some(("/v1/auth/{*path}", &self.auth_path))
            }
            _ => None,
        }
    }
}

/// A listener's service: the router, and on the public surface the hot routes before it.
#[derive(Clone)]
pub struct Served {
    router: axum::Router,
    hot: Option<Arc<HotRoutes>>,
}

impl Served {
    /// Everything through the router (the admin surface, the gateway).
    pub fn router(router: axum::Router) -> Self {
        Served { router, hot: None }
    }

    /// The hot routes first, then the router.
    pub fn with_hot_routes(router: axum::Router, state: Arc<AppState>) -> Self {
        Served { router, hot: Some(Arc::new(HotRoutes::new(state))) }
    }

    pub async fn call(self, req: Request) -> Response {
        if let Some(hot) = &self.hot
            && let Some((route, service)) = hot.pick(&req)
        {
            let started = Instant::now();
            let method = crate::metrics::method_label(req.method());
            let resp = service.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
            crate::record_request(&hot.state, method, route, resp.status().as_u16(), started);
            return resp;
        }
        self.router.oneshot(req).await.unwrap_or_else(|e| match e {})
    }
}
