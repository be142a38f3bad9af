// An MCP-style agent, built on oauth4webapi (an unmodified OAuth 2 client library), reaching an API that
// Keygate protects through forward-auth: 401 → protected-resource metadata (RFC 9728) → authorization
// server metadata (RFC 8414) → dynamic client registration (RFC 7591) → authorization code with PKCE and
// `resource` (RFC 8707) → the API → refresh → the API again.
//
// The API is a small server in this script that asks Keygate's /v1/auth, as nginx auth_request would,
// and routes its /.well-known/oauth-protected-resource/… to Keygate.
// Environment: O4W (file URL of oauth4webapi's index.js), ISSUER, RESOURCE_PORT, USERNAME, PASSWORD.
import http from "node:http";

const oauth = await import(process.env.O4W);
const ISSUER = process.env.ISSUER;
const PORT = Number(process.env.RESOURCE_PORT);
const RESOURCE = `http://127.0.0.1:${PORT}/mcp`;
const REDIRECT = "http://127.0.0.1:7788/callback";
const insecure = { [oauth.allowInsecureRequests]: true };

function check(cond, what) {
  if (!cond) {
    console.error(`FAILED: ${what}`);
    process.exit(1);
  }
}

// The protected API.
const api = http.createServer(async (req, res) => {
  const headers = { "x-forwarded-proto": "http", "x-forwarded-host": `127.0.0.1:${PORT}`, "x-forwarded-uri": req.url };
  if (req.url.startsWith("/.well-known/oauth-protected-resource")) {
    const r = await fetch(`${ISSUER}${req.url}`, { headers });
    res.writeHead(r.status, { "content-type": "application/json" }).end(await r.text());
    return;
  }
  if (req.headers.authorization) headers.authorization = req.headers.authorization;
  const r = await fetch(`${ISSUER}/v1/auth?scope=tools:call`, { headers });
  if (r.status === 200) {
    res.writeHead(200, { "content-type": "application/json" })
      .end(JSON.stringify({ ok: true, user: r.headers.get("x-keygate-user-id") }));
  } else {
    const out = { "content-type": "application/json" };
    if (r.headers.get("www-authenticate")) out["www-authenticate"] = r.headers.get("www-authenticate");
    res.writeHead(r.status, out).end(await r.text());
  }
});
await new Promise((ok) => api.listen(PORT, "127.0.0.1", ok));

try {
  // 1. The agent calls the API and learns from the 401 where to go.
  let r = await fetch(RESOURCE);
  check(r.status === 401, `the API answers 401 without a token, got ${r.status}`);
  const challenge = r.headers.get("www-authenticate") || "";
  const metadataUrl = /resource_metadata="([^"]+)"/.exec(challenge)?.[1];
  check(metadataUrl === `http://127.0.0.1:${PORT}/.well-known/oauth-protected-resource/mcp`, `resource_metadata in ${challenge}`);
  const rs = await oauth.processResourceDiscoveryResponse(
    new URL(RESOURCE), await oauth.resourceDiscoveryRequest(new URL(RESOURCE), insecure));
  check(rs.authorization_servers?.[0] === ISSUER, `authorization_servers: ${JSON.stringify(rs)}`);

  // 2. The authorization server's metadata, and registration.
  const issuer = new URL(rs.authorization_servers[0]);
  const as = await oauth.processDiscoveryResponse(
    issuer, await oauth.discoveryRequest(issuer, { algorithm: "oauth2", ...insecure }));
  check(as.registration_endpoint, "discovery lists registration_endpoint");
  const client = await oauth.processDynamicClientRegistrationResponse(
    await oauth.dynamicClientRegistrationRequest(as, {
      client_name: "o4w agent", redirect_uris: [REDIRECT], token_endpoint_auth_method: "none", scope: "tools:call",
    }, insecure));
  check(client.client_id && !client.client_secret, `a public client: ${JSON.stringify(client)}`);

  // 3. Authorization code with PKCE and the resource; a scripted browser logs in and consents.
  const verifier = oauth.generateRandomCodeVerifier();
  const state = oauth.generateRandomState();
  const url = new URL(as.authorization_endpoint);
  for (const [k, v] of Object.entries({
    response_type: "code", client_id: client.client_id, redirect_uri: REDIRECT, scope: "tools:call", state,
    code_challenge: await oauth.calculatePKCECodeChallenge(verifier), code_challenge_method: "S256", resource: RESOURCE,
  })) url.searchParams.set(k, v);
  const jar = new Map();
  const browse = async (target, init = {}) => {
    const cookie = [...jar].map(([k, v]) => `${k}=${v}`).join("; ");
    const resp = await fetch(target, { ...init, redirect: "manual", headers: { ...(init.headers || {}), ...(cookie ? { cookie } : {}) } });
    for (const c of resp.headers.getSetCookie()) {
      const [pair] = c.split(";");
      const i = pair.indexOf("=");
      jar.set(pair.slice(0, i), pair.slice(i + 1));
    }
    return resp;
  };
  const form = (html) => {
    const action = /<form[^>]*action="([^"]+)"/.exec(html)[1].replaceAll("&#x2f;", "/");
    const fields = new URLSearchParams();
    for (const [tag] of html.matchAll(/<input[^>]*>/g)) {
      const name = /name="([^"]+)"/.exec(tag)?.[1];
      if (name) fields.set(name, /value="([^"]*)"/.exec(tag)?.[1] || "");
    }
    return { action: new URL(action, ISSUER), fields };
  };
  let page = await browse(url);
  check(page.status === 200, `login page: ${page.status}`);
  const login = form(await page.text());
  login.fields.set("username", process.env.USERNAME);
  login.fields.set("password", process.env.PASSWORD);
  page = await browse(login.action, { method: "POST", body: login.fields, headers: { "content-type": "application/x-www-form-urlencoded" } });
  const consentHtml = await page.text();
  check(page.status === 200 && consentHtml.includes("o4w agent"), `consent page: ${page.status}`);
  check(consentHtml.replaceAll("&#x2f;", "/").includes(RESOURCE), "the consent page names the resource");
  const consent = form(consentHtml);
  consent.fields.set("decision", "allow");
  page = await browse(consent.action, { method: "POST", body: consent.fields, headers: { "content-type": "application/x-www-form-urlencoded" } });
  check(page.status === 303, `back to the agent: ${page.status}`);
  const params = oauth.validateAuthResponse(as, client, new URL(page.headers.get("location")), state);
  const tokens = await oauth.processAuthorizationCodeResponse(as, client,
    await oauth.authorizationCodeGrantRequest(as, client, oauth.None(), params, REDIRECT, verifier,
      { additionalParameters: { resource: RESOURCE }, ...insecure }));
  check(tokens.access_token && tokens.refresh_token, "tokens");

  // 4. The API, with the token; then refresh, and the API again.
  r = await fetch(RESOURCE, { headers: { authorization: `Bearer ${tokens.access_token}` } });
  const body = await r.json();
  check(r.status === 200 && body.user?.startsWith("usr_"), `the API answers for the user: ${r.status} ${JSON.stringify(body)}`);
  const renewed = await oauth.processRefreshTokenResponse(as, client,
    await oauth.refreshTokenGrantRequest(as, client, oauth.None(), tokens.refresh_token, insecure));
  check(renewed.refresh_token !== tokens.refresh_token, "the refresh token rotates");
  r = await fetch(RESOURCE, { headers: { authorization: `Bearer ${renewed.access_token}` } });
  check(r.status === 200, `the API with the renewed token: ${r.status}`);
  console.log("mcp: ok");
} finally {
  api.close();
}
