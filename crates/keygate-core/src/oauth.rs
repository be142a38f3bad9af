//! OAuth 2 rules without I/O: the form bodies of the token, introspection and revocation endpoints,
//! and the claims of Keygate's JWT access tokens.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::scope;

/// How a client's access tokens are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFormat {
    /// A signed JWT (RFC 9068), verifiable offline against the JWKS.
    Jwt,
    /// A `kgat_` secret, looked up on every verify (revocation reaches every verifier).
    Opaque,
}

impl TokenFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFormat::Jwt => "jwt",
            TokenFormat::Opaque => "opaque",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "jwt" => Some(TokenFormat::Jwt),
            "opaque" => Some(TokenFormat::Opaque),
            _ => None,
        }
    }
}

/// An OAuth 2 grant type Keygate issues tokens for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    ClientCredentials,
    /// A user's authorization, through the login and consent pages, with PKCE (RFC 6749 §4.1, RFC 7636).
    AuthorizationCode,
    /// A refresh token, rotated on every use.
    RefreshToken,
    /// RFC 8628: a device without a browser; the user approves it on another device.
    DeviceCode,
    /// RFC 8693: a credential (API key or access token) exchanged for a narrower, shorter-lived token.
    TokenExchange,
}

impl GrantType {
    /// Every supported grant type.
    pub const ALL: [GrantType; 5] = [
        GrantType::ClientCredentials,
        GrantType::AuthorizationCode,
        GrantType::RefreshToken,
        GrantType::DeviceCode,
        GrantType::TokenExchange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::ClientCredentials => "client_credentials",
            GrantType::AuthorizationCode => "authorization_code",
            GrantType::RefreshToken => "refresh_token",
            GrantType::DeviceCode => "urn:ietf:params:oauth:grant-type:device_code",
            GrantType::TokenExchange => "urn:ietf:params:oauth:grant-type:token-exchange",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        GrantType::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// Why a form body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// RFC 6749 section 3.2: request parameters must not be included more than once.
    #[error("the parameter {0} appears more than once")]
    Repeated(String),
}

/// An `application/x-www-form-urlencoded` body: each parameter with all its values.
#[derive(Debug, Default)]
pub struct Form(HashMap<String, Vec<String>>);

impl Form {
    /// Parses a body. Never fails: malformed escapes decode leniently, as browsers do; the body's size is
    /// bounded by the server's body limit, and with it the number of parameters.
    pub fn parse(body: &[u8]) -> Form {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            map.entry(k.into_owned()).or_default().push(v.into_owned());
        }
        Form(map)
    }

    /// A parameter that may appear at most once. An empty value counts as absent (RFC 6749 section 3.1).
    pub fn one(&self, name: &str) -> Result<Option<&str>, FormError> {
        match self.0.get(name).map(Vec::as_slice) {
            None => Ok(None),
            Some([v]) if v.is_empty() => Ok(None),
            Some([v]) => Ok(Some(v.as_str())),
            Some(_) => Err(FormError::Repeated(name.to_string())),
        }
    }

    /// Every value of a parameter that may repeat (e.g. `resource`, RFC 8707).
    pub fn all(&self, name: &str) -> &[String] {
        self.0.get(name).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// RFC 9068 access-token claims, plus `kg_iat`: the issue time in milliseconds, so that "revoke every
/// token issued before now" cuts at the exact moment (`iat` has whole seconds) and spares tokens issued
/// after it in the same second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AtClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Value,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    pub client_id: String,
    /// The consumer the client belongs to, so a service validating offline can attribute the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_id: Option<String>,
    #[serde(default)]
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kg_iat: Option<i64>,
    /// For a token issued on a user's behalf: the token family (one authorization and the refresh
    /// tokens descended from it); `sub` is then the user id. Absent for client credentials tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kg_fam: Option<String>,
    /// RFC 8693 §4.1: for an exchanged token, the client that acts for the subject (`{"sub": client}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Value>,
    /// For an exchanged token: the credential it was exchanged from; it stops when that one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kg_src: Option<Source>,
    /// RFC 9449: a DPoP-bound token's confirmation, `{"jkt": thumbprint of the client's key}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Value>,
}

/// The credential an exchanged token (RFC 8693) came from. Checked on every verification of the
/// exchanged token, so revoking, disabling or expiring the subject stops it. Hashes are SHA-256 (hex)
/// of the subject credential: high-entropy secrets, so the hash reveals nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    ApiKey {
        h: String,
    },
    OpaqueToken {
        h: String,
    },
    PersonalToken {
        h: String,
    },
    /// A JWT access token: what its revocation consists of (its id, its client, its issue time in ms).
    Jwt {
        jti: String,
        client_id: String,
        iat: i64,
    },
}

