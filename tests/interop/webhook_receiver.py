"""A webhook receiver for Keygate's tests: verifies every delivery with the `standardwebhooks` package
(an implementation independent of Keygate's) and appends one JSON line per request to LOG.

Environment: SECRET_FILE (read on every request, so the test can write it after creating the endpoint),
LOG (the JSON-lines file), FAIL_FIRST (answer 500 to this many requests first, default 0).
Prints the port it listens on as its first line.
"""
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

lock = threading.Lock()
state = {"seen": 0}
FAIL_FIRST = int(os.environ.get("FAIL_FIRST", "0"))


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            with open(os.environ["SECRET_FILE"]) as f:
                secret = f.read().strip()
            payload = Webhook(secret).verify(body, headers)
            verified, event_type, object_id = True, payload.get("type"), payload["data"].get("id")
        except Exception as e:  # noqa: BLE001 - a failed check is a result, logged for the test
            verified, event_type, object_id = False, str(e), None
        with lock:
            state["seen"] += 1
            fail = state["seen"] <= FAIL_FIRST
            with open(os.environ["LOG"], "a") as f:
                f.write(json.dumps({"id": headers.get("webhook-id"), "type": event_type, "object_id": object_id,
                                    "verified": verified, "answered": 500 if fail else 204}) + "\n")
        self.send_response(500 if fail else 204)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
try:
    server.serve_forever()
except KeyboardInterrupt:
    sys.exit(0)
