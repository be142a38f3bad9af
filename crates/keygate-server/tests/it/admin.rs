//! Consumers, keys, rotation, audit and persistence through the admin API.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn consumer_lifecycle() {
    let app = TestApp::start().await;
    let (status, c) = app.post("/v1/consumers", json!({"name": "acme", "metadata": {"plan": "pro"}})).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = c["id"].as_str().unwrap();
    assert!(id.starts_with("cons_"));
    assert_eq!(c["metadata"]["plan"], "pro");
    assert_eq!(c["disabled"], false);

    let (status, got) = app.get(&format!("/v1/consumers/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["name"], "acme");

    let (status, updated) = app.patch(&format!("/v1/consumers/{id}"), json!({"name": "acme inc"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(updated["name"], "acme inc");
    assert_eq!(updated["metadata"]["plan"], "pro", "metadata untouched by a name change");

    let (status, disabled) = app.post(&format!("/v1/consumers/{id}/disable"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(disabled["disabled"], true);
    let (status, body) = app.post("/v1/keys", json!({"consumer_id": id, "name": "k", "scopes": []})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "consumer_disabled");
    let (_, enabled) = app.post(&format!("/v1/consumers/{id}/enable"), json!({})).await;
    assert_eq!(enabled["disabled"], false);

    // The system consumer (holder of the admin key) cannot be disabled.
    let (_, list) = app.get("/v1/consumers").await;
    let system = list["items"].as_array().unwrap().iter().find(|c| c["system"] == true).unwrap();
    let (status, body) =
        app.post(&format!("/v1/consumers/{}/disable", system["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "conflict");
}

#[tokio::test]
async fn listings_page_in_creation_order() {
    let app = TestApp::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.create_consumer(&format!("c{i}")).await);
    }
    let (_, page1) = app.get("/v1/consumers?limit=3").await;
    let items1 = page1["items"].as_array().unwrap();
    assert_eq!(items1.len(), 3);
    let next = page1["next_after"].as_str().unwrap();
    let (_, page2) = app.get(&format!("/v1/consumers?limit=3&after={next}")).await;
    let items2 = page2["items"].as_array().unwrap();
    // 5 created + the system consumer = 6.
    assert_eq!(items2.len(), 3);
    let all: Vec<&str> = items1.iter().chain(items2).map(|c| c["id"].as_str().unwrap()).collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    for id in &ids {
        assert!(all.contains(&id.as_str()));
    }
}

#[tokio::test]
async fn key_secret_is_shown_once_and_never_listed() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (status, created) = app
        .post(
            "/v1/keys",
            json!({"consumer_id": consumer, "name": "prod", "scopes": ["b:read", "a:write", "b:read"],
                   "environment": "test", "metadata": {"team": "data"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let secret = created["key"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(secret.starts_with("kg_test_"), "{secret}");
    assert_eq!(created["scopes"], json!(["a:write", "b:read"]), "scopes are sorted and deduplicated");
    assert_eq!(created["environment"], "test");
    assert_eq!(created["start"].as_str().unwrap(), &secret[..12]);

    let (_, one) = app.get(&format!("/v1/keys/{id}")).await;
    let (_, all) = app.get("/v1/keys").await;
    let (_, mine) = app.get(&format!("/v1/keys?consumer_id={consumer}")).await;
    for body in [&one, &all, &mine] {
        let text = body.to_string();
        assert!(!text.contains(&secret[12..]), "a listing shows the secret: {text}");
        assert!(!text.contains("\"key\":"), "a listing has a key field: {text}");
    }
    assert_eq!(one["metadata"]["team"], "data");
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    assert_eq!(all["items"].as_array().unwrap().len(), 2, "the bootstrap admin key and this one");
}

#[tokio::test]
async fn updates_take_effect_on_the_next_verify() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app.create_key(&consumer, &["articles:read"]).await;
    assert_eq!(app.verify_code(&secret, &["articles:read"]).await, "VALID");
    assert_eq!(app.verify_code(&secret, &["articles:write"]).await, "INSUFFICIENT_SCOPE");

    let (status, updated) = app
        .patch(
            &format!("/v1/keys/{id}"),
            json!({"scopes": ["articles:write"], "name": "renamed", "metadata": {"a": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["name"], "renamed");
    // The cached VALID decision must not survive the scope change.
    assert_eq!(app.verify_code(&secret, &["articles:read"]).await, "INSUFFICIENT_SCOPE");
    let d = app.verify(&secret, &["articles:write"]).await;
    assert_eq!(d["code"], "VALID");
    assert_eq!(d["name"], "renamed");
    assert_eq!(d["metadata"]["a"], 1);

    // Disable and enable.
    let (_, k) = app.post(&format!("/v1/keys/{id}/disable"), json!({})).await;
    assert_eq!(k["status"], "disabled");
    assert_eq!(app.verify_code(&secret, &[]).await, "DISABLED");
    let (_, k) = app.post(&format!("/v1/keys/{id}/enable"), json!({})).await;
    assert_eq!(k["status"], "active");
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");

    // Expiry set and cleared.
    let soon = chrono_like_in(Duration::from_secs(3600));
    let (_, k) = app.patch(&format!("/v1/keys/{id}"), json!({"expires_at": soon})).await;
    assert!(k["expires_at"].is_string());
    let (_, k) = app.patch(&format!("/v1/keys/{id}"), json!({"expires_at": null})).await;
    assert!(k["expires_at"].is_null());
}

/// An RFC 3339 time `d` from now, without pulling a date crate into the tests.
pub fn chrono_like_in(d: Duration) -> String {
    keygate_server::time::rfc3339(keygate_server::time::now_ms() + d.as_millis() as i64)
}

#[tokio::test]
async fn revocation_is_immediate_and_permanent() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app.create_key(&consumer, &[]).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID"); // now cached
    let (status, k) = app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(k["status"], "revoked");
    assert_eq!(app.verify_code(&secret, &[]).await, "REVOKED");

    // Revoking again answers the same state; nothing else may change a revoked key.
    let (status, again) = app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["revoked_at"], k["revoked_at"]);
    for (method, path, body) in [
        (Method::POST, format!("/v1/keys/{id}/enable"), None),
        (Method::POST, format!("/v1/keys/{id}/rotate"), None),
        (Method::PATCH, format!("/v1/keys/{id}"), Some(json!({"name": "x"}))),
    ] {
        let (status, body) = app.call(method, &path, body).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {body}");
        assert_eq!(body["code"], "key_revoked");
    }
    assert_eq!(app.verify_code(&secret, &[]).await, "REVOKED");
}

#[tokio::test]
async fn disabling_a_consumer_disables_its_keys_at_once() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, secret) = app.create_key(&consumer, &[]).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");
    app.post(&format!("/v1/consumers/{consumer}/disable"), json!({})).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "DISABLED");
    app.post(&format!("/v1/consumers/{consumer}/enable"), json!({})).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");
}

#[tokio::test]
async fn rotation_with_and_without_overlap() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, old) = app.create_key(&consumer, &["a"]).await;
    assert_eq!(app.verify_code(&old, &[]).await, "VALID");

    // Overlap: both secrets work until the window ends.
    let (status, rotated) = app.post(&format!("/v1/keys/{id}/rotate"), json!({"overlap_seconds": 1})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(rotated["id"], id.as_str());
    assert_eq!(rotated["start"].as_str().unwrap(), &new[..12]);
    assert!(rotated["previous_expires_at"].is_string());
    assert_eq!(app.verify_code(&old, &["a"]).await, "VALID");
    let d = app.verify(&new, &["a"]).await;
    assert_eq!(d["code"], "VALID");
    assert_eq!(d["key_id"], id.as_str(), "the new secret belongs to the same key");
    app.clock.advance(1100);
    assert_eq!(app.verify_code(&old, &[]).await, "EXPIRED");
    assert_eq!(app.verify_code(&new, &[]).await, "VALID");

    // Window 0: the previous secret stops at once; with no body the overlap is 0 too.
    let (status, rotated) = app.call(Method::POST, &format!("/v1/keys/{id}/rotate"), None).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let newest = rotated["key"].as_str().unwrap().to_string();
    assert_eq!(app.verify_code(&new, &[]).await, "EXPIRED");
    assert_eq!(app.verify_code(&newest, &[]).await, "VALID");

    let (status, body) =
        app.post(&format!("/v1/keys/{id}/rotate"), json!({"overlap_seconds": 99_999_999})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["field"], "overlap_seconds");
}

#[tokio::test]
async fn every_change_leaves_an_audit_event() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    app.patch(&format!("/v1/consumers/{consumer}"), json!({"metadata": {"x": 1}})).await;
    app.post(&format!("/v1/consumers/{consumer}/disable"), json!({})).await;
    app.post(&format!("/v1/consumers/{consumer}/enable"), json!({})).await;
    let (id, secret) = app.create_key(&consumer, &["a"]).await;
    app.patch(&format!("/v1/keys/{id}"), json!({"name": "n"})).await;
    app.post(&format!("/v1/keys/{id}/disable"), json!({})).await;
    app.post(&format!("/v1/keys/{id}/enable"), json!({})).await;
    let (_, rotated) = app.post(&format!("/v1/keys/{id}/rotate"), json!({"overlap_seconds": 0})).await;
    app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;

    let (status, log) = app.get("/v1/audit?limit=1000").await;
    assert_eq!(status, StatusCode::OK);
    let events = log["items"].as_array().unwrap();
    let actions: Vec<&str> = events.iter().map(|e| e["action"].as_str().unwrap()).collect();
    for expected in [
        "keygate.initialize",
        "consumer.create",
        "consumer.update",
        "consumer.disable",
        "consumer.enable",
        "key.create",
        "key.update",
        "key.disable",
        "key.enable",
        "key.rotate",
        "key.revoke",
    ] {
        assert!(actions.contains(&expected), "missing {expected} in {actions:?}");
    }
    // Newest first; the admin key is the actor; the source IP is recorded.
    assert_eq!(actions[0], "key.revoke");
    let admin_key_id =
        events.iter().find(|e| e["action"] == "keygate.initialize").unwrap()["target_id"].clone();
    // (Keygate's own changes, such as making the first signing key, have the actor `system`.)
    for e in events.iter().filter(|e| e["action"] != "keygate.initialize" && e["actor"] != "system") {
        assert_eq!(e["actor"], admin_key_id, "{e}");
        assert_eq!(e["ip"], "127.0.0.1", "{e}");
        assert!(e["at"].is_string());
    }
    // No secret in the audit log.
    let text = log.to_string();
    assert!(!text.contains(&secret[12..]));
    assert!(!text.contains(&rotated["key"].as_str().unwrap()[12..]));

    let (_, by_key) = app.get(&format!("/v1/audit?target_id={id}")).await;
    assert_eq!(by_key["items"].as_array().unwrap().len(), 6);
    let (_, revokes) = app.get("/v1/audit?action=key.revoke").await;
    assert_eq!(revokes["items"].as_array().unwrap().len(), 1);
    let (_, page) = app.get("/v1/audit?limit=2").await;
    let before = page["next_before"].as_str().unwrap();
    let (_, older) = app.get(&format!("/v1/audit?limit=2&before={before}")).await;
    assert!(older["items"][0]["id"].as_str().unwrap() < before);
}

#[tokio::test]
async fn data_survives_a_restart() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, secret) = app.create_key(&consumer, &["a"]).await;
    let (revoked_id, revoked) = app.create_key(&consumer, &[]).await;
    app.post(&format!("/v1/keys/{revoked_id}/revoke"), json!({})).await;
    let (dir, admin_key, guard) = app.stop().await;

    let app = TestApp::builder().data_dir(&dir, &admin_key).start().await;
    let d = app.verify(&secret, &["a"]).await;
    assert_eq!(d["code"], "VALID");
    assert_eq!(d["key_id"], id.as_str());
    assert_eq!(app.verify_code(&revoked, &[]).await, "REVOKED");
    let (status, _) = app.get(&format!("/v1/consumers/{consumer}")).await;
    assert_eq!(status, StatusCode::OK);
    drop(guard);
}
