//! The one place where an error becomes an HTTP response.
//!
//! Every non-OAuth error answers `{"code": "...", "message": "..."}` (plus `field` where one input is
//! at fault). Codes are stable: scripts match on them; messages are for people and may change.
//! A 500 answers a generic body; the real error is logged (errors never hold secrets).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keygate_store::StoreError;
use serde::Serialize;

/// Stable error codes. Each variant's doc names its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the body is not valid JSON.
    MalformedJson,
    /// 400: the JSON is valid but has the wrong shape (missing, unknown or mistyped fields).
    InvalidRequest,
    /// 400: a query parameter is missing or has the wrong type.
    InvalidQuery,
    /// 400: a path segment cannot be read (e.g. percent-encoded bytes that are not UTF-8).
    InvalidPath,
    /// 400 (gateway): the path has a segment that could mean something else upstream (`..`, `//`, an
    /// encoded `/`); it is not forwarded.
    AmbiguousPath,
    /// 401: no credential, or one that does not verify.
    Unauthorized,
    /// 403: the credential is valid but lacks the permission this route needs.
    Forbidden,
    /// 404: no such route or object.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: the key is revoked; revocation is permanent.
    KeyRevoked,
    /// 409: the consumer is disabled, so it cannot get new keys.
    ConsumerDisabled,
    /// 409: the request conflicts with Keygate's own objects (e.g. disabling the system consumer).
    Conflict,
    /// 409: a key with this secret already exists (import).
    DuplicateKey,
    /// 413: the body is larger than the configured limit.
    PayloadTooLarge,
    /// 415: the body must be `application/json`.
    UnsupportedMediaType,
    /// 422: a field has a value Keygate cannot accept; `field` names it.
    ValidationFailed,
    /// 429: this address made too many failed credential checks; retry after `Retry-After` seconds.
    TooManyFailures,
    /// 503: the database is busy, locked, full or unreachable; nothing was changed. Retry later.
    StorageUnavailable,
    /// 503: the request took longer than `request_timeout_seconds` (usually a slow database). A change
    /// may or may not have been made: check before retrying it.
    RequestTimeout,
    /// 502 (gateway): the upstream could not be reached or broke the connection.
    UpstreamUnavailable,
    /// 504 (gateway): the upstream did not answer within the route's `timeout_seconds`.
    UpstreamTimeout,
    /// 500: a bug. The response carries no detail; the server log has it.
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::MalformedJson
            | ErrorCode::InvalidRequest
            | ErrorCode::InvalidQuery
            | ErrorCode::InvalidPath
            | ErrorCode::AmbiguousPath => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::KeyRevoked
            | ErrorCode::ConsumerDisabled
            | ErrorCode::Conflict
            | ErrorCode::DuplicateKey => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::ValidationFailed => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::StorageUnavailable | ErrorCode::RequestTimeout => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), field: None, retry_after: None }
    }

    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            code: ErrorCode::ValidationFailed,
            message: format!("{field}: {message}"),
            field: Some(field.into()),
            retry_after: None,
        }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        // Ids are not secrets, but echo only a bounded, printable amount of whatever was sent.
        let shown: String = id.chars().filter(|c| !c.is_control()).take(64).collect();
        ApiError::new(ErrorCode::NotFound, format!("no {what} with id {shown:?}"))
    }

    /// 429 for an address that spent its failed-attempt budget.
    pub fn throttled(retry_after_ms: i64) -> Self {
        let secs = (retry_after_ms.max(0) as u64).div_ceil(1000).max(1);
        ApiError {
            retry_after: Some(secs),
            ..ApiError::new(
                ErrorCode::TooManyFailures,
                format!("too many failed credential checks from this address; retry in {secs} s"),
            )
        }
    }

    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        ApiError::new(ErrorCode::Internal, "internal error; the server log has the details")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "database unavailable");
                ApiError::new(
                    ErrorCode::StorageUnavailable,
                    "the database is busy or unavailable; nothing was changed, retry shortly",
                )
            }
            StoreError::Conflict(detail) => {
                tracing::warn!(%detail, "store conflict");
                ApiError::new(ErrorCode::Conflict, "the request conflicts with stored data; retry it")
            }
            other => ApiError::internal("store error", other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let retry_after = self.retry_after;
        let body = ErrorBody { code: self.code, message: self.message, field: self.field };
        let mut resp = (status, axum::Json(body)).into_response();
        let headers = resp.headers_mut();
        match self.code {
            ErrorCode::Unauthorized => {
                headers
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"keygate\""));
            }
            ErrorCode::StorageUnavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        if let Some(secs) = retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// `axum::Json` with rejections in our error shape.
///
/// The common case is read without axum's detours: a body sent as exactly `application/json` is
/// parsed by `serde_json` directly, and only a body that fails to parse goes through `axum::Json` (whose
/// deserializer tracks the path of every field, to name the one in error: a fifth of a verify's
/// handler time). Everything else — another spelling of the content type, a rejection — is axum's.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let plain_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"application/json"));
        if !plain_json {
            return match axum::Json::<T>::from_request(req, state).await {
                Ok(axum::Json(v)) => Ok(ApiJson(v)),
                Err(rejection) => Err(json_rejection(rejection)),
            };
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| json_rejection(JsonRejection::from(e)))?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(ApiJson(v)),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(v)) => Ok(ApiJson(v)),
                Err(rejection) => Err(json_rejection(rejection)),
            },
        }
    }
}

/// What a body over `body_limit` is told, in either error shape.
pub(crate) const BODY_TOO_LARGE: &str = "the body is larger than the server accepts";

/// The request body, with axum's rejections (over the body limit, cut off) in Keygate's error shape
/// rather than as axum's plain text.
pub struct ApiBytes(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(req, state).await.map(ApiBytes).map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge, BODY_TOO_LARGE)
            } else {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("the body could not be read: {}", r.body_text()),
                )
            }
        })
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(ErrorCode::MalformedJson, format!("the body is not valid JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => ApiError::new(ErrorCode::InvalidRequest, e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as JSON with the header 'Content-Type: application/json'",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(ErrorCode::PayloadTooLarge, BODY_TOO_LARGE)
        }
        other => ApiError::new(ErrorCode::InvalidRequest, other.body_text()),
    }
}

/// `axum::extract::Path` with rejections in our error shape (axum's are plain text).
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    axum::extract::Path<T>: FromRequestParts<S, Rejection = PathRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            // A route and its extractor that do not match is Keygate's bug, not the client's.
            Err(r) if r.status().is_server_error() => {
                Err(ApiError::internal("the route's path parameters do not fit its handler", r.body_text()))
            }
            Err(r) => Err(ApiError::new(ErrorCode::InvalidPath, r.body_text())),
        }
    }
}

/// `axum::extract::Query` with rejections in our error shape.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    axum::extract::Query<T>: FromRequestParts<S, Rejection = QueryRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(ApiError::new(ErrorCode::InvalidQuery, r.body_text())),
        }
    }
}
