//! `POST /v1/verify` (for services that check credentials themselves) and `GET /v1/auth` (forward-auth
//! for nginx `auth_request`, Traefik `forwardAuth`, Envoy `ext_authz`).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;
use utoipa_axum::{router::OpenApiRouter, routes};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use keygate_core::{DecisionCode, SecretKind, scope};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::{ClientIp, VerifyCaller, presented_credential};
use crate::decision_body::DecisionBody;
use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody};
use crate::oauth::tokens::looks_like_jwt;
use crate::state::AppState;
use crate::verify::{Context, Decision};

pub fn router() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(verify))
        .routes(routes!(forward_auth))
        .routes(routes!(forward_auth_path))
}

#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The credential to check, e.g. an API key `kg_live_…`.
    pub credential: String,
    /// Scopes the credential must all carry.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Units of rate limit and quota this request uses (default 1; 0 checks without consuming).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    /// The end client's IP address, for IP allow-lists, last-used tracking and brute-force throttling.
    /// Without it, the address of the caller of this endpoint is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// For access tokens: a resource the token's audience must include.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// For DPoP-bound tokens (RFC 9449): the proof the API's request carried, with that request's
    /// method and URL. A bound token without a valid proof is `DPOP_PROOF_INVALID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dpop: Option<DpopInput>,
}

/// The DPoP proof of the request being authorised, and what it must match.
#[derive(Debug, Default, Deserialize, serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DpopInput {
    /// The `DPoP` header's value.
    pub proof: String,
    /// The request's method, e.g. `GET`.
    pub method: String,
    /// The request's URL as the client called it, e.g. `https://api.example.com/v1/articles`.
    pub url: String,
}

/// Decides about any credential: API keys through the key verifier, access tokens (JWT or `kgat_`)
/// through the OAuth verifier.
pub async fn decide_credential<S: AsRef<str>>(
    state: &AppState,
    credential: &str,
    required: &[S],
    ctx: Context,
    audience: Option<&str>,
    dpop: Option<&DpopInput>,
) -> Result<Decision, keygate_store::StoreError> {
    if looks_like_jwt(credential)
        || credential.starts_with(SecretKind::AccessToken.prefix())
        || credential.starts_with(SecretKind::PersonalToken.prefix())
    {
        let info = match crate::oauth::exchange::verify_token(state, credential, audience, ctx.now_ms).await?
        {
            Ok(info) => info,
            Err(code) => return Ok(Decision::bare(code)),
        };
        // A DPoP-bound token proves its key on every use; a bearer presentation of it is refused.
        if let Some(jkt) = &info.jkt {
            let proven = dpop.and_then(|d| {
                let check = crate::oauth::dpop::ProofCheck {
                    proof: &d.proof,
                    method: &d.method,
                    url: &d.url,
                    access_token: Some(credential),
                };
                state.oauth.dpop.verify(&check, ctx.now_ms).ok()
            });
            if proven.as_deref() != Some(jkt.as_str()) {
                return Ok(Decision::bare(DecisionCode::DpopProofInvalid));
            }
        }
        let mut decision = Decision::for_token(info.clone(), required);
        if info.kind == crate::oauth::tokens::TokenKind::Personal && decision.is_valid() {
            state.oauth.pat_used(&info.jti, ctx.now_ms, ctx.ip);
        }
        // Tokens count against their consumer's plan as its keys do: one set of cells per client.
        if let Some(plan) = state.oauth.consumer(&info.consumer_id).map(|c| c.limits)
            && !plan.is_empty()
        {
            let runtime = state.verifier.runtimes.for_client(&info.client_id, &info.consumer_id);
            if decision.is_valid() {
                let shared = match state.verifier.shared_limits.get() {
                    Some(limiter) => limiter.check(&info.client_id, &plan, ctx.cost).await,
                    None => None,
                };
                let admission = runtime.admit_with(&plan, ctx.cost, ctx.now_ms, shared.as_ref());
                decision.code = admission.code;
                decision.rate_limit = admission.rate_limit;
            }
            runtime.record(decision.code, ctx.now_ms, ctx.ip);
            decision.token_limits = Some(plan);
        }
        return Ok(decision);
    }
    state.verifier.verify(credential, required, ctx).await
}

/// Did this decision fail to identify any credential (a guess, a typo)? Those count against the
/// address's failure budget.
pub(crate) fn is_failure(d: &Decision) -> bool {
    matches!(d.code, DecisionCode::Malformed | DecisionCode::NotFound)
}

