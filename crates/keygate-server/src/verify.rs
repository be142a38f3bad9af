//! The hot path: deciding whether a presented credential is good.
//!
//! ```text
//! parse prefix + checksum (no I/O) → SHA-256 → cache (positive and negative entries)
//! → on a miss: one indexed store read, then cache → revoked / disabled / expired / scopes → decision
//! ```
//!
//! Policy:
//! - No database write happens here, and a cached credential costs no I/O at all.
//! - The positive cache holds everything a decision needs, including the JSON body of the `VALID`
//!   decision, serialised once when the entry is filled; `MALFORMED` and `NOT_FOUND` bodies are static.
//! - Every change to a key or consumer invalidates the affected entries on this node before the admin
//!   call returns, so revocation takes effect for the very next request. Expiry, including the end of a
//!   rotation's overlap window, is checked against the clock on every request, so it needs no
//!   invalidation. A TTL bounds how long an entry can live at all, as a safety net.
//! - The cache is keyed by SHA-256 of the secret. A hash-table probe on a SHA-256 digest leaks nothing
//!   useful about the secret; the stored hash is still compared in constant time on the miss path.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keygate_core::credential;
use keygate_core::{DecisionCode, SecretHash, scope};
use keygate_store::{SecretRecord, Store, StoreError};
use moka::sync::Cache;
use serde::Serialize;

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
    /// The complete JSON body of this key's `VALID` decision.
    pub valid_body: Bytes,
    /// Scopes joined by spaces, for the forward-auth header.
    pub scopes_header: String,
}

/// A verify decision. `key` is set whenever the credential was identified.
#[derive(Debug, Clone)]
pub struct Decision {
    pub code: DecisionCode,
    pub key: Option<Arc<CachedKey>>,
    /// Required scopes the key lacks, for `INSUFFICIENT_SCOPE`.
    pub missing_scopes: Vec<String>,
}

/// The cached fast path either decides, or says which hash to read from the store.
#[derive(Debug)]
pub enum Lookup {
    Decided(Decision),
    Miss(SecretHash),
}

#[derive(Serialize)]
struct ValidBody<'a> {
    valid: bool,
    code: DecisionCode,
    kind: &'static str,
    key_id: &'a str,
    consumer_id: &'a str,
    name: &'a str,
    environment: &'static str,
    scopes: &'a [String],
    expires_at: Option<String>,
    metadata: &'a serde_json::Value,
}

#[derive(Serialize)]
struct InvalidBody<'a> {
    valid: bool,
    code: DecisionCode,
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consumer_id: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    missing_scopes: &'a [String],
}

const MALFORMED_BODY: &[u8] =
    br#"{"valid":false,"code":"MALFORMED","message":"the credential is not a well-formed Keygate credential"}"#;
const NOT_FOUND_BODY: &[u8] = br#"{"valid":false,"code":"NOT_FOUND","message":"no such credential exists"}"#;

impl Decision {
    fn bare(code: DecisionCode) -> Self {
        Decision {
            code,
            key: None,
            missing_scopes: Vec::new(),
        }
    }

    pub fn is_valid(&self) -> bool {
        self.code == DecisionCode::Valid
    }

