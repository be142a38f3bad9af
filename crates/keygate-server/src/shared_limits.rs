//! Rate limits shared by every node (`rate_limits.redis_url`): one GCRA cell per key and limit in
//! Redis, checked and consumed by one Lua script, atomically across all of a key's limits.
//!
//! - The script is `limits::Gcra::check` in microseconds (Lua numbers are doubles: nanoseconds since
//!   the epoch would lose precision), on Redis's clock (`TIME`), so nodes' clocks do not matter.
//! - All or nothing, as on one node: cells are written only if every limit allows the request. A
//!   request the quota then refuses gives its units back (`refund`).
//! - Redis unreachable, slow or failing: a request waits for it at most `WAIT` (50 ms) and then uses the
//!   node's own cells (per-node limits); after a failure the node does not ask Redis again for
//!   `PAUSE_MS` (2 s), so an outage costs one slow request per node every two seconds, not one per
//!   request. Logged at most every 10 s. Rate limiting degrades to per node; verification does not stop,
//!   and a node starts while Redis is down (it connects when Redis answers).
//! - Limits faster than one request per 100 µs (more than 10,000 a second per window second) stay per
//!   node: Redis keeps whole microseconds, and at that rate the rounding would be over 1%.
//! - Cells are named `kg:rl:{<key or client id>}:<limit>`: the braces keep a key's cells in one slot of a
//!   Redis Cluster. Redis 5 or later (the script reads `TIME` before writing).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use keygate_core::limits::RateLimit;

use crate::runtime::RateLimitState;

