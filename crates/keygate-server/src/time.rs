//! Time in Keygate: integers of milliseconds since the Unix epoch inside, RFC 3339 at the edges.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, SecondsFormat, Utc};

/// The wall clock, in ms since the epoch. Code that runs inside a server asks `AppState::now` instead,
/// so that tests can move time.
pub fn now_ms() -> i64 {
    // Straight from the system clock (chrono's `Utc::now` builds a calendar date on every call, and this
    // runs several times a request).
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        // Before the epoch: rounded down, as `timestamp_millis` did.
        Err(before) => -i64::try_from(before.duration().as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX),
    }
}

/// Where a server reads the time: the system clock in production, a [`ManualClock`] in tests (expiry,
/// rotation windows, quota refills and rate limits are then tested by moving time, not by waiting).
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// The system clock plus an offset that tests move forward: time still passes (ids keep sorting by
/// creation), and a test jumps over an expiry or a window instead of waiting for it.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new() -> Self {
        ManualClock(AtomicI64::new(0))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.0.load(Ordering::SeqCst))
    }
}

pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 timestamp into milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}
