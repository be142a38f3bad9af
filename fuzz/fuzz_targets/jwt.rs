//! JWT header and claims parsing as the verify path does it: decode the header, then verify with an
//! algorithm pinned by our key. Never panics, and nothing random ever verifies.
#![no_main]
use std::sync::OnceLock;

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keygate_core::oauth::AtClaims;
use libfuzzer_sys::fuzz_target;

fn key() -> &'static DecodingKey {
    static KEY: OnceLock<DecodingKey> = OnceLock::new();
    KEY.get_or_init(|| DecodingKey::from_ed_components("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo").unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = jsonwebtoken::decode_header(token);
    let mut v = Validation::new(Algorithm::EdDSA);
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "iss", "sub", "iat", "jti", "aud", "nbf"]);
    assert!(jsonwebtoken::decode::<AtClaims>(token, key(), &v).is_err());
    // The claims parser on its own, as if the signature had verified.
    if let Some(payload) = token.split('.').nth(1)
        && let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)
        && let Ok(c) = serde_json::from_slice::<AtClaims>(&json)
    {
        let _ = (c.issued_at_ms(), c.scopes(), c.audiences());
    }
});
