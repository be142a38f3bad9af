//! Who is on the other end: the client's IP address behind trusted proxies, and brute-force throttling
//! of addresses that keep presenting bad credentials.
//!
//! Policy:
//! - The client IP is the peer address, unless the peer is a configured trusted proxy: then it is what
//!   `X-Forwarded-For` and `Forwarded` say, read by one parser that fails closed
//!   (`keygate_core::forwarded`). Headers from untrusted peers are ignored.
//! - Every endpoint that checks a credential counts its failures (`MALFORMED`, `NOT_FOUND`, a failed
//!   client authentication) against the address. The credential is checked first: once an address has
//!   spent its `failures_per_minute`, its *failed* checks get 429 until the budget recovers, while a
//!   credential that verifies is never refused for its address's failures (an address may be shared by
//!   many clients behind NAT or a proxy). The throttle limits load and log noise from guessing; what
//!   makes guessing hopeless is the secrets' entropy (~190 bits).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use ipnet::IpNet;
use keygate_core::limits::{Gcra, RateLimit};
use moka::sync::Cache;

/// The client of a request, as far as it can be told (the rules are in `keygate_core::forwarded`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Client {
    /// The client's address, for IP allow-lists and last-used records; `None` when forwarding headers
    /// could not be believed (then no allow-list passes).
    pub ip: Option<IpAddr>,
    /// The address that answers for this request's failed credential checks.
    pub accountable: Option<IpAddr>,
}

/// Who sent the request: the peer, or behind trusted proxies what they say.
pub fn client_of(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Client {
    let Some(peer) = peer else { return Client::default() };
    if trusted.is_empty() {
        return Client { ip: Some(peer), accountable: Some(peer) };
    }
    // Bytes that are not visible ASCII become '?', which parses as an unknown hop: one bad entry (the
    // client's own) must not hide the hops a proxy appended after it.
    let values = |name: &'static str| -> Vec<String> {
        headers
            .get_all(name)
            .into_iter()
            .map(|v| {
                v.as_bytes()
                    .iter()
                    .map(|&b| if (0x20..0x7f).contains(&b) { char::from(b) } else { '?' })
                    .collect()
            })
            .collect()
    };
    let (xff, fwd) = (values("x-forwarded-for"), values("forwarded"));
    let addr = keygate_core::forwarded::client_address(
        peer,
        xff.iter().map(String::as_str),
        fwd.iter().map(String::as_str),
        trusted,
    );
    Client { ip: addr.known(), accountable: Some(addr.accountable()) }
}

/// Budget of failed credential checks per address (or, with another key, per account: failed logins
/// are also counted per username hash).
pub struct FailureThrottle<K = IpAddr> {
    /// Whether the key may appear in the log (addresses yes; username hashes no: a dictionary reverses
    /// an unsalted hash of a username).
    log_keys: bool,
    limit: Option<RateLimit>,
    cells: Cache<K, Arc<Mutex<Gcra>>>,
}

impl<K: std::hash::Hash + Eq + Send + Sync + Clone + std::fmt::Debug + 'static> FailureThrottle<K> {
    /// `failures_per_minute = 0` turns throttling off.
    pub fn new(failures_per_minute: u64) -> Self {
        FailureThrottle {
            log_keys: true,
            limit: (failures_per_minute > 0).then(|| RateLimit {
                name: "failures".into(),
                limit: failures_per_minute,
                window_seconds: 60,
            }),
            cells: Cache::builder().max_capacity(100_000).time_to_idle(Duration::from_secs(120)).build(),
        }
    }

    /// A budget of `limit` events per `window_seconds` (e.g. registrations per hour); 0 turns it off.
    pub fn per_window(limit: u64, window_seconds: u64) -> Self {
        FailureThrottle {
            limit: (limit > 0).then(|| RateLimit { name: "events".into(), limit, window_seconds }),
            cells: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(window_seconds.saturating_mul(2)))
                .build(),
            ..Self::new(0)
        }
    }

    /// The same, without naming keys in the log.
    pub fn quiet(failures_per_minute: u64) -> Self {
        FailureThrottle { log_keys: false, ..Self::new(failures_per_minute) }
    }

    /// If `ip` has spent its budget: how long until it may try again, in ms.
    pub fn blocked(&self, ip: Option<K>, now_ms: i64) -> Option<i64> {
        let (limit, ip) = (self.limit.as_ref()?, ip?);
        let cell = self.cells.get(&ip)?;
        let g = *cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = g.check(limit, now_ms, 1);
        (!c.allowed).then_some(c.retry_after_ms.max(1))
    }

    /// Spends one unit of `key`'s budget if any is left (check and spend under one lock, so concurrent
    /// callers cannot overdraw it). True if it was spent; always true when the budget is off or the key
    /// unknown.
    pub fn try_take(&self, key: Option<K>, now_ms: i64) -> bool {
        let (Some(limit), Some(key)) = (self.limit.as_ref(), key) else { return true };
        let cell = self.cells.get_with(key, || Arc::new(Mutex::new(Gcra::default())));
        let mut g = cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = g.check(limit, now_ms, 1);
        if c.allowed {
            *g = c.next;
        }
        c.allowed
    }

    pub fn record_failure(&self, ip: Option<K>, now_ms: i64) {
        let (Some(limit), Some(ip)) = (self.limit.as_ref(), ip) else { return };
        let cell = self.cells.get_with(ip.clone(), || Arc::new(Mutex::new(Gcra::default())));
        let mut g = cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = g.check(limit, now_ms, 1);
        if c.allowed {
            *g = c.next;
            if !c.next.check(limit, now_ms, 1).allowed {
                if self.log_keys {
                    tracing::warn!(key = ?ip, "throttling after repeated failed credential checks");
                } else {
                    tracing::warn!("throttling an account after repeated failed logins");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let h = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.5, 10.1.1.1")]);
        assert_eq!(client_of(Some(peer), &h, &trusted).ip, ip("203.0.113.5"));
        let outsider: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(client_of(Some(outsider), &h, &trusted).ip, Some(outsider));
        assert_eq!(client_of(Some(peer), &h, &[]).ip, Some(peer));
        // The review's spoof: the proxy maintains Forwarded, the attacker adds X-Forwarded-For. The client
        // is unresolved: no allow-list passes, and its failures are charged to the proxy.
        let h = headers(&[("forwarded", "for=198.51.100.7"), ("x-forwarded-for", "203.0.113.99")]);
        assert_eq!(client_of(Some(peer), &h, &trusted), Client { ip: None, accountable: Some(peer) });
        // A client's own non-ASCII entry does not hide the hop nginx appended after it.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"\xff, 203.0.113.5").unwrap());
        assert_eq!(client_of(Some(peer), &h, &trusted).ip, ip("203.0.113.5"));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"203.0.113.5, \xff").unwrap());
        assert_eq!(client_of(Some(peer), &h, &trusted).ip, None, "a non-ASCII nearest hop fails closed");
    }

    #[test]
    fn throttle_blocks_after_the_budget() {
        let t = FailureThrottle::<IpAddr>::new(3);
        let ip = Some("192.0.2.1".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(t.blocked(ip, 0), None);
            t.record_failure(ip, 0);
        }
        assert!(t.blocked(ip, 0).is_some());
        assert_eq!(t.blocked(Some("192.0.2.2".parse().unwrap()), 0), None, "other addresses are unaffected");
        assert_eq!(t.blocked(ip, 20_000), None, "one failure's worth recovers after 20 s");
        assert_eq!(FailureThrottle::new(0).blocked(ip, 0), None);
    }
}
