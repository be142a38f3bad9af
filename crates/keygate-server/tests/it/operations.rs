//! Operations behaviour a new user meets (issue 16): the last admin key, rate-limit signals, consumers'
//! external ids, and the separate admin surface.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

#[tokio::test]
async fn the_last_admin_key_cannot_be_revoked_disabled_or_demoted() {
    let app = TestApp::start().await;
    let (_, keys) = app.get("/v1/keys").await;
    let bootstrap = keys["items"][0]["id"].as_str().unwrap().to_string();
    for (path, body) in
        [(format!("/v1/keys/{bootstrap}/revoke"), None), (format!("/v1/keys/{bootstrap}/disable"), None)]
    {
        let (status, e) = app.call(Method::POST, &path, body).await;
        assert_eq!((status, e["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{path}");
        assert!(e["message"].as_str().unwrap().contains("keygate admin-key"), "{e}");
    }
    let (status, _) =
        app.patch(&format!("/v1/keys/{bootstrap}"), json!({"scopes": ["keygate:verify"]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // An expiry or an address list could end its use too.
    for body in [json!({"expires_at": "2099-01-01T00:00:00Z"}), json!({"allowed_ips": ["192.0.2.1/32"]})] {
        let (status, _) = app.patch(&format!("/v1/keys/{bootstrap}"), body.clone()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
    }
    // A wildcard over keygate: counts as an admin key.
    let tools = app.create_consumer("tools").await;
    let (wild_id, _) = app.create_key(&tools, &["keygate:*"]).await;
    let (status, _) =
        app.patch(&format!("/v1/keys/{bootstrap}"), json!({"expires_at": "2099-01-01T00:00:00Z"})).await;
    assert_eq!(status, StatusCode::OK, "another key covers keygate:admin");
    let (status, _) = app.post(&format!("/v1/keys/{wild_id}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // With a second admin key elsewhere, the first may go; that consumer then cannot be disabled.
    let ops = app.create_consumer("ops team").await;
    let (_, second) = app.create_key(&ops, &["keygate:admin"]).await;
    let (status, _) = app.post(&format!("/v1/keys/{bootstrap}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, e) = app.call_as(&second, Method::POST, &format!("/v1/consumers/{ops}/disable"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    // The revoked key is told how to recover.
    let (status, e) = app.get("/v1/keys").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(e["message"].as_str().unwrap().contains("keygate admin-key"), "{e}");
}

#[tokio::test]
async fn rate_limit_signals_name_one_moment_and_the_limit() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, key) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k",
            "rate_limits": [{"name": "burst", "limit": 1, "window_seconds": 60}]}))
        .await;
    let auth = || app.client.get(app.url("/v1/auth")).header("X-API-Key", &key).send();
    let ok = auth().await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()["ratelimit-remaining"], "0");
    let reset: u64 = ok.headers()["ratelimit-reset"].to_str().unwrap().parse().unwrap();
    assert!((59..=60).contains(&reset), "{reset}");
    let denied = auth().await.unwrap();
    assert_eq!(denied.status(), StatusCode::TOO_MANY_REQUESTS);
    let h = denied.headers().clone();
    let body: Value = denied.json().await.unwrap();
    assert_eq!(h["retry-after"], h["ratelimit-reset"]);
    assert_eq!(body["rate_limit"]["reset"].to_string(), h["retry-after"].to_str().unwrap());
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("'burst'") && message.contains("1 per 60 s"), "{message}");
}

#[tokio::test]
async fn consumers_have_unique_external_ids_and_optionally_unique_names() {
    let app = TestApp::start().await;
    let (status, c) = app.post("/v1/consumers", json!({"name": "acme", "external_id": "cust-1"})).await;
    assert_eq!(status, StatusCode::CREATED, "{c}");
    let id = c["id"].as_str().unwrap();
    let (_, found) = app.get("/v1/consumers?external_id=cust-1").await;
    assert_eq!(found["items"][0]["id"], id);
    let (_, none) = app.get("/v1/consumers?external_id=nobody").await;
    assert_eq!(none["items"], json!([]));
    let (status, e) = app.post("/v1/consumers", json!({"name": "other", "external_id": "cust-1"})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::CONFLICT, Some("external_id")));
    let (status, _) = app.post("/v1/consumers", json!({"name": "acme"})).await;
    assert_eq!(status, StatusCode::CREATED, "names may repeat by default");
    let (status, c) = app.patch(&format!("/v1/consumers/{id}"), json!({"external_id": null})).await;
    assert_eq!((status, &c["external_id"]), (StatusCode::OK, &Value::Null));

    let strict = TestApp::builder().config(|c| c.unique_consumer_names = true).start().await;
    strict.create_consumer("acme").await;
    let (status, e) = strict.post("/v1/consumers", json!({"name": "acme"})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::CONFLICT, Some("name")));
}

#[tokio::test]
async fn rs256_signing_keys_rotate_like_the_others() {
    use crate::oauth::{client, get_token, jwt_part};
    let app = TestApp::start().await;
    let (status, keys) =
        app.post("/v1/signing-keys/rotate", json!({"alg": "RS256", "publish_ahead_seconds": 0})).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let consumer = app.create_consumer("gw").await;
    let c = client(&app, json!({"consumer_id": consumer, "name": "c", "scopes": ["a"]})).await;
    let token = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let header = jwt_part(&token, 0);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(app.verify_code(&token, &["a"]).await, "VALID");
    // A verifier that knows only the JWKS (as an API gateway would) accepts it.
    let jwks: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == header["kid"]).unwrap();
    assert_eq!(jwk["kty"], "RSA");
    let key = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v).unwrap().claims;
    assert_eq!(claims["client_id"], c.id.as_str());
}

