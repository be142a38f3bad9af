//! The developer portal over HTTP: sign-up with a verified address (a real SMTP conversation with a
//! test mail server), applications on a plan, keys and clients, usage export, password reset,
//! invitations, a second developer who can reach nothing of the first one's, the operator's suspension,
//! and plans through the admin API. The browser walk (Chromium, axe) is the CLI test
//! `the_portal_in_a_real_browser`.

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::authcode::Browser;
use crate::helpers::{MailSink, TestApp};

fn location(h: &HeaderMap) -> String {
    h.get("location").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

fn csrf(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).expect("a CSRF field") + r#"name="csrf" value=""#.len();
    html[at..at + html[at..].find('"').unwrap()].to_string()
}

/// The value of the first `data-secret` input of a page (a secret shown once).
fn revealed(html: &str) -> String {
    let at = html.find("data-secret").expect("a revealed secret");
    let start = html[..at].rfind("value=\"").unwrap() + 7;
    html[start..start + html[start..].find('"').unwrap()].to_string()
}

const PASSWORD: &str = "a long developer passphrase";

async fn portal_app(mail: &MailSink, signup: keygate_server::SignupMode) -> TestApp {
    let url = mail.url.clone();
    TestApp::builder()
        .config(move |c| {
            c.portal.signup = signup;
            c.portal.smtp_url = Some(keygate_server::DatabaseUrl::parse_smtp(&url).unwrap());
            c.portal.mail_from = "Example API <api@example.com>".into();
        })
        .start()
        .await
}

