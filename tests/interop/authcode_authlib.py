"""The authorization code flow with PKCE, refresh and revocation, driven by authlib (an unmodified OAuth 2
client library) and a scripted browser (requests + the standard library's HTML parser).

Environment: ISSUER, CLIENT_ID, CLIENT_SECRET, USERNAME, PASSWORD, REDIRECT_URI.
Prints one JSON line with every secret it saw (so the caller can check none reached the server's log),
then "authcode: ok".
"""

import json
import os
import sys
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlparse

import requests
from authlib.common.security import generate_token
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session

ISSUER = os.environ["ISSUER"]
REDIRECT = os.environ["REDIRECT_URI"]


class Form(HTMLParser):
    """The page's one form: its action and fields, as a browser would submit them."""

    def __init__(self, html):
        super().__init__()
        self.action, self.fields, self.forms = None, {}, 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms += 1
            self.action = a.get("action")
        elif tag == "input" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    meta = requests.get(f"{ISSUER}/.well-known/oauth-authorization-server", timeout=10).json()
    check(meta["code_challenge_methods_supported"] == ["S256"], "discovery announces S256")
    client = OAuth2Session(
        os.environ["CLIENT_ID"], os.environ["CLIENT_SECRET"], scope="articles:read",
        redirect_uri=REDIRECT, code_challenge_method="S256",
    )
    verifier = generate_token(64)
    url, state = client.create_authorization_url(meta["authorization_endpoint"], code_verifier=verifier)

    browser = requests.Session()
    page = browser.get(url, allow_redirects=False, timeout=10)
    check(page.status_code == 200, f"login page: {page.status_code}")
    check("frame-ancestors 'none'" in page.headers.get("content-security-policy", ""), "CSP on the login page")
    login = Form(page.text)
    check(login.forms == 1 and "username" in login.fields and "password" in login.fields, "login form contract")
    login.fields.update(username=os.environ["USERNAME"], password=os.environ["PASSWORD"])
    page = browser.post(urljoin(ISSUER, login.action), data=login.fields, allow_redirects=False, timeout=10)
    check(page.status_code == 200, f"consent page: {page.status_code} {page.text[:200]}")
    consent = Form(page.text)
    check(consent.forms == 1 and 'name="decision"' in page.text, "consent form contract")
    check("Read your articles" in page.text, "the scope's description is shown")
    back = browser.post(urljoin(ISSUER, consent.action), data={**consent.fields, "decision": "allow"},
                        allow_redirects=False, timeout=10)
    check(back.status_code == 303, f"redirect back: {back.status_code}")
    location = back.headers["location"]
    check(location.startswith(REDIRECT), "back to the registered redirect URI")
    params = {k: v[0] for k, v in parse_qs(urlparse(location).query).items()}
    check(params.get("iss") == ISSUER, "RFC 9207 iss")

    # authlib checks the state and sends the verifier.
    token = client.fetch_token(meta["token_endpoint"], authorization_response=location, code_verifier=verifier)
    check(token["scope"] == "articles:read" and token["refresh_token"].startswith("kgrt_"), f"token: {token.keys()}")
    first_refresh = token["refresh_token"]

    renewed = client.refresh_token(meta["token_endpoint"], refresh_token=first_refresh)
    check(renewed["refresh_token"] != first_refresh, "the refresh token rotates")

    intro = requests.post(meta["introspection_endpoint"], data={"token": renewed["access_token"]},
                          auth=(os.environ["CLIENT_ID"], os.environ["CLIENT_SECRET"]), timeout=10).json()
    check(intro["active"] is True and intro["sub"].startswith("usr_"), f"introspection: {intro}")

    # Revoking the refresh token ends the authorization: it cannot be used again.
    client.revoke_token(meta["revocation_endpoint"], token=renewed["refresh_token"], token_type_hint="refresh_token")
    try:
        client.refresh_token(meta["token_endpoint"], refresh_token=renewed["refresh_token"])
        check(False, "a revoked refresh token still worked")
    except OAuthError as e:
        check(e.error == "invalid_grant", f"error: {e.error}")

    print(json.dumps({"code": params["code"], "access_tokens": [token["access_token"], renewed["access_token"]],
                      "refresh_tokens": [first_refresh, renewed["refresh_token"]]}))
    print("authcode: ok")


if __name__ == "__main__":
    main()
