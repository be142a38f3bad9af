//! Per-key state that changes on every verify: rate-limit cells, quota, usage counters, last use.
//!
//! Policy:
//! - The verify path never writes to the database. It updates this in-memory state; a flusher writes
//!   the changes in one batch transaction every `flush_interval` (1 s by default) and on graceful
//!   shutdown. A crash loses at most one interval of usage counts and quota consumption.
//! - On this node the in-memory quota is the truth; the database copy is at most one interval behind.
//!   Admin quota changes write both.
//! - Checks are all-or-nothing: every rate limit and the quota are checked under the key's one lock,
//!   and state is committed only if all allow the request, so a rejected verify consumes nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use keygate_core::DecisionCode;
use keygate_core::limits::{Gcra, LimitCheck, MAX_RATE_LIMITS, Quota, RateLimit, Refill, apply_refills};
use keygate_store::{ApiKey, KeyUsage, Store, StoreError};

const CODES: usize = DecisionCode::ALL.len();

/// Quota as the verify path keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    pub remaining: u64,
    pub refill: Option<Refill>,
    pub refilled_at: i64,
}

impl QuotaState {
    pub fn from_config(q: &Quota, refilled_at: i64) -> Self {
        QuotaState { remaining: q.remaining, refill: q.refill.clone(), refilled_at }
    }
}

#[derive(Debug, Default)]
struct State {
    /// One GCRA cell per limit. A cell belongs to a limit's name *and* size, so that changing a limit
    /// starts it afresh instead of reading old state at the new rate.
    cells: Vec<(RateLimit, Gcra)>,
    quota: Option<QuotaState>,
    quota_dirty: bool,
}

/// The live state of one key on this node.
#[derive(Debug)]
pub struct KeyRuntime {
    pub key_id: String,
    pub consumer_id: String,
    state: Mutex<State>,
    counts: [AtomicU64; CODES],
    /// Last valid use, ms; updated at most once a second so that the hot path rarely takes a lock.
    last_used_ms: AtomicI64,
    last_used_ip: Mutex<Option<IpAddr>>,
    last_used_dirty: AtomicBool,
    dirty: AtomicBool,
    dirty_list: Arc<Mutex<Vec<Arc<KeyRuntime>>>>,
}

/// The most restrictive rate limit of a check, as decisions report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitState {
    /// Which of the key's limits (an index into them).
    pub index: usize,
    pub limit: u64,
    pub remaining: u64,
    /// When the limit is fully available again, ms since the epoch.
    pub reset_ms: i64,
    /// For a denied request: how long until it would be allowed.
    pub retry_after_ms: i64,
    /// When the check was made, ms since the epoch.
    pub checked_at_ms: i64,
}

impl RateLimitState {
    /// Whether this state describes a denial.
    pub fn denied(&self) -> bool {
        self.retry_after_ms > 0
    }

    /// The one moment every signal names, in whole seconds from the check: for a denial, when the
    /// request would be allowed (at least 1); otherwise when the limit is whole again.
    pub fn reset_seconds(&self) -> u64 {
        if self.denied() {
            (self.retry_after_ms as u64).div_ceil(1000).max(1)
        } else {
            ((self.reset_ms - self.checked_at_ms).max(0) as u64).div_ceil(1000)
        }
    }
}

