//! Usage controls: rate limits (GCRA), quotas with refill schedules, and IP allow-lists.
//!
//! Policy:
//! - A rate limit is `limit` requests per `window_seconds`, and allows a burst of the whole `limit` at
//!   once. It is enforced with GCRA (the generic cell rate algorithm): one timestamp of state per limit,
//!   exact, no background work. `governor` implements the same algorithm but commits on every check;
//!   Keygate needs to check several limits and a quota and commit all or none, so the arithmetic lives
//!   here, under one lock per key (in the server).
//! - A quota is a count of remaining uses. A refill *sets* it back to `amount` on a schedule.
//! - Times are milliseconds since the epoch; GCRA runs in nanoseconds so that high rates stay exact.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// Longest window of a rate limit: 30 days.
pub const MAX_WINDOW_SECONDS: u64 = 30 * 24 * 3600;
/// Largest `limit` of a rate limit, and largest quota.
pub const MAX_LIMIT: u64 = 1_000_000_000;
pub const MAX_RATE_LIMITS: usize = 10;
/// Shortest refill interval.
pub const MIN_REFILL_SECONDS: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// A name of the caller's choosing, e.g. `per_second` or `daily`; unique within a key.
    pub name: String,
    /// Requests allowed per window (also the largest burst).
    pub limit: u64,
    pub window_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    /// `remaining` is set back to this on every refill.
    pub amount: u64,
    /// Refill every N seconds (counted from when the quota was set)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<u64>,
    /// …or on a calendar schedule: `daily` (00:00 UTC) or `monthly` (on `day_of_month`, 00:00 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// For `monthly`: 1–31; in shorter months the last day of the month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_month: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Daily,
    Monthly,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub remaining: u64,
    #[serde(default)]
    pub refill: Option<Refill>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("at most {MAX_RATE_LIMITS} rate limits per key")]
    TooManyLimits,
    #[error("rate limit names must be 1-64 characters of a-z, 0-9, '_' or '-'")]
    BadName,
    #[error("rate limit name {0:?} appears twice")]
    DuplicateName(String),
    #[error("limit must be between 1 and {MAX_LIMIT}")]
    BadLimit,
    #[error("window_seconds must be between 1 and {MAX_WINDOW_SECONDS} (30 days)")]
    BadWindow,
    #[error("quota remaining must be at most {MAX_LIMIT}")]
    BadQuota,
    #[error("refill amount must be between 1 and {MAX_LIMIT}")]
    BadRefillAmount,
    #[error("a refill needs exactly one of interval_seconds or schedule")]
    RefillWhen,
    #[error("refill interval_seconds must be between {MIN_REFILL_SECONDS} and {MAX_WINDOW_SECONDS}")]
    BadRefillInterval,
    #[error("a monthly refill needs day_of_month between 1 and 31; other refills take none")]
    BadDayOfMonth,
    #[error("{0:?} is not an IP address or CIDR range (e.g. 203.0.113.0/24, 2001:db8::/32)")]
    BadCidr(String),
    #[error("at most 100 allowed IP entries per key")]
    TooManyIps,
}

pub fn validate_rate_limits(limits: &[RateLimit]) -> Result<(), LimitError> {
    if limits.len() > MAX_RATE_LIMITS {
        return Err(LimitError::TooManyLimits);
    }
    for (i, l) in limits.iter().enumerate() {
        if l.name.is_empty()
            || l.name.len() > 64
            || !l.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(LimitError::BadName);
        }
        if limits[..i].iter().any(|o| o.name == l.name) {
            return Err(LimitError::DuplicateName(l.name.clone()));
        }
        if l.limit == 0 || l.limit > MAX_LIMIT {
            return Err(LimitError::BadLimit);
        }
        if l.window_seconds == 0 || l.window_seconds > MAX_WINDOW_SECONDS {
            return Err(LimitError::BadWindow);
        }
    }
    Ok(())
}

