//! Bad input gets a 4xx with a stable code, never a 500, and writes nothing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::TestApp;

async fn raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(&app.admin_key).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn count_keys(app: &TestApp) -> usize {
    app.get("/v1/keys?limit=1000").await.1["items"].as_array().unwrap().len()
}

#[tokio::test]
async fn malformed_bodies() {
    let app = TestApp::start().await;
    let json_ct = Some("application/json");
    type Case = (&'static str, Option<&'static str>, Vec<u8>, StatusCode, &'static str);
    let cases: Vec<Case> = vec![
        ("/v1/consumers", json_ct, b"{not json".to_vec(), StatusCode::BAD_REQUEST, "malformed_json"),
        ("/v1/consumers", json_ct, b"".to_vec(), StatusCode::BAD_REQUEST, "malformed_json"),
        ("/v1/consumers", json_ct, br#"{"name": 5}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_request"),
        (
            "/v1/consumers",
            json_ct,
            br#"{"name": "a", "color": "red"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        ("/v1/consumers", json_ct, br#"{}"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_request"),
        ("/v1/consumers", json_ct, br#"[1,2]"#.to_vec(), StatusCode::BAD_REQUEST, "invalid_request"),
        (
            "/v1/consumers",
            None,
            br#"{"name": "a"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/v1/consumers",
            Some("text/plain"),
            br#"{"name": "a"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "/v1/verify",
            json_ct,
            br#"{"credential": ["x"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/keys",
            json_ct,
            br#"{"consumer_id": "c", "name": "n", "environment": "prod"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/keys/key_x/rotate",
            json_ct,
            br#"{"overlap_seconds": -1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/keys/key_x/rotate",
            json_ct,
            br#"{"overlap"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
    ];
    for (path, ct, body, status, code) in cases {
        let shown = String::from_utf8_lossy(&body).to_string();
        let (got, err) = raw(&app, Method::POST, path, ct, body).await;
        assert_eq!(got, status, "{path} {shown}: {err}");
        assert_eq!(err["code"], code, "{path} {shown}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Nothing was created by any of them.
    let (_, list) = app.get("/v1/consumers").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "only the system consumer");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let app = TestApp::start().await;
    let big = json!({"name": "x", "metadata": {"blob": "y".repeat(100 * 1024)}}).to_string().into_bytes();
    let (status, err) = raw(&app, Method::POST, "/v1/consumers", Some("application/json"), big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err["code"], "payload_too_large");
}

/// A body over the limit on an endpoint that reads it raw (forms, imports, registration) is a typed error
/// too, never axum's plain text: RFC 6749's shape on the OAuth endpoints programs call, Keygate's
/// elsewhere (the browser pages included).
#[tokio::test]
async fn oversized_raw_bodies_are_typed_errors_in_the_endpoints_shape() {
    let app = TestApp::start().await;
    let form = Some("application/x-www-form-urlencoded");
    let big = || format!("grant_type=client_credentials&x={}", "y".repeat(100 * 1024)).into_bytes();
    for path in ["/oauth2/token", "/oauth2/introspect", "/oauth2/revoke", "/oauth2/device_authorization"] {
        let (status, err) = raw(&app, Method::POST, path, form, big()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {err}");
        assert_eq!(err["error"], "invalid_request", "{path}: {err}");
        assert!(err["error_description"].as_str().is_some_and(|m| m.contains("larger")), "{path}: {err}");
    }
    let (status, err) = raw(&app, Method::POST, "/oauth2/register", Some("application/json"), big()).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("invalid_request")),
        "{err}"
    );
    for (path, ct) in [
        ("/v1/keys/key_0/rotate", Some("application/json")),
        ("/oauth2/authorize/login", form),
        ("/oauth2/device", form),
        ("/console/login", form),
        ("/portal/login", form),
    ] {
        let (status, err) = raw(&app, Method::POST, path, ct, big()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {err}");
        assert_eq!(err["code"], "payload_too_large", "{path}: {err}");
    }
}

/// A path segment axum cannot decode, and a method a route does not take, are typed errors in the
/// endpoint's shape too (axum's own path rejection is plain text).
#[tokio::test]
async fn unreadable_paths_and_wrong_methods_are_typed_errors_in_the_endpoints_shape() {
    let app = TestApp::start().await;
    for path in ["/v1/keys/%FF", "/v1/consumers/%C3%28/usage", "/v1/users/%FF"] {
        let (status, err) = raw(&app, Method::GET, path, None, Vec::new()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {err}");
        assert_eq!(err["code"], "invalid_path", "{path}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| m.contains("UTF-8")), "{path}: {err}");
    }
    let (status, err) = raw(&app, Method::GET, "/oauth2/register/%FF", None, Vec::new()).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")), "{err}");
    let resp = app.client.get(app.url("/oauth2/token")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "POST");
    assert_eq!(resp.headers()["cache-control"], "no-store");
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_request");
    let (status, err) = raw(&app, Method::GET, "/v1/verify", None, Vec::new()).await;
    assert_eq!((status, err["code"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
}

#[tokio::test]
async fn invalid_values_name_their_field() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("acme").await;
    let before = count_keys(&app).await;
    let key = |extra: Value| {
        let mut body = json!({"consumer_id": consumer, "name": "k", "scopes": ["a"]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = vec![
        (key(json!({"scopes": ["has space"]})), "scopes"),
        (key(json!({"scopes": [""]})), "scopes"),
        (key(json!({"scopes": ["x".repeat(200)]})), "scopes"),
        (key(json!({"scopes": (0..101).map(|i| format!("s{i}")).collect::<Vec<_>>()})), "scopes"),
        (key(json!({"expires_at": "2001-01-01T00:00:00Z"})), "expires_at"),
        (key(json!({"expires_at": "tomorrow"})), "expires_at"),
        (key(json!({"metadata": [1, 2]})), "metadata"),
        (key(json!({"metadata": {"big": "z".repeat(9000)}})), "metadata"),
        (key(json!({"name": ""})), "name"),
        (key(json!({"name": "a\u{0}b"})), "name"),
        (key(json!({"name": "n".repeat(201)})), "name"),
    ];
    for (body, field) in cases {
        let (status, err) = app.post("/v1/keys", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(err["code"], "validation_failed", "{err}");
        assert_eq!(err["field"], field, "{err}");
    }
    let (status, err) = app.post("/v1/keys", key(json!({"consumer_id": "cons_nope"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(err["field"], "consumer_id");
    assert_eq!(count_keys(&app).await, before, "no rejected request wrote a key");

    let (status, err) = app.patch("/v1/keys/key_whatever", json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (id, _) = app.create_key(&consumer, &[]).await;
    let (status, err) = app.patch(&format!("/v1/keys/{id}"), json!({})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    let (status, err) = app.patch(&format!("/v1/keys/{id}"), json!({"scopes": ["bad scope"]})).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("scopes")));
    let (status, _) = app.patch(&format!("/v1/consumers/{consumer}"), json!({"metadata": "x"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn unknown_ids_routes_methods_and_queries() {
    let app = TestApp::start().await;
    for path in ["/v1/keys/key_nope", "/v1/consumers/cons_nope", "/v1/keys/%2e%2e%2fetc", "/v1/nothing"] {
        let (status, err) = app.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(err["code"], "not_found", "{path}");
    }
    for path in [
        "/v1/keys/key_nope/revoke",
        "/v1/keys/key_nope/disable",
        "/v1/keys/key_nope/rotate",
        "/v1/consumers/cons_nope/disable",
    ] {
        let (status, _) = app.post(path, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
    let (status, err) = app.call(Method::DELETE, "/v1/consumers", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(err["code"], "method_not_allowed");
    for q in ["limit=0", "limit=5000"] {
        let (status, err) = app.get(&format!("/v1/keys?{q}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{q}: {err}");
    }
    for q in ["limit=abc", "bogus=1"] {
        let (status, err) = app.get(&format!("/v1/consumers?{q}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(err["code"], "invalid_query");
    }
}

#[tokio::test]
async fn locked_database_answers_503_and_loses_nothing() {
    use sqlx::Connection;
    let app = TestApp::builder().sqlite().busy_timeout(Duration::from_millis(200)).start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, secret) = app.create_key(&consumer, &[]).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");

    // Another process holds the write lock.
    let path = app.data_dir.join("keygate.db");
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut other).await.unwrap();

    let (status, err) = app.post("/v1/consumers", json!({"name": "while locked"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(err["code"], "storage_unavailable");
    // Cached verification keeps working while the database is locked.
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");

    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);
    let (status, _) = app.post("/v1/consumers", json!({"name": "after"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, list) = app.get("/v1/consumers").await;
    let names: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"after"));
    assert!(!names.contains(&"while locked"), "the refused request wrote nothing");
}

/// PostgreSQL unreachable (here: the database refuses every connection, and the open ones are ended):
/// cached verification keeps answering, admin calls answer 503 and write nothing, `/readyz` fails; once
/// the database is back, everything works again.
#[tokio::test]
async fn postgres_unreachable_answers_503_and_loses_nothing() {
    use sqlx::Connection;
    let app = TestApp::builder().busy_timeout(Duration::from_millis(300)).postgres().await.start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, secret) = app.create_key(&consumer, &[]).await;
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID");
    let url = app.state.config.database_url.clone().unwrap();
    let (server, name) = url.expose().rsplit_once('/').unwrap();
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres")).await.unwrap();
    let cut = |allow: bool| {
        format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS {allow}; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND {allow} = false"
        )
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(cut(false))).execute(&mut admin).await.unwrap();

    let (status, err) = app.post("/v1/consumers", json!({"name": "while down"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    assert_eq!(err["code"], "storage_unavailable");
    assert_eq!(app.verify_code(&secret, &[]).await, "VALID", "cached verification keeps answering");
    let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    sqlx::raw_sql(sqlx::AssertSqlSafe(cut(true))).execute(&mut admin).await.unwrap();
    let mut created = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        created = app.post("/v1/consumers", json!({"name": "after"})).await.0;
        if created == StatusCode::CREATED {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(created, StatusCode::CREATED, "back once the database is");
    let (_, list) = app.get("/v1/consumers").await;
    let names: Vec<&str> =
        list["items"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"after"));
    assert!(!names.contains(&"while down"), "the refused request wrote nothing");
}
