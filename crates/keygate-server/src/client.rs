//! Who is on the other end: the client's IP address behind trusted proxies, and brute-force throttling
//! of addresses that keep presenting bad credentials.
//!
//! Policy:
//! - The client IP is the peer address, unless the peer is a configured trusted proxy: then it is the
//!   right-most address in `X-Forwarded-For` that is not itself a trusted proxy (or `Forwarded: for=`).
//!   Headers from untrusted peers are ignored, so clients cannot choose their own address.
//! - An address that produces more than `failures_per_minute` failed credential checks (`MALFORMED`,
//!   `NOT_FOUND`, failed admin authentication) is refused with 429 until its budget recovers. Callers
//!   that present good credentials never spend from the budget, so they are never slowed.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use ipnet::IpNet;
use keygate_core::limits::{Gcra, RateLimit, ip_allowed};
use moka::sync::Cache;

/// The client's address as far as it can be trusted.
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?;
    if trusted.is_empty() || !ip_allowed(trusted, peer) {
        return Some(peer);
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        if let Ok(v) = v.to_str() {
            chain.extend(v.split(',').filter_map(|s| s.trim().parse::<IpAddr>().ok()));
        }
    }
    if chain.is_empty() {
        for v in headers.get_all("forwarded") {
            if let Ok(v) = v.to_str() {
                chain.extend(v.split([',', ';']).filter_map(forwarded_for));
            }
        }
    }
    // Walk from the nearest hop outwards; the first untrusted address is the client.
    Some(chain.iter().rev().find(|ip| !ip_allowed(trusted, **ip)).or(chain.first()).copied().unwrap_or(peer))
}

/// `for=192.0.2.1`, `for="[2001:db8::1]:4711"` (RFC 7239).
fn forwarded_for(part: &str) -> Option<IpAddr> {
    let (k, v) = part.trim().split_once('=')?;
    if !k.trim().eq_ignore_ascii_case("for") {
        return None;
    }
    let v = v.trim().trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    v.parse().ok().or_else(|| v.rsplit_once(':').and_then(|(h, _)| h.parse().ok()))
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
        // The same header from an untrusted peer is ignored.
        let outsider: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(client_ip(Some(outsider), &h, &trusted), Some(outsider));
        // No proxies configured: the peer.
        assert_eq!(client_ip(Some(peer), &h, &[]), Some(peer));
        let h = headers(&[("forwarded", "for=\"[2001:db8::7]:4711\";proto=https")]);
        assert_eq!(client_ip(Some(peer), &h, &trusted), Some("2001:db8::7".parse().unwrap()));
        assert_eq!(client_ip(Some(peer), &HeaderMap::new(), &trusted), Some(peer));
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
