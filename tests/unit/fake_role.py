#!/usr/bin/env python3
"""A stand-in for tandem-router, -prefill, -decode and -kvstore in
test_up.sh: it takes the flags `tandem up` passes, serves GET /health and
/ready on the role's HTTP port (router: --port; the others: --metrics-port;
the router also /v1/models and a canned streamed chat completion),
holds the --listen port like the real listener would, and exits 0 on
SIGTERM. The role is the program's name (tandem-ROLE) or FAKE_ROLE.

Fault injection by environment (inherited through `tandem up`):
  FAKE_DIE=NAME          the process named NAME (e.g. decode-1, router-0)
                         prints an error and exits 3 at start
  FAKE_IGNORE_TERM=NAME  NAME ignores SIGTERM (down must SIGKILL it)
  FAKE_DIE_DIR=DIR       a process exits 3 at start while DIR/NAME exists
                         (a restart that keeps failing)
  FAKE_CHILD=NAME        NAME starts a sleeping child that outlives it
                         on SIGTERM (its pid in the log: "child pid N")
"""
import argparse
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys


def main():
    role = os.environ.get("FAKE_ROLE") or os.path.basename(sys.argv[0]).replace("tandem-", "")
    ap = argparse.ArgumentParser()
    for flag in ("--model", "--host", "--grpc-host", "--listen", "--capacity", "--metrics-host",
                 "--router", "--kvstore", "--name", "--cluster-token", "--api-key"):
        ap.add_argument(flag)
    for flag in ("--port", "--grpc-port", "--metrics-port", "--threads"):
        ap.add_argument(flag, type=int)
    args = ap.parse_args()  # an unknown flag is an error, as in the real roles
    name = args.name or role + "-0"
    print(f"fake {role} {name} argv: {' '.join(sys.argv[1:])}", flush=True)

    token = os.environ.get("TANDEM_CLUSTER_TOKEN", "")
    if not re.fullmatch(r"[0-9a-f]{64}", token):
        print(f"{name}: no cluster token in TANDEM_CLUSTER_TOKEN", flush=True)
        return 2
    if args.cluster_token is not None:
        print(f"{name}: the token must not be on the command line", flush=True)
        return 2
    if os.environ.get("FAKE_DIE") == name:
        print(f"{name}: failing at start as FAKE_DIE asks", flush=True)
        return 3
    die_dir = os.environ.get("FAKE_DIE_DIR")
    if die_dir and os.path.exists(os.path.join(die_dir, name)):
        print(f"{name}: failing at start as FAKE_DIE_DIR asks", flush=True)
        return 3
    if os.environ.get("FAKE_CHILD") == name:
        # This script's path on its command line, so the test finds it.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                                  os.path.abspath(__file__)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{name}: child pid {child.pid}", flush=True)

    port = args.port if role == "router" else args.metrics_port
    host = (args.host if role == "router" else args.metrics_host) or "127.0.0.1"
    if port is None:
        print(f"{name}: no HTTP port given", flush=True)
        return 2
    held = []
    if args.listen:
        h, p = args.listen.rsplit(":", 1)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((h, int(p)))
        s.listen(8)
        held.append(s)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path in ("/health", "/ready", "/metrics") else 404
            body = b"ok\n" if code == 200 else b"not found\n"
            if role == "router" and self.path == "/v1/models":
                code, body = 200, b'{"object": "list", "data": [{"id": "fake-model"}]}'

            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            # The router's streamed chat answer, canned (for scripts/demo.sh).
            if role != "router" or self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in ("The capital", " of France", " is Paris."):
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, fmt, *a):
            pass

    server = http.server.HTTPServer((host, port), Handler)

    def on_term(sig, frame):
        print(f"{name}: SIGTERM, exiting", flush=True)
        sys.exit(0)

    if os.environ.get("FAKE_IGNORE_TERM") == name:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_term)
    print(f"{name}: serving on {host}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        for s in held:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
