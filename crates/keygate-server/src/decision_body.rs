//! How a decision looks on the wire: the JSON bodies `/v1/verify` answers (and forward-auth sends on
//! refusals). These structs are what is serialised *and* what the OpenAPI document shows
//! ([`DecisionBody`]), so the two cannot drift.
//!
//! A `VALID` API-key body is serialised once when the key is cached; the live `rate_limit` and `quota`
//! are appended per request (the cached body ends just before its closing brace), which keeps the hot
//! path free of serialisation.

use bytes::{BufMut, Bytes, BytesMut};
use keygate_core::DecisionCode;
use keygate_core::limits::RateLimit;
use serde::Serialize;
use utoipa::ToSchema;

use crate::runtime::RateLimitState;
use crate::verify::Decision;

/// Any decision, for the OpenAPI document: an API key that verified, an access token (valid or not),
/// or any other refusal.
#[derive(ToSchema)]
#[allow(dead_code, reason = "documents the bodies below; never built")]
pub enum DecisionBody<'a> {
    ApiKey(ValidBody<'a>),
    AccessToken(TokenBody<'a>),
    Invalid(InvalidBody<'a>),
}

/// A decision about an access token (JWT or opaque).
#[derive(Serialize, ToSchema)]
pub struct TokenBody<'a> {
    pub(crate) valid: bool,
    #[schema(value_type = String, example = "VALID")]
    pub(crate) code: DecisionCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<&'static str>,
    pub(crate) kind: &'static str,
    #[schema(value_type = String, example = "jwt")]
    pub(crate) token_format: keygate_store::TokenFormat,
    /// The OAuth client (absent for a personal access token).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(crate) client_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub(crate) consumer_id: &'a str,
    pub(crate) sub: &'a str,
    /// For a token issued on a user's behalf (authorization code flow): the user; also its `sub`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) user_id: Option<&'a str>,
    #[schema(value_type = Vec<String>)]
    pub(crate) scopes: &'a [String],
    #[schema(value_type = Vec<String>)]
    pub(crate) aud: &'a [String],
    pub(crate) expires_at: String,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub(crate) missing_scopes: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit: Option<RateLimitView<'a>>,
}

/// `VALID` for an API key.
#[derive(Serialize, ToSchema)]
pub struct ValidBody<'a> {
    pub(crate) valid: bool,
    #[schema(value_type = String, example = "VALID")]
    pub(crate) code: DecisionCode,
    pub(crate) kind: &'static str,
    pub(crate) key_id: &'a str,
    pub(crate) consumer_id: &'a str,
    pub(crate) name: &'a str,
    pub(crate) environment: &'static str,
    #[schema(value_type = Vec<String>)]
    pub(crate) scopes: &'a [String],
    pub(crate) expires_at: Option<String>,
    #[schema(value_type = Object)]
    pub(crate) metadata: &'a serde_json::Value,
    /// The tightest rate limit, for keys with limits (appended per request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit: Option<RateLimitView<'a>>,
    /// For keys with a quota (appended per request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) quota: Option<QuotaView>,
}

/// Any other decision about an API key (or a credential not identified at all).
#[derive(Serialize, ToSchema)]
pub struct InvalidBody<'a> {
    pub(crate) valid: bool,
    #[schema(value_type = String, example = "VALID")]
    pub(crate) code: DecisionCode,
    #[schema(value_type = String)]
    pub(crate) message: std::borrow::Cow<'static, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) consumer_id: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub(crate) missing_scopes: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rate_limit: Option<RateLimitView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) quota: Option<QuotaView>,
}

/// The tightest rate limit of a decision.
#[derive(Serialize, ToSchema)]
pub struct RateLimitView<'a> {
    pub(crate) name: &'a str,
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Seconds until the next request is allowed (denied), or until the limit is whole again (allowed):
    /// the same number as the `RateLimit-Reset` header, and as `Retry-After` on a denial.
    pub(crate) reset: u64,
}

#[derive(Serialize, ToSchema)]
pub struct QuotaView {
    pub(crate) remaining: u64,
}

impl<'a> RateLimitView<'a> {
    pub(crate) fn new(r: &RateLimitState, limits: &'a [RateLimit]) -> Self {
        let name = limits.get(r.index).map_or("", |l| l.name.as_str());
        RateLimitView { name, limit: r.limit, remaining: r.remaining, reset: r.reset_seconds() }
    }
}

