"""Device authorization (RFC 8628) and token exchange (RFC 8693) driven by authlib's OAuth2Session, and a
DPoP proof (RFC 9449) built with PyJWT: unmodified, independent client libraries.

Environment: ISSUER, DEVICE_CLIENT_ID, EXCHANGE_CLIENT_ID, EXCHANGE_CLIENT_SECRET, API_KEY, USERNAME,
PASSWORD. Prints "token kinds: ok".
"""

import base64
import hashlib
import json
import os
import sys
import threading
import time
import uuid
from html.parser import HTMLParser
from urllib.parse import urljoin

import jwt
import requests
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = os.environ["ISSUER"]


class Form(HTMLParser):
    def __init__(self, html):
        super().__init__()
        self.action, self.fields = None, {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.action = a.get("action")
        elif tag == "input" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def device_flow(meta):
    # A public client: authlib sends its client_id in the body and no secret.
    client = OAuth2Session(os.environ["DEVICE_CLIENT_ID"], scope="videos:watch", token_endpoint_auth_method="none")
    # authlib has no helper for the device authorization request itself: a plain form POST.
    r = requests.post(meta["device_authorization_endpoint"],
                      data={"client_id": client.client_id, "scope": "videos:watch"}, timeout=10)
    check(r.status_code == 200, f"device authorization: {r.status_code} {r.text}")
    d = r.json()
    # Polling too early is authorization_pending, as authlib sees it.
    try:
        client.fetch_token(meta["token_endpoint"], grant_type="urn:ietf:params:oauth:grant-type:device_code",
                           device_code=d["device_code"])
        check(False, "a pending device got a token")
    except OAuthError as e:
        check(e.error == "authorization_pending", f"pending: {e.error}")

    # The user approves in a browser.
    def approve():
        b = requests.Session()
        page = b.get(d["verification_uri_complete"], timeout=10)
        f = Form(page.text)
        page = b.post(urljoin(ISSUER, f.action), data=f.fields, timeout=10)
        f = Form(page.text)
        f.fields.update(username=os.environ["USERNAME"], password=os.environ["PASSWORD"])
        page = b.post(urljoin(ISSUER, f.action), data=f.fields, timeout=10)
        f = Form(page.text)
        page = b.post(urljoin(ISSUER, f.action), data={**f.fields, "decision": "allow"}, timeout=10)
        check("Device connected" in page.text, f"approval page: {page.text[:300]}")

    approve()
    deadline = time.time() + 30
    while True:
        time.sleep(d["interval"])
        try:
            token = client.fetch_token(meta["token_endpoint"], grant_type="urn:ietf:params:oauth:grant-type:device_code",
                                       device_code=d["device_code"])
            break
        except OAuthError as e:
            check(e.error in ("authorization_pending", "slow_down") and time.time() < deadline, f"poll: {e.error}")
    check(token["scope"] == "videos:watch" and token["access_token"], f"device token: {token}")
    return token["access_token"]


def token_exchange(meta):
    client = OAuth2Session(os.environ["EXCHANGE_CLIENT_ID"], os.environ["EXCHANGE_CLIENT_SECRET"])
    token = client.fetch_token(meta["token_endpoint"], grant_type="urn:ietf:params:oauth:grant-type:token-exchange",
                               subject_token=os.environ["API_KEY"],
                               subject_token_type="urn:keygate:params:oauth:token-type:api_key",
                               scope="articles:read", resource="https://downstream.example")
    check(token["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token", f"exchange: {token}")
    return token["access_token"]


def dpop_token(meta):
    """A DPoP-bound token: the proof is built with PyJWT and the cryptography package."""
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    b64 = lambda n: base64.urlsafe_b64encode(n.to_bytes(32, "big")).decode().rstrip("=")
    jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y)}

    def proof(method, url, token=None):
        claims = {"jti": str(uuid.uuid4()), "htm": method, "htu": url, "iat": int(time.time())}
        if token:
            claims["ath"] = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode().rstrip("=")
        return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})

    r = requests.post(meta["token_endpoint"], data={"grant_type": "client_credentials"},
                      auth=(os.environ["EXCHANGE_CLIENT_ID"], os.environ["EXCHANGE_CLIENT_SECRET"]),
                      headers={"DPoP": proof("POST", meta["token_endpoint"])}, timeout=10)
    t = r.json()
    check(r.status_code == 200 and t["token_type"] == "DPoP", f"DPoP token: {t}")
    api = "https://api.example.com/v1/articles"
    return t["access_token"], proof("GET", api, t["access_token"]), api


def main():
    meta = requests.get(f"{ISSUER}/.well-known/oauth-authorization-server", timeout=10).json()
    device = device_flow(meta)
    exchanged = token_exchange(meta)
    bound, proof, api = dpop_token(meta)
    print(json.dumps({"device": device, "exchanged": exchanged, "bound": bound, "proof": proof, "url": api}))
    print("token kinds: ok")


if __name__ == "__main__":
    main()