/// Result of checking (and, if allowed, consuming) rate limits and quota.
#[derive(Debug, Clone)]
pub struct Admission {
    pub code: DecisionCode,
    pub rate_limit: Option<RateLimitState>,
    pub quota_remaining: Option<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the plain data inconsistent; keep serving.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KeyRuntime {
    /// Checks every limit and the quota; consumes only if all allow. Counts nothing.
    ///
    /// A check with `cost` 0 consumes nothing, but answers what a spending call would get: denied when a
    /// limit or the quota could not take one more unit.
    pub fn admit(&self, limits: &[RateLimit], cost: u64, now_ms: i64) -> Admission {
        let probe = cost.max(1);
        let mut st = lock(&self.state);
        let mut denied: Option<(DecisionCode, RateLimitState)> = None;
        let mut tightest: Option<RateLimitState> = None;
        // New cell states, committed only if everything allows the request. No allocation: keys have
        // at most MAX_RATE_LIMITS limits.
        let mut nexts = [(usize::MAX, Gcra::default()); MAX_RATE_LIMITS];
        if limits.iter().any(|limit| !st.cells.iter().any(|(l, _)| l == limit)) {
            // The limits changed: drop cells of limits that are gone, start new ones empty.
            st.cells.retain(|(l, _)| limits.contains(l));
            for limit in limits {
                if !st.cells.iter().any(|(l, _)| l == limit) {
                    st.cells.push((limit.clone(), Gcra::default()));
                }
            }
        }
        for (index, limit) in limits.iter().enumerate().take(MAX_RATE_LIMITS) {
            let Some(idx) = st.cells.iter().position(|(l, _)| l == limit) else { continue };
            let c: LimitCheck = st.cells[idx].1.check(limit, now_ms, probe);
            let view = RateLimitState {
                index,
                limit: limit.limit,
                remaining: c.remaining,
                reset_ms: c.reset_ms,
                retry_after_ms: if c.allowed { 0 } else { c.retry_after_ms.max(1) },
                checked_at_ms: now_ms,
            };
            if !c.allowed {
                if denied.as_ref().is_none_or(|(_, d)| view.retry_after_ms > d.retry_after_ms) {
                    denied = Some((DecisionCode::RateLimited, view));
                }
                continue;
            }
            if tightest.as_ref().is_none_or(|t| view.remaining < t.remaining) {
                tightest = Some(view);
            }
            nexts[index] = (idx, c.next);
        }
        if let Some((code, view)) = denied {
            let quota_remaining = st.quota.as_ref().map(|q| q.remaining);
            return Admission { code, rate_limit: Some(view), quota_remaining };
        }
        if let Some(q) = st.quota.as_mut()
            && let Some(refill) = q.refill.clone()
            && apply_refills(&mut q.remaining, &mut q.refilled_at, &refill, now_ms)
        {
            st.quota_dirty = true;
        }
        if let Some(q) = st.quota.as_mut() {
            if q.remaining < probe {
                let remaining = q.remaining;
                return Admission {
                    code: DecisionCode::QuotaExceeded,
                    rate_limit: tightest,
                    quota_remaining: Some(remaining),
                };
            }
            q.remaining -= cost;
            st.quota_dirty = true;
        }
        if cost == 0 {
            return Admission {
                code: DecisionCode::Valid,
                rate_limit: tightest.map(|t| RateLimitState { remaining: t.remaining + 1, ..t }),
                quota_remaining: st.quota.as_ref().map(|q| q.remaining),
            };
        }
        for (idx, next) in nexts.into_iter().take(limits.len()) {
            if let Some(cell) = st.cells.get_mut(idx) {
                cell.1 = next;
            }
        }
        Admission {
            code: DecisionCode::Valid,
            rate_limit: tightest,
            quota_remaining: st.quota.as_ref().map(|q| q.remaining),
        }
    }

    /// Counts a decision about this key, and for a valid one remembers when and from where.
    pub fn record(self: &Arc<Self>, code: DecisionCode, now_ms: i64, ip: Option<IpAddr>) {
        self.counts[code.index()].fetch_add(1, Ordering::Relaxed);
        if code == DecisionCode::Valid {
            let prev = self.last_used_ms.load(Ordering::Relaxed);
            if now_ms - prev >= 1000
                && self
                    .last_used_ms
                    .compare_exchange(prev, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                *lock(&self.last_used_ip) = ip;
                self.last_used_dirty.store(true, Ordering::Release);
            }
        }
        self.mark_dirty();
    }

    fn mark_dirty(self: &Arc<Self>) {
        if !self.dirty.load(Ordering::Relaxed) && !self.dirty.swap(true, Ordering::AcqRel) {
            lock(&self.dirty_list).push(self.clone());
        }
    }

    pub fn quota(&self) -> Option<QuotaState> {
        lock(&self.state).quota.clone()
    }

    /// Replaces the quota (admin set, top-up, reset). The flusher writes it within one interval.
    pub fn set_quota(self: &Arc<Self>, quota: Option<QuotaState>) {
        {
            let mut st = lock(&self.state);
            st.quota = quota;
            st.quota_dirty = true;
        }
        self.mark_dirty();
    }

    /// Applies `f` to the quota under the lock, returning its result (for read-modify-write changes).
    pub fn update_quota<R>(self: &Arc<Self>, now_ms: i64, f: impl FnOnce(&mut QuotaState) -> R) -> Option<R> {
        let r = {
            let mut st = lock(&self.state);
            let q = st.quota.as_mut()?;
            if let Some(refill) = q.refill.clone() {
                apply_refills(&mut q.remaining, &mut q.refilled_at, &refill, now_ms);
            }
            let r = f(q);
            st.quota_dirty = true;
            r
        };
        self.mark_dirty();
        Some(r)
    }

    pub fn last_used(&self) -> Option<(i64, Option<IpAddr>)> {
        let t = self.last_used_ms.load(Ordering::Acquire);
        (t > 0).then(|| (t, *lock(&self.last_used_ip)))
    }

    /// Takes what changed since the last flush.
    fn take(&self, now_ms: i64) -> KeyUsage {
        self.dirty.store(false, Ordering::Release);
        let counts = DecisionCode::ALL
            .iter()
            .filter_map(|c| {
                let n = self.counts[c.index()].swap(0, Ordering::AcqRel);
                (n > 0).then_some((c.as_str(), n))
            })
            .collect();
        let last_used = if self.last_used_dirty.swap(false, Ordering::AcqRel) {
            self.last_used().map(|(t, ip)| (t, ip.map(|i| i.to_string())))
        } else {
            None
        };
        let mut st = lock(&self.state);
        let quota = if std::mem::take(&mut st.quota_dirty) {
            st.quota.as_ref().map(|q| (q.remaining, q.refilled_at))
        } else {
            None
        };
        let quota_refill = st.quota.as_ref().and_then(|q| q.refill.as_ref()).map(|r| r.amount);
        KeyUsage {
            key_id: self.key_id.clone(),
            consumer_id: self.consumer_id.clone(),
            at: now_ms,
            counts,
            last_used,
            quota,
            quota_refill,
        }
    }

    /// Puts back what a failed flush took, so that nothing is lost.
    fn restore(self: &Arc<Self>, u: &KeyUsage) {
        for (code, n) in &u.counts {
            if let Some(c) = DecisionCode::parse(code) {
                self.counts[c.index()].fetch_add(*n, Ordering::AcqRel);
            }
        }
        if u.last_used.is_some() {
            self.last_used_dirty.store(true, Ordering::Release);
        }
        lock(&self.state).quota_dirty |= u.quota.is_some();
        self.mark_dirty();
    }
}

/// All key runtimes of this node.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Arc<KeyRuntime>>>,
    dirty: Arc<Mutex<Vec<Arc<KeyRuntime>>>>,
    flushing: tokio::sync::Mutex<()>,
}

