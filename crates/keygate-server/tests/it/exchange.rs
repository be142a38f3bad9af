//! Token exchange (RFC 8693): API keys and access tokens traded for short-lived, narrower tokens that
//! stop when their subject does.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
const API_KEY: &str = "urn:keygate:params:oauth:token-type:api_key";
const DOWNSTREAM: &str = "https://downstream.example";

struct Exchanger {
    id: String,
    secret: String,
}

async fn exchanger(app: &TestApp, consumer: &str, format: &str) -> Exchanger {
    let (s, c) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "backend", "scopes": ["articles:read", "articles:write"],
                   "audiences": [DOWNSTREAM], "token_format": format,
                   "grant_types": ["client_credentials", EXCHANGE]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    Exchanger {
        id: c["client_id"].as_str().unwrap().into(),
        secret: c["client_secret"].as_str().unwrap().into(),
    }
}

async fn exchange(app: &TestApp, c: &Exchanger, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let mut all = vec![("grant_type", EXCHANGE)];
    all.extend_from_slice(form);
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(&c.id, Some(&c.secret))
        .form(&all)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test]
async fn an_api_key_becomes_a_short_lived_narrow_token_that_dies_with_the_key() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let c = exchanger(&app, &consumer, "jwt").await;
    let (key_id, key) = app.create_key(&consumer, &["articles:read", "articles:write", "billing:read"]).await;
    for kind in [API_KEY, ACCESS] {
        let (s, t) = exchange(
            &app,
            &c,
            &[
                ("subject_token", &key),
                ("subject_token_type", kind),
                ("scope", "articles:read"),
                ("resource", DOWNSTREAM),
            ],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{t}");
        assert_eq!(t["issued_token_type"], ACCESS);
        assert_eq!(t["scope"], "articles:read");
        let at = t["access_token"].as_str().unwrap();
        let d = app.verify(at, &["articles:read"]).await;
        assert_eq!(d["code"], "VALID", "{d}");
        assert_eq!(d["sub"], key_id.as_str(), "the subject is the key");
        assert_eq!(d["aud"], json!([DOWNSTREAM]));
        assert_eq!(app.verify_code(at, &["articles:write"]).await, "INSUFFICIENT_SCOPE");
        // The JWT records who acted (RFC 8693 act) and where it came from.
        let payload = at.split('.').nth(1).unwrap();
        use base64::Engine;
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap(),
        )
        .unwrap();
        assert_eq!(claims["act"]["sub"], c.id.as_str());
        assert_eq!(claims["kg_src"]["kind"], "api_key");
    }
    // Beyond the subject's scopes, or the client's, or another audience: refused.
    let (_, e) = exchange(
        &app,
        &c,
        &[("subject_token", &key), ("subject_token_type", API_KEY), ("scope", "billing:read")],
    )
    .await;
    assert_eq!(e["error"], "invalid_scope", "the client may not have billing:read");
    let (_, e) = exchange(
        &app,
        &c,
        &[("subject_token", &key), ("subject_token_type", API_KEY), ("audience", "https://other.example")],
    )
    .await;
    assert_eq!(e["error"], "invalid_target");
    let (_, e) =
        exchange(&app, &c, &[("subject_token", "kg_live_nope"), ("subject_token_type", API_KEY)]).await;
    assert_eq!(e["error"], "invalid_grant");
    let (_, e) = exchange(&app, &c, &[("subject_token", &key)]).await;
    assert_eq!(e["error"], "invalid_request", "subject_token_type is required");
    // Another consumer's key is not this client's to exchange.
    let other = app.create_consumer("other").await;
    let (_, foreign) = app.create_key(&other, &["articles:read"]).await;
    let (_, e) = exchange(&app, &c, &[("subject_token", &foreign), ("subject_token_type", API_KEY)]).await;
    assert_eq!(e["error"], "invalid_grant", "{e}");

    // Revoking the key stops the exchanged token at once.
    let (_, t) = exchange(&app, &c, &[("subject_token", &key), ("subject_token_type", API_KEY)]).await;
    let at = t["access_token"].as_str().unwrap().to_string();
    assert_eq!(app.verify_code(&at, &[]).await, "VALID");
    // …and an exchanged token cannot be exchanged again.
    let (_, e) = exchange(&app, &c, &[("subject_token", &at), ("subject_token_type", ACCESS)]).await;
    assert_eq!(e["error"], "invalid_grant");
    let (s, _) = app.post(&format!("/v1/keys/{key_id}/revoke"), json!({})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(app.verify_code(&at, &[]).await, "REVOKED");
}

