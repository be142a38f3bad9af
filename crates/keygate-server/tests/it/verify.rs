//! `/v1/verify` decisions and `/v1/auth` forward-auth.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::admin::chrono_like_in;
use crate::helpers::TestApp;

#[tokio::test]
async fn every_decision_code() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app.create_key_with(json!({
        "consumer_id": consumer, "name": "k", "scopes": ["articles:*", "users:read"], "metadata": {"tier": 2}
    })).await;

    let d = app.verify(&secret, &["articles:read", "users:read"]).await;
    assert_eq!(d["valid"], true);
    assert_eq!(d["code"], "VALID");
    assert_eq!(d["kind"], "api_key");
    assert_eq!(d["key_id"], id.as_str());
    assert_eq!(d["consumer_id"], consumer.as_str());
    assert_eq!(d["scopes"], json!(["articles:*", "users:read"]));
    assert_eq!(d["metadata"]["tier"], 2);
    assert!(d["expires_at"].is_null());

    let d = app.verify(&secret, &["users:write", "articles:read"]).await;
    assert_eq!(d["valid"], false);
    assert_eq!(d["code"], "INSUFFICIENT_SCOPE");
    assert_eq!(d["missing_scopes"], json!(["users:write"]));
    assert_eq!(d["key_id"], id.as_str());

    assert_eq!(app.verify_code("not-a-key", &[]).await, "MALFORMED");
    let mut typo = secret.clone().into_bytes();
    let last = typo.len() - 10;
    typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
    assert_eq!(app.verify_code(&String::from_utf8(typo).unwrap(), &[]).await, "MALFORMED");

    // Well-formed but unknown: a real secret from another server.
    let other = TestApp::start().await;
    let other_consumer = other.create_consumer("x").await;
    let (_, foreign) = other.create_key(&other_consumer, &[]).await;
    let d = app.verify(&foreign, &[]).await;
    assert_eq!(d["code"], "NOT_FOUND");
    assert!(d.get("key_id").is_none());
    // Asked twice: the negative answer is cached and still correct.
    assert_eq!(app.verify_code(&foreign, &[]).await, "NOT_FOUND");

    let (expiring_id, expiring) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "short", "expires_at": chrono_like_in(Duration::from_millis(1500))}))
        .await;
    let d = app.verify(&expiring, &[]).await;
    assert_eq!(d["code"], "VALID");
    assert!(d["expires_at"].is_string());
    app.clock.advance(1600);
    let d = app.verify(&expiring, &[]).await;
    assert_eq!(d["code"], "EXPIRED");
    assert_eq!(d["key_id"], expiring_id.as_str());
    let (_, view) = app.get(&format!("/v1/keys/{expiring_id}")).await;
    assert_eq!(view["status"], "expired");

    app.post(&format!("/v1/keys/{id}/disable"), json!({})).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "DISABLED");
    app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "REVOKED");
}

#[tokio::test]
async fn verify_needs_a_caller_with_the_verify_permission() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, plain) = app.create_key(&consumer, &["articles:read"]).await;
    let (_, verifier) = app.create_key(&consumer, &["keygate:verify"]).await;
    let body = json!({"credential": plain, "scopes": []});

    let resp = app.client.post(app.url("/v1/verify")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "unauthorized");

    let (status, err) = app.call_as(&plain, Method::POST, "/v1/verify", Some(body.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(err["code"], "forbidden");

    let (status, err) = app.call_as("kg_live_garbage", Method::POST, "/v1/verify", Some(body.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(err["message"].as_str().unwrap().contains("MALFORMED"));

    // A verify-only key, sent as X-API-Key, may verify…
    let resp = app
        .client
        .post(app.url("/v1/verify"))
        .header("X-API-Key", &verifier)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let d: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(d["code"], "VALID");
    // …but not administer.
    let (status, err) = app.call_as(&verifier, Method::GET, "/v1/keys", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(err["code"], "forbidden");
    let (status, _) = app.call_as(&plain, Method::GET, "/v1/consumers", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let resp = app.client.get(app.url("/v1/consumers")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn forward_auth() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app.create_key(&consumer, &["articles:read", "articles:write"]).await;
    let get = |builder: reqwest::RequestBuilder| async move { builder.send().await.unwrap() };

    // X-API-Key, no scopes required.
    let resp = get(app.client.get(app.url("/v1/auth")).header("X-API-Key", &secret)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-keygate-consumer"], consumer.as_str());
    assert_eq!(resp.headers()["x-keygate-key-id"], id.as_str());
    assert_eq!(resp.headers()["x-keygate-scopes"], "articles:read articles:write");
    assert_eq!(resp.headers()["x-keygate-kind"], "api_key");

    // Bearer, scopes from the query and from the header.
    let resp = get(app
        .client
        .get(app.url("/v1/auth?scope=articles:read&scope=articles:write"))
        .bearer_auth(&secret))
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get(app
        .client
        .get(app.url("/v1/auth"))
        .bearer_auth(&secret)
        .header("X-Keygate-Required-Scopes", "articles:read, articles:delete"))
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let www = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(www.contains("error=\"insufficient_scope\""), "{www}");
    assert!(www.contains("scope=\"articles:delete\""), "{www}");
    assert!(resp.headers().get("x-keygate-consumer").is_none());

    // No credential: 401 without an error code (RFC 6750 section 3.1).
    let resp = get(app.client.get(app.url("/v1/auth"))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"keygate\"");

    // Bad credential: 401 invalid_token.
    let resp = get(app.client.get(app.url("/v1/auth")).header("X-API-Key", "kg_live_nope")).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().contains("error=\"invalid_token\""));
    let d: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(d["code"], "MALFORMED");

    // Revoked: 401 on the very next request.
    app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    let resp = get(app.client.get(app.url("/v1/auth")).header("X-API-Key", &secret)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let d: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(d["code"], "REVOKED");
}
