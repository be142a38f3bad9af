//! The hot routes — `POST /v1/verify`, `GET /v1/auth`, `GET /v1/auth/{*path}`, `POST /oauth2/token` and
//! `POST /oauth2/introspect` — served before the router on the public surface.
//!
//! They are the same handlers with the same extractors, body limit, time limit, panic guard, metrics
//! and access log as through the router; what is skipped is the router's per-request work (path
//! matching, the matched-path extension, the boxed middleware chain), measured at several
//! microseconds of a cached verify's 16–20 (docs/BENCHMARKS.md). The routes stay registered in the
//! router too, for the OpenAPI document and for everything the match below does not take (HEAD, other
//! methods → 405, a bare `/v1/auth/` → 404).

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::handler::Handler;
use axum::http::Method;
use axum::response::Response;
use futures_util::FutureExt;
use tower::{Layer, ServiceExt};

use crate::routes::verify::{forward_auth, forward_auth_path, verify};
use crate::state::AppState;
use crate::timeout::{ConnRequestTimer, OnConnTimer};

/// The hot routes of one server, with what each request through them needs.
pub struct HotRoutes {
    state: Arc<AppState>,
    body_limit: usize,
    timeout: Duration,
}

/// A hot route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hot {
    Verify,
    Auth,
    AuthPath,
    Token,
    Introspect,
}

impl Hot {
    /// Its number among the hot routes, below [`crate::metrics::HOT_ROUTES`].
    fn index(self) -> usize {
        self as usize
    }

    /// The route template, as the router names it (the metrics and access-log label).
    fn template(self) -> &'static str {
        match self {
            Hot::Verify => "/v1/verify",
            Hot::Auth => "/v1/auth",
            Hot::AuthPath => "/v1/auth/{*path}",
            Hot::Token => "/oauth2/token",
            Hot::Introspect => "/oauth2/introspect",
        }
    }

    /// Whether it answers in RFC 6749's error shape (see [`crate::oauth::speaks_rfc6749`]).
    fn oauth(self) -> bool {
        crate::oauth::speaks_rfc6749(self.template())
    }
}

impl HotRoutes {
    pub fn new(state: Arc<AppState>) -> Self {
        HotRoutes { body_limit: state.config.body_limit, timeout: state.config.request_timeout, state }
    }

    /// `handler` with the router's per-route stack, unboxed: the body limit, the time limit (counted
    /// from `started`, when the request arrived) and the panic guard.
    async fn run<H, T>(
        &self,
        handler: H,
        req: Request,
        started: Instant,
        timer: &ConnRequestTimer,
        oauth: bool,
    ) -> Response
    where
        H: Handler<T, Arc<AppState>>,
        T: 'static,
    {
        let service = DefaultBodyLimit::max(self.body_limit).layer(handler.with_state(self.state.clone()));
        let deadline = tokio::time::Instant::from_std(started) + self.timeout;
        let handled = service.oneshot(req).map(|r| r.unwrap_or_else(|never| match never {}));
        match AssertUnwindSafe(OnConnTimer::new(handled, deadline, timer)).catch_unwind().await {
            Ok(Some(resp)) => resp,
            Ok(None) => crate::timeout::timed_out(oauth),
            Err(panic) => crate::panic_response(panic, oauth),
        }
    }

    async fn serve(&self, route: Hot, req: Request, started: Instant, timer: &ConnRequestTimer) -> Response {
        match route {
            Hot::Verify => self.run(verify, req, started, timer, route.oauth()).await,
            Hot::Auth => self.run(forward_auth, req, started, timer, route.oauth()).await,
            Hot::AuthPath => self.run(forward_auth_path, req, started, timer, route.oauth()).await,
            Hot::Token => self.run(crate::oauth::token, req, started, timer, route.oauth()).await,
            Hot::Introspect => self.run(crate::oauth::introspect, req, started, timer, route.oauth()).await,
        }
    }
}

// Every hot route has its row of metrics series.
const _: () = assert!(Hot::Introspect as usize + 1 == crate::metrics::HOT_ROUTES);

/// The hot route a request is for, exactly as the router would match it (the raw path; a catch-all
/// needs at least one character), or None for the router.
fn hot_route(method: &Method, path: &str) -> Option<Hot> {
    match *method {
        Method::POST if path == "/v1/verify" => Some(Hot::Verify),
        Method::POST if path == "/oauth2/token" => Some(Hot::Token),
        Method::POST if path == "/oauth2/introspect" => Some(Hot::Introspect),
        Method::GET if path == "/v1/auth" => Some(Hot::Auth),
        Method::GET if path.len() > "/v1/auth/".len() && path.starts_with("/v1/auth/") => Some(Hot::AuthPath),
        _ => None,
    }
}

/// What a listener serves.
#[derive(Clone)]
enum Kind {
    /// Everything through the router (the admin surface).
    Router(axum::Router),
    /// The hot routes first, then the router (the public surface).
    Hot(axum::Router, Arc<HotRoutes>),
    /// The gateway, called directly.
    Gateway(crate::gateway::GatewayState),
}

/// A listener's service, and the copy of it that serves one connection ([`Served::for_connection`]).
pub struct Served {
    kind: Kind,
    /// The connection's peer.
    peer: SocketAddr,
    /// The connection's request timer.
    timer: ConnRequestTimer,
}

impl Served {
    fn of(kind: Kind) -> Self {
        Served { kind, peer: SocketAddr::from(([0, 0, 0, 0], 0)), timer: ConnRequestTimer::default() }
    }

    /// Everything through the router (the admin surface).
    pub fn router(router: axum::Router) -> Self {
        Served::of(Kind::Router(router))
    }

    /// The hot routes first, then the router.
    pub fn with_hot_routes(router: axum::Router, state: Arc<AppState>) -> Self {
        Served::of(Kind::Hot(router, Arc::new(HotRoutes::new(state))))
    }

    /// The gateway.
    pub fn gateway(gateway: crate::gateway::GatewayState) -> Self {
        Served::of(Kind::Gateway(gateway))
    }

    /// The service for one connection from `peer`, with its own request timer.
    pub fn for_connection(&self, peer: SocketAddr) -> Self {
        Served { kind: self.kind.clone(), peer, timer: ConnRequestTimer::default() }
    }

    /// Serves one request; requests of one connection one at a time (HTTP/1).
    pub async fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Response {
        let mut req = req.map(Body::new);
        let (router, hot) = match &self.kind {
            Kind::Gateway(gateway) => return gateway.handle(self.peer, req, &self.timer).await,
            Kind::Router(router) => (router, None),
            Kind::Hot(router, hot) => (router, Some(hot)),
        };
        req.extensions_mut().insert(ConnectInfo(self.peer));
        if let Some(hot) = hot
            && let Some(route) = hot_route(req.method(), req.uri().path())
        {
            let started = Instant::now();
            let method = crate::metrics::method_label(req.method());
            let resp = hot.serve(route, req, started, &self.timer).await;
            let status = resp.status().as_u16();
            crate::record_hot_request(&hot.state, route.index(), method, route.template(), status, started);
            return resp;
        }
        router.clone().oneshot(req).await.unwrap_or_else(|e| match e {})
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
            assert_eq!(hot_route(&method, path).map(super::Hot::template), want, "{method} {path}");
        }
    }
}
