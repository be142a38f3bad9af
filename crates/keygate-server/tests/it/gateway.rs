//! The gateway in front of a real upstream (an HTTP server on another port of this process): routing,
//! credential checks, what reaches the upstream, streaming, upstream failures and reloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::TestApp;
use crate::oauth::{client, get_token};

/// A real upstream: `/slow` answers after 3 s, `/bytes/N` streams N bytes, `/count` answers how many
/// bytes the request body had (and their SHA-256); anything else echoes method, path, query and headers.
struct Upstream {
    base: String,
    authority: String,
    hits: Arc<AtomicUsize>,
}

async fn upstream() -> Upstream {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(echo).with_state(hits.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = l.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(l, app).await });
    Upstream { base: format!("http://{authority}"), authority, hits }
}

fn headers_json(h: &HeaderMap) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in h {
        out.insert(k.as_str().to_string(), Value::String(v.to_str().unwrap_or("?").to_string()));
    }
    Value::Object(out)
}

async fn echo(State(hits): State<Arc<AtomicUsize>>, req: Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path.ends_with("/stall") {
        // Headers and a first chunk at once, then nothing for 5 s.
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"first",
        ))])
        .chain(futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(bytes::Bytes::from_static(b"late"))
        }));
        return axum::response::Response::new(Body::from_stream(stream));
    }
    if path.ends_with("/drip") {
        // Four chunks 400 ms apart: longer than a 1 s timeout in all, never idle for 1 s (a timer that
        // is never moved would cut the body at 1.0 s, before the last chunk at 1.2 s).
        let stream = futures_util::stream::unfold(0u8, |i| async move {
            if i == 4 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Some((Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'0' + i; 3])), i + 1))
        });
        return axum::response::Response::new(Body::from_stream(stream));
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
        return "late".into_response();
    }
    if let Some((_, n)) = path.split_once("/bytes/") {
        let n: usize = n.parse().unwrap();
        let chunk = vec![b'k'; 64 * 1024];
        let chunks = n / chunk.len();
        let chunk = bytes::Bytes::from(chunk);
        let stream =
            futures_util::stream::iter((0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
        return axum::response::Response::new(Body::from_stream(stream));
    }
    if path.ends_with("/count") {
        let mut body = req.into_body().into_data_stream();
        let (mut n, mut sha) = (0usize, Sha256::new());
        while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
            let chunk = chunk.unwrap();
            n += chunk.len();
            sha.update(&chunk);
        }
        return axum::Json(json!({"bytes": n, "sha256": hex(&sha.finalize())})).into_response();
    }
    let mut resp = axum::Json(json!({
        "method": req.method().as_str(),
        "path": path,
        "query": req.uri().query(),
        "headers": headers_json(req.headers()),
    }))
    .into_response();
    // A hop-by-hop header the gateway must not pass back.
    resp.headers_mut().insert("connection", "x-upstream-hop".parse().unwrap());
    resp.headers_mut().insert("x-upstream-hop", "1".parse().unwrap());
    resp.headers_mut().insert("x-upstream", "yes".parse().unwrap());
    resp
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The status line of a GET sent byte for byte, so that no client library rewrites the path.
async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string()
}

/// A consumer with a key holding `scopes`; returns the secret and the key id.
async fn key(app: &TestApp, scopes: &[&str]) -> (String, String, String) {
    let consumer = app.create_consumer("reader").await;
    let (id, secret) = app.create_key(&consumer, scopes).await;
    (consumer, id, secret)
}

fn routes(up: &Upstream, extra: &str) -> String {
    format!(
        r#"
[[route]]
name = "articles"
path = "/v1/articles"
methods = ["GET", "POST"]
upstream = "{base}/api"
scopes = ["articles:read"]
method_scopes = {{ POST = ["articles:write"] }}

[[route]]
name = "health"
path = "/health"
exact = true
upstream = "{base}"
public = true

[[route]]
name = "keys-only"
path = "/keys-only"
upstream = "{base}"
accept = ["api_key"]
strip_path = true

[[route]]
name = "files"
path = "/files"
upstream = "{base}"
{extra}
"#,
        base = up.base
    )
}

