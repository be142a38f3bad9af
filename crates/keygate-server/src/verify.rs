//! The hot path: deciding whether a presented credential is good.
//!
//! ```text
//! parse prefix + checksum (no I/O) → SHA-256 → positive cache
//! → known-hash filter (unknown secrets stop here, no I/O) → negative cache → one store read, cached
//! → revoked / disabled / expired / IP / scopes → rate limits + quota (one lock, all or nothing)
//! → usage counters (memory) → decision
//! ```
//!
//! Policy:
//! - No database write happens here, and a cached credential costs no I/O at all.
//! - The positive cache holds everything a decision needs, including the JSON of the `VALID` decision,
//!   serialised once when the entry is filled; `MALFORMED` and `NOT_FOUND` bodies are static.
//! - Every change to a key or consumer invalidates the affected entries on this node before the admin
//!   call returns, so revocation takes effect for the very next request. Expiry, including the end of a
//!   rotation's overlap window, is checked against the clock on every request. A TTL bounds how long an
//!   entry can live at all, as a safety net.
//! - The known-hash filter holds a 64-bit fingerprint of every stored secret's hash. A secret whose
//!   fingerprint is absent cannot exist, so floods of random keys never reach the store. Strings without
//!   a Keygate prefix can only be imported keys: absent from the filter they are `MALFORMED`.
//! - The cache is keyed by SHA-256 of the secret. A hash-table probe on a digest leaks nothing useful
//!   about the secret; the stored hash is compared in constant time on the miss path.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use keygate_core::credential::{self, CredentialError};
use keygate_core::limits::{RateLimit, ip_allowed};
use keygate_core::{DecisionCode, SecretHash, scope};
use keygate_store::{SecretRecord, Store, StoreError};
use moka::sync::Cache;

use crate::cache::{GuardedCache, Ticket};
use crate::decision_body::{ValidBody, json_body};
use crate::oauth::tokens::TokenInfo;
use crate::runtime::{KeyRuntime, RateLimitState, Registry};

/// Sizing of the verify caches.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Most entries in the positive cache (each is a few hundred bytes plus metadata).
    pub capacity: u64,
    /// Longest time any entry lives before it is re-read from the store.
    pub ttl: Duration,
    /// Longest time a "no such credential" answer is remembered.
    pub negative_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 1_000_000,
            ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

/// What the verify path remembers about one secret.
#[derive(Debug)]
pub struct CachedKey {
    pub hash: SecretHash,
    pub key_id: String,
    pub consumer_id: String,
    pub scopes: Vec<String>,
    /// The earlier of the key's expiry and this secret's (after a rotation).
    pub expires_at: Option<i64>,
    pub revoked: bool,
    /// The key or its consumer is disabled.
    pub disabled: bool,
    /// Effective rate limits: the key's own, or else its consumer's.
    pub limits: Vec<RateLimit>,
    pub allowed_ips: Option<Vec<ipnet::IpNet>>,
    pub has_quota: bool,
    /// The `VALID` decision's JSON without its closing brace, for appending live fields.
    pub valid_prefix: Bytes,
    /// The complete `VALID` body, for keys without limits or quota.
    pub valid_body: Bytes,
    /// Scopes joined by spaces, for the forward-auth header.
    pub scopes_header: String,
    pub runtime: Arc<KeyRuntime>,
}

/// A verify decision. `key` is set whenever the credential was identified.
#[derive(Debug, Clone)]
pub struct Decision {
    pub code: DecisionCode,
    pub key: Option<Arc<CachedKey>>,
    /// Required scopes the key lacks, for `INSUFFICIENT_SCOPE`.
    pub missing_scopes: Vec<String>,
    pub rate_limit: Option<RateLimitState>,
    pub quota_remaining: Option<u64>,
    /// Refused for quota only because this node must lease more of the shared pool first (nothing was
    /// counted); `Verifier::verify` leases and decides again.
    pub needs_lease: bool,
    /// Not decided yet: the rate limits are shared by every node and must be asked first (nothing was
    /// consumed or counted); `Verifier::verify` asks them.
    pub needs_limits: bool,
    /// Set when the credential was an access token that verified.
    pub token: Option<Arc<TokenInfo>>,
    /// For access tokens: the consumer's plan that `rate_limit` indexes into.
    pub token_limits: Option<Arc<Vec<RateLimit>>>,
}