impl Registry {
    /// The runtime of a key, created from its stored state on first use.
    pub fn get_or_create(&self, key: &ApiKey) -> Arc<KeyRuntime> {
        let mut map = lock(&self.map);
        if let Some(rt) = map.get(&key.id) {
            return rt.clone();
        }
        let state = State {
            quota: key
                .quota
                .as_ref()
                .map(|q| QuotaState::from_config(q, key.quota_refilled_at.unwrap_or(key.created_at))),
            ..State::default()
        };
        let rt = Arc::new(KeyRuntime {
            key_id: key.id.clone(),
            consumer_id: key.consumer_id.clone(),
            state: Mutex::new(state),
            counts: Default::default(),
            last_used_ms: AtomicI64::new(key.last_used_at.unwrap_or(0)),
            last_used_ip: Mutex::new(key.last_used_ip.as_deref().and_then(|i| i.parse().ok())),
            last_used_dirty: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            dirty_list: self.dirty.clone(),
        });
        map.insert(key.id.clone(), rt.clone());
        rt
    }

    /// The runtime that counts an OAuth client's tokens against its consumer's plan (keyed by the client
    /// id; it has no quota). Created on first use.
    pub fn for_client(&self, client_id: &str, consumer_id: &str) -> Arc<KeyRuntime> {
        let mut map = lock(&self.map);
        if let Some(rt) = map.get(client_id) {
            return rt.clone();
        }
        let rt = Arc::new(KeyRuntime {
            key_id: client_id.to_string(),
            consumer_id: consumer_id.to_string(),
            state: Mutex::new(State::default()),
            counts: Default::default(),
            last_used_ms: AtomicI64::new(0),
            last_used_ip: Mutex::new(None),
            last_used_dirty: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            dirty_list: self.dirty.clone(),
        });
        map.insert(client_id.to_string(), rt.clone());
        rt
    }

