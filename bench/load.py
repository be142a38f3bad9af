#!/usr/bin/env python3
"""Keygate load benchmark: Keygate's HTTP hot paths against an nginx `return 200` baseline, in ONE run.

    python3 bench/load.py                 # full run (about 8 minutes), results as Markdown tables
    python3 bench/load.py --smoke         # a few seconds per target: checks that the harness works
    python3 bench/load.py --scale 1000,1000000   # also: verify with that many stored keys

What it does, on a fresh machine: installs wrk and nginx from Debian's packages if they are missing (as
root), builds Keygate in release mode, starts it on a temporary data directory and nginx on another port,
seeds a consumer and keys, then measures each target at 1 and 32 connections for a bounded time,
alternating targets within each round (and reversing their order every other round) so that drift hits
all of them alike. It prints requests/s, p50,
p99, p99.9, errors and the ratio to the baseline measured in the same round, the serving process's CPU per
request (user + system time of all its threads, from /proc, around each run: steadier than requests/s when
wrk shares the machine) and the baseline's CPU per request over it, and exits non-zero if any request
failed. Everything runs on loopback and stops by itself.
"""

import argparse
import base64
import glob
import json
import os
import random
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def log(msg):
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def make_secret(prefix="kg_live_"):
    """A well-formed Keygate secret (right prefix, length and checksum) that no server has issued."""
    body = "".join(random.choice(BASE62) for _ in range(32))
    crc = zlib.crc32((prefix + body).encode())
    checksum = ""
    for _ in range(6):
        checksum = BASE62[crc % 62] + checksum
        crc //= 62
    return prefix + body + checksum


def ensure_tools():
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {missing}: install them (apt-get install wrk nginx-light) or run as root")
    log(f"installing {missing} from Debian's packages")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    pkgs = ["wrk" if t == "wrk" else "nginx-light" for t in missing]
    subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True, env=env, stdout=subprocess.DEVNULL)


def nginx_bin():
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{url} did not come up within {timeout}s")


def start_nginx(tmp, port, extra=""):
    conf = os.path.join(tmp, "nginx.conf")
    for d in ("client", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok"; }}
    }}
{extra}
}}
""")
    proc = subprocess.Popen([nginx_bin(), "-c", conf, "-p", tmp], stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/")
    return proc


class Keygate:
    def __init__(self, binary, tmp, port, name="keygate", extra_env=None, extra_args=(), admin=None):
        """A server on its own data directory; with `admin`, one more node of an installation that is
        already initialised (a shared database in `extra_env`)."""
        self.data = os.path.join(tmp, f"{name}-data")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
        env.update(extra_env or {})
        if admin is None:
            out = subprocess.run([binary, "init", "--json", "--data-dir", self.data], check=True,
                                 capture_output=True, env=env)
            admin = json.loads(out.stdout)["admin_key"]
        self.admin = admin
        env["KEYGATE_LOG"] = "warn"
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [binary, "serve", "--data-dir", self.data, "--listen", f"127.0.0.1:{port}", *extra_args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{name}.log"), "w"))
        wait_http(self.url + "/healthz")

    def api(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.admin}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def import_keys(self, consumer_id, secrets, chunk=10_000):
        for i in range(0, len(secrets), chunk):
            body = {"keys": [{"consumer_id": consumer_id, "name": f"k{i + j}", "key": s}
                             for j, s in enumerate(secrets[i:i + chunk])]}
            r = self.api("POST", "/v1/keys/import", body)
            if r["failed"]:
                sys.exit(f"import failed for {r['failed']} keys: {r['results'][:3]}")
            if (i // chunk) % 10 == 9 or i + chunk >= len(secrets):
                log(f"imported {min(i + chunk, len(secrets)):,}/{len(secrets):,} keys")

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'KG_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def lua_quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_script(tmp, name, method="GET", path="/", headers=None, body=None, keys_file=None, body_template=None):
    """A wrk script. With keys_file, each request takes the next key from the file (per thread)."""
    headers = headers or {}
    hdr = "{" + ", ".join(f"[{lua_quote(k)}] = {lua_quote(v)}" for k, v in headers.items()) + "}"
    lines = [f"local headers = {hdr}"]
    if keys_file:
        lines.append(f"""
