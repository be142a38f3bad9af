//! Client ID Metadata Documents: a client (an AI agent) whose `client_id` is an https URL describes
//! itself in a JSON document at that URL, so it needs no registration. Keygate fetches the document
//! (through the same SSRF guard as webhooks: no private, loopback or link-local addresses, no redirects,
//! a size and a time limit), checks it (its `client_id` is its own URL, its redirect URIs follow
//! registration's rules), caches it as its HTTP headers allow, and keeps the client like a registered one
//! (under "Registered clients", where the operator sees, disables or deletes it). The consent page shows
//! the document's host beside the name the client gives itself.

use std::sync::OnceLock;
use std::time::Duration;

use moka::sync::Cache;

use keygate_store::ClientPatch;
use serde::Deserialize;
use serde_json::json;

use super::register::{api_to_oauth, check_registered_redirect, registered_consumer};
use crate::auth::Actor;
use crate::routes::clients::{CreateClient, new_client};
use crate::state::AppState;
use crate::webhooks::WebhookConfig;

/// Largest document accepted.
const MAX_BYTES: usize = 5 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_FRESH_MS: i64 = 3600 * 1000;
const ACTOR: &str = "client-metadata-document";

/// Settings: off by default.
#[derive(Debug, Clone, Default)]
pub struct MetadataDocConfig {
    pub enabled: bool,
    /// Hosts (and their subdomains) whose documents are accepted; empty: any host not denied.
    pub allow_domains: Vec<String>,
    pub deny_domains: Vec<String>,
    /// Accept http:// and private addresses (local testing only).
    pub allow_private: bool,
}

/// Longest metadata-document `client_id` (client ids appear in tokens and headers).
const MAX_URL: usize = 255;

/// Documents fetched, by URL: until when each is fresh (ms); and recent failures, so that a bad URL is
/// not fetched again on every request. Both bounded.
pub struct MetadataDocs {
    fresh_until: Cache<String, i64>,
    failed: Cache<String, String>,
    client: OnceLock<reqwest::Client>,
}