/// Checks every limit in `KEYS` (ARGV: cost, then window and limit per key, in microseconds and
/// requests) and consumes `cost` of each if all allow. Returns `{allowed, now_us, then per limit:
/// allowed, remaining, used_until_us, retry_after_us}`.
const GCRA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local probe = math.max(cost, 1)
local all = 1
local out = {}
local nexts = {}
for i = 1, #KEYS do
  local window = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  local em = math.max(math.floor(window / math.max(limit, 1)), 1)
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + em * probe
  local ok = (new_tat - now) <= window
  local used = tat
  if ok then used = new_tat end
  local remaining = math.floor((window - (used - now)) / em)
  if remaining < 0 then remaining = 0 end
  if remaining > limit then remaining = limit end
  local retry = 0
  if not ok then
    retry = new_tat - now - window
    all = 0
  end
  nexts[i] = tat + em * cost
  out[#out + 1] = ok and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = used
  out[#out + 1] = retry
end
if all == 1 and cost > 0 then
  for i = 1, #KEYS do
    local window = tonumber(ARGV[2 * i])
    redis.call('SET', KEYS[i], nexts[i], 'PX', math.floor(window / 1000) + 1000)
  end
end
table.insert(out, 1, now)
table.insert(out, 1, all)
return out
"#;

/// Gives back `cost` of each cell (a request the quota refused after the limits allowed it).
const REFUND: &str = r#"
local cost = tonumber(ARGV[1])
for i = 1, #KEYS do
  local window = tonumber(ARGV[2 * i])
  local limit = tonumber(ARGV[2 * i + 1])
  local em = math.max(math.floor(window / math.max(limit, 1)), 1)
  local tat = tonumber(redis.call('GET', KEYS[i]))
  local ttl = redis.call('PTTL', KEYS[i])
  if tat and ttl > 0 then
    redis.call('SET', KEYS[i], tat - em * cost, 'PX', ttl)
  end
end
return 1
"#;

/// How long a request waits for Redis before using the node's own cells.
const WAIT: Duration = Duration::from_millis(50);
/// After Redis failed, how long the node uses its own cells without asking it (ms).
const PAUSE_MS: i64 = 2000;
/// The fastest limit kept in Redis: one request per this many microseconds.
const FINEST_US: u64 = 100;

/// What the shared cells said about one request.
#[derive(Debug, Clone)]
pub struct SharedCheck {
    pub allowed: bool,
    /// The limit that denied (the longest wait), when not allowed.
    pub denied: Option<RateLimitState>,
    /// The limit with the fewest requests left, when allowed.
    pub tightest: Option<RateLimitState>,
    /// Whether the cells were consumed (allowed, cost > 0): then a refusal later must refund.
    pub consumed: bool,
}

pub struct SharedLimits {
    conn: redis::aio::ConnectionManager,
    check: redis::Script,
    refund: redis::Script,
    last_warning: AtomicI64,
    /// Redis is not asked before this time (ms): it failed just now.
    paused_until: AtomicI64,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedLimits")
    }
}

impl SharedLimits {
    /// Sets up the connection; it is made on first use and again whenever it drops, so a node starts
    /// while Redis is down.
    pub fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("the Redis URL does not parse: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        Ok(SharedLimits {
            conn,
            check: redis::Script::new(GCRA),
            refund: redis::Script::new(REFUND),
            last_warning: AtomicI64::new(0),
            paused_until: AtomicI64::new(0),
        })
    }

    fn cell(id: &str, l: &RateLimit) -> String {
        format!("kg:rl:{{{id}}}:{}:{}:{}", l.name, l.limit, l.window_seconds)
    }

    fn invocation<'a>(
        script: &'a redis::Script,
        id: &str,
        limits: &[RateLimit],
        cost: u64,
    ) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.arg(cost);
        for l in limits {
            inv.key(Self::cell(id, l));
            inv.arg(l.window_seconds.saturating_mul(1_000_000)).arg(l.limit);
        }
        inv
    }

    /// Whether these limits are kept in Redis (see the module documentation).
    pub fn takes(limits: &[RateLimit]) -> bool {
        limits.iter().all(|l| l.window_seconds.saturating_mul(1_000_000) / l.limit.max(1) >= FINEST_US)
    }

    /// Checks and (if all allow) consumes `cost` of every limit of `id`. `None`: Redis did not answer
    /// in time, failed a moment ago, or does not keep such fast limits; the caller uses its own cells.
    pub async fn check(&self, id: &str, limits: &[RateLimit], cost: u64) -> Option<SharedCheck> {
        if !Self::takes(limits) || crate::time::now_ms() < self.paused_until.load(Ordering::Acquire) {
            return None;
        }
        let mut conn = self.conn.clone();
        let call = Self::invocation(&self.check, id, limits, cost);
        let answer = tokio::time::timeout(WAIT, call.invoke_async::<Vec<i64>>(&mut conn)).await;
        match answer {
            Ok(Ok(v)) if v.len() == 2 + 4 * limits.len() => Some(Self::read(&v, limits, cost)),
            Ok(Ok(v)) => {
                self.failed(&format!("unexpected answer of {} values", v.len()));
                None
            }
            Ok(Err(e)) => {
                self.failed(&e.to_string());
                None
            }
            Err(_) => {
                self.failed(&format!("no answer within {} ms", WAIT.as_millis()));
                None
            }
        }
    }

    /// Gives back what [`SharedLimits::check`] consumed, in the background (best effort: it runs even
    /// if the request that asked is gone).
    pub fn refund(self: &Arc<Self>, id: &str, limits: &[RateLimit], cost: u64) {
        let me = self.clone();
        let (id, limits) = (id.to_string(), limits.to_vec());
        tokio::spawn(async move {
            let mut conn = me.conn.clone();
            let call = Self::invocation(&me.refund, &id, &limits, cost);
            match tokio::time::timeout(Duration::from_secs(2), call.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => me.failed(&e.to_string()),
                Err(_) => me.failed("a refund got no answer within 2 s"),
            }
        });
    }

    fn read(v: &[i64], limits: &[RateLimit], cost: u64) -> SharedCheck {
        let allowed = v[0] == 1;
        let now_us = v[1];
        let mut denied: Option<RateLimitState> = None;
        let mut tightest: Option<RateLimitState> = None;
        for (index, l) in limits.iter().enumerate() {
            let c = &v[2 + 4 * index..6 + 4 * index];
            let view = RateLimitState {
                index,
                limit: l.limit,
                remaining: c[1].max(0) as u64,
                reset_ms: c[2] / 1000,
                retry_after_ms: if c[0] == 1 { 0 } else { ((c[3] + 999) / 1000).max(1) },
                checked_at_ms: now_us / 1000,
            };
            if c[0] != 1 {
                if denied.as_ref().is_none_or(|d| view.retry_after_ms > d.retry_after_ms) {
                    denied = Some(view);
                }
            } else if tightest.as_ref().is_none_or(|t| view.remaining < t.remaining) {
                tightest = Some(view);
            }
        }
        SharedCheck { allowed, denied, tightest, consumed: allowed && cost > 0 }
    }

    fn failed(&self, error: &str) {
        let now = crate::time::now_ms();
        self.paused_until.store(now + PAUSE_MS, Ordering::Release);
        let last = self.last_warning.load(Ordering::Relaxed);
        if now - last >= 10_000
            && self.last_warning.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(
                error,
                "shared rate limits (Redis) unavailable; each node applies its own limits until it answers"
            );
        }
    }
}
