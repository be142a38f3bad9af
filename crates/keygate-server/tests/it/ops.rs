//! Health, readiness, metrics, OpenAPI and the docs page.

use reqwest::StatusCode;

use crate::helpers::TestApp;

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::start().await;
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_decisions_and_requests() {
    let app = TestApp::start().await;
    app.verify("garbage", &[]).await;
    app.verify("garbage", &[]).await;
    let admin = app.admin_key.clone();
    app.verify(&admin, &[]).await;
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("keygate_verify_decisions_total{code=\"MALFORMED\"} 2"), "{text}");
    assert!(text.contains("keygate_verify_decisions_total{code=\"VALID\"} 1"), "{text}");
    // The latency histogram: cumulative buckets ending in +Inf, a count of the three decisions, a sum.
    assert!(text.contains("# TYPE keygate_verify_duration_seconds histogram"), "{text}");
    assert!(text.contains("keygate_verify_duration_seconds_bucket{le=\"0.00001\"}"), "{text}");
    assert!(text.contains("keygate_verify_duration_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
    assert!(text.contains("keygate_verify_duration_seconds_count 3"), "{text}");
    let sum = text
        .lines()
        .find_map(|l| l.strip_prefix("keygate_verify_duration_seconds_sum "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(sum.is_some_and(|s| s > 0.0 && s < 10.0), "{text}");
    let buckets: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("keygate_verify_duration_seconds_bucket"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(buckets.len(), 13, "{text}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative: {buckets:?}");
    assert!(
        text.contains("keygate_http_requests_total{method=\"POST\",route=\"/v1/verify\",status=\"200\"} 3"),
        "{text}"
    );
    assert!(!text.contains(&admin[12..]), "a secret in metrics");
}

/// The hot routes are served before the router (`hot.rs`): they must answer exactly as through it —
/// body limit, content type, methods, paths the router does not match — and be counted by route.
#[tokio::test]
async fn the_hot_routes_answer_like_the_router() {
    use reqwest::Method;
    let app = TestApp::start().await;
    let admin = app.admin_key.clone();
    let big = serde_json::json!({"credential": "y".repeat(100 * 1024)}).to_string();
    let resp = app
        .client
        .post(app.url("/v1/verify"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["code"], "payload_too_large");
    let resp = app.client.post(app.url("/v1/verify")).bearer_auth(&admin).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let resp = app
        .client
        .post(app.url("/v1/verify"))
        .header("content-type", "application/json")
        .body(serde_json::json!({"credential": admin}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "verify needs a caller");
    for (method, path, status) in [
        (Method::PUT, "/v1/verify", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/v1/verify", StatusCode::METHOD_NOT_ALLOWED),
        (Method::POST, "/v1/verify/", StatusCode::NOT_FOUND),
        (Method::GET, "/v1/auth/", StatusCode::NOT_FOUND),
        (Method::POST, "/v1/auth", StatusCode::METHOD_NOT_ALLOWED),
        (Method::HEAD, "/v1/auth", StatusCode::UNAUTHORIZED),
        (Method::GET, "/v1/auth", StatusCode::UNAUTHORIZED),
        (Method::GET, "/v1/auth/orders/17?x=1", StatusCode::UNAUTHORIZED),
        (Method::GET, "/oauth2/token", StatusCode::METHOD_NOT_ALLOWED),
        (Method::POST, "/oauth2/token", StatusCode::BAD_REQUEST),
        (Method::POST, "/oauth2/introspect", StatusCode::BAD_REQUEST),
    ] {
        let resp = app.client.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
    }
    let resp =
        app.client.get(app.url("/v1/auth/orders/17")).header("x-api-key", &admin).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-keygate-key-id"));
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        r#"keygate_http_requests_total{method="POST",route="/v1/verify",status="413"} 1"#,
        r#"keygate_http_requests_total{method="POST",route="/v1/verify",status="415"} 1"#,
        r#"keygate_http_requests_total{method="GET",route="/v1/auth",status="401"} 1"#,
        r#"keygate_http_requests_total{method="GET",route="/v1/auth/{*path}",status="401"} 1"#,
        r#"keygate_http_requests_total{method="GET",route="/v1/auth/{*path}",status="200"} 1"#,
        r#"keygate_http_requests_total{method="HEAD",route="/v1/auth",status="401"} 1"#,
        r#"keygate_http_requests_total{method="POST",route="/oauth2/token",status="400"} 1"#,
        r#"keygate_http_requests_total{method="POST",route="/oauth2/introspect",status="400"} 1"#,
    ] {
        assert!(text.contains(&format!("{line}\n")), "{line}\n{text}");
    }
}

/// A client that sends a verify's headers and then trickles its body is answered 503 `request_timeout` at
/// the limit (the hot path's time limit), and the answer is counted.
#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_request_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app =
        TestApp::builder().config(|c| c.request_timeout = std::time::Duration::from_secs(1)).start().await;
    let mut s = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST /v1/verify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"cred",
        app.admin_key
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 2048];
    let n =
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "answered before the limit");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let line = r#"keygate_http_requests_total{method="POST",route="/v1/verify",status="503"} 1"#;
    assert!(metrics.contains(&format!("{line}\n")), "{metrics}");
}

/// On the OAuth endpoints the same cut-off answers in RFC 6749's shape (a client library reads `error`),
/// through the hot path (`/oauth2/token`) and through the router (`/oauth2/revoke`), while the browser
/// pages keep Keygate's.
#[tokio::test]
async fn a_trickled_oauth_request_is_cut_off_in_the_oauth_error_shape() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app =
        TestApp::builder().config(|c| c.request_timeout = std::time::Duration::from_secs(1)).start().await;
    for (path, shape) in [
        ("/oauth2/token", "oauth"),
        ("/oauth2/revoke", "oauth"),
        ("/oauth2/register", "oauth"),
        ("/oauth2/device", "keygate"),
    ] {
        let mut s = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type="
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(text.starts_with("HTTP/1.1 503"), "{path}: {text}");
        let body: serde_json::Value =
            serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).expect("a JSON body");
        if shape == "oauth" {
            assert_eq!(body["error"], "temporarily_unavailable", "{path}: {text}");
            assert!(body["error_description"].as_str().unwrap().contains("request_timeout_seconds"));
            assert!(text.to_ascii_lowercase().contains("cache-control: no-store"), "{path}: {text}");
        } else {
            assert_eq!(body["code"], "request_timeout", "{path}: {text}");
        }
    }
}

#[tokio::test]
async fn openapi_covers_every_route_and_docs_work_offline() {
    let app = TestApp::start().await;
    let spec: serde_json::Value =
        app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let expected = [
        ("/v1/consumers", &["post", "get"][..]),
        ("/v1/consumers/{id}", &["get", "patch"]),
        ("/v1/consumers/{id}/disable", &["post"]),
        ("/v1/consumers/{id}/enable", &["post"]),
        ("/v1/keys", &["post", "get"]),
        ("/v1/keys/{id}", &["get", "patch"]),
        ("/v1/keys/{id}/disable", &["post"]),
        ("/v1/keys/{id}/enable", &["post"]),
        ("/v1/keys/{id}/revoke", &["post"]),
        ("/v1/keys/{id}/rotate", &["post"]),
        ("/v1/keys/{id}/quota", &["post"]),
        ("/v1/keys/{id}/usage", &["get"]),
        ("/v1/keys/import", &["post"]),
        ("/v1/consumers/{id}/usage", &["get"]),
        ("/v1/clients", &["post", "get"]),
        ("/v1/clients/{id}", &["get", "patch", "delete"]),
        ("/v1/clients/{id}/disable", &["post"]),
        ("/v1/clients/{id}/enable", &["post"]),
        ("/v1/clients/{id}/revoke-tokens", &["post"]),
        ("/v1/clients/{id}/rotate-secret", &["post"]),
        ("/v1/signing-keys", &["get"]),
        ("/v1/signing-keys/rotate", &["post"]),
        ("/v1/signing-keys/{kid}/revoke", &["post"]),
        ("/oauth2/token", &["post"]),
        ("/oauth2/authorize", &["get"]),
        ("/oauth2/authorize/login", &["post"]),
        ("/oauth2/authorize/consent", &["post"]),
        ("/v1/users", &["post", "get"]),
        ("/v1/users/{id}", &["get", "patch", "delete"]),
        ("/v1/users/{id}/disable", &["post"]),
        ("/v1/users/{id}/enable", &["post"]),
        ("/v1/users/{id}/password", &["post"]),
        ("/v1/users/{id}/grants", &["get"]),
        ("/v1/users/{id}/grants/{grant_id}", &["delete"]),
        ("/v1/scopes", &["get"]),
        ("/v1/users/{id}/tokens", &["post", "get"]),
        ("/v1/users/{id}/tokens/{token_id}", &["delete"]),
        ("/v1/users/{id}/tokens/{token_id}/rotate", &["post"]),
        ("/v1/tokens/expiring", &["get"]),
        ("/oauth2/device_authorization", &["post"]),
        ("/oauth2/device", &["get", "post"]),
        ("/v1/scopes/{scope}", &["put", "delete"]),
        ("/oauth2/introspect", &["post"]),
        ("/oauth2/revoke", &["post"]),
        ("/.well-known/oauth-authorization-server", &["get"]),
        ("/.well-known/jwks.json", &["get"]),
        ("/v1/audit", &["get"]),
        ("/v1/plans", &["post", "get"]),
        ("/v1/plans/{id}", &["get", "patch", "delete"]),
        ("/v1/portal/invitations", &["post"]),
        ("/v1/usage", &["get"]),
        ("/v1/usage/leaders", &["get"]),
        ("/v1/keys/lowest-quota", &["get"]),
        ("/v1/keys/expiring", &["get"]),
        ("/v1/webhooks", &["post", "get"]),
        ("/v1/webhooks/{id}", &["get", "patch", "delete"]),
        ("/v1/webhooks/{id}/rotate-secret", &["post"]),
        ("/v1/webhooks/{id}/deliveries", &["get"]),
        ("/v1/events", &["get"]),
        ("/v1/event-types", &["get"]),
        ("/v1/leaks", &["post", "get"]),
        ("/oauth2/register", &["post"]),
        ("/oauth2/register/{client_id}", &["get", "put", "delete"]),
        ("/.well-known/oauth-protected-resource", &["get"]),
        ("/.well-known/oauth-protected-resource/{*path}", &["get"]),
        ("/v1/verify", &["post"]),
        ("/v1/auth", &["get"]),
        ("/v1/auth/{*path}", &["get"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
        ("/metrics", &["get"]),
    ];
    for (path, methods) in expected {
        for m in methods {
            assert!(paths.get(path).and_then(|p| p.get(*m)).is_some(), "{m} {path} missing from the spec");
        }
    }
    assert_eq!(paths.len(), expected.len(), "the spec lists a route this test does not know");
    // The verify answer is documented by the structs that are serialised.
    let schemas = &spec["components"]["schemas"];
    for (schema, field) in
        [("ValidBody", "key_id"), ("TokenBody", "client_id"), ("InvalidBody", "missing_scopes")]
    {
        assert!(
            schemas[schema]["properties"].get(field).is_some(),
            "{schema}.{field} missing: {}",
            schemas[schema]
        );
    }

    // The docs page and every script and stylesheet it loads come from this server.
    let html = app.client.get(app.url("/docs/")).send().await.unwrap().text().await.unwrap();
    assert!(html.contains("swagger"), "{html}");
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = part.split('"').next().unwrap();
            assert!(!target.starts_with("http"), "docs load {target} from the network");
            let url = if target.starts_with('/') {
                app.url(target)
            } else {
                app.url(&format!("/docs/{}", target.trim_start_matches("./")))
            };
            let status = app.client.get(&url).send().await.unwrap().status();
            assert_eq!(status, StatusCode::OK, "{url}");
        }
    }
    let init =
        app.client.get(app.url("/docs/swagger-initializer.js")).send().await.unwrap().text().await.unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
}
