#!/usr/bin/env python3
"""Forward-auth behind the real proxies people run: nginx `auth_request` and Caddy `forward_auth`, each
in front of a real upstream, with Keygate deciding. Run by the CLI test `forward_auth_behind_nginx_and_caddy`.

Environment: KEYGATE_URL, ADMIN_KEY, WORK (a scratch directory). The configurations are the ones
docs/FORWARD_AUTH.md shows (the test reads them from there, so the documented snippets are the tested ones).
Prints "<proxy>: ok" per proxy and "proxies: ok" at the end; any failed check raises.
"""

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

KG = os.environ["KEYGATE_URL"]
ADMIN = os.environ["ADMIN_KEY"]
WORK = os.environ["WORK"]
DOC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "FORWARD_AUTH.md")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(http.server.BaseHTTPRequestHandler):
    """The API behind the proxy: answers with what it received (path and headers)."""

    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def api(method, path, body=None):
    req = urllib.request.Request(KG + path, data=json.dumps(body).encode() if body is not None else None,
                                 method=method, headers={"Authorization": f"Bearer {ADMIN}",
                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def call(url, key=None, header="X-API-Key"):
    req = urllib.request.Request(url, headers={header: key} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def snippet(name, **values):
    """The documented configuration block tagged `<!-- test: name -->`, with its placeholders filled."""
    text = open(DOC).read()
    m = re.search(r"<!-- test: " + re.escape(name) + r" -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"docs/FORWARD_AUTH.md has no block tagged {name}"
    block = m.group(1)
    for k, v in values.items():
        block = block.replace("{" + k + "}", str(v))
    return block


def wait(url):
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def start_nginx(port, keygate, upstream, variant="nginx"):
    d = os.path.join(WORK, variant)
    os.makedirs(d, exist_ok=True)
    site = snippet("nginx", KEYGATE=keygate, UPSTREAM=upstream)
    if variant == "nginx-path":
        # The documented /_keygate location that asks as Envoy does (original path appended).
        site, n = re.subn(r"location = /_keygate \{.*?\n\}", lambda _: snippet("nginx-path", KEYGATE=keygate),
                          site, count=1, flags=re.S)
        assert n == 1, "the nginx block has no /_keygate location to replace"
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off;
worker_processes 1;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
{site}
    }}
}}
""")
    nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
    proc = subprocess.Popen([nginx, "-c", conf, "-p", d], stderr=open(os.path.join(d, "stderr"), "w"))
    return proc


def start_caddy(port, keygate, upstream):
    d = os.path.join(WORK, "caddy")
    os.makedirs(d, exist_ok=True)
    site = snippet("caddy", KEYGATE=keygate, UPSTREAM=upstream)
    conf = os.path.join(d, "Caddyfile")
    with open(conf, "w") as f:
        f.write(f"""{{
    admin off
    auto_https off
    storage file_system {d}/data
}}
http://127.0.0.1:{port} {{
{site}
}}
""")
    env = dict(os.environ, HOME=d, XDG_DATA_HOME=d, XDG_CONFIG_HOME=d)
    return subprocess.Popen(["caddy", "run", "--config", conf, "--adapter", "caddyfile"], env=env,
                            stdout=open(os.path.join(d, "stdout"), "w"), stderr=subprocess.STDOUT)


def check(proxy, base, consumer):
    # Keys for this proxy: one with the scope, one without, one rate-limited to 2 a minute.
    def key(scopes, **extra):
        k = api("POST", "/v1/keys", {"consumer_id": consumer, "name": f"{proxy} {scopes}", "scopes": scopes, **extra})
        return k["id"], k["key"]

    good_id, good = key(["articles:read"])
    _, unscoped = key(["billing:read"])
    _, limited = key(["articles:read"], rate_limits=[{"name": "per_minute", "limit": 2, "window_seconds": 60}])

    status, headers, _ = call(f"{base}/articles/1")
    assert status == 401, f"{proxy}: no credential: {status}"
    assert headers.get("www-authenticate", "").startswith("Bearer"), f"{proxy}: {headers}"

    for header, value in [("X-API-Key", good), ("Authorization", f"Bearer {good}")]:
        status, headers, body = call(f"{base}/articles/1?x=1", value, header)
        assert status == 200, f"{proxy}: valid key in {header}: {status} {body}"
        seen = json.loads(body)
        assert seen["path"] == "/articles/1?x=1", f"{proxy}: {seen}"
        h = seen["headers"]
        assert h.get("x-keygate-consumer") == consumer, f"{proxy}: identity headers upstream: {h}"
        assert h.get("x-keygate-key-id") == good_id, f"{proxy}: {h}"
        assert h.get("x-keygate-scopes") == "articles:read", f"{proxy}: {h}"
        assert "x-api-key" not in h and "authorization" not in h, f"{proxy}: the credential reached the upstream: {h}"

    # A client cannot pass identity headers of its own through.
    req = urllib.request.Request(f"{base}/articles/1", headers={"X-API-Key": good, "X-Keygate-Consumer": "cons_forged"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["headers"]["x-keygate-consumer"] == consumer, f"{proxy}: forged identity"

    status, headers, _ = call(f"{base}/articles/1", unscoped)
    assert status == 403, f"{proxy}: wrong scope: {status}"

    status, _, _ = call(f"{base}/articles/1", "kg_live_not_a_key_at_all_0000000000")
    assert status == 401, f"{proxy}: unknown key: {status}"

    statuses = [call(f"{base}/articles/1", limited) for _ in range(3)]
    assert [s for s, _, _ in statuses] == [200, 200, 429], f"{proxy}: rate limit: {[s for s, _, _ in statuses]}"
    retry = statuses[2][1].get("retry-after")
    assert retry and 0 < int(retry) <= 60, f"{proxy}: Retry-After: {statuses[2][1]}"

    api("POST", f"/v1/keys/{good_id}/revoke", {})
    status, _, _ = call(f"{base}/articles/1", good)
    assert status == 401, f"{proxy}: revoked key on the next request: {status}"
    print(f"{proxy}: ok")


def main():
    up_port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    keygate = KG.removeprefix("http://")
    upstream = f"127.0.0.1:{up_port}"
    consumer = api("POST", "/v1/consumers", {"name": "behind proxies"})["id"]
    procs = []
    try:
        nginx_path = lambda port, kg, up: start_nginx(port, kg, up, "nginx-path")  # noqa: E731
        for proxy, start in [("nginx", start_nginx), ("caddy", start_caddy), ("nginx-path", nginx_path)]:
            port = free_port()
            procs.append(start(port, keygate, upstream))
            wait(f"http://127.0.0.1:{port}/")
            check(proxy, f"http://127.0.0.1:{port}", consumer)
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    print("proxies: ok")


if __name__ == "__main__":
    sys.exit(main())