pub fn validate_quota(q: &Quota) -> Result<(), LimitError> {
    if q.remaining > MAX_LIMIT {
        return Err(LimitError::BadQuota);
    }
    if let Some(r) = &q.refill {
        if r.amount == 0 || r.amount > MAX_LIMIT {
            return Err(LimitError::BadRefillAmount);
        }
        match (r.interval_seconds, r.schedule) {
            (Some(s), None) => {
                if !(MIN_REFILL_SECONDS..=MAX_WINDOW_SECONDS).contains(&s) {
                    return Err(LimitError::BadRefillInterval);
                }
                if r.day_of_month.is_some() {
                    return Err(LimitError::BadDayOfMonth);
                }
            }
            (None, Some(Schedule::Daily)) if r.day_of_month.is_none() => {}
            (None, Some(Schedule::Monthly)) => {
                if !r.day_of_month.is_some_and(|d| (1..=31).contains(&d)) {
                    return Err(LimitError::BadDayOfMonth);
                }
            }
            (None, Some(Schedule::Daily)) => return Err(LimitError::BadDayOfMonth),
            _ => return Err(LimitError::RefillWhen),
        }
    }
    Ok(())
}

/// Parses and normalises an allow-list: each entry an IP address or CIDR range, v4 or v6.
pub fn parse_allowed_ips(entries: &[String]) -> Result<Vec<ipnet::IpNet>, LimitError> {
    if entries.len() > 100 {
        return Err(LimitError::TooManyIps);
    }
    entries
        .iter()
        .map(|e| {
            let e = e.trim();
            e.parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| e.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| LimitError::BadCidr(e.chars().take(64).collect()))
        })
        .collect()
}

/// Is `ip` inside any of the ranges? IPv4-mapped IPv6 addresses count as their IPv4 form.
pub fn ip_allowed(ranges: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    ranges.iter().any(|r| r.contains(&ip))
}

/// When a refill due after `last_refill_ms` happens, in ms since the epoch.
pub fn next_refill(refill: &Refill, last_refill_ms: i64) -> i64 {
    if let Some(s) = refill.interval_seconds {
        return last_refill_ms.saturating_add((s as i64).saturating_mul(1000));
    }
    let last = DateTime::<Utc>::from_timestamp_millis(last_refill_ms).unwrap_or_default();
    match refill.schedule {
        Some(Schedule::Daily) => {
            let next_day = last.date_naive().succ_opt().unwrap_or(last.date_naive());
            Utc.from_utc_datetime(&next_day.and_time(chrono::NaiveTime::MIN)).timestamp_millis()
        }
        Some(Schedule::Monthly) => {
            let day = refill.day_of_month.unwrap_or(1);
            // The refill day in last's month, or else in the next month.
            let this_month = month_day(last.year(), last.month(), day);
            let candidate = Utc.from_utc_datetime(&this_month.and_time(chrono::NaiveTime::MIN));
            if candidate > last {
                candidate.timestamp_millis()
            } else {
                let (y, m) =
                    if last.month() == 12 { (last.year() + 1, 1) } else { (last.year(), last.month() + 1) };
                Utc.from_utc_datetime(&month_day(y, m, day).and_time(chrono::NaiveTime::MIN))
                    .timestamp_millis()
            }
        }
        None => i64::MAX,
    }
}

/// Day `day` of a month, or its last day if the month is shorter.
fn month_day(year: i32, month: u32, day: u32) -> chrono::NaiveDate {
    (1..=day.min(31)).rev().find_map(|d| chrono::NaiveDate::from_ymd_opt(year, month, d)).unwrap_or_default()
}

/// Applies every refill that fell due up to `now_ms`. Returns whether anything changed.
pub fn apply_refills(remaining: &mut u64, refilled_at: &mut i64, refill: &Refill, now_ms: i64) -> bool {
    let mut changed = false;
    let mut next = next_refill(refill, *refilled_at);
    // Bounded: a long downtime with a 1-second interval must not loop for ages.
    let mut steps = 0;
    while next <= now_ms && steps < 64 {
        *remaining = refill.amount;
        *refilled_at = next;
        changed = true;
        next = next_refill(refill, next);
        steps += 1;
    }
    if next <= now_ms {
        // Skip the rest at once: the result (remaining = amount) is the same.
        *refilled_at = now_ms;
    }
    changed
}

