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

/// An unauthenticated GET of a JSON document (discovery, metadata).
async fn public_json(app: &TestApp, path: &str) -> Value {
    app.client.get(app.url(path)).send().await.unwrap().json().await.unwrap()
}

fn challenge(resp: &reqwest::Response) -> String {
    resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn protected_resources_publish_metadata_name_it_in_401s_and_take_only_their_tokens() {
    let app = TestApp::builder()
        .config(|c| {
            c.protected_resources =
                vec![MCP.into(), "https://other.example.com".into(), "https://api.example.com/v2/mcp".into()];
            c.resource_documentation = Some("https://docs.example.com/".into());
            // The proxy in front of the API is the only peer whose X-Forwarded-* are believed.
            c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
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
    let meta: Value = public_json(&app, "/.well-known/oauth-protected-resource/mcp").await;
    assert_eq!(meta["resource"], MCP);
    assert_eq!(meta["authorization_servers"], json!([app.base]));
    assert_eq!(meta["bearer_methods_supported"], json!(["header"]));
    assert_eq!(meta["resource_documentation"], "https://docs.example.com/");
    assert!(meta["scopes_supported"].as_array().unwrap().contains(&json!("tools:call")), "{meta}");
    // A resource with a longer path has its metadata below the same well-known prefix.
    let deep: Value = public_json(&app, "/.well-known/oauth-protected-resource/v2/mcp").await;
    assert_eq!(deep["resource"], "https://api.example.com/v2/mcp");
    let root: Value = public_json(&app, "/.well-known/oauth-protected-resource").await;
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
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "WRONG_AUDIENCE", "a real token at the wrong place is not a guess: {body}");
    let r = auth(&app, &format!("?resource={MCP}"), &[("authorization", bearer.as_str())]).await;
    assert!(challenge(&r).contains("invalid_token") && challenge(&r).contains(METADATA), "{}", challenge(&r));
    let mine = get_token(&app, &c, &[("grant_type", "client_credentials"), ("resource", MCP)]).await;
    let bearer = format!("Bearer {}", mine["access_token"].as_str().unwrap());
    let mut with_proxy = proxied.to_vec();
    with_proxy.push(("authorization", bearer.as_str()));
    assert_eq!(auth(&app, "?scope=tools:call", &with_proxy).await.status(), StatusCode::OK);
    // A resource-bound token where no resource is named, or at an unconfigured resource that is named:
    // refused (dropping the resource must not skip the audience check).
    let bare = [("authorization", bearer.as_str())];
    assert_eq!(auth(&app, "", &bare).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        auth(&app, "?resource=https://unknown.example.com", &bare).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(auth(&app, &format!("?resource={MCP}"), &bare).await.status(), StatusCode::OK);
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
    let meta: Value = public_json(&app, "/.well-known/oauth-authorization-server").await;
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
    // Each update hands out a new registration access token; the old one stops.
    let old_rat = rat.clone();
    let rat = updated["registration_access_token"].as_str().unwrap().to_string();
    assert_ne!(rat, old_rat);
    assert_eq!(
        app.client.get(&uri).bearer_auth(&old_rat).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
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
    let meta: Value = public_json(&app, "/.well-known/oauth-authorization-server").await;
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

type Docs =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u16, Vec<(String, String)>, String)>>>;

/// A site serving client metadata documents, which the test sets once it knows the site's address.
struct DocSite {
    base: String,
    docs: Docs,
}

impl DocSite {
    async fn start() -> DocSite {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let docs: Docs = Default::default();
        let served = docs.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let served = served.clone();
            async move {
                let found = served.lock().unwrap().get(uri.path()).cloned();
                let Some((status, headers, body)) = found else {
                    return (axum::http::StatusCode::NOT_FOUND, axum::http::HeaderMap::new(), String::new());
                };
                let mut h = axum::http::HeaderMap::new();
                for (k, v) in headers {
                    h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
                }
                (axum::http::StatusCode::from_u16(status).unwrap(), h, body)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        DocSite { base, docs }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn set(&self, path: &str, status: u16, headers: &[(&str, &str)], body: String) {
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.docs.lock().unwrap().insert(path.into(), (status, headers, body));
    }

    /// A well-formed document at `path` naming itself.
    fn agent(&self, path: &str, name: &str) -> String {
        let id = self.url(path);
        let doc = json!({"client_id": id, "client_name": name, "redirect_uris": [AGENT_REDIRECT],
            "token_endpoint_auth_method": "none"});
        self.set(path, 200, &[("cache-control", "max-age=300")], doc.to_string());
        id
    }
}

const AGENT_REDIRECT: &str = "http://127.0.0.1:7777/callback";

/// The whole MCP-style journey of one client: 401 → resource metadata → AS metadata → authorize with
/// PKCE and `resource` → login and consent → token for the resource → call → refresh → call.
async fn journey(app: &TestApp, client_id: &str, consent_must_show: &[&str]) -> String {
    use crate::authcode::{Browser, parse_form, pkce};
    let proxied = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.com"),
        ("x-forwarded-uri", "/mcp"),
    ];
    let r = auth(app, "?scope=tools:call", &proxied).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let c = challenge(&r);
    let metadata_url = c.split("resource_metadata=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert_eq!(metadata_url, METADATA);
    // The proxy routes the resource's well-known path to Keygate.
    let path = metadata_url.trim_start_matches("https://api.example.com");
    let rm: Value = public_json(app, path).await;
    let issuer = rm["authorization_servers"][0].as_str().unwrap();
    let asm: Value = app
        .client
        .get(format!("{issuer}/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (verifier, challenge_) = pkce();
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", AGENT_REDIRECT)
        .append_pair("scope", "tools:call")
        .append_pair("state", "s1")
        .append_pair("code_challenge", &challenge_)
        .append_pair("code_challenge_method", "S256")
        .append_pair("resource", MCP)
        .finish();
    let mut browser = Browser::new();
    let (status, _, html) =
        browser.get(&format!("{}?{q}", asm["authorization_endpoint"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let login = parse_form(&html).set("username", "alice").set("password", "a long passphrase 42");
    let (status, _, html) = browser.submit(&app.base, &login, &[]).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let text = html.replace("&#x2f;", "/");
    for shown in consent_must_show.iter().chain([&MCP]) {
        assert!(text.contains(shown), "the consent page shows {shown}: {html}");
    }
    let (status, headers, _) = browser.submit(&app.base, &parse_form(&html), &[("decision", "allow")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let loc = url::Url::parse(headers["location"].to_str().unwrap()).unwrap();
    let code = loc.query_pairs().find(|(k, _)| k == "code").unwrap().1.into_owned();
    let token_endpoint = asm["token_endpoint"].as_str().unwrap();
    let tok: Value = app
        .client
        .post(token_endpoint)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", AGENT_REDIRECT),
            ("code_verifier", &verifier),
            ("client_id", client_id),
            ("resource", MCP),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let at = tok["access_token"].as_str().unwrap_or_else(|| panic!("{tok}"));
    let bearer = format!("Bearer {at}");
    let mut call = proxied.to_vec();
    call.push(("authorization", bearer.as_str()));
    assert_eq!(auth(app, "?scope=tools:call", &call).await.status(), StatusCode::OK);
    // The same token at another resource is refused.
    let elsewhere = [("authorization", bearer.as_str())];
    assert_eq!(
        auth(app, "?resource=https://other.example.com", &elsewhere).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let renewed: Value = app
        .client
        .post(token_endpoint)
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", tok["refresh_token"].as_str().unwrap()),
            ("client_id", client_id),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer =
        format!("Bearer {}", renewed["access_token"].as_str().unwrap_or_else(|| panic!("{renewed}")));
    let mut call = proxied.to_vec();
    call.push(("authorization", bearer.as_str()));
    assert_eq!(auth(app, "?scope=tools:call", &call).await.status(), StatusCode::OK);
    bearer
}

#[tokio::test]
async fn agents_reach_a_resource_by_registration_or_by_metadata_document() {
    let site = DocSite::start().await;
    let agent = site.agent("/agent.json", "Agent Smith");
    let app = TestApp::builder()
        .config(|c| {
            c.protected_resources = vec![MCP.into(), "https://other.example.com".into()];
            c.registration.mode = keygate_server::oauth::register::RegistrationMode::Open;
            c.registration.scopes = vec!["tools:call".into()];
            c.metadata_docs.enabled = true;
            c.metadata_docs.allow_private = true;
            c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        })
        .start()
        .await;
    let (s, _) =
        app.post("/v1/users", json!({"username": "alice", "password": "a long passphrase 42"})).await;
    assert_eq!(s, StatusCode::CREATED);
    let asm: Value = public_json(&app, "/.well-known/oauth-authorization-server").await;
    assert_eq!(asm["client_id_metadata_document_supported"], true);

    // 1. Dynamic registration.
    let (status, reg) =
        register(&app, json!({"client_name": "Registered Agent", "redirect_uris": [AGENT_REDIRECT]}), None)
            .await;
    assert_eq!(status, StatusCode::CREATED, "{reg}");
    journey(&app, reg["client_id"].as_str().unwrap(), &["Registered Agent"]).await;

    // 2. A metadata document: the consent page names the client and the host that vouches for it.
    let old = journey(&app, &agent, &["Agent Smith", "127.0.0.1"]).await;
    let (_, listed) = app.get("/v1/clients?limit=100").await;
    let stored =
        listed["items"].as_array().unwrap().iter().find(|c| c["client_id"] == agent.as_str()).cloned();
    assert_eq!(stored.unwrap()["name"], "Agent Smith", "{listed}");

    // Refusals, each an error page and no client: a document naming another client_id, one that
    // redirects, one too large, one that is not JSON, a redirect URI the document does not list.
    let authorize = |client_id: &str, redirect: &str| {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect)
            .append_pair("code_challenge", &"a".repeat(43))
            .append_pair("code_challenge_method", "S256")
            .finish();
        app.url(&format!("/oauth2/authorize?{q}"))
    };
    site.set(
        "/liar.json",
        200,
        &[],
        json!({"client_id": "https://trusted.example/agent.json",
        "redirect_uris": [AGENT_REDIRECT]})
        .to_string(),
    );
    site.set("/moved.json", 302, &[("location", "/agent.json")], String::new());
    site.set(
        "/big.json",
        200,
        &[],
        format!("{{\"client_id\": \"{}\", \"pad\": \"{}\"}}", site.url("/big.json"), "x".repeat(10_000)),
    );
    site.set("/html.json", 200, &[], "<html>hello</html>".into());
    site.set(
        "/wild.json",
        200,
        &[],
        json!({"client_id": site.url("/wild.json"), "redirect_uris": ["https://*.example/cb"]}).to_string(),
    );
    for (path, why) in [
        ("/liar.json", "another client_id"),
        ("/moved.json", "302"),
        ("/big.json", "larger than"),
        ("/html.json", "not a JSON"),
        ("/wild.json", "wildcards"),
        ("/missing.json", "404"),
    ] {
        let r = app.client.get(authorize(&site.url(path), AGENT_REDIRECT)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let page = r.text().await.unwrap();
        assert!(page.contains(why), "{path}: {page}");
        assert_eq!(
            app.get(&format!("/v1/clients/{}", urlencode(&site.url(path)))).await.0,
            StatusCode::NOT_FOUND
        );
    }
    let r = app.client.get(authorize(&agent, "http://127.0.0.1:7777/elsewhere")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("not registered"));
    // Without naming the resource, a self-registered client gets no token for every resource at once.
    let no_redirects =
        reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirects.get(authorize(&agent, AGENT_REDIRECT)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(r.headers()["location"].to_str().unwrap().contains("error=invalid_target"));

    // Deleted, and made again by the next authorization: its earlier tokens stay dead.
    let (status, _) =
        app.call(reqwest::Method::DELETE, &format!("/v1/clients/{}", urlencode(&agent)), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let q = format!("{}&resource={}", authorize(&agent, AGENT_REDIRECT), urlencode(MCP));
    assert_eq!(app.client.get(q).send().await.unwrap().status(), StatusCode::OK);
    let mut call = vec![
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.com"),
        ("x-forwarded-uri", "/mcp"),
    ];
    call.push(("authorization", old.as_str()));
    assert_eq!(auth(&app, "", &call).await.status(), StatusCode::UNAUTHORIZED);
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn metadata_documents_on_private_addresses_or_denied_hosts_are_refused() {
    let site = DocSite::start().await;
    let agent = site.agent("/agent.json", "Local Agent");
    // Without allow_private: http and loopback addresses are refused before anything is fetched.
    let app = TestApp::builder()
        .config(|c| {
            c.metadata_docs.enabled = true;
            c.metadata_docs.deny_domains = vec!["evil.example".into()];
        })
        .start()
        .await;
    for (id, why) in [
        (agent.clone(), "https"),
        (agent.replacen("http://", "https://", 1), "loopback"),
        ("https://agent.evil.example/agent.json".to_string(), "not accepted"),
        ("https://10.0.0.7/agent.json".to_string(), "private"),
    ] {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("response_type", "code")
            .append_pair("client_id", &id)
            .append_pair("redirect_uri", AGENT_REDIRECT)
            .finish();
        let r = app.client.get(app.url(&format!("/oauth2/authorize?{q}"))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{id}");
        let page = r.text().await.unwrap();
        assert!(page.contains(why), "{id}: {page}");
    }
    // Off (the default): a URL client_id is just an unknown client.
    let off = TestApp::start().await;
    let q: String = form_urlencoded::Serializer::new(String::new()).append_pair("client_id", &agent).finish();
    let r = off.client.get(off.url(&format!("/oauth2/authorize?{q}"))).send().await.unwrap();
    assert!(r.text().await.unwrap().contains("not accepted here"));
}

#[tokio::test]
async fn forwarded_headers_name_the_resource_only_from_a_trusted_proxy() {
    let app = TestApp::builder().config(|c| c.protected_resources = vec![MCP.into()]).start().await;
    let proxied = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.com"),
        ("x-forwarded-uri", "/mcp"),
    ];
    // Any client can send these headers; without trusted_proxies they name nothing.
    assert!(!challenge(&auth(&app, "", &proxied).await).contains("resource_metadata"));
    assert!(challenge(&auth(&app, &format!("?resource={MCP}"), &[]).await).contains(METADATA));
}
