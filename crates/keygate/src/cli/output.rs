//! Output for people, and for scripts (`--json`). Everything goes through [`emit`], which ends the
//! process quietly when standard output is closed (`keygate audit | head -1`).

use std::io::Write;

use serde_json::Value;

use super::args::{show_quota, show_rate_limit};
use super::http::Api;

/// Prints a line; a closed pipe ends the program quietly with success, as `head` expects.
pub fn emit(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// `--json`: the server's JSON; otherwise what `human` prints.
pub fn output(c: &Api, v: &Value, human: impl FnOnce(&Value)) {
    if c.json {
        emit(v);
    } else {
        human(v);
    }
}

pub fn items(v: &Value) -> &[Value] {
    v.get("items").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// A column: its heading and how to show a row's value.
pub type Column<'a> = (&'a str, &'a dyn Fn(&Value) -> String);

/// A field shown as [`cell`].
pub fn field(name: &str) -> impl Fn(&Value) -> String + '_ {
    move |r: &Value| cell(r.get(name).unwrap_or(&Value::Null))
}

pub fn table(rows: &[Value], columns: &[Column<'_>]) {
    if rows.is_empty() {
        emit("(none)");
        return;
    }
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|(_, f)| f(r)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| cells.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(h.len()))
        .collect();
    let line = |vals: Vec<&str>| {
        let parts: Vec<String> = vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        emit(parts.join("  ").trim_end());
    };
    line(columns.iter().map(|(h, _)| *h).collect());
    for r in &cells {
        line(r.iter().map(String::as_str).collect());
    }
}

pub fn print_next(v: &Value) {
    if let Some(n) = v.get("next_after").and_then(Value::as_str) {
        emit(format!("(more: --after {n})"));
    }
}

/// An object as `field  value` lines, with limits and quotas shown as people type them.
pub fn print_object(v: &Value) {
    let Some(obj) = v.as_object() else {
        emit(v);
        return;
    };
    let width = obj.keys().map(String::len).max().unwrap_or(0);
    for (k, val) in obj {
        let shown = match (k.as_str(), val) {
            ("rate_limits", Value::Array(a)) => a.iter().map(show_rate_limit).collect::<Vec<_>>().join(" "),
            ("quota", q) => show_quota(q),
            (_, Value::Object(_)) => val.to_string(),
            (_, other) => cell(other),
        };
        emit(format!("{k:<width$}  {shown}"));
    }
}

/// A secret shown this once, set apart so nobody misses it.
pub fn print_secret(label: &str, secret: &Value) {
    emit(format!("\n{label} (shown only this once; store it now):\n\n    {}\n", cell(secret)));
}

/// Usage buckets as a bar chart; buckets the server had no counts for are shown as zero.
pub fn print_usage(v: &Value, step_ms: i64) {
    let buckets = v["buckets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    emit(format!(
        "{} verifies from {} to {} (by {})",
        v["total"],
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
        v["granularity"].as_str().unwrap_or("?")
    ));
    if let Some(codes) = v["codes"].as_object() {
        let parts: Vec<String> = codes.iter().map(|(k, n)| format!("{k} {n}")).collect();
        emit(format!("by outcome: {}", if parts.is_empty() { "-".into() } else { parts.join(", ") }));
    }
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis());
    let (Some(from), Some(to)) = (v["from"].as_str().and_then(parse), v["to"].as_str().and_then(parse))
    else {
        return;
    };
    let mut counts = std::collections::BTreeMap::new();
    for b in buckets {
        if let Some(start) = b["start"].as_str().and_then(parse) {
            let total = b["total"].as_i64().unwrap_or(0);
            let valid = b["codes"]["VALID"].as_i64().unwrap_or(0);
            counts.insert(start, (total, valid));
        }
    }
    let first = from - from.rem_euclid(step_ms);
    let starts: Vec<i64> = (0..).map(|i| first + i * step_ms).take_while(|t| *t < to).take(500).collect();
    let max = counts.values().map(|(t, _)| *t).max().unwrap_or(0).max(1);
    for start in &starts {
        let (total, valid) = counts.get(start).copied().unwrap_or((0, 0));
        let width = (total * 40 / max).max(i64::from(total > 0)) as usize;
        let valid_width = if total > 0 { (valid * width as i64 / total) as usize } else { 0 };
        let when = chrono::DateTime::from_timestamp_millis(*start)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default();
        emit(format!("{when}  {}{} {total}", "█".repeat(valid_width), "░".repeat(width - valid_width)));
    }
    if !starts.is_empty() {
        emit("(█ valid, ░ rejected)");
    }
}