/// The request-dependent inputs of a decision.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The end client's address, for IP allow-lists and last-used tracking.
    pub ip: Option<IpAddr>,
    /// How many units of rate limit and quota this request uses (default 1).
    pub cost: u64,
    pub now_ms: i64,
}

impl Context {
    pub fn at(now_ms: i64) -> Self {
        Context { ip: None, cost: 1, now_ms }
    }
}

/// The cached fast path either decides, or says which hash to read from the store.
#[derive(Debug)]
pub enum Lookup {
    Decided(Decision),
    Miss(Miss),
}

/// A credential the caches could not decide about: what the store read needs, and what the parse
/// already found out (so that the miss path does not parse it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss {
    pub hash: SecretHash,
    /// In Keygate's format (so absent means `NOT_FOUND`); otherwise a possible imported key (absent means
    /// `MALFORMED`).
    pub keygate_format: bool,
    /// The known-hash filter does not have it, but the store is shared: another node may have stored it
    /// a moment ago. The filter catches up (one read for every such miss at once) before deciding.
    pub unknown_here: bool,
}

impl Decision {
    pub fn bare(code: DecisionCode) -> Self {
        Decision {
            code,
            key: None,
            missing_scopes: Vec::new(),
            rate_limit: None,
            quota_remaining: None,
            needs_lease: false,
            needs_limits: false,
            token: None,
            token_limits: None,
        }
    }

    /// A decision about an access token that verified: valid, or lacking scopes.
    pub fn for_token<S: AsRef<str>>(token: Arc<TokenInfo>, required: &[S]) -> Self {
        let missing: Vec<String> =
            scope::missing(&token.scopes, required).into_iter().map(str::to_owned).collect();
        let code = if missing.is_empty() { DecisionCode::Valid } else { DecisionCode::InsufficientScope };
        Decision { missing_scopes: missing, token: Some(token), ..Decision::bare(code) }
    }

    fn about(code: DecisionCode, key: Arc<CachedKey>) -> Self {
        Decision { key: Some(key), ..Decision::bare(code) }
    }

    pub fn is_valid(&self) -> bool {
        self.code == DecisionCode::Valid
    }
}

/// Fingerprints of every stored secret hash, loaded at start and followed as secrets are added.
#[derive(Debug, Default)]
pub struct KnownHashes {
    set: RwLock<HashSet<u64>>,
    /// Change number of the newest secret seen in the store (assigned in commit order: see
    /// `Store::secret_changes_after`).
    seq: AtomicI64,
    ready: AtomicBool,
    /// Follows run one at a time. `started` numbers them as they start; `succeeded` is the number of
    /// the last one that finished without error, so a waiter can tell whether a follow that started
    /// after it asked has read the store.
    following: tokio::sync::Mutex<()>,
    started: std::sync::atomic::AtomicU64,
    succeeded: std::sync::atomic::AtomicU64,
}

