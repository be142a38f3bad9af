//! Arguments shared by several commands, and the value parsers that turn what people type into what
//! the API takes. A parser's error becomes clap's usage error (exit code 2) with the message here.
//!
//! One syntax everywhere: durations are a number with `s`, `m`, `h`, `d` or `w` (`90s`, `1h`, `30d`; a
//! bare number is seconds); times are RFC 3339 (`2030-01-31T12:00:00Z`) or a date (`2030-01-31`, midnight
//! UTC); rate limits are `NAME:LIMIT/WINDOW` (`per_second:10/1s`, `daily:10000/1d`).

use clap::Args;
use keygate_core::limits::{Quota, RateLimit, Refill, Schedule};
use serde_json::Value;

use super::Failure;

/// `90s`, `60m`, `24h`, `30d`, `2w`, or seconds → seconds.
pub fn duration_secs(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration: write a number with s, m, h, d or w, e.g. 90s, 1h, 30d");
    let s = s.trim();
    let (n, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3_600),
        Some((i, 'd')) => (&s[..i], 86_400),
        Some((i, 'w')) => (&s[..i], 604_800),
        Some(_) => (s, 1),
        None => return Err(bad()),
    };
    let n: u64 = n.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

/// RFC 3339, or a date meaning midnight UTC → RFC 3339.
pub fn time(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    Err(format!("{s:?} is not a time: write a date (2030-01-31) or RFC 3339 (2030-01-31T12:00:00Z)"))
}

/// `NAME:LIMIT/WINDOW` → the API's rate limit.
pub fn rate_limit(spec: &str) -> Result<RateLimit, String> {
    let bad = || format!("{spec:?}: write NAME:LIMIT/WINDOW, e.g. per_minute:100/1m or per_second:10/1");
    let (name, rest) = spec.split_once(':').ok_or_else(bad)?;
    let (limit, window) = rest.split_once('/').ok_or_else(bad)?;
    let limit: u64 = limit.trim().parse().map_err(|_| bad())?;
    let window = duration_secs(window).map_err(|_| bad())?;
    if name.trim().is_empty() {
        return Err(bad());
    }
    Ok(RateLimit { name: name.trim().to_string(), limit, window_seconds: window })
}

/// A rate limit as people type it, for printing: `per_second:10/1s`.
pub fn show_rate_limit(v: &Value) -> String {
    let window = v["window_seconds"].as_u64().unwrap_or(0);
    let w = match window {
        w if w % 86_400 == 0 && w > 0 => format!("{}d", w / 86_400),
        w if w % 3_600 == 0 && w > 0 => format!("{}h", w / 3_600),
        w if w % 60 == 0 && w > 0 => format!("{}m", w / 60),
        w => format!("{w}s"),
    };
    format!("{}:{}/{w}", v["name"].as_str().unwrap_or("?"), v["limit"])
}

/// A JSON object.
pub fn metadata(s: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("metadata must be a JSON object, e.g. '{\"plan\":\"pro\"}'".into()),
        Err(e) => Err(format!("metadata is not JSON ({e}); write an object, e.g. '{{\"plan\":\"pro\"}}'")),
    }
}

/// Does this look like a secret rather than an id? Then it must never be sent as a path segment.
fn looks_like_secret(s: &str) -> bool {
    keygate_core::credential::parse(s).is_ok()
        || ["kg_live_", "kg_test_", "kgat_", "kgcs_"].iter().any(|p| s.starts_with(p))
        || (s.starts_with("eyJ") && s.contains('.'))
}

fn id(prefix: &'static str, what: &str, s: &str) -> Result<String, String> {
    if looks_like_secret(s) {
        return Err(format!(
            "that is a secret, not a {what} id (nothing was sent); {what} ids look like {prefix}_0193…"
        ));
    }
    if keygate_core::id::looks_like(prefix, s) {
        return Ok(s.to_string());
    }
    Err(format!("{s:?} is not a {what} id; {what} ids look like {prefix}_0193a5b2c3d4Xy7Qp2Lm9Rt0"))
}

