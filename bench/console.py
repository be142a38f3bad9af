#!/usr/bin/env python3
"""The console at scale: page times with many keys and 30 days of usage buckets.

    python3 bench/console.py                    # 100,000 keys, 2,000 of them busy, 30 days of buckets
    python3 bench/console.py --keys 10000 --active 500 --no-build

Seeds a fresh Keygate (release build) with --keys keys through the bulk import, stops it, writes usage
buckets straight into its SQLite file as the flusher would have over 30 days (hour and day buckets for
--active keys, minute buckets for the last 48 hours for a tenth of them), starts it again, signs in to the
console and fetches each page --repeat times. Prints the server's own time per page (from its access
log, `latency_us`) as median and worst, and the query plan of the usage reads (index, never a scan).
"""

import argparse
import http.cookiejar
import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load  # noqa: E402  (the load harness: Keygate process, key import, helpers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODES = ["VALID", "VALID", "VALID", "VALID", "RATE_LIMITED", "NOT_FOUND", "QUOTA_EXCEEDED"]


def seed_usage(db, keys, active, now_ms):
    """Usage rows as 30 days of flushes would leave them. Returns rows written per granularity."""
    busy = random.sample(keys, min(active, len(keys)))
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    rows = {"minute": 0, "hour": 0, "day": 0}
    hour, day, minute = 3_600_000, 86_400_000, 60_000
    sql = ("INSERT INTO usage_buckets (key_id, consumer_id, granularity, bucket_start, code, count) "
           "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, granularity, bucket_start, code) "
           "DO UPDATE SET count = count + excluded.count")
    with con:
        for n, (key_id, consumer_id) in enumerate(busy):
            codes = random.sample(CODES, 2)
            batch = []
            for d in range(30):
                start = (now_ms - d * day) - (now_ms - d * day) % day
                for code in codes:
                    batch.append((key_id, consumer_id, "day", start, code, random.randint(100, 5000)))
                    rows["day"] += 1
            for h in range(30 * 24):
                start = (now_ms - h * hour) - (now_ms - h * hour) % hour
                for code in codes:
                    batch.append((key_id, consumer_id, "hour", start, code, random.randint(1, 300)))
                    rows["hour"] += 1
            if n % 10 == 0:
                for m in range(48 * 60):
                    start = (now_ms - m * minute) - (now_ms - m * minute) % minute
                    batch.append((key_id, consumer_id, "minute", start, codes[0], random.randint(1, 20)))
                    rows["minute"] += 1
            con.executemany(sql, batch)
            if n % 500 == 499:
                load.log(f"usage of {n + 1:,}/{len(busy):,} busy keys written")
        # The roll-ups (per consumer and for all keys), as the flusher writes them beside the buckets.
    with con:
        con.execute("DELETE FROM usage_rollups")
        con.execute("INSERT INTO usage_rollups (scope, granularity, bucket_start, code, count) "
                    "SELECT '', granularity, bucket_start, code, SUM(count) FROM usage_buckets "
                    "GROUP BY granularity, bucket_start, code")
        con.execute("INSERT INTO usage_rollups (scope, granularity, bucket_start, code, count) "
                    "SELECT consumer_id, granularity, bucket_start, code, SUM(count) FROM usage_buckets "
                    "GROUP BY consumer_id, granularity, bucket_start, code")
    plans = {}
    # Bound like the server binds them (the planner sees parameters, not constants).
    span = (now_ms - 7 * day, now_ms)
    for name, q, args in [
        ("all keys or a consumer", "SELECT bucket_start, code, count FROM usage_rollups WHERE scope = ? "
                                   "AND granularity = 'hour' AND bucket_start >= ? AND bucket_start < ?", ("",) + span),
        ("one key", "SELECT bucket_start, code, count FROM usage_buckets WHERE key_id = ? "
                    "AND granularity = 'hour' AND bucket_start >= ? AND bucket_start < ?", (busy[0][0],) + span),
        ("boards (per-key totals)", "SELECT key_id, consumer_id, SUM(count) FROM usage_buckets "
                                    "WHERE granularity = 'hour' AND bucket_start >= ? AND bucket_start < ? "
                                    "GROUP BY key_id, consumer_id", span),
    ]:
        plans[name] = " / ".join(r[-1] for r in con.execute("EXPLAIN QUERY PLAN " + q, args))
    con.close()
    return rows, busy, plans


class Console:
    """A browser: cookies, the session's CSRF token."""

    def __init__(self, url):
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path):
        with self.opener.open(self.url + path, timeout=120) as r:
            return r.read().decode()

    def sign_in(self, key):
        page = self.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        data = urllib.parse.urlencode({"csrf": csrf, "key": key}).encode()
        with self.opener.open(self.url + "/console/login", data, timeout=60) as r:
            assert "Overview" in r.read().decode(), "sign-in failed"


