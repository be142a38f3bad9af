//! `private_key_jwt` client authentication (RFC 7523 section 2.2, OpenID Connect Core section 9): the
//! client proves who it is with a short-lived JWT signed by its own private key; Keygate holds only the
//! public keys (the client's registered JWKS) and no shared secret.
//!
//! Policy:
//! - `iss` and `sub` are the client id; `aud` must name Keygate's token endpoint or its issuer; `exp` is
//!   required and at most [`MAX_LIFETIME_SECONDS`] (5 minutes) ahead; `jti` is required and used once:
//!   every client's used ids are kept until their assertions expire, at most [`MAX_REMEMBERED`] per
//!   client, and a client that has that many live assertions gets no more (fail closed) rather than
//!   having old ids forgotten.
//! - The algorithm comes from the registered key (RSA → RS256, P-256 → ES256, Ed25519 → EdDSA), never
//!   from the assertion alone; `none` and HMAC never verify.
//! - Only assertions whose signature verified are remembered, so a forger cannot fill the replay cache.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// `client_assertion_type` for a JWT client assertion.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Longest an assertion may live: it is single-use, and its id is remembered this long.
pub const MAX_LIFETIME_SECONDS: i64 = 300;
/// Most unexpired assertion ids remembered per client.
pub const MAX_REMEMBERED: usize = 10_000;

/// A registered public key and the one algorithm it verifies.
pub fn decoding_key(jwk: &Value) -> Result<(DecodingKey, Algorithm), String> {
    let parsed: Jwk = serde_json::from_value(jwk.clone()).map_err(|e| format!("a key is not a JWK: {e}"))?;
    let alg = match (jwk.get("kty").and_then(Value::as_str), jwk.get("crv").and_then(Value::as_str)) {
        (Some("RSA"), _) => Algorithm::RS256,
        (Some("EC"), Some("P-256")) => Algorithm::ES256,
        (Some("OKP"), Some("Ed25519")) => Algorithm::EdDSA,
        _ => return Err("keys must be RSA, EC P-256 or OKP Ed25519".into()),
    };
    let key = DecodingKey::from_jwk(&parsed).map_err(|e| format!("a key cannot be used: {e}"))?;
    Ok((key, alg))
}

/// The client an assertion claims to come from (`iss`), read without verifying anything: it only
/// selects whose keys to verify with.
pub fn claimed_client(assertion: &str) -> Option<String> {
    let payload = assertion.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss").and_then(Value::as_str).filter(|s| s.len() <= 200).map(str::to_owned)
}

/// Remembers the ids of assertions already used, per client, until they expire.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<String, HashMap<String, i64>>>,
}

impl ReplayGuard {
    /// Records `jti` of `client` until `exp` (seconds). False if it was seen before, or if the client
    /// already has [`MAX_REMEMBERED`] unexpired assertions.
    fn first_use(&self, client: &str, jti: &str, exp: i64, now_s: i64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ids = seen.entry(client.to_string()).or_default();
        if ids.contains_key(jti) {
            return false;
        }
        if ids.len() >= MAX_REMEMBERED {
            ids.retain(|_, e| *e > now_s);
            if ids.len() >= MAX_REMEMBERED {
                return false;
            }
        }
        ids.insert(jti.to_string(), exp);
        true
    }
}

/// Verifies an assertion against a client's JWKS. `audiences` are the acceptable `aud` values.
pub fn verify(
    assertion: &str,
    client_id: &str,
    jwks: &Value,
    audiences: &[String],
    replay: &ReplayGuard,
    now_ms: i64,
) -> Result<(), &'static str> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| "malformed assertion")?;
    let keys = jwks.get("keys").and_then(Value::as_array).ok_or("no registered keys")?;
    let candidates: Vec<&Value> = match &header.kid {
        Some(kid) => keys.iter().filter(|k| k.get("kid").and_then(Value::as_str) == Some(kid)).collect(),
        None if keys.len() == 1 => keys.iter().collect(),
        None => return Err("several keys are registered: the assertion needs a kid"),
    };
    let jwk = candidates.first().ok_or("no registered key has this kid")?;
    let (key, alg) = decoding_key(jwk).map_err(|_| "the registered key cannot be used")?;
    if header.alg != alg {
        return Err("the assertion's algorithm does not match the registered key");
    }
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[client_id]);
    validation.sub = Some(client_id.to_string());
    validation.set_audience(audiences);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud", "jti"]);
    validation.leeway = 30;
    let data =
        jsonwebtoken::decode::<Value>(assertion, &key, &validation).map_err(|_| "invalid assertion")?;
    let exp = data.claims.get("exp").and_then(Value::as_i64).ok_or("exp is missing")?;
    if exp - now_ms / 1000 > MAX_LIFETIME_SECONDS {
        return Err("the assertion lives too long");
    }
    let jti = data.claims.get("jti").and_then(Value::as_str).ok_or("jti is missing")?;
    if jti.is_empty() || jti.len() > 256 {
        return Err("bad jti");
    }
    if !replay.first_use(client_id, jti, exp, now_ms / 1000) {
        return Err("the assertion was used before, or too many are live");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_assertion_id_is_used_once_and_a_full_client_is_refused() {
        let g = ReplayGuard::default();
        assert!(g.first_use("c1", "a", 100, 0));
        assert!(!g.first_use("c1", "a", 100, 0), "a replay");
        assert!(g.first_use("c2", "a", 100, 0), "ids are per client");
        for i in 1..MAX_REMEMBERED {
            assert!(g.first_use("c1", &i.to_string(), 100, 0));
        }
        assert!(!g.first_use("c1", "one too many", 100, 0), "full: refused, nothing forgotten");
        assert!(!g.first_use("c1", "a", 100, 50), "still remembered");
        assert!(g.first_use("c1", "later", 200, 150), "expired ids make room");
    }
}
