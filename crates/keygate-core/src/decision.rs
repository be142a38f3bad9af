//! Verify decision codes: the stable vocabulary of `/v1/verify` and `/v1/auth`.

use serde::{Deserialize, Serialize};

/// Outcome of verifying a credential. The string forms are a public interface: never rename them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DecisionCode {
    /// The credential is good and carries every required scope.
    Valid,
    /// Not a Keygate credential: unknown prefix, wrong length or alphabet, bad checksum.
    Malformed,
    /// Well-formed, but no such credential exists.
    NotFound,
    /// The credential (or, after a rotation, this secret of it) has expired.
    Expired,
    /// The credential was revoked; this is permanent.
    Revoked,
    /// The credential, or the consumer it belongs to, is disabled.
    Disabled,
    /// The credential is good but lacks a required scope.
    InsufficientScope,
    /// The request comes from an address outside the key's allow-list.
    IpNotAllowed,
    /// A rate limit of the key is exhausted; `rate_limit.reset` says when it frees up.
    RateLimited,
    /// The key's quota is used up.
    QuotaExceeded,
    /// The token is bound to a key (DPoP, RFC 9449) and the request carried no valid proof of it.
    DpopProofInvalid,
    /// The token was issued for another resource (its audience, RFC 8707) than the one asked about.
    WrongAudience,
}

impl DecisionCode {
    pub const ALL: [DecisionCode; 12] = [
        DecisionCode::Valid,
        DecisionCode::Malformed,
        DecisionCode::NotFound,
        DecisionCode::Expired,
        DecisionCode::Revoked,
        DecisionCode::Disabled,
        DecisionCode::InsufficientScope,
        DecisionCode::IpNotAllowed,
        DecisionCode::RateLimited,
        DecisionCode::QuotaExceeded,
        DecisionCode::DpopProofInvalid,
        DecisionCode::WrongAudience,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecisionCode::Valid => "VALID",
            DecisionCode::Malformed => "MALFORMED",
            DecisionCode::NotFound => "NOT_FOUND",
            DecisionCode::Expired => "EXPIRED",
            DecisionCode::Revoked => "REVOKED",
            DecisionCode::Disabled => "DISABLED",
            DecisionCode::InsufficientScope => "INSUFFICIENT_SCOPE",
            DecisionCode::IpNotAllowed => "IP_NOT_ALLOWED",
            DecisionCode::RateLimited => "RATE_LIMITED",
            DecisionCode::QuotaExceeded => "QUOTA_EXCEEDED",
            DecisionCode::DpopProofInvalid => "DPOP_PROOF_INVALID",
            DecisionCode::WrongAudience => "WRONG_AUDIENCE",
        }
    }

    /// A stable small index, for per-code counters.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// A sentence for people reading a decision.
    pub fn message(self) -> &'static str {
        match self {
            DecisionCode::Valid => "the credential is valid",
            DecisionCode::Malformed => "the credential is not a well-formed Keygate credential",
            DecisionCode::NotFound => "no such credential exists",
            DecisionCode::Expired => "the credential has expired",
            DecisionCode::Revoked => "the credential has been revoked",
            DecisionCode::Disabled => "the credential or its consumer is disabled",
            DecisionCode::InsufficientScope => "the credential lacks a required scope",
            DecisionCode::IpNotAllowed => {
                "the request comes from an address the credential may not be used from"
            }
            DecisionCode::RateLimited => "the credential's rate limit is exhausted; retry after the reset",
            DecisionCode::QuotaExceeded => "the credential's quota is used up",
            DecisionCode::DpopProofInvalid => {
                "the token is bound to a key (DPoP) and the request carried no valid proof of possession"
            }
            DecisionCode::WrongAudience => "the token was issued for another resource (audience)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_forms_match_serde() {
        for code in DecisionCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(DecisionCode::ALL[code.index()], code);
        }
    }
}