#[tokio::test]
async fn the_gateway_checks_and_forwards_with_identity_and_without_the_credential() {
    let up = upstream().await;
    let app = TestApp::builder().gateway(&routes(&up, "")).start().await;
    let gw = |p: &str| format!("{}{p}", app.gateway_base);
    let (consumer, key_id, secret) = key(&app, &["articles:read"]).await;

    // No credential: 401 with the RFC 6750 challenge, and nothing reaches the upstream.
    let resp = app.client.get(gw("/v1/articles")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
    assert_eq!(up.hits.load(Ordering::SeqCst), 0);

    // Valid: forwarded under the upstream's base path, with the query, the identity, and without the
    // credential or anything the client claimed about itself.
    let resp = app
        .client
        .get(gw("/v1/articles/7?lang=en&x=%2F"))
        .bearer_auth(&secret)
        .header("X-Keygate-Consumer", "someone-else")
        .header("X-Keygate-Scopes", "admin")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("Connection", "x-client-hop")
        .header("X-Client-Hop", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-upstream"], "yes");
    assert!(resp.headers().get("x-upstream-hop").is_none(), "hop-by-hop headers stop at the gateway");
    let e: Value = resp.json().await.unwrap();
    let h = &e["headers"];
    assert_eq!(e["method"], "GET");
    assert_eq!(e["path"], "/api/v1/articles/7");
    assert_eq!(e["query"], "lang=en&x=%2F");
    assert_eq!(h["x-keygate-consumer"], consumer.as_str());
    assert_eq!(h["x-keygate-key-id"], key_id.as_str());
    assert_eq!(h["x-keygate-scopes"], "articles:read");
    assert_eq!(h["x-keygate-kind"], "api_key");
    assert!(h.get("authorization").is_none(), "{h}");
    assert!(h.get("x-client-hop").is_none(), "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "an untrusted client's claim is replaced: {h}");
    assert_eq!(h["host"], up.authority.as_str());
    assert_eq!(h["x-forwarded-host"], app.gateway_base.trim_start_matches("http://"));
    assert!(h["forwarded"].as_str().unwrap().starts_with("for=127.0.0.1;proto=http"), "{h}");
    assert_eq!(up.hits.load(Ordering::SeqCst), 1);

    // X-API-Key works too, and is removed as well.
    let resp = app.client.get(gw("/v1/articles")).header("X-API-Key", &secret).send().await.unwrap();
    let e: Value = resp.json().await.unwrap();
    assert!(e["headers"].get("x-api-key").is_none());
    assert_eq!(e["path"], "/api/v1/articles");

    // Per-method scopes: POST needs articles:write.
    let resp = app.client.post(gw("/v1/articles")).bearer_auth(&secret).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(resp.headers()["www-authenticate"].to_str().unwrap().contains("articles:write"));
    // A method the route does not take; a path no route has; a path that could mean another upstream.
    let resp = app.client.delete(gw("/v1/articles")).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let resp = app.client.get(gw("/admin")).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "not_found");
    let resp = app.client.get(gw("/health/a%2Fb")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "ambiguous_path");
    // Dot segments as sent on the wire (an HTTP client library would resolve them first).
    for raw in ["/health/../v1/articles", "/health/%2e%2e/v1/articles", "/v1//articles"] {
        assert!(raw_get(&app.gateway_base, raw).await.starts_with("HTTP/1.1 400"), "{raw}");
    }
    // `exact`: /health but not below it.
    assert_eq!(app.client.get(gw("/health")).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(app.client.get(gw("/health/x")).send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(up.hits.load(Ordering::SeqCst), 3, "refused requests never reach the upstream");

    // strip_path; a route for API keys only refuses access tokens.
    let resp = app.client.get(gw("/keys-only/a/b")).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["path"], "/a/b");
    let c = client(&app, json!({"consumer_id": consumer, "name": "job", "scopes": ["articles:read"]})).await;
    let token = get_token(&app, &c, &[("grant_type", "client_credentials")]).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = app.client.get(gw("/keys-only/x")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = app.client.get(gw("/v1/articles")).bearer_auth(&token).send().await.unwrap();
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["headers"]["x-keygate-client-id"], c.id.as_str());
    assert_eq!(e["headers"]["x-keygate-kind"], "access_token", "{e}");

    // Revoked: refused on the very next request.
    let (s, _) = app.post(&format!("/v1/keys/{key_id}/revoke"), json!({})).await;
    assert_eq!(s, StatusCode::OK);
    let resp = app.client.get(gw("/v1/articles")).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "REVOKED");
}

#[tokio::test]
async fn rate_limits_apply_at_the_gateway_with_their_headers_and_cost() {
    let up = upstream().await;
    let app = TestApp::builder().gateway(&routes(&up, "cost = 2")).start().await;
    let consumer = app.create_consumer("acme").await;
    let (_, secret) = app
        .create_key_with(json!({"consumer_id": consumer, "name": "k",
            "rate_limits": [{"name": "per_minute", "limit": 5, "window_seconds": 60}]}))
        .await;
    let url = format!("{}/files/a", app.gateway_base);
    for remaining in ["3", "1"] {
        let resp = app.client.get(&url).header("X-API-Key", &secret).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["ratelimit-limit"], "5");
        assert_eq!(resp.headers()["ratelimit-remaining"], remaining, "each request costs 2");
    }
    let resp = app.client.get(&url).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "RATE_LIMITED");
    assert_eq!(up.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bodies_stream_both_ways_and_upstream_failures_are_502_and_504() {
    let up = upstream().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let extra = format!(
        "timeout_seconds = 1\n\n[[route]]\nname = \"down\"\npath = \"/down\"\nupstream = \"http://{closed}\"\npublic = true\n"
    );
    let app = TestApp::builder().gateway(&routes(&up, &extra)).start().await;
    let (_, _, secret) = key(&app, &[]).await;
    let gw = |p: &str| format!("{}{p}", app.gateway_base);

    // 24 MiB up, streamed from a generator (larger than the admin API's body limit), counted upstream.
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let body = futures_util::stream::iter(
        (0..96).map(move |_| Ok::<_, std::io::Error>(http_body::Frame::data(chunk.clone()))),
    );
    let resp = app
        .client
        .post(gw("/files/count"))
        .header("X-API-Key", &secret)
        .body(reqwest::Body::wrap(http_body_util::StreamBody::new(body)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let counted: Value = resp.json().await.unwrap();
    assert_eq!(counted["bytes"], 96 * 256 * 1024);
    assert_eq!(counted["sha256"], hex(&Sha256::digest(vec![7u8; 96 * 256 * 1024])));

    // 32 MiB down.
    let resp = app.client.get(gw("/files/bytes/33554432")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().len(), 33_554_432);

    let resp = app.client.get(gw("/files/slow")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "upstream_timeout");
    // A body that stops flowing for longer than the route's timeout is cut, not waited on.
    let resp = app.client.get(gw("/files/stall")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    assert!(resp.bytes().await.is_err(), "a stalled body ends in an error");
    assert!(started.elapsed() < Duration::from_secs(4), "cut after the 1 s timeout, not the 5 s stall");
    // The timeout is for silence, not for the whole body: one that keeps flowing is passed on whole.
    let resp = app.client.get(gw("/files/drip")).header("X-API-Key", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.expect("the whole dripped body")[..], b"000111222333");
    let resp = app.client.get(gw("/down")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "upstream_unavailable");
}

#[tokio::test]
async fn routes_reload_and_a_bad_file_leaves_the_routes_in_use() {
    let up = upstream().await;
    let app = TestApp::builder().gateway(&routes(&up, "")).start().await;
    let gateway = app.gateway.clone().unwrap();
    let gw = |p: &str| format!("{}{p}", app.gateway_base);
    assert_eq!(app.client.get(gw("/new")).send().await.unwrap().status(), StatusCode::NOT_FOUND);

    let file = gateway.path().to_path_buf();
    let more = format!(
        "{}\n[[route]]\nname = \"new\"\npath = \"/new\"\nupstream = \"{}\"\npublic = true\n",
        routes(&up, ""),
        up.base
    );
    std::fs::write(&file, &more).unwrap();
    assert_eq!(gateway.reload().unwrap(), 5);
    assert_eq!(app.client.get(gw("/new")).send().await.unwrap().status(), StatusCode::OK);

    std::fs::write(&file, "[[route]]\nname = \"broken\"\npath = \"no-slash\"\nupstream = \"http://x\"\n")
        .unwrap();
    let err = gateway.reload().unwrap_err();
    assert!(err.contains("must start with '/'"), "{err}");
    assert_eq!(
        app.client.get(gw("/new")).send().await.unwrap().status(),
        StatusCode::OK,
        "the old routes stay"
    );
}

#[tokio::test]
async fn the_internal_jwt_verifies_with_the_published_keys_and_is_no_access_token() {
    let up = upstream().await;
    let jwt_routes = format!(
        "[internal_jwt]\naudience = \"https://files.internal\"\n{}",
        routes(&up, "internal_jwt = true")
    );
    let app = TestApp::builder().gateway(&jwt_routes).start().await;
    let (consumer, key_id, secret) = key(&app, &["files:read"]).await;
    let resp = app
        .client
        .get(format!("{}/files/x", app.gateway_base))
        .header("X-API-Key", &secret)
        .send()
        .await
        .unwrap();
    let e: Value = resp.json().await.unwrap();
    let jwt = e["headers"]["x-keygate-token"].as_str().unwrap().to_string();

    let header = crate::oauth::jwt_part(&jwt, 0);
    assert_eq!(header["typ"], "keygate-gateway+jwt");
    let jwks: Value =
        app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == header["kid"]).unwrap();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["https://files.internal"]);
    let claims = jsonwebtoken::decode::<Value>(&jwt, &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(), &v)
        .unwrap()
        .claims;
    assert_eq!(claims["key_id"], key_id.as_str());
    assert_eq!(claims["consumer_id"], consumer.as_str());
    assert_eq!(claims["route"], "files");
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() == 60);
    // Replayed at Keygate as a credential, it is nothing.
    assert_ne!(app.verify_code(&jwt, &[]).await, "VALID");
    let resp =
        app.client.get(format!("{}/files/x", app.gateway_base)).bearer_auth(&jwt).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn nothing_of_keygate_reaches_the_upstream_and_no_request_falls_through() {
    let up = upstream().await;
    let text = format!(
        r#"
credential_header = "X-Gateway-Key"

[[route]]
name = "all"
path = "/"
upstream = "{base}"
public = true

[[route]]
name = "admin"
path = "/admin"
methods = ["GET"]
upstream = "{base}"
method_scopes = {{ GET = ["admin:read"] }}
"#,
        base = up.base
    );
    let app = TestApp::builder().gateway(&text).start().await;
    let gw = |p: &str| format!("{}{p}", app.gateway_base);
    let (_, _, secret) = key(&app, &["admin:read"]).await;
    let (_, _, weak) = key(&app, &[]).await;

    // A public route gets no Keygate credential, session cookie, identity claim or method override.
    let resp = app
        .client
        .get(gw("/docs"))
        .header("X-API-Key", &secret)
        .header("Authorization", format!("Bearer {secret}"))
        .header("Cookie", "kg_console=abc; theme=dark; __Host-kg_session=def")
        .header("X-HTTP-Method-Override", "DELETE")
        .header("X-Real-IP", "10.9.9.9")
        .send()
        .await
        .unwrap();
    let h = resp.json::<Value>().await.unwrap()["headers"].clone();
    for gone in ["x-api-key", "authorization", "x-http-method-override", "x-real-ip"] {
        assert!(h.get(gone).is_none(), "{gone}: {h}");
    }
    assert_eq!(h["cookie"], "theme=dark");

    // With a credential header configured, the upstream keeps its own Authorization.
    let resp = app
        .client
        .get(gw("/admin/users"))
        .header("X-Gateway-Key", &secret)
        .header("Authorization", "Bearer upstream-own-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.json::<Value>().await.unwrap()["headers"].clone();
    assert_eq!(h["authorization"], "Bearer upstream-own-token");
    assert!(h.get("x-gateway-key").is_none());

    // A blank credential header does not make a Keygate key in Authorization "the upstream's own".
    let resp = app
        .client
        .get(gw("/admin/users"))
        .header("X-Gateway-Key", "   ")
        .header("Authorization", format!("Bearer {secret}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.json::<Value>().await.unwrap()["headers"].clone();
    assert!(h.get("authorization").is_none(), "the key reached the upstream: {h}");

    // HEAD needs GET's scopes; another method ends at the admin route (405), never at the public one.
    let resp = app.client.head(gw("/admin/users")).header("X-Gateway-Key", &weak).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = app.client.delete(gw("/admin/users")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
    // Spellings that some upstreams read as /admin: refused, or matched as /admin.
    assert!(raw_get(&app.gateway_base, "/docs/..;/admin/users").await.starts_with("HTTP/1.1 400"));
    assert!(raw_get(&app.gateway_base, "/%61dmin/users").await.starts_with("HTTP/1.1 401"));
    let before = up.hits.load(Ordering::SeqCst);
    assert!(raw_get(&app.gateway_base, "http://elsewhere/admin/users").await.starts_with("HTTP/1.1 401"));
    assert_eq!(up.hits.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let app = TestApp::builder()
        .config(|c| c.request_timeout = Duration::from_secs(1))
        .gateway(&routes(&up, ""))
        .start()
        .await;
    for base in [&app.base, &app.gateway_base] {
        let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        // The server closes the connection (answering 408 or nothing) instead of waiting forever.
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(read.is_ok(), "{base}: the connection was still open after 10 s");
        assert!(started.elapsed() >= Duration::from_millis(900), "{base}: closed before the timeout");
    }
    // The limit is per request head, not per connection: one keep-alive connection making a request
    // every 400 ms stays open well past it; left idle, it is closed.
    let mut s = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
    let mut answered = std::time::Instant::now();
    for i in 0..5 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "request {i}: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        answered = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let mut buf = [0u8; 256];
    let idle = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    assert!(idle.is_ok(), "an idle connection is closed after the limit");
    assert!(
        answered.elapsed() >= Duration::from_millis(900),
        "closed before the limit after the last answer"
    );
}
