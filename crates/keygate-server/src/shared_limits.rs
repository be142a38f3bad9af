//! Rate limits shared by every node (`rate_limits.redis_url`): one GCRA cell per key and limit in
//! Redis, checked and consumed by one Lua script, atomically across all of a key's limits.
//!
//! - The script is `limits::Gcra::check` in microseconds (Lua numbers are doubles: nanoseconds since
//!   the epoch would lose precision), on Redis's clock (`TIME`), so nodes' clocks do not matter.
//! - All or nothing, as on one node: cells are written only if every limit allows the request. A
//!   request the quota then refuses gives its units back (`refund`).
//! - Redis unreachable or failing: the node falls back to its own cells (per-node limits), logs it at
//!   most every 10 s. Rate limiting degrades to per node; verification does not stop.

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
  if tat then
    redis.call('SET', KEYS[i], tat - em * cost, 'KEEPTTL')
  end
end
return 1
"#;

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
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedLimits")
    }
}

impl SharedLimits {
    /// Connects to Redis (reconnecting by itself later when the connection drops).
    pub async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("the Redis URL does not parse: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_millis(500)));
        let conn = redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| format!("cannot connect to Redis: {e}"))?;
        Ok(SharedLimits {
            conn,
            check: redis::Script::new(GCRA),
            refund: redis::Script::new(REFUND),
            last_warning: AtomicI64::new(0),
        })
    }

    fn cell(id: &str, l: &RateLimit) -> String {
        format!("kg:rl:{id}:{}:{}:{}", l.name, l.limit, l.window_seconds)
    }

    fn args<'a>(
        &self,
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

    /// Checks and (if all allow) consumes `cost` of every limit of `id`. `None`: Redis did not answer;
    /// the caller uses its own cells.
    pub async fn check(&self, id: &str, limits: &[RateLimit], cost: u64) -> Option<SharedCheck> {
        let mut conn = self.conn.clone();
        let answer: Result<Vec<i64>, redis::RedisError> =
            self.args(&self.check, id, limits, cost).invoke_async(&mut conn).await;
        match answer {
            Ok(v) if v.len() == 2 + 4 * limits.len() => Some(Self::read(&v, limits, cost)),
            Ok(v) => {
                self.warn(&format!("unexpected answer of {} values", v.len()));
                None
            }
            Err(e) => {
                self.warn(&e.to_string());
                None
            }
        }
    }

    /// Gives back what [`SharedLimits::check`] consumed (best effort).
    pub async fn refund(&self, id: &str, limits: &[RateLimit], cost: u64) {
        let mut conn = self.conn.clone();
        let r: Result<i64, redis::RedisError> =
            self.args(&self.refund, id, limits, cost).invoke_async(&mut conn).await;
        if let Err(e) = r {
            self.warn(&e.to_string());
        }
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

    fn warn(&self, error: &str) {
        let now = crate::time::now_ms();
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