#[tokio::test]
async fn access_tokens_and_personal_tokens_are_exchanged_and_revocation_follows() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let c = exchanger(&app, &consumer, "opaque").await;
    // A client-credentials JWT of the same consumer.
    let (_, cc) = app
        .post("/v1/clients", json!({"consumer_id": consumer, "name": "front", "scopes": ["articles:read"]}))
        .await;
    let (cid, csecret) = (cc["client_id"].as_str().unwrap(), cc["client_secret"].as_str().unwrap());
    let t: Value = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(cid, Some(csecret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let jwt = t["access_token"].as_str().unwrap().to_string();
    let (s, x) = exchange(&app, &c, &[("subject_token", &jwt), ("subject_token_type", ACCESS)]).await;
    assert_eq!(s, StatusCode::OK, "{x}");
    let exchanged = x["access_token"].as_str().unwrap().to_string();
    assert!(exchanged.starts_with("kgat_"), "the exchanging client's format");
    assert_eq!(app.verify_code(&exchanged, &["articles:read"]).await, "VALID");
    // The subject JWT revoked (RFC 7009, by its client): the exchanged token stops.
    let r = app
        .client
        .post(app.url("/oauth2/revoke"))
        .basic_auth(cid, Some(csecret))
        .form(&[("token", jwt.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.verify_code(&exchanged, &[]).await, "REVOKED");
    let intro: Value = app
        .client
        .post(app.url("/oauth2/introspect"))
        .basic_auth(&c.id, Some(&c.secret))
        .form(&[("token", exchanged.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(intro, json!({"active": false}));

    // A personal access token: the exchanged token is the user's, and stops with the PAT.
    let (_, u) = app.post("/v1/users", json!({"username": "eve"})).await;
    let user = u["id"].as_str().unwrap();
    let (_, p) = app
        .post(
            &format!("/v1/users/{user}/tokens"),
            json!({"name": "cli", "scopes": ["articles:read"], "expires_in_seconds": 3600}),
        )
        .await;
    let pat = p["token"].as_str().unwrap();
    let (s, x) = exchange(&app, &c, &[("subject_token", pat), ("subject_token_type", ACCESS)]).await;
    assert_eq!(s, StatusCode::OK, "{x}");
    let exchanged = x["access_token"].as_str().unwrap().to_string();
    assert!(x["expires_in"].as_i64().unwrap() <= 3600, "never outlives the subject");
    let d = app.verify(&exchanged, &["articles:read"]).await;
    assert_eq!((d["code"].as_str(), d["user_id"].as_str()), (Some("VALID"), Some(user)), "{d}");
    app.post(&format!("/v1/users/{user}/disable"), json!({})).await;
    assert_eq!(app.verify_code(&exchanged, &[]).await, "REVOKED", "the subject PAT stopped with its user");
    // A client without the grant.
    let (_, e) = {
        let r = app
            .client
            .post(app.url("/oauth2/token"))
            .basic_auth(cid, Some(csecret))
            .form(&[("grant_type", EXCHANGE), ("subject_token", pat), ("subject_token_type", ACCESS)])
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(e["error"], "unauthorized_client");
}

#[tokio::test]
async fn what_an_exchanged_token_could_not_keep_is_not_exchanged() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let c = exchanger(&app, &consumer, "jwt").await;
    for body in [
        json!({"consumer_id": consumer, "name": "q", "scopes": ["articles:read"], "quota": {"remaining": 10}}),
        json!({"consumer_id": consumer, "name": "ip", "scopes": ["articles:read"], "allowed_ips": ["10.0.0.0/8"]}),
    ] {
        let (_, key) = app.create_key_with(body).await;
        let (_, e) = exchange(&app, &c, &[("subject_token", &key), ("subject_token_type", API_KEY)]).await;
        assert_eq!(e["error"], "invalid_grant", "{e}");
    }
    // A PAT limited to one audience cannot be exchanged for another.
    let (_, u) = app.post("/v1/users", json!({"username": "fay"})).await;
    let (_, p) = app
        .post(
            &format!("/v1/users/{}/tokens", u["id"].as_str().unwrap()),
            json!({"name": "x", "scopes": ["articles:read"], "expires_in_seconds": 3600, "audiences": ["https://only.example"]}),
        )
        .await;
    let (_, e) = exchange(
        &app,
        &c,
        &[
            ("subject_token", p["token"].as_str().unwrap()),
            ("subject_token_type", ACCESS),
            ("resource", DOWNSTREAM),
        ],
    )
    .await;
    assert_eq!(e["error"], "invalid_target", "{e}");
}
