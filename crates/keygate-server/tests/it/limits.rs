//! Rate limits, quotas, IP allow-lists, usage analytics and brute-force throttling.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn verify_with(app: &TestApp, body: Value) -> Value {
    let (status, d) = app.post("/v1/verify", body).await;
    assert_eq!(status, StatusCode::OK, "{d}");
    d
}

#[tokio::test]
async fn rate_limits_report_state_and_deny_with_429_at_the_edge() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, secret) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k",
            "rate_limits": [{"name": "burst", "limit": 100, "window_seconds": 1},
                            {"name": "per_minute", "limit": 3, "window_seconds": 60}]}))
        .await;
    for expected_remaining in [2, 1, 0] {
        let d = app.verify(&secret, &[]).await;
        assert_eq!(d["code"], "VALID", "{d}");
        assert_eq!(d["rate_limit"]["name"], "per_minute", "the tightest limit is reported: {d}");
        assert_eq!(d["rate_limit"]["limit"], 3);
        assert_eq!(d["rate_limit"]["remaining"], expected_remaining);
        assert!(d["rate_limit"]["reset"].as_i64().unwrap() > 0);
    }
    let d = app.verify(&secret, &[]).await;
    assert_eq!(d["code"], "RATE_LIMITED", "{d}");
    assert_eq!(d["valid"], false);
    assert_eq!(d["rate_limit"]["name"], "per_minute");
    assert_eq!(d["rate_limit"]["remaining"], 0);

    let resp = app.client.get(app.url("/v1/auth")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = resp.headers();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(h["ratelimit-limit"], "3");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert!(h.contains_key("ratelimit-reset"));
    // For nginx's auth_request (which passes on only 401 and 403): a 403 with the same Retry-After. And
    // the path Envoy appends to the prefix is answered like /v1/auth.
    for path in ["/v1/auth?limited_status=403", "/v1/auth/articles/1?limited_status=403"] {
        let resp = app.client.get(app.url(path)).header("X-API-Key", &secret).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(resp.headers().contains_key("retry-after"), "{path}");
    }
    let resp =
        app.client.get(app.url("/v1/auth/articles/1")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);

    // A key with room left gets the headers on success too.
    let (_, other) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k2",
            "rate_limits": [{"name": "per_minute", "limit": 10, "window_seconds": 60}]}))
        .await;
    let resp = app.client.get(app.url("/v1/auth")).header("X-API-Key", &other).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["ratelimit-limit"], "10");
    assert_eq!(resp.headers()["ratelimit-remaining"], "9");
    let resp =
        app.client.get(app.url("/v1/auth/any/path?x=1")).header("X-API-Key", &other).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-keygate-key-id"));
    assert_eq!(resp.headers()["ratelimit-remaining"], "8");
}

