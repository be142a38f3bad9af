//! Personal access tokens: a user's own scoped tokens, through the same verify, forward-auth,
//! introspection and revocation as every other credential.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn user(app: &TestApp, body: Value) -> String {
    let (s, u) = app.post("/v1/users", body).await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    u["id"].as_str().unwrap().to_string()
}

async fn create(app: &TestApp, user: &str, body: Value) -> (StatusCode, Value) {
    app.post(&format!("/v1/users/{user}/tokens"), body).await
}

#[tokio::test]
async fn personal_tokens_verify_rotate_revoke_and_stop_with_their_user() {
    let app =
        TestApp::builder().config(|c| c.flush_interval = std::time::Duration::from_millis(20)).start().await;
    let ann = user(&app, json!({"username": "ann", "allowed_scopes": ["repo:read", "repo:write"]})).await;
    // The rules: an expiry within the maximum, scopes the user may grant, at least one scope.
    for (body, field) in [
        (json!({"name": "cli", "scopes": ["repo:read"]}), "expires_at"),
        (json!({"name": "cli", "scopes": ["repo:read"], "expires_at": "never"}), "expires_at"),
        (json!({"name": "cli", "scopes": ["repo:read"], "expires_in_seconds": 91 * 86_400}), "expires_at"),
        (json!({"name": "cli", "scopes": ["admin:all"], "expires_in_seconds": 3600}), "scopes"),
        (json!({"name": "cli", "scopes": [], "expires_in_seconds": 3600}), "scopes"),
    ] {
        let (s, e) = create(&app, &ann, body.clone()).await;
        assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(field)), "{body}: {e}");
    }
    let (s, t) = create(
        &app,
        &ann,
        json!({"name": "laptop", "scopes": ["repo:read"], "expires_in_seconds": 30 * 86_400}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let token = t["token"].as_str().unwrap().to_string();
    let id = t["id"].as_str().unwrap().to_string();
    assert!(token.starts_with("kgpat_") && t["start"].as_str().is_some_and(|s| token.starts_with(s)));
    assert!(keygate_core::credential::parse(&token).is_ok(), "Keygate's format, with its checksum");

    // Verify: valid, the user's, its scopes only.
    let d = app.verify(&token, &["repo:read"]).await;
    assert_eq!(
        (d["code"].as_str(), d["kind"].as_str()),
        (Some("VALID"), Some("personal_access_token")),
        "{d}"
    );
    assert_eq!(d["user_id"], ann);
    assert!(d.get("client_id").is_none(), "{d}");
    assert_eq!(app.verify_code(&token, &["repo:write"]).await, "INSUFFICIENT_SCOPE");
    let mut altered = token.clone();
    altered.pop();
    altered.push(if token.ends_with('a') { 'b' } else { 'a' });
    assert_eq!(app.verify_code(&altered, &[]).await, "MALFORMED", "the checksum catches a typo");
    // Forward-auth and introspection (with an admin credential) know it too.
    let fa = app.client.get(app.url("/v1/auth")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(fa.status(), StatusCode::OK);
    assert_eq!(fa.headers()["x-keygate-kind"], "personal_access_token");
    assert_eq!(fa.headers()["x-keygate-user-id"], ann.as_str());
    let intro: Value = app
        .client
        .post(app.url("/oauth2/introspect"))
        .bearer_auth(&app.admin_key)
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (intro["active"].as_bool(), intro["sub"].as_str()),
        (Some(true), Some(ann.as_str())),
        "{intro}"
    );

    // Last use, with the address, shows in the list; never the token.
    let listed = app.verify(&token, &[]).await;
    assert_eq!(listed["code"], "VALID");
    let (_, list) = app.get(&format!("/v1/users/{ann}/tokens")).await;
    let item = &list["items"][0];
    assert!(item["last_used_at"].is_string() && item["last_used_ip"] == "127.0.0.1", "{list}");
    assert!(!list.to_string().contains(&token[10..]));

    // Expiring soon: listed within 31 days, not within 7.
    let (_, soon) = app.get("/v1/tokens/expiring?within_days=31").await;
    assert_eq!(soon["items"][0]["id"], id.as_str());
    let (_, later) = app.get("/v1/tokens/expiring").await;
    assert_eq!(later["items"].as_array().unwrap().len(), 0);

    // Rotate: the old secret stops at once, the new one works.
    let (s, r) = app.post(&format!("/v1/users/{ann}/tokens/{id}/rotate"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let rotated = r["token"].as_str().unwrap().to_string();
    assert_eq!(app.verify_code(&token, &[]).await, "NOT_FOUND");
    assert_eq!(app.verify_code(&rotated, &[]).await, "VALID");

    // The user disabled: DISABLED; enabled: VALID again.
    app.post(&format!("/v1/users/{ann}/disable"), json!({})).await;
    assert_eq!(app.verify_code(&rotated, &[]).await, "DISABLED");
    app.post(&format!("/v1/users/{ann}/enable"), json!({})).await;
    assert_eq!(app.verify_code(&rotated, &[]).await, "VALID");

    // Expired by the clock.
    app.clock.advance(31 * 86_400_000);
    assert_eq!(app.verify_code(&rotated, &[]).await, "EXPIRED");
    app.clock.advance(-31 * 86_400_000);

    // Revoked through the admin API; and another through RFC 7009 revocation by an admin.
    let (s, v) = app.call(Method::DELETE, &format!("/v1/users/{ann}/tokens/{id}"), None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("revoked")));
    assert_eq!(app.verify_code(&rotated, &[]).await, "REVOKED");
    let (_, t2) =
        create(&app, &ann, json!({"name": "ci", "scopes": ["repo:write"], "expires_in_seconds": 3600})).await;
    let t2 = t2["token"].as_str().unwrap().to_string();
    let r = app
        .client
        .post(app.url("/oauth2/revoke"))
        .bearer_auth(&app.admin_key)
        .form(&[("token", t2.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.verify_code(&t2, &[]).await, "REVOKED");

    // Deleting the user removes their tokens.
    let (_, t3) =
        create(&app, &ann, json!({"name": "x", "scopes": ["repo:read"], "expires_in_seconds": 3600})).await;
    let t3 = t3["token"].as_str().unwrap().to_string();
    app.call(Method::DELETE, &format!("/v1/users/{ann}"), None).await;
    assert_ne!(app.verify_code(&t3, &[]).await, "VALID");
    let (_, audit) = app.get("/v1/audit?action=pat.revoke").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 2, "{audit}");
}

#[tokio::test]
async fn tokens_that_never_expire_only_where_the_operator_allows() {
    let app = TestApp::builder().config(|c| c.pat_allow_no_expiry = true).start().await;
    let bo = user(&app, json!({"username": "bo"})).await;
    let (s, t) =
        create(&app, &bo, json!({"name": "forever", "scopes": ["x:y"], "expires_at": "never"})).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert!(t["expires_at"].is_null());
    assert_eq!(app.verify_code(t["token"].as_str().unwrap(), &["x:y"]).await, "VALID");
}