/// Largest `cost` of one verify.
pub const MAX_COST: u64 = 1_000_000;

pub(crate) fn record(state: &AppState, decision: &Decision, started: Instant) {
    state.metrics.record_decision(decision.code, started.elapsed());
}

/// Verify a credential. Every decision answers 200; read `valid` and `code`.
///
/// The caller needs a credential with the `keygate:verify` permission (admin keys have it).
#[utoipa::path(post, path = "/v1/verify", tag = "verify", request_body = VerifyRequest,
    responses((status = 200, body = DecisionBody), (status = "4XX", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn verify(
    State(state): State<Arc<AppState>>,
    VerifyCaller(caller): VerifyCaller,
    ApiJson(req): ApiJson<VerifyRequest>,
) -> ApiResult<Response> {
    let started = Instant::now();
    if req.scopes.len() > scope::MAX_SCOPES {
        return Err(ApiError::invalid("scopes", format!("at most {} scopes", scope::MAX_SCOPES)));
    }
    if let Some(e) = req.scopes.iter().find_map(|s| scope::validate_scope(s).err()) {
        return Err(ApiError::invalid("scopes", e));
    }
    let cost = req.cost.unwrap_or(1);
    if cost > MAX_COST {
        return Err(ApiError::invalid("cost", format!("must be at most {MAX_COST}")));
    }
    let end_client = match req.ip.as_deref() {
        Some(ip) => Some(
            ip.trim()
                .parse::<IpAddr>()
                .map_err(|_| ApiError::invalid("ip", "must be an IPv4 or IPv6 address"))?,
        ),
        None => None,
    };
    let now = state.now();
    let ctx = Context { ip: end_client.or(caller.ip), cost, now_ms: now };
    let decision = decide_credential(
        &state,
        &req.credential,
        &req.scopes,
        ctx,
        req.audience.as_deref(),
        req.dpop.as_ref(),
    )
    .await?;
    // Only an end client named in the request is throttled: the caller itself is a trusted gateway
    // that speaks for many clients. Only failed checks are refused once the budget is spent.
    if is_failure(&decision) {
        if let Some(retry) = state.throttle.blocked(end_client, now) {
            return Err(ApiError::throttled(retry));
        }
        state.throttle.record_failure(end_client, now);
    }
    record(&state, &decision, started);
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], decision.body())
        .into_response())
}

/// What a forward-auth request's query says, read in one pass and borrowed from it where nothing was
/// percent-decoded: the values of `scope` and `scopes` (repeatable, each a space- or comma-separated
/// list) and the first `limited_status`, `resource` and `audience`.
#[derive(Default)]
struct ForwardQuery<'q> {
    scopes: Vec<Cow<'q, str>>,
    limited_status: Option<Cow<'q, str>>,
    resource: Option<Cow<'q, str>>,
    audience: Option<Cow<'q, str>>,
}

impl<'q> ForwardQuery<'q> {
    fn parse(uri: &'q Uri) -> Self {
        let mut q = ForwardQuery::default();
        let Some(query) = uri.query() else { return q };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let first = match &*k {
                "scope" | "scopes" => {
                    q.scopes.push(v);
                    continue;
                }
                "limited_status" => &mut q.limited_status,
                "resource" => &mut q.resource,
                "audience" => &mut q.audience,
                _ => continue,
            };
            if first.is_none() {
                *first = Some(v);
            }
        }
        q
    }
}

const REQUIRED_SCOPES: HeaderName = HeaderName::from_static("x-keygate-required-scopes");

/// Required scopes of a forward-auth request: the `X-Keygate-Required-Scopes` header, then the query's,
/// each a space- or comma-separated list.
fn required_scopes<'a>(headers: &'a HeaderMap, query: &'a ForwardQuery<'_>) -> Vec<&'a str> {
    let mut out = Vec::new();
    let lists = headers.get_all(REQUIRED_SCOPES).into_iter().filter_map(|v| v.to_str().ok());
    for list in lists.chain(query.scopes.iter().map(|v| &**v)) {
        out.extend(list.split([' ', ',']).filter(|s| !s.is_empty()));
    }
    out
}

