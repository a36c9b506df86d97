"""A fault-injecting OpenAI-compatible chat server on 127.0.0.1, run in a background thread, for judge tests.

Each POST /v1/chat/completions gets a well-formed answer or one injected fault (at random with `fault_rate`, or in
the order `script` gives); `counts`, `auth_headers`, `arrivals_s` and `max_in_flight` let a test check the client.
"""
from __future__ import annotations

import collections
import http.server
import json
import random
import socket
import threading
import time
from typing import Callable, Sequence

FAULTS = ("http_500", "http_503", "http_429_retry_after", "slow", "malformed_json", "empty_choices",
          "out_of_range_score", "missing_score", "drop_connection", "http_400")
# Faults a correct client retries. The two answer faults come back as text (the parser marks them unscored);
# http_400 is a client error and ends the call at once.
RETRYABLE_FAULTS = frozenset({"http_500", "http_503", "http_429_retry_after", "slow", "malformed_json",
                              "empty_choices", "drop_connection"})
OUT_OF_RANGE_ANSWER = "Reasoning: the trace matches every checkpoint.\nScore: 9"
MISSING_SCORE_ANSWER = "Reasoning: the trace matches every checkpoint, so it deserves a high mark."


def default_answer(messages: Sequence[dict]) -> str:
    return "Reasoning: ok\nScore: 4"


class FaultServer:
    """`with FaultServer(...) as base_url:` or `base_url = server.start(); ...; server.close()`.

    `script` entries are fault names or None (a normal answer); once it runs out every request is answered
    normally. `slow` waits `slow_s` (set it above the client's timeout) before answering; every request first
    waits `delay_s`, which lets concurrency build up. close() wakes sleeping handlers and drops open connections.
    `answer_fn(messages)` runs on the server's handler threads, several at once.
    """

    def __init__(self, fault_rate: float = 0.3, seed: int = 0, answer_fn: Callable[[Sequence[dict]], str] | None = None,
                 faults: Sequence[str] = FAULTS, *, script: Sequence[str | None] | None = None, slow_s: float = 5.0,
                 retry_after_s: float = 1.0, delay_s: float = 0.0):
        unknown = [f for f in list(faults) + list(script or []) if f is not None and f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {FAULTS}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        self.fault_rate, self.faults = fault_rate, tuple(faults)
        self.answer_fn = answer_fn or default_answer
        self.slow_s, self.retry_after_s, self.delay_s = slow_s, retry_after_s, delay_s
        self._script = collections.deque(script) if script is not None else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self.counts: collections.Counter = collections.Counter()  # "requests", "ok" and one entry per fault kind
        self.auth_headers: list[str | None] = []  # the Authorization header of each request, None when absent
        self.bodies: list[dict] = []  # each request's JSON body
        self.arrivals_s: list[float] = []  # time.monotonic() at each request's arrival
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> str:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.base_url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        if self._httpd is None:
            return
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # keep-alive handler threads would otherwise wait on idle clients
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- bookkeeping (called from handler threads) -------------------------------------------------------------
    def _arrive(self, authorization: str | None, body: dict) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            self.auth_headers.append(authorization)
            self.bodies.append(body)
            self.arrivals_s.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self._script is not None:
                fault = self._script.popleft() if self._script else None
            elif self.faults and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
            else:
                fault = None
            self.counts[fault or "ok"] += 1
            return fault

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    # -- answers -----------------------------------------------------------------------------------------------
    def _respond(self, handler: "_Handler", fault: str | None, messages: list) -> None:
        if self.delay_s:
            self._stop.wait(self.delay_s)
        if fault in ("http_500", "http_503", "http_400"):
            status = int(fault[5:])
            return handler.send_json(status, {"error": {"message": f"injected {fault}", "code": status}})
        if fault == "http_429_retry_after":
            return handler.send_json(429, {"error": {"message": "injected rate limit"}},
                                     {"Retry-After": f"{self.retry_after_s:g}"})
        if fault == "drop_connection":
            handler.close_connection = True  # no response at all; the socket closes when the handler returns
            return None
        if fault == "malformed_json":
            return handler.send_raw(200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "Sco')
        if fault == "empty_choices":
            return handler.send_json(200, {"id": "chatcmpl-x", "object": "chat.completion", "choices": []})
        if fault == "slow":
            self._stop.wait(self.slow_s)
        text = {"out_of_range_score": OUT_OF_RANGE_ANSWER, "missing_score": MISSING_SCORE_ANSWER}.get(fault)
        if text is None:
            text = self.answer_fn(messages)
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        completion_tokens = len(text) // 4 + 1
        return handler.send_json(200, {
            "id": "chatcmpl-x", "object": "chat.completion", "created": int(time.time()), "model": "fault-server",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default backlog of 5 resets connections when a client opens 64 at once

    def handle_error(self, request, client_address) -> None:  # a client hanging up is not news in a fault test
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real inference server offers
    disable_nagle_algorithm = True  # headers and body go out in two writes; Nagle would delay the second

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        self.server.owner._track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
        try:
            request = json.loads(body)
            messages = request["messages"]
        except (ValueError, KeyError, TypeError):
            return self.send_json(400, {"error": {"message": "body is not a chat request"}})
        owner = self.server.owner
        fault = owner._arrive(self.headers.get("Authorization"), request)
        try:
            owner._respond(self, fault, messages)
        finally:
            owner._leave()

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self.send_raw(status, json.dumps(payload).encode(), headers)

    def send_raw(self, status: int, body: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) or the server is closing
            self.close_connection = True