/// A plan developers can choose: 100/min, 50 uses refilled daily, read/write, keys live 30 days.
async fn free_plan(app: &TestApp) -> String {
    let (status, plan) = app
        .post(
            "/v1/plans",
            json!({"name": "Free", "description": "For trying it out", "is_default": true,
                "rate_limits": [{"name": "minute", "limit": 100, "window_seconds": 60}],
                "quota": {"remaining": 50, "refill": {"amount": 50, "schedule": "daily"}},
                "allowed_scopes": ["read", "write"], "key_lifetime_seconds": 30 * 86400}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    assert_eq!(plan["self_service"], true, "the default plan is offered");
    plan["id"].as_str().unwrap().to_string()
}

/// Signs a new developer up; returns their user id.
async fn sign_up(app: &TestApp, b: &mut Browser, username: &str, email: &str) -> String {
    let (status, _, page) = b.get(&app.url("/portal/signup")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let fields = [
        ("csrf", csrf(&page)),
        ("username", username.to_string()),
        ("email", email.to_string()),
        ("password", PASSWORD.to_string()),
        ("password2", PASSWORD.to_string()),
    ];
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, h, page) = b.post(&app.url("/portal/signup"), &fields, &[]).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/portal/"), "{page}");
    let (_, user) = app.get(&format!("/v1/users/username:{username}")).await;
    user["id"].as_str().unwrap().to_string()
}

/// Posts a portal form from `page_path` (its CSRF token) to `action`.
async fn post_form(
    app: &TestApp,
    b: &mut Browser,
    page_path: &str,
    action: &str,
    fields: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let (_, _, page) = b.get(&app.url(page_path)).await;
    let token = csrf(&page);
    let mut all = vec![("csrf", token.as_str())];
    all.extend_from_slice(fields);
    b.post(&app.url(action), &all, &[]).await
}

#[tokio::test]
async fn developers_sign_up_make_applications_and_reach_only_their_own() {
    let mail = MailSink::start().await;
    let app = portal_app(&mail, keygate_server::SignupMode::Open).await;
    let plan_id = free_plan(&app).await;

    // Sign up: signed in at once, but applications wait for the address to be confirmed.
    let mut alice = Browser::new();
    let alice_id = sign_up(&app, &mut alice, "alice", "alice@example.com").await;
    let (_, _, home) = alice.get(&app.url("/portal/")).await;
    assert!(home.contains("Confirm your email address"), "{home}");
    let (status, h, _) =
        post_form(&app, &mut alice, "/portal/", "/portal/apps", &[("name", "Too early")]).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/portal/"));
    let (_, mine) = app.get(&format!("/v1/consumers?owner_id={alice_id}")).await;
    assert_eq!(mine["items"], json!([]), "nothing is made before the address is confirmed");

    // The link came through SMTP; opening it confirms the address.
    let link = mail.link("alice@example.com", "/portal/verify?token=").await;
    let (status, h, _) = alice.get(&app.url(&link)).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/portal/?why=verified"));
    let (_, user) = app.get(&format!("/v1/users/{alice_id}")).await;
    assert!(user["email_verified_at"].is_string(), "{user}");
    assert_eq!(user["roles"], json!(["developer"]));
    assert_eq!(user["allowed_scopes"], json!([]), "a developer account grants nothing through OAuth consent");
    let (status, _, page) = alice.get(&app.url(&link.replace("token=", "token=x"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a forged link: {page}");

    // An application on the default plan, owned by her; a key within the plan.
    let (status, h, _) =
        post_form(&app, &mut alice, "/portal/", "/portal/apps", &[("name", "Weather bot")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let app_path = location(&h);
    assert!(app_path.starts_with("/portal/apps/cons_"), "{app_path}");
    let app_id = app_path.trim_start_matches("/portal/apps/").to_string();
    let (_, consumer) = app.get(&format!("/v1/consumers/{app_id}")).await;
    assert_eq!(
        (consumer["owner_id"].as_str(), consumer["plan_id"].as_str()),
        (Some(alice_id.as_str()), Some(plan_id.as_str()))
    );
    assert_eq!(consumer["rate_limits"][0]["limit"], 100, "the plan's limits: {consumer}");

    let (status, h, _) = post_form(
        &app,
        &mut alice,
        &app_path,
        &format!("{app_path}/keys"),
        &[("name", "prod"), ("scopes", "read")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let key_page = location(&h);
    assert!(key_page.starts_with("/portal/keys/key_") && key_page.contains("?reveal="), "{key_page}");
    let key_id = key_page.trim_start_matches("/portal/keys/").split('?').next().unwrap().to_string();
    let (_, _, page) = alice.get(&app.url(&key_page)).await;
    let secret = revealed(&page);
    assert!(secret.starts_with("kg_live_"), "{secret}");
    let (_, _, again) = alice.get(&app.url(&key_page)).await;
    assert!(!again.contains(&secret), "shown once");
    let (_, key) = app.get(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(key["scopes"], json!(["read"]));
    assert_eq!(key["quota"]["remaining"], 50, "the plan's quota: {key}");
    assert!(key["quota_next_refill_at"].is_string(), "{key}");
    assert!(key["expires_at"].is_string(), "the plan's lifetime cap: {key}");
    for _ in 0..3 {
        assert_eq!(app.verify_code(&secret, &["read"]).await, "VALID");
    }
    let (_, _, page) = alice.get(&app.url(&format!("/portal/keys/{key_id}"))).await;
    assert!(page.contains("<span data-quota-remaining>47</span>"), "{page}");

    // Beyond the plan: refused with the plan's reason, nothing made.
    let (_, h, _) = post_form(
        &app,
        &mut alice,
        &app_path,
        &format!("{app_path}/keys"),
        &[("name", "wide"), ("scopes", "admin")],
    )
    .await;
    let (_, _, page) = alice.get(&app.url(&location(&h))).await;
    assert!(page.contains("is not among the scopes"), "{page}");
    let (_, keys) = app.get(&format!("/v1/keys?consumer_id={app_id}")).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 1);

    // A client-credentials client, its secret shown once.
    let (status, h, _) = post_form(
        &app,
        &mut alice,
        &app_path,
        &format!("{app_path}/clients"),
        &[("name", "backend"), ("scopes", "write")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, page) = alice.get(&app.url(&location(&h))).await;
    assert!(revealed(&page).starts_with("kgcs_"), "{page}");
    let (_, clients) = app.get(&format!("/v1/clients?q={app_id}")).await;
    let client_id = clients["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer_id"] == app_id.as_str())
        .unwrap()["client_id"]
        .as_str()
        .unwrap()
        .to_string();

    // A month of usage as CSV.
    app.state.flush().await.unwrap();
    let month = &keygate_server::time::rfc3339(app.state.now())[..7];
    let (status, h, csv) = alice.get(&app.url(&format!("{app_path}/usage.csv?month={month}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert!(csv.starts_with("date,key_id,key_name,outcome,count\n"), "{csv}");
    assert!(csv.contains(&format!(",{key_id},prod,VALID,3")), "{csv}");

    // Audited with the developer as the actor.
    let (_, audit) = app.get(&format!("/v1/audit?target_id={key_id}")).await;
    assert_eq!(audit["items"][0]["action"], "key.create");
    assert_eq!(audit["items"][0]["actor"], alice_id.as_str());

    // Her own sign-up is audited with her as the actor.
    let (_, audit) = app.get(&format!("/v1/audit?target_id={alice_id}")).await;
    let created = audit["items"].as_array().unwrap().iter().find(|a| a["action"] == "user.create").unwrap();
    assert_eq!(created["actor"], alice_id.as_str());

    // A personal access token an operator made for her (after letting her account hold `read`): listed on
    // her tokens page.
    let (status, _) = app.patch(&format!("/v1/users/{alice_id}"), json!({"allowed_scopes": ["read"]})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, pat) = app
        .post(
            &format!("/v1/users/{alice_id}/tokens"),
            json!({"name": "ci", "scopes": ["read"], "expires_in_seconds": 86400}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pat}");
    let pat_id = pat["id"].as_str().unwrap().to_string();
    let (_, _, page) = alice.get(&app.url("/portal/tokens")).await;
    assert!(page.contains(&format!("/portal/tokens/{pat_id}/revoke")), "{page}");

    // A second developer reaches nothing of hers, through any page or form: 404, and nothing changes.
    let mut bob = Browser::new();
    let bob_id = sign_up(&app, &mut bob, "bob", "bob@example.com").await;
    let link = mail.link("bob@example.com", "/portal/verify?token=").await;
    bob.get(&app.url(&link)).await;
    for path in
        [app_path.clone(), format!("/portal/keys/{key_id}"), format!("{app_path}/usage.csv?month={month}")]
    {
        let (status, _, page) = bob.get(&app.url(&path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {page}");
        assert!(!page.contains("Weather bot"), "{path}");
    }
    for (action, fields) in [
        (format!("/portal/keys/{key_id}/revoke"), vec![("confirm", key_id.as_str())]),
        (format!("/portal/keys/{key_id}/rotate"), vec![]),
        (format!("/portal/keys/{key_id}/rename"), vec![("name", "mine now")]),
        (format!("{app_path}/keys"), vec![("name", "sneaky"), ("scopes", "read")]),
        (format!("{app_path}/clients"), vec![("name", "sneaky")]),
        (format!("{app_path}/rename"), vec![("name", "mine now")]),
        (format!("/portal/clients/{client_id}/rotate"), vec![]),
        (format!("/portal/clients/{client_id}/delete"), vec![("confirm", client_id.as_str())]),
        (format!("/portal/tokens/{pat_id}/revoke"), vec![]),
    ] {
        let (status, _, _) = post_form(&app, &mut bob, "/portal/", &action, &fields).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{action}");
    }
    assert_eq!(app.verify_code(&secret, &["read"]).await, "VALID", "her key is untouched");
    let (_, key) = app.get(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(key["name"], "prod");
    let (_, keys) = app.get(&format!("/v1/keys?consumer_id={app_id}")).await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 1);
    let (status, _) = app.get(&format!("/v1/clients/{client_id}")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, theirs) = app.get(&format!("/v1/consumers?owner_id={bob_id}")).await;
    assert_eq!(theirs["items"], json!([]));
    let (_, pats) = app.get(&format!("/v1/users/{alice_id}/tokens")).await;
    assert!(pats["items"][0]["revoked_at"].is_null(), "her token is untouched: {pats}");
    // She revokes it herself.
    let (status, _, _) =
        post_form(&app, &mut alice, "/portal/tokens", &format!("/portal/tokens/{pat_id}/revoke"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, pats) = app.get(&format!("/v1/users/{alice_id}/tokens")).await;
    assert!(pats["items"][0]["revoked_at"].is_string(), "{pats}");

    // A form without the session's token, or from another site: refused.
    let (status, _, _) = alice.post(&app.url("/portal/apps"), &[("name", "forged")], &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, _, page) = alice.get(&app.url("/portal/")).await;
    let token = csrf(&page);
    let (status, _, _) = alice
        .post(
            &app.url("/portal/apps"),
            &[("name", "forged"), ("csrf", &token)],
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A portal session does not open the console.
    let (status, h, _) = alice.get(&app.url("/console/")).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/login"));

    // Rotate with an overlap: both secrets work; revoke: neither does.
    let (status, h, _) = post_form(
        &app,
        &mut alice,
        &format!("/portal/keys/{key_id}"),
        &format!("/portal/keys/{key_id}/rotate"),
        &[("overlap_seconds", "3600")],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, page) = alice.get(&app.url(&location(&h))).await;
    let rotated = revealed(&page);
    assert_ne!(rotated, secret);
    assert_eq!(app.verify_code(&rotated, &["read"]).await, "VALID");
    assert_eq!(app.verify_code(&secret, &["read"]).await, "VALID", "the overlap");

    // The operator suspends her: her keys and clients stop at once, her session ends.
    let (status, _) = app.post(&format!("/v1/users/{alice_id}/disable"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.verify_code(&rotated, &["read"]).await, "DISABLED");
    let (_, consumer) = app.get(&format!("/v1/consumers/{app_id}")).await;
    assert_eq!(consumer["owner_suspended"], true);
    let (status, h, _) = alice.get(&app.url("/portal/")).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/portal/login?why=revoked"));
    app.post(&format!("/v1/users/{alice_id}/enable"), json!({})).await;
    assert_eq!(app.verify_code(&rotated, &["read"]).await, "VALID", "enabled again");

    // Revoke, confirmed by typing the id.
    let mut alice = Browser::new();
    let (_, _, page) = alice.get(&app.url("/portal/login")).await;
    let (status, _, _) = alice
        .post(
            &app.url("/portal/login"),
            &[("csrf", &csrf(&page)), ("username", "alice"), ("password", PASSWORD)],
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = post_form(
        &app,
        &mut alice,
        &format!("/portal/keys/{key_id}"),
        &format!("/portal/keys/{key_id}/revoke"),
        &[("confirm", &key_id)],
    )
    .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(app.verify_code(&rotated, &["read"]).await, "REVOKED");
}

#[tokio::test]
async fn invitations_password_reset_and_closed_sign_up() {
    let mail = MailSink::start().await;
    let app = portal_app(&mail, keygate_server::SignupMode::Invite).await;
    let mut b = Browser::new();
    let (status, _, page) = b.get(&app.url("/portal/signup")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");

    // An operator invites carol; the link admits her address only, once.
    let (status, inv) =
        app.post("/v1/portal/invitations", json!({"email": "carol@example.com", "send": true})).await;
    assert_eq!(status, StatusCode::CREATED, "{inv}");
    assert_eq!(inv["sent"], true);
    let link = mail.link("carol@example.com", "/portal/signup?token=").await;
    assert!(inv["url"].as_str().unwrap().ends_with(&link));
    let (status, _, page) = b.get(&app.url(&link)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"value="carol@example.com" readonly"#), "{page}");
    let token = link.split("token=").nth(1).unwrap().to_string();
    let fields = |csrf: &str| {
        vec![
            ("csrf", csrf.to_string()),
            ("token", token.clone()),
            ("username", "carol".to_string()),
            ("email", "someone-else@example.com".to_string()),
            ("password", PASSWORD.to_string()),
            ("password2", PASSWORD.to_string()),
        ]
    };
    let f = fields(&csrf(&page));
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, _) = b.post(&app.url("/portal/signup"), &f, &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, carol) = app.get("/v1/users/username:carol").await;
    assert_eq!(carol["email"], "carol@example.com", "the invited address, not the posted one");
    assert!(carol["email_verified_at"].is_string(), "an invitation's delivery proves the address");
    let mut again = Browser::new();
    let (_, _, page) = again.get(&app.url(&link)).await;
    let f = fields(&csrf(&page));
    let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, page) = again.post(&app.url("/portal/signup"), &f, &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "one account per invitation: {page}");
    let (_, audit) = app.get("/v1/audit?action=portal.invite").await;
    assert_eq!(audit["items"][0]["target_id"], "carol@example.com");
    assert!(!audit.to_string().contains(&token), "the link itself is not in the audit log");

    // Password reset: the same answer for an unknown address; the link works once.
    let (_, _, page) = b.get(&app.url("/portal/reset")).await;
    let (status, _, page) = b
        .post(&app.url("/portal/reset"), &[("csrf", &csrf(&page)), ("email", "nobody@example.com")], &[])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("If an account has this address"));
    let (_, _, page) = b.get(&app.url("/portal/reset")).await;
    b.post(&app.url("/portal/reset"), &[("csrf", &csrf(&page)), ("email", "CAROL@example.com")], &[]).await;
    let link = mail.link("carol@example.com", "/portal/reset/confirm?token=").await;
    let (status, _, page) = b.get(&app.url(&link)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let token = link.split("token=").nth(1).unwrap();
    let new_password = "another long passphrase";
    let (status, h, _) = b
        .post(
            &app.url("/portal/reset/confirm"),
            &[
                ("csrf", &csrf(&page)),
                ("token", token),
                ("password", new_password),
                ("password2", new_password),
            ],
            &[],
        )
        .await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/portal/login?why=reset"));
    let (status, _, _) = b.get(&app.url(&link)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a reset link works once");
    let sign_in = |password: &'static str| {
        let url = app.url("/portal/login");
        async move {
            let mut b = Browser::new();
            let (_, _, page) = b.get(&url).await;
            let (status, _, _) = b
                .post(&url, &[("csrf", &csrf(&page)), ("username", "carol"), ("password", password)], &[])
                .await;
            status
        }
    };
    assert_eq!(sign_in(PASSWORD).await, StatusCode::UNAUTHORIZED);
    assert_eq!(sign_in(new_password).await, StatusCode::SEE_OTHER);
    let (_, audit) = app.get(&format!("/v1/audit?target_id={}", carol["id"].as_str().unwrap())).await;
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"user.reset_password"), "{actions:?}");

    // An operator's account is not recovered through the portal, even with the developer role too.
    let (status, _) = app
        .post("/v1/users", json!({"username": "opdev", "email": "ops@example.com", "password": PASSWORD, "roles": ["admin", "developer"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, _, page) = b.get(&app.url("/portal/reset")).await;
    let (status, _, _) =
        b.post(&app.url("/portal/reset"), &[("csrf", &csrf(&page)), ("email", "ops@example.com")], &[]).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(mail.to("ops@example.com").is_empty(), "no reset mail for an operator");

    // Closed: no sign-up at all; only accounts with the developer role sign in (not an operator's).
    let closed = TestApp::start().await;
    let (status, _, page) = Browser::new().get(&closed.url("/portal/signup")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("Sign-up is closed"));
    for (name, roles) in [("op", json!(["admin"])), ("dana", json!(["developer"]))] {
        let (status, _) =
            closed.post("/v1/users", json!({"username": name, "password": PASSWORD, "roles": roles})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let sign_in_closed = |name: &'static str| {
        let url = closed.url("/portal/login");
        async move {
            let mut b = Browser::new();
            let (_, _, page) = b.get(&url).await;
            b.post(&url, &[("csrf", &csrf(&page)), ("username", name), ("password", PASSWORD)], &[]).await.0
        }
    };
    assert_eq!(
        sign_in_closed("op").await,
        StatusCode::FORBIDDEN,
        "an operator's account is not a developer's"
    );
    assert_eq!(sign_in_closed("dana").await, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn plans_bound_keys_clients_and_limits_for_every_caller() {
    let app = TestApp::start().await;
    let (status, plan) = app
        .post(
            "/v1/plans",
            json!({"name": "Tight", "rate_limits": [{"name": "m", "limit": 1, "window_seconds": 60}],
                "allowed_scopes": ["read"], "key_lifetime_seconds": 86400}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{plan}");
    let plan_id = plan["id"].as_str().unwrap();
    let (status, dup) = app.post("/v1/plans", json!({"name": "tight"})).await;
    assert_eq!((status, dup["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")));
    let (status, bad) = app.post("/v1/plans", json!({"name": "x", "key_lifetime_seconds": 1})).await;
    assert_eq!(
        (status, bad["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("key_lifetime_seconds"))
    );

    // The admin API keeps to the plan too.
    let (status, c) = app.post("/v1/consumers", json!({"name": "on plan", "plan_id": plan_id})).await;
    assert_eq!(status, StatusCode::CREATED);
    let cons = c["id"].as_str().unwrap();
    let (status, e) =
        app.post("/v1/keys", json!({"consumer_id": cons, "name": "k", "scopes": ["write"]})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("scopes")), "{e}");
    let far = crate::helpers::rfc3339_in(10 * 86_400_000);
    let (status, e) =
        app.post("/v1/keys", json!({"consumer_id": cons, "name": "k", "expires_at": far})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("expires_at")), "{e}");
    let (key_id, secret) =
        app.create_key_with(json!({"consumer_id": cons, "name": "k", "scopes": ["read"]})).await;
    let (_, key) = app.get(&format!("/v1/keys/{key_id}")).await;
    assert!(key["expires_at"].is_string(), "capped by the plan: {key}");
    let (status, _) = app.patch(&format!("/v1/keys/{key_id}"), json!({"expires_at": null})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "a capped key cannot be made to live for ever");
    let (status, _) = app.patch(&format!("/v1/keys/{key_id}"), json!({"scopes": ["read", "write"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, e) =
        app.post("/v1/clients", json!({"consumer_id": cons, "name": "c", "scopes": ["write"]})).await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("scopes")), "{e}");
    let (status, _) = app
        .patch(
            &format!("/v1/consumers/{cons}"),
            json!({"rate_limits": [{"name": "m", "limit": 9, "window_seconds": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "the plan owns the limits");

    // A developer's application never holds Keygate's own permissions, even on a plan allowing any
    // scope, even when the operator asks.
    let (_, open_plan) = app.post("/v1/plans", json!({"name": "Open", "self_service": true})).await;
    let (_, dev) = app.post("/v1/users", json!({"username": "dev", "roles": ["developer"]})).await;
    let (status, owned) = app
        .post("/v1/consumers", json!({"name": "dev app", "plan_id": open_plan["id"], "owner_id": dev["id"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{owned}");
    for scope in ["keygate:admin", "keygate:verify", "keygate:*"] {
        let (status, e) =
            app.post("/v1/keys", json!({"consumer_id": owned["id"], "name": "k", "scopes": [scope]})).await;
        assert_eq!(
            (status, e["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("scopes")),
            "{scope}: {e}"
        );
        let (status, _) = app
            .post("/v1/clients", json!({"consumer_id": owned["id"], "name": "c", "scopes": [scope]}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{scope}");
    }
    let (_, holder) = app.post("/v1/consumers", json!({"name": "holder"})).await;
    app.create_key(holder["id"].as_str().unwrap(), &["keygate:verify"]).await;
    let (status, _) = app
        .patch(&format!("/v1/consumers/{}", holder["id"].as_str().unwrap()), json!({"owner_id": dev["id"]}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "an owner is not given to a consumer holding keygate: scopes");

    // The plan's limit applies, and a change to the plan reaches the key at once.
    assert_eq!(app.verify_code(&secret, &["read"]).await, "VALID");
    assert_eq!(app.verify_code(&secret, &["read"]).await, "RATE_LIMITED");
    let (status, _) = app
        .patch(
            &format!("/v1/plans/{plan_id}"),
            json!({"rate_limits": [{"name": "m", "limit": 1000, "window_seconds": 60}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.verify_code(&secret, &["read"]).await, "VALID");

    // In use: not deleted. Off the plan: deleted.
    let (status, e) = app.call(reqwest::Method::DELETE, &format!("/v1/plans/{plan_id}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{e}");
    let (_, list) = app.get(&format!("/v1/consumers?plan_id={plan_id}")).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    app.patch(&format!("/v1/consumers/{cons}"), json!({"plan_id": null})).await;
    let (status, _) = app.call(reqwest::Method::DELETE, &format!("/v1/plans/{plan_id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app.get(&format!("/v1/plans/{plan_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, audit) = app.get(&format!("/v1/audit?target_id={plan_id}")).await;
    let actions: Vec<Value> =
        audit["items"].as_array().unwrap().iter().map(|a| a["action"].clone()).collect();
    assert_eq!(actions, [json!("plan.delete"), json!("plan.update"), json!("plan.create")]);
}

/// The console's Plans page: an operator makes a plan with the form, edits only what changed, and makes it
/// the portal's default; a developer's page lists their applications.
#[tokio::test]
async fn operators_manage_plans_in_the_console() {
    let app = TestApp::start().await;
    let mut b = Browser::new();
    let (_, _, page) = b.get(&app.url("/console/login")).await;
    let (status, _, _) =
        b.post(&app.url("/console/login"), &[("csrf", &csrf(&page)), ("key", &app.admin_key)], &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, page) = b.get(&app.url("/console/plans")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("No plans yet."));
    let token = csrf(&page);
    let (status, h, _) = b
        .post(
            &app.url("/console/plans"),
            &[
                ("csrf", &token),
                ("name", "Pro"),
                ("rate_limits", r#"[{"name": "minute", "limit": 600, "window_seconds": 60}]"#),
                ("quota", r#"{"remaining": 1000}"#),
                ("allowed_scopes", "read write"),
                ("key_lifetime_days", "30"),
                ("self_service", "on"),
            ],
            &[],
        )
        .await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/plans"));
    let (_, plans) = app.get("/v1/plans").await;
    let plan = &plans["items"][0];
    assert_eq!(
        (plan["name"].as_str(), plan["key_lifetime_seconds"].as_i64()),
        (Some("Pro"), Some(30 * 86400))
    );
    assert_eq!(plan["allowed_scopes"], json!(["read", "write"]));
    let id = plan["id"].as_str().unwrap().to_string();

    // Edit: only the changed field is sent (the rate limits stay as they were).
    let (_, _, page) = b.get(&app.url("/console/plans")).await;
    let (status, _, _) = b
        .post(
            &app.url(&format!("/console/plans/{id}/update")),
            &[
                ("csrf", &csrf(&page)),
                ("name", "Pro"),
                ("orig_name", "Pro"),
                ("key_lifetime_seconds", "60"),
                ("orig_key_lifetime_seconds", "30"),
                ("self_service", "on"),
                ("orig_self_service", "on"),
            ],
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, plan) = app.get(&format!("/v1/plans/{id}")).await;
    assert_eq!(plan["key_lifetime_seconds"], 60 * 86400, "{plan}");
    assert_eq!(plan["rate_limits"][0]["limit"], 600, "untouched: {plan}");
    let (_, _, page) = b.get(&app.url("/console/plans")).await;
    let (status, _, _) =
        b.post(&app.url(&format!("/console/plans/{id}/default")), &[("csrf", &csrf(&page))], &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, plan) = app.get(&format!("/v1/plans/{id}")).await;
    assert_eq!(plan["is_default"], true);

    // A developer's applications on their user page, the plan and owner on the consumer's.
    let (_, dev) = app.post("/v1/users", json!({"username": "devon", "roles": ["developer"]})).await;
    let (_, c) =
        app.post("/v1/consumers", json!({"name": "Devon's app", "plan_id": id, "owner_id": dev["id"]})).await;
    let (_, _, page) = b.get(&app.url(&format!("/console/users/{}", dev["id"].as_str().unwrap()))).await;
    assert!(page.contains("Devon&#x27;s app") || page.contains("Devon's app"), "{page}");
    let (_, _, page) = b.get(&app.url(&format!("/console/consumers/{}", c["id"].as_str().unwrap()))).await;
    assert!(page.contains(">Pro</a>") && page.contains("Owner (developer)"), "{page}");
}