/// GCRA state of one rate limit: the theoretical arrival time, in ns since the epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    pub tat_ns: i64,
}

/// What a check of one rate limit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitCheck {
    pub allowed: bool,
    /// Requests left in the window after this one (if allowed) or now (if not).
    pub remaining: u64,
    /// When the full limit is available again, ms since the epoch.
    pub reset_ms: i64,
    /// If not allowed: how long until a request of this cost would be, in ms.
    pub retry_after_ms: i64,
    /// The new state, to store only if every check allows the request.
    pub next: Gcra,
}

impl Gcra {
    pub fn check(self, limit: &RateLimit, now_ms: i64, cost: u64) -> LimitCheck {
        let now = now_ms.saturating_mul(1_000_000);
        let window = (limit.window_seconds as i64).saturating_mul(1_000_000_000);
        // Emission interval: the time one request "costs". At least 1 ns.
        let t = (window / limit.limit.max(1) as i64).max(1);
        let tat = self.tat_ns.max(now);
        let new_tat = tat.saturating_add(t.saturating_mul(cost as i64));
        let allowed = new_tat - now <= window;
        let used_until = if allowed { new_tat } else { tat };
        let remaining = ((window - (used_until - now)) / t).max(0) as u64;
        let retry_after_ns = if allowed { 0 } else { new_tat - now - window };
        LimitCheck {
            allowed,
            remaining: remaining.min(limit.limit),
            reset_ms: used_until / 1_000_000,
            retry_after_ms: (retry_after_ns + 999_999) / 1_000_000,
            next: Gcra { tat_ns: new_tat },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(limit: u64, window_seconds: u64) -> RateLimit {
        RateLimit { name: "x".into(), limit, window_seconds }
    }

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let l = rl(10, 1);
        let mut g = Gcra::default();
        let now = 1_000_000;
        for i in 0..10 {
            let c = g.check(&l, now, 1);
            assert!(c.allowed, "request {i}");
            assert_eq!(c.remaining, 9 - i);
            g = c.next;
        }
        let c = g.check(&l, now, 1);
        assert!(!c.allowed);
        assert_eq!(c.remaining, 0);
        assert_eq!(c.retry_after_ms, 100);
        // 100 ms later one more fits.
        assert!(g.check(&l, now + 100, 1).allowed);
        assert!(!g.check(&l, now + 99, 1).allowed);
        // A rejected check changes nothing: the state is only what the caller stores.
        assert_eq!(c.reset_ms, now + 1000);
    }

    #[test]
    fn gcra_cost_counts_as_several_requests() {
        let l = rl(10, 10);
        let c = Gcra::default().check(&l, 0, 7);
        assert!(c.allowed);
        assert_eq!(c.remaining, 3);
        assert!(!c.next.check(&l, 0, 4).allowed);
        assert!(c.next.check(&l, 0, 3).allowed);
    }

    #[test]
    fn validation() {
        assert!(validate_rate_limits(&[rl(10, 1)]).is_ok());
        assert_eq!(validate_rate_limits(&[rl(0, 1)]), Err(LimitError::BadLimit));
        assert_eq!(validate_rate_limits(&[rl(1, 0)]), Err(LimitError::BadWindow));
        assert_eq!(validate_rate_limits(&[rl(1, MAX_WINDOW_SECONDS + 1)]), Err(LimitError::BadWindow));
        assert!(matches!(validate_rate_limits(&[rl(1, 1), rl(2, 2)]), Err(LimitError::DuplicateName(_))));
        let bad_name = RateLimit { name: "Per Second".into(), limit: 1, window_seconds: 1 };
        assert_eq!(validate_rate_limits(&[bad_name]), Err(LimitError::BadName));

        let q = |refill| Quota { remaining: 5, refill: Some(refill) };
        let every = Refill { amount: 5, interval_seconds: Some(60), schedule: None, day_of_month: None };
        assert!(validate_quota(&q(every.clone())).is_ok());
        assert_eq!(
            validate_quota(&q(Refill { interval_seconds: Some(0), ..every.clone() })),
            Err(LimitError::BadRefillInterval)
        );
        assert_eq!(
            validate_quota(&q(Refill { amount: 0, ..every.clone() })),
            Err(LimitError::BadRefillAmount)
        );
        let both = Refill { schedule: Some(Schedule::Daily), ..every.clone() };
        assert_eq!(validate_quota(&q(both)), Err(LimitError::RefillWhen));
        let neither = Refill { interval_seconds: None, ..every.clone() };
        assert_eq!(validate_quota(&q(neither)), Err(LimitError::RefillWhen));
        let monthly = Refill {
            interval_seconds: None,
            schedule: Some(Schedule::Monthly),
            day_of_month: Some(32),
            amount: 1,
        };
        assert_eq!(validate_quota(&q(monthly.clone())), Err(LimitError::BadDayOfMonth));
        assert!(validate_quota(&q(Refill { day_of_month: Some(31), ..monthly })).is_ok());
    }

    #[test]
    fn refill_schedules() {
        let ms = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis();
        let daily =
            Refill { amount: 3, interval_seconds: None, schedule: Some(Schedule::Daily), day_of_month: None };
        assert_eq!(next_refill(&daily, ms("2026-03-05T13:00:00Z")), ms("2026-03-06T00:00:00Z"));
        let monthly = Refill { schedule: Some(Schedule::Monthly), day_of_month: Some(31), ..daily.clone() };
        assert_eq!(next_refill(&monthly, ms("2026-02-03T00:00:00Z")), ms("2026-02-28T00:00:00Z"));
        assert_eq!(next_refill(&monthly, ms("2026-02-28T00:00:00Z")), ms("2026-03-31T00:00:00Z"));
        assert_eq!(next_refill(&monthly, ms("2026-12-31T10:00:00Z")), ms("2027-01-31T00:00:00Z"));
        let every = Refill { amount: 3, interval_seconds: Some(10), schedule: None, day_of_month: None };
        let (mut remaining, mut at) = (0u64, 0i64);
        assert!(!apply_refills(&mut remaining, &mut at, &every, 9_999));
        assert!(apply_refills(&mut remaining, &mut at, &every, 25_000));
        assert_eq!((remaining, at), (3, 20_000));
        // A very long gap does not loop forever.
        assert!(apply_refills(
            &mut remaining,
            &mut at,
            &Refill { interval_seconds: Some(1), ..every },
            i64::MAX / 2
        ));
    }

    #[test]
    fn ip_allow_lists() {
        let ranges =
            parse_allowed_ips(&["203.0.113.0/24".into(), "2001:db8::/32".into(), "198.51.100.7".into()])
                .unwrap();
        assert!(ip_allowed(&ranges, "203.0.113.9".parse().unwrap()));
        assert!(ip_allowed(&ranges, "198.51.100.7".parse().unwrap()));
        assert!(!ip_allowed(&ranges, "198.51.100.8".parse().unwrap()));
        assert!(ip_allowed(&ranges, "2001:db8:1::5".parse().unwrap()));
        assert!(!ip_allowed(&ranges, "2001:db9::1".parse().unwrap()));
        assert!(ip_allowed(&ranges, "::ffff:203.0.113.1".parse().unwrap()));
        assert!(matches!(parse_allowed_ips(&["10.0.0.0/33".into()]), Err(LimitError::BadCidr(_))));
        assert!(matches!(parse_allowed_ips(&["nope".into()]), Err(LimitError::BadCidr(_))));
        // Host bits are dropped: 10.1.2.3/8 means 10.0.0.0/8.
        assert_eq!(parse_allowed_ips(&["10.1.2.3/8".into()]).unwrap()[0].to_string(), "10.0.0.0/8");
    }
}
