//! Webhook delivery: Standard Webhooks signatures, the delivery worker (at least once, exponential
//! backoff with jitter), protection against server-side request forgery, and the events the server
//! writes itself (`key.expiring`, quota and rate-limit events).
//!
//! The outbox is the store's: an event is written in the transaction of the change it reports, so the
//! worker only reads due deliveries, leases them, sends them and records each attempt. Nothing here
//! runs on a request's path: a slow or dead receiver costs the worker's time, never a request's.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use keygate_core::events::payload;
use keygate_store::{Attempt, AttemptOutcome, DueDelivery, KeyUsage, NewEvent};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::seal::MasterKey;
use crate::state::AppState;

/// Webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Allow `http://` URLs and private, loopback and link-local addresses (local testing only).
    pub allow_private: bool,
    /// Networks webhooks may reach even though they are private.
    pub allow_networks: Vec<IpNet>,
    /// The first retry's delay; each next one is four times longer (at most 6 h), with ±20 % jitter.
    pub first_retry: Duration,
    /// How long a delivery is retried before it is given up.
    pub retry_for: Duration,
    /// An endpoint whose deliveries have failed for this long is disabled (and `webhook.disabled` sent).
    pub disable_after: Duration,
    /// Longest wait for a receiver's answer.
    pub timeout: Duration,
    /// `quota.low` is sent when a refilling quota falls to this percentage of its refill amount…
    pub quota_low_percent: u64,
    /// …or a quota that does not refill to this many uses left (0: not for such quotas).
    pub quota_low_remaining: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private: false,
            allow_networks: Vec::new(),
            first_retry: Duration::from_secs(5),
            retry_for: Duration::from_secs(24 * 3600),
            disable_after: Duration::from_secs(5 * 86_400),
            timeout: Duration::from_secs(10),
            quota_low_percent: 10,
            quota_low_remaining: 0,
        }
    }
}

/// The worker's shared parts: the master key (set at launch) and the HTTP client.
#[derive(Default)]
pub struct Webhooks {
    master: OnceLock<Arc<MasterKey>>,
    client: OnceLock<reqwest::Client>,
    /// Secret-scanning partners' keys (leak reports), if configured.
    reporters: OnceLock<Vec<crate::routes::leaks::Reporter>>,
    /// Woken when something may be due sooner than the next poll.
    pub wake: tokio::sync::Notify,
}

/// Installs the process-wide TLS provider (rustls with ring) that every HTTPS client here uses (the
/// webhook sender, and the CLI's client to a server on https). Call it before building one; calling it
/// again does nothing.
pub fn install_tls() {
    // An error means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A failure this long after the endpoint's previous one starts a new failure run (longer than the
/// longest wait between retries, so a run of retries never looks like two runs).
const NEW_RUN_AFTER_MS: i64 = 7 * 3600 * 1000;

/// Delays retries: the first after `first`, each next four times longer, at most 6 h.
pub fn retry_delay(first: Duration, attempts_made: u32, jitter: f64) -> Duration {
    let base = first.as_secs_f64() * 4f64.powi(attempts_made.saturating_sub(1).min(16) as i32);
    let capped = base.min(6.0 * 3600.0);
    Duration::from_secs_f64((capped * (1.0 + jitter.clamp(-0.2, 0.2))).max(0.0))
}

/// A new signing secret: `whsec_` and 32 random bytes in base64 (the Standard Webhooks form).
pub fn new_secret() -> Result<(String, Zeroizing<Vec<u8>>), getrandom::Error> {
    let mut raw = Zeroizing::new(vec![0u8; 32]);
    getrandom::fill(&mut raw)?;
    Ok((format!("whsec_{}", B64.encode(raw.as_slice())), raw))
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, the Standard Webhooks signature.
pub fn sign(secret: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// The sealing context of an endpoint's secret: a secret cannot be moved to another endpoint.
pub fn seal_context(endpoint_id: &str) -> Vec<u8> {
    format!("webhook:{endpoint_id}").into_bytes()
}

/// Is this an address anyone on the internet could have? Loopback, private, link-local, shared
/// (CGNAT), documentation, benchmarking, multicast and reserved ranges are not.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                // NAT64 (well-known and local-use), 6to4, Teredo, the IPv4-compatible and IPv4-translated
                // forms and the discard prefix embed or reach IPv4 space we cannot judge safely: refused.
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || s[0] == 0x2002
                || (s[0] == 0x2001 && s[1] == 0)
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0])
                || s[0..6] == [0, 0, 0, 0, 0, 0]
                || (s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0))
        }
    }
}

