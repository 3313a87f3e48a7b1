"""A real OpenAI-compatible HTTP server on 127.0.0.1, stdlib only, for tests and benchmarks.

It speaks just enough of the API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``)
for the ``openai`` client to be exercised over real sockets, and can inject failures::

    with FakeOpenAIServer(reply="Finish[yes]", faults=["429", "drop"]) as srv:
        client = OpenAICompatClient("fake", base_url=srv.base_url)

``faults`` is a queue consumed one entry per request before normal service:

* ``"429"`` / ``"429:N"`` -- rate limited, with ``Retry-After: N`` (default ``0``);
* any other 3-digit code (``"500"``, ``"503"``, ``"401"`` ...) -- that status with an error body;
* ``"timeout"`` -- sleep ``fault_sleep_s`` (longer than the client's timeout), then close;
* ``"drop"`` -- close the connection without sending a response.

The server ignores ``stop`` on purpose: clients must cut at stop strings themselves.
Run standalone (for benchmarks in another process)::

    python -m retroformer_cli.testing.fake_openai_server --port 0 --delay 0.2
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Reply = Callable[[dict], str]


def echo_reply(body: dict) -> str:
    """Default reply: ``echo: `` + the last user message (or the prompt), so callers can match answers."""
    if "messages" in body:
        users = [m.get("content", "") for m in body["messages"] if m.get("role") == "user"]
        text = users[-1] if users else ""
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return f"echo: {text}"


def _ntokens(text: str) -> int:
    return len(text.split())


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung "timeout" fault must never block shutdown
    block_on_close = False
    request_queue_size = 128  # benchmarks open many connections at once
    allow_reuse_address = True
    owner: "FakeOpenAIServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; every reply sets Content-Length
    # TCP_NODELAY, like real servers: headers and body go out in separate writes, and with Nagle on, the
    # body waits for the client's delayed ACK of the headers, adding ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests and benchmarks read stdout

    # -- helpers -------------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error_json(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        err_type = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        payload = {"error": {"message": message, "type": err_type.get(status, "server_error"), "code": status}}
        self._send_json(status, payload, headers)

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- endpoints ------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server.owner
        if self.path.startswith("/stats"):  # for benchmarks: /stats?since=UNIX_TIME
            since = float(self.path.partition("since=")[2] or 0)
            self._send_json(200, owner.stats(since))
            return
        if self.path.rstrip("/") == "/v1/models":
            created = int(time.time())
            data = [{"id": owner.model, "object": "model", "created": created, "owned_by": "fake"}]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_error_json(404, f"No route for GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._send_error_json(404, f"No route for POST {self.path}")
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_error_json(400, "Request body is not valid JSON.")
            return
        fault = owner._begin(body)
        try:
            self._serve(owner, path, body, fault)
        finally:
            owner._end()

    def _serve(self, owner: "FakeOpenAIServer", path: str, body: dict, fault: str | None) -> None:
        if fault is not None:
            if fault == "drop":
                self._drop()
                return
            if fault == "timeout":
                time.sleep(owner.fault_sleep_s)
                self._drop()
                return
            code, _, arg = fault.partition(":")
            status = int(code)
            headers = {"Retry-After": arg or "0"} if status == 429 else None
            self._send_error_json(status, f"Injected fault {fault}.", headers)
            return
        if owner.api_key is not None and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
            self._send_error_json(401, "Incorrect API key provided.")
            return
        if owner.delay_s:
            time.sleep(owner.delay_s)
        text = owner.reply(body) if callable(owner.reply) else str(owner.reply)
        model = body.get("model") or owner.model
        if path == "/v1/chat/completions":
            prompt_tokens = sum(_ntokens(str(m.get("content", ""))) for m in body.get("messages", []))
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            prompt = body.get("prompt", "")
            prompt_tokens = _ntokens(prompt if isinstance(prompt, str) else " ".join(map(str, prompt)))
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        completion_tokens = _ntokens(text)
        payload = {
            "id": f"fake-{owner.requests}",
            "object": obj,
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        self._send_json(200, payload)
        owner._served()


class FakeOpenAIServer:
    """OpenAI-compatible server in a background thread. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        reply: Reply | str = echo_reply,
        delay_s: float = 0.0,
        faults: list[str] | None = None,
        *,
        port: int = 0,
        model: str = "fake-model",
        api_key: str | None = None,
        fault_sleep_s: float = 2.0,
    ):
        for f in faults or []:
            if f not in ("timeout", "drop") and not f.partition(":")[0].isdigit():
                raise ValueError(f"Unknown fault {f!r}: use '429[:secs]', a status code, 'timeout' or 'drop'.")
        self.reply = reply
        self.delay_s = delay_s
        self.model = model
        self.api_key = api_key  # when set, requests must carry it as a Bearer token
        self.fault_sleep_s = fault_sleep_s
        self._port = port
        self._faults: collections.deque[str] = collections.deque(faults or [])
        self._lock = threading.Lock()
        self._bodies: list[dict] = []
        self._arrivals: list[float] = []  # wall-clock arrival of every POST (benchmarks: time to first request)
        self._requests = 0
        self._served_count = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        httpd = _Server(("127.0.0.1", self._port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._port = httpd.server_address[1]  # keep it: base_url stays valid for messages after stop()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state (thread-safe) --------------------------------------------------------------------
    def _begin(self, body: dict) -> str | None:
        with self._lock:
            self._arrivals.append(time.time())
            self._requests += 1
            self._bodies.append(body)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            return self._faults.popleft() if self._faults else None

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _served(self) -> None:
        with self._lock:
            self._served_count += 1

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("FakeOpenAIServer has not been started.")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> int:
        """POST requests received (faulted ones included)."""
        with self._lock:
            return self._requests

    @property
    def served(self) -> int:
        """Requests answered with a 200 completion."""
        with self._lock:
            return self._served_count

    @property
    def max_in_flight(self) -> int:
        """Most POST requests being handled at the same moment."""
        with self._lock:
            return self._max_in_flight

    def stats(self, since: float = 0.0) -> dict[str, Any]:
        """Requests that arrived at or after ``since`` (a ``time.time()`` value): count, first and last arrival."""
        with self._lock:
            times = [t for t in self._arrivals if t >= since]
            return {"requests": len(times), "first_at": times[0] if times else None,
                    "last_at": times[-1] if times else None, "max_in_flight": self._max_in_flight}

    @property
    def bodies(self) -> list[dict]:
        """Copy of every POST body received, in arrival order."""
        with self._lock:
            return list(self._bodies)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run a fake OpenAI-compatible server on 127.0.0.1.")
    ap.add_argument("--port", type=int, default=0, help="port to bind (0 = any free port)")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each answer")
    ap.add_argument("--reply", default=None, help="fixed reply text (default: echo the last user message)")
    ap.add_argument("--model", default="fake-model")
    args = ap.parse_args(argv)
    server = FakeOpenAIServer(args.reply if args.reply is not None else echo_reply, args.delay,
                              port=args.port, model=args.model).start()
    print(server.base_url, flush=True)  # the parent process reads this line
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