pub(crate) fn www_authenticate(
    error: Option<(&str, &str)>,
    scope: Option<&str>,
    resource: Option<&str>,
) -> HeaderValue {
    let mut v = String::from("Bearer realm=\"keygate\"");
    if let Some((code, description)) = error {
        v.push_str(&format!(", error=\"{code}\", error_description=\"{description}\""));
    }
    if let Some(s) = scope {
        v.push_str(&format!(", scope=\"{}\"", s.replace(['"', '\\'], "")));
    }
    // RFC 9728 §5.1: where a client finds out which authorization server to ask (the resource is one
    // the operator configured, so the URL is never a client's input).
    if let Some(r) = resource {
        v.push_str(&format!(", resource_metadata=\"{}\"", crate::oauth::resource::metadata_url(r)));
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"keygate\""))
}

/// Forward-auth: 200 with identity headers, or 401/403/429 with an RFC 6750 `WWW-Authenticate`.
///
/// Reads the credential from `X-API-Key` or `Authorization: Bearer`. Required scopes come from the
/// `X-Keygate-Required-Scopes` header or the `scope` query parameter. On success the response carries
/// `X-Keygate-Consumer`, `X-Keygate-Key-Id`, `X-Keygate-Scopes` and `X-Keygate-Kind`, for the proxy to
/// pass upstream. Keys with rate limits get `RateLimit-Limit`, `RateLimit-Remaining` and
/// `RateLimit-Reset` (seconds); a rate-limited request is 429 with `Retry-After`.
#[utoipa::path(get, path = "/v1/auth", tag = "verify",
    params(("scope" = Option<String>, Query, description = "required scopes, space- or comma-separated; repeatable"),
           ("limited_status" = Option<u16>, Query, description = "403: answer a rate-limited request with 403 and Retry-After instead of 429 (nginx auth_request)"),
           ("X-Keygate-Required-Scopes" = Option<String>, Header, description = "required scopes")),
    responses((status = 200, description = "valid; identity in X-Keygate-* headers"),
              (status = 401, body = DecisionBody, description = "missing or invalid credential"),
              (status = 403, body = DecisionBody, description = "valid credential without the required scopes, or from a disallowed address"),
              (status = 429, body = DecisionBody, description = "rate limit or quota exhausted, or too many failed attempts")),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn forward_auth(
    State(state): State<Arc<AppState>>,
    ClientIp(client): ClientIp,
    peer: crate::auth::Peer,
    req: Request,
) -> Response {
    let query = ForwardQuery::parse(req.uri());
    let mut resp = match decide_forward(&state, client, peer, req.headers(), &query).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // nginx's `auth_request` passes on only 401 and 403 (anything else becomes a 500): it asks for a
    // 403 (with the same `Retry-After`) and turns it back into a 429 itself.
    if resp.status() == StatusCode::TOO_MANY_REQUESTS && query.limited_status.as_deref() == Some("403") {
        *resp.status_mut() = StatusCode::FORBIDDEN;
    }
    resp
}

/// Forward-auth for proxies that append the original request's path (Envoy's HTTP `ext_authz` with
/// `path_prefix: /v1/auth`): answered exactly like `GET /v1/auth`, the path ignored.
#[utoipa::path(get, path = "/v1/auth/{*path}", tag = "verify",
    params(("path" = String, Path, description = "the original request's path, ignored"),
           ("scope" = Option<String>, Query, description = "required scopes, space- or comma-separated; repeatable"),
           ("limited_status" = Option<u16>, Query, description = "403: answer a rate-limited request with 403 and Retry-After instead of 429"),
           ("X-Keygate-Required-Scopes" = Option<String>, Header, description = "required scopes")),
    responses((status = 200, description = "valid; identity in X-Keygate-* headers"),
              (status = 401, body = DecisionBody, description = "missing or invalid credential"),
              (status = 403, body = DecisionBody, description = "valid credential without the required scopes, or from a disallowed address"),
              (status = 429, body = DecisionBody, description = "rate limit or quota exhausted, or too many failed attempts")),
    security(("bearer" = []), ("api_key" = [])))]
pub async fn forward_auth_path(
    state: State<Arc<AppState>>,
    client: ClientIp,
    peer: crate::auth::Peer,
    req: Request,
) -> Response {
    forward_auth(state, client, peer, req).await
}