fn fingerprint(h: &SecretHash) -> u64 {
    let b = h.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

impl KnownHashes {
    /// `None` until the first load finished: then nothing can be ruled out.
    pub fn may_contain(&self, h: &SecretHash) -> Option<bool> {
        if !self.ready.load(Ordering::Acquire) {
            return None;
        }
        Some(self.set.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&fingerprint(h)))
    }

    /// Makes secrets known at once (they were just stored on this node).
    pub fn insert(&self, hashes: &[SecretHash]) {
        let mut set = self.set.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        for h in hashes {
            set.insert(fingerprint(h));
        }
    }

    /// Follows the store now, unless a follow that started after this call finished meanwhile (many
    /// concurrent misses share one read).
    pub async fn catch_up(&self, store: &dyn Store) -> Result<(), StoreError> {
        let asked = self.started.load(Ordering::Acquire);
        let one = self.following.lock().await;
        if self.succeeded.load(Ordering::Acquire) > asked {
            return Ok(());
        }
        self.follow_locked(store, one).await?;
        Ok(())
    }

    /// Reads every secret added to the store since the last call (all of them the first time).
    pub async fn follow(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let one = self.following.lock().await;
        self.follow_locked(store, one).await
    }

    async fn follow_locked(
        &self,
        store: &dyn Store,
        _one: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<usize, StoreError> {
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let added = self.follow_inner(store).await?;
        self.succeeded.store(number, Ordering::Release);
        Ok(added)
    }

    async fn follow_inner(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let mut added = 0;
        loop {
            let rows = store.secret_changes_after(self.seq.load(Ordering::Acquire), 50_000).await?;
            let Some(&(last, _)) = rows.last() else { break };
            {
                let mut set = self.set.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (_, h) in &rows {
                    set.insert(fingerprint(h));
                }
            }
            added += rows.len();
            self.seq.store(last, Ordering::Release);
        }
        self.ready.store(true, Ordering::Release);
        Ok(added)
    }
}

pub struct Verifier {
    store: Arc<dyn Store>,
    /// The store is shared with other nodes (see [`Miss::unknown_here`]).
    shared: bool,
    /// Rate limits shared by every node (`rate_limits.redis_url`), once connected.
    pub shared_limits: std::sync::OnceLock<Arc<crate::shared_limits::SharedLimits>>,
    positive: GuardedCache<SecretHash, Arc<CachedKey>>,
    negative: GuardedCache<SecretHash, ()>,
    pub known: KnownHashes,
    pub runtimes: Registry,
}

impl Verifier {
    pub fn new(store: Arc<dyn Store>, config: &CacheConfig) -> Self {
        let shared = store.shared();
        Verifier {
            shared,
            shared_limits: std::sync::OnceLock::new(),
            store,
            positive: GuardedCache::new(
                Cache::builder().max_capacity(config.capacity).time_to_live(config.ttl).build(),
            ),
            negative: GuardedCache::new(
                Cache::builder()
                    .max_capacity((config.capacity / 4).max(1024))
                    .time_to_live(config.negative_ttl)
                    .build(),
            ),
            known: KnownHashes::default(),
            runtimes: if shared { Registry::shared() } else { Registry::default() },
        }
    }

    /// The in-memory part of verify: decides without I/O, or names the hash to look up.
    pub fn verify_cached<S: AsRef<str>>(&self, secret: &str, required: &[S], ctx: Context) -> Lookup {
        let keygate_format = match credential::parse(secret) {
            Ok(_) => true,
            Err(CredentialError::UnknownPrefix) => false,
            Err(_) => return Lookup::Decided(Decision::bare(DecisionCode::Malformed)),
        };
        let hash = SecretHash::of(secret);
        if let Some(key) = self.positive.get(&hash) {
            return Lookup::Decided(decide_key(key, required, ctx, self.limits()));
        }
        let absent = if keygate_format { DecisionCode::NotFound } else { DecisionCode::Malformed };
        let unknown_here = match self.known.may_contain(&hash) {
            Some(false) if self.shared => true,
            Some(false) => return Lookup::Decided(Decision::bare(absent)),
            None if !keygate_format => return Lookup::Decided(Decision::bare(absent)),
            _ => false,
        };
        if self.negative.contains_key(&hash) {
            return Lookup::Decided(Decision::bare(absent));
        }
        Lookup::Miss(Miss { hash, keygate_format, unknown_here })
    }

    /// Where this node checks rate limits first.
    fn limits(&self) -> Limits<'static> {
        if self.shared_limits.get().is_some() { Limits::Deferred } else { Limits::Local }
    }

    /// Full verify: the cached path, then at most one store read.
    pub async fn verify<S: AsRef<str>>(
        &self,
        secret: &str,
        required: &[S],
        ctx: Context,
    ) -> Result<Decision, StoreError> {
        let mut decision = match self.verify_cached(secret, required, ctx) {
            Lookup::Decided(d) => d,
            Lookup::Miss(miss) => {
                if miss.unknown_here {
                    self.known.catch_up(self.store.as_ref()).await?;
                    if self.known.may_contain(&miss.hash) == Some(false) {
                        let absent = if miss.keygate_format {
                            DecisionCode::NotFound
                        } else {
                            DecisionCode::Malformed
                        };
                        return Ok(Decision::bare(absent));
                    }
                }
                let ticket = self.ticket();
                let record = self.store.find_secret(&miss.hash).await?;
                self.complete_miss(ticket, miss, record, required, ctx)
            }
        };
        // With shared rate limits: ask them, then decide with their answer.
        let mut shared = None;
        if decision.needs_limits
            && let Some(key) = decision.key.clone()
        {
            if let Some(limiter) = self.shared_limits.get() {
                shared = limiter.check(&key.key_id, &key.limits, ctx.cost).await;
            }
            decision = decide_key(key, required, ctx, shared.as_ref().map_or(Limits::Local, Limits::Shared));
        }
        let limits = shared.as_ref().map_or(Limits::Local, Limits::Shared);
        // On a shared database: lease more quota and decide again (other requests may take the new
        // units first; after a few rounds the answer is what the pool says).
        let mut leased = Ok(());
        for round in 0..4 {
            let Some(key) = decision.key.clone().filter(|_| decision.needs_lease) else { break };
            if round == 3 {
                key.runtime.record(DecisionCode::QuotaExceeded, ctx.now_ms, ctx.ip);
                decision.needs_lease = false;
                break;
            }
            leased = key.runtime.lease(self.store.as_ref(), ctx.cost.max(1), ctx.now_ms).await;
            if leased.is_err() {
                break;
            }
            decision = decide_key(key, required, ctx, limits);
        }
        // The shared limits let it through, the quota did not (or could not be asked): their units go
        // back.
        if let (Some(c), Some(key), Some(limiter)) = (&shared, &decision.key, self.shared_limits.get())
            && c.consumed
            && (!decision.is_valid() || leased.is_err())
        {
            limiter.refund(&key.key_id, &key.limits, ctx.cost);
        }
        leased?;
        Ok(decision)
    }

    /// The key behind a secret's hash, cached like any verify (for tokens exchanged from a key, which
    /// must stop when the key does).
    pub async fn key_by_hash(&self, hash: &SecretHash) -> Result<Option<Arc<CachedKey>>, StoreError> {
        if let Some(k) = self.positive.get(hash) {
            return Ok(Some(k));
        }
        let ticket = self.ticket();
        match self.store.find_secret(hash).await? {
            Some(record) if record.hash.ct_eq(hash) => {
                let key = Arc::new(self.cached_key(&record));
                self.positive.insert_if_current(ticket.0, *hash, key.clone());
                Ok(Some(key))
            }
            _ => Ok(None),
        }
    }

    /// Taken before a miss reads the store (see [`GuardedCache`]).
    pub fn ticket(&self) -> (Ticket, Ticket) {
        (self.positive.ticket(), self.negative.ticket())
    }

    /// Decides from what a miss read, and caches it unless an invalidation came in between (then the
    /// request gets its answer, and the next one reads the store again).
    pub fn complete_miss<S: AsRef<str>>(
        &self,
        ticket: (Ticket, Ticket),
        miss: Miss,
        record: Option<SecretRecord>,
        required: &[S],
        ctx: Context,
    ) -> Decision {
        let hash = miss.hash;
        match record {
            Some(record) if record.hash.ct_eq(&hash) => {
                let key = Arc::new(self.cached_key(&record));
                self.positive.insert_if_current(ticket.0, hash, key.clone());
                decide_key(key, required, ctx, self.limits())
            }
            _ => {
                self.negative.insert_if_current(ticket.1, hash, ());
                Decision::bare(if miss.keygate_format {
                    DecisionCode::NotFound
                } else {
                    DecisionCode::Malformed
                })
            }
        }
    }

    /// Forgets what is cached about these secrets; the next verify reads the store.
    pub fn invalidate(&self, hashes: &[SecretHash]) {
        self.positive.invalidate(hashes);
        self.negative.invalidate(hashes);
    }

    /// Forgets every cached answer (when the affected secrets cannot be listed).
    pub fn invalidate_all(&self) {
        self.positive.invalidate_all();
        self.negative.invalidate_all();
    }

    /// Secrets were just stored on this node: make them known at once. A new secret cannot be in the
    /// positive cache; a "not found" for it is forgotten, and a miss that read the store before it was
    /// written will not cache one.
    pub fn added(&self, hashes: &[SecretHash]) {
        self.known.insert(hashes);
        self.negative.invalidate(hashes);
    }

    fn cached_key(&self, r: &SecretRecord) -> CachedKey {
        let k = &r.key;
        // Scopes stored before today's rules (e.g. with a comma) grant nothing and reach no header.
        let scopes = scope::usable_only(&k.scopes);
        let expires_at = match (k.expires_at, r.secret_expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let body = ValidBody {
            valid: true,
            code: DecisionCode::Valid,
            kind: "api_key",
            key_id: &k.id,
            consumer_id: &k.consumer_id,
            name: &k.name,
            environment: k.environment.as_str(),
            scopes: &scopes,
            expires_at: expires_at.map(crate::time::rfc3339),
            metadata: &k.metadata,
            rate_limit: None,
            quota: None,
        };
        let valid_body = json_body(&body, DecisionCode::Valid);
        let valid_prefix = valid_body.slice(..valid_body.len().saturating_sub(1));
        let allowed_ips = k.allowed_ips.as_ref().map(|list| {
            // Stored lists were validated on the way in; an unparsable entry allows nothing.
            list.iter()
                .filter_map(|e| keygate_core::limits::parse_allowed_ips(std::slice::from_ref(e)).ok())
                .flatten()
                .collect()
        });
        CachedKey {
            hash: r.hash,
            key_id: k.id.clone(),
            consumer_id: k.consumer_id.clone(),
            scopes_header: scopes.join(" "),
            scopes,
            expires_at,
            revoked: k.revoked_at.is_some(),
            disabled: k.disabled || r.consumer_disabled,
            limits: k.rate_limits.clone().or_else(|| r.consumer_rate_limits.clone()).unwrap_or_default(),
            allowed_ips,
            has_quota: k.quota.is_some(),
            valid_prefix,
            valid_body,
            runtime: self.runtimes.get_or_create(k),
        }
    }
}

/// Where a decision's rate limits are checked.
#[derive(Clone, Copy)]
enum Limits<'a> {
    /// This node's cells.
    Local,
    /// The cells every node shares, not asked yet: a key with limits is left undecided
    /// (`needs_limits`) for `Verifier::verify` to ask them.
    Deferred,
    /// The shared cells' answer.
    Shared(&'a crate::shared_limits::SharedCheck),
}

fn decide_key<S: AsRef<str>>(
    key: Arc<CachedKey>,
    required: &[S],
    ctx: Context,
    limits: Limits<'_>,
) -> Decision {
    let code = if key.revoked {
        DecisionCode::Revoked
    } else if key.disabled {
        DecisionCode::Disabled
    } else if key.expires_at.is_some_and(|t| t <= ctx.now_ms) {
        DecisionCode::Expired
    } else if key.allowed_ips.as_ref().is_some_and(|r| !ctx.ip.is_some_and(|ip| ip_allowed(r, ip))) {
        DecisionCode::IpNotAllowed
    } else if !scope::satisfies(&key.scopes, required) {
        let missing = scope::missing(&key.scopes, required).into_iter().map(str::to_owned).collect();
        key.runtime.record(DecisionCode::InsufficientScope, ctx.now_ms, ctx.ip);
        return Decision { missing_scopes: missing, ..Decision::about(DecisionCode::InsufficientScope, key) };
    } else if key.limits.is_empty() && !key.has_quota {
        DecisionCode::Valid
    } else if matches!(limits, Limits::Deferred) && !key.limits.is_empty() {
        return Decision { needs_limits: true, ..Decision::about(DecisionCode::Valid, key) };
    } else {
        let shared = if let Limits::Shared(c) = limits { Some(c) } else { None };
        let admission = key.runtime.admit_with(&key.limits, ctx.cost, ctx.now_ms, shared);
        if !admission.needs_lease {
            key.runtime.record(admission.code, ctx.now_ms, ctx.ip);
        }
        return Decision {
            rate_limit: admission.rate_limit,
            quota_remaining: admission.quota_remaining,
            needs_lease: admission.needs_lease,
            ..Decision::about(admission.code, key)
        };
    };
    key.runtime.record(code, ctx.now_ms, ctx.ip);
    Decision::about(code, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decision_body_is_json_with_its_code() {
        for code in DecisionCode::ALL {
            let body = Decision::bare(code).body();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["code"], code.as_str(), "{code:?}");
            assert!(v["valid"].is_boolean(), "{code:?}");
        }
    }
}
