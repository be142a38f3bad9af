//! The device authorization grant (RFC 8628): a real client (the `oauth2` crate) polls while a user
//! enters the code in a browser, logs in and approves; and every error the RFC names.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::authcode::{Browser, parse_form};
use crate::helpers::TestApp;

const PASSWORD: &str = "correct horse battery";

struct Setup {
    app: TestApp,
    client_id: String,
}

async fn setup() -> Setup {
    let app = TestApp::builder()
        .config(|c| c.device_poll_interval = std::time::Duration::from_secs(1))
        .start()
        .await;
    let consumer = app.create_consumer("tv").await;
    let (s, c) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "Living Room TV", "public": true, "scopes": ["videos:watch"],
                   "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    app.post("/v1/users", json!({"username": "dana", "password": PASSWORD})).await;
    Setup { client_id: c["client_id"].as_str().unwrap().into(), app }
}

async fn start(s: &Setup) -> Value {
    let r = s
        .app
        .client
        .post(s.app.url("/oauth2/device_authorization"))
        .form(&[("client_id", s.client_id.as_str()), ("scope", "videos:watch")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().await.unwrap()
}

async fn poll(s: &Setup, device_code: &str) -> (StatusCode, Value) {
    let r = s
        .app
        .client
        .post(s.app.url("/oauth2/token"))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("client_id", s.client_id.as_str()),
            ("device_code", device_code),
        ])
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

/// The user's side: enter the code, log in, answer.
async fn answer(s: &Setup, b: &mut Browser, user_code: &str, decision: &str) -> (StatusCode, String) {
    let (status, _, html) = b.get(&s.app.url("/oauth2/device")).await;
    assert_eq!(status, StatusCode::OK);
    let entry = parse_form(&html).set("user_code", &user_code.to_lowercase());
    let (status, _, html) = b.submit(&s.app.base, &entry, &[]).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let html = if html.contains("name=\"password\"") {
        let login = parse_form(&html).set("username", "dana").set("password", PASSWORD);
        b.submit(&s.app.base, &login, &[]).await.2
    } else {
        html
    };
    assert!(html.contains("Living Room TV") && html.contains("videos:watch"), "consent: {html}");
    let (status, _, html) = b.submit(&s.app.base, &parse_form(&html), &[("decision", decision)]).await;
    (status, html)
}

#[tokio::test]
async fn the_oauth2_crate_polls_while_the_user_approves() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        ClientId, DeviceAuthorizationUrl, Scope, StandardDeviceAuthorizationResponse, TokenResponse, TokenUrl,
    };
    let s = setup().await;
    let http = reqwest::Client::new();
    let send = |req: oauth2::HttpRequest| crate::helpers::oauth2_send(http.clone(), req);
    let oc = BasicClient::new(ClientId::new(s.client_id.clone()))
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(s.app.url("/oauth2/device_authorization")).unwrap(),
        )
        .set_token_uri(TokenUrl::new(s.app.url("/oauth2/token")).unwrap());
    let details: StandardDeviceAuthorizationResponse = oc
        .exchange_device_code()
        .add_scope(Scope::new("videos:watch".into()))
        .request_async(&send)
        .await
        .unwrap();
    let user_code = details.user_code().secret().clone();
    assert!(
        user_code.len() == 9
            && user_code.chars().filter(|c| *c != '-').all(|c| "BCDFGHJKLMNPQRSTVWXZ".contains(c)),
        "{user_code}"
    );
    assert_eq!(details.verification_uri().as_str(), s.app.url("/oauth2/device"));
    let complete = details.verification_uri_complete().unwrap().secret().clone();
    assert!(complete.contains(&user_code.replace('-', "")), "{complete}");
    // The device polls (in the background) while the user answers in a browser.
    let poller = {
        let (oc, details, http) = (oc.clone(), details.clone(), http.clone());
        tokio::spawn(async move {
            let send = |req: oauth2::HttpRequest| crate::helpers::oauth2_send(http.clone(), req);
            oc.exchange_device_access_token(&details).request_async(&send, tokio::time::sleep, None).await
        })
    };
    let mut b = Browser::new();
    let (status, html) = answer(&s, &mut b, &user_code, "allow").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Device connected"), "{html}");
    let token = poller.await.unwrap().unwrap();
    let d = s.app.verify(token.access_token().secret(), &["videos:watch"]).await;
    assert_eq!(d["code"], "VALID", "{d}");
    assert_eq!(d["client_id"], s.client_id);
    assert!(d["user_id"].as_str().unwrap().starts_with("usr_"));
    assert!(token.refresh_token().unwrap().secret().starts_with("kgrt_"));
    // The device code is spent.
    let (status, e) = poll(&s, "kgdc_unknownbutwellformedcodeAAAAAAAAAAAAAAAAAAAAAAAAA").await;
    assert_eq!((status, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
}

#[tokio::test]
async fn device_polling_errors_follow_rfc_8628() {
    let s = setup().await;
    let started = start(&s).await;
    let code = started["device_code"].as_str().unwrap().to_string();
    assert_eq!(started["interval"], 1);
    // Pending, then too fast.
    let (status, e) = poll(&s, &code).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("authorization_pending")),
        "{e}"
    );
    let (status, e) = poll(&s, &code).await;
    assert_eq!((status, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("slow_down")), "{e}");
    // Denied.
    let mut b = Browser::new();
    let (status, html) = answer(&s, &mut b, started["user_code"].as_str().unwrap(), "deny").await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("Device not connected"), "{html}");
    s.app.clock.advance(10_000);
    let (_, e) = poll(&s, &code).await;
    assert_eq!(e["error"], "access_denied", "{e}");
    // Expired.
    let other = start(&s).await;
    s.app.clock.advance(601_000);
    let (_, e) = poll(&s, other["device_code"].as_str().unwrap()).await;
    assert_eq!(e["error"], "expired_token", "{e}");
    // A client without the grant.
    let consumer = s.app.create_consumer("other").await;
    let (_, c) = s
        .app
        .post("/v1/clients", json!({"consumer_id": consumer, "name": "web", "public": true, "grant_types": ["authorization_code"],
            "redirect_uris": ["https://x.example/cb"]}))
        .await;
    let r = s
        .app
        .client
        .post(s.app.url("/oauth2/device_authorization"))
        .form(&[("client_id", c["client_id"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "unauthorized_client");
    let (_, d) = s.app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(d["device_authorization_endpoint"], s.app.url("/oauth2/device_authorization"));
}

#[tokio::test]
async fn wrong_user_codes_are_throttled() {
    let s = setup_with_budget().await;
    let mut b = Browser::new();
    let mut last = StatusCode::OK;
    for _ in 0..6 {
        let (_, _, html) = b.get(&s.app.url("/oauth2/device?user_code=BCDF-GHJK")).await;
        assert!(html.contains("BCDF-GHJK"), "prefilled from verification_uri_complete");
        let (status, _, _) = b.submit(&s.app.base, &parse_form(&html), &[]).await;
        last = status;
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
}

async fn setup_with_budget() -> Setup {
    let app = TestApp::builder().failures_per_minute(3).start().await;
    let consumer = app.create_consumer("tv").await;
    let (_, c) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "TV", "public": true, "scopes": ["videos:watch"],
                   "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"]}),
        )
        .await;
    Setup { client_id: c["client_id"].as_str().unwrap().into(), app }
}

#[tokio::test]
async fn odd_codes_are_refused_cleanly_and_revoke_tokens_reaches_approved_devices() {
    let s = setup().await;
    let mut b = Browser::new();
    let (_, _, html) = b.get(&s.app.url("/oauth2/device?user_code=%E2%82%AC%E2%82%ACAB")).await;
    for odd in ["€€AB", "BCDF-GHJ€", "bcdfghjkl", ""] {
        let (status, _, _) = b.submit(&s.app.base, &parse_form(&html).set("user_code", odd), &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{odd:?}");
    }
    let started = start(&s).await;
    let (status, _) = answer(&s, &mut Browser::new(), started["user_code"].as_str().unwrap(), "allow").await;
    assert_eq!(status, StatusCode::OK);
    s.app.clock.advance(1);
    s.app.post(&format!("/v1/clients/{}/revoke-tokens", s.client_id), json!({})).await;
    s.app.clock.advance(2000);
    let (_, e) = poll(&s, started["device_code"].as_str().unwrap()).await;
    assert_eq!(e["error"], "invalid_grant", "{e}");
}
