//! Importing existing keys: plaintext and SHA-256, per-item results, and verification of imported keys.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::TestApp;

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn imported_keys_verify_like_native_ones() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("migrated").await;
    let plain = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
    let hashed = "legacy-key-0123456789abcdef";
    let foreign_keygate = {
        let other = TestApp::start().await;
        let c = other.create_consumer("x").await;
        other.create_key(&c, &[]).await.1
    };
    let body = json!({"keys": [
        {"consumer_id": consumer, "name": "stripe-style", "scopes": ["articles:read"], "key": plain,
         "metadata": {"source": "old-system"}, "quota": {"remaining": 2}},
        {"consumer_id": consumer, "name": "hash only", "sha256": sha256_hex(hashed), "environment": "test",
         "allowed_ips": ["192.0.2.0/24"]},
        {"consumer_id": consumer, "name": "from another keygate", "key": foreign_keygate},
    ]});
    let (status, r) = app.post("/v1/keys/import", body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!((r["imported"].as_u64(), r["failed"].as_u64()), (Some(3), Some(0)), "{r}");
    let ids: Vec<&str> = r["results"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();

    let d = app.verify(plain, &["articles:read"]).await;
    assert_eq!(d["code"], "VALID", "{d}");
    assert_eq!(d["key_id"], ids[0]);
    assert_eq!(d["metadata"]["source"], "old-system");
    assert_eq!(d["quota"]["remaining"], 1);
    let d = app.post("/v1/verify", json!({"credential": hashed, "ip": "192.0.2.5"})).await.1;
    assert_eq!(d["code"], "VALID", "{d}");
    assert_eq!(d["environment"], "test");
    assert_eq!(app.verify_code(&foreign_keygate, &[]).await, "VALID");
    let resp = app.client.get(app.url("/v1/auth")).bearer_auth(plain).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-keygate-key-id"], ids[0]);

    // Listings show only a harmless start, never the key or its hash.
    let (_, k) = app.get(&format!("/v1/keys/{}", ids[0])).await;
    assert_eq!(k["imported"], true);
    assert!(!k.to_string().contains(&plain[12..]), "{k}");
    let (_, k) = app.get(&format!("/v1/keys/{}", ids[1])).await;
    assert!(k["start"].as_str().unwrap().starts_with("sha256:"));
    assert!(!k.to_string().contains(&sha256_hex(hashed)[8..]));

    // Unknown strings without Keygate's prefix are MALFORMED, not looked up.
    assert_eq!(app.verify_code("sk_live_somethingelse_entirely", &[]).await, "MALFORMED");
    // Imported keys can be revoked like any other.
    app.post(&format!("/v1/keys/{}/revoke", ids[0]), json!({})).await;
    assert_eq!(app.verify_code(plain, &[]).await, "REVOKED");
    let (_, audit) = app.get("/v1/audit?action=key.import").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn bad_items_fail_alone_with_stable_codes() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("c").await;
    let (_, existing) = app.create_key(&consumer, &[]).await;
    let good = |name: &str, key: &str| json!({"consumer_id": consumer, "name": name, "key": key});
    let body = json!({"keys": [
        good("ok-1", "aaaaaaaaaaaaaaaaaaaa-1"),
        good("dup-in-request", "aaaaaaaaaaaaaaaaaaaa-1"),
        good("exists", &existing),
        good("short", "abc"),
        {"consumer_id": consumer, "name": "both", "key": "bbbbbbbbbbbbbbbbbbbbbb", "sha256": sha256_hex("x")},
        {"consumer_id": consumer, "name": "neither"},
        {"consumer_id": consumer, "name": "bad hash", "sha256": "xyz"},
        {"consumer_id": "cons_missing", "name": "no consumer", "key": "cccccccccccccccccccccc"},
        {"consumer_id": consumer, "name": "bad scope", "key": "dddddddddddddddddddddd", "scopes": ["a b"]},
        {"consumer_id": consumer, "name": "bad cidr", "key": "eeeeeeeeeeeeeeeeeeeeee", "allowed_ips": ["1.2.3.4/40"]},
        {"consumer_id": consumer, "name": "unknown field", "key": "ffffffffffffffffffffff", "colour": "red"},
        "not even an object",
        good("ok-2", "gggggggggggggggggggggg"),
    ]});
    let (status, r) = app.post("/v1/keys/import", body).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 13);
    let code = |i: usize| results[i]["error"]["code"].as_str().map(str::to_owned);
    assert!(results[0]["id"].is_string());
    assert_eq!(code(1).as_deref(), Some("duplicate_key"));
    assert_eq!(code(2).as_deref(), Some("duplicate_key"));
    assert_eq!(code(3).as_deref(), Some("validation_failed"));
    assert_eq!(code(4).as_deref(), Some("validation_failed"));
    assert_eq!(code(5).as_deref(), Some("validation_failed"));
    assert_eq!(code(6).as_deref(), Some("validation_failed"));
    assert_eq!(code(7).as_deref(), Some("not_found"));
    assert_eq!(results[8]["error"]["field"], "scopes");
    assert_eq!(results[9]["error"]["field"], "allowed_ips");
    assert_eq!(code(10).as_deref(), Some("invalid_request"));
    assert_eq!(code(11).as_deref(), Some("invalid_request"));
    assert!(results[12]["id"].is_string());
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["index"], i);
    }
    assert_eq!((r["imported"].as_u64(), r["failed"].as_u64()), (Some(2), Some(11)));
    let (_, keys) = app.get(&format!("/v1/keys?consumer_id={consumer}")).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 3, "the native key and the two good imports");

    // Importing the same file again imports nothing new.
    let (_, again) =
        app.post("/v1/keys/import", json!({"keys": [good("ok-1", "aaaaaaaaaaaaaaaaaaaa-1")]})).await;
    assert_eq!(again["imported"], 0);
    let (status, e) = app.post("/v1/keys/import", json!({"keys": []})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("keys")));
}

#[tokio::test]
async fn thousands_of_keys_in_one_request() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("bulk").await;
    let keys: Vec<Value> = (0..5000)
        .map(|i| json!({"consumer_id": consumer, "name": format!("k{i}"), "sha256": sha256_hex(&format!("bulk-secret-{i:08}"))}))
        .collect();
    let (status, r) = app.post("/v1/keys/import", json!({"keys": keys})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["imported"], 5000);
    assert_eq!(app.verify_code("bulk-secret-00004242", &[]).await, "VALID");
    assert_eq!(app.verify_code("bulk-secret-99999999", &[]).await, "MALFORMED");
}