impl Default for MetadataDocs {
    fn default() -> Self {
        MetadataDocs {
            fresh_until: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(86_400))
                .build(),
            failed: Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(60)).build(),
            client: OnceLock::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Document {
    client_id: String,
    client_name: Option<String>,
    #[serde(default)]
    redirect_uris: Vec<String>,
    token_endpoint_auth_method: Option<String>,
    grant_types: Option<Vec<String>>,
}

/// Is `client_id` shaped like a metadata document URL (http:// too, so that it is refused with a
/// reason rather than as an unknown client)?
pub fn is_document_id(client_id: &str) -> bool {
    client_id.starts_with("https://") || client_id.starts_with("http://")
}

/// May this client id be used now? Any `kgc_…` id; a URL only while the feature is on and its host is
/// allowed (so turning it off, or denying a host, stops such clients at once, without a fetch).
pub fn permitted(state: &AppState, client_id: &str) -> bool {
    !is_document_id(client_id)
        || (state.config.metadata_docs.enabled && check_url(&state.config.metadata_docs, client_id).is_ok())
}

fn host_matches(host: &str, domain: &str) -> bool {
    // `bad.example.` is `bad.example` to DNS.
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    host == domain || host.ends_with(&format!(".{domain}"))
}

/// The guard every fetched URL passes: the webhook rules (https, no credentials, no internal address)
/// and the operator's domain lists.
fn check_url(config: &MetadataDocConfig, raw: &str) -> Result<url::Url, String> {
    if raw.len() > MAX_URL {
        return Err(format!("a client_id URL is at most {MAX_URL} characters"));
    }
    let guard = WebhookConfig { allow_private: config.allow_private, ..WebhookConfig::default() };
    let url = guard.check_url(raw).map_err(|e| format!("the client_id URL {e}"))?;
    if url.path() == "/" || url.path().is_empty() || url.query().is_some() {
        return Err("a client_id URL names a document: it has a path and no query".into());
    }
    let host = url.host_str().unwrap_or_default();
    if config.deny_domains.iter().any(|d| host_matches(host, d)) {
        return Err(format!("clients from {host} are not accepted here"));
    }
    if !config.allow_domains.is_empty() && !config.allow_domains.iter().any(|d| host_matches(host, d)) {
        return Err(format!("clients from {host} are not accepted here"));
    }
    Ok(url)
}

/// How long a response may be reused: `max-age` (at least a minute, at most a day), or an hour.
fn freshness(headers: &reqwest::header::HeaderMap) -> i64 {
    let Some(cc) = headers.get(reqwest::header::CACHE_CONTROL).and_then(|v| v.to_str().ok()) else {
        return DEFAULT_FRESH_MS;
    };
    if cc.contains("no-store") || cc.contains("no-cache") {
        return 60_000;
    }
    cc.split(',')
        .filter_map(|d| d.trim().strip_prefix("max-age="))
        .find_map(|v| v.parse::<i64>().ok())
        .map_or(DEFAULT_FRESH_MS, |s| s.clamp(60, 86_400) * 1000)
}

impl MetadataDocs {
    fn http(&self, config: &MetadataDocConfig) -> Result<&reqwest::Client, String> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        crate::webhooks::install_tls();
        let guard = WebhookConfig { allow_private: config.allow_private, ..WebhookConfig::default() };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .user_agent(concat!("Keygate/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(crate::webhooks::guarded_resolver(guard))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(self.client.get_or_init(|| client))
    }

    /// Fetches a document: 200, JSON, at most [`MAX_BYTES`].
    async fn fetch(&self, config: &MetadataDocConfig, url: &url::Url) -> Result<(Document, i64), String> {
        let mut resp =
            self.http(config)?.get(url.as_str()).header("accept", "application/json").send().await.map_err(
                |e| {
                    format!(
                        "the client's metadata document could not be fetched: {}",
                        crate::webhooks::describe(&e)
                    )
                },
            )?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!(
                "the client's metadata document answered {} (redirects are not followed)",
                resp.status().as_u16()
            ));
        }
        let fresh = freshness(resp.headers());
        let mut body = Vec::new();
        while let Some(chunk) =
            resp.chunk().await.map_err(|_| "the client's metadata document could not be read".to_string())?
        {
            if body.len() + chunk.len() > MAX_BYTES {
                return Err(format!("the client's metadata document is larger than {MAX_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let doc: Document = serde_json::from_slice(&body)
            .map_err(|_| "the client's metadata document is not a JSON client description".to_string())?;
        Ok((doc, fresh))
    }
}

/// Makes sure the client a metadata-document URL names is known and current: fetched (when not fresh),
/// checked, and stored. The error is a sentence for the error page.
pub async fn ensure(state: &AppState, client_id: &str, ip: Option<std::net::IpAddr>) -> Result<(), String> {
    let config = &state.config.metadata_docs;
    if !config.enabled {
        return Err(
            "clients described by a metadata document (a URL as client_id) are not accepted here".into()
        );
    }
    let url = check_url(config, client_id)?;
    let now = state.now();
    let fresh = state.metadata_docs.fresh_until.get(client_id).is_some_and(|until| until > now);
    let existing = state.store.get_client(client_id).await.map_err(|e| e.to_string())?;
    if fresh && existing.is_some() {
        return Ok(());
    }
    if let Some(why) = state.metadata_docs.failed.get(client_id) {
        return Err(why);
    }
    // Every fetch counts against the address's registration budget: anyone can name any URL here.
    if !state.registrations.try_take(ip, now) {
        return Err("too many new applications from this address; try again later".into());
    }
    let checked = fetch_and_check(state, &url, client_id).await;
    let (doc, name, grants, fresh_ms) = match checked {
        Ok(v) => v,
        Err(why) => {
            state.metadata_docs.failed.insert(client_id.to_string(), why.clone());
            return Err(why);
        }
    };
    let actor = Actor { key_id: ACTOR.into(), ip };
    match existing {
        Some(c) if c.redirect_uris == doc.redirect_uris => {}
        Some(c) => {
            let patch = ClientPatch {
                redirect_uris: Some(doc.redirect_uris),
                updated_at: now,
                ..ClientPatch::default()
            };
            let _view = crate::routes::clients::patch_client(
                state,
                &actor,
                &c.id,
                patch,
                "client.update",
                json!({"via": ACTOR}),
            )
            .await
            .map_err(|e| e.message)?;
        }
        None => {
            let consumer = registered_consumer(state).await.map_err(|e| e.description)?;
            let req = CreateClient {
                consumer_id: consumer.id,
                name,
                grant_types: Some(grants),
                scopes: state.config.registration.scopes.clone(),
                audiences: state.config.protected_resources.clone(),
                redirect_uris: doc.redirect_uris,
                public: true,
                id: Some(client_id.to_string()),
                ..CreateClient::default()
            };
            if let Err(e) = new_client(state, &actor, req).await {
                // Made by a concurrent first authorization of the same client meanwhile.
                if state.store.get_client(client_id).await.ok().flatten().is_none() {
                    return Err(api_to_oauth(e).description);
                }
            }
        }
    }
    state.metadata_docs.fresh_until.insert(client_id.to_string(), now + fresh_ms);
    Ok(())
}

/// The document, checked: the document, the name to show, its grants, and how long it is fresh.
async fn fetch_and_check(
    state: &AppState,
    url: &url::Url,
    client_id: &str,
) -> Result<(Document, String, Vec<String>, i64), String> {
    let (doc, fresh_ms) = state.metadata_docs.fetch(&state.config.metadata_docs, url).await?;
    if doc.client_id != client_id {
        return Err("the client's metadata document names another client_id than its own URL".into());
    }
    if doc.redirect_uris.is_empty() || doc.redirect_uris.len() > 10 {
        return Err("the client's metadata document lists 1 to 10 redirect_uris".into());
    }
    for u in &doc.redirect_uris {
        check_registered_redirect(u).map_err(|e| e.description)?;
    }
    if doc.token_endpoint_auth_method.as_deref().is_some_and(|m| m != "none") {
        return Err(
            "clients described by a metadata document are public here (token_endpoint_auth_method none)"
                .into(),
        );
    }
    let grants =
        doc.grant_types.clone().unwrap_or_else(|| vec!["authorization_code".into(), "refresh_token".into()]);
    if !grants.iter().any(|g| g == "authorization_code")
        || grants.iter().any(|g| g != "authorization_code" && g != "refresh_token")
    {
        return Err(
            "the client's metadata document asks for grants other than authorization_code and refresh_token"
                .into(),
        );
    }
    let name: String = doc
        .client_name
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    // A name of its own, or the host that vouches for it.
    let name = if name.trim().is_empty() { url.host_str().unwrap_or("client").to_string() } else { name };
    Ok((doc, name, grants, fresh_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_domains() {
        let open = MetadataDocConfig { enabled: true, ..MetadataDocConfig::default() };
        assert!(check_url(&open, "https://agent.example.com/client.json").is_ok());
        for bad in [
            "https://agent.example.com/",
            "https://agent.example.com",
            "http://agent.example.com/client.json",
            "https://127.0.0.1/client.json",
            "https://agent.example.com/c.json?x=1",
        ] {
            assert!(check_url(&open, bad).is_err(), "{bad}");
        }
        let listed = MetadataDocConfig {
            allow_domains: vec!["example.com".into()],
            deny_domains: vec!["bad.example.com".into()],
            ..open
        };
        assert!(check_url(&listed, "https://a.example.com/c.json").is_ok());
        assert!(check_url(&listed, "https://x.bad.example.com/c.json").is_err());
        assert!(
            check_url(&listed, "https://bad.example.com./c.json").is_err(),
            "a trailing dot is the same host"
        );
        let long = format!("https://a.example.com/{}", "x".repeat(300));
        assert!(check_url(&listed, &long).is_err());
        assert!(check_url(&listed, "https://example.org/c.json").is_err());
        assert!(check_url(&listed, "https://notexample.com/c.json").is_err());
    }

    #[test]
    fn cache_lifetimes_follow_the_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(freshness(&h), DEFAULT_FRESH_MS);
        h.insert(
            reqwest::header::CACHE_CONTROL,
            reqwest::header::HeaderValue::from_static("public, max-age=600"),
        );
        assert_eq!(freshness(&h), 600_000);
        h.insert(reqwest::header::CACHE_CONTROL, reqwest::header::HeaderValue::from_static("max-age=5"));
        assert_eq!(freshness(&h), 60_000);
        h.insert(reqwest::header::CACHE_CONTROL, reqwest::header::HeaderValue::from_static("no-store"));
        assert_eq!(freshness(&h), 60_000);
    }
}