async fn decide_forward(
    state: &AppState,
    client: crate::peer::Client,
    crate::auth::Peer(peer): crate::auth::Peer,
    headers: &HeaderMap,
    query: &ForwardQuery<'_>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let now = state.now();
    // A configured protected resource (RFC 9728): tokens must be issued for it (RFC 8707), and refusals
    // say where its metadata is.
    let named = query.resource.as_deref();
    let resource = crate::oauth::resource::resource_for(state, named, headers, peer);
    let Some(secret) = presented_credential(headers) else {
        let scope = resource.map(|_| required_scopes(headers, query).join(" ")).filter(|s| !s.is_empty());
        return Ok(missing_credential(scope.as_deref(), resource));
    };
    let required = required_scopes(headers, query);
    // A named resource is the audience even when it is not configured (fail closed).
    let audience = query.audience.as_deref().or(named).or(resource);
    let dpop = forwarded_dpop(headers);
    let decision = decide_credential(
        state,
        secret,
        &required,
        Context { ip: client.ip, cost: 1, now_ms: now },
        audience,
        dpop.as_ref(),
    )
    .await?;
    if only_for_protected_resources(state, &decision, audience) {
        return Ok(wrong_audience());
    }
    if is_failure(&decision) {
        if let Some(retry) = state.throttle.blocked(client.accountable, now) {
            return Err(ApiError::throttled(retry));
        }
        state.throttle.record_failure(client.accountable, now);
    }
    record(state, &decision, started);
    Ok(forward_auth_response(&decision, resource))
}

/// 401 for a request that carries no credential, with the RFC 6750 challenge.
pub(crate) fn missing_credential(scope: Option<&str>, resource: Option<&str>) -> Response {
    let mut resp = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "code": "unauthorized",
            "message": "send the credential in 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
        })),
    )
        .into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, www_authenticate(None, scope, resource));
    resp
}

/// A token made only for protected resources is good only where one of them is named: a request that
/// names no audience cannot accept it (else dropping the resource would skip the audience check).
pub(crate) fn only_for_protected_resources(
    state: &AppState,
    decision: &Decision,
    audience: Option<&str>,
) -> bool {
    let resources = &state.config.protected_resources;
    audience.is_none()
        && decision.code == DecisionCode::Valid
        && decision.token.as_ref().is_some_and(|t| {
            !resources.is_empty()
                && !t.audiences.is_empty()
                && t.audiences.iter().all(|a| resources.contains(a))
        })
}

/// 401 for a token presented where its audience is not named.
pub(crate) fn wrong_audience() -> Response {
    let mut resp = Response::new(Body::from(
        r#"{"valid":false,"code":"WRONG_AUDIENCE","message":"this token is for a protected resource; the request must name it"}"#,
    ));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        www_authenticate(Some(("invalid_token", "the token is for another resource")), None, None),
    );
    resp
}

/// Forward-auth and DPoP: the proof from the `DPoP` header, and the original request's method and URL
/// from the proxy's headers (Traefik: `X-Forwarded-Method`/`-Proto`/`-Host`/`-Uri`; nginx:
/// `X-Original-Method`, `X-Original-URL`).
fn forwarded_dpop(headers: &HeaderMap) -> Option<DpopInput> {
    let one = |n: HeaderName| {
        let mut all = headers.get_all(n).iter();
        let first = all.next()?.to_str().ok();
        if all.next().is_some() { None } else { first }
    };
    let proof = one(crate::auth::DPOP)?;
    // Two sources of the original request that disagree: a client may have set one of them itself
    // (proxies pass client headers through), so neither is believed.
    let method = match (
        one(HeaderName::from_static("x-forwarded-method")),
        one(HeaderName::from_static("x-original-method")),
    ) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => a.or(b)?,
    };
    let forwarded = match (
        one(HeaderName::from_static("x-forwarded-proto")),
        one(HeaderName::from_static("x-forwarded-host")),
        one(HeaderName::from_static("x-forwarded-uri")),
    ) {
        (Some(p), Some(h), Some(u)) => Some(format!("{p}://{h}{u}")),
        _ => None,
    };
    let url = match (forwarded, one(HeaderName::from_static("x-original-url"))) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => a.or(b.map(str::to_owned))?,
    };
    Some(DpopInput { proof: proof.to_string(), method: method.to_string(), url })
}

