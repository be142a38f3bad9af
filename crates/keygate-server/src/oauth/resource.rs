//! Protected resources (RFC 9728): the APIs Keygate guards through forward-auth. For each configured
//! resource Keygate serves its metadata (on the API's behalf: the proxy routes
//! `/.well-known/oauth-protected-resource…` to Keygate), names it in `WWW-Authenticate` so clients
//! (AI agents following the MCP authorization profile) can discover the authorization server from a
//! 401, and requires tokens to be issued for it (RFC 8707 audience).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde_json::{Value, json};
use url::Url;

use crate::error::ApiPath;
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// Checks a configured resource identifier: an absolute https URL (http only on a loopback host), with
/// no query or fragment (RFC 8707 §2). Returned without a trailing slash on its path.
pub fn check_resource(raw: &str) -> Result<String, String> {
    let url = Url::parse(raw.trim()).map_err(|e| format!("{raw:?} is not an absolute URL: {e}"))?;
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if !(url.scheme() == "https" || (url.scheme() == "http" && loopback)) {
        return Err(format!("{raw:?}: a resource is an https URL (http only on localhost)"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!("{raw:?}: a resource has no query, fragment or credentials"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Where a resource's metadata is (RFC 9728 §3.1: the well-known segment between host and path).
pub fn metadata_url(resource: &str) -> String {
    match Url::parse(resource) {
        Ok(u) => {
            let path = u.path().trim_end_matches('/');
            format!("{}/.well-known/oauth-protected-resource{path}", u.origin().ascii_serialization())
        }
        Err(_) => String::new(),
    }
}

/// Is `url` at or below `resource` (same origin, path prefix on a segment boundary)?
fn covers(resource: &str, url: &str) -> bool {
    let (Ok(r), Ok(u)) = (Url::parse(resource), Url::parse(url)) else { return false };
    if r.origin() != u.origin() {
        return false;
    }
    let rp = r.path().trim_end_matches('/');
    let up = u.path();
    up == rp || rp.is_empty() || up.strip_prefix(rp).is_some_and(|rest| rest.starts_with('/'))
}

/// The configured resource a forward-auth request is for: named by `?resource=` (the way to prefer: a
/// proxy route names its resource), or else found from `X-Forwarded-Proto`/`-Host`/`-Uri` (longest
/// match) — believed only from a trusted proxy (`trusted_proxies`), which must set them itself.
pub fn resource_for<'a>(
    state: &'a AppState,
    explicit: Option<&str>,
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
) -> Option<&'a str> {
    let resources = &state.config.protected_resources;
    if resources.is_empty() {
        return None;
    }
    if let Some(r) = explicit {
        let r = r.trim_end_matches('/');
        return resources.iter().find(|c| c.as_str() == r).map(String::as_str);
    }
    if !peer.is_some_and(|p| state.config.trusted_proxies.iter().any(|n| n.contains(&p))) {
        return None;
    }
    let one = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (Some(proto), Some(host), Some(uri)) =
        (one("x-forwarded-proto"), one("x-forwarded-host"), one("x-forwarded-uri"))
    else {
        return None;
    };
    let url = format!("{proto}://{host}{uri}");
    resources.iter().filter(|r| covers(r, &url)).max_by_key(|r| r.len()).map(String::as_str)
}

/// The scopes a resource's metadata lists: those described for the consent page and those dynamically
/// registered clients may get (when `publish_scopes` is on).
async fn scopes_supported(state: &AppState) -> Vec<String> {
    if !state.config.publish_scopes {
        return Vec::new();
    }
    let mut scopes: Vec<String> = state
        .store
        .scope_descriptions()
        .await
        .map(|d| d.into_iter().map(|(s, _)| s).collect())
        .unwrap_or_default();
    scopes.extend(state.config.registration.scopes.iter().cloned());
    scopes.sort();
    scopes.dedup();
    scopes
}

async fn metadata_for(state: &AppState, path: &str, headers: &HeaderMap) -> Result<Json<Value>, ApiError> {
    let path = path.trim_end_matches('/');
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(axum::http::header::HOST))
        .and_then(|v| v.to_str().ok());
    let candidates: Vec<&String> = state
        .config
        .protected_resources
        .iter()
        .filter(|r| Url::parse(r).is_ok_and(|u| u.path().trim_end_matches('/') == path))
        .collect();
    // Several resources with this path on different hosts: the one this request's host names.
    let resource = candidates
        .iter()
        .find(|r| host.is_some_and(|h| Url::parse(r).is_ok_and(|u| u.authority().eq_ignore_ascii_case(h))))
        .or_else(|| candidates.first())
        .ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, "no protected resource is configured at this path")
        })?;
    let mut doc = json!({
        "resource": resource,
        "authorization_servers": [state.oauth.issuer()],
        "bearer_methods_supported": ["header"],
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA", "RS256", "PS256"],
    });
    let scopes = scopes_supported(state).await;
    if !scopes.is_empty() {
        doc["scopes_supported"] = json!(scopes);
    }
    if let Some(docs) = &state.config.resource_documentation {
        doc["resource_documentation"] = json!(docs);
    }
    Ok(Json(doc))
}

/// RFC 9728 protected-resource metadata of a resource at the root of its host.
#[utoipa::path(get, path = "/.well-known/oauth-protected-resource", tag = "oauth2",
    responses((status = 200, description = "RFC 9728 metadata"), (status = 404, description = "no such resource")))]
pub async fn metadata_root(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    metadata_for(&state, "", &headers).await
}

/// RFC 9728 protected-resource metadata of a resource with a path (`/.well-known/oauth-protected-resource/mcp`
/// for `https://api.example.com/mcp`).
#[utoipa::path(get, path = "/.well-known/oauth-protected-resource/{*path}", tag = "oauth2",
    params(("path" = String, Path, description = "the resource's path")),
    responses((status = 200, description = "RFC 9728 metadata"), (status = 404, description = "no such resource")))]
pub async fn metadata_path(
    State(state): State<Arc<AppState>>,
    ApiPath(path): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    metadata_for(&state, &format!("/{path}"), &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_and_their_metadata_urls() {
        assert_eq!(
            check_resource("https://api.example.com/mcp/").as_deref(),
            Ok("https://api.example.com/mcp")
        );
        assert_eq!(check_resource("http://127.0.0.1:9000").as_deref(), Ok("http://127.0.0.1:9000"));
        for bad in
            ["http://api.example.com/", "https://api.example.com/?a=1", "https://x/#f", "mcp", "ftp://x/"]
        {
            assert!(check_resource(bad).is_err(), "{bad}");
        }
        assert_eq!(
            metadata_url("https://api.example.com/mcp"),
            "https://api.example.com/.well-known/oauth-protected-resource/mcp"
        );
        assert_eq!(
            metadata_url("https://api.example.com"),
            "https://api.example.com/.well-known/oauth-protected-resource"
        );
        assert!(covers("https://api.example.com/mcp", "https://api.example.com/mcp/tools?x=1"));
        assert!(covers("https://api.example.com/mcp", "https://api.example.com/mcp"));
        assert!(!covers("https://api.example.com/mcp", "https://api.example.com/mcpx"));
        assert!(!covers("https://api.example.com/mcp", "https://evil.example.com/mcp"));
        assert!(covers("https://api.example.com", "https://api.example.com/anything"));
    }
}
