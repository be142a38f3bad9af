//! JWT signing keys: generated and stored by Keygate, published in the JWKS, rotated in stages.
//!
//! Policy:
//! - A new key is published `publish_ahead` before it signs, so verifiers that cache the JWKS have it
//!   before they see its first token.
//! - The key it replaces stops signing then, and stays published until every token it signed has expired
//!   (its retirement plus the longest token lifetime).
//! - Ed25519 (EdDSA) by default; ES256 and RS256 (RSA 2048, for gateways and cloud JWT authorizers that
//!   accept only RSA) selectable. Private keys are PKCS#8, sealed with the master key
//!   (`crate::seal`) before they reach the database; keys stored in clear by older versions are sealed
//!   at the next start.
//! - Emergency revocation: a revoked key leaves the JWKS at once and nothing it signed verifies; if it was
//!   signing, a new key takes over immediately (no publish-ahead: the old one must not sign another token).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};

use crate::seal::{MasterKey, SealError};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use keygate_store::{OAuthStore, SigningKey, StoreError};
use serde_json::{Value, json};

/// Longest access-token lifetime, and so how long a retired key stays published.
pub const MAX_TOKEN_LIFETIME_SECONDS: i64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    EdDsa,
    Es256,
    Rs256,
}

impl KeyAlg {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "EdDSA" => Some(KeyAlg::EdDsa),
            "ES256" => Some(KeyAlg::Es256),
            "RS256" => Some(KeyAlg::Rs256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyAlg::EdDsa => "EdDSA",
            KeyAlg::Es256 => "ES256",
            KeyAlg::Rs256 => "RS256",
        }
    }

    pub fn algorithm(self) -> Algorithm {
        match self {
            KeyAlg::EdDsa => Algorithm::EdDSA,
            KeyAlg::Es256 => Algorithm::ES256,
            KeyAlg::Rs256 => Algorithm::RS256,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing key {kid}: {source}")]
    Seal { kid: String, source: SealError },
    #[error("no master key is loaded")]
    NoMasterKey,
}

/// A key ready to sign or verify.
pub struct LoadedKey {
    pub record: SigningKey,
    pub alg: KeyAlg,
    pub decoding: DecodingKey,
    signer: Signer,
    /// `base64url({"alg":…,"typ":"at+jwt","kid":…})`, the same for every token this key signs.
    encoded_header: String,
}

/// The private key, parsed once. Signing goes straight to the curve library: building the key from
/// its DER on every token (as a generic JWT library does) doubled the cost of an Ed25519 signature.
enum Signer {
    Ed(Box<ed25519_dalek::SigningKey>),
    Es(Box<p256::ecdsa::SigningKey>),
    Rs(Box<rsa::pkcs1v15::SigningKey<sha2::Sha256>>),
}

impl LoadedKey {
    /// A compact JWS (`header.claims.signature`) over the given claims.
    pub fn sign_jwt<T: serde::Serialize>(&self, claims: &T) -> Result<String, serde_json::Error> {
        self.sign_with_header(&self.encoded_header, claims)
    }

    /// A compact JWS with another `typ` than an access token's (e.g. the gateway's internal tokens), so
    /// that it can never be taken for one.
    pub fn sign_jwt_typed<T: serde::Serialize>(
        &self,
        typ: &str,
        claims: &T,
    ) -> Result<String, serde_json::Error> {
        let header = json!({"alg": self.alg.as_str(), "typ": typ, "kid": self.record.kid});
        self.sign_with_header(&URL_SAFE_NO_PAD.encode(header.to_string()), claims)
    }

    fn sign_with_header<T: serde::Serialize>(
        &self,
        encoded_header: &str,
        claims: &T,
    ) -> Result<String, serde_json::Error> {
        let mut out = String::with_capacity(512);
        out.push_str(encoded_header);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims)?, &mut out);
        let signature: Vec<u8> = match &self.signer {
            Signer::Ed(k) => {
                use ed25519_dalek::Signer as _;
                k.sign(out.as_bytes()).to_bytes().to_vec()
            }
            Signer::Es(k) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = k.sign(out.as_bytes());
                sig.to_bytes().to_vec()
            }
            Signer::Rs(k) => {
                use rsa::signature::{SignatureEncoding as _, Signer as _};
                k.sign(out.as_bytes()).to_vec()
            }
        };
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut out);
        Ok(out)
    }
}

