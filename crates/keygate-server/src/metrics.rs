//! Prometheus metrics, kept per server instance (no global recorder), so that several servers in one
//! process — as in the tests — do not mix their numbers.
//!
//! Labels never carry secrets, ids or anything a client can vary at will: decision codes, route templates
//! (or `unmatched`), standard methods (or `other`), status codes and token formats. Every label set is
//! bounded by the code, not by the traffic.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use keygate_core::DecisionCode;
use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

pub const VERIFY_BUCKETS: &[f64] =
    &[0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25];

static METADATA: Metadata<'static> = Metadata::new("keygate", Level::INFO, Some("keygate_server"));

/// The method as a metrics label: one of the standard methods, else `other`. Methods are chosen by the
/// client, and each distinct label value would be a new series kept forever.
pub fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// route → (method, status, counter); a handful of entries per route.
type RequestCounters = HashMap<String, Vec<(String, u16, Counter)>>;

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    decisions: Vec<Counter>,
    verify_seconds: Histogram,
    /// The same verify latencies, counted per bucket of `VERIFY_BUCKETS` (the last: above them all),
    /// for the console's percentiles.
    verify_buckets: [AtomicU64; VERIFY_BUCKETS.len() + 1],
    tokens_issued: AtomicU64,
    requests: RwLock<RequestCounters>,
}

/// Verify latency on this node since it started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    /// Upper bound in seconds of the bucket holding p50, p90 and p99 (`None`: above the largest bucket,
    /// or no verification yet).
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("keygate_verify_duration_seconds".into()), VERIFY_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let decisions = DecisionCode::ALL
            .iter()
            .map(|c| {
                let key =
                    Key::from_parts("keygate_verify_decisions_total", vec![Label::new("code", c.as_str())]);
                recorder.register_counter(&key, &METADATA)
            })
            .collect();
        let verify_seconds =
            recorder.register_histogram(&Key::from_static_name("keygate_verify_duration_seconds"), &METADATA);
        Metrics {
            recorder,
            handle,
            decisions,
            verify_seconds,
            verify_buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            tokens_issued: AtomicU64::new(0),
            requests: RwLock::default(),
        }
    }

    pub fn record_decision(&self, code: DecisionCode, seconds: f64) {
        if let Some(c) = self.decisions.get(code.index()) {
            c.increment(1);
        }
        self.verify_seconds.record(seconds);
        let i = VERIFY_BUCKETS.partition_point(|b| *b < seconds);
        if let Some(b) = self.verify_buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Verify latency percentiles on this node since it started, by bucket.
    pub fn verify_latency(&self) -> LatencySummary {
        let counts: Vec<u64> = self.verify_buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let count: u64 = counts.iter().sum();
        let at = |p: f64| -> Option<f64> {
            if count == 0 {
                return None;
            }
            let rank = ((count as f64) * p).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return VERIFY_BUCKETS.get(i).copied();
                }
            }
            None
        };
        LatencySummary { count, p50: at(0.5), p90: at(0.9), p99: at(0.99) }
    }

    /// Access tokens issued on this node since it started.
    pub fn tokens_issued(&self) -> u64 {
        self.tokens_issued.load(Ordering::Relaxed)
    }

    /// Counts a request. The counter handle of each (route, method, status) is registered once and
    /// then found under a read lock without allocating: this runs on every request.
    pub fn record_request(&self, method: &'static str, route: &str, status: u16) {
        {
            let routes = self.requests.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, _, c)) =
                routes.get(route).and_then(|v| v.iter().find(|(m, s, _)| *s == status && m == method))
            {
                c.increment(1);
                return;
            }
        }
        let key = Key::from_parts(
            "keygate_http_requests_total",
            vec![
                Label::new("method", method.to_owned()),
                Label::new("route", route.to_owned()),
                Label::new("status", status.to_string()),
            ],
        );
        let counter = self.recorder.register_counter(&key, &METADATA);
        counter.increment(1);
        let mut routes = self.requests.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        routes.entry(route.to_owned()).or_default().push((method.to_owned(), status, counter));
    }

    pub fn record_grant(&self, format: &'static str) {
        self.tokens_issued.fetch_add(1, Ordering::Relaxed);
        let key = Key::from_parts(
            "keygate_oauth_tokens_issued_total",
            vec![Label::new("format", format.to_owned())],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