    pub fn get(&self, key_id: &str) -> Option<Arc<KeyRuntime>> {
        lock(&self.map).get(key_id).cloned()
    }

    /// Writes every pending change in one transaction. On failure nothing is lost: the changes are put
    /// back and go out with the next flush. Flushes run one at a time, so a caller that flushes before
    /// reading (a usage report) also waits for a flush already under way instead of reading before it
    /// commits.
    /// The events the batch gives rise to (quota and rate-limit events) are written with it.
    pub async fn flush(
        &self,
        store: &dyn Store,
        now_ms: i64,
        events: &crate::webhooks::WebhookConfig,
    ) -> Result<usize, StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        if dirty.is_empty() {
            return Ok(0);
        }
        let batch: Vec<KeyUsage> = dirty.iter().map(|rt| rt.take(now_ms)).collect();
        let events = crate::webhooks::usage_events(&batch, events);
        match store.flush_usage(&batch, &events).await {
            Ok(()) => Ok(batch.len()),
            Err(e) => {
                for (rt, u) in dirty.iter().zip(&batch) {
                    rt.restore(u);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(quota: Option<u64>) -> Arc<KeyRuntime> {
        let reg = Registry::default();
        let mut key = ApiKey::new(
            "key_1".into(),
            "cons_1".into(),
            "k".into(),
            keygate_core::Environment::Live,
            vec![],
            serde_json::json!({}),
            None,
            "kg".into(),
            0,
        );
        key.quota = quota.map(|remaining| Quota { remaining, refill: None });
        reg.get_or_create(&key)
    }

    #[test]
    fn rejected_checks_consume_nothing() {
        let r = rt(Some(5));
        let limits = vec![RateLimit { name: "a".into(), limit: 2, window_seconds: 60 }];
        assert_eq!(r.admit(&limits, 1, 0).code, DecisionCode::Valid);
        assert_eq!(r.admit(&limits, 1, 0).code, DecisionCode::Valid);
        let denied = r.admit(&limits, 1, 0);
        assert_eq!(denied.code, DecisionCode::RateLimited);
        assert_eq!(denied.quota_remaining, Some(3), "a rate-limited request takes no quota");
        // A second, looser limit: the request over the quota consumes no rate-limit cell.
        let loose = vec![RateLimit { name: "b".into(), limit: 100, window_seconds: 60 }];
        let over = r.admit(&loose, 4, 0);
        assert_eq!(over.code, DecisionCode::QuotaExceeded);
        assert_eq!(over.quota_remaining, Some(3));
        let ok = r.admit(&loose, 3, 0);
        assert_eq!(ok.code, DecisionCode::Valid);
        assert_eq!(ok.rate_limit.unwrap().remaining, 97, "the failed request left the cell untouched");
        assert_eq!(ok.quota_remaining, Some(0));
    }

    #[test]
    fn a_zero_cost_check_answers_like_a_spending_call_and_consumes_nothing() {
        let r = rt(None);
        let limits = vec![RateLimit { name: "a".into(), limit: 1, window_seconds: 60 }];
        let probe = r.admit(&limits, 0, 0);
        assert_eq!(probe.code, DecisionCode::Valid);
        assert_eq!(probe.rate_limit.unwrap().remaining, 1, "nothing consumed");
        assert_eq!(r.admit(&limits, 1, 0).code, DecisionCode::Valid);
        assert_eq!(
            r.admit(&limits, 0, 0).code,
            DecisionCode::RateLimited,
            "a spending call would be refused"
        );
    }
}
