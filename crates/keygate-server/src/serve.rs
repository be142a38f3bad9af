//! Serving a router on a listener, with hyper's HTTP/1 connection directly (axum's `serve` sets no
//! timer, so it cannot bound how long a client takes to send its headers):
//! - a client must send a request's headers within `request_timeout_seconds`, or the connection is
//!   closed (slow clients cannot hold connections open by trickling bytes);
//! - `TCP_NODELAY` on every connection; keep-alive;
//! - on shutdown, no new connections; idle ones close, in-flight requests finish, and whatever still runs
//!   after the grace period is abandoned (a response streaming forever does not stop the process).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// How a listener serves.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Longest time to receive a request's headers.
    pub header_read_timeout: Duration,
    /// Longest wait for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

/// Resolves when `stop` is (or turns) true; never if its sender is gone without saying so.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

struct Active {
    count: AtomicUsize,
    idle: Notify,
    stop: StopSignal,
}

/// The stop signal as the open connections wait for it. A connection's task is polled several times a
/// request, and the stop signal with it: a `watch` receiver takes its channel's lock (shared by every
/// connection) on each of those polls; this reads a flag, and takes its lock once per connection to
/// register the task's waker.
#[derive(Default)]
struct StopSignal {
    stopping: AtomicBool,
    next: AtomicU64,
    waiters: Mutex<HashMap<u64, Waker>>,
}

impl StopSignal {
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let waiters =
            std::mem::take(&mut *self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for w in waiters.into_values() {
            w.wake();
        }
    }
}

/// One connection's wait for [`StopSignal`].
struct StopWait {
    active: Arc<Active>,
    id: u64,
    registered: Option<Waker>,
}

impl StopWait {
    fn new(active: Arc<Active>) -> Self {
        let id = active.stop.next.fetch_add(1, Ordering::Relaxed);
        StopWait { active, id, registered: None }
    }
}

impl std::future::Future for StopWait {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let signal = &self.active.stop;
        if signal.stopping.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        signal
            .waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(self.id, cx.waker().clone());
        // Registered (so that dropping this removes it), whatever happens next.
        self.registered = Some(cx.waker().clone());
        // `stop` sets the flag before it takes the waiters: a stop that took them before this insert is
        // seen here.
        if self.active.stop.stopping.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for StopWait {
    fn drop(&mut self) {
        if self.registered.is_some() {
            self.active
                .stop
                .waiters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

/// One open connection; dropping it counts it down.
struct Leaving(Arc<Active>);

impl Drop for Leaving {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// hyper's timer for one connection's header-read timeout: one tokio timer for the connection, moved
/// forward for each request, instead of a new one per request. hyper asks for a fresh sleep before each
/// request head; a new tokio timer is an insertion into and a removal from the runtime's shared timer
/// wheel (under its lock) per request, while moving a registered timer later is one atomic update (the
/// wheel re-files it when its old deadline passes). Measured in docs/BENCHMARKS.md.
#[derive(Clone)]
struct ConnTimer(Arc<std::sync::Mutex<std::pin::Pin<Box<tokio::time::Sleep>>>>);

impl ConnTimer {
    fn new(first: Duration) -> Self {
        ConnTimer(Arc::new(std::sync::Mutex::new(Box::pin(tokio::time::sleep(first)))))
    }
}

/// One wait on the connection's timer, until `deadline`.
struct ConnSleep {
    timer: ConnTimer,
    deadline: tokio::time::Instant,
}

impl std::future::Future for ConnSleep {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let mut sleep = self.timer.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if sleep.deadline() != self.deadline {
            sleep.as_mut().reset(self.deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for ConnSleep {}

impl hyper::rt::Timer for ConnTimer {
    /// tokio's clock, which the sleeps run on (it can be paused in tests).
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(hyper::rt::Timer::now(self) + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(ConnSleep { timer: self.clone(), deadline: deadline.into() })
    }
}

/// Serves `app` on `listener` until `stop` turns true, then drains as [`ServeOptions`] says.
pub async fn serve(
    listener: TcpListener,
    app: crate::hot::Served,
    mut stop: watch::Receiver<bool>,
    options: ServeOptions,
) -> std::io::Result<()> {
    let active =
        Arc::new(Active { count: AtomicUsize::new(0), idle: Notify::new(), stop: StopSignal::default() });
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stopped(&mut stop) => break,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                use std::io::ErrorKind::{
                    ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted,
                };
                // A connection that went away before it was accepted: take the next. Anything else (out of
                // file descriptors): wait a moment rather than spin.
                if !matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted)
                {
                    tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // The connection's own handle on the service: cloned for each of its requests without touching
        // a reference count that every connection shares.
        let app = Arc::new(app.for_connection(addr));
        let mut stop = StopWait::new(active.clone());
        active.count.fetch_add(1, Ordering::SeqCst);
        // Counts the connection down however its task ends, a panic included.
        let guard = Leaving(active.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.call(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(ConnTimer::new(options.header_read_timeout))
                .header_read_timeout(options.header_read_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                biased;
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    active.stop.stop();
    let drained = async {
        loop {
            let idle = active.idle.notified();
            if active.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    };
    if tokio::time::timeout(options.shutdown_grace, drained).await.is_err() {
        tracing::warn!(
            connections = active.count.load(Ordering::SeqCst),
            "requests still running after the shutdown grace period were abandoned"
        );
    }
    Ok(())
}
