//! The MCP authorization profile: protected-resource metadata (RFC 9728), resource-bound tokens
//! (RFC 8707) at forward-auth, and dynamic client registration (RFC 7591/7592).

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::oauth::{Client, client, get_token};

const MCP: &str = "https://api.example.com/mcp";
const METADATA: &str = "https://api.example.com/.well-known/oauth-protected-resource/mcp";

async fn auth(app: &TestApp, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = app.client.get(app.url(&format!("/v1/auth{query}")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn challenge(resp: &reqwest::Response) -> String {
    resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn protected_resources_publish_metadata_name_it_in_401s_and_take_only_their_tokens() {
    let app = TestApp::builder()
        .config(|c| {
            c.protected_resources = vec![MCP.into(), "https://other.example.com".into()];
            c.resource_documentation = Some("https://docs.example.com/".into());
        })
        .start()
        .await;
    app.client
        .put(app.url("/v1/scopes/tools:call"))
        .bearer_auth(&app.admin_key)
        .json(&json!({"description": "Call tools"}))
        .send()
        .await
        .unwrap();
    let meta: Value = app
        .client
        .get(app.url("/.well-known/oauth-protected-resource/mcp"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["resource"], MCP);
    assert_eq!(meta["authorization_servers"], json!([app.base]));
    assert_eq!(meta["bearer_methods_supported"], json!(["header"]));
    assert_eq!(meta["resource_documentation"], "https://docs.example.com/");
    assert!(meta["scopes_supported"].as_array().unwrap().contains(&json!("tools:call")), "{meta}");
    let root: Value = app
        .client
        .get(app.url("/.well-known/oauth-protected-resource"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(root["resource"], "https://other.example.com");
    let none = app.client.get(app.url("/.well-known/oauth-protected-resource/nothing")).send().await.unwrap();
    assert_eq!(none.status(), StatusCode::NOT_FOUND);

    // No credential: 401 naming the metadata (found from ?resource= or from the proxy's headers).
    let r = auth(&app, &format!("?resource={MCP}&scope=tools:call"), &[]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let c = challenge(&r);
    assert!(
        c.contains(&format!("resource_metadata=\"{METADATA}\"")) && c.contains("scope=\"tools:call\""),
        "{c}"
    );
    let proxied = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.com"),
        ("x-forwarded-uri", "/mcp/tools/list"),
    ];
    let r = auth(&app, "", &proxied).await;
    assert!(challenge(&r).contains(METADATA), "{}", challenge(&r));
    let elsewhere = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.com"),
        ("x-forwarded-uri", "/mcpx"),
    ];
    assert!(!challenge(&auth(&app, "", &elsewhere).await).contains("resource_metadata"));

    // A token for another resource is refused at this one; one issued for it passes.
    let consumer = app.create_consumer("agents").await;
    let c: Client = client(
        &app,
        json!({"consumer_id": consumer, "name": "svc", "scopes": ["tools:call"], "audiences": [MCP, "https://other.example.com"]}),
    )
    .await;
    let other = get_token(
        &app,
        &c,
        &[("grant_type", "client_credentials"), ("resource", "https://other.example.com")],
    )
    .await;
    let other = other["access_token"].as_str().unwrap();
    let bearer = format!("Bearer {other}");
    let r = auth(&app, &format!("?resource={MCP}"), &[("authorization", bearer.as_str())]).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&r).contains("invalid_token") && challenge(&r).contains(METADATA), "{}", challenge(&r));
    let mine = get_token(&app, &c, &[("grant_type", "client_credentials"), ("resource", MCP)]).await;
    let bearer = format!("Bearer {}", mine["access_token"].as_str().unwrap());
    let mut with_proxy = proxied.to_vec();
    with_proxy.push(("authorization", bearer.as_str()));
    assert_eq!(auth(&app, "?scope=tools:call", &with_proxy).await.status(), StatusCode::OK);
    // Missing scope: 403 insufficient_scope with the scopes needed and the metadata, so agents can step up.
    let r = auth(&app, "?scope=tools:admin", &with_proxy).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let c = challenge(&r);
    assert!(
        c.contains("insufficient_scope") && c.contains("scope=\"tools:admin\"") && c.contains(METADATA),
        "{c}"
    );
}

async fn register(app: &TestApp, body: Value, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = app.client.post(app.url("/oauth2/register")).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn clients_register_themselves_within_the_operators_limits() {
    let app = TestApp::builder()
        .config(|c| {
            c.protected_resources = vec![MCP.into()];
            c.registration.mode = keygate_server::oauth::register::RegistrationMode::Open;
            c.registration.scopes = vec!["tools:call".into(), "tools:read".into()];
            c.registration.per_hour = 10;
        })
        .start()
        .await;
    let meta: Value = app
        .client
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["registration_endpoint"], format!("{}/oauth2/register", app.base));

    let (status, reg) = register(
        &app,
        json!({"client_name": "Claude", "redirect_uris": ["http://127.0.0.1:33418/callback"], "scope": "tools:call",
               "logo_uri": "https://example.com/logo.png", "software_id": "x"}),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    let id = reg["client_id"].as_str().unwrap().to_string();
    assert!(reg.get("client_secret").is_none(), "public by default: {reg}");
    assert_eq!(reg["token_endpoint_auth_method"], "none");
    assert_eq!(reg["scope"], "tools:call");
    let rat = reg["registration_access_token"].as_str().unwrap().to_string();
    assert_eq!(reg["registration_client_uri"], format!("{}/oauth2/register/{id}", app.base));

    // The operator sees it like any other client, under "Registered clients".
    let (_, listed) = app.get(&format!("/v1/clients/{id}")).await;
    assert_eq!(listed["name"], "Claude");
    let (_, owner) = app.get(&format!("/v1/consumers/{}", listed["consumer_id"].as_str().unwrap())).await;
    assert_eq!(owner["name"], "Registered clients");

    // RFC 7592: read, update, delete with the registration access token, and only with it.
    let uri = app.url(&format!("/oauth2/register/{id}"));
    let read: Value = app.client.get(&uri).bearer_auth(&rat).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["client_name"], "Claude");
    for token in ["wrong", app.admin_key.as_str()] {
        let r = app.client.get(&uri).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
    }
    let r = app
        .client
        .put(&uri)
        .bearer_auth(&rat)
        .json(&json!({"client_name": "Claude 2", "redirect_uris": ["https://claude.example/cb"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let updated: Value = r.json().await.unwrap();
    assert_eq!(updated["redirect_uris"], json!(["https://claude.example/cb"]));
    assert_eq!(updated["scope"], "tools:call tools:read", "scope omitted: all registration scopes");

    // Refusals: redirect URIs that are not loopback or https, wildcards, scopes not open to registration.
    for (body, error) in [
        (json!({"redirect_uris": ["http://evil.example.com/cb"]}), "invalid_redirect_uri"),
        (json!({"redirect_uris": ["https://*.example.com/cb"]}), "invalid_redirect_uri"),
        (json!({"redirect_uris": ["com.example.app:/cb"]}), "invalid_redirect_uri"),
        (json!({"redirect_uris": []}), "invalid_redirect_uri"),
        (json!({"redirect_uris": ["https://a.example/cb"], "scope": "admin"}), "invalid_client_metadata"),
        (
            json!({"redirect_uris": ["https://a.example/cb"], "grant_types": ["client_credentials"]}),
            "invalid_client_metadata",
        ),
        (
            json!({"redirect_uris": ["https://a.example/cb"], "token_endpoint_auth_method": "private_key_jwt"}),
            "invalid_client_metadata",
        ),
        (json!(["not an object"]), "invalid_client_metadata"),
    ] {
        let (status, e) = register(&app, body.clone(), None).await;
        assert_eq!((status, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some(error)), "{body}: {e}");
    }
    // A flood from one address is cut off: 10 attempts an hour here (9 made so far, refused ones count).
    let (status, _) = register(&app, json!({"redirect_uris": ["https://a.example/cb"]}), None).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, e) = register(&app, json!({"redirect_uris": ["https://a.example/cb"]}), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{e}");
    assert_eq!(e["error"], "slow_down");

    // Deleting the registration removes the client.
    let r = app.client.delete(&uri).bearer_auth(&rat).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.get(&format!("/v1/clients/{id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        app.client.get(&uri).bearer_auth(&rat).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn registration_is_off_by_default_and_can_require_an_initial_token() {
    let app = TestApp::start().await;
    let (status, _) = register(&app, json!({"redirect_uris": ["https://a.example/cb"]}), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let meta: Value = app
        .client
        .get(app.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(meta.get("registration_endpoint").is_none());

    let app = TestApp::builder()
        .config(|c| {
            c.registration.mode = keygate_server::oauth::register::RegistrationMode::Token;
            c.registration.initial_token = Some("an initial access token 0123456789".into());
        })
        .start()
        .await;
    let body = json!({"redirect_uris": ["https://a.example/cb"], "token_endpoint_auth_method": "client_secret_basic"});
    let (status, e) = register(&app, body.clone(), None).await;
    assert_eq!((status, e["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_token")));
    let (status, _) = register(&app, body.clone(), Some("an initial access token 01234567890")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, reg) = register(&app, body, Some("an initial access token 0123456789")).await;
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    assert!(
        reg["client_secret"].as_str().unwrap().starts_with("kgcs_"),
        "a confidential client gets a secret"
    );
    assert_eq!(reg["client_secret_expires_at"], 0);
}