/// Parses a key record whose `private_der` is the PKCS#8 in clear (already unsealed). The clear bytes
/// are wiped once parsed.
fn load(mut record: SigningKey) -> Result<LoadedKey, KeyError> {
    let der = zeroize::Zeroizing::new(std::mem::take(&mut record.private_der));
    let record = record;
    let bad = |what: &str| KeyError::Generate(format!("stored key {} has a bad {what}", record.kid));
    let alg = KeyAlg::parse(&record.alg).ok_or_else(|| bad("algorithm"))?;
    let jwk_str = |k: &str| record.public_jwk.get(k).and_then(Value::as_str).ok_or_else(|| bad(k));
    let (signer, decoding) = match alg {
        KeyAlg::EdDsa => {
            use ed25519_dalek::pkcs8::DecodePrivateKey;
            let sk = ed25519_dalek::SigningKey::from_pkcs8_der(&der).map_err(|_| bad("private key"))?;
            (
                Signer::Ed(Box::new(sk)),
                DecodingKey::from_ed_components(jwk_str("x")?).map_err(|_| bad("public key"))?,
            )
        }
        KeyAlg::Es256 => {
            use p256::pkcs8::DecodePrivateKey;
            let sk = p256::ecdsa::SigningKey::from_pkcs8_der(&der).map_err(|_| bad("private key"))?;
            (
                Signer::Es(Box::new(sk)),
                DecodingKey::from_ec_components(jwk_str("x")?, jwk_str("y")?)
                    .map_err(|_| bad("public key"))?,
            )
        }
        KeyAlg::Rs256 => {
            use rsa::pkcs8::DecodePrivateKey;
            let sk = rsa::RsaPrivateKey::from_pkcs8_der(&der).map_err(|_| bad("private key"))?;
            (
                Signer::Rs(Box::new(rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(sk))),
                DecodingKey::from_rsa_components(jwk_str("n")?, jwk_str("e")?)
                    .map_err(|_| bad("public key"))?,
            )
        }
    };
    let header = json!({"alg": alg.as_str(), "typ": "at+jwt", "kid": record.kid});
    let encoded_header = URL_SAFE_NO_PAD.encode(header.to_string());
    // The clear key stays only inside `signer`; the record keeps no copy.
    Ok(LoadedKey { record, alg, decoding, signer, encoded_header })
}

/// Makes a new key pair; the key id is random.
pub fn generate(alg: KeyAlg, now: i64, active_from: i64) -> Result<SigningKey, KeyError> {
    let gen_err = |e: &dyn std::fmt::Display| KeyError::Generate(e.to_string());
    let kid = keygate_core::credential::random_base62(16).map_err(|e| gen_err(&e))?;
    let (der, jwk) = match alg {
        KeyAlg::EdDsa => {
            use ed25519_dalek::pkcs8::EncodePrivateKey;
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| gen_err(&e))?;
            let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
            let der = sk.to_pkcs8_der().map_err(|e| gen_err(&e))?.as_bytes().to_vec();
            let x = URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
            (der, json!({"kty": "OKP", "crv": "Ed25519", "x": x}))
        }
        KeyAlg::Es256 => {
            use p256::pkcs8::EncodePrivateKey;
            let sk = loop {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| gen_err(&e))?;
                // A random 256-bit value is a valid scalar with overwhelming probability.
                if let Ok(sk) = p256::ecdsa::SigningKey::from_slice(&bytes) {
                    break sk;
                }
            };
            let der = sk.to_pkcs8_der().map_err(|e| gen_err(&e))?.as_bytes().to_vec();
            let point = sk.verifying_key().to_encoded_point(false);
            let (Some(x), Some(y)) = (point.x(), point.y()) else {
                return Err(KeyError::Generate("P-256 point without coordinates".into()));
            };
            (
                der,
                json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}),
            )
        }
        KeyAlg::Rs256 => {
            use rsa::pkcs8::EncodePrivateKey;
            use rsa::traits::PublicKeyParts;
            let sk = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).map_err(|e| gen_err(&e))?;
            let der = sk.to_pkcs8_der().map_err(|e| gen_err(&e))?.as_bytes().to_vec();
            let n = URL_SAFE_NO_PAD.encode(sk.n().to_bytes_be());
            let e = URL_SAFE_NO_PAD.encode(sk.e().to_bytes_be());
            (der, json!({"kty": "RSA", "n": n, "e": e}))
        }
    };
    let mut jwk = jwk;
    jwk["kid"] = json!(kid);
    jwk["alg"] = json!(alg.as_str());
    jwk["use"] = json!("sig");
    Ok(SigningKey {
        kid,
        alg: alg.as_str().into(),
        private_der: der,
        public_jwk: jwk,
        created_at: now,
        active_from,
        retired_at: None,
        publish_until: None,
        revoked_at: None,
    })
}