impl WebhookConfig {
    /// May a webhook reach this address?
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip) || self.allow_networks.iter().any(|n| n.contains(&ip))
    }

    /// Checks a webhook URL as given by an admin: https (http only with `allow_private`), a host, no
    /// credentials, and no address webhooks may not reach. Names are resolved when delivering (and
    /// checked again then: a name can change what it points to).
    pub fn check_url(&self, raw: &str) -> Result<url::Url, String> {
        if raw.len() > 2000 {
            return Err("must be at most 2000 characters".into());
        }
        let url = url::Url::parse(raw).map_err(|e| format!("is not a URL: {e}"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_private => {}
            "http" => {
                return Err("must be https (http only with webhooks.allow_private, for local testing)".into());
            }
            other => return Err(format!("scheme {other:?} is not allowed; use https")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not hold a username or password; receivers check the signature instead".into());
        }
        if url.fragment().is_some() {
            return Err("must not have a #fragment".into());
        }
        match url.host() {
            None => return Err("must name a host".into()),
            Some(url::Host::Ipv4(ip)) if !self.permits(IpAddr::V4(ip)) => return Err(not_reachable()),
            Some(url::Host::Ipv6(ip)) if !self.permits(IpAddr::V6(ip)) => return Err(not_reachable()),
            Some(url::Host::Domain(d))
                if !self.allow_private
                    && (d.eq_ignore_ascii_case("localhost")
                        || d.to_ascii_lowercase().ends_with(".localhost")) =>
            {
                return Err(not_reachable());
            }
            Some(_) => {}
        }
        Ok(url)
    }
}

fn not_reachable() -> String {
    "points to a loopback, private or link-local address, which webhooks may not reach (allow it with \
     webhooks.allow_networks, or webhooks.allow_private for local testing)"
        .into()
}

/// Resolves receivers' names and keeps only addresses webhooks may reach, so a name that resolves to
/// an internal address (now or after a DNS change) is never connected to.
#[derive(Clone)]
pub struct GuardedResolver(Arc<WebhookConfig>);

/// A resolver for any client that fetches URLs given by others (webhooks, client metadata documents).
pub fn guarded_resolver(config: WebhookConfig) -> GuardedResolver {
    GuardedResolver(Arc::new(config))
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let config = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<SocketAddr> = found.into_iter().filter(|a| config.permits(a.ip())).collect();
            if ok.is_empty() {
                return Err(format!("{host} {}", not_reachable()).into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Webhooks {
    pub fn set_master(&self, master: Arc<MasterKey>) {
        let _ = self.master.set(master);
    }

    pub fn set_reporters(&self, keys: Vec<crate::routes::leaks::Reporter>) {
        let _ = self.reporters.set(keys);
    }

    pub fn reporters(&self) -> Option<&[crate::routes::leaks::Reporter]> {
        self.reporters.get().map(Vec::as_slice)
    }

    pub fn master(&self) -> Option<&MasterKey> {
        self.master.get().map(|m| m.as_ref())
    }

    fn client(&self, config: &WebhookConfig) -> Result<&reqwest::Client, String> {
        if let Some(c) = self.client.get() {
            return Ok(c);
        }
        install_tls();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("Keygate-Webhooks/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(GuardedResolver(Arc::new(config.clone())))
            .build()
            .map_err(|e| format!("cannot build the webhook HTTP client: {e}"))?;
        Ok(self.client.get_or_init(|| client))
    }
}

/// Delivers due webhooks until the task is dropped. At most `PARALLEL` deliveries are in flight; each
/// is leased for longer than its timeout, so a node that dies mid-delivery leaves it due again.
pub async fn run(state: Arc<AppState>) {
    const PARALLEL: usize = 32;
    let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
    let config = &state.config.webhooks;
    let lease = config.timeout.as_millis() as i64 + 10_000;
    loop {
        let Ok(first) = permits.clone().acquire_owned().await else { return };
        let mut held = vec![first];
        while let Ok(p) = permits.clone().try_acquire_owned() {
            held.push(p);
        }
        let now = state.now();
        let due = match state.store.claim_deliveries(now, now + lease, held.len() as u32).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "reading due webhook deliveries failed; retrying");
                Vec::new()
            }
        };
        let idle = due.is_empty();
        for (d, permit) in due.into_iter().zip(held.drain(..)) {
            let state = state.clone();
            tokio::spawn(async move {
                deliver(&state, d).await;
                drop(permit);
            });
        }
        drop(held);
        if idle {
            tokio::select! {
                _ = state.webhooks.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

async fn deliver(state: &AppState, d: DueDelivery) {
    let config = &state.config.webhooks;
    let started = std::time::Instant::now();
    let at = state.now();
    let result = attempt(state, &d, at).await;
    let latency_ms = started.elapsed().as_millis() as i64;
    let (status_code, error) = match result {
        Ok(code) if (200..300).contains(&code) => (Some(code), None),
        Ok(code) => (Some(code), Some(format!("the receiver answered {code}"))),
        Err(e) => (None, Some(e)),
    };
    let outcome = if error.is_none() {
        AttemptOutcome::Delivered
    } else {
        let made = d.attempts + 1;
        let jitter = (f64::from(jitter_byte()) / 255.0 - 0.5) * 0.4;
        let next = state.now() + retry_delay(config.first_retry, made, jitter).as_millis() as i64;
        if next > d.created_at + config.retry_for.as_millis() as i64 {
            AttemptOutcome::Failed
        } else {
            AttemptOutcome::Retry(next)
        }
    };
    if let Some(e) = &error {
        tracing::info!(endpoint = %d.endpoint_id, event = %d.event_id, attempt = d.attempts + 1, error = %e,
            outcome = outcome.status(), "webhook delivery failed");
    }
    let record = Attempt { at, status_code, latency_ms, error };
    let failing_since = match state.store.finish_attempt(&d, &record, outcome, NEW_RUN_AFTER_MS).await {
        Ok(Some(f)) => f,
        // The lease ran out first: another attempt owns the delivery now.
        Ok(None) => return,
        Err(e) => {
            // The lease runs out and the delivery is tried again: at least once, never lost.
            tracing::warn!(error = %e, "recording a webhook attempt failed; it will be retried");
            return;
        }
    };
    if let Some(since) = failing_since
        && state.now() - since >= config.disable_after.as_millis() as i64
    {
        disable_failing(state, &d.endpoint_id, since).await;
    }
}

fn jitter_byte() -> u8 {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    b[0]
}

/// One attempt: the receiver's status code, or why there was none.
async fn attempt(state: &AppState, d: &DueDelivery, now: i64) -> Result<u16, String> {
    let config = &state.config.webhooks;
    let master = state.webhooks.master().ok_or("the master key is not loaded")?;
    let secret =
        Zeroizing::new(master.unseal(&seal_context(&d.endpoint_id), &d.secret_sealed).map_err(|_| {
            "the endpoint's signing secret cannot be opened with this master key".to_string()
        })?);
    // The URL was checked when it was saved; check again in case the settings changed since.
    config.check_url(&d.url)?;
    let client = state.webhooks.client(config)?;
    let timestamp = now / 1000;
    let mut signature = sign(&secret, &d.event_id, timestamp, &d.payload);
    // During a rotation's overlap, the previous secret signs too (space-separated, as Standard
    // Webhooks allows), so receivers that still hold it keep verifying.
    if let Some(previous) = &d.previous_secret_sealed
        && let Ok(old) = master.unseal(&seal_context(&d.endpoint_id), previous)
    {
        let old = Zeroizing::new(old);
        signature.push(' ');
        signature.push_str(&sign(&old, &d.event_id, timestamp, &d.payload));
    }
    let resp = client
        .post(&d.url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(d.payload.clone())
        .send()
        .await
        .map_err(|e| describe(&e))?;
    Ok(resp.status().as_u16())
}

/// A transport error in a few words, without the URL (it may hold a token of the receiver's).
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_request() {
        "the request failed"
    } else {
        "failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {}", detail.chars().take(200).collect::<String>())
    }
}

async fn disable_failing(state: &AppState, endpoint_id: &str, since: i64) {
    let now = state.now();
    let reason =
        format!("disabled by Keygate: every delivery has failed since {}", crate::time::rfc3339(since));
    let Ok(id) = keygate_core::id::new_id("evt", now) else { return };
    let audit = keygate_store::NewAudit {
        id,
        at: now,
        actor: "system".into(),
        action: "webhook.auto_disable".into(),
        target_type: "webhook".into(),
        target_id: endpoint_id.into(),
        ip: None,
        details: serde_json::json!({"failing_since": crate::time::rfc3339(since), "reason": reason}),
    };
    // Only if it is still enabled and still in this failure run: concurrent failures disable it once, and
    // an admin's change in between wins.
    match state.store.disable_failing_webhook(endpoint_id, since, &reason, &audit).await {
        Ok(true) => {
            tracing::warn!(endpoint = %endpoint_id, "disabled a webhook endpoint whose deliveries kept failing; its events wait until it is enabled again")
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not disable a failing webhook endpoint"),
    }
}

/// An event the server writes itself (not from an audited change), once per `dedup` key.
pub fn new_event(event_type: &str, now: i64, data: serde_json::Value, dedup: String) -> Option<NewEvent> {
    let id = keygate_core::id::new_id("evt", now).ok()?;
    Some(NewEvent {
        id,
        event_type: event_type.into(),
        at: now,
        payload: payload(event_type, now, data),
        dedup,
    })
}

/// The events a usage flush reports: `rate_limit.exceeded` (once per key per minute), `quota.exhausted`
/// (once per refill period) and `quota.low` (once per refill period: at `quota_low_percent` of a
/// refilling quota's amount, or `quota_low_remaining` uses left of one that does not refill).
pub fn usage_events(batch: &[KeyUsage], config: &WebhookConfig) -> Vec<NewEvent> {
    let mut out = Vec::new();
    for u in batch {
        let limited: u64 = u.counts.iter().filter(|(c, _)| *c == "RATE_LIMITED").map(|(_, n)| n).sum();
        if limited > 0 {
            let minute = u.at / 60_000 * 60_000;
            out.extend(new_event(
                "rate_limit.exceeded",
                u.at,
                serde_json::json!({"key_id": u.key_id, "consumer_id": u.consumer_id,
                    "minute": crate::time::rfc3339(minute), "refused": limited}),
                format!("rate_limit.exceeded:{}:{minute}", u.key_id),
            ));
        }
        if let Some((remaining, refilled_at)) = u.quota {
            let data = serde_json::json!({"key_id": u.key_id, "consumer_id": u.consumer_id,
                "remaining": remaining, "refill_amount": u.quota_refill});
            if remaining == 0 {
                out.extend(new_event(
                    "quota.exhausted",
                    u.at,
                    data,
                    format!("quota.exhausted:{}:{refilled_at}", u.key_id),
                ));
            } else if match u.quota_refill {
                Some(amount) => {
                    remaining.saturating_mul(100) <= amount.saturating_mul(config.quota_low_percent)
                }
                None => remaining <= config.quota_low_remaining,
            } {
                out.extend(new_event(
                    "quota.low",
                    u.at,
                    data,
                    format!("quota.low:{}:{refilled_at}", u.key_id),
                ));
            }
        }
    }
    out
}

/// Writes `key.expiring` for keys that expire within 7 days (once per key and expiry).
pub async fn sweep_expiring(state: &AppState) -> Result<u64, keygate_store::StoreError> {
    const WEEK_MS: i64 = 7 * 86_400_000;
    let now = state.now();
    let mut events = Vec::new();
    let mut page = keygate_store::Page { after: None, limit: 500, search: None };
    loop {
        let keys = state.store.keys_expiring_between(now, now + WEEK_MS, &page).await?;
        let Some(last) = keys.last() else { break };
        page.after = Some(last.id.clone());
        for k in &keys {
            let Some(at) = k.expires_at else { continue };
            events.extend(new_event(
                "key.expiring",
                now,
                serde_json::json!({"key_id": k.id, "consumer_id": k.consumer_id, "name": k.name,
                    "expires_at": crate::time::rfc3339(at)}),
                format!("key.expiring:{}:{at}", k.id),
            ));
        }
        if keys.len() < 500 {
            break;
        }
    }
    state.store.insert_events(&events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let secret = B64.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_or_default();
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, r#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "2002:a00:1::1",
            "2001:0:4136:e378::1",
            "::ffff:0:a00:1",
            "100::1",
            "2001:db8::1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
            assert!(!is_public(ip), "{ip} must not be public");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "172.32.0.1"] {
            let ip: IpAddr = ip.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
            assert!(is_public(ip), "{ip} is public");
        }
    }

    #[test]
    fn urls_are_checked() {
        let strict = WebhookConfig::default();
        assert!(strict.check_url("https://hooks.example.com/kg").is_ok());
        for bad in [
            "http://hooks.example.com/",
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://169.254.169.254/latest/meta-data",
            "https://localhost/",
            "https://a.localhost/",
            "https://user:pw@hooks.example.com/",
            "ftp://hooks.example.com/",
            "https://",
            "not a url",
        ] {
            assert!(strict.check_url(bad).is_err(), "{bad} must be refused");
        }
        let listed = WebhookConfig {
            allow_networks: vec![
                "10.0.0.0/8".parse().unwrap_or_else(|_| IpNet::from(IpAddr::from([1, 1, 1, 1]))),
            ],
            ..WebhookConfig::default()
        };
        assert!(listed.check_url("https://10.2.3.4/").is_ok());
        assert!(listed.check_url("https://192.168.0.1/").is_err());
        let local = WebhookConfig { allow_private: true, ..WebhookConfig::default() };
        assert!(local.check_url("http://127.0.0.1:9000/hook").is_ok());
    }

    #[tokio::test]
    async fn names_that_resolve_inside_are_never_connected_to() {
        use reqwest::dns::Resolve;
        let Ok(name) = "localhost".parse::<reqwest::dns::Name>() else { panic!("a valid name") };
        let strict = GuardedResolver(Arc::new(WebhookConfig::default()));
        let refused = strict.resolve(name).await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("loopback"), "{refused}");
        let local =
            GuardedResolver(Arc::new(WebhookConfig { allow_private: true, ..WebhookConfig::default() }));
        let Ok(name) = "localhost".parse::<reqwest::dns::Name>() else { panic!("a valid name") };
        let found: Vec<SocketAddr> = local.resolve(name).await.map(|a| a.collect()).unwrap_or_default();
        assert!(found.iter().all(|a| a.ip().is_loopback()) && !found.is_empty());
    }

    #[test]
    fn retries_back_off_to_about_a_day() {
        let first = Duration::from_secs(5);
        assert_eq!(retry_delay(first, 1, 0.0), Duration::from_secs(5));
        assert_eq!(retry_delay(first, 2, 0.0), Duration::from_secs(20));
        assert_eq!(retry_delay(first, 30, 0.0), Duration::from_secs(6 * 3600));
        let total: f64 = (1..=10).map(|n| retry_delay(first, n, 0.0).as_secs_f64()).sum();
        assert!((20.0 * 3600.0..30.0 * 3600.0).contains(&total), "{total}");
        assert!(retry_delay(first, 1, 0.2) == Duration::from_secs(6));
    }
}
