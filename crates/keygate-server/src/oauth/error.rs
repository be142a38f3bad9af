//! OAuth 2 errors (RFC 6749 section 5.2 shape), kept apart from the admin API's error table: each code
//! carries its HTTP status and its `WWW-Authenticate` challenge, as kanidm does.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The `error` values Keygate's OAuth endpoints answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthErrorCode {
    InvalidRequest,
    /// The code or refresh token is invalid, expired, revoked, used, or bound to something else.
    InvalidGrant,
    /// Client authentication failed; `basic`: the client tried HTTP Basic (so the challenge says Basic).
    InvalidClient {
        basic: bool,
    },
    UnauthorizedClient,
    UnsupportedGrantType,
    InvalidScope,
    /// RFC 8707: a `resource` the client may not ask for.
    InvalidTarget,
    /// RFC 6750: a valid Keygate credential without the needed permission.
    InsufficientScope,
    /// RFC 8628 section 3.5, used for an address that spent its failure budget.
    SlowDown,
    /// RFC 8628 section 3.5: the device polled faster than its interval (400, unlike [`Self::SlowDown`]).
    PollSlowDown,
    /// RFC 8628: the user has not answered yet.
    AuthorizationPending,
    /// RFC 8628: the user denied the device.
    AccessDenied,
    /// RFC 8628: the device code expired; start again.
    ExpiredToken,
    /// RFC 9449: the DPoP proof is missing parts, does not verify, or does not match the request.
    InvalidDpopProof,
    /// RFC 7591 §3.2.2: a redirect URI registration refuses.
    InvalidRedirectUri,
    /// RFC 7591 §3.2.2: other client metadata registration refuses.
    InvalidClientMetadata,
    /// RFC 6750 §3.1 (registration management, RFC 7592): a missing or wrong registration access token.
    InvalidToken,
    TemporarilyUnavailable,
    ServerError,
    /// The body is over `body_limit`: `invalid_request`, answered 413.
    BodyTooLarge,
    /// The endpoint does not take this method: `invalid_request`, answered 405.
    MethodNotAllowed,
}

impl OAuthErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthErrorCode::InvalidRequest
            | OAuthErrorCode::BodyTooLarge
            | OAuthErrorCode::MethodNotAllowed => "invalid_request",
            OAuthErrorCode::InvalidGrant => "invalid_grant",
            OAuthErrorCode::InvalidClient { .. } => "invalid_client",
            OAuthErrorCode::UnauthorizedClient => "unauthorized_client",
            OAuthErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthErrorCode::InvalidScope => "invalid_scope",
            OAuthErrorCode::InvalidTarget => "invalid_target",
            OAuthErrorCode::InsufficientScope => "insufficient_scope",
            OAuthErrorCode::SlowDown | OAuthErrorCode::PollSlowDown => "slow_down",
            OAuthErrorCode::AuthorizationPending => "authorization_pending",
            OAuthErrorCode::AccessDenied => "access_denied",
            OAuthErrorCode::ExpiredToken => "expired_token",
            OAuthErrorCode::InvalidDpopProof => "invalid_dpop_proof",
            OAuthErrorCode::InvalidRedirectUri => "invalid_redirect_uri",
            OAuthErrorCode::InvalidClientMetadata => "invalid_client_metadata",
            OAuthErrorCode::InvalidToken => "invalid_token",
            OAuthErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            OAuthErrorCode::ServerError => "server_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            OAuthErrorCode::InvalidClient { .. } | OAuthErrorCode::InvalidToken => StatusCode::UNAUTHORIZED,
            OAuthErrorCode::InsufficientScope => StatusCode::FORBIDDEN,
            OAuthErrorCode::SlowDown => StatusCode::TOO_MANY_REQUESTS,
            OAuthErrorCode::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            OAuthErrorCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            OAuthErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            OAuthErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `WWW-Authenticate` challenge a 401 carries.
    pub fn challenge(self) -> Option<&'static str> {
        match self {
            OAuthErrorCode::InvalidClient { basic: true } => Some("Basic realm=\"keygate\""),
            OAuthErrorCode::InvalidClient { basic: false } => Some("Bearer realm=\"keygate\""),
            OAuthErrorCode::InvalidToken => Some("Bearer realm=\"keygate\", error=\"invalid_token\""),
            _ => None,
        }
    }
}

/// An RFC 6749 error response.
#[derive(Debug)]
pub struct OAuthError {
    pub code: OAuthErrorCode,
    pub description: String,
}

impl OAuthError {
    pub fn new(code: OAuthErrorCode, description: impl Into<String>) -> Self {
        OAuthError { code, description: description.into() }
    }

    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(OAuthErrorCode::InvalidRequest, description)
    }

    pub fn invalid_client(basic: bool) -> Self {
        Self::new(OAuthErrorCode::InvalidClient { basic }, "client authentication failed")
    }
}

/// The request body of an OAuth endpoint: [`ApiBytes`](crate::error::ApiBytes), rejected in RFC 6749's shape.
pub struct OAuthBody(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for OAuthBody {
    type Rejection = OAuthError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        let crate::error::ApiBytes(body) = crate::error::ApiBytes::from_request(req, state).await?;
        Ok(OAuthBody(body))
    }
}

/// A path parameter of an OAuth endpoint: [`ApiPath`](crate::error::ApiPath), rejected in RFC 6749's shape.
pub struct OAuthPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for OAuthPath<T>
where
    crate::error::ApiPath<T>: axum::extract::FromRequestParts<S, Rejection = crate::error::ApiError>,
    S: Send + Sync,
{
    type Rejection = OAuthError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let crate::error::ApiPath(v) = crate::error::ApiPath::<T>::from_request_parts(parts, state).await?;
        Ok(OAuthPath(v))
    }
}

/// An unreadable request (body or path), said in RFC 6749's shape: the same status, `server_error` for
/// Keygate's own faults, `invalid_request` for the client's.
impl From<crate::error::ApiError> for OAuthError {
    fn from(e: crate::error::ApiError) -> Self {
        use crate::error::ErrorCode;
        let code = match e.code {
            ErrorCode::PayloadTooLarge => OAuthErrorCode::BodyTooLarge,
            ErrorCode::Internal => OAuthErrorCode::ServerError,
            _ => OAuthErrorCode::InvalidRequest,
        };
        OAuthError::new(code, e.message)
    }
}

impl From<keygate_store::StoreError> for OAuthError {
    fn from(e: keygate_store::StoreError) -> Self {
        let api = crate::error::ApiError::from(e);
        let code = if api.code.status() == StatusCode::SERVICE_UNAVAILABLE {
            OAuthErrorCode::TemporarilyUnavailable
        } else {
            OAuthErrorCode::ServerError
        };
        OAuthError::new(code, api.message)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.code.as_str(), "error_description": self.description});
        let mut resp = (self.code.status(), Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(challenge) = self.code.challenge() {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        resp
    }
}