    /// The JSON body of this decision, as `/v1/verify` answers it.
    pub fn body(&self) -> Bytes {
        match (self.code, &self.key) {
            (DecisionCode::Valid, Some(k)) => k.valid_body.clone(),
            (DecisionCode::Malformed, _) => Bytes::from_static(MALFORMED_BODY),
            (DecisionCode::NotFound, _) => Bytes::from_static(NOT_FOUND_BODY),
            (code, key) => {
                let body = InvalidBody {
                    valid: false,
                    code,
                    message: code.message(),
                    kind: key.as_ref().map(|_| "api_key"),
                    key_id: key.as_ref().map(|k| k.key_id.as_str()),
                    consumer_id: key.as_ref().map(|k| k.consumer_id.as_str()),
                    missing_scopes: &self.missing_scopes,
                };
                // Serialising plain strings cannot fail; fall back to the bare code if it ever does.
                serde_json::to_vec(&body).map(Bytes::from).unwrap_or_else(|_| {
                    Bytes::from(format!(r#"{{"valid":false,"code":"{}"}}"#, code.as_str()))
                })
            }
        }
    }
}

pub struct Verifier {
    store: Arc<dyn Store>,
    positive: Cache<SecretHash, Arc<CachedKey>>,
    negative: Cache<SecretHash, ()>,
}

impl Verifier {
    pub fn new(store: Arc<dyn Store>, config: &CacheConfig) -> Self {
        Verifier {
            store,
            positive: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.ttl)
                .build(),
            negative: Cache::builder()
                .max_capacity((config.capacity / 4).max(1024))
                .time_to_live(config.negative_ttl)
                .build(),
        }
    }

    /// The in-memory part of verify: decides without I/O, or names the hash to look up.
    pub fn verify_cached<S: AsRef<str>>(&self, secret: &str, required: &[S], now_ms: i64) -> Lookup {
        if credential::parse(secret).is_err() {
            return Lookup::Decided(Decision::bare(DecisionCode::Malformed));
        }
        let hash = SecretHash::of(secret);
        if let Some(key) = self.positive.get(&hash) {
            return Lookup::Decided(decide(key, required, now_ms));
        }
        if self.negative.contains_key(&hash) {
            return Lookup::Decided(Decision::bare(DecisionCode::NotFound));
        }
        Lookup::Miss(hash)
    }

    /// Full verify: the cached path, then at most one store read.
    pub async fn verify<S: AsRef<str>>(
        &self,
        secret: &str,
        required: &[S],
        now_ms: i64,
    ) -> Result<Decision, StoreError> {
        let hash = match self.verify_cached(secret, required, now_ms) {
            Lookup::Decided(d) => return Ok(d),
            Lookup::Miss(hash) => hash,
        };
        match self.store.find_secret(&hash).await? {
            Some(record) if record.hash.ct_eq(&hash) => {
                let key = Arc::new(cached_key(&record));
                self.positive.insert(hash, key.clone());
                Ok(decide(key, required, now_ms))
            }
            _ => {
                self.negative.insert(hash, ());
                Ok(Decision::bare(DecisionCode::NotFound))
            }
        }
    }

    /// Forgets what is cached about these secrets; the next verify reads the store.
    pub fn invalidate(&self, hashes: &[SecretHash]) {
        for h in hashes {
            self.positive.invalidate(h);
            self.negative.invalidate(h);
        }
    }
}

fn decide<S: AsRef<str>>(key: Arc<CachedKey>, required: &[S], now_ms: i64) -> Decision {
    let code = if key.revoked {
        DecisionCode::Revoked
    } else if key.disabled {
        DecisionCode::Disabled
    } else if key.expires_at.is_some_and(|t| t <= now_ms) {
        DecisionCode::Expired
    } else if !scope::satisfies(&key.scopes, required) {
        let missing = scope::missing(&key.scopes, required)
            .into_iter()
            .map(str::to_owned)
            .collect();
        return Decision {
            code: DecisionCode::InsufficientScope,
            key: Some(key),
            missing_scopes: missing,
        };
    } else {
        DecisionCode::Valid
    };
    Decision {
        code,
        key: Some(key),
        missing_scopes: Vec::new(),
    }
}

fn cached_key(r: &SecretRecord) -> CachedKey {
    let k = &r.key;
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
        scopes: &k.scopes,
        expires_at: expires_at.map(crate::time::rfc3339),
        metadata: &k.metadata,
    };
    let valid_body = serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default();
    CachedKey {
        hash: r.hash,
        key_id: k.id.clone(),
        consumer_id: k.consumer_id.clone(),
        scopes: k.scopes.clone(),
        expires_at,
        revoked: k.revoked_at.is_some(),
        disabled: k.disabled || r.consumer_disabled,
        valid_body,
        scopes_header: k.scopes.join(" "),
    }
}