pub fn consumer_id(s: &str) -> Result<String, String> {
    id("cons", "consumer", s)
}

pub fn webhook_id(s: &str) -> Result<String, String> {
    id("whk", "webhook", s)
}

pub fn leak_policy(s: &str) -> Result<keygate_store::LeakPolicy, String> {
    keygate_store::LeakPolicy::parse(s).ok_or_else(|| "must be revoke or notify".to_string())
}

pub fn key_id(s: &str) -> Result<String, String> {
    id("key", "key", s)
}

pub fn client_id(s: &str) -> Result<String, String> {
    id("kgc", "client", s)
}

/// Any object id the audit log can name.
pub fn target_id(s: &str) -> Result<String, String> {
    for prefix in ["cons", "key", "kgc", "evt"] {
        if keygate_core::id::looks_like(prefix, s) {
            return Ok(s.to_string());
        }
    }
    id("key", "consumer, key or client", s)
}

pub fn event_id(s: &str) -> Result<String, String> {
    id("evt", "audit event", s)
}

/// A signing key id: base62.
pub fn kid(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a signing key id; `keygate signing-keys list` shows them"))
    }
}

/// A value parser whose error never repeats the value (clap's own errors quote it, and a value typed
/// into an id's place may be a secret).
#[derive(Clone, Copy)]
pub struct Quiet(pub fn(&str) -> Result<String, String>);

impl clap::builder::TypedValueParser for Quiet {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let name = arg.map_or_else(|| "value".to_string(), ToString::to_string);
        let value = value.to_str().ok_or_else(|| {
            clap::Error::raw(clap::error::ErrorKind::InvalidUtf8, format!("{name} is not UTF-8\n"))
                .with_cmd(cmd)
        })?;
        (self.0)(value).map_err(|e| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("invalid {name}: {e}\n"))
                .with_cmd(cmd)
        })
    }
}

/// Reads a secret given as `-` from standard input (first line, trimmed), so that it stays out of
/// process lists and shell history.
pub fn secret_or_stdin(value: String, what: &str) -> Result<String, Failure> {
    if value != "-" {
        return Ok(value);
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| Failure::new(format!("cannot read the {what} from standard input: {e}")))?;
    let s = line.trim().to_string();
    if s.is_empty() {
        return Err(Failure::usage(format!("standard input held no {what}")));
    }
    Ok(s)
}

#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Page size, 1 to 1000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
    /// Continue after this id (printed at the end of the previous page).
    #[arg(long)]
    pub after: Option<String>,
    /// Only those whose name starts with this (ignoring case), or whose id is exactly this.
    #[arg(long)]
    pub search: Option<String>,
}

impl PageArgs {
    pub fn query(self) -> Vec<(&'static str, String)> {
        let mut q = vec![("limit", self.limit.to_string())];
        q.extend(self.after.map(|a| ("after", a)));
        q.extend(self.search.map(|s| ("q", s)));
        q
    }
}

#[derive(Debug, Clone, Args)]
pub struct QuotaArgs {
    /// Give the key a quota of N uses (each verify spends its cost, 1 by default).
    #[arg(long = "quota", value_name = "N")]
    pub quota: Option<u64>,
    /// Refill the quota to this many uses…
    #[arg(long, value_name = "N", requires = "quota")]
    pub refill_amount: Option<u64>,
    /// …every DURATION (e.g. 1h),
    #[arg(long, value_name = "DURATION", value_parser = duration_secs, requires = "refill_amount",
        conflicts_with_all = ["refill_daily", "refill_monthly"])]
    pub refill_every: Option<u64>,
    /// …daily at 00:00 UTC,
    #[arg(long, requires = "refill_amount", conflicts_with = "refill_monthly")]
    pub refill_daily: bool,
    /// …or monthly on this day (1-31; the month's last day when shorter) at 00:00 UTC.
    #[arg(long, value_name = "DAY", requires = "refill_amount", value_parser = clap::value_parser!(u32).range(1..=31))]
    pub refill_monthly: Option<u32>,
}

