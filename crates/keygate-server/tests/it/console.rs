//! The web console over HTTP: sign-in, sessions, CSRF, the one-time secret, and changes made through
//! the admin API's handlers (same validation, same audit). The browser-driven walk (Chromium, axe) is the
//! CLI test `the_console_in_a_real_browser`.

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::authcode::Browser;
use crate::helpers::TestApp;

fn location(h: &HeaderMap) -> String {
    h.get("location").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

fn set_cookies(h: &HeaderMap) -> Vec<String> {
    h.get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_string()).collect()
}

/// The first `name="csrf" value="…"` of a page.
fn csrf(html: &str) -> String {
    let at = html.find(r#"name="csrf" value=""#).expect("a CSRF field") + r#"name="csrf" value=""#.len();
    html[at..at + html[at..].find('"').unwrap()].to_string()
}

/// Signs `b` in with `key`; returns the overview page.
async fn sign_in(app: &TestApp, b: &mut Browser, key: &str) -> (StatusCode, HeaderMap, String) {
    let (_, _, page) = b.get(&app.url("/console/login")).await;
    let token = csrf(&page);
    b.post(&app.url("/console/login"), &[("csrf", &token), ("key", key)], &[]).await
}

#[tokio::test]
async fn sign_in_sessions_and_csrf() {
    let app = TestApp::start().await;
    let mut b = Browser::new();
    let (status, h, _) = b.get(&app.url("/console/")).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/login"));

    let (status, h, page) = b.get(&app.url("/console/login")).await;
    assert_eq!(status, StatusCode::OK);
    let csp = h["content-security-policy"].to_str().unwrap();
    let script_src = csp.split(';').find(|d| d.trim().starts_with("script-src")).unwrap();
    assert_eq!(script_src.trim(), "script-src 'self'", "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"));
    assert_eq!(h["cache-control"], "no-store");
    let login_cookie = set_cookies(&h).concat();
    assert!(login_cookie.contains("HttpOnly") && login_cookie.contains("SameSite=Strict"), "{login_cookie}");
    let token = csrf(&page);

    // Wrong key, a key without admin, a form without the login cookie's token: refused.
    let (status, _, page) =
        b.post(&app.url("/console/login"), &[("csrf", &token), ("key", "kg_live_nope")], &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.contains("not a working admin key"), "{page}");
    let consumer = app.create_consumer("acme").await;
    let (_, verify_only) = app.create_key(&consumer, &["keygate:verify"]).await;
    let (_, _, page) = b.get(&app.url("/console/login")).await;
    let (status, _, page) =
        b.post(&app.url("/console/login"), &[("csrf", &csrf(&page)), ("key", &verify_only)], &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(page.contains("not an admin key"), "{page}");
    let mut stranger = Browser::new();
    let (status, _, _) =
        stranger.post(&app.url("/console/login"), &[("csrf", "guessed"), ("key", &app.admin_key)], &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no login form was opened in this browser");

    // Signed in: a session cookie, HttpOnly and SameSite=Strict.
    let (status, h, _) = sign_in(&app, &mut b, &app.admin_key).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/"));
    let session = set_cookies(&h).into_iter().find(|c| c.starts_with("kg_console=")).unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(session.contains(attr), "{attr}: {session}");
    }
    assert!(!session.contains("Secure"), "plain http here: {session}");
    let (status, _, page) = b.get(&app.url("/console/")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<h1>Overview</h1>"));
    let token = csrf(&page);

    // A post without the token, or from another site, changes nothing.
    let url = app.url("/console/consumers");
    let (status, _, _) = b.post(&url, &[("name", "forged")], &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = b.post(&url, &[("name", "forged"), ("csrf", "wrong")], &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) =
        b.post(&url, &[("name", "forged"), ("csrf", &token)], &[("sec-fetch-site", "cross-site")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, list) = app.get("/v1/consumers?q=forged").await;
    assert_eq!(list["items"], json!([]));

    // With the token: made, and audited like the API's own change, with the admin key as the actor.
    let (status, h, _) = b.post(&url, &[("name", "Console Corp"), ("csrf", &token)], &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location(&h).starts_with("/console/consumers/cons_"), "{h:?}");
    let (_, list) = app.get("/v1/consumers?q=console%20corp").await;
    let id = list["items"][0]["id"].as_str().unwrap().to_string();
    let (_, audit) = app.get(&format!("/v1/audit?target_id={id}")).await;
    let (_, admin_keys) = app.get("/v1/keys?q=bootstrap").await;
    assert_eq!(audit["items"][0]["action"], "consumer.create");
    assert_eq!(audit["items"][0]["actor"], admin_keys["items"][0]["id"]);
    assert_eq!(audit["items"][0]["ip"], "127.0.0.1");

    // Sign out: the cookie is cleared and the old session id is worthless.
    let old = b.cookie_value("kg_console").unwrap();
    let (status, h, _) = b.post(&app.url("/console/logout"), &[("csrf", &token)], &[]).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/login?why=out"));
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(app.url("/console/"))
        .header("cookie", format!("kg_console={old}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn revoking_the_admin_key_ends_its_console_sessions() {
    let app = TestApp::start().await;
    let (_, keys) = app.get("/v1/keys?q=bootstrap").await;
    let system = keys["items"][0]["consumer_id"].as_str().unwrap().to_string();
    let (second_id, second) = app.create_key(&system, &["keygate:admin"]).await;
    let mut b = Browser::new();
    let (status, _, _) = sign_in(&app, &mut b, &second).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(b.get(&app.url("/console/keys")).await.0, StatusCode::OK);
    let (status, _) = app.post(&format!("/v1/keys/{second_id}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, h, _) = b.get(&app.url("/console/keys")).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/login?why=revoked"));
    // And it stays over, even if the page is asked again.
    assert_eq!(b.get(&app.url("/console/")).await.0, StatusCode::SEE_OTHER);

    // A rotation that ends the secret signed in with ends the session; one with an overlap does not yet.
    let (third_id, third) = app.create_key(&system, &["keygate:admin"]).await;
    let mut b = Browser::new();
    sign_in(&app, &mut b, &third).await;
    let (status, _) =
        app.post(&format!("/v1/keys/{third_id}/rotate"), json!({"overlap_seconds": 3600})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.get(&app.url("/console/keys")).await.0, StatusCode::OK, "the old secret works for an hour");
    let (status, _) = app.post(&format!("/v1/keys/{third_id}/rotate"), json!({"overlap_seconds": 0})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, h, _) = b.get(&app.url("/console/keys")).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/login?why=revoked"));

    // So does an address allow-list the browser is outside of, or the consumer's disabling.
    let (fourth_id, fourth) = app.create_key(&system, &["keygate:admin"]).await;
    let mut b = Browser::new();
    sign_in(&app, &mut b, &fourth).await;
    let (status, _) =
        app.patch(&format!("/v1/keys/{fourth_id}"), json!({"allowed_ips": ["10.0.0.0/8"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.get(&app.url("/console/keys")).await.0, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn a_new_secret_is_shown_once_and_errors_read_as_the_apis() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let mut b = Browser::new();
    sign_in(&app, &mut b, &app.admin_key).await;
    let (_, _, page) = b.get(&app.url(&format!("/console/consumers/{consumer}"))).await;
    let token = csrf(&page);
    let (status, h, _) = b
        .post(
            &app.url(&format!("/console/consumers/{consumer}/keys")),
            &[("csrf", &token), ("name", "prod"), ("scopes", "read write"), ("environment", "live")],
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let to = location(&h);
    assert!(to.starts_with("/console/keys/key_") && to.contains("?reveal="), "{to}");
    let (_, _, page) = b.get(&app.url(&to)).await;
    let at = page.find("data-secret").expect("the secret is shown");
    let secret = page[..at].rsplit("value=\"").next().unwrap().split('"').next().unwrap().to_string();
    assert!(secret.starts_with("kg_live_"), "{secret}");
    assert_eq!(app.verify_code(&secret, &["read"]).await, "VALID");
    let (_, _, again) = b.get(&app.url(&to)).await;
    assert!(!again.contains(&secret) && !again.contains("data-secret"), "shown once only");
    let key_id = to.trim_start_matches("/console/keys/").split('?').next().unwrap().to_string();
    let (_, view) = app.get(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(view["scopes"], json!(["read", "write"]));

    // The same invalid change through the API and through the console: the same message.
    let limits = json!([{"name": "per_second", "limit": 0, "window_seconds": 1}]);
    let (status, api) = app.patch(&format!("/v1/keys/{key_id}"), json!({"rate_limits": limits})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, h, _) = b
        .post(
            &app.url(&format!("/console/keys/{key_id}/update")),
            &[
                ("csrf", &token),
                ("name", "prod"),
                ("scopes", "read write"),
                ("rate_limits", &limits.to_string()),
                ("metadata", "{}"),
                ("orig_metadata", "{}"),
            ],
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, _, page) = b.get(&app.url(&location(&h))).await;
    let message = api["message"].as_str().unwrap();
    let escaped = message.replace('\'', "&#x27;").replace('"', "&quot;");
    assert!(page.contains(&escaped), "{message} in the console's flash: {page}");

    // A form drawn before someone else's change sends only what this operator changed: the allow-list
    // added meanwhile stays.
    let (_, _, form_page) = b.get(&app.url(&format!("/console/keys/{key_id}"))).await;
    let (status, _) = app.patch(&format!("/v1/keys/{key_id}"), json!({"allowed_ips": ["10.0.0.0/8"]})).await;
    assert_eq!(status, StatusCode::OK);
    let field = |name: &str| -> String {
        let at = form_page.find(&format!(r#"name="{name}" value=""#)).unwrap() + name.len() + 15;
        form_page[at..at + form_page[at..].find('"').unwrap()].replace("&#x2f;", "/").replace("&quot;", "\"")
    };
    let mut fields: Vec<(String, String)> = [
        "orig_name",
        "orig_scopes",
        "orig_expires_at",
        "orig_allowed_ips",
        "orig_rate_limits",
        "orig_quota",
        "orig_metadata",
    ]
    .iter()
    .map(|f| (f.to_string(), field(f)))
    .collect();
    for (orig, value) in fields.clone() {
        fields.push((orig.trim_start_matches("orig_").to_string(), value));
    }
    fields.retain(|(k, _)| k != "name");
    fields.push(("name".into(), "renamed".into()));
    fields.push(("csrf".into(), token.clone()));
    let borrowed: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _, _) = b.post(&app.url(&format!("/console/keys/{key_id}/update")), &borrowed, &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, view) = app.get(&format!("/v1/keys/{key_id}")).await;
    assert_eq!(
        (view["name"].as_str(), view["allowed_ips"].clone()),
        (Some("renamed"), json!(["10.0.0.0/8"]))
    );
    app.patch(&format!("/v1/keys/{key_id}"), json!({"allowed_ips": null})).await;

    // Revoking needs the id typed out.
    let url = app.url(&format!("/console/keys/{key_id}/revoke"));
    b.post(&url, &[("csrf", &token), ("confirm", "yes")], &[]).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");
    b.post(&url, &[("csrf", &token), ("confirm", &key_id)], &[]).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "REVOKED");
    let (_, audit) = app.get(&format!("/v1/audit?target_id={key_id}")).await;
    let actions: Vec<&str> =
        audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["key.revoke", "key.update", "key.update", "key.update", "key.create"],
        "the refused changes wrote nothing"
    );
}

#[tokio::test]
async fn pages_escape_what_users_typed_and_unknown_ids_are_404() {
    let app = TestApp::start().await;
    let evil = "<script>alert(1)</script>";
    let consumer = app.create_consumer(evil).await;
    let mut b = Browser::new();
    sign_in(&app, &mut b, &app.admin_key).await;
    for path in
        ["/console/consumers".to_string(), format!("/console/consumers/{consumer}"), "/console/audit".into()]
    {
        let (status, _, page) = b.get(&app.url(&path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(!page.contains(evil), "{path}");
    }
    let (_, _, page) = b.get(&app.url("/console/consumers")).await;
    assert!(page.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"), "{page}");
    for path in [
        "/console/keys/key_missing",
        "/console/consumers/cons_missing",
        "/console/clients/kgc_missing",
        "/console/users/usr_missing",
    ] {
        let (status, _, _) = b.get(&app.url(path)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    // An id that is not a path segment reaches no other route.
    let (status, _, _) = b.get(&app.url("/console/keys/..%2Fconsumers")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn usage_boards_quotas_expiry_search_and_audit_filters() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("Busy Co").await;
    let (busy, busy_secret) = app.create_key(&consumer, &[]).await;
    let (quiet, quiet_secret) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "quota key", "quota": {"remaining": 3},
            "expires_at": "2099-01-01T00:00:00Z"}))
        .await;
    let soon = crate::helpers::rfc3339_in(3 * 86_400_000);
    let (expiring, _) =
        app.create_key_with(json!({"consumer_id": consumer, "name": "soon", "expires_at": soon})).await;
    for _ in 0..5 {
        app.verify_code(&busy_secret, &[]).await;
    }
    app.verify_code(&quiet_secret, &[]).await;
    app.verify_code(&quiet_secret, &["missing:scope"]).await;

    let (status, board) = app.get("/v1/usage/leaders?granularity=minute").await;
    assert_eq!(status, StatusCode::OK, "{board}");
    let ids: Vec<&str> =
        board["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();

    assert!(ids.iter().position(|i| *i == busy) < ids.iter().position(|i| *i == quiet), "{board}");
    let (_, failing) = app.get("/v1/usage/leaders?order=failures&granularity=minute").await;
    assert_eq!(failing["items"][0]["id"], quiet.as_str(), "{failing}");
    assert_eq!(failing["items"][0]["failures"], 1);
    assert_eq!(failing["items"][0]["name"], "quota key");
    let (_, consumers) = app.get("/v1/usage/leaders?group=consumer&granularity=minute").await;
    assert!(
        consumers["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == consumer.as_str() && r["total"] == 7)
    );
    let (status, bad) = app.get("/v1/usage/leaders?group=planet").await;
    assert_eq!((status, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("group")));
    let (_, all) = app.get("/v1/usage?granularity=minute").await;
    assert!(all["total"].as_i64().unwrap() >= 7, "{all}");

    let (_, low) = app.get("/v1/keys/lowest-quota").await;
    assert_eq!(low["items"][0]["id"], quiet.as_str());
    assert_eq!(low["items"][0]["quota"]["remaining"], 2, "{low}");
    let (_, exp) = app.get("/v1/keys/expiring?within_days=7").await;
    let exp_ids: Vec<&str> =
        exp["items"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(exp_ids, [expiring.as_str()]);

    let (_, found) = app.get("/v1/keys?q=QUOTA").await;
    assert_eq!(found["items"].as_array().unwrap().len(), 1);
    let (_, found) = app.get(&format!("/v1/keys?q={busy}")).await;
    assert_eq!(found["items"][0]["id"], busy.as_str());
    let (_, found) = app.get("/v1/consumers?q=busy").await;
    assert_eq!(found["items"][0]["id"], consumer.as_str());
    let (status, _) = app.get(&format!("/v1/consumers?q={}", "x".repeat(201))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (_, by_system) = app.get("/v1/audit?actor=system").await;
    assert!(by_system["items"].as_array().unwrap().iter().all(|e| e["actor"] == "system"));
    let (_, future) = app.get("/v1/audit?from=2099-01-01T00:00:00Z").await;
    assert_eq!(future["items"], json!([]));
    let (_, past) = app.get("/v1/audit?to=2000-01-01T00:00:00Z").await;
    assert_eq!(past["items"], json!([]));
    let (_, now) = app.get("/v1/audit?from=2000-01-01T00:00:00Z&action=key.create").await;
    assert_eq!(now["items"].as_array().unwrap().len(), 3, "the three keys made here: {now}");
    let (status, bad) = app.call(Method::GET, "/v1/audit?from=yesterday", None).await;
    assert_eq!((status, bad["field"].clone()), (StatusCode::UNPROCESSABLE_ENTITY, Value::from("from")));
}

#[tokio::test]
async fn users_with_the_admin_role_sign_in_and_act_as_themselves() {
    let app = TestApp::start().await;
    let password = "a long console passphrase";
    let (status, bad) =
        app.post("/v1/users", json!({"username": "eve", "password": password, "roles": ["root"]})).await;
    assert_eq!((status, bad["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("roles")));
    let (_, ops) =
        app.post("/v1/users", json!({"username": "ops", "password": password, "roles": ["admin"]})).await;
    assert_eq!(ops["roles"], json!(["admin"]));
    let ops_id = ops["id"].as_str().unwrap().to_string();
    app.post("/v1/users", json!({"username": "dev", "password": password})).await;

    async fn user_login(
        app: &TestApp,
        b: &mut Browser,
        user: &str,
        pw: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let url = app.url("/console/login");
        let (_, _, page) = b.get(&url).await;
        b.post(&url, &[("csrf", &csrf(&page)), ("username", user), ("password", pw)], &[]).await
    }

    let mut b = Browser::new();
    let (status, _, page) = user_login(&app, &mut b, "ops", "wrong password here").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.contains("Wrong username or password"));
    let (status, _, page) = user_login(&app, &mut b, "dev", password).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no admin role");
    assert!(page.contains("no admin role"), "{page}");
    let (status, h, _) = user_login(&app, &mut b, "OPS", password).await;
    assert_eq!((status, location(&h).as_str()), (StatusCode::SEE_OTHER, "/console/"));
    let (_, _, page) = b.get(&app.url("/console/consumers")).await;
    assert!(page.contains("Signed in as ops"), "{page}");

    // Changes are the user's, in the audit log with their name.
    let (_, h, _) =
        b.post(&app.url("/console/consumers"), &[("csrf", &csrf(&page)), ("name", "By Ops")], &[]).await;
    let consumer = location(&h).trim_start_matches("/console/consumers/").to_string();
    let (_, audit) = app.get(&format!("/v1/audit?target_id={consumer}")).await;
    assert_eq!(audit["items"][0]["actor"], ops_id.as_str());
    assert_eq!(audit["items"][0]["actor_name"], "ops");
    let (_, mine) = app.get(&format!("/v1/audit?actor={ops_id}")).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);

    // A new password, a lost role or a disabled account ends the session at the next click.
    let (status, _) = app
        .post(&format!("/v1/users/{ops_id}/password"), json!({"password": "another long passphrase"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.get(&app.url("/console/")).await.0, StatusCode::SEE_OTHER);
    let (status, _, _) = user_login(&app, &mut b, "ops", "another long passphrase").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    app.patch(&format!("/v1/users/{ops_id}"), json!({"roles": []})).await;
    assert_eq!(b.get(&app.url("/console/")).await.0, StatusCode::SEE_OTHER);
    app.patch(&format!("/v1/users/{ops_id}"), json!({"roles": ["admin"]})).await;
    user_login(&app, &mut b, "ops", "another long passphrase").await;
    assert_eq!(b.get(&app.url("/console/")).await.0, StatusCode::OK);
    // The console edits a user's roles and the scopes they may grant ("nothing" is not "anything").
    let (_, dev) = app.get("/v1/users/username:dev").await;
    let dev_id = dev["id"].as_str().unwrap().to_string();
    let (_, _, page) = b.get(&app.url(&format!("/console/users/{dev_id}"))).await;
    assert!(page.contains("any scope a client may ask") && page.contains("<dt>Roles</dt><dd>none"), "{page}");
    let orig = |name: &str| {
        let at = page.find(&format!(r#"name="orig_{name}" value=""#)).unwrap() + name.len() + 20;
        page[at..at + page[at..].find('"').unwrap()].replace("&quot;", "\"")
    };
    let fields = [
        ("csrf", csrf(&page)),
        ("allowed_scopes", String::new()),
        ("orig_allowed_scopes", orig("allowed_scopes")),
        ("role_admin", "on".to_string()),
        ("orig_roles", orig("roles")),
    ];
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, _, _) = b.post(&app.url(&format!("/console/users/{dev_id}/update")), &fields, &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, dev) = app.get(&format!("/v1/users/{dev_id}")).await;
    assert_eq!((dev["roles"].clone(), dev["allowed_scopes"].clone()), (json!(["admin"]), json!([])));

    app.post(&format!("/v1/users/{ops_id}/disable"), json!({})).await;
    assert_eq!(b.get(&app.url("/console/")).await.0, StatusCode::SEE_OTHER);
}
