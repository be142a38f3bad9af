//! OAuth 2 client credentials: tokens (JWT and opaque), introspection, revocation, discovery, JWKS, and
//! access tokens at `/v1/verify` and `/v1/auth`.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

pub struct Client {
    pub id: String,
    pub secret: String,
}

pub async fn client(app: &TestApp, body: Value) -> Client {
    let (status, c) = app.post("/v1/clients", body).await;
    assert_eq!(status, StatusCode::CREATED, "{c}");
    Client {
        id: c["client_id"].as_str().unwrap().into(),
        secret: c["client_secret"].as_str().unwrap().into(),
    }
}

pub async fn token_request(app: &TestApp, c: &Client, form: &[(&str, &str)]) -> reqwest::Response {
    app.client
        .post(app.url("/oauth2/token"))
        .basic_auth(&c.id, Some(&c.secret))
        .form(form)
        .send()
        .await
        .unwrap()
}

pub async fn get_token(app: &TestApp, c: &Client, form: &[(&str, &str)]) -> Value {
    let resp = token_request(app, c, form).await;
    let status = resp.status();
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

pub fn jwt_part(token: &str, i: usize) -> Value {
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

pub async fn introspect(app: &TestApp, c: &Client, token: &str) -> Value {
    let resp = app
        .client
        .post(app.url("/oauth2/introspect"))
        .form(&[("token", token), ("client_id", &c.id), ("client_secret", &c.secret)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn client_credentials_jwt_end_to_end() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("partner").await;
    let c = client(
        &app,
        json!({"consumer_id": consumer, "name": "batch job",
        "scopes": ["articles:read", "articles:write"], "audiences": ["https://api.example.com"]}),
    )
    .await;
    assert!(c.secret.starts_with("kgcs_"));

    let t = get_token(&app, &c, &[("grant_type", "client_credentials"), ("scope", "articles:read")]).await;
    assert_eq!(t["token_type"], "Bearer");
    assert_eq!(t["expires_in"], 3600);
    assert_eq!(t["scope"], "articles:read");
    let at = t["access_token"].as_str().unwrap().to_string();

    // RFC 9068 shape.
    let header = jwt_part(&at, 0);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["alg"], "EdDSA");
    let claims = jwt_part(&at, 1);
    assert_eq!(claims["iss"], app.base.as_str());
    assert_eq!(claims["sub"], c.id.as_str());
    assert_eq!(claims["client_id"], c.id.as_str());
    assert_eq!(claims["aud"], "https://api.example.com");
    assert_eq!(claims["scope"], "articles:read");
    for claim in ["exp", "iat", "nbf", "jti"] {
        assert!(!claims[claim].is_null(), "{claim} missing");
    }
    let jwks: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert!(jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == header["kid"] && k["kty"] == "OKP"));

    // All scopes when none are requested.
    let all = get_token(&app, &c, &[("grant_type", "client_credentials")]).await;
    assert_eq!(all["scope"], "articles:read articles:write");

    // The same verify endpoint takes tokens.
    let d = app.verify(&at, &["articles:read"]).await;
    assert_eq!(d["code"], "VALID", "{d}");
    assert_eq!(d["kind"], "access_token");
    assert_eq!(d["client_id"], c.id.as_str());
    assert_eq!(d["consumer_id"], consumer.as_str());
    assert_eq!(app.verify_code(&at, &["articles:write"]).await, "INSUFFICIENT_SCOPE");
    let (_, d) = app.post("/v1/verify", json!({"credential": at, "audience": "https://elsewhere"})).await;
    assert_ne!(d["code"], "VALID", "wrong audience");
    let resp = app.client.get(app.url("/v1/auth?scope=articles:read")).bearer_auth(&at).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-keygate-kind"], "access_token");
    assert_eq!(resp.headers()["x-keygate-client-id"], c.id.as_str());

    let i = introspect(&app, &c, &at).await;
    assert_eq!(i["active"], true, "{i}");
    assert_eq!(i["client_id"], c.id.as_str());
    assert_eq!(i["scope"], "articles:read");
    assert_eq!(i["iss"], app.base.as_str());
    assert_eq!(i["token_type"], "Bearer");

    // Revocation is immediate; unknown tokens answer 200 too.
    for token in [at.as_str(), "not-a-token"] {
        let resp = app
            .client
            .post(app.url("/oauth2/revoke"))
            .basic_auth(&c.id, Some(&c.secret))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(app.verify_code(&at, &[]).await, "REVOKED");
    assert_eq!(introspect(&app, &c, &at).await, json!({"active": false}));
    let resp = app.client.get(app.url("/v1/auth")).bearer_auth(&at).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn opaque_tokens_and_revoking_all_of_a_client() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let c = client(
        &app,
        json!({"consumer_id": consumer, "name": "o", "scopes": ["a"], "token_format": "opaque"}),
    )
    .await;
    let at = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(at.starts_with("kgat_"), "{at}");
    let d = app.verify(&at, &["a"]).await;
    assert_eq!((d["code"].as_str(), d["token_format"].as_str()), (Some("VALID"), Some("opaque")));
    assert_eq!(introspect(&app, &c, &at).await["active"], true);

    // Revoke every token of the client (admin), then new tokens work again.
    let jc = client(&app, json!({"consumer_id": consumer, "name": "j", "scopes": ["a"]})).await;
    let jwt = get_token(&app, &jc, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    for (cl, tok) in [(&c, &at), (&jc, &jwt)] {
        let (status, _) = app.post(&format!("/v1/clients/{}/revoke-tokens", cl.id), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(app.verify_code(tok, &[]).await, "REVOKED");
    }
    app.clock.advance(1100);
    let fresh = get_token(&app, &jc, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(app.verify_code(&fresh, &[]).await, "VALID");

    // Disabling the client stops its tokens and its grants.
    app.post(&format!("/v1/clients/{}/disable", jc.id), json!({})).await;
    assert_eq!(app.verify_code(&fresh, &[]).await, "DISABLED");
    assert_eq!(
        token_request(&app, &jc, &[("grant_type", "client_credentials")]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // Deleting it too.
    let resp = app
        .client
        .delete(app.url(&format!("/v1/clients/{}", c.id)))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_ne!(app.verify_code(&at, &[]).await, "VALID");
}

#[tokio::test]
async fn token_endpoint_errors_follow_rfc_6749() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let c = client(
        &app,
        json!({"consumer_id": consumer, "name": "c", "scopes": ["a"], "audiences": ["https://r1"]}),
    )
    .await;
    let wrong = Client { id: c.id.clone(), secret: "kgcs_wrongwrongwrongwrongwrongwrong123456".into() };
    let resp = token_request(&app, &wrong, &[("grant_type", "client_credentials")]).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"keygate\"");
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"], "invalid_client");
    assert!(e.get("access_token").is_none());

    for (form, error) in [
        (vec![("grant_type", "password")], "unsupported_grant_type"),
        (vec![("grant_type", "client_credentials"), ("scope", "b")], "invalid_scope"),
        (vec![("grant_type", "client_credentials"), ("resource", "https://other")], "invalid_target"),
        (vec![("grant_type", "client_credentials"), ("grant_type", "client_credentials")], "invalid_request"),
        (vec![("scope", "a")], "invalid_request"),
    ] {
        let resp = token_request(&app, &c, &form).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{form:?}");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"], error, "{form:?}: {e}");
        assert!(e["error_description"].is_string());
    }
    // Both authentication methods at once; a JSON body; no authentication.
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(&c.id, Some(&c.secret))
        .form(&[("grant_type", "client_credentials"), ("client_secret", c.secret.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_request");
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // client_secret_post works; a requested resource becomes the audience.
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &c.id),
            ("client_secret", &c.secret),
            ("resource", "https://r1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t: Value = resp.json().await.unwrap();
    assert_eq!(jwt_part(t["access_token"].as_str().unwrap(), 1)["aud"], "https://r1");
    // Introspection needs an authenticated caller.
    let resp = app.client.post(app.url("/oauth2/introspect")).form(&[("token", "x")]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn tampered_forged_and_expired_jwts_are_rejected() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let c = client(
        &app,
        json!({"consumer_id": consumer, "name": "c", "scopes": ["a", "admin"], "token_lifetime_seconds": 1}),
    )
    .await;
    let at =
        get_token(&app, &c, &[("grant_type", "client_credentials"), ("scope", "a")]).await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
    let parts: Vec<&str> = at.split('.').collect();
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    // More scope in the payload, same signature.
    let mut claims = jwt_part(&at, 1);
    claims["scope"] = json!("a admin");
    let tampered = format!("{}.{}.{}", parts[0], enc(&claims), parts[2]);
    // alg: none, no signature.
    let mut header = jwt_part(&at, 0);
    header["alg"] = json!("none");
    let none = format!("{}.{}.", enc(&header), parts[1]);
    // Wrong typ.
    let mut header = jwt_part(&at, 0);
    header["typ"] = json!("JWT");
    let wrong_typ = format!("{}.{}.{}", enc(&header), parts[1], parts[2]);
    for bad in [&tampered, &none, &wrong_typ] {
        let d = app.verify(bad, &[]).await;
        assert_ne!(d["code"], "VALID", "{bad}");
        assert_eq!(introspect(&app, &c, bad).await["active"], false);
    }
    // A token of another Keygate (other keys, other issuer) is not ours.
    let other = TestApp::start().await;
    let oc = other.create_consumer("x").await;
    let oclient = client(&other, json!({"consumer_id": oc, "name": "x", "scopes": ["a"]})).await;
    let foreign = get_token(&other, &oclient, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(app.verify_code(&foreign, &[]).await, "VALID");
    // Signed with our own key but naming another issuer, or not yet valid: rejected too.
    let key = app.state.oauth.keys.signer(keygate_server::time::now_ms()).unwrap();
    // Re-signed claims get a later expiry: `at` lives one second, and this part is about issuer and
    // not-before, not about time running out.
    let fresh = |mut c: Value| {
        c["exp"] = json!(keygate_server::time::now_ms() / 1000 + 600);
        c
    };
    let mut claims = fresh(jwt_part(&at, 1));
    claims["iss"] = json!("https://evil.example");
    claims["jti"] = json!("forged-1");
    let wrong_iss = key.sign_jwt(&claims).unwrap();
    let mut claims = fresh(jwt_part(&at, 1));
    claims["nbf"] = json!(claims["nbf"].as_i64().unwrap() + 3600);
    claims["jti"] = json!("forged-2");
    let not_yet = key.sign_jwt(&claims).unwrap();
    let mut claims = fresh(jwt_part(&at, 1));
    claims["jti"] = json!("forged-3");
    let resigned = key.sign_jwt(&claims).unwrap();
    assert_eq!(app.verify_code(&resigned, &[]).await, "VALID", "the control: same claims, our issuer");
    for bad in [&wrong_iss, &not_yet] {
        assert_ne!(app.verify_code(bad, &[]).await, "VALID", "{}", jwt_part(bad, 1));
    }
    // Wrong audience when the caller names the one it serves.
    let (_, d) =
        app.post("/v1/verify", json!({"credential": resigned, "audience": "https://other.example"})).await;
    assert_ne!(d["code"], "VALID");
    // Expired.
    app.clock.advance(2100);
    assert_eq!(app.verify_code(&at, &[]).await, "EXPIRED");
    assert_eq!(introspect(&app, &c, &at).await["active"], false);
}

#[tokio::test]
async fn signing_keys_rotate_in_stages_and_discovery_is_accurate() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let c = client(&app, json!({"consumer_id": consumer, "name": "c", "scopes": ["news:read"]})).await;
    let before = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let old_kid = jwt_part(&before, 0)["kid"].clone();

    let (status, keys) = app.post("/v1/signing-keys/rotate", json!({"publish_ahead_seconds": 1})).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let statuses: Vec<&str> =
        keys.as_array().unwrap().iter().map(|k| k["status"].as_str().unwrap()).collect();
    assert!(statuses.contains(&"pending") && statuses.contains(&"active"), "{statuses:?}");
    let jwks: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "the new key is published before it signs");
    let during = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(jwt_part(&during, 0)["kid"], old_kid, "the old key signs until the new one's time");

    app.clock.advance(1100);
    let after = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(jwt_part(&after, 0)["kid"], old_kid);
    for t in [&before, &during, &after] {
        assert_eq!(app.verify_code(t, &[]).await, "VALID", "tokens of the retired key live on");
    }
    let jwks: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "the retired key stays published");

    let meta: Value = app
        .client
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["issuer"], app.base.as_str());
    assert_eq!(meta["token_endpoint"], format!("{}/oauth2/token", app.base));
    assert_eq!(meta["jwks_uri"], format!("{}/.well-known/jwks.json", app.base));
    assert_eq!(
        meta["grant_types_supported"],
        json!([
            "client_credentials",
            "authorization_code",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:device_code",
            "urn:ietf:params:oauth:grant-type:token-exchange"
        ])
    );
    assert_eq!(meta["scopes_supported"], json!(["news:read"]));
    assert!(
        meta["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("client_secret_basic"))
    );

    // ES256 is selectable.
    let (_, _) =
        app.post("/v1/signing-keys/rotate", json!({"publish_ahead_seconds": 0, "alg": "ES256"})).await;
    let es = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(jwt_part(&es, 0)["alg"], "ES256");
    assert_eq!(app.verify_code(&es, &[]).await, "VALID");
}

#[tokio::test]
async fn client_admin_validation_and_secret_rotation() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    for (body, field) in [
        (json!({"consumer_id": consumer, "name": "x", "grant_types": ["password"]}), "grant_types"),
        (json!({"consumer_id": consumer, "name": "x", "token_format": "saml"}), "token_format"),
        (
            json!({"consumer_id": consumer, "name": "x", "token_lifetime_seconds": 0}),
            "token_lifetime_seconds",
        ),
        (json!({"consumer_id": consumer, "name": "x", "scopes": ["a b"]}), "scopes"),
        (json!({"consumer_id": "cons_nope", "name": "x"}), "consumer_id"),
    ] {
        let (status, e) = app.post("/v1/clients", body.clone()).await;
        assert!(status.is_client_error(), "{body}");
        assert_eq!(e["field"], field, "{e}");
    }
    let c = client(&app, json!({"consumer_id": consumer, "name": "c", "scopes": ["a"]})).await;
    let (_, listed) = app.get("/v1/clients").await;
    assert!(!listed.to_string().contains(&c.secret[10..]), "listing shows the secret");
    let (status, r) =
        app.post(&format!("/v1/clients/{}/rotate-secret", c.id), json!({"overlap_seconds": 60})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let new = Client { id: c.id.clone(), secret: r["client_secret"].as_str().unwrap().into() };
    assert_eq!(
        token_request(&app, &c, &[("grant_type", "client_credentials")]).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        token_request(&app, &new, &[("grant_type", "client_credentials")]).await.status(),
        StatusCode::OK
    );
    app.post(&format!("/v1/clients/{}/rotate-secret", c.id), json!({"overlap_seconds": 0})).await;
    assert_eq!(
        token_request(&app, &new, &[("grant_type", "client_credentials")]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let (_, audit) = app.get(&format!("/v1/audit?target_id={}", c.id)).await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 3);
}

/// The `oauth2` crate, a real OAuth 2 client library, gets a token with client credentials.
#[tokio::test]
async fn the_oauth2_crate_gets_tokens() {
    use oauth2::basic::BasicClient;
    use oauth2::{AuthType, ClientId, ClientSecret, Scope, TokenResponse, TokenUrl};

    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let c = client(
        &app,
        json!({"consumer_id": consumer, "name": "lib", "scopes": ["reports:read", "reports:write"]}),
    )
    .await;
    let http = reqwest::Client::new();
    // oauth2 takes any async function from an http::Request to an http::Response.
    let send = |req: oauth2::HttpRequest| crate::helpers::oauth2_send(http.clone(), req);
    for auth in [AuthType::BasicAuth, AuthType::RequestBody] {
        let oc = BasicClient::new(ClientId::new(c.id.clone()))
            .set_client_secret(ClientSecret::new(c.secret.clone()))
            .set_token_uri(TokenUrl::new(app.url("/oauth2/token")).unwrap())
            .set_auth_type(auth);
        let token = oc
            .exchange_client_credentials()
            .add_scope(Scope::new("reports:read".into()))
            .request_async(&send)
            .await
            .unwrap();
        assert_eq!(token.scopes().unwrap()[0].as_str(), "reports:read");
        assert!(token.expires_in().unwrap().as_secs() > 3000);
        let d = app.verify(token.access_token().secret(), &["reports:read"]).await;
        assert_eq!(d["code"], "VALID", "{d}");
        // A scope the client may not have is an RFC error the library understands.
        let err = oc
            .exchange_client_credentials()
            .add_scope(Scope::new("admin".into()))
            .request_async(&send)
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("invalid_scope"), "{err:?}");
    }
}

#[tokio::test]
async fn signing_keys_rotate_on_a_schedule() {
    let app = TestApp::builder().key_rotation(Duration::from_secs(1), Duration::ZERO).start().await;
    let first: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(first["keys"].as_array().unwrap().len(), 1);
    app.clock.advance(1800);
    // The background check runs every quarter of the interval (real time): wait for it, briefly.
    let mut later = first.clone();
    for _ in 0..40 {
        later = app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        if later["keys"].as_array().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(later["keys"].as_array().unwrap().len() >= 2, "{later}");
    let (_, keys) = app.get("/v1/signing-keys").await;
    let active: Vec<&Value> = keys.as_array().unwrap().iter().filter(|k| k["status"] == "active").collect();
    assert_eq!(active.len(), 1, "{keys}");
    assert_ne!(active[0]["kid"], first["keys"][0]["kid"]);
}
