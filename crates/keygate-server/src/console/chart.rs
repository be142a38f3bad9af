//! Charts for the console, rendered on the server as SVG: no script, nothing downloaded, readable by a
//! test (every bar carries its data) and by a screen reader (a summary label and a table beside it).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::time::{parse_rfc3339, rfc3339};

/// Colour of each decision code's bars (one palette, readable on white); unknown codes are grey.
pub fn colour(code: &str) -> &'static str {
    match code {
        "VALID" => "#2e7d32",
        "NOT_FOUND" => "#c62828",
        "RATE_LIMITED" => "#ef6c00",
        "QUOTA_EXCEEDED" => "#6a1b9a",
        "REVOKED" => "#37474f",
        "DISABLED" => "#795548",
        "EXPIRED" => "#00838f",
        "INSUFFICIENT_SCOPE" => "#1565c0",
        "IP_NOT_ALLOWED" => "#ad1457",
        "MALFORMED" => "#9e9d24",
        _ => "#757575",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One series of a chart: the counts per code of each bucket, oldest first, with every bucket of the
/// range present (empty ones too).
pub struct Series {
    pub starts: Vec<i64>,
    pub counts: Vec<BTreeMap<String, i64>>,
    pub totals: BTreeMap<String, i64>,
    pub step_ms: i64,
}

/// The buckets of a usage report (`UsageReport` JSON), filled out to the whole range.
pub fn series(report: &Value) -> Series {
    let step_ms = match report["granularity"].as_str() {
        Some("minute") => 60_000,
        Some("day") => 86_400_000,
        _ => 3_600_000,
    };
    let from = report["from"].as_str().and_then(parse_rfc3339).unwrap_or(0);
    let to = report["to"].as_str().and_then(parse_rfc3339).unwrap_or(from);
    let first = from - from.rem_euclid(step_ms);
    // At most a few hundred slots: the console asks for 60 minutes, 24 or 168 hours, or 30 days.
    let slots = ((to - first + step_ms - 1) / step_ms).clamp(0, 1000) as usize;
    let starts: Vec<i64> = (0..slots).map(|i| first + i as i64 * step_ms).collect();
    let mut counts = vec![BTreeMap::new(); slots];
    for b in report["buckets"].as_array().into_iter().flatten() {
        let Some(start) = b["start"].as_str().and_then(parse_rfc3339) else { continue };
        let i = (start - first) / step_ms;
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| counts.get_mut(i)) {
            for (code, n) in b["codes"].as_object().into_iter().flatten() {
                *slot.entry(code.clone()).or_insert(0) += n.as_i64().unwrap_or(0);
            }
        }
    }
    let mut totals = BTreeMap::new();
    for (code, n) in report["codes"].as_object().into_iter().flatten() {
        totals.insert(code.clone(), n.as_i64().unwrap_or(0));
    }
    Series { starts, counts, totals, step_ms }
}

/// A stacked bar chart of a series: one column per bucket, one bar per code. Every bar is a `rect`
/// with `data-code`, `data-start` and `data-count`; the `svg` has `data-total`.
pub fn stacked(s: &Series, label: &str) -> String {
    const W: f64 = 720.0;
    const H: f64 = 200.0;
    const PAD: f64 = 24.0;
    let max = s.counts.iter().map(|c| c.values().sum::<i64>()).max().unwrap_or(0).max(1);
    let total: i64 = s.totals.values().sum();
    let n = s.starts.len().max(1) as f64;
    let col = (W - PAD) / n;
    let mut out = String::new();
    let summary = if total == 0 {
        format!("{label}: no verifications in this range")
    } else {
        let parts: Vec<String> = s.totals.iter().map(|(c, n)| format!("{n} {c}")).collect();
        format!("{label}: {total} verifications ({})", parts.join(", "))
    };
    let _ = write!(
        out,
        r#"<svg class="chart" data-chart="usage" data-total="{total}" viewBox="0 0 {W} {h}" role="img" aria-label="{}" preserveAspectRatio="none">"#,
        escape(&summary),
        h = H + PAD,
    );
    // Axis and the top value.
    let _ = write!(
        out,
        r##"<line x1="{PAD}" y1="{H}" x2="{W}" y2="{H}" stroke="#8a939e"/><text x="0" y="12" font-size="11" fill="#56606b">{max}</text><text x="0" y="{H}" font-size="11" fill="#56606b">0</text>"##
    );
    for (i, (start, codes)) in s.starts.iter().zip(&s.counts).enumerate() {
        let x = PAD + i as f64 * col;
        let mut y = H;
        for (code, n) in codes {
            if *n <= 0 {
                continue;
            }
            let h = (*n as f64 / max as f64) * (H - 16.0);
            y -= h;
            let when = rfc3339(*start);
            let _ = write!(
                out,
                r#"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{fill}" data-code="{c}" data-start="{when}" data-count="{n}"><title>{when}: {n} {c}</title></rect>"#,
                w = (col * 0.85).max(0.5),
                fill = colour(code),
                c = escape(code),
            );
        }
    }
    if let (Some(first), Some(last)) = (s.starts.first(), s.starts.last()) {
        let fmt = |t: i64| {
            let s = rfc3339(t);
            if s.len() >= 16 { s[..16].replace('T', " ") } else { s }
        };
        let _ = write!(
            out,
            r##"<text x="{PAD}" y="{y}" font-size="11" fill="#56606b">{}</text><text x="{W}" y="{y}" font-size="11" fill="#56606b" text-anchor="end">{}</text>"##,
            fmt(*first),
            fmt(*last + s.step_ms),
            y = H + 16.0,
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use super::*;
    use serde_json::json;

    #[test]
    fn every_bucket_of_the_range_is_a_column_and_every_count_a_bar() {
        let report = json!({
            "granularity": "minute", "from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:10:00Z",
            "total": 5, "codes": {"VALID": 3, "NOT_FOUND": 2},
            "buckets": [
                {"start": "2026-01-01T00:02:00Z", "total": 3, "codes": {"VALID": 2, "NOT_FOUND": 1}},
                {"start": "2026-01-01T00:09:00Z", "total": 2, "codes": {"VALID": 1, "NOT_FOUND": 1}},
            ],
        });
        let s = series(&report);
        assert_eq!(s.starts.len(), 10);
        assert_eq!(s.counts[2]["VALID"], 2);
        assert_eq!(s.counts[9]["NOT_FOUND"], 1);
        let svg = stacked(&s, "Verifications");
        assert!(svg.contains(r#"data-total="5""#));
        assert_eq!(svg.matches("<rect").count(), 4);
        assert!(svg.contains(r#"data-code="VALID" data-start="2026-01-01T00:02:00.000Z" data-count="2""#));
        assert!(svg.contains("aria-label=\"Verifications: 5 verifications (2 NOT_FOUND, 3 VALID)\""));
    }

    #[test]
    fn labels_are_escaped() {
        let report = json!({"granularity": "hour", "from": "2026-01-01T00:00:00Z", "to": "2026-01-01T01:00:00Z",
            "codes": {"<x>": 1}, "buckets": [{"start": "2026-01-01T00:00:00Z", "codes": {"<x>": 1}}]});
        let svg = stacked(&series(&report), "a\"b");
        assert!(!svg.contains("<x>"));
        assert!(svg.contains("&lt;x&gt;"));
        assert!(svg.contains("a&quot;b"));
    }
}
