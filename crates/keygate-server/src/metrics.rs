//! Prometheus metrics, kept per server instance (no global recorder), so that several servers in one
//! process — as in the tests — do not mix their numbers.
//!
//! Labels never carry secrets or ids: only decision codes, route templates, methods and statuses.

use keygate_core::DecisionCode;
use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const VERIFY_BUCKETS: &[f64] =
    &[0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25];

static METADATA: Metadata<'static> = Metadata::new("keygate", Level::INFO, Some("keygate_server"));

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    decisions: Vec<Counter>,
    verify_seconds: Histogram,
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
        Metrics { recorder, handle, decisions, verify_seconds }
    }

    pub fn record_decision(&self, code: DecisionCode, seconds: f64) {
        if let Some(c) = self.decisions.get(code.index()) {
            c.increment(1);
        }
        self.verify_seconds.record(seconds);
    }

    pub fn record_request(&self, method: &str, route: &str, status: u16) {
        let key = Key::from_parts(
            "keygate_http_requests_total",
            vec![
                Label::new("method", method.to_owned()),
                Label::new("route", route.to_owned()),
                Label::new("status", status.to_string()),
            ],
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
