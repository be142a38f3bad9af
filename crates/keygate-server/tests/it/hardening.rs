//! Regression tests for the security review (issue 8): each reproduces a defect found against a running
//! server and checks that it is gone.

use std::os::unix::fs::PermissionsExt;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;
use crate::oauth::{Client, client, get_token, introspect, jwt_part, token_request};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn sqlite(app: &TestApp) -> sqlx::SqlitePool {
    let url = format!("sqlite://{}", app.data_dir.join("keygate.db").display());
    sqlx::SqlitePool::connect(&url).await.unwrap()
}

#[tokio::test]
async fn data_directory_and_database_files_are_private() {
    let app = TestApp::builder().sqlite().start().await;
    let consumer = app.create_consumer("acme").await;
    app.create_key(&consumer, &[]).await;
    assert_eq!(mode(&app.data_dir), 0o700);
    for f in ["keygate.db", "keygate.db-wal", "keygate.db-shm"] {
        let p = app.data_dir.join(f);
        assert!(p.exists(), "{f} exists after writes");
        assert_eq!(mode(&p), 0o600, "{f}");
    }
    // The master key sits beside the data directory, not in it, and is private too.
    let key_file = app.data_dir.with_file_name("data.master-key");
    assert_eq!(mode(&key_file), 0o600);

    // An existing directory and database that others can read are tightened on the next start.
    let (dir, admin, guard) = app.stop().await;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("keygate.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let app = TestApp::builder().sqlite().data_dir(&dir, &admin).start().await;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("keygate.db")), 0o600);
    drop(app);
    drop(guard);
}

#[tokio::test]
async fn signing_keys_are_sealed_and_need_their_master_key() {
    let app = TestApp::builder().sqlite().start().await;
    // Keys are loaded before the server accepts its first connection.
    let jwks = app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap();
    assert_eq!(jwks.status(), StatusCode::OK);
    let pool = sqlite(&app).await;
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT kid, private_der FROM signing_keys").fetch_all(&pool).await.unwrap();
    assert!(!rows.is_empty());
    for (kid, blob) in &rows {
        assert!(blob.starts_with(b"KGS1"), "key {kid} is sealed");
        // PKCS#8 DER starts with a SEQUENCE tag (0x30); a sealed blob must not be one.
        assert_ne!(blob[0], 0x30);
    }
    pool.close().await;
    let (dir, admin, guard) = app.stop().await;

    // Another master key does not open them: the server refuses to start rather than make new keys.
    let config = keygate_server::ServerConfig {
        data_dir: dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        master_key: keygate_server::seal::MasterKeySource::Inline(
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
        ),
        ..keygate_server::ServerConfig::default()
    };
    let store = keygate_server::open_store(&config).await.unwrap();
    let state = keygate_server::AppState::new(store, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = keygate_server::launch(state, listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("master key"), "{err}");

    // A key stored in clear by an older version is sealed at the next start, and still signs.
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("keygate.db").display())).await.unwrap();
    let master =
        keygate_server::seal::MasterKey::open(&keygate_server::seal::MasterKeySource::BesideDataDir, &dir)
            .unwrap()
            .0;
    let (kid, blob) = rows[0].clone();
    let clear = master.unseal(kid.as_bytes(), &blob).unwrap();
    sqlx::query("UPDATE signing_keys SET private_der = ? WHERE kid = ?")
        .bind(&clear)
        .bind(&kid)
        .execute(&pool)
        .await
        .unwrap();
    let app = TestApp::builder().sqlite().data_dir(&dir, &admin).start().await;
    app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap();
    let now: Vec<u8> = sqlx::query_scalar("SELECT private_der FROM signing_keys WHERE kid = ?")
        .bind(&kid)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(now.starts_with(b"KGS1"), "resealed on start");
    let consumer = app.create_consumer("p").await;
    let c = client(&app, json!({"consumer_id": consumer, "name": "c", "scopes": ["a"]})).await;
    let t = get_token(&app, &c, &[("grant_type", "client_credentials")]).await;
    assert_eq!(app.verify_code(t["access_token"].as_str().unwrap(), &["a"]).await, "VALID");
    drop(guard);
}