fn set_header(h: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

// Header names parsed once (a `&str` name is parsed and hashed on every insert).
const X_CONSUMER: HeaderName = HeaderName::from_static("x-keygate-consumer");
const X_CLIENT_ID: HeaderName = HeaderName::from_static("x-keygate-client-id");
const X_SUBJECT: HeaderName = HeaderName::from_static("x-keygate-subject");
const X_USER_ID: HeaderName = HeaderName::from_static("x-keygate-user-id");
const X_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
const X_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
const X_KIND: HeaderName = HeaderName::from_static("x-keygate-kind");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// The identity of a valid decision, as the headers forward-auth answers and the gateway sends upstream:
/// `X-Keygate-Consumer`, `-Key-Id` (keys), `-Client-Id`, `-Subject`, `-User-Id` (tokens), `-Scopes`,
/// `-Kind`. Returns false (and sets nothing) for any other decision.
pub(crate) fn identity_headers(h: &mut HeaderMap, decision: &Decision) -> bool {
    if decision.code != DecisionCode::Valid {
        return false;
    }
    if let Some(t) = &decision.token {
        if !t.consumer_id.is_empty() {
            set_header(h, X_CONSUMER, &t.consumer_id);
            set_header(h, X_CLIENT_ID, &t.client_id);
        }
        set_header(h, X_SUBJECT, &t.subject);
        if let Some(user) = &t.user_id {
            set_header(h, X_USER_ID, user);
        }
        set_header(h, X_SCOPES, &t.scopes.join(" "));
        h.insert(X_KIND, HeaderValue::from_static(t.kind.as_str()));
        return true;
    }
    if let Some(key) = &decision.key {
        set_header(h, X_CONSUMER, &key.consumer_id);
        set_header(h, X_KEY_ID, &key.key_id);
        set_header(h, X_SCOPES, &key.scopes_header);
        h.insert(X_KIND, HeaderValue::from_static("api_key"));
        return true;
    }
    false
}

/// The answer to a decision: 200 with the identity headers, or the refusal with its status,
/// `WWW-Authenticate` and JSON body (the gateway answers refusals with this too).
pub(crate) fn forward_auth_response(decision: &Decision, resource: Option<&str>) -> Response {
    let mut ok = Response::new(Body::empty());
    if identity_headers(ok.headers_mut(), decision) {
        rate_limit_headers(ok.headers_mut(), decision);
        return ok;
    }
    let mut resp = match (decision.code, &decision.key) {
        (DecisionCode::InsufficientScope, _) => {
            let mut resp = Response::new(Body::from(decision.body()));
            *resp.status_mut() = StatusCode::FORBIDDEN;
            let missing = decision.missing_scopes.join(" ");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                www_authenticate(
                    Some(("insufficient_scope", "the credential lacks a required scope")),
                    Some(&missing),
                    resource,
                ),
            );
            resp
        }
        (DecisionCode::IpNotAllowed, _) => {
            let mut resp = Response::new(Body::from(decision.body()));
            *resp.status_mut() = StatusCode::FORBIDDEN;
            resp
        }
        (DecisionCode::RateLimited | DecisionCode::QuotaExceeded, _) => {
            let mut resp = Response::new(Body::from(decision.body()));
            *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            rate_limit_headers(resp.headers_mut(), decision);
            resp
        }
        (DecisionCode::DpopProofInvalid, _) => {
            let mut resp = Response::new(Body::from(decision.body()));
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "DPoP realm=\"keygate\", error=\"invalid_dpop_proof\", algs=\"ES256 EdDSA RS256 PS256\"",
                ),
            );
            resp
        }
        (code, _) => {
            let mut resp = Response::new(Body::from(decision.body()));
            *resp.status_mut() = StatusCode::UNAUTHORIZED;
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                www_authenticate(Some(("invalid_token", code.message())), None, resource),
            );
            resp
        }
    };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `RateLimit-*` headers and, when denied, `Retry-After`: all name the same moment as the JSON `reset`
/// ([`crate::runtime::RateLimitState::reset_seconds`]).
pub(crate) fn rate_limit_headers(h: &mut HeaderMap, decision: &Decision) {
    let Some(r) = &decision.rate_limit else { return };
    let reset = r.reset_seconds().to_string();
    set_header(h, RATELIMIT_LIMIT, &r.limit.to_string());
    set_header(h, RATELIMIT_REMAINING, &r.remaining.to_string());
    set_header(h, RATELIMIT_RESET, &reset);
    if decision.code == DecisionCode::RateLimited {
        set_header(h, header::RETRY_AFTER, &reset);
    }
}
