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
        let route = hot_route(req.method(), req.uri().path())?;
        let service = match route {
            "/v1/verify" => &self.verify,
            "/oauth2/token" => &self.token,
            "/oauth2/introspect" => &self.introspect,
            "/v1/auth" => &self.auth,
            _ => &self.auth_path,
        };
        Some((route, service))
    }
}

/// The route template of a hot route, exactly as the router would match it (the raw path; a
/// catch-all needs at least one character), or None for the router.
fn hot_route(method: &Method, path: &str) -> Option<&'static str> {
    match *method {
        Method::POST if path == "/v1/verify" => Some("/v1/verify"),
        Method::POST if path == "/oauth2/token" => Some("/oauth2/token"),
        Method::POST if path == "/oauth2/introspect" => Some("/oauth2/introspect"),
        Method::GET if path == "/v1/auth" => Some("/v1/auth"),
        Method::GET if path.len() > "/v1/auth/".len() && path.starts_with("/v1/auth/") => {
            Some("/v1/auth/{*path}")
        }
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::hot_route;
    use axum::http::Method;

    #[test]
    fn only_the_hot_routes_skip_the_router() {
        for (method, path, want) in [
            (Method::POST, "/v1/verify", Some("/v1/verify")),
            (Method::GET, "/v1/auth", Some("/v1/auth")),
            (Method::GET, "/v1/auth/orders/17", Some("/v1/auth/{*path}")),
            (Method::GET, "/v1/auth/x", Some("/v1/auth/{*path}")),
            (Method::POST, "/oauth2/token", Some("/oauth2/token")),
            (Method::POST, "/oauth2/introspect", Some("/oauth2/introspect")),
            (Method::GET, "/v1/auth/", None),
            (Method::HEAD, "/v1/auth", None),
            (Method::POST, "/v1/auth", None),
            (Method::GET, "/v1/verify", None),
            (Method::PUT, "/v1/verify", None),
            (Method::POST, "/v1/verify/", None),
            (Method::POST, "/v1/verifyx", None),
            (Method::GET, "/v1/authx", None),
            (Method::POST, "/V1/verify", None),
            (Method::POST, "/oauth2/token/", None),
            (Method::GET, "/oauth2/token", None),
            (Method::POST, "/v1/keys", None),
        ] {
            assert_eq!(hot_route(&method, path), want, "{method} {path}");
        }
    }
}
