//! Prometheus metrics, kept per server instance (no global recorder), so that several servers in one
//! process — as in the tests — do not mix their numbers.
//!
//! Labels never carry secrets, ids or anything a client can vary at will: decision codes, route templates
//! (or `unmatched`), standard methods (or `other`), status codes and token formats. Every label set is
//! bounded by the code, not by the traffic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use keygate_core::DecisionCode;
use metrics::{Counter, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// How many hot routes [`Metrics::record_hot_request`] keeps series for by index.
pub const HOT_ROUTES: usize = 5;

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

/// Stripes of a per-request counter.
const STRIPES: usize = 8;

#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// A counter bumped on every request: each thread adds to its own stripe (its own cache line), so the
/// cores do not take one line from each other on every request; read by adding the stripes up.
#[derive(Default)]
pub(crate) struct Striped([Padded; STRIPES]);

impl Striped {
    fn add(&self, n: u64) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
        }
        let i = MINE.with(|i| *i);
        if let Some(p) = self.0.get(i) {
            p.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

/// A counted series: the stripes, and the exporter's counter they are published to when rendered.
struct Series {
    count: Striped,
    exported: Counter,
}

impl Series {
    fn publish(&self) {
        self.exported.absolute(self.count.sum());
    }
}

/// route → (method, status, series); a handful of entries per route.
type RequestCounters = HashMap<String, Vec<(&'static str, u16, Arc<Series>)>>;

/// Statuses a hot route's series are kept for without a lookup (hyper's are three digits).
const STATUSES: usize = 1000;

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    decisions: Vec<Series>,
    /// Verify latencies per bucket of `VERIFY_BUCKETS` (the last: above them all), rendered as the
    /// `keygate_verify_duration_seconds` histogram and read for the console's percentiles.
    verify_buckets: [Striped; VERIFY_BUCKETS.len() + 1],
    verify_nanos: Striped,
    tokens_issued: AtomicU64,
    requests: RwLock<RequestCounters>,
    /// The series of the hot routes by (route, status), filled from `requests` on first use.
    hot: Box<[OnceLock<Arc<Series>>]>,
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
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let decisions = DecisionCode::ALL
            .iter()
            .map(|c| {
                let key =
                    Key::from_parts("keygate_verify_decisions_total", vec![Label::new("code", c.as_str())]);
                Series { count: Striped::default(), exported: recorder.register_counter(&key, &METADATA) }
            })
            .collect();
        Metrics {
            recorder,
            handle,
            decisions,
            verify_buckets: std::array::from_fn(|_| Striped::default()),
            verify_nanos: Striped::default(),
            tokens_issued: AtomicU64::new(0),
            requests: RwLock::default(),
            hot: (0..HOT_ROUTES * STATUSES).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn record_decision(&self, code: DecisionCode, elapsed: std::time::Duration) {
        if let Some(c) = self.decisions.get(code.index()) {
            c.count.add(1);
        }
        let seconds = elapsed.as_secs_f64();
        let i = VERIFY_BUCKETS.partition_point(|b| *b < seconds);
        if let Some(b) = self.verify_buckets.get(i) {
            b.add(1);
        }
        self.verify_nanos.add(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Verify latency percentiles on this node since it started, by bucket.
    pub fn verify_latency(&self) -> LatencySummary {
        let counts: Vec<u64> = self.verify_buckets.iter().map(Striped::sum).collect();
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

    /// Counts a request. The series of each (route, method, status) is registered once and then found
    /// under a read lock without allocating.
    pub fn record_request(&self, method: &'static str, route: &str, status: u16) {
        self.series(method, route, status).count.add(1);
    }

    /// Counts a request on hot route number `index` (below [`HOT_ROUTES`]), always with the same
    /// `method` and `route`: found by index, without a lock.
    pub fn record_hot_request(&self, index: usize, method: &'static str, route: &str, status: u16) {
        let status_index = usize::from(status);
        let slot = (index < HOT_ROUTES && status_index < STATUSES).then(|| index * STATUSES + status_index);
        match slot.and_then(|i| self.hot.get(i)) {
            Some(cell) => cell.get_or_init(|| self.series(method, route, status)).count.add(1),
            None => self.record_request(method, route, status),
        }
    }

    fn series(&self, method: &'static str, route: &str, status: u16) -> Arc<Series> {
        {
            let routes = self.requests.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, _, c)) =
                routes.get(route).and_then(|v| v.iter().find(|(m, s, _)| *s == status && *m == method))
            {
                return c.clone();
            }
        }
        let mut routes = self.requests.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entries = routes.entry(route.to_owned()).or_default();
        if let Some((_, _, c)) = entries.iter().find(|(m, s, _)| *s == status && *m == method) {
            return c.clone();
        }
        let key = Key::from_parts(
            "keygate_http_requests_total",
            vec![
                Label::new("method", method),
                Label::new("route", route.to_owned()),
                Label::new("status", status.to_string()),
            ],
        );
        let series = Arc::new(Series {
            count: Striped::default(),
            exported: self.recorder.register_counter(&key, &METADATA),
        });
        entries.push((method, status, series.clone()));
        series
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
        for d in &self.decisions {
            d.publish();
        }
        for entries in self.requests.read().unwrap_or_else(std::sync::PoisonError::into_inner).values() {
            for (_, _, series) in entries {
                series.publish();
            }
        }
        let mut out = self.handle.render();
        self.render_verify_histogram(&mut out);
        out
    }

    fn render_verify_histogram(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "keygate_verify_duration_seconds";
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.verify_buckets.iter().enumerate() {
            cumulative += bucket.sum();
            match VERIFY_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", self.verify_nanos.sum() as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cumulative}");
        out.push('\n');
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
