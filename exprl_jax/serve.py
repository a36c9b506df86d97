"""An OpenAI-compatible chat-completions server over `LocalBackend`, so any model this project loads can judge from
another host (greedy only): `python -m exprl_jax.serve --model DIR --port 8000`, then point the client at .../v1.
HTTP threads hand requests to one asyncio loop owning the backend, so concurrent requests share decodes.
"""
from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid

from exprl_jax.judge.local import LocalBackend

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20


class RequestError(Exception):
    """A request this server refuses: answered with `status` and an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class BackendLoop:
    """An asyncio loop on a background thread that owns the backend; other threads submit coroutines to it."""

    def __init__(self, backend: LocalBackend):
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="judge-backend-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine):
        """Runs `coroutine` on the backend's loop and blocks the calling thread until it finishes."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.run(self.backend.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def parse_chat_request(body: bytes, model_name: str, max_tokens_limit: int) -> tuple[list, int]:
    """The messages and max_tokens of a chat-completions request; RequestError for anything this server cannot
    honour (sampling, several choices, streaming, another model)."""
    try:
        request = json.loads(body)
    except ValueError:
        raise RequestError(400, "the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if request.get("model") not in (None, model_name):
        raise RequestError(404, f"model {request['model']!r} is not served here; this server serves {model_name!r}",
                           "model")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    temperature = request.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature != 0):
        raise RequestError(400, f"only greedy decoding is supported: temperature must be 0, got {temperature!r}",
                           "temperature")
    if request.get("n") not in (None, 1):
        raise RequestError(400, f"only n=1 is supported, got {request['n']!r}", "n")
    if request.get("stream"):
        raise RequestError(400, "streaming is not supported", "stream")
    max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = max_tokens_limit
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise RequestError(400, f"max_tokens must be an integer in [1, {max_tokens_limit}] (the server's "
                                f"--max-tokens), got {max_tokens!r}", "max_tokens")
    return messages, max_tokens


class ChatHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's connection pool reuses its connections
    server: "JudgeHTTPServer"

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, err: RequestError) -> None:
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        self._send_json(err.status, {"error": {"message": str(err), "type": kind, "param": err.param,
                                               "code": None}})

    def do_GET(self):  # noqa: N802 - the base class's naming
        if self.path == "/health":
            self._send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.started,
                 "owned_by": "exprl_jax", "max_model_len": self.server.backend.model_cfg.max_position_embeddings}]})
        else:
            self._send_error(RequestError(404, f"no route GET {self.path}"))

    def do_POST(self):  # noqa: N802 - the base class's naming
        try:
            if self.path != "/v1/chat/completions":
                raise RequestError(404, f"no route POST {self.path}")
            self._send_json(200, self._chat_completion(self._read_body()))
        except RequestError as err:
            self._send_error(err)
        except Exception as err:  # a decode failure: the client sees a 500 (and retries), the server lives on
            log.exception("chat completion failed")
            self._send_error(RequestError(500, f"the judge model failed: {type(err).__name__}"))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True  # the body's end is unknown, so the connection cannot be reused
            raise RequestError(411 if length is None else 400, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(int(length))

    def _chat_completion(self, body: bytes) -> dict:
        backend = self.server.backend
        messages, max_tokens = parse_chat_request(body, self.server.model_name, backend.max_tokens)
        try:
            reply = self.server.backend_loop.run(backend.reply(messages, max_tokens=max_tokens))
        except ValueError as err:  # malformed messages, or a prompt too long for the model (PromptTooLong)
            raise RequestError(400, str(err), "messages") from None
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
        }


class JudgeHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: a burst of new connections must not be refused

    def __init__(self, backend: LocalBackend, address: tuple[str, int]):
        self.backend, self.model_name, self.started = backend, backend.model, int(time.time())
        self.backend_loop = BackendLoop(backend)  # first: a failed bind calls server_close, which stops it
        super().__init__(address, ChatHandler)

    def server_close(self) -> None:
        super().server_close()
        self.backend_loop.close()


def make_server(backend: LocalBackend, host: str = "127.0.0.1", port: int = 0) -> tuple[JudgeHTTPServer, str]:
    """A server bound to host:port (0: any free port), not yet serving: run `server.serve_forever()` on a thread,
    then `server.shutdown(); server.server_close()`. Returns it and its base URL (".../v1")."""
    server = JudgeHTTPServer(backend, (host, port))
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}/v1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a judge model over an OpenAI-compatible chat API.")
    parser.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed when ready)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")
    parser.add_argument("--served-model-name", default=None, help="the name requests use (default: directory name)")
    parser.add_argument("--batch-size", type=int, default=16, help="most requests decoded together")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a directory")
    backend = LocalBackend.from_hf(args.model, max_tokens=args.max_tokens, model_name=args.served_model_name,
                                   batch_size=args.batch_size)
    server, base_url = make_server(backend, args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds into the `finally` below
    print(f"serving {backend.model} on {base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
