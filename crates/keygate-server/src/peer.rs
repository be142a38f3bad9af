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

/// The client's address as far as it can be trusted (the rules are in `keygate_core::forwarded`).
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let values = |name: &'static str| headers.get_all(name).into_iter().filter_map(|v| v.to_str().ok());
    let peer = peer?;
    if trusted.is_empty() {
        return Some(peer);
    }
    // A header value that is not visible ASCII cannot be parsed: it counts as an unknown hop.
    let opaque = |name: &'static str| headers.get_all(name).into_iter().any(|v| v.to_str().is_err());
    let xff: Vec<&str> =
        values("x-forwarded-for").chain(opaque("x-forwarded-for").then_some("unknown")).collect();
    let fwd: Vec<&str> = values("forwarded").chain(opaque("forwarded").then_some("for=unknown")).collect();
    Some(keygate_core::forwarded::client_address(peer, xff, fwd, trusted))
}

/// Per-address budget of failed credential checks.
pub struct FailureThrottle {
    limit: Option<RateLimit>,
    cells: Cache<IpAddr, Arc<Mutex<Gcra>>>,
}

impl FailureThrottle {
    /// `failures_per_minute = 0` turns throttling off.
    pub fn new(failures_per_minute: u64) -> Self {
        FailureThrottle {
            limit: (failures_per_minute > 0).then(|| RateLimit {
                name: "failures".into(),
                limit: failures_per_minute,
                window_seconds: 60,
            }),
            cells: Cache::builder().max_capacity(100_000).time_to_idle(Duration::from_secs(120)).build(),
        }
    }

    /// If `ip` has spent its budget: how long until it may try again, in ms.
    pub fn blocked(&self, ip: Option<IpAddr>, now_ms: i64) -> Option<i64> {
        let (limit, ip) = (self.limit.as_ref()?, ip?);
        let cell = self.cells.get(&ip)?;
        let g = *cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = g.check(limit, now_ms, 1);
        (!c.allowed).then_some(c.retry_after_ms.max(1))
    }

    pub fn record_failure(&self, ip: Option<IpAddr>, now_ms: i64) {
        let (Some(limit), Some(ip)) = (self.limit.as_ref(), ip) else { return };
        let cell = self.cells.get_with(ip, || Arc::new(Mutex::new(Gcra::default())));
        let mut g = cell.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = g.check(limit, now_ms, 1);
        if c.allowed {
            *g = c.next;
            if !c.next.check(limit, now_ms, 1).allowed {
                tracing::warn!(%ip, "throttling an address after repeated failed credential checks");
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
        let h = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.5, 10.1.1.1")]);
        assert_eq!(client_ip(Some(peer), &h, &trusted), Some("203.0.113.5".parse().unwrap()));
        let outsider: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(client_ip(Some(outsider), &h, &trusted), Some(outsider));
        assert_eq!(client_ip(Some(peer), &h, &[]), Some(peer));
        // The review's spoof: the proxy maintains Forwarded, the attacker adds X-Forwarded-For.
        let h = headers(&[("forwarded", "for=198.51.100.7"), ("x-forwarded-for", "203.0.113.99")]);
        assert_eq!(client_ip(Some(peer), &h, &trusted), Some(peer));
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", axum::http::HeaderValue::from_bytes(b"203.0.113.5, \xff").unwrap());
        assert_eq!(client_ip(Some(peer), &h, &trusted), Some(peer), "a non-ASCII hop fails closed");
    }

    #[test]
    fn throttle_blocks_after_the_budget() {
        let t = FailureThrottle::new(3);
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