#[tokio::test]
async fn emergency_revocation_of_a_signing_key() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let c = client(&app, json!({"consumer_id": consumer, "name": "c", "scopes": ["a"]})).await;
    let token = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(app.verify_code(&token, &[]).await, "VALID");
    let kid = jwt_part(&token, 0)["kid"].as_str().unwrap().to_string();

    let (status, keys) = app.post(&format!("/v1/signing-keys/{kid}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    let revoked = keys.as_array().unwrap().iter().find(|k| k["kid"] == kid.as_str()).unwrap();
    assert_eq!(revoked["status"], "revoked");
    assert!(keys.as_array().unwrap().iter().any(|k| k["status"] == "active"), "a new key signs at once");

    // Gone from the JWKS, and its token stops verifying on the next request (also when cached).
    let jwks: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    assert!(jwks["keys"].as_array().unwrap().iter().all(|k| k["kid"] != kid.as_str()));
    assert_ne!(app.verify_code(&token, &[]).await, "VALID");
    assert_eq!(introspect(&app, &c, &token).await, json!({"active": false}));

    // New tokens come from the new key and verify.
    let fresh = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(jwt_part(&fresh, 0)["kid"], kid.as_str());
    assert_eq!(app.verify_code(&fresh, &[]).await, "VALID");
    let (status, _) = app.post(&format!("/v1/signing-keys/{kid}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "revoked once");
}

async fn bearer(app: &TestApp, path: &str, credential: &str) -> reqwest::Response {
    app.client.get(app.url(path)).bearer_auth(credential).send().await.unwrap()
}

#[tokio::test]
async fn disabling_a_consumer_stops_its_clients_and_tokens() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("partner").await;
    let jwt_client = client(&app, json!({"consumer_id": consumer, "name": "j", "scopes": ["a"]})).await;
    let opaque_client = client(
        &app,
        json!({"consumer_id": consumer, "name": "o", "scopes": ["a"], "token_format": "opaque"}),
    )
    .await;
    let grant = [("grant_type", "client_credentials")];
    let jwt = get_token(&app, &jwt_client, &grant).await["access_token"].as_str().unwrap().to_string();
    let opaque = get_token(&app, &opaque_client, &grant).await["access_token"].as_str().unwrap().to_string();
    for t in [&jwt, &opaque] {
        assert_eq!(app.verify_code(t, &["a"]).await, "VALID");
        assert_eq!(bearer(&app, "/v1/auth", t).await.status(), StatusCode::OK);
    }

    let (status, _) = app.post(&format!("/v1/consumers/{consumer}/disable"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    for t in [&jwt, &opaque] {
        assert_eq!(app.verify_code(t, &["a"]).await, "DISABLED");
        assert_eq!(bearer(&app, "/v1/auth", t).await.status(), StatusCode::UNAUTHORIZED);
        // A resource server (here the admin key, which covers keygate:introspect) is told "inactive";
        // the consumer's own clients cannot even authenticate.
        let resp = app
            .client
            .post(app.url("/oauth2/introspect"))
            .bearer_auth(&app.admin_key)
            .form(&[("token", t.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.json::<Value>().await.unwrap(), json!({"active": false}));
        let resp = app
            .client
            .post(app.url("/oauth2/introspect"))
            .basic_auth(&jwt_client.id, Some(&jwt_client.secret))
            .form(&[("token", t.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = token_request(&app, &jwt_client, &grant).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_client");

    let (status, _) = app.post(&format!("/v1/consumers/{consumer}/enable"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.verify_code(&jwt, &["a"]).await, "VALID");
    assert_eq!(app.verify_code(&opaque, &["a"]).await, "VALID");
    assert_eq!(token_request(&app, &jwt_client, &grant).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_consumers_plan_applies_to_its_tokens() {
    let app = TestApp::start().await;
    let (status, c) = app
        .post(
            "/v1/consumers",
            json!({"name": "metered", "rate_limits": [{"name": "burst", "limit": 2, "window_seconds": 3600}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let consumer = c["id"].as_str().unwrap();
    let oc = client(&app, json!({"consumer_id": consumer, "name": "j", "scopes": ["a"]})).await;
    let t = get_token(&app, &oc, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let d = app.verify(&t, &[]).await;
    assert_eq!(d["code"], "VALID");
    assert_eq!(d["rate_limit"]["name"], "burst");
    assert_eq!(d["rate_limit"]["remaining"], 1);
    assert_eq!(app.verify_code(&t, &[]).await, "VALID");
    let d = app.verify(&t, &[]).await;
    assert_eq!(d["code"], "RATE_LIMITED");
    let resp = bearer(&app, "/v1/auth", &t).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn metrics_labels_are_bounded_and_metrics_can_require_a_credential() {
    let app = TestApp::start().await;
    for i in 0..50 {
        let m = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        app.client.request(m, app.url("/v1/verify")).send().await.unwrap();
    }
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("MADEUP"), "made-up methods never become labels");
    assert!(text.contains("method=\"other\""));

    let locked = TestApp::builder().config(|c| c.metrics_auth = Some(true)).start().await;
    assert_eq!(
        locked.client.get(locked.url("/metrics")).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let resp = bearer(&locked, "/metrics", &locked.admin_key).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let consumer = locked.create_consumer("prom").await;
    let (_, scraper) = locked.create_key(&consumer, &["keygate:metrics"]).await;
    assert_eq!(bearer(&locked, "/metrics", &scraper).await.status(), StatusCode::OK);
    let (_, other) = locked.create_key(&consumer, &["articles:read"]).await;
    assert_eq!(bearer(&locked, "/metrics", &other).await.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn spoofed_forwarding_headers_do_not_pass_an_ip_allow_list() {
    let app = TestApp::builder().trusted_proxies(&["127.0.0.1/32"]).start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, key) = app
        .create_key_with(
            json!({"consumer_id": consumer, "name": "office", "allowed_ips": ["198.51.100.7/32"]}),
        )
        .await;
    let auth = |headers: Vec<(&'static str, &'static str)>| {
        let mut req = app.client.get(app.url("/v1/auth")).header("X-API-Key", key.clone());
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send()
    };
    // The proxy maintains X-Forwarded-For correctly: the office address passes.
    assert_eq!(auth(vec![("x-forwarded-for", "198.51.100.7")]).await.unwrap().status(), StatusCode::OK);
    // The attacker's own entries: an unparsable nearest hop, a Forwarded header that disagrees.
    for headers in [
        vec![("x-forwarded-for", "198.51.100.7, 203.0.113.66:1234x")],
        vec![("x-forwarded-for", "203.0.113.66"), ("forwarded", "for=198.51.100.7")],
        vec![("forwarded", "for=198.51.100.7, for=_proxy1")],
    ] {
        assert_eq!(auth(headers.clone()).await.unwrap().status(), StatusCode::FORBIDDEN, "{headers:?}");
    }
    // A client's own junk before the hop the proxy appended does not hide that hop.
    let resp = app
        .client
        .get(app.url("/v1/auth"))
        .header("X-API-Key", key.clone())
        .header("x-forwarded-for", reqwest::header::HeaderValue::from_bytes(b"\xff, 198.51.100.7").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // An allow-list that names the proxies' own network: a client whose headers cannot be believed is
    // not taken for the proxy.
    let (_, inside) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "internal", "allowed_ips": ["127.0.0.0/8"]}))
        .await;
    let internal = |h: Vec<(&'static str, &'static str)>| {
        let mut req = app.client.get(app.url("/v1/auth")).header("X-API-Key", inside.clone());
        for (k, v) in h {
            req = req.header(k, v);
        }
        req.send()
    };
    assert_eq!(internal(vec![]).await.unwrap().status(), StatusCode::OK, "the proxy host itself");
    for h in [
        vec![("x-forwarded-for", "203.0.113.66"), ("forwarded", "for=127.0.0.1")],
        vec![("x-forwarded-for", "garbage")],
    ] {
        assert_eq!(internal(h.clone()).await.unwrap().status(), StatusCode::FORBIDDEN, "{h:?}");
    }
    // RFC 7239 forms the real proxy may use.
    assert_eq!(
        auth(vec![("forwarded", "for=\"198.51.100.7:4711\";proto=https")]).await.unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn imported_keys_show_a_short_start_and_broken_keygate_keys_are_refused() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("legacy").await;
    let mut broken = {
        let (_, k) = app.create_key(&consumer, &[]).await;
        k
    };
    let last = broken.pop().unwrap();
    broken.push(if last == 'a' { 'b' } else { 'a' });
    let (status, r) = app
        .post(
            "/v1/keys/import",
            json!({"keys": [
                {"consumer_id": consumer, "name": "old", "key": "9f8e7d6c5b4a39281706f5e4_v2"},
                {"consumer_id": consumer, "name": "typo", "key": broken},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["imported"], 1);
    let id = r["results"][0]["id"].as_str().unwrap();
    assert_eq!(r["results"][1]["error"]["code"], "validation_failed");
    assert!(r["results"][1]["error"]["message"].as_str().unwrap().contains("could never verify"), "{r}");
    let (_, key) = app.get(&format!("/v1/keys/{id}")).await;
    assert_eq!(key["start"], "9f8e7d");
    let (_, audit) = app.get(&format!("/v1/audit?target_id={id}")).await;
    assert_eq!(audit["items"][0]["details"]["start"], "9f8e7d");
}

#[tokio::test]
async fn commas_never_reach_scope_headers() {
    let app = TestApp::builder().sqlite().start().await;
    let consumer = app.create_consumer("acme").await;
    let (status, e) = app
        .post("/v1/keys", json!({"consumer_id": consumer, "name": "k", "scopes": ["articles:x,admin"]}))
        .await;
    assert_eq!((status, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("scopes")));
    let (status, _) =
        app.post("/v1/clients", json!({"consumer_id": consumer, "name": "c", "scopes": ["a,admin"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = app.post("/v1/verify", json!({"credential": "x", "scopes": ["a,b"]})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // A scope stored before the rule (written here behind the server's back) grants nothing and never
    // reaches the upstream header.
    let (id, key) = app.create_key(&consumer, &["articles:read"]).await;
    let pool = sqlite(&app).await;
    sqlx::query("UPDATE api_keys SET scopes = '[\"articles:read\",\"articles:x,admin\"]' WHERE id = ?")
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    let (dir, admin, guard) = app.stop().await;
    let app = TestApp::builder().sqlite().data_dir(&dir, &admin).start().await;
    let resp = app.client.get(app.url("/v1/auth")).header("X-API-Key", &key).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-keygate-scopes"], "articles:read");
    let resp =
        app.client.get(app.url("/v1/auth?scope=admin")).header("X-API-Key", &key).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    drop(guard);
}

#[tokio::test]
async fn clients_see_and_revoke_only_their_own_tokens() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let a = client(&app, json!({"consumer_id": consumer, "name": "a", "scopes": ["x"]})).await;
    let b = client(&app, json!({"consumer_id": consumer, "name": "b", "scopes": ["x"]})).await;
    let grant = [("grant_type", "client_credentials")];
    let token = get_token(&app, &a, &grant).await["access_token"].as_str().unwrap().to_string();

    assert_eq!(introspect(&app, &b, &token).await, json!({"active": false}), "B cannot read A's token");
    assert_eq!(introspect(&app, &a, &token).await["active"], true);

    let form = |t: &str| vec![("token", t.to_string())];
    let post = |path: &'static str, cred: String, t: String| {
        app.client.post(app.url(path)).bearer_auth(cred).form(&form(&t)).send()
    };
    let (_, verifier) = app.create_key(&consumer, &["keygate:verify"]).await;
    let (_, introspector) = app.create_key(&consumer, &["keygate:introspect"]).await;
    let resp = post("/oauth2/introspect", verifier.clone(), token.clone()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "verify alone no longer introspects");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "insufficient_scope");
    let resp = post("/oauth2/introspect", introspector.clone(), token.clone()).await.unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["active"], true);

    // Revocation: B's request is ignored, a verify or introspect key is refused, A's own works.
    let resp = app
        .client
        .post(app.url("/oauth2/revoke"))
        .basic_auth(&b.id, Some(&b.secret))
        .form(&form(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.verify_code(&token, &[]).await, "VALID");
    for cred in [verifier, introspector] {
        let resp = post("/oauth2/revoke", cred, token.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(app.verify_code(&token, &[]).await, "VALID");
    let resp = app
        .client
        .post(app.url("/oauth2/revoke"))
        .basic_auth(&a.id, Some(&a.secret))
        .form(&form(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.verify_code(&token, &[]).await, "REVOKED");
}

#[tokio::test]
async fn revoke_all_spares_tokens_issued_after_the_call() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let grant = [("grant_type", "client_credentials")];
    for format in ["jwt", "opaque"] {
        let c: Client = client(
            &app,
            json!({"consumer_id": consumer, "name": format, "scopes": ["x"], "token_format": format}),
        )
        .await;
        let before = get_token(&app, &c, &grant).await["access_token"].as_str().unwrap().to_string();
        let (status, _) = app.post(&format!("/v1/clients/{}/revoke-tokens", c.id), json!({})).await;
        assert_eq!(status, StatusCode::OK);
        // Issued within the same second as the call, but after it.
        let after = get_token(&app, &c, &grant).await["access_token"].as_str().unwrap().to_string();
        assert_eq!(app.verify_code(&before, &[]).await, "REVOKED", "{format}");
        assert_eq!(app.verify_code(&after, &[]).await, "VALID", "{format}");
        if format == "jwt" {
            let claims = jwt_part(&after, 1);
            assert_eq!(claims["kg_iat"].as_i64().unwrap() / 1000, claims["iat"].as_i64().unwrap());
            assert_eq!(claims["consumer_id"], consumer.as_str());
        }
    }
}

#[tokio::test]
async fn a_zero_cost_check_says_what_a_spending_call_would_get() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, key) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "q", "quota": {"remaining": 1},
            "rate_limits": [{"name": "slow", "limit": 5, "window_seconds": 60}]}))
        .await;
    let check = |cost: u64| app.post("/v1/verify", json!({"credential": key, "cost": cost}));
    let (_, d) = check(0).await;
    assert_eq!((d["code"].as_str(), d["quota"]["remaining"].as_u64()), (Some("VALID"), Some(1)));
    assert_eq!(d["rate_limit"]["remaining"], 5, "a check consumes nothing");
    let (_, d) = check(1).await;
    assert_eq!(d["code"], "VALID");
    let (_, d) = check(0).await;
    assert_eq!((d["code"].as_str(), d["quota"]["remaining"].as_u64()), (Some("QUOTA_EXCEEDED"), Some(0)));
}

#[tokio::test]
async fn discovery_is_cached_follows_client_changes_and_can_hide_scopes() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("p").await;
    let get = || async {
        app.client
            .get(app.url("/.well-known/oauth-authorization-server"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(get().await["scopes_supported"], json!([]));
    client(&app, json!({"consumer_id": consumer, "name": "a", "scopes": ["reports:read"]})).await;
    assert_eq!(get().await["scopes_supported"], json!(["reports:read"]), "a client change refreshes it");

    let quiet = TestApp::builder().config(|c| c.publish_scopes = false).start().await;
    let consumer = quiet.create_consumer("p").await;
    client(&quiet, json!({"consumer_id": consumer, "name": "a", "scopes": ["tenant-a:secret"]})).await;
    let doc: Value = quiet
        .client
        .get(quiet.url("/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc.get("scopes_supported").is_none(), "{doc}");
    assert!(doc["token_endpoint"].as_str().unwrap().ends_with("/oauth2/token"));
}

#[tokio::test]
async fn a_cache_fill_cannot_undo_a_revoke() {
    use keygate_core::SecretHash;
    use keygate_server::verify::{Context, Lookup};
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let (id, key) = app.create_key(&consumer, &[]).await;
    let verifier = &app.state.verifier;
    let hash = SecretHash::of(&key);
    // The interleaving, step by step: a verify misses and reads the store …
    let Lookup::Miss(miss) =
        verifier.verify_cached(&key, &[] as &[&str], Context::at(keygate_server::time::now_ms()))
    else {
        panic!("a key never verified is not cached")
    };
    assert_eq!(miss.hash, hash);
    let ticket = verifier.ticket();
    let stale = keygate_store::Store::find_secret(app.state.store.as_ref(), &hash).await.unwrap();
    // … a revoke commits and invalidates …
    let (status, _) = app.post(&format!("/v1/keys/{id}/revoke"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    // … then the verify finishes with what it read. Its own answer is the stale one …
    let ctx = Context::at(keygate_server::time::now_ms());
    let d = verifier.complete_miss(ticket, miss, stale, &[] as &[&str], ctx);
    assert_eq!(d.code, keygate_core::DecisionCode::Valid);
    // … but it did not cache it: the next request sees the revoke.
    assert_eq!(app.verify_code(&key, &[]).await, "REVOKED");
}
