//! DPoP (RFC 9449): tokens bound to a key the client holds. The client sends a proof — a JWT signed
//! with that key, its public half in the header — with the token request and with every use of the
//! token; a stolen DPoP-bound token is useless without the private key.
//!
//! A proof is accepted when: `typ` is `dpop+jwt`; `alg` is one of [`ALGS`] and matches the key type
//! (never `none`, never a symmetric algorithm); the signature verifies with the header's `jwk` (public
//! parts only); `htm` and `htu` name this request (the URI without query and fragment); `iat` is within
//! [`WINDOW_MS`] of the server's clock; `ath` is the SHA-256 of the access token when one is presented;
//! and its `jti` was not seen before from the same key within the window (an in-memory, bounded replay
//! cache, per node). The binding is the key's RFC 7638 thumbprint (`cnf.jkt`).

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The signature algorithms accepted in proofs (`dpop_signing_alg_values_supported`).
pub const ALGS: &[&str] = &["ES256", "EdDSA", "RS256", "PS256"];
/// How far a proof's `iat` may be from the server's clock.
pub const WINDOW_MS: i64 = 60_000;
const MAX_PROOF: usize = 8 * 1024;

/// What a proof must match.
pub struct ProofCheck<'a> {
    pub proof: &'a str,
    pub method: &'a str,
    pub url: &'a str,
    /// The access token presented with the proof (its hash must be `ath`); `None` at the token endpoint.
    pub access_token: Option<&'a str>,
}

#[derive(Deserialize)]
struct Claims {
    jti: String,
    htm: String,
    htu: String,
    iat: i64,
    #[serde(default)]
    ath: Option<String>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 7638 thumbprint of a public JWK: SHA-256 of its required members, in lexicographic order, with
/// no whitespace.
pub fn thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    let canonical = match s("kty")? {
        "EC" => format!(r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#, s("crv")?, s("x")?, s("y")?),
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e")?, s("n")?),
        "OKP" => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, s("crv")?, s("x")?),
        _ => return None,
    };
    // Members are base64url or fixed names: nothing in them needs JSON escaping, but refuse anything
    // that would.
    if canonical.contains('\\') {
        return None;
    }
    Some(b64(&Sha256::digest(canonical.as_bytes())))
}

/// The target URI as `htu` names it: without query and fragment.
fn without_query(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

/// The hash of an access token, as `ath` carries it.
pub fn ath(token: &str) -> String {
    b64(&Sha256::digest(token.as_bytes()))
}

/// Proofs remembered at most: two windows at 8,000 proofs per second (twice what this server checks on
/// two cores). When it is full, proofs are refused rather than remembered too briefly.
const SEEN_CAPACITY: u64 = 1_000_000;

pub struct Dpop {
    /// SHA-256 of `jkt` + `jti` of proofs seen in the last two windows.
    seen: Cache<[u8; 32], ()>,
}

impl Default for Dpop {
    fn default() -> Self {
        Dpop {
            seen: Cache::builder()
                .max_capacity(SEEN_CAPACITY + SEEN_CAPACITY / 10)
                .time_to_live(Duration::from_millis(2 * WINDOW_MS as u64))
                .build(),
        }
    }
}

impl Dpop {
    /// Checks a proof; its key's thumbprint, or why not.
    pub fn verify(&self, c: &ProofCheck<'_>, now: i64) -> Result<String, &'static str> {
        if c.proof.len() > MAX_PROOF {
            return Err("the proof is too large");
        }
        let header_b64 = c.proof.split('.').next().ok_or("the proof is not a JWT")?;
        let header: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header_b64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("the proof's header is not JSON")?;
        if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
            return Err("the proof's typ must be dpop+jwt");
        }
        let jwk = header.get("jwk").ok_or("the proof's header has no jwk")?;
        if ["d", "p", "q", "dp", "dq", "qi", "k"].iter().any(|f| jwk.get(f).is_some()) {
            return Err("the proof's jwk holds private key material");
        }
        let s = |k: &str| jwk.get(k).and_then(Value::as_str).ok_or("the proof's jwk is incomplete");
        let (alg, key) = match (header.get("alg").and_then(Value::as_str), s("kty")?) {
            (Some("ES256"), "EC") if s("crv")? == "P-256" => {
                (Algorithm::ES256, DecodingKey::from_ec_components(s("x")?, s("y")?))
            }
            (Some("EdDSA"), "OKP") if s("crv")? == "Ed25519" => {
                (Algorithm::EdDSA, DecodingKey::from_ed_components(s("x")?))
            }
            (Some("RS256"), "RSA") => (Algorithm::RS256, DecodingKey::from_rsa_components(s("n")?, s("e")?)),
            (Some("PS256"), "RSA") => (Algorithm::PS256, DecodingKey::from_rsa_components(s("n")?, s("e")?)),
            _ => return Err("the proof's alg is not supported or does not match its key"),
        };
        let key = key.map_err(|_| "the proof's jwk is not a valid key")?;
        let mut validation = Validation::new(alg);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let claims = jsonwebtoken::decode::<Claims>(c.proof, &key, &validation)
            .map_err(|_| "the proof's signature does not verify")?
            .claims;
        if claims.htm != c.method {
            return Err("the proof is for another HTTP method");
        }
        if without_query(&claims.htu) != without_query(c.url) {
            return Err("the proof is for another URL");
        }
        if claims.iat.saturating_mul(1000).abs_diff(now) > WINDOW_MS as u64 {
            return Err("the proof's iat is too far from now");
        }
        match (c.access_token, &claims.ath) {
            (Some(token), Some(a)) if *a == ath(token) => {}
            (Some(_), _) => return Err("the proof's ath does not match the access token"),
            (None, _) => {}
        }
        if claims.jti.is_empty() || claims.jti.len() > 256 {
            return Err("the proof's jti is missing or too long");
        }
        let jkt = thumbprint(jwk).ok_or("the proof's jwk is not a valid key")?;
        // Full: refuse rather than forget a proof before its window ends (a replay would pass).
        if self.seen.entry_count() >= SEEN_CAPACITY {
            return Err("too many proofs at once; retry shortly");
        }
        let id: [u8; 32] = Sha256::digest(format!("{jkt}.{}", claims.jti).as_bytes()).into();
        let entry = self.seen.entry(id).or_insert(());
        if !entry.is_fresh() {
            return Err("the proof was used before");
        }
        Ok(jkt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7638_thumbprint_example() {
        // RFC 7638 section 3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(thumbprint(&jwk).unwrap(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
    }
}
