//! `keygate usage` and `keygate audit`: what happened.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use reqwest::Method;
use serde_json::Value;

use super::args;
use super::http::Api;
use super::output::{cell, emit, field, items, output, print_usage, table};
use super::{CliResult, Failure};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    fn millis(self) -> i64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Key id (key_…), or with --consumer a consumer id (cons_…).
    pub id: String,
    /// The id is a consumer's: show all its keys together.
    #[arg(long)]
    pub consumer: bool,
    /// Bucket size.
    #[arg(long, value_enum, default_value = "hour")]
    pub granularity: Granularity,
    /// How far back, e.g. 60m, 24h, 30d.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = args::duration_secs)]
    pub since: u64,
}

pub async fn usage(c: &Api, a: UsageArgs) -> CliResult {
    let segments = if a.consumer {
        let id = args::consumer_id(&a.id).map_err(Failure::usage)?;
        ["v1".to_string(), "consumers".into(), id, "usage".into()]
    } else {
        if keygate_core::id::looks_like("cons", &a.id) {
            return Err(Failure::usage(format!(
                "{} is a consumer id; add --consumer to see all its keys' usage",
                a.id
            )));
        }
        let id = args::key_id(&a.id).map_err(Failure::usage)?;
        ["v1".to_string(), "keys".into(), id, "usage".into()]
    };
    let now = chrono::Utc::now();
    let from = now - chrono::Duration::seconds(a.since.min(10 * 365 * 86_400) as i64);
    let q = vec![
        ("granularity", a.granularity.as_str().to_string()),
        ("from", from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    ];
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let v = c.call(Method::GET, &segments, &q, None).await?;
    output(c, &v, |v| print_usage(v, a.granularity.millis()));
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only events about this consumer, key or client id.
    #[arg(long, value_parser = args::Quiet(args::target_id))]
    pub target: Option<String>,
    /// Only this action, e.g. key.revoke.
    #[arg(long)]
    pub action: Option<String>,
    /// Only events made by this actor: a key id, or `system`.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only events at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
    #[arg(long)]
    pub from: Option<String>,
    /// Only events before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<String>,
    /// Events older than this event id (printed at the end of the previous page).
    #[arg(long, value_parser = args::Quiet(args::event_id))]
    pub before: Option<String>,
    /// Page size, 1 to 1000.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
}

pub async fn audit(c: &Api, a: AuditArgs) -> CliResult {
    let mut q = vec![("limit", a.limit.to_string())];
    q.extend(a.target.map(|t| ("target_id", t)));
    q.extend(a.action.map(|x| ("action", x)));
    q.extend(a.actor.map(|x| ("actor", x)));
    q.extend(a.from.map(|x| ("from", x)));
    q.extend(a.to.map(|x| ("to", x)));
    q.extend(a.before.map(|b| ("before", b)));
    let v = c.call(Method::GET, &["v1", "audit"], &q, None).await?;
    output(c, &v, |v| {
        let actor = |r: &Value| match r["actor_name"].as_str() {
            Some(n) => format!("{n} ({})", cell(&r["actor"])),
            None => cell(&r["actor"]),
        };
        let details = |r: &Value| match r["details"].as_object() {
            Some(o) if !o.is_empty() => o
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{k}={}", cell(v)))
                .collect::<Vec<_>>()
                .join(" "),
            _ => "-".into(),
        };
        table(
            items(v),
            &[
                ("TIME", &field("at")),
                ("ACTION", &field("action")),
                ("TARGET", &field("target_id")),
                ("ACTOR", &actor),
                ("IP", &field("ip")),
                ("DETAILS", &details),
            ],
        );
        if let Some(b) = v.get("next_before").and_then(Value::as_str) {
            emit(format!("(older: --before {b})"));
        }
    });
    Ok(ExitCode::SUCCESS)
}
