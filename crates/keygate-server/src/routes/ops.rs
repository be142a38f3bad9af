//! Operations: health, readiness, metrics, the OpenAPI document and its docs page.

use std::sync::Arc;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;

/// Health, on every listener.
pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(readyz))
}

/// Metrics, on the admin listener.
pub fn metrics_router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive")))]
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the database answers, and on a shared database the node hears the other nodes' changes.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready"), (status = 503, description = "database or change notifications unavailable")))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.store.ping().await {
        Ok(())
            if state.store.shared()
                && !state.cluster.listening.load(std::sync::atomic::Ordering::Acquire) =>
        {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "reason": "notifications"})),
            )
                .into_response()
        }
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "unavailable", "reason": "database"})))
                .into_response()
        }
    }
}

/// Prometheus metrics in text format. With `metrics_auth` on (the default when not listening on
/// loopback) the caller needs a credential with `keygate:metrics` (admin keys have it).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text"), (status = 401, description = "metrics_auth is on and no valid credential was sent")))]
pub async fn metrics(State(state): State<Arc<AppState>>, _: crate::auth::MetricsCaller) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], state.metrics.render())
        .into_response()
}
