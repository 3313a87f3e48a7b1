"""`retroformer serve` under abuse: each case gets a 4xx or a clean close, within a bounded time, while a
well-behaved client keeps being served. A real server on 127.0.0.1 over the tiny random model."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="serve needs `pip install 'retroformer-cli[serve]'`")
pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from retroformer_cli.serve.app import create_app  # noqa: E402
from retroformer_cli.serve.backend import TransformersBackend  # noqa: E402
from retroformer_cli.httpserver.runner import ServerThread  # noqa: E402

BASE = "tiny"


@pytest.fixture(scope="module")
def server(tiny):
    engine = TransformersBackend(str(tiny["base"]), served_name=BASE, cache_dir=tiny["base"].parent / "cache",
                                threads=1, max_batch_size=8, max_queue=64, max_tokens_limit=4000)
    srv = ServerThread(create_app(engine, body_timeout_s=2.0), idle_timeout_s=2.0, shutdown_grace_s=5.0)
    srv.engine = engine
    srv.start()
    yield srv
    srv.stop()


def chat(text: str = "hi", **kw) -> dict:
    return {"model": BASE, "messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0, **kw}


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=30, **kw)


class Bystander:
    """A well-behaved client sending requests in a loop while the abuse goes on."""

    def __init__(self, server):
        self.server, self.codes, self.latencies, self._stop = server, [], [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.codes.append(post(self.server, chat("still there?")).status_code)
            self.latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)

    def __enter__(self) -> "Bystander":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.codes and set(self.codes) == {200}, self.codes
        assert max(self.latencies) < 10, self.latencies


def raw_connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s


def read_all(sock: socket.socket, limit_s: float = 10) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except socket.timeout:
        return data + b"<timeout>"


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_a_body_trickled_slowly_gets_408_and_a_close(server):
    with Bystander(server):
        sock = raw_connect(server)
        body = json.dumps(chat()).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head)
        t0 = time.perf_counter()
        answer = b""
        for byte in body:  # one byte every 0.5 s: the whole body would take well over 30 s
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.5)
            try:
                answer += sock.recv(65536)
            except socket.timeout:
                continue
            if answer:
                break
        answer += read_all(sock, 5)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and not answer.endswith(b"<timeout>"), "the server closed the connection"
    assert time.perf_counter() - t0 < 10


def test_many_idle_connections_are_closed_while_others_are_served(server):
    idle = [raw_connect(server) for _ in range(100)]
    try:
        with Bystander(server):
            time.sleep(0.5)
        t0 = time.perf_counter()
        closed = [read_all(s, 8) for s in idle]
        assert all(c == b"" for c in closed), "every idle connection got a clean close"
        assert time.perf_counter() - t0 < 10
    finally:
        for s in idle:
            s.close()


def test_a_client_leaving_mid_stream_frees_its_batch_slot(server, monkeypatch):
    engine = server.engine
    submitted = []  # the engine's own requests: how many tokens the abandoned one generated
    submit = engine.engine.submit
    monkeypatch.setattr(engine.engine, "submit", lambda *a, **kw: submitted.append(submit(*a, **kw)) or submitted[-1])
    with Bystander(server):
        body = chat("tell a long story", max_tokens=3000, stream=True)
        with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            events = (line for line in resp.iter_lines() if line)
            assert next(events).startswith("data: ")
            assert next(events).startswith("data: ")  # tokens are flowing
        (req,) = [h._req for h in submitted if h._req.sampling.max_tokens == 3000]
        at_leave = len(req.seqs[0].generated)
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats()["running"] == 0, "the abandoned request left the batch"
    generated = len(req.seqs[0].generated)
    assert req.cancelled and req.seqs[0].finish_reason is None, "cancelled, not run to its end"
    # it stopped soon after the client left: far from its 3000 tokens
    assert 0 < at_leave <= generated < at_leave + 300 and generated < 1000, (at_leave, generated)


def test_invalid_utf8_gets_400(server):
    with Bystander(server):
        bad = b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
        resp = httpx.post(server.base_url + "/chat/completions", content=bad,
                          headers={"content-type": "application/json"}, timeout=10)
        assert error_of(resp, 400)["code"] == "invalid_encoding"


def test_huge_n_and_max_tokens_get_400(server):
    with Bystander(server):
        assert error_of(post(server, chat(n=100000)), 400)["param"] == "n"
        assert error_of(post(server, chat(max_tokens=10**12)), 400)["param"] == "max_tokens"
        assert error_of(post(server, chat(max_tokens=4001)), 400)["param"] == "max_tokens"


def test_unknown_fields_get_400_and_known_openai_ones_are_accepted(server):
    with Bystander(server):
        err = error_of(post(server, chat(temprature=0.5)), 400)
        assert err["param"] == "temprature" and "Unrecognized request argument" in err["message"]
        assert post(server, chat(user="someone", presence_penalty=0.0, metadata={"a": "b"})).status_code == 200


def test_a_wrong_content_type_gets_415(server):
    with Bystander(server):
        for ctype in ("text/plain", "application/x-www-form-urlencoded"):
            resp = httpx.post(server.base_url + "/chat/completions", content=json.dumps(chat()),
                              headers={"content-type": ctype}, timeout=10)
            assert error_of(resp, 415)["code"] == "unsupported_media_type"


def test_shutdown_cancels_what_the_grace_period_does_not_cover(tiny):
    engine = TransformersBackend(str(tiny["base"]), served_name=BASE, cache_dir=tiny["base"].parent / "cache",
                                threads=1, max_tokens_limit=4000)
    srv = ServerThread(create_app(engine), shutdown_grace_s=1.0).start()
    results: list = []
    worker = threading.Thread(target=lambda: results.append(
        _safe_post(srv, chat("a very long answer", max_tokens=4000))), daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while engine.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 1
    t0 = time.perf_counter()
    srv.stop(timeout_s=30)
    assert time.perf_counter() - t0 < 10, "stopped within the grace period plus the model's current step"
    assert engine.engine.closing and engine.stats()["running"] == 0
    worker.join(10)
    assert results and results[0] != 200, "the long request was cut off, not served to the end"


def _safe_post(server, body):
    try:
        return post(server, body).status_code
    except httpx.HTTPError as exc:  # the server closed the connection at the end of the grace period
        return type(exc).__name__