#[derive(Default)]
pub struct SigningKeys {
    keys: RwLock<Vec<std::sync::Arc<LoadedKey>>>,
    master: OnceLock<Arc<MasterKey>>,
    /// Keys revoked in an emergency, also in memory from the moment the revocation commits: no reload
    /// (a concurrent rotation's, say) can bring one back.
    revoked: RwLock<HashSet<String>>,
    /// Rotations and revocations, one at a time.
    changes: tokio::sync::Mutex<()>,
    /// Keys that can sign or verify nothing any more (revoked, or unpublished after their last token
    /// expired): kept for listings only, never opened.
    dormant: RwLock<Vec<SigningKey>>,
}

impl SigningKeys {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<std::sync::Arc<LoadedKey>>> {
        self.keys.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live(&self, k: &LoadedKey) -> bool {
        k.record.revoked_at.is_none()
            && !self.revoked.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&k.record.kid)
    }

    /// Sets the master key that seals and opens private keys (once; later calls keep the first).
    pub fn set_master(&self, master: Arc<MasterKey>) {
        let _ = self.master.set(master);
    }

    pub(crate) fn master(&self) -> Result<&MasterKey, KeyError> {
        self.master.get().map(|m| m.as_ref()).ok_or(KeyError::NoMasterKey)
    }

    /// Seals a new key and stores it.
    async fn insert(
        &self,
        store: &dyn OAuthStore,
        key: &SigningKey,
        audit: Option<&keygate_store::NewAudit>,
    ) -> Result<(), KeyError> {
        let sealed = self
            .master()?
            .seal(key.kid.as_bytes(), &key.private_der)
            .map_err(|source| KeyError::Seal { kid: key.kid.clone(), source })?;
        store.insert_signing_key(&SigningKey { private_der: sealed, ..key.clone() }, audit).await?;
        Ok(())
    }

    /// Opens a stored key; one stored in clear (by an older version) is sealed in the store now.
    async fn open(&self, store: &dyn OAuthStore, record: SigningKey) -> Result<SigningKey, KeyError> {
        let master = self.master()?;
        let seal_err = |source| KeyError::Seal { kid: record.kid.clone(), source };
        if MasterKey::is_sealed(&record.private_der) {
            let der = master.unseal(record.kid.as_bytes(), &record.private_der).map_err(seal_err)?;
            return Ok(SigningKey { private_der: der, ..record });
        }
        let sealed = master.seal(record.kid.as_bytes(), &record.private_der).map_err(seal_err)?;
        store.reseal_signing_key(&record.kid, &sealed).await?;
        tracing::info!(kid = %record.kid, "sealed a signing key that was stored in clear");
        Ok(record)
    }

    /// Loads the stored keys; creates the first one if there is no usable one.
    pub async fn load(&self, store: &dyn OAuthStore, alg: KeyAlg, now: i64) -> Result<(), KeyError> {
        let mut opened = Vec::new();
        let mut dormant = Vec::new();
        for r in store.list_signing_keys().await? {
            if r.revoked_at.is_some() || r.publish_until.is_some_and(|t| t <= now) {
                dormant.push(SigningKey { private_der: Vec::new(), ..r });
            } else {
                opened.push(self.open(store, r).await?);
            }
        }
        *self.dormant.write().unwrap_or_else(std::sync::PoisonError::into_inner) = dormant;
        if !opened.iter().any(|k| k.revoked_at.is_none()) {
            let first = generate(alg, now, now)?;
            // Audited, so that other nodes sharing the database load it too.
            let audit = keygate_core::id::new_id("evt", now).ok().map(|id| keygate_store::NewAudit {
                id,
                at: now,
                actor: "system".into(),
                action: "signing_key.create".into(),
                target_type: "signing_key".into(),
                target_id: first.kid.clone(),
                ip: None,
                details: serde_json::json!({"alg": first.alg}),
            });
            self.insert(store, &first, audit.as_ref()).await?;
            opened.push(first);
        }
        self.replace(opened)
    }

    fn replace(&self, records: Vec<SigningKey>) -> Result<(), KeyError> {
        let loaded = records.into_iter().map(load).collect::<Result<Vec<_>, _>>()?;
        *self.keys.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            loaded.into_iter().map(std::sync::Arc::new).collect();
        Ok(())
    }

    /// The key that signs now: the newest one whose time has come and that is not retired.
    pub fn signer(&self, now: i64) -> Option<std::sync::Arc<LoadedKey>> {
        self.read()
            .iter()
            .filter(|k| {
                self.live(k) && k.record.active_from <= now && k.record.retired_at.is_none_or(|r| r > now)
            })
            .max_by_key(|k| k.record.active_from)
            .cloned()
    }

