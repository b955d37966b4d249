"""A webhook receiver for callfleet's test suite.

Verifies Standard Webhooks signatures with the official `standardwebhooks` library
(installed, pinned, by scripts/test), records every request and injects faults per path.

    python receiver.py --port <p> --secret whsec_... [--secret whsec_...] [--host 127.0.0.1]
                       [--exit-on-stdin-eof]

Port 0 picks a free port. The first line on stdout is `LISTENING <port>`. With
--exit-on-stdin-eof it exits when its stdin closes (the test process that started it is gone).

  POST <path>        (path not starting with /_) verify, record, answer per the path's mode
  PUT /_mode         {"path": "/p", "status": 200, "delay_ms": 0, "drop": false, "times": null}
                     times N: the mode applies to the next N requests, then 200 again
  DELETE /_mode      every path answers 200 at once again
  GET /_received     records in arrival order (?path=/p filters); DELETE /_received clears
  GET /_health       200
"""

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from standardwebhooks.webhooks import Webhook

DEFAULT_MODE = {"status": 200, "delay_ms": 0, "drop": False}


class State:
    def __init__(self, secrets):
        self.webhooks = [Webhook(s) for s in secrets]
        self.lock = threading.Lock()
        self.modes = {}  # path -> {"status", "delay_ms", "drop", "times" (None or remaining)}
        self.records = []

    def take_mode(self, path):
        """The mode for this request; counts down a mode with `times`."""
        with self.lock:
            mode = self.modes.get(path)
            if mode is None:
                return dict(DEFAULT_MODE)
            if mode["times"] is not None:
                mode["times"] -= 1
                if mode["times"] <= 0:
                    del self.modes[path]
            return {k: mode[k] for k in DEFAULT_MODE}

    def verify(self, body, headers):
        """(verified, error): verified if any configured secret verifies the request."""
        errors = []
        for webhook in self.webhooks:
            try:
                webhook.verify(body, headers, json_parse=False)
                return True, None
            except Exception as e:  # WebhookVerificationError, or anything else the library raises
                message = f"{type(e).__name__}: {e}"
                if message not in errors:
                    errors.append(message)
        return False, "; ".join(errors)


def parse_mode(doc):
    if not isinstance(doc, dict):
        raise ValueError("expected a JSON object")
    unknown = set(doc) - {"path", "status", "delay_ms", "drop", "times"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    path = doc.get("path")
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("/_"):
        raise ValueError("path must start with / and not with /_")
    status = doc.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    delay_ms = doc.get("delay_ms", 0)
    if not isinstance(delay_ms, (int, float)) or isinstance(delay_ms, bool) or delay_ms < 0:
        raise ValueError("delay_ms must be a number >= 0")
    drop = doc.get("drop", False)
    if not isinstance(drop, bool):
        raise ValueError("drop must be a boolean")
    times = doc.get("times")
    if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 1):
        raise ValueError("times must be null or an integer >= 1")
    return path, {"status": status, "delay_ms": delay_ms, "drop": drop, "times": times}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as senders' pools expect
    server_version = "callfleet-test-receiver"

    @property
    def state(self):
        return self.server.state

    def log_message(self, format, *args):  # quiet: the records are the log
        pass

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply(self, status, doc=None):
        body = b"" if doc is None else json.dumps(doc).encode()
        self.send_response(status)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        url = urlsplit(self.path)
        body = self.read_body()
        if url.path.startswith("/_"):
            return self.reply(404, {"error": f"no control endpoint POST {url.path}"})
        received_at = time.time()
        verified, error = self.state.verify(body, dict(self.headers.items()))
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body.decode("utf-8", errors="replace")
        mode = self.state.take_mode(url.path)
        record = {
            "path": url.path,
            "query": url.query,
            "webhook_id": self.headers.get("webhook-id"),
            "timestamp": self.headers.get("webhook-timestamp"),
            "signature": self.headers.get("webhook-signature"),
            "verified": verified,
            "error": error,
            "body": parsed,
            "answered": "dropped" if mode["drop"] else mode["status"],
            "received_at": received_at,
        }
        with self.state.lock:
            self.state.records.append(record)
        if mode["delay_ms"]:
            time.sleep(mode["delay_ms"] / 1000)
        if mode["drop"]:
            self.close_connection = True  # no answer: the socket closes
            return
        self.reply(mode["status"], {"verified": verified})

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/_health":
            return self.reply(200, {"ok": True})
        if url.path == "/_received":
            path = parse_qs(url.query).get("path", [None])[0]
            with self.state.lock:
                records = [r for r in self.state.records if path is None or r["path"] == path]
            return self.reply(200, records)
        self.reply(404, {"error": f"no GET {url.path}"})

    def do_PUT(self):
        url = urlsplit(self.path)
        body = self.read_body()
        if url.path != "/_mode":
            return self.reply(404, {"error": f"no PUT {url.path}"})
        try:
            path, mode = parse_mode(json.loads(body))
        except ValueError as e:
            return self.reply(400, {"error": str(e)})
        with self.state.lock:
            self.state.modes[path] = mode
        self.reply(200, {"path": path, **mode})

    def do_DELETE(self):
        url = urlsplit(self.path)
        self.read_body()
        if url.path == "/_mode":
            with self.state.lock:
                self.state.modes.clear()
            return self.reply(200, {"ok": True})
        if url.path == "/_received":
            with self.state.lock:
                self.state.records.clear()
            return self.reply(200, {"ok": True})
        self.reply(404, {"error": f"no DELETE {url.path}"})


def exit_when_stdin_closes():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--secret", action="append", required=True, help="whsec_<base64>; repeat for rotation")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes (parent gone)")
    args = parser.parse_args()
    try:
        state = State(args.secret)
    except Exception as e:
        sys.exit(f"receiver: invalid --secret: {e}")

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.state = state
    print(f"LISTENING {server.server_address[1]}", flush=True)
    if args.exit_on_stdin_eof:
        threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
