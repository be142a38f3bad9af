//! The per-request time limit (`request_timeout_seconds`), armed only when a request waits.
//!
//! tower-http's `TimeoutLayer` creates and registers a timer for every request before the handler
//! runs, and removes it afterwards: two operations on the runtime's shared timer wheel per request,
//! which measured as a fifth of the throughput of a cached verify on this project's 2-CPU machine
//! (docs/BENCHMARKS.md). Most requests (a cached verify, forward-auth, health) finish within their
//! first poll, so here the handler is polled first and the timer is made only if it has to wait; the
//! deadline still counts from when the request arrived.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Request;
use axum::response::{IntoResponse, Response};
use tokio::time::{Instant, Sleep};

use crate::error::{ApiError, ErrorCode};

/// Answers 503 `request_timeout` when the inner service takes longer than the limit.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeoutLayer(pub Duration);

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;
    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout { inner, limit: self.0 }
    }
}

#[derive(Debug, Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> tower::Service<Request<B>> for RequestTimeout<S>
where
    S: tower::Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        TimeoutFuture { inner: self.inner.call(req), deadline: Instant::now() + self.limit, sleep: None }
    }
}

pin_project_lite::pin_project! {
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        deadline: Instant,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<F, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(r) = this.inner.poll(cx) {
            return Poll::Ready(r);
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(tokio::time::sleep_until(*this.deadline)));
        }
        if let Some(sleep) = this.sleep.as_pin_mut()
            && sleep.poll(cx).is_ready()
        {
            return Poll::Ready(Ok(ApiError::new(
                ErrorCode::RequestTimeout,
                "the request took longer than request_timeout_seconds (usually a slow database); \
                 a change may or may not have been made: check before retrying it",
            )
            .into_response()));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    fn service(
        wait: Duration,
    ) -> impl tower::Service<Request<()>, Response = Response, Error = Infallible, Future: Send> + Clone {
        RequestTimeoutLayer(Duration::from_millis(200)).layer(tower::service_fn(
            move |_: Request<()>| async move {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok::<_, Infallible>("done".into_response())
            },
        ))
    }

    #[tokio::test]
    async fn answers_within_the_limit_and_503_after_it() {
        let fast = service(Duration::ZERO).oneshot(Request::new(())).await.unwrap_or_else(|e| match e {});
        assert_eq!(fast.status(), axum::http::StatusCode::OK);
        let waited =
            service(Duration::from_millis(20)).oneshot(Request::new(())).await.unwrap_or_else(|e| match e {});
        assert_eq!(waited.status(), axum::http::StatusCode::OK);
        let started = std::time::Instant::now();
        let slow =
            service(Duration::from_secs(30)).oneshot(Request::new(())).await.unwrap_or_else(|e| match e {});
        assert_eq!(slow.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_secs(10), "cut off at the limit, not after the handler");
        let body = axum::body::to_bytes(slow.into_body(), 4096).await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(body["code"], "request_timeout");
        assert_eq!(body["message"].as_str().map(|m| m.contains("request_timeout_seconds")), Some(true));
    }
}