/// Serialises a decision body. Plain data cannot fail to serialise; if it ever did, the answer still
/// carries the decision's code (never an empty body), the log says why, and the unit test
/// `every_decision_body_is_json_with_its_code` pins that it does not happen.
pub(crate) fn json_body<T: Serialize>(body: &T, code: DecisionCode) -> Bytes {
    match serde_json::to_vec(body) {
        Ok(v) => Bytes::from(v),
        Err(e) => {
            tracing::error!(error = %e, code = code.as_str(), "cannot serialise a decision body");
            Bytes::from(format!(r#"{{"valid":{},"code":"{}"}}"#, code == DecisionCode::Valid, code.as_str()))
        }
    }
}

const MALFORMED_BODY: &[u8] =
    br#"{"valid":false,"code":"MALFORMED","message":"the credential is not a well-formed Keygate credential"}"#;
const NOT_FOUND_BODY: &[u8] = br#"{"valid":false,"code":"NOT_FOUND","message":"no such credential exists"}"#;

impl Decision {
    /// The JSON body of this decision, as `/v1/verify` answers it.
    pub fn body(&self) -> Bytes {
        if let Some(t) = &self.token {
            let body = TokenBody {
                valid: self.code == DecisionCode::Valid,
                code: self.code,
                message: (self.code != DecisionCode::Valid).then(|| self.code.message()),
                kind: t.kind.as_str(),
                token_format: t.format,
                client_id: &t.client_id,
                consumer_id: &t.consumer_id,
                sub: &t.subject,
                user_id: t.user_id.as_deref(),
                scopes: &t.scopes,
                aud: &t.audiences,
                expires_at: crate::time::rfc3339(t.expires_at),
                missing_scopes: &self.missing_scopes,
                rate_limit: match (&self.rate_limit, &self.token_limits) {
                    (Some(r), Some(l)) => Some(RateLimitView::new(r, l)),
                    _ => None,
                },
            };
            return json_body(&body, self.code);
        }
        match (self.code, &self.key) {
            (DecisionCode::Valid, Some(k)) => {
                if self.rate_limit.is_none() && self.quota_remaining.is_none() {
                    return k.valid_body.clone();
                }
                let mut b = BytesMut::with_capacity(k.valid_prefix.len() + 160);
                b.put_slice(&k.valid_prefix);
                if let Some(r) = &self.rate_limit {
                    b.put_slice(b",\"rate_limit\":");
                    // Plain numbers and a validated name: serialising cannot fail.
                    if let Err(e) =
                        serde_json::to_writer((&mut b).writer(), &RateLimitView::new(r, &k.limits))
                    {
                        tracing::error!(error = %e, "cannot serialise a rate-limit view");
                        b.put_slice(b"null");
                    }
                }
                if let Some(q) = self.quota_remaining {
                    b.put_slice(b",\"quota\":{\"remaining\":");
                    b.put_slice(itoa::Buffer::new().format(q).as_bytes());
                    b.put_u8(b'}');
                }
                b.put_u8(b'}');
                b.freeze()
            }
            (DecisionCode::Malformed, _) => Bytes::from_static(MALFORMED_BODY),
            (DecisionCode::NotFound, _) => Bytes::from_static(NOT_FOUND_BODY),
            (code, key) => {
                let message = match (code, &self.rate_limit, key) {
                    (DecisionCode::RateLimited, Some(r), Some(k)) => match k.limits.get(r.index) {
                        Some(l) => std::borrow::Cow::Owned(format!(
                            "the rate limit '{}' ({} per {} s) is used up; retry in {} s",
                            l.name,
                            l.limit,
                            l.window_seconds,
                            r.reset_seconds()
                        )),
                        None => code.message().into(),
                    },
                    _ => code.message().into(),
                };
                let body = InvalidBody {
                    valid: false,
                    code,
                    message,
                    kind: key.as_ref().map(|_| "api_key"),
                    key_id: key.as_ref().map(|k| k.key_id.as_str()),
                    consumer_id: key.as_ref().map(|k| k.consumer_id.as_str()),
                    missing_scopes: &self.missing_scopes,
                    rate_limit: match (&self.rate_limit, key) {
                        (Some(r), Some(k)) => Some(RateLimitView::new(r, &k.limits)),
                        _ => None,
                    },
                    quota: self.quota_remaining.map(|remaining| QuotaView { remaining }),
                };
                json_body(&body, code)
            }
        }
    }
}
