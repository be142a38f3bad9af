"""Interop check of Keygate's OAuth 2 server with independent clients: authlib and PyJWT.

Run by the `python_interop` test in crates/keygate/tests/cli.rs against a live server, with ISSUER,
CLIENT_ID, CLIENT_SECRET and AUDIENCE in the environment. Exits non-zero on the first failed check.
"""

import os
import sys

import jwt
import requests
from authlib.integrations.requests_client import OAuth2Session

ISSUER = os.environ["ISSUER"]
CLIENT_ID = os.environ["CLIENT_ID"]
CLIENT_SECRET = os.environ["CLIENT_SECRET"]
AUDIENCE = os.environ["AUDIENCE"]


def check(cond, what):
    if not cond:
        print(f"interop: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


# Discovery at the issuer URL (RFC 8414): the metadata's issuer must equal it exactly.
meta = requests.get(ISSUER + "/.well-known/oauth-authorization-server", timeout=10).json()
check(meta["issuer"] == ISSUER, f"issuer {meta['issuer']!r} != {ISSUER!r}")
check("client_credentials" in meta["grant_types_supported"], "client_credentials advertised")

# A token through authlib, client_secret_basic.
session = OAuth2Session(CLIENT_ID, CLIENT_SECRET, scope="articles:read",
                        token_endpoint_auth_method="client_secret_basic")
token = session.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
access = token["access_token"]
check(token["token_type"].lower() == "bearer", "token_type Bearer")
check(token["scope"] == "articles:read", f"scope {token['scope']!r}")

# Validate it offline with PyJWT against the JWKS.
header = jwt.get_unverified_header(access)
check(header["typ"] == "at+jwt", f"typ {header.get('typ')!r}")
signing_key = jwt.PyJWKClient(meta["jwks_uri"]).get_signing_key_from_jwt(access)
claims = jwt.decode(access, signing_key.key, algorithms=["EdDSA", "ES256"], audience=AUDIENCE, issuer=ISSUER,
                    options={"require": ["exp", "iat", "nbf", "jti", "sub", "aud", "iss"]})
check(claims["client_id"] == CLIENT_ID and claims["sub"] == CLIENT_ID, "client_id and sub")
check(claims["scope"] == "articles:read", "scope claim")
# A tampered token must not validate.
head, body, sig = access.split(".")
try:
    jwt.decode(f"{head}.{body}x.{sig}", signing_key.key, algorithms=["EdDSA", "ES256"], audience=AUDIENCE)
    check(False, "a tampered token validated")
except jwt.InvalidTokenError:
    pass

# Introspect, revoke, introspect again (RFC 7662, RFC 7009).
auth = (CLIENT_ID, CLIENT_SECRET)
intro = requests.post(meta["introspection_endpoint"], data={"token": access}, auth=auth, timeout=10).json()
check(intro.get("active") is True and intro["client_id"] == CLIENT_ID, f"introspection {intro}")
resp = requests.post(meta["revocation_endpoint"], data={"token": access}, auth=auth, timeout=10)
check(resp.status_code == 200, f"revocation status {resp.status_code}")
intro = requests.post(meta["introspection_endpoint"], data={"token": access}, auth=auth, timeout=10).json()
check(intro == {"active": False}, f"after revocation {intro}")

# client_secret_post works too, and a wrong secret is invalid_client.
post_session = OAuth2Session(CLIENT_ID, CLIENT_SECRET, token_endpoint_auth_method="client_secret_post")
check("access_token" in post_session.fetch_token(meta["token_endpoint"], grant_type="client_credentials"),
      "client_secret_post")
bad = requests.post(meta["token_endpoint"], data={"grant_type": "client_credentials"},
                    auth=(CLIENT_ID, "kgcs_wrong"), timeout=10)
check(bad.status_code == 401 and bad.json()["error"] == "invalid_client", f"bad secret {bad.status_code}")

print("interop: ok")
