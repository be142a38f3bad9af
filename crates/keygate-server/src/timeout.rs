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
use crate::oauth::{OAuthError, OAuthErrorCode};

/// Answers 503 when the inner service takes longer than the limit (see [`timed_out`]).
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
        let oauth = crate::oauth::speaks_rfc6749(req.uri().path());
        TimeoutFuture::new(self.inner.call(req), Instant::now() + self.limit, oauth)
    }
}

impl<F> TimeoutFuture<F> {
    /// `inner`, answered 503 if it is still waiting at `deadline` (see [`timed_out`]).
    pub(crate) fn new(inner: F, deadline: Instant, oauth: bool) -> Self {
        TimeoutFuture { inner, deadline, oauth, sleep: None }
    }
}

pin_project_lite::pin_project! {
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        deadline: Instant,
        oauth: bool,
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
            return Poll::Ready(Ok(timed_out(*this.oauth)));
        }
        Poll::Pending
    }
}

/// The answer to a request cut off at `request_timeout_seconds`: 503 `request_timeout`, or on an OAuth
/// endpoint (`oauth`, see [`crate::oauth::speaks_rfc6749`]) 503 `temporarily_unavailable` in RFC 6749's
/// shape.
pub(crate) fn timed_out(oauth: bool) -> Response {
    const MESSAGE: &str = "the request took longer than request_timeout_seconds (usually a slow database); \
         a change may or may not have been made: check before retrying it";
    if oauth {
        OAuthError::new(OAuthErrorCode::TemporarilyUnavailable, MESSAGE).into_response()
    } else {
        ApiError::new(ErrorCode::RequestTimeout, MESSAGE).into_response()
    }
}

/// One connection's request timer: the time limit of each of its requests, one tokio timer moved
/// forward per request instead of a new one per request that waits (a POST's handler waits once for
/// its body even when it came with the headers). Moving a registered timer later is one atomic update;
/// a new one is an insertion into and a removal from the runtime's timer wheel.
#[derive(Default)]
pub(crate) struct ConnRequestTimer(std::sync::Mutex<Option<Pin<Box<Sleep>>>>);

pin_project_lite::pin_project! {
    /// `inner`'s output, or `None` if it is still waiting at `deadline`, on the connection's
    /// [`ConnRequestTimer`]. Requests on one HTTP/1 connection run one at a time.
    pub(crate) struct OnConnTimer<'a, F> {
        #[pin]
        inner: F,
        deadline: Instant,
        timer: &'a ConnRequestTimer,
    }
}

impl<'a, F> OnConnTimer<'a, F> {
    pub(crate) fn new(inner: F, deadline: Instant, timer: &'a ConnRequestTimer) -> Self {
        OnConnTimer { inner, deadline, timer }
    }
}

impl<F: Future> Future for OnConnTimer<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let this = self.project();
        if let Poll::Ready(r) = this.inner.poll(cx) {
            return Poll::Ready(Some(r));
        }
        let mut slot = this.timer.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*this.deadline)));
        if sleep.deadline() != *this.deadline {
            sleep.as_mut().reset(*this.deadline);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
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