#[tokio::test]
async fn private_key_jwt_clients_authenticate_with_signed_assertions() {
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let app = TestApp::start().await;
    let consumer = app.create_consumer("secure partner").await;
    let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1"}]});
    let (status, c) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "signer", "scopes": ["a"],
                "token_endpoint_auth_method": "private_key_jwt", "jwks": jwks}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{c}");
    assert!(c["client_secret"].is_null(), "no secret for a private_key_jwt client");
    assert_eq!(c["token_endpoint_auth_method"], "private_key_jwt");
    let client_id = c["client_id"].as_str().unwrap().to_string();

    let der = sk.to_pkcs8_der().unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
    let now = keygate_server::time::now_ms() / 1000;
    let assertion = |aud: &str, jti: &str, exp: i64| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.kid = Some("k1".into());
        let claims =
            json!({"iss": client_id, "sub": client_id, "aud": aud, "jti": jti, "exp": exp, "iat": now});
        jsonwebtoken::encode(&h, &claims, &encoding).unwrap()
    };
    let token_url = app.url("/oauth2/token");
    let request = |jwt: String| {
        app.client
            .post(app.url("/oauth2/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", jwt.as_str()),
            ])
            .send()
    };
    let resp = request(assertion(&token_url, "one", now + 60)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t: Value = resp.json().await.unwrap();
    assert_eq!(app.verify_code(t["access_token"].as_str().unwrap(), &["a"]).await, "VALID");

    // Refused: a replay, another audience, an expired or too long-lived assertion, another key.
    let refused = [
        assertion(&token_url, "one", now + 60),
        assertion("https://elsewhere.example/token", "two", now + 60),
        assertion(&token_url, "three", now - 120),
        assertion(&token_url, "four", now + 7200),
    ];
    for jwt in refused {
        let resp = request(jwt).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_client");
    }
    let other = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    let forged = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.kid = Some("k1".into());
        let claims =
            json!({"iss": client_id, "sub": client_id, "aud": token_url, "jti": "five", "exp": now + 60});
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(other.to_pkcs8_der().unwrap().as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(request(forged).await.unwrap().status(), StatusCode::UNAUTHORIZED);

    // Registration refuses private keys and keyless private_key_jwt clients.
    let (status, e) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "x", "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "d": x}]}}),
        )
        .await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("jwks")));
    let (status, _) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "x", "token_endpoint_auth_method": "private_key_jwt"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let disco: Value = app
        .client
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        disco["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("private_key_jwt"))
    );
}
