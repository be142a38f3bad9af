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
//! - On a shared database (several nodes) the stored quota is a pool the nodes lease from
//!   (`Store::lease_quota`): a node admits from its lease in memory and takes another block when it runs
//!   out, so no node admits a unit another node could also admit. A lease is void when the refill
//!   period it came from ends, or when an admin sets the quota (the pool's epoch changes); unused units
//!   go back to the pool when the node stops. A node that dies holding a lease loses its units until
//!   the next refill (at most an eighth of the pool, and at most 1000, per key).

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
    /// On a shared database: `quota` is this node's lease from the pool, and this says about it.
    lease: Option<Lease>,
}

/// A node's lease of a key's quota (its units are `QuotaState::remaining`, its period `refilled_at`).
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    /// The pool's epoch the units came from.
    epoch: i64,
    /// Whether the units are current (false: take a lease before admitting anything).
    valid: bool,
    /// The pool could not give this many units at the last lease: until `recheck_at`, only smaller
    /// requests ask it again.
    short_of: u64,
    /// An empty pool is asked again no sooner than this (ms).
    recheck_at: i64,
    /// The pool after the last lease, for the remaining uses decisions report.
    pool_left: u64,
}

impl State {
    /// The quota part of an admission (the limits allowed it; `tightest` is the tightest of them), and
    /// `commit` of the limits' new cells when the request is admitted with a cost.
    fn admit_quota(
        &mut self,
        tightest: Option<RateLimitState>,
        cost: u64,
        probe: u64,
        now_ms: i64,
        commit: impl FnOnce(&mut State),
    ) -> Admission {
        let State { quota, quota_dirty, lease, .. } = self;
        match (quota.as_mut(), lease.as_mut()) {
            (Some(q), Some(l)) => {
                // A lease ends with its refill period: the pool is refilled for everyone at once.
                if let Some(refill) = &q.refill
                    && keygate_core::limits::next_refill(refill, q.refilled_at) <= now_ms
                {
                    q.remaining = 0;
                    l.valid = false;
                }
                if q.remaining < probe {
                    let needs_lease = !l.valid || probe < l.short_of || now_ms >= l.recheck_at;
                    return Admission {
                        code: DecisionCode::QuotaExceeded,
                        rate_limit: tightest,
                        quota_remaining: Some(q.remaining + l.pool_left),
                        needs_lease,
                    };
                }
                q.remaining -= cost;
                // Not written back (the pool is the store's), but the flush reports it for quota events.
                *quota_dirty = true;
            }
            (Some(q), None) => {
                if let Some(refill) = q.refill.clone()
                    && apply_refills(&mut q.remaining, &mut q.refilled_at, &refill, now_ms)
                {
                    *quota_dirty = true;
                }
                if q.remaining < probe {
                    return Admission {
                        code: DecisionCode::QuotaExceeded,
                        rate_limit: tightest,
                        quota_remaining: Some(q.remaining),
                        needs_lease: false,
                    };
                }
                q.remaining -= cost;
                *quota_dirty = true;
            }
            (None, _) => {}
        }
        if cost == 0 {
            return Admission {
                code: DecisionCode::Valid,
                rate_limit: tightest.map(|t| RateLimitState { remaining: t.remaining + 1, ..t }),
                quota_remaining: self.remaining(),
                needs_lease: false,
            };
        }
        commit(self);
        Admission {
            code: DecisionCode::Valid,
            rate_limit: tightest,
            quota_remaining: self.remaining(),
            needs_lease: false,
        }
    }

