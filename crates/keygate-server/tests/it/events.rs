//! Events: webhook endpoints, signed deliveries with retries, SSRF refusals, events from usage and
//! expiry, and the leaked-secret receiver.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode as AxStatus};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey, LineEnding};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::helpers::TestApp;

/// What a receiver got: (headers, body).
type Received = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A receiver on a random port: answers `codes` in turn (then 204), keeps every request.
async fn receiver(codes: Vec<u16>) -> (String, Received) {
    let got: Received = Arc::default();
    let answers = Arc::new(Mutex::new(codes.into_iter()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let sink = sink.clone();
            let answers = answers.clone();
            async move {
                sink.lock().unwrap().push((headers, body));
                let code = answers.lock().unwrap().next().unwrap_or(204);
                AxStatus::from_u16(code).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

/// Checks a Standard Webhooks signature the long way (not with Keygate's code).
fn signature_ok(secret: &str, headers: &HeaderMap, body: &str) -> bool {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let id = headers["webhook-id"].to_str().unwrap();
    let ts = headers["webhook-timestamp"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    let expected = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
    headers["webhook-signature"].to_str().unwrap().split(' ').any(|s| s == expected)
}

async fn wait_for(got: &Received, n: usize) -> Vec<(HeaderMap, String)> {
    for _ in 0..200 {
        if got.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got.lock().unwrap().clone()
}

fn local() -> impl FnOnce(&mut keygate_server::ServerConfig) {
    |c| c.webhooks.allow_private = true
}

#[tokio::test]
async fn endpoints_are_validated_and_internal_addresses_refused() {
    let app = TestApp::builder().sqlite().start().await;
    for (url, why) in [
        ("http://hooks.example.com/x", "https"),
        ("https://127.0.0.1/x", "private"),
        ("https://[::1]/x", "private"),
        ("https://169.254.169.254/latest/meta-data", "private"),
        ("https://10.0.0.8/x", "private"),
        ("https://localhost:8443/x", "private"),
        ("https://user:pw@hooks.example.com/x", "password"),
        ("gopher://hooks.example.com/", "scheme"),
    ] {
        let (status, body) = app.post("/v1/webhooks", json!({"url": url, "events": ["*"]})).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {body}");
        assert_eq!(body["field"], "url");
        assert!(body["message"].as_str().unwrap().contains(why), "{url}: {body}");
    }
    for events in [json!([]), json!(["key.nope"]), json!(["key.*"]), json!("key.revoked")] {
        let (status, body) =
            app.post("/v1/webhooks", json!({"url": "https://hooks.example.com/", "events": events})).await;
        assert!(status.is_client_error(), "{events}: {body}");
    }
    let (status, created) = app
        .post(
            "/v1/webhooks",
            json!({"url": "https://hooks.example.com/kg", "events": ["key.revoked"], "description": "ops"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_") && B64.decode(&secret[6..]).unwrap().len() == 32);
    let id = created["id"].as_str().unwrap();
    // Shown once: never again, and never stored in clear.
    let (_, shown) = app.get(&format!("/v1/webhooks/{id}")).await;
    assert!(shown.get("secret").is_none() && shown["enabled"] == true, "{shown}");
    let (_, listed) = app.get("/v1/webhooks").await;
    assert!(!listed.to_string().contains(secret));
    let db = std::fs::read(app.data_dir.join("keygate.db")).unwrap();
    let raw = B64.decode(&secret[6..]).unwrap();
    assert!(!db.windows(raw.len()).any(|w| w == raw.as_slice()), "the secret is sealed at rest");
    let (status, patched) =
        app.patch(&format!("/v1/webhooks/{id}"), json!({"events": ["*"], "description": null})).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["events"], json!(["*"]));
    assert!(patched["description"].is_null());
    let (status, _) = app.patch(&format!("/v1/webhooks/{id}"), json!({"url": "https://192.168.1.1/"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, rotated) = app.post(&format!("/v1/webhooks/{id}/rotate-secret"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(rotated["secret"], created["secret"]);
    let (status, types) = app.get("/v1/event-types").await;
    assert_eq!(status, StatusCode::OK);
    assert!(types.as_array().unwrap().iter().any(|t| t["type"] == "credential.leaked"));
    let (status, _) = app.call(reqwest::Method::DELETE, &format!("/v1/webhooks/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app.get(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn changes_are_delivered_signed_in_order_of_events_with_attempts_listed() {
    let app = TestApp::builder().config(local()).start().await;
    let (url, got) = receiver(vec![]).await;
    let (_, hook) =
        app.post("/v1/webhooks", json!({"url": url, "events": ["key.created", "key.revoked"]})).await;
    let secret = hook["secret"].as_str().unwrap().to_string();
    let consumer = app.create_consumer("acme").await;
    let (key_id, key) = app.create_key(&consumer, &[]).await;
    let (status, _) = app.post(&format!("/v1/keys/{key_id}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let seen = wait_for(&got, 2).await;
    assert_eq!(seen.len(), 2, "consumer.created is filtered out; two key events arrive");
    let mut types = Vec::new();
    for (headers, body) in &seen {
        assert!(signature_ok(&secret, headers, body), "signature verifies: {body}");
        assert!(!body.contains(&key), "an event never carries a secret");
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["data"]["id"], key_id.as_str());
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(headers["webhook-id"].to_str().unwrap().starts_with("evt_"));
        types.push(v["type"].as_str().unwrap().to_string());
    }
    types.sort();
    assert_eq!(types, ["key.created", "key.revoked"]);
    let hook_id = hook["id"].as_str().unwrap();
    // The receiver has answered; the attempts are recorded right after.
    let mut deliveries = Value::Null;
    for _ in 0..200 {
        deliveries = app.get(&format!("/v1/webhooks/{hook_id}/deliveries")).await.1;
        if deliveries["items"].as_array().is_some_and(|i| i.iter().all(|d| d["status"] == "delivered")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let items = deliveries["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{deliveries}");
    for d in items {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempts"][0]["status_code"], 204);
        assert!(d["attempts"][0]["latency_ms"].as_i64().unwrap() >= 0);
    }
    let (_, events) = app.get("/v1/events?limit=10").await;
    let kinds: Vec<&str> =
        events["items"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"consumer.created") && kinds.contains(&"key.revoked"), "{kinds:?}");
}

#[tokio::test]
async fn a_failing_receiver_gets_retries_and_a_dead_one_is_disabled() {
    let app = TestApp::builder()
        .config(|c| {
            c.webhooks.allow_private = true;
            c.webhooks.disable_after = Duration::from_secs(3600);
        })
        .start()
        .await;
    let (url, got) = receiver(vec![500, 503]).await;
    let (_, hook) = app.post("/v1/webhooks", json!({"url": url, "events": ["consumer.created"]})).await;
    let hook_id = hook["id"].as_str().unwrap().to_string();
    app.create_consumer("retry-me").await;
    assert_eq!(wait_for(&got, 1).await.len(), 1);
    // Retries wait (5 s, then 20 s): move the server's clock past each.
    app.clock.advance(6_000);
    assert_eq!(wait_for(&got, 2).await.len(), 2);
    app.clock.advance(25_000);
    let seen = wait_for(&got, 3).await;
    assert_eq!(seen.len(), 3);
    let ids: Vec<_> = seen.iter().map(|(h, _)| h["webhook-id"].to_str().unwrap().to_string()).collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "every attempt carries the same webhook-id");
    let mut delivered = Value::Null;
    for _ in 0..100 {
        let (_, d) = app.get(&format!("/v1/webhooks/{hook_id}/deliveries")).await;
        if d["items"][0]["status"] == "delivered" {
            delivered = d;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let codes: Vec<_> = delivered["items"][0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    assert_eq!(codes, [json!(500), json!(503), json!(204)], "{delivered}");
    let (_, h) = app.get(&format!("/v1/webhooks/{hook_id}")).await;
    assert!(h["failing_since"].is_null(), "a success ends the failure run: {h}");

    // A receiver that never recovers: after disable_after of failures the endpoint is disabled and the
    // other endpoints hear of it.
    let (dead_url, dead_got) = receiver(vec![500; 100]).await;
    let (_, dead) = app.post("/v1/webhooks", json!({"url": dead_url, "events": ["consumer.created"]})).await;
    let dead_id = dead["id"].as_str().unwrap().to_string();
    let (watch_url, watch) = receiver(vec![]).await;
    app.post("/v1/webhooks", json!({"url": watch_url, "events": ["webhook.disabled"]})).await;
    app.create_consumer("never-arrives").await;
    // Move the clock past each retry only once its attempt has been seen (retries wait 5 s, 20 s, 80 s,
    // …, ±20 %): after an hour of failures (this test's disable_after) the endpoint is disabled.
    let mut disabled = Value::Null;
    for attempt in 1..=8u32 {
        assert_eq!(wait_for(&dead_got, attempt as usize).await.len(), attempt as usize, "attempt {attempt}");
        // Wait until the attempt is recorded (its next retry is then scheduled from the current time).
        for _ in 0..400 {
            let (_, d) = app.get(&format!("/v1/webhooks/{dead_id}/deliveries")).await;
            if d["items"][0]["attempts"].as_array().is_some_and(|a| a.len() >= attempt as usize) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for _ in 0..40 {
            let (_, h) = app.get(&format!("/v1/webhooks/{dead_id}")).await;
            disabled = h;
            if disabled["enabled"] == false {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if disabled["enabled"] == false {
            break;
        }
        app.clock.advance(5_000 * 4i64.pow(attempt - 1) * 5 / 4);
    }
    assert_eq!(disabled["enabled"], false, "{disabled}");
    assert!(disabled["disabled_reason"].as_str().unwrap().contains("failed"), "{disabled}");
    let told = wait_for(&watch, 1).await;
    let v: Value = serde_json::from_str(&told[0].1).unwrap();
    assert_eq!(v["type"], "webhook.disabled");
    assert_eq!(v["data"]["id"], dead_id.as_str());
    let (_, audit) = app.get(&format!("/v1/audit?target_id={dead_id}&action=webhook.auto_disable")).await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "disabled once: {audit}");
    // Enabling it again clears Keygate's reason.
    let (_, h) = app.patch(&format!("/v1/webhooks/{dead_id}"), json!({"enabled": true})).await;
    assert_eq!(h["enabled"], true);
    assert!(h["disabled_reason"].is_null() && h["failing_since"].is_null(), "{h}");
}

#[tokio::test]
async fn a_slow_receiver_never_holds_up_the_admin_api_or_verify() {
    // A receiver that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            keep.lock().unwrap().push(s);
        }
    });
    let app = TestApp::builder().config(local()).start().await;
    app.post("/v1/webhooks", json!({"url": format!("http://{addr}/slow"), "events": ["*"]})).await;
    let consumer = app.create_consumer("busy").await;
    for _ in 0..20 {
        let (_, key) = app.create_key(&consumer, &[]).await;
        assert_eq!(app.verify_code(&key, &[]).await, "VALID");
    }
    // The deliveries are under way (connected, unanswered) while every change above was acknowledged.
    for _ in 0..100 {
        if !held.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.lock().unwrap().is_empty(), "the worker connected to the receiver");
}

#[tokio::test]
async fn quota_rate_limit_and_expiry_events_are_written_once() {
    let app = TestApp::builder().config(|c| c.webhooks.quota_low_remaining = 3).start().await;
    let consumer = app.create_consumer("metered").await;
    let (quota_key_id, quota_key) =
        app.create_key_with(json!({"consumer_id": consumer, "name": "q", "quota": {"remaining": 2}})).await;
    let (limited_id, limited) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "r",
            "rate_limits": [{"name": "m", "limit": 1, "window_seconds": 60}]}))
        .await;
    let (once_id, once) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "once", "quota": {"remaining": 10}}))
        .await;
    for _ in 0..7 {
        app.verify(&once, &[]).await;
    }
    let (low_id, low) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "low",
            "quota": {"remaining": 20, "refill": {"amount": 20, "interval_seconds": 86400}}}))
        .await;
    for _ in 0..4 {
        app.verify(&quota_key, &[]).await;
        app.verify(&limited, &[]).await;
    }
    for _ in 0..18 {
        app.verify(&low, &[]).await;
    }
    app.state.flush().await.unwrap();
    app.verify(&limited, &[]).await;
    app.state.flush().await.unwrap();
    let expires = keygate_server::time::rfc3339(app.state.now() + 3 * 86_400_000);
    let (expiring_id, _) =
        app.create_key_with(json!({"consumer_id": consumer, "name": "e", "expires_at": expires})).await;
    keygate_server::webhooks::sweep_expiring(&app.state).await.unwrap();
    keygate_server::webhooks::sweep_expiring(&app.state).await.unwrap();
    let (_, events) = app.get("/v1/events?limit=100").await;
    let of = |t: &str| -> Vec<Value> {
        events["items"].as_array().unwrap().iter().filter(|e| e["type"] == t).cloned().collect()
    };
    let exhausted = of("quota.exhausted");
    assert_eq!(exhausted.len(), 1, "{events}");
    assert_eq!(exhausted[0]["payload"]["data"]["key_id"], quota_key_id.as_str());
    let limited_events = of("rate_limit.exceeded");
    assert_eq!(limited_events.len(), 1, "once per key per minute: {events}");
    assert_eq!(limited_events[0]["payload"]["data"]["key_id"], limited_id.as_str());
    let low_events = of("quota.low");
    assert_eq!(low_events.len(), 2, "a refilling quota at 10 % and a one-off quota at 3 left: {events}");
    for id in [&low_id, &once_id] {
        assert!(low_events.iter().any(|e| e["payload"]["data"]["key_id"] == id.as_str()), "{id}: {events}");
    }
    let expiring = of("key.expiring");
    assert_eq!(expiring.len(), 1, "{events}");
    assert_eq!(expiring[0]["payload"]["data"]["key_id"], expiring_id.as_str());
}

/// A secret-scanning partner's key pair and the keys file the operator saves.
fn partner(dir: &std::path::Path, seed: u8) -> (SigningKey, std::path::PathBuf) {
    let sk = SigningKey::from_bytes(&[seed; 32].into()).unwrap();
    let pem = sk.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    let path = dir.join("scanning-keys.json");
    let file = json!({"public_keys": [{"key_identifier": "partner-key-1", "key": pem, "is_current": true}]});
    std::fs::write(&path, file.to_string()).unwrap();
    (sk, path)
}

async fn report(app: &TestApp, body: &str, key_id: &str, sk: Option<&SigningKey>) -> (StatusCode, Value) {
    report_signing(app, body, body, key_id, sk).await
}

/// Sends `body` with a signature over `signed`.
async fn report_signing(
    app: &TestApp,
    body: &str,
    signed: &str,
    key_id: &str,
    sk: Option<&SigningKey>,
) -> (StatusCode, Value) {
    let mut req = app.client.post(app.url("/v1/leaks")).body(body.to_string());
    if let Some(sk) = sk {
        let sig: Signature = sk.sign(signed.as_bytes());
        req = req
            .header("Github-Public-Key-Identifier", key_id)
            .header("Github-Public-Key-Signature", B64.encode(sig.to_der().as_bytes()));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_signed_leak_report_revokes_by_policy_and_an_unsigned_one_changes_nothing() {
    let keys_dir = tempfile::tempdir().unwrap();
    let (sk, path) = partner(keys_dir.path(), 7);
    let app = TestApp::builder().config(move |c| c.leak_reporter_keys = Some(path)).start().await;
    let strict = app.create_consumer("strict").await;
    let (_, notify) = app.post("/v1/consumers", json!({"name": "lenient", "leak_policy": "notify"})).await;
    assert_eq!(notify["leak_policy"], "notify");
    let lenient = notify["id"].as_str().unwrap();
    let (leaked_id, leaked) = app.create_key(&strict, &[]).await;
    let (kept_id, kept) = app.create_key(lenient, &[]).await;
    let (_, untouched) = app.create_key(&strict, &[]).await;

    // Unsigned, wrongly signed, or signed with an unknown key: refused, nothing changes.
    let body =
        json!([{"token": untouched, "type": "keygate_api_key", "url": "https://x", "source": "content"}])
            .to_string();
    assert_eq!(report(&app, &body, "partner-key-1", None).await.0, StatusCode::UNAUTHORIZED);
    let impostor = SigningKey::from_bytes(&[9u8; 32].into()).unwrap();
    assert_eq!(report(&app, &body, "partner-key-1", Some(&impostor)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(report(&app, &body, "other-key", Some(&sk)).await.0, StatusCode::UNAUTHORIZED);
    let tampered = body.replace("https://x", "https://y");
    assert_eq!(
        report_signing(&app, &tampered, &body, "partner-key-1", Some(&sk)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(app.verify_code(&untouched, &[]).await, "VALID");

    let (_, pat_user) =
        app.post("/v1/users", json!({"username": "dev", "allowed_scopes": ["repo:read"]})).await;
    let uid = pat_user["id"].as_str().unwrap();
    let (status, pat) = app
        .post(
            &format!("/v1/users/{uid}/tokens"),
            json!({"name": "ci", "scopes": ["repo:read"], "expires_in_seconds": 86_400}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pat}");
    let pat = pat["token"].as_str().unwrap().to_string();
    let mut bad_checksum = leaked.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'A' { 'B' } else { 'A' });
    let body = json!([
        {"token": leaked, "type": "keygate_api_key", "url": "https://github.com/o/r/blob/1/.env", "source": "content"},
        {"token": kept, "type": "keygate_api_key", "url": "", "source": "commit"},
        {"token": pat, "type": "keygate_pat", "url": "https://gist.github.com/x", "source": "gist"},
        {"token": "ghp_notoursnotoursnotoursnotoursnotours", "type": "keygate_api_key"},
        {"token": bad_checksum, "type": "keygate_api_key"},
    ])
    .to_string();
    let (status, answer) = report(&app, &body, "partner-key-1", Some(&sk)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let labels: Vec<_> = answer.as_array().unwrap().iter().map(|a| a["label"].as_str().unwrap()).collect();
    assert_eq!(
        labels,
        ["true_positive", "true_positive", "true_positive", "false_positive", "false_positive"]
    );
    assert_eq!(answer[0]["token_hash"], keygate_core::SecretHash::of(&leaked).to_hex());
    // Revoked at once (policy revoke), kept (policy notify), the user's token revoked.
    assert_eq!(app.verify_code(&leaked, &[]).await, "REVOKED");
    assert_eq!(app.verify_code(&kept, &[]).await, "VALID");
    assert_eq!(app.verify_code(&pat, &[]).await, "REVOKED");
    assert_eq!(app.verify_code(&untouched, &[]).await, "VALID");
    let (_, events) = app.get("/v1/events?limit=100").await;
    let leaks: Vec<&Value> =
        events["items"].as_array().unwrap().iter().filter(|e| e["type"] == "credential.leaked").collect();
    assert_eq!(leaks.len(), 3, "{events}");
    let about_leaked = leaks.iter().find(|e| e["payload"]["data"]["id"] == leaked_id.as_str()).unwrap();
    assert_eq!(about_leaked["payload"]["data"]["details"]["action"], "revoked");
    assert_eq!(about_leaked["payload"]["data"]["details"]["url"], "https://github.com/o/r/blob/1/.env");
    let about_kept = leaks.iter().find(|e| e["payload"]["data"]["id"] == kept_id.as_str()).unwrap();
    assert_eq!(about_kept["payload"]["data"]["details"]["action"], "notified");
    // The partner retries the same report: recorded again, acted on and reported once.
    let (status, again) = report(&app, &body, "partner-key-1", Some(&sk)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, answer);
    let (_, events_again) = app.get("/v1/events?limit=100").await;
    let leaks_again =
        events_again["items"].as_array().unwrap().iter().filter(|e| e["type"] == "credential.leaked").count();
    assert_eq!(leaks_again, 3, "a replay reports nothing new");
    let (_, list) = app.get("/v1/leaks").await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 10, "{list}");
    for r in items.iter().filter(|r| r["label"] == "false_positive") {
        assert_eq!(r["token_hash"], "", "nothing about tokens that are not ours: {r}");
    }
    assert!(!list.to_string().contains(&leaked) && !events.to_string().contains(&leaked));
    // Bad input gets a clear error, not a 500.
    let (status, err) = report(&app, "{\"not\": \"a list\"}", "partner-key-1", Some(&sk)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

#[tokio::test]
async fn leak_reports_are_refused_where_not_configured() {
    let app = TestApp::start().await;
    let (status, body) = report(&app, "[]", "partner-key-1", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().contains("leaks.reporter_keys_file"), "{body}");
}

#[tokio::test]
async fn token_revocations_report_token_revoked_with_their_cause() {
    use crate::oauth::{client, get_token};
    let app = TestApp::start().await;
    let consumer = app.create_consumer("apps").await;
    let c = client(
        &app,
        json!({"consumer_id": consumer, "name": "o", "scopes": ["a"], "token_format": "opaque"}),
    )
    .await;
    let j = client(&app, json!({"consumer_id": consumer, "name": "j", "scopes": ["a"]})).await;
    let mut revoked = Vec::new();
    for c in [&c, &j] {
        let at = get_token(&app, c, &[("grant_type", "client_credentials")]).await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        for _ in 0..2 {
            // Revoking twice reports once.
            let resp = app
                .client
                .post(app.url("/oauth2/revoke"))
                .basic_auth(&c.id, Some(&c.secret))
                .form(&[("token", at.as_str())])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert_eq!(app.verify_code(&at, &[]).await, "REVOKED");
        revoked.push(c.id.clone());
    }
    let (_, events) = app.get("/v1/events?limit=100").await;
    let token_events: Vec<&Value> =
        events["items"].as_array().unwrap().iter().filter(|e| e["type"] == "token.revoked").collect();
    assert_eq!(token_events.len(), 2, "{events}");
    for e in &token_events {
        let d = &e["payload"]["data"];
        assert_eq!(d["object"], "access_token");
        assert!(revoked.contains(&d["actor"].as_str().unwrap().to_string()), "{d}");
        assert_eq!(d["details"]["reason"], "revocation request");
    }
    let formats: Vec<&str> =
        token_events.iter().map(|e| e["payload"]["data"]["details"]["format"].as_str().unwrap()).collect();
    assert!(formats.contains(&"opaque") && formats.contains(&"jwt"), "{formats:?}");
}

#[tokio::test]
async fn a_disabled_endpoint_keeps_its_events_until_it_is_enabled() {
    let app = TestApp::builder().config(local()).start().await;
    let (url, got) = receiver(vec![]).await;
    let (_, hook) = app.post("/v1/webhooks", json!({"url": url, "events": ["consumer.created"]})).await;
    let id = hook["id"].as_str().unwrap();
    let (_, off) = app.patch(&format!("/v1/webhooks/{id}"), json!({"enabled": false})).await;
    assert_eq!(off["enabled"], false);
    let consumer = app.create_consumer("while-off").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(got.lock().unwrap().is_empty(), "nothing is sent to a disabled endpoint");
    app.patch(&format!("/v1/webhooks/{id}"), json!({"enabled": true})).await;
    let seen = wait_for(&got, 1).await;
    let v: Value = serde_json::from_str(&seen[0].1).unwrap();
    assert_eq!(v["data"]["id"], consumer.as_str());
}

#[tokio::test]
async fn a_rotation_with_overlap_signs_with_both_secrets_until_it_ends() {
    let app = TestApp::builder().config(local()).start().await;
    let (url, got) = receiver(vec![]).await;
    let (_, hook) = app.post("/v1/webhooks", json!({"url": url, "events": ["consumer.created"]})).await;
    let id = hook["id"].as_str().unwrap().to_string();
    let old = hook["secret"].as_str().unwrap().to_string();
    let (status, rotated) =
        app.post(&format!("/v1/webhooks/{id}/rotate-secret"), json!({"overlap_seconds": 3600})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert!(rotated["previous_secret_expires_at"].is_string(), "{rotated}");
    app.create_consumer("during-overlap").await;
    let seen = wait_for(&got, 1).await;
    let (headers, body) = &seen[0];
    assert_eq!(headers["webhook-signature"].to_str().unwrap().matches("v1,").count(), 2);
    assert!(signature_ok(&old, headers, body) && signature_ok(&new, headers, body));
    // After the overlap, only the new secret signs.
    app.clock.advance(3_601_000);
    app.create_consumer("after-overlap").await;
    let seen = wait_for(&got, 2).await;
    let (headers, body) = &seen[1];
    assert_eq!(headers["webhook-signature"].to_str().unwrap().matches("v1,").count(), 1);
    assert!(signature_ok(&new, headers, body) && !signature_ok(&old, headers, body));
    let (status, e) =
        app.post(&format!("/v1/webhooks/{id}/rotate-secret"), json!({"overlap_seconds": 8 * 86_400})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("overlap_seconds")));
}