def server_times(log_path, since_line):
    """(route, latency in ms) of console requests in the access log after `since_line` lines."""
    out = []
    with open(log_path) as f:
        for i, line in enumerate(f):
            if i < since_line or "keygate::access" not in line:
                continue
            route = re.search(r'route="([^"]+)"', line)
            lat = re.search(r"latency_us=(\d+)", line)
            if route and lat:
                out.append((route.group(1), int(lat.group(1)) / 1000))
    return out


def count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--active", type=int, default=2_000, help="keys with usage in every hour of the 30 days")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--keep", action="store_true",
                    help="leave the server running at the end (prints its URL, admin key, a busy key and consumer)")
    args = ap.parse_args()
    if not args.no_build:
        load.log("building Keygate (release)")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "keygate"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "keygate")
    tmp = tempfile.mkdtemp(prefix="kg-console-")
    port = load.free_port()
    kg = load.Keygate(binary, tmp, port)
    per_consumer = 10_000
    consumers = []
    keys = []
    started = time.time()
    for c in range((args.keys + per_consumer - 1) // per_consumer):
        consumer = kg.api("POST", "/v1/consumers", {"name": f"customer {c}"})
        consumers.append(consumer["id"])
        n = min(per_consumer, args.keys - c * per_consumer)
        kg.import_keys(consumer["id"], [load.make_secret() for _ in range(n)])
    after = None
    while True:
        page = kg.api("GET", "/v1/keys?limit=1000" + (f"&after={after}" if after else ""))
        keys.extend((k["id"], k["consumer_id"]) for k in page["items"] if k["consumer_id"] in consumers)
        after = page["next_after"]
        if not after:
            break
    load.log(f"{len(keys):,} keys in {time.time() - started:.0f} s")
    kg.stop()
    db = os.path.join(kg.data, "keygate.db")
    started = time.time()
    rows, busy, plans = seed_usage(db, keys, args.active, int(time.time() * 1000))
    load.log(f"usage rows {rows} in {time.time() - started:.0f} s")

    # Again on the same data, with the access log on (the server's own time per request).
    log_path = os.path.join(tmp, "serve.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env["KEYGATE_LOG"] = "warn,keygate::access=info"
    proc = subprocess.Popen([binary, "serve", "--data-dir", kg.data, "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    try:
        load.wait_http(kg.url + "/healthz")
        browser = Console(kg.url)
        browser.sign_in(kg.admin)
        busy_key, busy_consumer = busy[0]
        pages = [
            ("overview 1h", "/console/?range=1h"),
            ("overview 24h", "/console/?range=24h"),
            ("overview 7d", "/console/?range=7d"),
            ("overview 30d", "/console/?range=30d"),
            ("consumers", "/console/consumers"),
            ("consumer (10,000 keys)", f"/console/consumers/{busy_consumer}?range=7d"),
            ("keys", "/console/keys"),
            ("keys, searched", "/console/keys?q=k4242"),
            ("key 24h", f"/console/keys/{busy_key}"),
            ("key 30d", f"/console/keys/{busy_key}?range=30d"),
            ("audit", "/console/audit"),
            ("audit, filtered", f"/console/audit?action=key.import&target={busy_key}"),
        ]
        results = []
        for name, path in pages:
            browser.get(path)  # warm
            mark = count_lines(log_path)
            for _ in range(args.repeat):
                browser.get(path)
            time.sleep(0.2)
            times = [ms for route, ms in server_times(log_path, mark) if route.startswith("/console")]
            results.append({"page": name, "path": path, "median_ms": statistics.median(times), "max_ms": max(times)})
            load.log(f"{name:<24} median {statistics.median(times):7.1f} ms   max {max(times):7.1f} ms")
    finally:
        if args.keep:
            print(f"\nstill running: BASE={kg.url} ADMIN_KEY={kg.admin} KEY={busy[0][0]} CONSUMER={busy[0][1]} "
                  f"(pid {proc.pid})")
        else:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\nConsole pages, server time (access log), {args.repeat} requests each; {len(keys):,} keys, "
          f"{len(busy):,} busy; usage rows: {rows}\n")
    print("| page | median | max |\n|---|---:|---:|")
    for r in results:
        print(f"| {r['page']} | {r['median_ms']:.1f} ms | {r['max_ms']:.1f} ms |")
    print("\nQuery plans of the usage reads:")
    for name, plan in plans.items():
        print(f"- {name}: {plan}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": load.machine(), "keys": len(keys), "active": len(busy), "rows": rows,
                       "results": results, "plans": plans}, f, indent=2)


if __name__ == "__main__":
    main()
