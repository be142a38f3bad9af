//! Users and user-delegated tokens: the authorization code flow with PKCE, the login and consent
//! pages driven as a scripted browser would (parsing the HTML forms), refresh-token rotation and reuse
//! detection, and everything that must stop a user's tokens.

use std::collections::HashMap;

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::Digest;

use crate::helpers::TestApp;

const REDIRECT: &str = "https://app.example.com/callback";
const PASSWORD: &str = "correct horse battery";

/// A browser: keeps its cookies, follows no redirects, reads forms.
pub struct Browser {
    pub http: reqwest::Client,
    cookies: HashMap<String, String>,
}

/// What a page's one form holds: its action and its fields.
#[derive(Debug)]
pub struct PageForm {
    action: String,
    fields: Vec<(String, String)>,
}

/// The value of `name="…"`-style attributes in one tag.
fn attrs(tag: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = tag;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].rsplit([' ', '\n', '<']).next().unwrap_or("").to_string();
        let after = &rest[eq + 2..];
        let end = after.find('"').unwrap();
        out.insert(name, after[..end].replace("&amp;", "&").replace("&quot;", "\"").replace("&#x2f;", "/"));
        rest = &after[end + 1..];
    }
    out
}

pub fn parse_form(html: &str) -> PageForm {
    assert_eq!(html.matches("<form").count(), 1, "one form per page: {html}");
    let start = html.find("<form").unwrap();
    let form = &html[start..html[start..].find("</form>").unwrap() + start];
    let action = attrs(&form[..form.find('>').unwrap()])["action"].clone();
    let mut fields = Vec::new();
    for tag in form.split("<input").skip(1) {
        let a = attrs(&tag[..tag.find('>').unwrap()]);
        if let Some(name) = a.get("name") {
            fields.push((name.clone(), a.get("value").cloned().unwrap_or_default()));
        }
    }
    PageForm { action, fields }
}

impl PageForm {
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.fields.retain(|(n, _)| n != name);
        self.fields.push((name.into(), value.into()));
        self
    }
}

impl Browser {
    pub fn new() -> Self {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Browser { http, cookies: HashMap::new() }
    }

    fn remember(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all("set-cookie") {
            let pair = v.to_str().unwrap().split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            self.cookies.insert(k.to_string(), v.to_string());
        }
    }

    pub fn cookie_value(&self, name: &str) -> Option<String> {
        self.cookies.get(name).cloned()
    }