    pub fn by_kid(&self, kid: &str, now: i64) -> Option<std::sync::Arc<LoadedKey>> {
        self.read()
            .iter()
            .find(|k| k.record.kid == kid && self.live(k) && k.record.publish_until.is_none_or(|t| t > now))
            .cloned()
    }

    /// The published keys: pending, active, and retired ones whose tokens may still be alive.
    pub fn jwks(&self, now: i64) -> Value {
        let keys: Vec<Value> = self
            .read()
            .iter()
            .filter(|k| self.live(k) && k.record.publish_until.is_none_or(|t| t > now))
            .map(|k| k.record.public_jwk.clone())
            .collect();
        json!({ "keys": keys })
    }

    /// Every key known, as stored (revoked ones with `revoked_at` set).
    pub fn records(&self) -> Vec<SigningKey> {
        let revoked = self.revoked.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<SigningKey> = self
            .read()
            .iter()
            .map(|k| {
                let mut r = k.record.clone();
                if revoked.contains(&r.kid) && r.revoked_at.is_none() {
                    r.revoked_at = Some(r.active_from);
                }
                r
            })
            .collect();
        all.extend(self.dormant.read().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned());
        all.sort_by_key(|r| r.active_from);
        all
    }

    /// Starts a rotation: a new key, published now and signing from `now + publish_ahead_ms`; the keys
    /// signing until then retire at that moment and stay published until their tokens have expired.
    pub async fn rotate(
        &self,
        store: &dyn OAuthStore,
        alg: KeyAlg,
        now: i64,
        publish_ahead_ms: i64,
        audit: Option<&keygate_store::NewAudit>,
    ) -> Result<SigningKey, KeyError> {
        let _one_at_a_time = self.changes.lock().await;
        self.rotate_now(store, alg, now, publish_ahead_ms, audit).await
    }

    async fn rotate_now(
        &self,
        store: &dyn OAuthStore,
        alg: KeyAlg,
        now: i64,
        publish_ahead_ms: i64,
        audit: Option<&keygate_store::NewAudit>,
    ) -> Result<SigningKey, KeyError> {
        let active_from = now + publish_ahead_ms.max(0);
        let new = generate(alg, now, active_from)?;
        // The audit record (and the `signing_key.rotated` event) names the new key.
        let audit = audit.map(|a| keygate_store::NewAudit { target_id: new.kid.clone(), ..a.clone() });
        self.insert(store, &new, audit.as_ref()).await?;
        for k in self.records() {
            if k.revoked_at.is_none() && k.retired_at.is_none_or(|r| r > active_from) && k.kid != new.kid {
                let publish_until = active_from + MAX_TOKEN_LIFETIME_SECONDS * 1000;
                store.retire_signing_key(&k.kid, active_from, publish_until).await?;
            }
        }
        self.load(store, alg, now).await?;
        Ok(SigningKey { private_der: Vec::new(), ..new })
    }

    /// Emergency revocation: `kid` leaves the JWKS now and no token it signed verifies. `revoked` runs
    /// as soon as the revocation has committed and taken effect in memory (to drop caches), before the
    /// steps that can still fail: if no live key is signing afterwards, a new one signs at once. False if
    /// there is no such unrevoked key.
    pub async fn revoke(
        &self,
        store: &dyn OAuthStore,
        kid: &str,
        alg: KeyAlg,
        now: i64,
        audit: &keygate_store::NewAudit,
        revoked: impl FnOnce(),
    ) -> Result<bool, KeyError> {
        let _one_at_a_time = self.changes.lock().await;
        if !store.revoke_signing_key(kid, now, audit).await? {
            return Ok(false);
        }
        self.revoked.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(kid.to_string());
        revoked();
        self.load(store, alg, now).await?;
        if self.signer(now).is_none() {
            // No publish-ahead wait: a fresh key signs from now. Audited (as a rotation by whoever
            // revoked), so that other nodes sharing the database load it.
            let rotation = keygate_store::NewAudit {
                id: keygate_core::id::new_id("evt", now)
                    .map_err(|e| KeyError::Store(StoreError::Other(e.to_string())))?,
                action: "signing_key.rotate".into(),
                details: serde_json::json!({"after_revoking": kid}),
                ..audit.clone()
            };
            self.rotate_now(store, alg, now, 0, Some(&rotation)).await?;
        }
        Ok(true)
    }
}