local keys = {{}}
for line in io.lines({lua_quote(keys_file)}) do keys[#keys + 1] = line end
local i = math.random(#keys)
request = function()
  i = i % #keys + 1
  return wrk.format({lua_quote(method)}, {lua_quote(path)}, headers, string.format({lua_quote(body_template)}, keys[i]))
end
""")
    else:
        b = lua_quote(body) if body is not None else "nil"
        # Built in init(): only then does wrk know the Host header to add.
        lines.append("local req")
        lines.append(f"init = function(args) req = wrk.format({lua_quote(method)}, {lua_quote(path)}, headers, {b}) end")
        lines.append("request = function() return req end")
    lines.append(LUA_DONE)
    p = os.path.join(tmp, f"{name}.lua")
    with open(p, "w") as f:
        f.write("\n".join(lines))
    return p


def cpu_seconds(pids):
    """User + system CPU seconds used so far by these processes (all their threads), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def child_pids(pid):
    """The direct children of `pid` (nginx's workers)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def run_wrk(url, script, conns, seconds):
    threads = 1 if conns == 1 else 2
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s", "--timeout", "5s", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("KG_RESULT "):
            r = json.loads(line[len("KG_RESULT "):])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
            return r
    sys.exit(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")


def oauth_client(kg, consumer_id, fmt, tag=""):
    """A client-credentials client on `kg`; returns the headers of its token requests."""
    c = kg.api("POST", "/v1/clients", {"consumer_id": consumer_id, "name": f"load-{fmt}{tag}",
                                       "scopes": ["articles:read"], "token_format": fmt})
    basic = base64.b64encode(f"{c['client_id']}:{c['client_secret']}".encode()).decode()
    return {"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"}


def measure_scale(binary, tmp, n, seconds, rounds):
    """A fresh Keygate with n stored keys (seeded through the bulk import), then verify load."""
    sub = tempfile.mkdtemp(prefix=f"scale-{n}-", dir=tmp)
    kg = Keygate(binary, sub, free_port())
    try:
        consumer = kg.api("POST", "/v1/consumers", {"name": "scale"})
        secrets = [make_secret() for _ in range(n)]
        started = time.time()
        kg.import_keys(consumer["id"], secrets)
        seed_seconds = time.time() - started
        rss_seeded = kg.rss_mib()
        # The same working set (1,000 hot keys) at every scale, so that only the number stored differs.
        pool = os.path.join(sub, "valid.txt")
        with open(pool, "w") as f:
            f.write("\n".join(random.sample(secrets, min(n, 1_000))) + "\n")
        unknown = os.path.join(sub, "unknown.txt")
        with open(unknown, "w") as f:
            f.write("\n".join(make_secret() for _ in range(100_000)) + "\n")
        auth = {"Authorization": f"Bearer {kg.admin}", "Content-Type": "application/json"}

        jwt_client, opaque_client = (oauth_client(kg, consumer["id"], f) for f in ("jwt", "opaque"))
        req = urllib.request.Request(kg.url + "/oauth2/token", data=b"grant_type=client_credentials",
                                     headers=jwt_client, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            jwt_token = json.loads(r.read())["access_token"]
        valid_script = write_script(sub, "valid", "POST", "/v1/verify", auth, keys_file=pool,
                                    body_template='{"credential":"%s"}')
        unknown_script = write_script(sub, "unknown", "POST", "/v1/verify", auth, keys_file=unknown,
                                      body_template='{"credential":"%s"}')
        runs = {"valid": [], "unknown": []}
        for _ in range(rounds):
            runs["valid"].append(run_wrk(kg.url, valid_script, 32, seconds))
            runs["unknown"].append(run_wrk(kg.url, unknown_script, 32, seconds))
        med = {k: sorted(v, key=lambda r: r["rps"])[len(v) // 2] for k, v in runs.items()}
        errors = sum(r["errors"] for v in runs.values() for r in v)
        result = {"keys": n, "valid_rps": med["valid"]["rps"], "valid_p99_us": med["valid"]["p99_us"],
                  "unknown_rps": med["unknown"]["rps"], "unknown_p99_us": med["unknown"]["p99_us"],
                  "rss_seeded_mib": rss_seeded, "rss_mib": kg.rss_mib(), "seed_seconds": seed_seconds, "errors": errors}
        log(f"scale {n:,}: valid {result['valid_rps']:,.0f} req/s, unknown {result['unknown_rps']:,.0f} req/s, "
            f"RSS {result['rss_mib']:.0f} MiB, errors {errors}")
        return result
    finally:
        kg.stop()


def postgres_database(tmp):
    """A fresh database on the PostgreSQL the tests use (127.0.0.1:54329, started here the same way if it
    is not running: Debian's postgresql package, a throwaway cluster, trust on loopback, fsync off), or on
    the server KEYGATE_TEST_DATABASE_URL names. Returns its URL."""
    admin = os.environ.get("KEYGATE_TEST_DATABASE_URL")
    if not admin:
        port = 54329
        admin = f"postgres://postgres@127.0.0.1:{port}/postgres"
        if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode != 0:
            bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
            if not bins:
                if os.geteuid() != 0:
                    sys.exit("no PostgreSQL: install Debian's postgresql package, or set KEYGATE_TEST_DATABASE_URL")
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env,
                               stdout=subprocess.DEVNULL)
                bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
            root = os.path.join(tempfile.gettempdir(), "keygate-test-pg")
            data = os.path.join(root, "data")
            os.makedirs(root, exist_ok=True)
            as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
            if os.geteuid() == 0:
                subprocess.run(["chown", "-R", "postgres:postgres", root], check=True)
            if not os.path.exists(os.path.join(data, "PG_VERSION")):
                subprocess.run([*as_pg, f"{bins[-1]}/initdb", "-D", data, "-U", "postgres", "--auth=trust",
                                "-E", "UTF8", "--locale=C.UTF-8"], check=True, stdout=subprocess.DEVNULL)
            opts = (f"-p {port} -c listen_addresses=127.0.0.1 -k {data} -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off -c max_connections=400")
            subprocess.run([*as_pg, f"{bins[-1]}/pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(root, "log"),
                            "-w", "start"], check=True, stdout=subprocess.DEVNULL)
    name = f"kg_{int(time.time())}_{os.getpid()}_bench"
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    return admin.rsplit("/", 1)[0] + "/" + name


def redis_url():
    """The Redis the tests use (127.0.0.1:56379), started here if it is not running."""
    port = 56379
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        if not shutil.which("redis-server"):
            if os.geteuid() != 0:
                sys.exit("no redis-server: install Debian's redis-server package")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
        d = os.path.join(tempfile.gettempdir(), "keygate-test-redis")
        os.makedirs(d, exist_ok=True)
        subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                        "no", "--daemonize", "yes", "--dir", d], check=True, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
    return f"redis://127.0.0.1:{port}"


def measure_cluster(binary, tmp, seconds, rounds, samples):
    """One node against three on one PostgreSQL (every node on this machine: they share its cores), then
    how long a revocation on one node takes to be refused by the others while they serve verify load."""
    import threading
    url = postgres_database(tmp)
    env = {"KEYGATE_DATABASE_URL": url,
           "KEYGATE_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    sub = tempfile.mkdtemp(prefix="cluster-", dir=tmp)
    a = Keygate(binary, sub, free_port(), "node-a", env)
    nodes = [a]
    try:
        consumer = a.api("POST", "/v1/consumers", {"name": "cluster"})
        secrets = [a.api("POST", "/v1/keys", {"consumer_id": consumer["id"], "name": f"k{i}"})["key"]
                   for i in range(200)]
        pool = os.path.join(sub, "valid.txt")
        with open(pool, "w") as f:
            f.write("\n".join(secrets) + "\n")
        auth = {"Authorization": f"Bearer {a.admin}", "Content-Type": "application/json"}
        script = write_script(sub, "cluster-verify", "POST", "/v1/verify", auth, keys_file=pool,
                              body_template='{"credential":"%s"}')
        one = [run_wrk(a.url, script, 32, seconds) for _ in range(rounds)]
        # Keys with a rate limit (never reached): checked in this node's cells, or in Redis.
        limited = [a.api("POST", "/v1/keys", {"consumer_id": consumer["id"], "name": f"l{i}",
                                              "rate_limits": [{"name": "s", "limit": 1_000_000, "window_seconds": 1}]})["key"]
                   for i in range(200)]
        lpool = os.path.join(sub, "limited.txt")
        with open(lpool, "w") as f:
            f.write("\n".join(limited) + "\n")
        lscript = write_script(sub, "cluster-limited", "POST", "/v1/verify", auth, keys_file=lpool,
                               body_template='{"credential":"%s"}')
        r = Keygate(binary, sub, free_port(), "node-redis", dict(env, KEYGATE_RATE_LIMITS_REDIS_URL=redis_url()),
                    admin=a.admin)
        local_runs, redis_runs = [], []
        for _ in range(rounds):
            local_runs.append(run_wrk(a.url, lscript, 32, seconds))
            redis_runs.append(run_wrk(r.url, lscript, 32, seconds))
        r.stop()
        nodes += [Keygate(binary, sub, free_port(), f"node-{n}", env, admin=a.admin) for n in ("b", "c")]

        def spread(conns_each, secs):
            out = [None] * len(nodes)

            def run(i):
                out[i] = run_wrk(nodes[i].url, script, conns_each[i], secs)
            ts = [threading.Thread(target=run, args=(i,)) for i in range(len(nodes))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return out
        three = [spread([11, 11, 10], seconds) for _ in range(rounds)]
        med = lambda rs: sorted(rs, key=lambda r: r["rps"])[len(rs) // 2]
        one_m = med(one)
        three_rps = sorted(sum(r["rps"] for r in rs) for rs in three)[len(three) // 2]
        errors = (sum(r["errors"] for r in one) + sum(r["errors"] for rs in three for r in rs)
                  + sum(r["errors"] for r in local_runs + redis_runs))
        local_m, redis_m = med(local_runs), med(redis_runs)

        # Revocation propagation under load: A and B serve verify load; a key made on C and cached on A
        # and B is revoked on C; each of A and B is asked until it refuses it.
        def verify(node, secret):
            req = urllib.request.Request(node.url + "/v1/verify", data=json.dumps({"credential": secret}).encode(),
                                         headers=auth, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())["code"]
        c = nodes[2]
        stop = threading.Event()

        def keep_loading():
            while not stop.is_set():
                spread([16, 16, 1], 2)
        load = threading.Thread(target=keep_loading)
        load.start()
        delays = []
        time.sleep(0.5)
        for i in range(samples):
            k = c.api("POST", "/v1/keys", {"consumer_id": consumer["id"], "name": f"revoke-{i}"})
            for n in nodes[:2]:
                while verify(n, k["key"]) != "VALID":
                    time.sleep(0.001)
            c.api("POST", f"/v1/keys/{k['id']}/revoke")
            revoked_at = time.perf_counter()
            found = {}

            def watch(n):
                while verify(n, k["key"]) != "REVOKED":
                    pass
                found[n.url] = time.perf_counter() - revoked_at
            ws = [threading.Thread(target=watch, args=(n,)) for n in nodes[:2]]
            for w in ws:
                w.start()
            for w in ws:
                w.join()
            delays += found.values()
        stop.set()
        load.join()
        delays.sort()
        pct = lambda q: delays[min(len(delays) - 1, int(q * len(delays)))] * 1000
        result = {"one_node_rps": one_m["rps"], "one_node_p99_us": one_m["p99_us"], "three_nodes_rps": three_rps,
                  "ratio": three_rps / one_m["rps"] if one_m["rps"] else float("nan"),
                  "revocation_p50_ms": pct(0.5), "revocation_p99_ms": pct(0.99),
                  "revocation_max_ms": delays[-1] * 1000, "samples": len(delays), "errors": errors,
                  "limited_local_rps": local_m["rps"], "limited_local_p99_us": local_m["p99_us"],
                  "limited_redis_rps": redis_m["rps"], "limited_redis_p99_us": redis_m["p99_us"]}
        log(f"cluster: 1 node {result['one_node_rps']:,.0f} req/s, 3 nodes {three_rps:,.0f} req/s; revocation "
            f"p50 {result['revocation_p50_ms']:.1f} ms, p99 {result['revocation_p99_ms']:.1f} ms")
        return result
    finally:
        for n in nodes:
            n.stop()


def fmt_us(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us} µs"


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model})"


FLOOR_GET = "hyper alone, GET (the HTTP library's floor)"
FLOOR_POST = "hyper alone, POST of a verify's size, body read (its POST floor)"

# The targets --before compares (the hot paths this repository's changes can move).
COMPARE_TARGETS = ["GET /v1/auth, valid key", "POST /v1/verify, valid key", "POST /v1/verify, JWT access token",
                   "POST /oauth2/token, client credentials, JWT", "POST /oauth2/token, client credentials, opaque"]


def auth_request_conf(port, kg_port, origin_port):
    """An nginx server that asks Keygate's forward-auth about each request, then proxies to the origin: the
    setup the gateway replaces. Keep-alive to both, as a tuned production configuration has."""
    return f"""
    upstream kg {{ server 127.0.0.1:{kg_port}; keepalive 64; }}
    upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            auth_request /_keygate;
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-API-Key "";
        }}
        location = /_keygate {{
            internal;
            proxy_pass http://kg/v1/auth?scope=articles:read;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
    }}
"""


def write_routes(tmp, origin_port):
    path = os.path.join(tmp, "routes.toml")
    with open(path, "w") as f:
        f.write(f"""
[[route]]
name = "public"
path = "/public"
upstream = "http://127.0.0.1:{origin_port}"
public = true

[[route]]
name = "api"
path = "/"
upstream = "http://127.0.0.1:{origin_port}"
scopes = ["articles:read"]
""")
    return path


def seed_targets(kg, tmp, prefix, only, gateway=None):
    """Seeds a consumer, keys and OAuth clients on one Keygate; returns its targets (name, url, script)."""
    consumer = kg.api("POST", "/v1/consumers", {"name": "load"})
    key = kg.api("POST", "/v1/keys", {"consumer_id": consumer["id"], "name": "load", "scopes": ["articles:read"]})
    secret = key["key"]
    limited = kg.api("POST", "/v1/keys", {
        "consumer_id": consumer["id"], "name": "limited", "scopes": ["articles:read"],
        "rate_limits": [{"name": "per_second", "limit": 1_000_000_000, "window_seconds": 1},
                        {"name": "per_day", "limit": 1_000_000_000, "window_seconds": 86_400}],
        "quota": {"remaining": 1_000_000_000}})["key"]
    unknown_file = os.path.join(tmp, prefix + "unknown-keys.txt")
    with open(unknown_file, "w") as f:
        for _ in range(200_000):
            f.write(make_secret() + "\n")
    malformed = secret[:-1] + ("a" if secret[-1] != "a" else "b")

    auth = {"Authorization": f"Bearer {kg.admin}", "Content-Type": "application/json"}
    jwt_client, opaque_client = (oauth_client(kg, consumer["id"], f, prefix) for f in ("jwt", "opaque"))
    req = urllib.request.Request(kg.url + "/oauth2/token", data=b"grant_type=client_credentials",
                                 headers=jwt_client, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        jwt_token = json.loads(r.read())["access_token"]
    targets = [
        ("GET /healthz (Keygate's HTTP floor)", kg.url, write_script(tmp, prefix + "healthz", "GET", "/healthz")),
        ("POST /v1/verify, valid key", kg.url, write_script(
            tmp, prefix + "verify_valid", "POST", "/v1/verify", auth,
            json.dumps({"credential": secret, "scopes": ["articles:read"]}))),
        ("POST /v1/verify, valid key + 2 rate limits + quota", kg.url, write_script(
            tmp, prefix + "verify_limited", "POST", "/v1/verify", auth,
            json.dumps({"credential": limited, "scopes": ["articles:read"]}))),
        ("POST /v1/verify, unknown key (200k distinct)", kg.url, write_script(
            tmp, prefix + "verify_unknown", "POST", "/v1/verify", auth, keys_file=unknown_file,
            body_template='{"credential":"%s"}')),
        ("POST /v1/verify, malformed key", kg.url, write_script(
            tmp, prefix + "verify_malformed", "POST", "/v1/verify", auth, json.dumps({"credential": malformed}))),
        ("GET /v1/auth, valid key", kg.url, write_script(
            tmp, prefix + "auth_valid", "GET", "/v1/auth?scope=articles:read", {"X-API-Key": secret})),
        ("POST /v1/verify, JWT access token", kg.url, write_script(
            tmp, prefix + "verify_jwt", "POST", "/v1/verify", auth,
            json.dumps({"credential": jwt_token, "scopes": ["articles:read"]}))),
        ("POST /oauth2/token, client credentials, JWT", kg.url, write_script(
            tmp, prefix + "token_jwt", "POST", "/oauth2/token", jwt_client, "grant_type=client_credentials")),
        ("POST /oauth2/token, client credentials, opaque", kg.url, write_script(
            tmp, prefix + "token_opaque", "POST", "/oauth2/token", opaque_client, "grant_type=client_credentials")),
        ("POST /oauth2/introspect, JWT", kg.url, write_script(
            tmp, prefix + "introspect", "POST", "/oauth2/introspect", jwt_client, f"token={jwt_token}")),
    ]
    if gateway:
        gw_url, auth_url = gateway
        targets += [
            ("gateway → nginx, public route (no credential)", gw_url, write_script(
                tmp, prefix + "gw_public", "GET", "/public/x")),
            ("gateway → nginx, valid key", gw_url, write_script(
                tmp, prefix + "gw_key", "GET", "/articles/1", {"X-API-Key": secret})),
            ("nginx auth_request → Keygate → nginx, valid key", auth_url, write_script(
                tmp, prefix + "auth_request_key", "GET", "/articles/1", {"X-API-Key": secret})),
        ]
    return [t for t in targets if only is None or t[0] in only]


def measure_refresh(binary, tmp, families, seconds):
    """Refresh grants per second at 32 connections: every request rotates a distinct refresh token (a real,
    durable rotation: one transaction each), seeded through the real authorization code flow."""
    import http.client
    import hashlib
    import re
    import threading
    sub = tempfile.mkdtemp(prefix="refresh-", dir=tmp)
    kg = Keygate(binary, sub, free_port(), "refresh")
    try:
        consumer = kg.api("POST", "/v1/consumers", {"name": "refresh"})
        redirect = "https://app.example.com/cb"
        c = kg.api("POST", "/v1/clients", {"consumer_id": consumer["id"], "name": "refresh", "scopes": ["articles:read"],
                                           "grant_types": ["authorization_code", "refresh_token"],
                                           "redirect_uris": [redirect]})
        password = "load test passphrase 1"
        kg.api("POST", "/v1/users", {"username": "loaduser", "password": password})
        verifier = "v" * 50
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
        host = kg.url[len("http://"):]
        q = urllib.parse.urlencode({"response_type": "code", "client_id": c["client_id"], "redirect_uri": redirect,
                                    "scope": "articles:read", "code_challenge": challenge,
                                    "code_challenge_method": "S256"})
        auth_path = f"/oauth2/authorize?{q}"
        basic = base64.b64encode(f"{c['client_id']}:{c['client_secret']}".encode()).decode()
        form = "application/x-www-form-urlencoded"

        # One browser logs in and consents once; afterwards each authorization is a redirect with a code.
        conn = http.client.HTTPConnection(host)
        conn.request("GET", auth_path)
        r = conn.getresponse()
        cookies = {m.group(1): m.group(2) for m in re.finditer(r"(kg_\w+)=([^;]+)", " ".join(r.headers.get_all("set-cookie") or []))}
        html = r.read().decode()
        fields = dict(re.findall(r'name="(request_id|csrf)" value="([^"]+)"', html))
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        conn.request("POST", "/oauth2/authorize/login", urllib.parse.urlencode({**fields, "username": "loaduser", "password": password}),
                     {"Content-Type": form, "Cookie": cookie})
        r = conn.getresponse()
        cookies.update({m.group(1): m.group(2) for m in re.finditer(r"(kg_\w+)=([^;]+)", " ".join(r.headers.get_all("set-cookie") or []))})
        html = r.read().decode()
        fields = dict(re.findall(r'name="(request_id|csrf)" value="([^"]+)"', html))
        cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
        conn.request("POST", "/oauth2/authorize/consent", urllib.parse.urlencode({**fields, "decision": "allow"}),
                     {"Content-Type": form, "Cookie": cookie})
        r = conn.getresponse()
        r.read()
        if r.status != 303:
            sys.exit(f"consent failed: {r.status}")

        tokens, lock = [], threading.Lock()
        started = time.time()

        def seed(n):
            conn = http.client.HTTPConnection(host)
            mine = []
            for _ in range(n):
                conn.request("GET", auth_path, headers={"Cookie": cookie})
                r = conn.getresponse()
                r.read()
                code = urllib.parse.parse_qs(urllib.parse.urlparse(r.headers["location"]).query)["code"][0]
                conn.request("POST", "/oauth2/token", urllib.parse.urlencode({
                    "grant_type": "authorization_code", "code": code, "redirect_uri": redirect, "code_verifier": verifier}),
                    {"Content-Type": form, "Authorization": f"Basic {basic}"})
                mine.append(json.loads(conn.getresponse().read())["refresh_token"])
            with lock:
                tokens.extend(mine)

        workers = [threading.Thread(target=seed, args=(families // 8,)) for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        seed_seconds = time.time() - started
        log(f"seeded {len(tokens):,} token families through the authorization code flow in {seed_seconds:.0f} s")
        keys = os.path.join(sub, "refresh.txt")
        with open(keys, "w") as f:
            f.write("\n".join(tokens) + "\n")
        script = os.path.join(sub, "refresh.lua")
        with open(script, "w") as f:
            f.write(f"""
local keys = {{}}
for line in io.lines({lua_quote(keys)}) do keys[#keys + 1] = line end
local i = 0
local headers = {{["Authorization"] = "Basic {basic}", ["Content-Type"] = "{form}"}}
request = function()
  i = i + 1
  return wrk.format("POST", "/oauth2/token", headers, "grant_type=refresh_token&refresh_token=" .. keys[i])
end
{LUA_DONE}""")
        cmd = ["wrk", "-t", "1", "-c", "32", "-d", f"{seconds}s", "--timeout", "5s", "-s", script, kg.url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        for line in out.stdout.splitlines():
            if line.startswith("KG_RESULT "):
                r = json.loads(line[len("KG_RESULT "):])
                r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
                r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
                if r["requests"] > len(tokens):
                    log(f"WARNING: {r['requests']:,} requests but only {len(tokens):,} tokens: seed more")
                r["families"] = len(tokens)
                r["seed_per_second"] = len(tokens) / seed_seconds
                return r
        sys.exit(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    finally:
        kg.stop()


def measure_dpop(binary, tmp, proofs, seconds):
    """POST /v1/verify at 32 connections: a DPoP-bound JWT, each request with its own fresh ES256 proof
    (made with PyJWT beforehand, all within the 60 s window), next to the same verify of a bearer JWT."""
    import uuid
    import hashlib
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ec
    sub = tempfile.mkdtemp(prefix="dpop-", dir=tmp)
    kg = Keygate(binary, sub, free_port(), "dpop")
    try:
        consumer = kg.api("POST", "/v1/consumers", {"name": "dpop"})
        headers = oauth_client(kg, consumer["id"], "jwt")
        key = ec.generate_private_key(ec.SECP256R1())
        nums = key.public_key().public_numbers()
        b64 = lambda n: base64.urlsafe_b64encode(n.to_bytes(32, "big")).decode().rstrip("=")
        jwk = {"kty": "EC", "crv": "P-256", "x": b64(nums.x), "y": b64(nums.y)}

        def proof(method, url, token=None):
            claims = {"jti": str(uuid.uuid4()), "htm": method, "htu": url, "iat": int(time.time())}
            if token:
                claims["ath"] = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode().rstrip("=")
            return pyjwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk})

        def token(bound):
            h = dict(headers)
            if bound:
                h["DPoP"] = proof("POST", kg.url + "/oauth2/token")
            req = urllib.request.Request(kg.url + "/oauth2/token", data=b"grant_type=client_credentials", headers=h, method="POST")
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())["access_token"]

        bound, bearer = token(True), token(False)
        auth = {"Authorization": f"Bearer {kg.admin}", "Content-Type": "application/json"}
        bearer_script = write_script(sub, "bearer", "POST", "/v1/verify", auth, json.dumps({"credential": bearer}))
        bearer_run = run_wrk(kg.url, bearer_script, 32, seconds)
        api = "https://api.example.com/v1/articles"
        started = time.time()
        bodies = os.path.join(sub, "bodies.txt")
        with open(bodies, "w") as f:
            for _ in range(proofs):
                f.write(json.dumps({"credential": bound, "dpop": {"proof": proof("GET", api, bound), "method": "GET", "url": api}}) + "\n")
        log(f"made {proofs:,} DPoP proofs in {time.time() - started:.1f} s")
        script = os.path.join(sub, "dpop.lua")
        with open(script, "w") as f:
            f.write(f"""
local bodies = {{}}
for line in io.lines({lua_quote(bodies)}) do bodies[#bodies + 1] = line end
local i = 0
local headers = {{["Authorization"] = "Bearer {kg.admin}", ["Content-Type"] = "application/json"}}
request = function()
  i = i + 1
  return wrk.format("POST", "/v1/verify", headers, bodies[i])
end
response = function(status, hdrs, body)
  if not string.find(body, '"VALID"', 1, true) then io.write("KG_NOT_VALID\\n") end
end
{LUA_DONE}""")
        cmd = ["wrk", "-t", "1", "-c", "32", "-d", f"{seconds}s", "--timeout", "5s", "-s", script, kg.url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        for line in out.stdout.splitlines():
            if line.startswith("KG_RESULT "):
                r = json.loads(line[len("KG_RESULT "):])
                r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
                r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
                # Every answer must be VALID: a refused proof would make this a benchmark of refusals.
                r["not_valid"] = out.stdout.count("KG_NOT_VALID")
                r["errors"] += r["not_valid"]
                if r["requests"] > proofs:
                    log(f"WARNING: {r['requests']:,} requests but only {proofs:,} proofs: make more")
                    r["errors"] += r["requests"] - proofs
                return {"dpop": r, "bearer": bearer_run}
        sys.exit(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    finally:
        kg.stop()


def measure_events(binary, tmp, endpoints, seconds, rounds):
    """Admin writes (POST /v1/consumers, 32 connections) without webhooks and with `endpoints` endpoints
    taking every event (each write then also queues that many deliveries in its transaction), interleaved
    in one run; then how fast the worker delivers the backlog to a local receiver that answers 204."""
    import http.server
    import threading
    received = {"n": 0}
    lock = threading.Lock()

    class Sink(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", "0")))
            with lock:
                received["n"] += 1
            self.send_response(204)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sub = tempfile.mkdtemp(prefix="events-", dir=tmp)
    plain = Keygate(binary, sub, free_port(), "no-webhooks")
    hooked = Keygate(binary, sub, free_port(), "webhooks", {"KEYGATE_WEBHOOKS_ALLOW_PRIVATE": "true"})
    try:
        for i in range(endpoints):
            hooked.api("POST", "/v1/webhooks", {"url": f"http://127.0.0.1:{sink.server_address[1]}/hook/{i}",
                                                 "events": ["*"]})
        scripts = {name: write_script(sub, f"create-consumer-{name}", "POST", "/v1/consumers",
                                      {"Content-Type": "application/json", "Authorization": f"Bearer {kg.admin}"},
                                      '{"name":"load"}')
                   for name, kg in (("plain", plain), ("hooked", hooked))}
        runs = {"plain": [], "hooked": []}
        for _ in range(rounds):
            for name, kg in (("plain", plain), ("hooked", hooked)):
                runs[name].append(run_wrk(kg.url, scripts[name], 32, seconds))
        created = sum(r["requests"] for r in runs["hooked"])
        expected = created * endpoints
        started = time.time()
        while received["n"] < expected and time.time() - started < 600:
            time.sleep(0.2)
        drain = time.time() - started
        med = lambda rs: sorted(rs, key=lambda r: r["rps"])[len(rs) // 2]
        p, h = med(runs["plain"]), med(runs["hooked"])
        return {"endpoints": endpoints, "plain_rps": p["rps"], "plain_p99_us": p["p99_us"], "hooked_rps": h["rps"],
                "hooked_p99_us": h["p99_us"], "ratio": h["rps"] / p["rps"] if p["rps"] else float("nan"),
                "delivered": received["n"], "expected": expected, "drain_seconds": drain,
                "errors": sum(r["errors"] for rs in runs.values() for r in rs)}
    finally:
        plain.stop()
        hooked.stop()
        sink.shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="duration of each measurement (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all targets (default 2); the median is reported")
    ap.add_argument("--connections", default="1,32", help="comma-separated connection counts (default 1,32)")
    ap.add_argument("--smoke", action="store_true", help="1-second runs, one round: checks that everything works")
    ap.add_argument("--no-build", action="store_true", help="use target/release/keygate as it is")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--only-scale", action="store_true", help="skip the target table; measure --scale only")
    ap.add_argument("--before", help="an older keygate binary: measure the main targets on it and on this "
                    "build, interleaved in the same run (before/after of a change)")
    ap.add_argument("--before-env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment for the --before server only (repeatable): compares a setting on the same "
                    "binary, e.g. --before target/release/keygate --before-env TOKIO_WORKER_THREADS=1")
    ap.add_argument("--refresh", type=int, default=0, help="also measure refresh grants/s at 32 connections, "
                    "with this many token families seeded through the authorization code flow (e.g. 40000)")
    ap.add_argument("--dpop", type=int, default=0, help="also measure /v1/verify of a DPoP-bound token at 32 "
                    "connections, with this many fresh proofs made beforehand (e.g. 60000; needs PyJWT[crypto])")
    ap.add_argument("--events", type=int, default=0, help="also measure admin writes with this many webhook "
                    "endpoints taking every event, against none, and how fast the backlog is delivered (e.g. 3)")
    ap.add_argument("--cluster", type=int, default=0, metavar="SAMPLES",
                    help="also measure one node against three on one PostgreSQL, and revocation propagation "
                         "under load over this many revocations (each seen by two nodes)")
    ap.add_argument("--scale", default="", help="comma-separated stored-key counts to measure verify at, e.g. 1000,1000000")
    args = ap.parse_args()
    if args.smoke:
        args.seconds, args.rounds = 1, 1
    conns_list = [int(c) for c in args.connections.split(",")]

    ensure_tools()
    binary = os.path.join(ROOT, "target", "release", "keygate")
    if not args.no_build:
        log("building Keygate (release)")
        # (`--bin` selects among all the packages named: each binary is named.)
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "keygate", "-p", "http-floor",
                        "--bin", "keygate", "--bin", "http-floor"], cwd=ROOT, check=True)
    floor_binary = os.path.join(ROOT, "target", "release", "http-floor")

    tmp = tempfile.mkdtemp(prefix="keygate-load-")
    nginx = kg = before = floor = None
    try:
        nginx_port, kg_port, gw_port, auth_port = free_port(), free_port(), free_port(), free_port()
        nginx = start_nginx(tmp, nginx_port, auth_request_conf(auth_port, kg_port, nginx_port))
        routes = write_routes(tmp, nginx_port)
        kg = Keygate(binary, tmp, kg_port, extra_args=(
            "--gateway-listen", f"127.0.0.1:{gw_port}", "--gateway-routes", routes))
        gateway = (f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{auth_port}")
        before_env = dict(e.split("=", 1) for e in args.before_env)
        before = Keygate(args.before, tmp, free_port(), "before", before_env) if args.before else None
        log(f"keygate on {kg.url}, nginx on 127.0.0.1:{nginx_port}; data in {tmp}")

        targets = [("nginx return 200 (baseline)", f"http://127.0.0.1:{nginx_port}", write_script(tmp, "nginx"))]
        # The HTTP library's floor (crates/http-floor): hyper alone, doing nothing. Keygate's cost above
        # it is Keygate's own; the baseline's above it is the difference between nginx and hyper.
        floor_url = None
        if not before and not args.only_scale and os.path.exists(floor_binary):
            floor_port = free_port()
            floor = subprocess.Popen([floor_binary, f"127.0.0.1:{floor_port}"], stdout=subprocess.DEVNULL)
            floor_url = f"http://127.0.0.1:{floor_port}"
            time.sleep(0.2)
            if floor.poll() is not None:
                sys.exit(f"{floor_binary} exited at once ({floor.returncode}); is port {floor_port} free?")
            wait_http(floor_url + "/")
            like_verify = {"Authorization": f"Bearer {make_secret()}", "Content-Type": "application/json"}
            targets += [
                (FLOOR_GET, floor_url, write_script(tmp, "floor_get")),
                (FLOOR_POST, floor_url, write_script(
                    tmp, "floor_post", "POST", "/v1/verify", like_verify,
                    json.dumps({"credential": make_secret(), "scopes": ["articles:read"]}))),
            ]
        elif not before and not args.only_scale:
            log(f"{floor_binary} is missing (run with --no-build before it was built): no HTTP floor rows")
        if before:
            # The same targets on the old and the new binary, interleaved, so that drift hits both alike.
            old_targets = seed_targets(before, tmp, "before", COMPARE_TARGETS)
            new_targets = seed_targets(kg, tmp, "after", COMPARE_TARGETS)
            for o, n in zip(old_targets, new_targets):
                targets += [(o[0] + " — before", o[1], o[2]), (n[0] + " — after", n[1], n[2])]
        else:
            targets += seed_targets(kg, tmp, "", None, gateway)

        results = {}  # (target, conns) -> list of runs
        # Whose CPU each target's requests use (none for the auth_request setup: nginx and Keygate both).
        server_pids = {f"http://127.0.0.1:{nginx_port}": child_pids(nginx.pid), kg.url: [kg.proc.pid],
                       gateway[0]: [kg.proc.pid]}
        if before:
            server_pids[before.url] = [before.proc.pid]
        if floor_url:
            server_pids[floor_url] = [floor.pid]
        if args.only_scale:
            targets, conns_list = [], []
        for rnd in range(args.rounds):
            for conns in conns_list:
                baseline, baseline_cpu = None, float("nan")
                # Odd rounds take the targets after the baseline in reverse order: whichever runs first in a
                # round does measurably better (most at 1 connection), so no target, and neither side of a
                # --before pair, is always first.
                order = targets if rnd % 2 == 0 else targets[:1] + targets[:0:-1]
                for name, url, script in order:
                    pids = server_pids.get(url)
                    used = cpu_seconds(pids) if pids else None
                    r = run_wrk(url, script, conns, args.seconds)
                    # The serving process's CPU per request: steadier than req/s on a shared machine.
                    r["cpu_us"] = ((cpu_seconds(pids) - used) * 1e6 / r["requests"]
                                   if pids and r["requests"] else float("nan"))
                    if baseline is None:
                        baseline = r["rps"]
                        baseline_cpu = r["cpu_us"]
                    r["ratio"] = r["rps"] / baseline if baseline else float("nan")
                    r["cpu_ratio"] = baseline_cpu / r["cpu_us"] if r["cpu_us"] else float("nan")
                    results.setdefault((name, conns), []).append(r)
                    log(f"round {rnd + 1} c={conns:<3} {name:<46} {r['rps']:>9.0f} req/s  "
                        f"p99 {fmt_us(r['p99_us'])}  ratio {r['ratio']:.2f}  cpu {r['cpu_us']:.1f} µs  errors {r['errors']} "
                        f"(connect {r['connect']}, read {r['read']}, write {r['write']}, "
                        f"non-2xx {r['status']}, timeout {r['timeout']})")
        rss = kg.rss_mib()

        print(f"\nMachine: {machine()}; {args.rounds} round(s) of {args.seconds} s per target; "
              f"wrk on the same machine; Keygate RSS after the run: {rss:.0f} MiB\n")
        print("| target | conns | req/s | p50 | p99 | p99.9 | errors | vs baseline | server CPU a request | baseline's CPU / this |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        failed = False
        summary = []
        for conns in conns_list:
            for name, _, _ in targets:
                runs = results[(name, conns)]
                med = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
                ratio = statistics.median(r["ratio"] for r in runs)
                errors = sum(r["errors"] for r in runs)
                failed |= errors > 0
                cpu = statistics.median(r["cpu_us"] for r in runs)
                cpu_ratio = statistics.median(r["cpu_ratio"] for r in runs)
                cpu_text = "—" if cpu != cpu else f"{cpu:.1f} µs"
                cpu_ratio_text = "—" if cpu_ratio != cpu_ratio else f"{cpu_ratio:.2f}×"
                print(f"| {name} | {conns} | {med['rps']:,.0f} | {fmt_us(med['p50_us'])} | {fmt_us(med['p99_us'])} | "
                      f"{fmt_us(med['p999_us'])} | {errors} | {ratio:.2f}× | {cpu_text} | {cpu_ratio_text} |")
                summary.append({"target": name, "connections": conns, "rps": med["rps"], "p50_us": med["p50_us"],
                                "p99_us": med["p99_us"], "p999_us": med["p999_us"], "errors": errors, "ratio": ratio,
                                "cpu_us": cpu, "cpu_ratio": cpu_ratio})
        by = {(r["target"], r["connections"]): r for r in summary}
        base1 = by.get(("nginx return 200 (baseline)", 1))
        for name in ("gateway → nginx, public route (no credential)", "gateway → nginx, valid key",
                     "nginx auth_request → Keygate → nginx, valid key"):
            r = by.get((name, 1))
            if r and base1:
                print(f"\nAdded latency at 1 connection, p50 over calling nginx directly: {name}: "
                      f"{(r['p50_us'] - base1['p50_us']) / 1000:.3f} ms", end="")
        print()
        for conns in conns_list:
            rows = [by.get((name, conns)) for name in (FLOOR_GET, "GET /v1/auth, valid key", FLOOR_POST,
                                                          "POST /v1/verify, valid key")]
            if all(rows) and rows[0]["rps"] and rows[2]["rps"]:
                fg, auth, fp, verify = rows
                print(f"HTTP floor, {conns} connection(s): hyper alone {fg['ratio']:.2f}× nginx on a GET, "
                      f"{fp['ratio']:.2f}× on a POST; Keygate's forward-auth {auth['ratio']:.2f}× "
                      f"({auth['rps'] / fg['rps']:.2f}× the GET floor), verify {verify['ratio']:.2f}× "
                      f"({verify['rps'] / fp['rps']:.2f}× the POST floor)")
        gw32, ar32 = by.get(("gateway → nginx, valid key", 32)), by.get(("nginx auth_request → Keygate → nginx, valid key", 32))
        if gw32 and ar32 and ar32["rps"]:
            print(f"Gateway vs nginx auth_request → Keygate, 32 connections: {gw32['rps'] / ar32['rps']:.2f}× the throughput")
        kg.stop()
        kg = None
        if before:
            before.stop()
            before = None
        if floor:
            floor.terminate()
            floor.wait(timeout=10)
            floor = None
        scale = []
        for n in [int(x) for x in args.scale.split(",") if x.strip()]:
            scale.append(measure_scale(binary, tmp, n, args.seconds, args.rounds))
            failed |= scale[-1]["errors"] > 0
        if scale:
            print("\nVerify at scale: POST /v1/verify, 32 connections; valid: each request one of the same number "
                  "(1,000) of hot keys at every scale; unknown: 100,000 distinct well-formed keys.\n")
            print("| stored keys | valid req/s | valid p99 | unknown req/s | unknown p99 | RSS after seeding | RSS after run | seed time |")
            print("|---|---|---|---|---|---|---|---|")
            for r in scale:
                print(f"| {r['keys']:,} | {r['valid_rps']:,.0f} | {fmt_us(r['valid_p99_us'])} | {r['unknown_rps']:,.0f} | "
                      f"{fmt_us(r['unknown_p99_us'])} | {r['rss_seeded_mib']:.0f} MiB | {r['rss_mib']:.0f} MiB | {r['seed_seconds']:.0f} s |")
        refresh = None
        if args.refresh:
            refresh = measure_refresh(binary, tmp, args.refresh, args.seconds)
            failed |= refresh["errors"] > 0
            print(f"\nRefresh grants (each a durable rotation, one transaction), 32 connections: "
                  f"{refresh['rps']:,.0f}/s, p50 {fmt_us(refresh['p50_us'])}, p99 {fmt_us(refresh['p99_us'])}, "
                  f"errors {refresh['errors']}; seeding ran the code flow (authorize + exchange) at "
                  f"{refresh['seed_per_second']:,.0f} families/s")
        dpop = None
        if args.dpop:
            dpop = measure_dpop(binary, tmp, args.dpop, args.seconds)
            failed |= dpop["dpop"]["errors"] > 0
            d, b = dpop["dpop"], dpop["bearer"]
            print(f"\nPOST /v1/verify, 32 connections: bearer JWT {b['rps']:,.0f}/s (p99 {fmt_us(b['p99_us'])}); "
                  f"DPoP-bound JWT with a fresh ES256 proof each {d['rps']:,.0f}/s (p99 {fmt_us(d['p99_us'])}), "
                  f"{d['rps'] / b['rps']:.2f}x; errors {d['errors']}")
        cluster = None
        if args.cluster:
            cluster = measure_cluster(binary, tmp, args.seconds, args.rounds, args.cluster)
            failed |= cluster["errors"] > 0
            c = cluster
            print(f"\nSeveral nodes on one PostgreSQL, POST /v1/verify, 32 connections in all (every node on this "
                  f"machine): 1 node {c['one_node_rps']:,.0f}/s (p99 {fmt_us(c['one_node_p99_us'])}); 3 nodes "
                  f"{c['three_nodes_rps']:,.0f}/s ({c['ratio']:.2f}×). Revocation on one node refused by the others "
                  f"under load: p50 {c['revocation_p50_ms']:.1f} ms, p99 {c['revocation_p99_ms']:.1f} ms, max "
                  f"{c['revocation_max_ms']:.1f} ms over {c['samples']} observations; errors {c['errors']}")
            print(f"Keys with a rate limit, one node, 32 connections: limits in the node's cells "
                  f"{c['limited_local_rps']:,.0f}/s (p99 {fmt_us(c['limited_local_p99_us'])}); shared in Redis "
                  f"{c['limited_redis_rps']:,.0f}/s (p99 {fmt_us(c['limited_redis_p99_us'])}, "
                  f"{c['limited_redis_rps'] / c['limited_local_rps']:.2f}×)")
        events = None
        if args.events:
            events = measure_events(binary, tmp, args.events, args.seconds, args.rounds)
            failed |= events["errors"] > 0 or events["delivered"] < events["expected"]
            e = events
            print(f"\nPOST /v1/consumers, 32 connections: no webhooks {e['plain_rps']:,.0f}/s (p99 "
                  f"{fmt_us(e['plain_p99_us'])}); {e['endpoints']} endpoints taking every event {e['hooked_rps']:,.0f}/s "
                  f"(p99 {fmt_us(e['hooked_p99_us'])}), {e['ratio']:.2f}x; {e['delivered']:,} of {e['expected']:,} "
                  f"deliveries made {e['drain_seconds']:.1f} s after the writes ended; errors {e['errors']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "rss_mib": rss, "results": summary, "scale": scale,
                           "refresh": refresh, "dpop": dpop, "events": events, "cluster": cluster}, f, indent=2)
        if failed:
            print("\nFAILED: some requests errored (see the errors column)", file=sys.stderr)
            return 1
        return 0
    finally:
        if floor:
            floor.terminate()
        if kg:
            kg.stop()
        if before:
            before.stop()
        if nginx:
            nginx.terminate()
            nginx.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
