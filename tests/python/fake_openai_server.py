#!/usr/bin/env python3
"""A fake OpenAI-compatible server for `tandem bench serve` tests (stdlib only).

POST /v1/chat/completions and /v1/completions answer with max_tokens
tokens ("w0 ", "w1 ", ...), streamed as SSE in HTTP/1.1 chunked encoding,
one token every --delay seconds (the first after --first-delay), with a
usage chunk when stream_options.include_usage is true, then data: [DONE].
GET /stats returns what was sent: {"requests", "tokens_sent", "models"}.

Faults, chosen by the request's model name:
  fault-500           HTTP 500 with an OpenAI error object
  fault-stream-error  two tokens, then an error object in the stream
  fault-close         two tokens, then the connection closes mid-body
  fault-stall         one token, then nothing for 60 s
  fault-nodone        every token, a clean end, but no data: [DONE]

--split cuts every HTTP chunk in two writes at an odd place and every SSE
event in two HTTP chunks, so the client's decoders see partial reads.

Usage: fake_openai_server.py [--port 0] [--port-file F] [--delay 0.02]
"""
import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS = {"requests": 0, "tokens_sent": 0, "models": {}}
LOCK = threading.Lock()
OPTS = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # quiet
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/stats":
            with LOCK:
                self._json(200, STATS)
        elif self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"message": "no such path", "type": "not_found"}})

    def _chunk(self, data):
        """One HTTP chunk (two writes cut at an odd place with --split)."""
        frame = b"%x\r\n%s\r\n" % (len(data), data)
        if OPTS.split and len(frame) > 3:
            cut = len(frame) // 2 + 1
            self.wfile.write(frame[:cut])
            self.wfile.flush()
            time.sleep(0.0005)
            self.wfile.write(frame[cut:])
        else:
            self.wfile.write(frame)
        self.wfile.flush()

    def _event(self, obj):
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        if OPTS.split and len(data) > 8:
            self._chunk(data[:7])
            self._chunk(data[7:])
        else:
            self._chunk(data)

    def _sent(self, model):
        with LOCK:
            STATS["tokens_sent"] += 1
            STATS["models"][model] = STATS["models"].get(model, 0) + 1

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(n)
        chat = self.path == "/v1/chat/completions"
        if not chat and self.path != "/v1/completions":
            self._json(404, {"error": {"message": "no such path", "type": "not_found"}})
            return
        try:
            req = json.loads(raw)
        except ValueError:
            self._json(400, {"error": {"message": "bad JSON", "type": "invalid_request_error"}})
            return
        model = req.get("model") or "fake-model"
        with LOCK:
            STATS["requests"] += 1
        if model == "fault-500":
            self._json(500, {"error": {"message": "fake failure", "type": "server_error"}})
            return
        max_tokens = int(req.get("max_tokens") or 16)
        words = sum(len(m.get("content", "").split()) for m in req.get("messages", [])) if chat \
            else len(req.get("prompt", "").split())
        usage = bool((req.get("stream_options") or {}).get("include_usage"))
        if not req.get("stream"):
            text = "".join("w%d " % i for i in range(max_tokens))
            for _ in range(max_tokens):
                self._sent(model)
            choice = {"index": 0, "finish_reason": "length"}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            self._json(200, {"id": "x", "object": "chat.completion" if chat else "text_completion",
                             "model": model, "choices": [choice],
                             "usage": {"prompt_tokens": words, "completion_tokens": max_tokens,
                                       "total_tokens": words + max_tokens}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 0, "model": model}

        def choice(text, finish=None):
            c = {"index": 0, "finish_reason": finish}
            if chat:
                c["delta"] = {"content": text} if text is not None else {}
            else:
                c["text"] = text if text is not None else ""
            return dict(head, choices=[c], **({"usage": None} if usage else {}))

        try:
            if chat:  # the role comes first, with no content
                self._event(dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]))
            time.sleep(OPTS.first_delay if OPTS.first_delay is not None else OPTS.delay)
            for i in range(max_tokens):
                if i > 0:
                    time.sleep(OPTS.delay)
                self._event(choice("w%d " % i))
                self._sent(model)
                if model == "fault-stall" and i == 0:
                    time.sleep(60)
                    return
                if model in ("fault-stream-error", "fault-close") and i == 1:
                    break
            if model == "fault-close":
                self.wfile.write(b"40\r\ndata: {\"partial")
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if model == "fault-stream-error":
                self._event({"error": {"message": "fake mid-stream failure", "type": "server_error"}})
            else:
                self._event(choice(None, "length"))
                if usage:
                    self._event(dict(head, choices=[], usage={
                        "prompt_tokens": words, "completion_tokens": max_tokens,
                        "total_tokens": words + max_tokens,
                        "prompt_tokens_details": {"cached_tokens": 0}}))
            if model != "fault-nodone":
                self._event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def main():
    global OPTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--delay", type=float, default=0.02, help="seconds between tokens")
    ap.add_argument("--first-delay", type=float, default=None, help="seconds before the first token")
    ap.add_argument("--split", action="store_true", help="cut chunks and events at odd places")
    OPTS = ap.parse_args()
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 512
    srv = ThreadingHTTPServer((OPTS.host, OPTS.port), Handler)
    port = srv.server_address[1]
    if OPTS.port_file:
        with open(OPTS.port_file + ".tmp", "w") as f:
            f.write("%d\n" % port)
        import os
        os.replace(OPTS.port_file + ".tmp", OPTS.port_file)
    print("fake OpenAI server on %s:%d" % (OPTS.host, port), file=sys.stderr, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