#[tokio::test]
async fn keys_inherit_their_consumers_plan_unless_they_override_it() {
    let app = TestApp::start().await;
    let (status, c) = app
        .post(
            "/v1/consumers",
            json!({"name": "free", "rate_limits": [{"name": "plan", "limit": 2, "window_seconds": 60}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{c}");
    let consumer = c["id"].as_str().unwrap().to_string();
    let (inherit_id, inherits) = app.create_key(&consumer, &[]).await;
    let (_, own) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "own",
            "rate_limits": [{"name": "mine", "limit": 5, "window_seconds": 60}]}))
        .await;
    assert_eq!(app.verify(&inherits, &[]).await["rate_limit"]["name"], "plan");
    assert_eq!(app.verify_code(&inherits, &[]).await, "VALID");
    assert_eq!(app.verify_code(&inherits, &[]).await, "RATE_LIMITED");
    for _ in 0..3 {
        assert_eq!(app.verify_code(&own, &[]).await, "VALID");
    }
    // Raising the plan takes effect at once for keys that inherit it.
    let (status, _) = app
        .patch(
            &format!("/v1/consumers/{consumer}"),
            json!({"rate_limits": [{"name": "plan", "limit": 1000, "window_seconds": 60}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.verify_code(&inherits, &[]).await, "VALID");
    // A key's own empty list means no limits at all; null inherits again.
    app.patch(&format!("/v1/keys/{inherit_id}"), json!({"rate_limits": []})).await;
    assert!(app.verify(&inherits, &[]).await.get("rate_limit").is_none());
    let (_, k) = app.patch(&format!("/v1/keys/{inherit_id}"), json!({"rate_limits": null})).await;
    assert!(k["rate_limits"].is_null());
    assert_eq!(app.verify(&inherits, &[]).await["rate_limit"]["limit"], 1000);
}

#[tokio::test]
async fn quotas_count_cost_and_can_be_managed() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) =
        app.create_key_with(json!({"consumer_id": consumer, "name": "k", "quota": {"remaining": 5}})).await;
    let v = |cost: u64| verify_with(&app, json!({"credential": secret, "cost": cost}));
    let d = v(2).await;
    assert_eq!((d["code"].as_str(), d["quota"]["remaining"].as_u64()), (Some("VALID"), Some(3)));
    let d = v(2).await;
    assert_eq!(d["quota"]["remaining"], 1);
    let d = v(2).await;
    assert_eq!(d["code"], "QUOTA_EXCEEDED", "{d}");
    assert_eq!(d["quota"]["remaining"], 1, "a rejected verify consumes nothing");
    let d = v(0).await;
    assert_eq!(
        (d["code"].as_str(), d["quota"]["remaining"].as_u64()),
        (Some("VALID"), Some(1)),
        "cost 0 only checks"
    );
    assert_eq!(v(1).await["quota"]["remaining"], 0);
    let d = v(1).await;
    assert_eq!((d["code"].as_str(), d["quota"]["remaining"].as_u64()), (Some("QUOTA_EXCEEDED"), Some(0)));
    let resp = app.client.get(app.url("/v1/auth")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);

    // Top up, set, and the key view shows the live number.
    let (status, k) = app.post(&format!("/v1/keys/{id}/quota"), json!({"add": 3})).await;
    assert_eq!(status, StatusCode::OK, "{k}");
    assert_eq!(k["quota"]["remaining"], 3);
    assert_eq!(v(1).await["quota"]["remaining"], 2);
    let (_, k) = app.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["quota"]["remaining"], 2);
    let (_, k) = app.post(&format!("/v1/keys/{id}/quota"), json!({"set": 10})).await;
    assert_eq!(k["quota"]["remaining"], 10);
    let (status, e) = app.post(&format!("/v1/keys/{id}/quota"), json!({"reset": true})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "no refill amount to reset to: {e}");
    let (status, _) = app.post(&format!("/v1/keys/{id}/quota"), json!({"set": 1, "add": 1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // A refill every second sets the quota back to the amount; reset does it at once.
    let (status, k) = app
        .patch(
            &format!("/v1/keys/{id}"),
            json!({"quota": {"remaining": 1, "refill": {"amount": 4, "interval_seconds": 1}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{k}");
    assert_eq!(v(1).await["quota"]["remaining"], 0);
    assert_eq!(v(1).await["code"], "QUOTA_EXCEEDED");
    app.clock.advance(1100);
    assert_eq!(v(1).await["quota"]["remaining"], 3);
    let (_, k) = app.post(&format!("/v1/keys/{id}/quota"), json!({"reset": true})).await;
    assert_eq!(k["quota"]["remaining"], 4);

    // Removing the quota.
    app.patch(&format!("/v1/keys/{id}"), json!({"quota": null})).await;
    let d = v(1).await;
    assert_eq!(d["code"], "VALID");
    assert!(d.get("quota").is_none(), "{d}");
    let (_, audit) = app.get(&format!("/v1/audit?target_id={id}&action=key.quota")).await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_quota_of_100_admits_exactly_100_of_200_concurrent_verifies() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) =
        app.create_key_with(json!({"consumer_id": consumer, "name": "k", "quota": {"remaining": 100}})).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let client = app.client.clone();
        let url = app.url("/v1/verify");
        let admin = app.admin_key.clone();
        let body = json!({"credential": secret});
        tasks.push(tokio::spawn(async move {
            let d: Value =
                client.post(url).bearer_auth(admin).json(&body).send().await.unwrap().json().await.unwrap();
            d["code"].as_str().unwrap().to_string()
        }));
    }
    let mut valid = 0;
    let mut exceeded = 0;
    for t in tasks {
        match t.await.unwrap().as_str() {
            "VALID" => valid += 1,
            "QUOTA_EXCEEDED" => exceeded += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((valid, exceeded), (100, 100));
    let (_, k) = app.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["quota"]["remaining"], 0);
}

#[tokio::test]
async fn rejected_verifies_consume_nothing() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k", "scopes": ["a"],
            "rate_limits": [{"name": "per_minute", "limit": 2, "window_seconds": 60}],
            "quota": {"remaining": 2}, "allowed_ips": ["203.0.113.0/24"]}))
        .await;
    for _ in 0..5 {
        let d = verify_with(&app, json!({"credential": secret, "scopes": ["b"], "ip": "203.0.113.1"})).await;
        assert_eq!(d["code"], "INSUFFICIENT_SCOPE");
        let d = verify_with(&app, json!({"credential": secret, "scopes": ["a"], "ip": "198.51.100.1"})).await;
        assert_eq!(d["code"], "IP_NOT_ALLOWED");
    }
    for remaining in [1, 0] {
        let d = verify_with(&app, json!({"credential": secret, "scopes": ["a"], "ip": "203.0.113.1"})).await;
        assert_eq!(d["code"], "VALID", "{d}");
        assert_eq!(d["quota"]["remaining"], remaining);
        assert_eq!(d["rate_limit"]["remaining"], remaining);
    }
    // Over both: rate limit is reported, and the quota (already 0) is untouched.
    let d = verify_with(&app, json!({"credential": secret, "scopes": ["a"], "ip": "203.0.113.1"})).await;
    assert_eq!(d["code"], "RATE_LIMITED");
    // Top up the quota: the rate limit still denies and consumes nothing from the new quota.
    app.post(&format!("/v1/keys/{id}/quota"), json!({"set": 5})).await;
    let d = verify_with(&app, json!({"credential": secret, "scopes": ["a"], "ip": "203.0.113.1"})).await;
    assert_eq!(d["code"], "RATE_LIMITED");
    assert_eq!(d["quota"]["remaining"], 5);
}

#[tokio::test]
async fn ip_allow_lists_v4_and_v6_and_trusted_proxies() {
    let app = TestApp::builder().trusted_proxies(&["127.0.0.1/32"]).start().await;
    let consumer = app.create_consumer("acme").await;
    let (status, created) = app
        .post(
            "/v1/keys",
            json!({"consumer_id": consumer, "name": "k",
            "allowed_ips": ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["allowed_ips"], json!(["203.0.113.0/24", "2001:db8::/32", "198.51.100.7/32"]));
    let secret = created["key"].as_str().unwrap().to_string();
    for (ip, code) in [
        ("203.0.113.200", "VALID"),
        ("198.51.100.7", "VALID"),
        ("198.51.100.8", "IP_NOT_ALLOWED"),
        ("2001:db8:ffff::1", "VALID"),
        ("2001:db9::1", "IP_NOT_ALLOWED"),
        ("::ffff:203.0.113.5", "VALID"),
    ] {
        let d = verify_with(&app, json!({"credential": secret, "ip": ip})).await;
        assert_eq!(d["code"], code, "{ip}: {d}");
    }
    // Without "ip" the caller's own address (127.0.0.1) counts.
    assert_eq!(app.verify_code(&secret, &[]).await, "IP_NOT_ALLOWED");
    let (status, e) = app.post("/v1/verify", json!({"credential": secret, "ip": "300.1.1.1"})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("ip")));

    // Forward-auth behind a trusted proxy (127.0.0.1) takes X-Forwarded-For.
    let auth = |xff: &'static str| {
        app.client.get(app.url("/v1/auth")).header("X-API-Key", &secret).header("X-Forwarded-For", xff).send()
    };
    assert_eq!(auth("203.0.113.9").await.unwrap().status(), StatusCode::OK);
    assert_eq!(auth("192.0.2.1").await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(auth("2001:db8::42, 127.0.0.1").await.unwrap().status(), StatusCode::OK);

    // Not behind a trusted proxy: forwarded headers are ignored.
    let plain = TestApp::start().await;
    let c = plain.create_consumer("x").await;
    let (_, s2) = plain
        .create_key_with(json!({"consumer_id": c, "name": "k", "allowed_ips": ["203.0.113.0/24"]}))
        .await;
    let resp = plain
        .client
        .get(plain.url("/v1/auth"))
        .header("X-API-Key", &s2)
        .header("X-Forwarded-For", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let d: Value = resp.json().await.unwrap();
    assert_eq!(d["code"], "IP_NOT_ALLOWED");
}

#[tokio::test]
async fn usage_is_counted_by_outcome_and_survives_a_restart_with_the_quota() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app
        .create_key_with(
            json!({"consumer_id": consumer, "name": "k", "scopes": ["a"], "quota": {"remaining": 10}}),
        )
        .await;
    let (id2, secret2) = app.create_key(&consumer, &[]).await;
    for _ in 0..3 {
        let d = verify_with(&app, json!({"credential": secret, "scopes": ["a"], "ip": "192.0.2.44"})).await;
        assert_eq!(d["code"], "VALID");
    }
    assert_eq!(app.verify_code(&secret, &["b"]).await, "INSUFFICIENT_SCOPE");
    assert_eq!(app.verify_code(&secret2, &[]).await, "VALID");

    let (status, u) = app.get(&format!("/v1/keys/{id}/usage?granularity=minute")).await;
    assert_eq!(status, StatusCode::OK, "{u}");
    assert_eq!(u["total"], 4);
    assert_eq!(u["codes"]["VALID"], 3);
    assert_eq!(u["codes"]["INSUFFICIENT_SCOPE"], 1);
    assert_eq!(u["buckets"][0]["total"], 4);
    let (_, u) = app.get(&format!("/v1/consumers/{consumer}/usage?granularity=day")).await;
    assert_eq!(u["codes"]["VALID"], 4, "both keys of the consumer: {u}");
    let (_, k) = app.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["last_used_ip"], "192.0.2.44");
    assert!(k["last_used_at"].is_string());
    assert_eq!(k["quota"]["remaining"], 7);

    let (status, e) = app.get(&format!("/v1/keys/{id}/usage?granularity=week")).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("granularity")));
    let (status, _) =
        app.get(&format!("/v1/keys/{id}/usage?from=2020-01-01T00:00:00Z&granularity=minute")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "too many buckets");
    let (status, _) = app.get("/v1/keys/key_nope/usage").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // One more use, not yet flushed when the server stops: a graceful stop writes it.
    assert_eq!(app.verify(&secret, &["a"]).await["quota"]["remaining"], 6);
    let (dir, admin, guard) = app.stop().await;
    let app = TestApp::builder().data_dir(&dir, &admin).start().await;
    let (_, k) = app.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(k["quota"]["remaining"], 6, "{k}");
    assert_eq!(app.verify(&secret, &["a"]).await["quota"]["remaining"], 5);
    let (_, u) = app.get(&format!("/v1/keys/{id}/usage?granularity=hour")).await;
    assert_eq!(u["codes"]["VALID"], 5, "{u}");
    let (_, u2) = app.get(&format!("/v1/keys/{id2}/usage")).await;
    assert_eq!(u2["total"], 1);

    // Retention: buckets older than their retention are deleted.
    let deleted =
        app.state.expire_usage(keygate_server::time::now_ms() + 3 * 365 * 86_400_000).await.unwrap();
    assert!(deleted >= 3, "minute, hour and day rows: {deleted}");
    let (_, u) = app.get(&format!("/v1/keys/{id}/usage?granularity=minute")).await;
    assert_eq!(u["total"], 0);
    drop(guard);
}

#[tokio::test]
async fn invalid_limits_quotas_and_ip_lists_are_rejected_with_their_field() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let key = |extra: Value| {
        let mut body = json!({"consumer_id": consumer, "name": "k"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let rl = |limit: i64, window: i64| json!({"rate_limits": [{"name": "x", "limit": limit, "window_seconds": window}]});
    for (body, field) in [
        (key(rl(0, 60)), "rate_limits"),
        (key(rl(10, 0)), "rate_limits"),
        (key(rl(10, 100 * 86_400)), "rate_limits"),
        (key(json!({"rate_limits": [{"name": "Bad Name", "limit": 1, "window_seconds": 1}]})), "rate_limits"),
        (
            key(
                json!({"rate_limits": [{"name": "a", "limit": 1, "window_seconds": 1}, {"name": "a", "limit": 2, "window_seconds": 2}]}),
            ),
            "rate_limits",
        ),
        (key(json!({"quota": {"remaining": 5, "refill": {"amount": 0, "interval_seconds": 60}}})), "quota"),
        (key(json!({"quota": {"remaining": 5, "refill": {"amount": 5}}})), "quota"),
        (key(json!({"quota": {"remaining": 5, "refill": {"amount": 5, "interval_seconds": 0}}})), "quota"),
        (
            key(
                json!({"quota": {"remaining": 5, "refill": {"amount": 5, "schedule": "monthly", "day_of_month": 0}}}),
            ),
            "quota",
        ),
        (
            key(
                json!({"quota": {"remaining": 5, "refill": {"amount": 5, "schedule": "daily", "interval_seconds": 5}}}),
            ),
            "quota",
        ),
        (key(json!({"allowed_ips": ["10.0.0.0/33"]})), "allowed_ips"),
        (key(json!({"allowed_ips": ["not-an-ip"]})), "allowed_ips"),
        (key(json!({"allowed_ips": ["2001:db8::/129"]})), "allowed_ips"),
    ] {
        let (status, e) = app.post("/v1/keys", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {e}");
        assert_eq!(e["field"], field, "{e}");
    }
    // Wrong types are shape errors.
    for body in [
        key(rl(-1, 60)),
        key(json!({"quota": {"remaining": "lots"}})),
        key(json!({"quota": {"remaining": 1, "refill": {"amount": 1, "schedule": "weekly"}}})),
    ] {
        let (status, e) = app.post("/v1/keys", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {e}");
        assert_eq!(e["code"], "invalid_request");
    }
    let (status, e) = app
        .post(
            "/v1/consumers",
            json!({"name": "c", "rate_limits": [{"name": "x", "limit": 0, "window_seconds": 1}]}),
        )
        .await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("rate_limits")));
    let (status, e) = app.post("/v1/verify", json!({"credential": "x", "cost": 2_000_000})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("cost")));
    let (_, keys) = app.get(&format!("/v1/keys?consumer_id={consumer}")).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 0, "nothing was written");
}

#[tokio::test]
async fn repeated_failures_from_one_address_are_throttled() {
    // Forward-auth behind a trusted proxy: clients are told apart by X-Forwarded-For.
    let app = TestApp::builder().failures_per_minute(5).trusted_proxies(&["127.0.0.1/32"]).start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, good) = app.create_key(&consumer, &[]).await;
    let auth = |key: String, client: &'static str| {
        app.client.get(app.url("/v1/auth")).header("X-API-Key", key).header("X-Forwarded-For", client).send()
    };
    for _ in 0..5 {
        let resp = auth("kg_live_guess".into(), "198.51.100.1").await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = auth("kg_live_guess".into(), "198.51.100.1").await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["code"], "too_many_failures");
    // A key that verifies is never refused for its address's failures (the address may be a NAT shared
    // with the guesser); other addresses are not slowed at all.
    assert_eq!(auth(good.clone(), "198.51.100.1").await.unwrap().status(), StatusCode::OK);
    assert_eq!(auth(good.clone(), "198.51.100.2").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        auth("kg_live_guess".into(), "198.51.100.1").await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // On /v1/verify only the end client named in "ip" is throttled, never the gateway calling it.
    for _ in 0..5 {
        verify_with(&app, json!({"credential": "nope-nope-nope-nope", "ip": "192.0.2.66"})).await;
    }
    let (status, e) =
        app.post("/v1/verify", json!({"credential": "nope-nope-nope-nope", "ip": "192.0.2.66"})).await;
    assert_eq!((status, e["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("too_many_failures")));
    let d = verify_with(&app, json!({"credential": good, "ip": "192.0.2.66"})).await;
    assert_eq!(d["code"], "VALID", "a good key from a throttled address still verifies");
    let d = verify_with(&app, json!({"credential": good, "ip": "192.0.2.67"})).await;
    assert_eq!(d["code"], "VALID");
    assert_eq!(app.verify_code(&good, &[]).await, "VALID");

    // Failed admin logins count too.
    let other = TestApp::builder().failures_per_minute(3).start().await;
    for _ in 0..3 {
        let (status, _) = other.call_as("kg_live_wrong", Method::GET, "/v1/keys", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, e) = other.call_as("kg_live_wrong", Method::GET, "/v1/keys", None).await;
    assert_eq!((status, e["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("too_many_failures")));
    // The admin key from the same address is not locked out.
    let (status, _) = other.call(Method::GET, "/v1/keys", None).await;
    assert_eq!(status, StatusCode::OK);

    // Introspection and revocation with a bearer Keygate credential count failures too.
    let third = TestApp::builder().failures_per_minute(3).start().await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        for path in ["/oauth2/introspect", "/oauth2/revoke"] {
            let resp = third
                .client
                .post(third.url(path))
                .bearer_auth("kg_live_wrong")
                .form(&[("token", "x")])
                .send()
                .await
                .unwrap();
            statuses.push(resp.status());
        }
    }
    assert_eq!(statuses[..3], [StatusCode::UNAUTHORIZED; 3]);
    assert_eq!(*statuses.last().unwrap(), StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
}

/// `rate_limits.redis_url`: the limits live in Redis, with the same semantics as on one node (remaining
/// counts, `RATE_LIMITED` with a retry time, all or nothing: a request the quota refuses gives its units
/// back), and a node whose Redis stops answering falls back to its own cells.
#[tokio::test]
async fn shared_rate_limits_in_redis_behave_as_local_ones() {
    // A Redis of this test's own, so that it can stop it.
    let port = 56380 + (std::process::id() % 1000) as u16;
    let (url, pidfile) = keygate_store::testing::own_redis(port).unwrap();
    let redis = keygate_server::DatabaseUrl::parse_redis(&url).unwrap();
    let app = TestApp::builder().config(|c| c.rate_limits_redis_url = Some(redis)).start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, secret) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k",
            "rate_limits": [{"name": "per_minute", "limit": 3, "window_seconds": 60}]}))
        .await;
    for remaining in [2, 1, 0] {
        let d = verify_with(&app, json!({"credential": secret})).await;
        assert_eq!(
            (d["code"].as_str(), d["rate_limit"]["remaining"].as_u64()),
            (Some("VALID"), Some(remaining)),
            "{d}"
        );
    }
    let d = verify_with(&app, json!({"credential": secret})).await;
    assert_eq!(d["code"], "RATE_LIMITED", "{d}");
    let reset = d["rate_limit"]["reset"].as_u64().unwrap();
    assert!((1..=20).contains(&reset), "one of 3 a minute comes back within 20 s: {d}");
    // A second node's view: the same cells (a fresh server on the same Redis and its own data).
    let redis = keygate_server::DatabaseUrl::parse_redis(&url).unwrap();
    let other = TestApp::builder().config(|c| c.rate_limits_redis_url = Some(redis)).start().await;
    let oc = other.create_consumer("acme").await;
    let (_, osecret) = other
        .create_key_with(json!({"consumer_id": oc, "name": "k", "quota": {"remaining": 1},
            "rate_limits": [{"name": "per_minute", "limit": 5, "window_seconds": 60}]}))
        .await;
    let d = verify_with(&other, json!({"credential": osecret})).await;
    assert_eq!((d["code"].as_str(), d["rate_limit"]["remaining"].as_u64()), (Some("VALID"), Some(4)), "{d}");
    let d = verify_with(&other, json!({"credential": osecret})).await;
    assert_eq!(d["code"], "QUOTA_EXCEEDED", "{d}");
    // A probe counts the unit it would take: 5 - 1 used - 1 probed. Without the refund (made in the
    // background) it would stay 2.
    let mut d = Value::Null;
    for _ in 0..100 {
        d = verify_with(&other, json!({"credential": osecret, "cost": 0})).await;
        if d["rate_limit"]["remaining"] == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(d["rate_limit"]["remaining"], 3, "the refused request gave its unit back: {d}");
    // Redis stops: the node applies its own cells (a fresh key: 3 allowed, then limited), and answers.
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    std::process::Command::new("kill").arg(pid.trim()).status().unwrap();
    // Redis takes a moment to stop: until it refuses connections, a request may still be counted there
    // and the next ones on the node's own cell (the documented bound at an outage's start).
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "Redis stopped");
    let (_, fresh) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k2",
            "rate_limits": [{"name": "per_minute", "limit": 3, "window_seconds": 60}]}))
        .await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(
            verify_with(&app, json!({"credential": fresh})).await["code"].as_str().unwrap().to_string(),
        );
    }
    assert_eq!(codes, ["VALID", "VALID", "VALID", "RATE_LIMITED"]);
}