impl QuotaArgs {
    /// The quota as the API takes it, if `--quota` was given.
    pub fn quota(&self) -> Result<Option<Quota>, Failure> {
        let Some(remaining) = self.quota else { return Ok(None) };
        let refill = match self.refill_amount {
            None => None,
            Some(amount) => {
                let base = Refill { amount, interval_seconds: None, schedule: None, day_of_month: None };
                Some(if let Some(s) = self.refill_every {
                    Refill { interval_seconds: Some(s), ..base }
                } else if self.refill_daily {
                    Refill { schedule: Some(Schedule::Daily), ..base }
                } else if let Some(d) = self.refill_monthly {
                    Refill { schedule: Some(Schedule::Monthly), day_of_month: Some(d), ..base }
                } else {
                    return Err(Failure::usage(
                        "--refill-amount needs --refill-every DURATION, --refill-daily or --refill-monthly DAY",
                    ));
                })
            }
        };
        Ok(Some(Quota { remaining, refill }))
    }
}

/// A quota as people think of it: `950 left, refills to 1000 daily`.
pub fn show_quota(q: &Value) -> String {
    if q.is_null() {
        return "-".into();
    }
    let left = format!("{} left", q["remaining"]);
    let r = &q["refill"];
    if r.is_null() {
        return left;
    }
    let when = match (r["schedule"].as_str(), r["interval_seconds"].as_u64()) {
        (Some("daily"), _) => "daily".to_string(),
        (Some("monthly"), _) => format!("monthly on day {}", r["day_of_month"]),
        (_, Some(s)) => format!("every {}", show_duration(s)),
        _ => "?".into(),
    };
    format!("{left}, refills to {} {when}", r["amount"])
}

pub fn show_duration(s: u64) -> String {
    match s {
        s if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 && s > 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_times_and_limits() {
        assert_eq!(duration_secs("90s"), Ok(90));
        assert_eq!(duration_secs("1h"), Ok(3600));
        assert_eq!(duration_secs("30d"), Ok(30 * 86_400));
        assert_eq!(duration_secs("45"), Ok(45));
        assert!(duration_secs("1y").is_err());
        assert!(duration_secs("").is_err());
        assert_eq!(time("2030-01-31").unwrap(), "2030-01-31T00:00:00Z");
        assert_eq!(time("2030-01-31T12:00:00+02:00").unwrap(), "2030-01-31T10:00:00Z");
        assert!(time("tomorrow").is_err());
        let l = rate_limit("per_minute:100/1m").unwrap();
        assert_eq!(l, RateLimit { name: "per_minute".into(), limit: 100, window_seconds: 60 });
        assert_eq!(show_rate_limit(&serde_json::to_value(&l).unwrap()), "per_minute:100/1m");
        assert!(rate_limit("100/60").is_err());
        assert!(metadata("[1]").is_err());
    }

    #[test]
    fn ids_are_checked_and_secrets_never_echoed() {
        let id = "key_0193a5b2c3d4Xy7Qp2Lm9Rt0";
        assert_eq!(key_id(id), Ok(id.to_string()));
        assert!(key_id("../consumers/cons_0193a5b2c3d4Xy7Qp2Lm9Rt0").is_err());
        assert!(key_id("cons_0193a5b2c3d4Xy7Qp2Lm9Rt0").is_err());
        let secret = keygate_core::PlainSecret::generate(keygate_core::SecretKind::ApiKey(
            keygate_core::Environment::Live,
        ))
        .unwrap();
        let err = key_id(secret.expose()).unwrap_err();
        assert!(err.contains("secret") && !err.contains(&secret.expose()[8..]), "{err}");
    }
}
