//! DPoP (RFC 9449): tokens bound to the client's key. Proofs are built here by hand — JWS over P-256
//! with the `p256` crate, not the server's JWT library — as an independent client would.

use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;

const API: &str = "https://api.example.com/v1/articles";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

struct Holder {
    key: SigningKey,
    jwk: Value,
}

impl Holder {
    fn new() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        let key = SigningKey::from_slice(&seed).unwrap();
        let point = key.verifying_key().to_encoded_point(false);
        let jwk =
            json!({"kty": "EC", "crv": "P-256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())});
        Holder { key, jwk }
    }

    fn proof_at(&self, method: &str, url: &str, token: Option<&str>, iat: i64, jti: &str) -> String {
        self.proof_typed("dpop+jwt", method, url, token, iat, jti)
    }

    fn proof_typed(
        &self,
        typ: &str,
        method: &str,
        url: &str,
        token: Option<&str>,
        iat: i64,
        jti: &str,
    ) -> String {
        let header = json!({"typ": typ, "alg": "ES256", "jwk": self.jwk});
        let mut claims = json!({"jti": jti, "htm": method, "htu": url, "iat": iat});
        if let Some(t) = token {
            use sha2::Digest;
            claims["ath"] = json!(b64(&sha2::Sha256::digest(t.as_bytes())));
        }
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig: Signature = self.key.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    }

    fn proof(&self, app: &TestApp, method: &str, url: &str, token: Option<&str>) -> String {
        let iat = app.state.now() / 1000;
        let mut jti = [0u8; 12];
        getrandom::fill(&mut jti).unwrap();
        self.proof_at(method, url, token, iat, &b64(&jti))
    }
}

async fn client(app: &TestApp, format: &str) -> (String, String) {
    let consumer = app.create_consumer("p").await;
    let (_, c) = app
        .post("/v1/clients", json!({"consumer_id": consumer, "name": "bound", "scopes": ["articles:read"], "token_format": format}))
        .await;
    (c["client_id"].as_str().unwrap().into(), c["client_secret"].as_str().unwrap().into())
}

async fn bound_token(app: &TestApp, holder: &Holder, id: &str, secret: &str) -> Value {
    let proof = holder.proof(app, "POST", &app.url("/oauth2/token"), None);
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(id, Some(secret))
        .header("DPoP", proof)
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn verify_with(app: &TestApp, token: &str, dpop: Option<Value>) -> String {
    let mut body = json!({"credential": token});
    if let Some(d) = dpop {
        body["dpop"] = d;
    }
    let (_, d) = app.post("/v1/verify", body).await;
    d["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_stolen_dpop_bound_token_is_useless_without_the_key() {
    let app = TestApp::start().await;
    let (id, secret) = client(&app, "jwt").await;
    let alice = Holder::new();
    let t = bound_token(&app, &alice, &id, &secret).await;
    assert_eq!(t["token_type"], "DPoP");
    let token = t["access_token"].as_str().unwrap().to_string();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    let jkt = keygate_server::oauth::dpop::thumbprint(&alice.jwk).unwrap();
    assert_eq!(claims["cnf"]["jkt"], jkt.as_str());

    // With a fresh proof of the key: valid.
    let ok = json!({"proof": alice.proof(&app, "GET", API, Some(&token)), "method": "GET", "url": API});
    assert_eq!(verify_with(&app, &token, Some(ok.clone())).await, "VALID");
    // The same proof again: a replay.
    assert_eq!(verify_with(&app, &token, Some(ok)).await, "DPOP_PROOF_INVALID");
    // Presented as a plain bearer token (stolen without the key): refused.
    assert_eq!(verify_with(&app, &token, None).await, "DPOP_PROOF_INVALID");
    // A thief's own key, however well-formed its proof: refused.
    let mallory = Holder::new();
    let forged = json!({"proof": mallory.proof(&app, "GET", API, Some(&token)), "method": "GET", "url": API});
    assert_eq!(verify_with(&app, &token, Some(forged)).await, "DPOP_PROOF_INVALID");
    // A proof for another request, another token, or too old.
    for (proof, method, url) in [
        (alice.proof(&app, "POST", API, Some(&token)), "GET", API),
        (alice.proof(&app, "GET", "https://api.example.com/other", Some(&token)), "GET", API),
        (alice.proof(&app, "GET", API, Some("another token")), "GET", API),
        (alice.proof(&app, "GET", API, None), "GET", API),
        (alice.proof_at("GET", API, Some(&token), app.state.now() / 1000 - 120, "old"), "GET", API),
    ] {
        let d = json!({"proof": proof, "method": method, "url": url});
        assert_eq!(verify_with(&app, &token, Some(d)).await, "DPOP_PROOF_INVALID");
    }
    // The query string is not part of htu.
    let d = json!({"proof": alice.proof(&app, "GET", API, Some(&token)), "method": "GET", "url": format!("{API}?page=2")});
    assert_eq!(verify_with(&app, &token, Some(d)).await, "VALID");

    // Forward-auth: the proof in the DPoP header, the request from the proxy's headers.
    let fa = |proof: Option<String>| {
        let mut req = app
            .client
            .get(app.url("/v1/auth"))
            .header("authorization", format!("DPoP {token}"))
            .header("x-forwarded-method", "GET")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "api.example.com")
            .header("x-forwarded-uri", "/v1/articles?page=1");
        if let Some(p) = proof {
            req = req.header("dpop", p);
        }
        req.send()
    };
    let r = fa(Some(alice.proof(&app, "GET", API, Some(&token)))).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = fa(None).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("DPoP "), "{:?}", r.headers());

    // An unbound token ignores proofs and works as a bearer token, as before.
    let r: Value = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(&id, Some(&secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["token_type"], "Bearer");
    assert_eq!(verify_with(&app, r["access_token"].as_str().unwrap(), None).await, "VALID");
    let (_, meta) = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(meta["dpop_signing_alg_values_supported"], json!(["ES256", "EdDSA", "RS256", "PS256"]));
}

#[tokio::test]
async fn the_token_endpoint_refuses_bad_proofs_and_binds_opaque_tokens_too() {
    let app = TestApp::start().await;
    let (id, secret) = client(&app, "opaque").await;
    let holder = Holder::new();
    for proof in [
        holder.proof(&app, "POST", "https://elsewhere.example/oauth2/token", None),
        holder.proof(&app, "GET", &app.url("/oauth2/token"), None),
        "not.a.jwt".to_string(),
        holder.proof_typed("JWT", "POST", &app.url("/oauth2/token"), None, app.state.now() / 1000, "t1"),
    ] {
        let r = app
            .client
            .post(app.url("/oauth2/token"))
            .basic_auth(&id, Some(&secret))
            .header("DPoP", proof)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"], "invalid_dpop_proof", "{e}");
    }
    let t = bound_token(&app, &holder, &id, &secret).await;
    let token = t["access_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("kgat_"));
    assert_eq!(verify_with(&app, &token, None).await, "DPOP_PROOF_INVALID");
    let d = json!({"proof": holder.proof(&app, "GET", API, Some(&token)), "method": "GET", "url": API});
    assert_eq!(verify_with(&app, &token, Some(d)).await, "VALID");
    // Introspection tells a resource server which key to expect (RFC 9449 §6.2).
    let intro: Value = app
        .client
        .post(app.url("/oauth2/introspect"))
        .basic_auth(&id, Some(&secret))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(intro["cnf"]["jkt"], keygate_server::oauth::dpop::thumbprint(&holder.jwk).unwrap().as_str());
}

#[tokio::test]
async fn bound_refresh_tokens_and_bound_subjects_need_the_key_and_proxies_cannot_be_second_guessed() {
    let app = TestApp::start().await;
    let (id, secret) = client(&app, "jwt").await;
    let holder = Holder::new();
    let t = bound_token(&app, &holder, &id, &secret).await;
    let token = t["access_token"].as_str().unwrap().to_string();
    // Forward-auth with two disagreeing descriptions of the original request: refused.
    let r = app
        .client
        .get(app.url("/v1/auth"))
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", holder.proof(&app, "GET", API, Some(&token)))
        .header("x-forwarded-method", "GET")
        .header("x-original-method", "POST")
        .header("x-original-url", API)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Token exchange cannot strip the binding: without a proof of the subject's key it is refused.
    let (_, c) = app.get(&format!("/v1/clients/{id}")).await;
    let (_, ex) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": c["consumer_id"], "name": "exchanger", "scopes": ["articles:read"],
                   "grant_types": ["urn:ietf:params:oauth:grant-type:token-exchange"]}),
        )
        .await;
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token", token.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
    ];
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(ex["client_id"].as_str().unwrap(), ex["client_secret"].as_str())
        .form(&form)
        .send()
        .await
        .unwrap();
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "invalid_dpop_proof", "{e}");
    let r = app
        .client
        .post(app.url("/oauth2/token"))
        .basic_auth(ex["client_id"].as_str().unwrap(), ex["client_secret"].as_str())
        .header("DPoP", holder.proof(&app, "POST", &app.url("/oauth2/token"), None))
        .form(&form)
        .send()
        .await
        .unwrap();
    let x: Value = r.json().await.unwrap();
    assert_eq!(x["token_type"], "DPoP", "the exchanged token stays bound: {x}");
}