    /// Uses left, as decisions report them: the quota here, or on a shared database this node's lease
    /// plus what the pool had at the last lease.
    fn remaining(&self) -> Option<u64> {
        let q = self.quota.as_ref()?;
        Some(q.remaining + self.lease.map_or(0, |l| l.pool_left))
    }
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
    /// One lease request at a time (see [`KeyRuntime::lease`]).
    leasing: tokio::sync::Mutex<()>,
    /// Created for a shared database (quotas are leased).
    shared: bool,
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
    /// Refused for quota only because this node's lease is used up or void: take a lease
    /// ([`KeyRuntime::lease`]) and check again. Nothing was consumed or counted.
    pub needs_lease: bool,
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
        self.admit_with(limits, cost, now_ms, None)
    }

    /// [`KeyRuntime::admit`], with the rate limits decided by the cells every node shares
    /// (`shared_limits`) instead of this node's: then only the quota is checked here.
    pub fn admit_with(
        &self,
        limits: &[RateLimit],
        cost: u64,
        now_ms: i64,
        shared: Option<&crate::shared_limits::SharedCheck>,
    ) -> Admission {
        let probe = cost.max(1);
        let mut st = lock(&self.state);
        if let Some(check) = shared {
            if let Some(view) = check.denied.clone() {
                let quota_remaining = st.remaining();
                return Admission {
                    code: DecisionCode::RateLimited,
                    rate_limit: Some(view),
                    quota_remaining,
                    needs_lease: false,
                };
            }
            return st.admit_quota(check.tightest.clone(), cost, probe, now_ms, |_| {});
        }
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
            let quota_remaining = st.remaining();
            return Admission { code, rate_limit: Some(view), quota_remaining, needs_lease: false };
        }
        st.admit_quota(tightest, cost, probe, now_ms, |st| {
            for (idx, next) in nexts.into_iter().take(limits.len()) {
                if let Some(cell) = st.cells.get_mut(idx) {
                    cell.1 = next;
                }
            }
        })
    }

    /// On a shared database: takes a block of the key's quota for this node (one caller at a time per
    /// key; callers that waited find the block another took). A pool that cannot give `min` units is
    /// asked again no sooner than a second later.
    pub async fn lease(&self, store: &dyn Store, min: u64, now_ms: i64) -> Result<(), StoreError> {
        let _one = self.leasing.lock().await;
        {
            let st = lock(&self.state);
            match (&st.quota, &st.lease) {
                (Some(q), Some(l)) if l.valid && q.remaining >= min.max(1) => return Ok(()),
                (_, None) | (None, _) => return Ok(()),
                _ => {}
            }
        }
        let got = store.lease_quota(&self.key_id, min, now_ms).await?;
        let mut st = lock(&self.state);
        let State { quota, lease, .. } = &mut *st;
        match (got, quota.as_mut(), lease.as_mut()) {
            (Some(g), Some(q), Some(l)) => {
                if l.valid && l.epoch == g.epoch && q.refilled_at == g.refilled_at {
                    q.remaining = q.remaining.saturating_add(g.granted);
                } else {
                    // Units of an older period or epoch are void.
                    q.remaining = g.granted;
                    q.refilled_at = g.refilled_at;
                }
                *l = Lease {
                    epoch: g.epoch,
                    valid: true,
                    short_of: if g.granted == 0 { min.max(1) } else { 0 },
                    recheck_at: if g.granted == 0 { now_ms + 1000 } else { 0 },
                    pool_left: g.pool_left,
                };
            }
            (None, _, _) => {
                // The key has no quota any more: admit without one until its cache entry is filled again.
                *quota = None;
            }
            _ => {}
        }
        Ok(())
    }

    /// On a shared database, after the stored quota changed (here or on another node): gives this node's
    /// unused lease back (a no-op in the store if the pool changed epoch since, i.e. the units are void)
    /// and takes the stored quota's settings, leasing afresh on the next request. Runs between leases,
    /// never during one, so no lease taken concurrently is lost.
    ///
    /// Best effort: the change is already committed when this runs, so a failure to give the lease back
    /// is logged, never an error (the units are lost until the next refill, as for a node that dies).
    pub async fn replace_shared_quota(self: &Arc<Self>, store: &dyn Store, quota: Option<QuotaState>) {
        let _one = self.leasing.lock().await;
        if let Some((units, epoch)) = self.take_lease()
            && let Err(e) = store.return_quota(&self.key_id, units, epoch).await
        {
            tracing::warn!(key_id = %self.key_id, units, error = %e, "could not give a quota lease back");
        }
        self.set_quota(quota);
    }

    /// The unused units of this node's current lease (0 without one).
    pub fn leased(&self) -> u64 {
        let st = lock(&self.state);
        match (&st.quota, &st.lease) {
            (Some(q), Some(l)) if l.valid => q.remaining,
            _ => 0,
        }
    }

    /// The unused units of a current lease, taken (for giving back when the node stops).
    fn take_lease(&self) -> Option<(u64, i64)> {
        let mut st = lock(&self.state);
        let State { quota, lease, .. } = &mut *st;
        match (quota.as_mut(), lease.as_mut()) {
            (Some(q), Some(l)) if l.valid && q.remaining > 0 => {
                l.valid = false;
                Some((std::mem::take(&mut q.remaining), l.epoch))
            }
            _ => None,
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

    /// The live quota on this node; `None` without one, and on a shared database (where this node holds
    /// only a lease, and the stored pool is the figure to show).
    pub fn quota(&self) -> Option<QuotaState> {
        let st = lock(&self.state);
        if st.lease.is_some() { None } else { st.quota.clone() }
    }

    /// Replaces the quota (admin set, top-up, reset). The flusher writes it within one interval. On a
    /// shared database the store already holds the new pool: the lease is void, and the next verify
    /// leases from the new pool.
    pub fn set_quota(self: &Arc<Self>, quota: Option<QuotaState>) {
        {
            let mut st = lock(&self.state);
            if st.lease.is_some() || (self.shared && quota.is_some()) {
                st.lease = quota.as_ref().map(|q| Lease { pool_left: q.remaining, ..Lease::default() });
                st.quota = quota.map(|q| QuotaState { remaining: 0, ..q });
                return;
            }
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
        // On a shared database this is the lease plus the pool as last seen: a shared store writes no
        // quota from it (the pool changes by leases only), it only reports it for quota events.
        let quota = if std::mem::take(&mut st.quota_dirty) {
            st.quota.as_ref().and_then(|q| Some((st.remaining()?, q.refilled_at)))
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
    /// The database is shared with other nodes: quotas are leased.
    shared: bool,
}

impl Registry {
    /// The runtime of a key, created from its stored state on first use.
    pub fn get_or_create(&self, key: &ApiKey) -> Arc<KeyRuntime> {
        let mut map = lock(&self.map);
        if let Some(rt) = map.get(&key.id) {
            return rt.clone();
        }
        let quota = key
            .quota
            .as_ref()
            .map(|q| QuotaState::from_config(q, key.quota_refilled_at.unwrap_or(key.created_at)));
        let state = if self.shared {
            // Nothing is admitted before the first lease.
            State {
                lease: quota.as_ref().map(|_| Lease::default()),
                quota: quota.map(|q| QuotaState { remaining: 0, ..q }),
                ..State::default()
            }
        } else {
            State { quota, ..State::default() }
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
            leasing: tokio::sync::Mutex::new(()),
            shared: self.shared,
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
            leasing: tokio::sync::Mutex::new(()),
            shared: self.shared,
        });
        map.insert(client_id.to_string(), rt.clone());
        rt
    }

    pub fn get(&self, key_id: &str) -> Option<Arc<KeyRuntime>> {
        lock(&self.map).get(key_id).cloned()
    }

    /// A registry for a database shared with other nodes (quotas are leased).
    pub fn shared() -> Self {
        Registry { shared: true, ..Registry::default() }
    }

    /// Gives every unused leased unit back to its pool (when the node stops). Units whose pool changed
    /// epoch meanwhile are dropped.
    pub async fn return_leases(&self, store: &dyn Store) -> Result<u64, StoreError> {
        let runtimes: Vec<Arc<KeyRuntime>> = lock(&self.map).values().cloned().collect();
        let mut returned = 0;
        for rt in runtimes {
            if let Some((units, epoch)) = rt.take_lease() {
                store.return_quota(&rt.key_id, units, epoch).await?;
                returned += units;
            }
        }
        Ok(returned)
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