    fn cookie(&self) -> Option<String> {
        (!self.cookies.is_empty())
            .then(|| self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; "))
    }

    pub async fn get(&mut self, url: &str) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut req = self.http.get(url);
        if let Some(c) = &self.cookie() {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        self.remember(&resp);
        (resp.status(), resp.headers().clone(), resp.text().await.unwrap())
    }

    /// Posts form fields to `url` with the browser's cookies and any extra headers.
    pub async fn post(
        &mut self,
        url: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut req = self.http.post(url).form(fields);
        if let Some(c) = &self.cookie() {
            req = req.header("cookie", c);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        self.remember(&resp);
        (resp.status(), resp.headers().clone(), resp.text().await.unwrap())
    }

    pub async fn submit(
        &mut self,
        base: &str,
        form: &PageForm,
        extra: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut fields: Vec<(String, String)> = form.fields.clone();
        fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut req = self.http.post(format!("{base}{}", form.action)).form(&fields);
        if let Some(c) = &self.cookie() {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        self.remember(&resp);
        (resp.status(), resp.headers().clone(), resp.text().await.unwrap())
    }
}

fn location_params(headers: &reqwest::header::HeaderMap) -> HashMap<String, String> {
    let loc = headers["location"].to_str().unwrap();
    assert!(loc.starts_with(REDIRECT), "redirects only to the registered URI: {loc}");
    let url = url::Url::parse(loc).unwrap();
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

pub fn pkce() -> (String, String) {
    let verifier = format!("v{}", "x".repeat(50));
    let challenge =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

struct Setup {
    app: TestApp,
    client_id: String,
    secret: String,
    user_id: String,
}

async fn setup_with(app: TestApp, client_extra: Value) -> Setup {
    let consumer = app.create_consumer("acme").await;
    let mut body = json!({"consumer_id": consumer, "name": "Reader App", "scopes": ["articles:read", "articles:write"],
        "grant_types": ["authorization_code", "refresh_token"], "redirect_uris": [REDIRECT]});
    for (k, v) in client_extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, c) = app.post("/v1/clients", body).await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    let (s, u) = app
        .post("/v1/users", json!({"username": "Alice", "password": PASSWORD, "email": "alice@example.com"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{u}");
    assert_eq!(u["has_password"], true);
    assert!(u.get("password_hash").is_none() && !u.to_string().contains(PASSWORD), "{u}");
    let (s, _) = app
        .call(Method::PUT, "/v1/scopes/articles:read", Some(json!({"description": "Read your articles"})))
        .await;
    assert_eq!(s, StatusCode::OK);
    Setup {
        client_id: c["client_id"].as_str().unwrap().into(),
        secret: c["client_secret"].as_str().unwrap_or_default().into(),
        user_id: u["id"].as_str().unwrap().into(),
        app,
    }
}

async fn setup() -> Setup {
    setup_with(TestApp::start().await, json!({})).await
}

fn authorize_url(s: &Setup, scope: &str, challenge: &str, state: &str) -> String {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", &s.client_id)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", scope)
        .append_pair("state", state)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256")
        .finish();
    s.app.url(&format!("/oauth2/authorize?{q}"))
}

/// Authorize → login → consent (allow) → the code.
async fn get_code(s: &Setup, browser: &mut Browser, scope: &str, challenge: &str) -> String {
    let (status, headers, html) = browser.get(&authorize_url(s, scope, challenge, "st-1")).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("script-src"), "{csp}");
    assert!(html.contains("name=\"username\"") && html.contains("name=\"password\""), "login page: {html}");
    let login = parse_form(&html).set("username", "alice").set("password", PASSWORD);
    let (status, headers, html) = browser.submit(&s.app.base, &login, &[]).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with("kg_session=") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(html.contains("Reader App") && html.contains("Read your articles"), "consent page: {html}");
    let consent = parse_form(&html);
    let (status, headers, _) = browser.submit(&s.app.base, &consent, &[("decision", "allow")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let p = location_params(&headers);
    assert_eq!(p["state"], "st-1");
    assert_eq!(p["iss"], s.app.base, "RFC 9207 iss");
    p["code"].clone()
}

async fn token(s: &Setup, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let mut req = s.app.client.post(s.app.url("/oauth2/token")).form(form);
    if !s.secret.is_empty() {
        req = req.basic_auth(&s.client_id, Some(&s.secret));
    }
    let resp = req.send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn exchange(s: &Setup, code: &str, verifier: &str) -> (StatusCode, Value) {
    token(
        s,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await
}

async fn refresh(s: &Setup, rt: &str) -> (StatusCode, Value) {
    token(s, &[("grant_type", "refresh_token"), ("refresh_token", rt)]).await
}

#[tokio::test]
async fn the_oauth2_crate_drives_the_whole_flow_with_pkce_refresh_and_revocation() {
    use oauth2::basic::BasicClient;
    use oauth2::{
        AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope,
        TokenResponse, TokenUrl,
    };
    let s = setup().await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let send = |req: oauth2::HttpRequest| crate::helpers::oauth2_send(http.clone(), req);
    let oc = BasicClient::new(ClientId::new(s.client_id.clone()))
        .set_client_secret(ClientSecret::new(s.secret.clone()))
        .set_auth_uri(AuthUrl::new(s.app.url("/oauth2/authorize")).unwrap())
        .set_token_uri(TokenUrl::new(s.app.url("/oauth2/token")).unwrap())
        .set_redirect_uri(RedirectUrl::new(REDIRECT.into()).unwrap());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = oc
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("articles:read".into()))
        .set_pkce_challenge(challenge)
        .url();
    let mut browser = Browser::new();
    let (status, _, html) = browser.get(url.as_str()).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    let (_, _, html) = browser
        .submit(&s.app.base, &parse_form(&html).set("username", "ALICE").set("password", PASSWORD), &[])
        .await;
    let (status, headers, _) =
        browser.submit(&s.app.base, &parse_form(&html), &[("decision", "allow")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let p = location_params(&headers);
    assert_eq!(&p["state"], csrf.secret());
    let tokens = oc
        .exchange_code(AuthorizationCode::new(p["code"].clone()))
        .set_pkce_verifier(verifier)
        .request_async(&send)
        .await
        .unwrap();
    assert_eq!(tokens.scopes().unwrap()[0].as_str(), "articles:read");
    let at = tokens.access_token().secret().clone();
    let rt = tokens.refresh_token().unwrap().clone();
    assert!(rt.secret().starts_with("kgrt_"));

    // The API sees the user behind the token.
    let d = s.app.verify(&at, &["articles:read"]).await;
    assert_eq!(d["code"], "VALID", "{d}");
    assert_eq!(d["user_id"], s.user_id);
    assert_eq!(d["sub"], s.user_id);
    assert_eq!(
        s.app.verify_code(&at, &["articles:write"]).await,
        "INSUFFICIENT_SCOPE",
        "only the granted scope"
    );
    let fa = s.app.client.get(s.app.url("/v1/auth")).bearer_auth(&at).send().await.unwrap();
    assert_eq!(fa.status(), StatusCode::OK);
    assert_eq!(fa.headers()["x-keygate-user-id"], s.user_id.as_str());
    let intro: Value = s
        .app
        .client
        .post(s.app.url("/oauth2/introspect"))
        .basic_auth(&s.client_id, Some(&s.secret))
        .form(&[("token", at.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(intro["active"], true);
    assert_eq!(intro["sub"], s.user_id);

    // Refresh rotates; the library takes the new refresh token.
    let t2 = oc.exchange_refresh_token(&rt).request_async(&send).await.unwrap();
    let rt2 = t2.refresh_token().unwrap().clone();
    assert_ne!(rt2.secret(), rt.secret());
    assert_eq!(s.app.verify_code(t2.access_token().secret(), &["articles:read"]).await, "VALID");

    // Past the grace period, the old refresh token again is reuse: the whole family is revoked.
    s.app.clock.advance(11_000);
    let err = oc.exchange_refresh_token(&rt).request_async(&send).await.unwrap_err();
    assert!(format!("{err:?}").contains("invalid_grant"), "{err:?}");
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "REVOKED");
    assert_eq!(s.app.verify_code(t2.access_token().secret(), &["articles:read"]).await, "REVOKED");
    let err = oc.exchange_refresh_token(&rt2).request_async(&send).await.unwrap_err();
    assert!(format!("{err:?}").contains("invalid_grant"), "the successor died with its family: {err:?}");

    // The grant stays: logged in and consented, a new authorization needs no page at all.
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = oc
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("articles:read".into()))
        .set_pkce_challenge(challenge)
        .url();
    let (status, headers, _) = browser.get(url.as_str()).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "remembered consent");
    let code = location_params(&headers)["code"].clone();
    let t3 = oc
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request_async(&send)
        .await
        .unwrap();
    // Revoking the refresh token (RFC 7009) revokes its family.
    let r = s
        .app
        .client
        .post(s.app.url("/oauth2/revoke"))
        .basic_auth(&s.client_id, Some(&s.secret))
        .form(&[("token", t3.refresh_token().unwrap().secret().as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(s.app.verify_code(t3.access_token().secret(), &["articles:read"]).await, "REVOKED");
}

#[tokio::test]
async fn pkce_redirect_uri_and_code_rules() {
    let s = setup().await;
    let mut b = Browser::new();
    let (verifier, challenge) = pkce();
    let q = |extra: &str| {
        s.app.url(&format!(
            "/oauth2/authorize?response_type=code&client_id={}&redirect_uri={}&state=zz{extra}",
            s.client_id,
            urlencode(REDIRECT)
        ))
    };
    // No PKCE, or plain: an error sent back to the (valid) redirect URI, with state and iss.
    for extra in [
        "".to_string(),
        format!("&code_challenge={challenge}&code_challenge_method=plain"),
        format!("&code_challenge={challenge}"),
    ] {
        let (status, headers, _) = b.get(&q(&extra)).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{extra}");
        let p = location_params(&headers);
        assert_eq!(p["error"], "invalid_request", "{extra}");
        assert_eq!(p["state"], "zz");
        assert_eq!(p["iss"], s.app.base);
    }
    // A redirect URI that is not registered, or an unknown client: an error page, never a redirect.
    for url in [
        s.app.url(&format!("/oauth2/authorize?response_type=code&client_id={}&redirect_uri={}&code_challenge={challenge}&code_challenge_method=S256", s.client_id, urlencode("https://evil.example/cb"))),
        s.app.url(&format!("/oauth2/authorize?response_type=code&client_id={}&redirect_uri={}&code_challenge={challenge}&code_challenge_method=S256", s.client_id, urlencode(&format!("{REDIRECT}/extra")))),
        s.app.url("/oauth2/authorize?response_type=code&client_id=kgc_nope&redirect_uri=https://app.example.com/callback"),
    ] {
        let (status, headers, html) = b.get(&url).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}");
        assert!(headers.get("location").is_none());
        assert!(html.contains("cannot continue"), "{html}");
    }
    // Unknown scope: invalid_scope to the redirect URI.
    let (status, headers, _) = b.get(&authorize_url(&s, "admin:all", &challenge, "s")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location_params(&headers)["error"], "invalid_scope");

    // A wrong verifier burns the code: the right one afterwards does not help.
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    let (status, body) = exchange(&s, &code, &format!("{verifier}X")).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
    let (status, _) = exchange(&s, &code, &verifier).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A missing verifier is invalid_request (and burns the code too).
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    let (status, body) =
        token(&s, &[("grant_type", "authorization_code"), ("code", &code), ("redirect_uri", REDIRECT)]).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request")));
    // Another redirect URI at the token endpoint.
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    let (_, body) = token(
        &s,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", "https://app.example.com/other"),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(body["error"], "invalid_grant");
    // Expired after 60 s.
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    s.app.clock.advance(61_000);
    let (_, body) = exchange(&s, &code, &verifier).await;
    assert_eq!(body["error"], "invalid_grant");
    // Replay: the second use fails and revokes what the first one got.
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    let (status, first) = exchange(&s, &code, &verifier).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let at = first["access_token"].as_str().unwrap();
    assert_eq!(s.app.verify_code(at, &["articles:read"]).await, "VALID");
    let (status, body) = exchange(&s, &code, &verifier).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert_eq!(s.app.verify_code(at, &["articles:read"]).await, "REVOKED");
    let (_, body) = refresh(&s, first["refresh_token"].as_str().unwrap()).await;
    assert_eq!(body["error"], "invalid_grant");
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn pages_refuse_forged_forms_and_bad_logins() {
    let s = setup_with(TestApp::builder().failures_per_minute(5).start().await, json!({})).await;
    let (_, challenge) = pkce();
    let mut b = Browser::new();
    let (_, _, html) = b.get(&authorize_url(&s, "articles:read", &challenge, "x")).await;
    let login = parse_form(&html);
    // CSRF token missing or wrong.
    for csrf in ["", "forged"] {
        let forged = PageForm { action: login.action.clone(), fields: login.fields.clone() }
            .set("csrf", csrf)
            .set("username", "alice")
            .set("password", PASSWORD);
        let (status, _, _) = b.submit(&s.app.base, &forged, &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "csrf {csrf:?}");
    }
    // Wrong password: the login page again, 401, no cookie.
    let (status, headers, html) = b
        .submit(
            &s.app.base,
            &PageForm { action: login.action.clone(), fields: login.fields.clone() }
                .set("username", "alice")
                .set("password", "wrong password!"),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(headers.get("set-cookie").is_none());
    assert!(html.contains("Wrong username or password"), "{html}");
    // Logged in in one browser; the consent form from another browser (no or other session) is refused.
    let (_, _, html) = b
        .submit(
            &s.app.base,
            &PageForm { action: login.action.clone(), fields: login.fields.clone() }
                .set("username", "alice")
                .set("password", PASSWORD),
            &[],
        )
        .await;
    let consent = parse_form(&html);
    let mut other = Browser::new();
    let (status, _, _) = other.submit(&s.app.base, &consent, &[("decision", "allow")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Deny: access_denied to the client, with state.
    let (status, headers, _) = b.submit(&s.app.base, &consent, &[("decision", "deny")]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let p = location_params(&headers);
    assert_eq!((p["error"].as_str(), p["state"].as_str()), ("access_denied", "x"));
    // The form is single use.
    let (status, _, _) = b.submit(&s.app.base, &consent, &[("decision", "allow")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Failed logins are throttled per username, whatever the address.
    let mut c = Browser::new();
    let mut last = StatusCode::OK;
    for _ in 0..8 {
        let (_, _, html) = c.get(&authorize_url(&s, "articles:read", &challenge, "x")).await;
        let f = parse_form(&html).set("username", "ALICE").set("password", "not the password");
        last = c.submit(&s.app.base, &f, &[]).await.0;
    }
    assert_eq!(last, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn disabling_or_deleting_the_user_revoking_the_grant_or_disabling_the_client_stops_tokens() {
    let s = setup().await;
    let (verifier, challenge) = pkce();
    let mut b = Browser::new();
    let t = issue(&s, &mut b, &challenge, &verifier).await;
    let at = t["access_token"].as_str().unwrap().to_string();
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "VALID");

    // Disabled user: tokens DISABLED, refresh refused, login refused; enabling restores the tokens.
    let (st, _) = s.app.post(&format!("/v1/users/{}/disable", s.user_id), json!({})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "DISABLED");
    let (_, body) = refresh(&s, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(body["error"], "invalid_grant");
    let mut fresh = Browser::new();
    let (_, _, html) = fresh.get(&authorize_url(&s, "articles:read", &challenge, "x")).await;
    let (status, _, _) = fresh
        .submit(&s.app.base, &parse_form(&html).set("username", "alice").set("password", PASSWORD), &[])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a disabled user cannot log in");
    s.app.post(&format!("/v1/users/{}/enable", s.user_id), json!({})).await;
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "VALID");

    // Revoking the grant revokes its tokens; the user is asked again next time.
    let (_, grants) = s.app.get(&format!("/v1/users/{}/grants", s.user_id)).await;
    let grants = grants["items"].as_array().unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["scopes"], json!(["articles:read"]));
    let (st, _) = s
        .app
        .call(
            Method::DELETE,
            &format!("/v1/users/{}/grants/{}", s.user_id, grants[0]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "REVOKED");

    // Disabled client: its user tokens stop too.
    let t = issue(&s, &mut b, &challenge, &verifier).await;
    let at = t["access_token"].as_str().unwrap().to_string();
    s.app.post(&format!("/v1/clients/{}/disable", s.client_id), json!({})).await;
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "DISABLED");
    s.app.post(&format!("/v1/clients/{}/enable", s.client_id), json!({})).await;
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "VALID");
    // Disabled consumer (the client's parent): the same.
    let (_, client) = s.app.get(&format!("/v1/clients/{}", s.client_id)).await;
    let consumer = client["consumer_id"].as_str().unwrap().to_string();
    s.app.post(&format!("/v1/consumers/{consumer}/disable"), json!({})).await;
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "DISABLED");
    let (_, body) = refresh(&s, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(body["error"], "invalid_client", "a disabled consumer's client cannot refresh");
    s.app.post(&format!("/v1/consumers/{consumer}/enable"), json!({})).await;
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "VALID");

    // Deleted user: tokens REVOKED.
    let (st, _) = s.app.call(Method::DELETE, &format!("/v1/users/{}", s.user_id), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(s.app.verify_code(&at, &["articles:read"]).await, "REVOKED");
    let (_, body) = refresh(&s, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(body["error"], "invalid_grant");
}

/// A code (through whatever pages the browser still needs) exchanged for tokens.
async fn issue(s: &Setup, b: &mut Browser, challenge: &str, verifier: &str) -> Value {
    let code = get_code_or_direct(s, b, "articles:read", challenge).await;
    let (status, t) = exchange(s, &code, verifier).await;
    assert_eq!(status, StatusCode::OK, "{t}");
    t
}

/// Authorize with a browser that may already be logged in and have consented.
async fn get_code_or_direct(s: &Setup, b: &mut Browser, scope: &str, challenge: &str) -> String {
    let (status, headers, html) = b.get(&authorize_url(s, scope, challenge, "st-1")).await;
    if status == StatusCode::SEE_OTHER {
        return location_params(&headers)["code"].clone();
    }
    let html = if html.contains("name=\"password\"") {
        let (_, _, html) = b
            .submit(&s.app.base, &parse_form(&html).set("username", "alice").set("password", PASSWORD), &[])
            .await;
        html
    } else {
        html
    };
    let (_, headers, _) = b.submit(&s.app.base, &parse_form(&html), &[("decision", "allow")]).await;
    location_params(&headers)["code"].clone()
}

#[tokio::test]
async fn fifty_concurrent_refreshes_of_one_token_leave_one_family() {
    let s = setup().await;
    let (verifier, challenge) = pkce();
    let mut b = Browser::new();
    let code = get_code(&s, &mut b, "articles:read articles:write", &challenge).await;
    let (_, t) = exchange(&s, &code, &verifier).await;
    let rt = t["refresh_token"].as_str().unwrap().to_string();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, url, id, secret, rt) = (
                s.app.client.clone(),
                s.app.url("/oauth2/token"),
                s.client_id.clone(),
                s.secret.clone(),
                rt.clone(),
            );
            tokio::spawn(async move {
                let r = client
                    .post(url)
                    .basic_auth(id, Some(secret))
                    .form(&[("grant_type", "refresh_token"), ("refresh_token", rt.as_str())])
                    .send()
                    .await
                    .unwrap();
                (r.status(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut successors = std::collections::HashSet::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert!(!status.is_server_error(), "{status} {body}");
        assert_eq!(status, StatusCode::OK, "every concurrent retry gets the same successor: {body}");
        successors.insert(body["refresh_token"].as_str().unwrap().to_string());
    }
    assert_eq!(successors.len(), 1, "one rotation, one live family");
    let successor = successors.into_iter().next().unwrap();
    let (status, next) = refresh(&s, &successor).await;
    assert_eq!(status, StatusCode::OK, "{next}");
    // Narrowing the scope works; widening does not.
    let (status, narrow) = token(
        &s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", next["refresh_token"].as_str().unwrap()),
            ("scope", "articles:read"),
        ],
    )
    .await;
    assert_eq!((status, narrow["scope"].as_str()), (StatusCode::OK, Some("articles:read")), "{narrow}");
    let (status, wide) = token(
        &s,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", narrow["refresh_token"].as_str().unwrap()),
            ("scope", "articles:read admin"),
        ],
    )
    .await;
    assert_eq!((status, wide["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scope")));
}

#[tokio::test]
async fn public_clients_use_pkce_without_a_secret_and_users_are_managed() {
    let app = TestApp::start().await;
    let consumer = app.create_consumer("spa").await;
    // A public client may not use client_credentials.
    let (st, e) = app
        .post("/v1/clients", json!({"consumer_id": consumer, "name": "x", "public": true, "grant_types": ["client_credentials"]}))
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    // Redirect URIs: exact, no fragments, https or loopback http.
    for bad in
        ["http://app.example.com/cb", "https://app.example.com/cb#x", "javascript:alert(1)", "/relative"]
    {
        let (st, e) = app
            .post("/v1/clients", json!({"consumer_id": consumer, "name": "x", "grant_types": ["authorization_code"], "redirect_uris": [bad]}))
            .await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
        assert_eq!(e["field"], "redirect_uris");
    }
    let s = setup_with(app, json!({"public": true})).await;
    assert!(s.secret.is_empty(), "a public client gets no secret");
    let (_, c) = s.app.get(&format!("/v1/clients/{}", s.client_id)).await;
    assert_eq!(c["token_endpoint_auth_method"], "none");
    let (verifier, challenge) = pkce();
    let mut b = Browser::new();
    let code = get_code(&s, &mut b, "articles:read", &challenge).await;
    let (status, t) = token(
        &s,
        &[
            ("grant_type", "authorization_code"),
            ("client_id", &s.client_id),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    let (status, r) = token(
        &s,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", &s.client_id),
            ("refresh_token", t["refresh_token"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    // Discovery announces the flow.
    let (_, d) = s.app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(d["authorization_endpoint"], format!("{}/oauth2/authorize", s.app.base));
    assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(d["authorization_response_iss_parameter_supported"], true);

    // Users: unique ignoring case, weak passwords refused, allowed scopes limit what they grant.
    let (st, e) = s.app.post("/v1/users", json!({"username": "ALICE", "password": "another good one"})).await;
    assert_eq!((st, e["code"].as_str()), (StatusCode::CONFLICT, Some("conflict")), "{e}");
    let (st, e) = s.app.post("/v1/users", json!({"username": "bob", "password": "password123"})).await;
    assert_eq!((st, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("password")), "{e}");
    let (st, bob) = s
        .app
        .post("/v1/users", json!({"username": "bob", "password": "bobs long password", "allowed_scopes": ["articles:write"]}))
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (_, found) = s.app.get("/v1/users/username:BOB").await;
    assert_eq!(found["id"], bob["id"]);
    let mut b = Browser::new();
    let (_, _, html) = b.get(&authorize_url(&s, "articles:read", &challenge, "x")).await;
    let (status, headers, _) = b
        .submit(
            &s.app.base,
            &parse_form(&html).set("username", "bob").set("password", "bobs long password"),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location_params(&headers)["error"], "access_denied", "bob may not grant articles:read");
    let (_, list) = s.app.get("/v1/users").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains("argon2"), "never the hash");
}

#[tokio::test]
async fn forms_belong_to_the_browser_that_opened_them_and_codes_die_with_their_grant() {
    let s = setup().await;
    let (verifier, challenge) = pkce();
    // Login CSRF: the attacker's own login form, submitted from the victim's browser, is refused.
    let mut attacker = Browser::new();
    let (_, _, html) = attacker.get(&authorize_url(&s, "articles:read", &challenge, "x")).await;
    let attackers_form = parse_form(&html).set("username", "alice").set("password", PASSWORD);
    let mut victim = Browser::new();
    let (status, headers, _) = victim.submit(&s.app.base, &attackers_form, &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(headers.get("set-cookie").is_none(), "no session planted in the victim's browser");
    // A cross-site submission is refused even with the right cookie.
    let fields: Vec<(String, String)> = attackers_form.fields.clone();
    let resp = attacker
        .http
        .post(s.app.url(&attackers_form.action))
        .header("cookie", attacker.cookie().unwrap())
        .header("sec-fetch-site", "cross-site")
        .form(&fields)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // An over-long state is an error page, not reflected.
    let long = "s".repeat(2000);
    let (status, headers, _) = attacker.get(&authorize_url(&s, "articles:read", &challenge, &long)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(headers.get("location").is_none());

    // A code outstanding when its grant is revoked gives nothing.
    let mut b = Browser::new();
    let code = get_code(&s, &mut b, "articles:read", &challenge).await;
    let (_, grants) = s.app.get(&format!("/v1/users/{}/grants", s.user_id)).await;
    let grant = grants["items"][0]["id"].as_str().unwrap().to_string();
    s.app.call(Method::DELETE, &format!("/v1/users/{}/grants/{grant}", s.user_id), None).await;
    let (status, body) = exchange(&s, &code, &verifier).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{body}");
    // …and one outstanding when the client's tokens are revoked too.
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    s.app.clock.advance(1);
    s.app.post(&format!("/v1/clients/{}/revoke-tokens", s.client_id), json!({})).await;
    let (_, body) = exchange(&s, &code, &verifier).await;
    assert_eq!(body["error"], "invalid_grant");
}

#[tokio::test]
async fn a_trusted_front_proxy_can_name_the_user_and_native_apps_always_ask() {
    let app = TestApp::builder()
        .trusted_proxies(&["127.0.0.1/32"])
        .config(|c| c.login_trusted_header = Some("x-remote-user".into()))
        .start()
        .await;
    let consumer = app.create_consumer("native").await;
    let loopback = "http://127.0.0.1:7777/cb";
    let (_, c) = app
        .post(
            "/v1/clients",
            json!({"consumer_id": consumer, "name": "CLI", "public": true, "scopes": ["articles:read"],
                   "grant_types": ["authorization_code"], "redirect_uris": [loopback]}),
        )
        .await;
    let client_id = c["client_id"].as_str().unwrap().to_string();
    app.post("/v1/users", json!({"username": "carol"})).await;
    let (_, challenge) = pkce();
    let url = app.url(&format!(
        "/oauth2/authorize?response_type=code&client_id={client_id}&redirect_uri={}&code_challenge={challenge}&code_challenge_method=S256&scope=articles:read",
        urlencode(loopback)
    ));
    for round in 0..2 {
        let mut b = Browser::new();
        let resp = b.http.get(&url).header("x-remote-user", "Carol").send().await.unwrap();
        b.remember(&resp);
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        let html = resp.text().await.unwrap();
        assert!(html.contains("name=\"decision\""), "the consent page, every time for a native app: {html}");
        let (status, headers, _) = b.submit(&app.base, &parse_form(&html), &[("decision", "allow")]).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let loc = headers["location"].to_str().unwrap();
        assert!(loc.starts_with(loopback) && loc.contains("code=kgac_"), "{loc}");
    }
    // An unknown user in the header gets the login page.
    let resp = app.client.get(&url).header("x-remote-user", "mallory").send().await.unwrap();
    assert!(resp.text().await.unwrap().contains("name=\"password\""));
}

#[tokio::test]
async fn refresh_tokens_expire_when_idle_and_at_their_absolute_end() {
    let s = setup_with(
        TestApp::start().await,
        json!({"refresh_idle_seconds": 60, "refresh_absolute_seconds": 150}),
    )
    .await;
    let (verifier, challenge) = pkce();
    let mut b = Browser::new();
    let code = get_code(&s, &mut b, "articles:read", &challenge).await;
    let (_, t) = exchange(&s, &code, &verifier).await;
    // Used within the idle window: fine, and the successor starts a new window.
    s.app.clock.advance(50_000);
    let (status, t2) = refresh(&s, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{t2}");
    s.app.clock.advance(50_000);
    let (status, t3) = refresh(&s, t2["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{t3}");
    // Idle too long.
    s.app.clock.advance(61_000);
    let (_, body) = refresh(&s, t3["refresh_token"].as_str().unwrap()).await;
    assert_eq!(body["error"], "invalid_grant");
    // The absolute end holds even when used in time: a new authorization, refreshed every 50 s.
    let code = get_code_or_direct(&s, &mut b, "articles:read", &challenge).await;
    let (_, mut t) = exchange(&s, &code, &verifier).await;
    for _ in 0..2 {
        s.app.clock.advance(50_000);
        let (status, next) = refresh(&s, t["refresh_token"].as_str().unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{next}");
        t = next;
    }
    s.app.clock.advance(51_000);
    let (_, body) = refresh(&s, t["refresh_token"].as_str().unwrap()).await;
    assert_eq!(body["error"], "invalid_grant", "past 150 s since consent");
}

#[tokio::test]
async fn dpop_bound_refresh_tokens_are_refreshed_only_with_their_key() {
    use base64::Engine;
    use p256::ecdsa::signature::Signer;
    let s = setup_with(TestApp::start().await, json!({"public": true})).await;
    let (verifier, challenge) = pkce();
    let mut b = Browser::new();
    let code = get_code(&s, &mut b, "articles:read", &challenge).await;
    let b64 = |x: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
    let key = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    let point = key.verifying_key().to_encoded_point(false);
    let jwk =
        json!({"kty": "EC", "crv": "P-256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())});
    let n = std::sync::atomic::AtomicU32::new(0);
    let proof = || {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk});
        let claims = json!({"jti": format!("j{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            "htm": "POST", "htu": s.app.url("/oauth2/token"), "iat": s.app.state.now() / 1000});
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig: p256::ecdsa::Signature = key.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig.to_bytes()))
    };
    let post = |form: Vec<(&'static str, String)>, dpop: Option<String>| {
        let mut req = s.app.client.post(s.app.url("/oauth2/token")).form(&form);
        if let Some(p) = dpop {
            req = req.header("DPoP", p);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, t) = post(
        vec![
            ("grant_type", "authorization_code".into()),
            ("client_id", s.client_id.clone()),
            ("code", code),
            ("redirect_uri", REDIRECT.into()),
            ("code_verifier", verifier),
        ],
        Some(proof()),
    )
    .await;
    assert_eq!((status, t["token_type"].as_str()), (StatusCode::OK, Some("DPoP")), "{t}");
    let refresh = |rt: &str| {
        vec![
            ("grant_type", "refresh_token".to_string()),
            ("client_id", s.client_id.clone()),
            ("refresh_token", rt.to_string()),
        ]
    };
    // A stolen refresh token, without the key: refused, and the family lives on.
    let (status, e) = post(refresh(t["refresh_token"].as_str().unwrap()), None).await;
    assert_eq!((status, e["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_dpop_proof")), "{e}");
    let (status, r) = post(refresh(t["refresh_token"].as_str().unwrap()), Some(proof())).await;
    assert_eq!((status, r["token_type"].as_str()), (StatusCode::OK, Some("DPoP")), "{r}");

    // Narrowing a user's allowed scopes narrows their personal access tokens at once.
    let (_, p) = s
        .app
        .post(
            &format!("/v1/users/{}/tokens", s.user_id),
            json!({"name": "x", "scopes": ["articles:read", "articles:write"], "expires_in_seconds": 3600}),
        )
        .await;
    let pat = p["token"].as_str().unwrap();
    assert_eq!(s.app.verify_code(pat, &["articles:write"]).await, "VALID");
    s.app.patch(&format!("/v1/users/{}", s.user_id), json!({"allowed_scopes": ["articles:read"]})).await;
    assert_eq!(s.app.verify_code(pat, &["articles:write"]).await, "INSUFFICIENT_SCOPE");
}