impl AtClaims {
    /// Issue time in milliseconds: `kg_iat` when present (and consistent with `iat`), else `iat`.
    pub fn issued_at_ms(&self) -> i64 {
        let from_iat = self.iat.saturating_mul(1000);
        match self.kg_iat {
            Some(ms) if ms.div_euclid(1000) == self.iat => ms,
            _ => from_iat,
        }
    }

    /// The granted scopes Keygate acts on (see [`scope::usable`]).
    pub fn scopes(&self) -> Vec<String> {
        self.scope.split(' ').filter(|s| !s.is_empty() && scope::usable(s)).map(str::to_owned).collect()
    }

    /// The audiences, whether `aud` is one string or an array.
    pub fn audiences(&self) -> Vec<String> {
        match &self.aud {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_parameters() {
        let f = Form::parse(b"grant_type=client_credentials&scope=a+b&resource=x&resource=y&empty=");
        assert_eq!(f.one("grant_type"), Ok(Some("client_credentials")));
        assert_eq!(f.one("scope"), Ok(Some("a b")));
        assert_eq!(f.one("empty"), Ok(None));
        assert_eq!(f.one("missing"), Ok(None));
        assert_eq!(f.one("resource"), Err(FormError::Repeated("resource".into())));
        assert_eq!(f.all("resource"), ["x", "y"]);
        assert!(Form::parse(b"%zz=%&&=").one("%zz").is_ok());
    }

    #[test]
    fn claims_times_and_scopes() {
        let mut c: AtClaims = serde_json::from_value(serde_json::json!({
            "iss": "i", "sub": "s", "aud": ["a", "b"], "exp": 20, "iat": 10, "nbf": 10, "jti": "j",
            "client_id": "c", "scope": "x:read bad,scope  y"
        }))
        .unwrap();
        assert_eq!(c.issued_at_ms(), 10_000);
        c.kg_iat = Some(10_456);
        assert_eq!(c.issued_at_ms(), 10_456);
        c.kg_iat = Some(99_000);
        assert_eq!(c.issued_at_ms(), 10_000, "an inconsistent kg_iat is ignored");
        assert_eq!(c.scopes(), vec!["x:read", "y"]);
        assert_eq!(c.audiences(), vec!["a", "b"]);
    }
}

/// PKCE (RFC 7636) with S256: is `verifier` well-formed (43 to 128 unreserved characters) and does its
/// SHA-256, base64url without padding, equal `challenge`? Compared in constant time.
pub fn pkce_s256_matches(verifier: &str, challenge: &str) -> bool {
    use base64::Engine;
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    if !pkce_value_ok(verifier) {
        return false;
    }
    let computed =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    computed.as_bytes().ct_eq(challenge.as_bytes()).into()
}

/// A code verifier's syntax (RFC 7636 §4.1); an S256 challenge is always 43 such characters.
pub fn pkce_value_ok(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
}

#[cfg(test)]
mod pkce_tests {
    use super::*;

    #[test]
    fn rfc7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(pkce_s256_matches(verifier, challenge));
        assert!(!pkce_s256_matches(verifier, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cN"));
        assert!(!pkce_s256_matches("short", challenge));
        assert!(!pkce_s256_matches(&format!("{verifier}!"), challenge));
    }
}
