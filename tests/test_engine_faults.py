"""The model thread never strands a caller (issue #19, part 3): a failure injected at each stage of the engine
(admission, the forward pass, sampling, finishing, outside any request) ends every submitted request with a
result or an error; the engine goes on after a request's failure and refuses new work with one clear error
once its thread stopped; ``serve`` answers 503 and ``collect`` records the failed episode.

The real engine runs the tiny random Llama (conftest ``tiny``); faults are monkeypatched onto it. Every wait
has a timeout, so a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

torch = pytest.importorskip("torch", reason="the engine needs torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from retroformer_cli.llm.engine import scheduler  # noqa: E402
from retroformer_cli.llm.engine.requests import Request  # noqa: E402
from retroformer_cli.llm.engine.scheduler import Engine  # noqa: E402
from retroformer_cli.llm.engine.types import EngineConfig, EngineFailed, EngineFault, Sampling  # noqa: E402

WAIT_S = 30  # far beyond what the tiny model needs: reaching it means a caller was stranded


class Injected(RuntimeError):
    pass


class ThreadKiller(BaseException):
    """Not an Exception: what no per-request protection catches."""


def make_engine(tiny, **kw) -> Engine:
    cfg = EngineConfig(model=str(tiny["base"]), cache_dir=str(tiny["base"].parent / "cache"), threads=1, **kw)
    return Engine(cfg).start(wait=True)


@pytest.fixture
def engine(tiny):
    e = make_engine(tiny)
    yield e
    e.shutdown(drain=False, timeout=10)


def prompts(engine: Engine, n: int) -> list[list[int]]:
    return [engine.encode_text(f"Question {i}: which river flows through town {i}?") for i in range(n)]


def outcome(handle) -> object:
    """The request's result or its error; a TimeoutError (a stranded caller) fails the test."""
    try:
        return handle.result(WAIT_S)
    except TimeoutError:
        pytest.fail(f"request {handle.id} never ended: its caller would wait forever")
    except Exception as exc:  # noqa: BLE001 - the error is the outcome
        return exc


def once(fail_on_call: int, real, exc: BaseException):
    """``real`` that raises ``exc`` on its ``fail_on_call``-th call (1-based) and works otherwise."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise exc
        return real(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def assert_serves_again(engine: Engine) -> None:
    result = engine.submit(engine.encode_text("And now?"), Sampling(max_tokens=3)).result(WAIT_S)
    assert result.choices[0].completion_tokens > 0
    assert engine.failed is None


# ------------------------------------------------------------------------------------------------ per request
def test_a_request_that_cannot_start_fails_alone(engine, monkeypatch):
    """Admission: memory for one request's keys/values fails (once _start ran outside any protection)."""
    real = engine._alloc

    def alloc(capacity):
        if capacity >= 1000:  # only the request asking for 1000 tokens
            raise Injected("injected: out of memory for the keys/values")
        return real(capacity)

    monkeypatch.setattr(engine, "_alloc", alloc)
    ids = prompts(engine, 4)
    poisoned = engine.submit(ids[0], Sampling(max_tokens=1000))  # first in line: the others are admitted after it
    others = [engine.submit(p, Sampling(max_tokens=5)) for p in ids[1:]]
    err = outcome(poisoned)
    assert isinstance(err, EngineFault) and "starting the request" in str(err) and "out of memory" in str(err)
    for h in others:
        result = outcome(h)
        assert not isinstance(result, BaseException), result
        assert result.choices[0].completion_tokens == 5

    async def via_asyncio():  # generate_async (collect's path) ends too
        return await asyncio.wait_for(engine.generate_async(ids[0], Sampling(max_tokens=1000)), WAIT_S)

    with pytest.raises(EngineFault, match="out of memory"):
        asyncio.run(via_asyncio())
    assert_serves_again(engine)


@pytest.mark.parametrize("stage", ["forward", "sampling", "finishing"])
def test_a_failed_step_ends_its_batch_and_the_engine_goes_on(engine, monkeypatch, stage):
    if stage == "forward":  # the model call of the second step
        def broken(**inputs):
            raise Injected("injected: forward pass failed")

        monkeypatch.setattr(engine, "_forward", _forward_failing_on(2, engine._forward, broken))
        expected = "running a forward pass"
    elif stage == "sampling":
        monkeypatch.setattr(scheduler, "greedy_rows", once(3, scheduler.greedy_rows, Injected("injected: sampling")))
        expected = "sampling"
    else:  # a request that already left the batch when the failure struck (it used to be forgotten)
        monkeypatch.setattr(Request, "result", once(1, Request.result, Injected("injected: finishing")))
        expected = "finishing"
    handles = [engine.submit(p, Sampling(max_tokens=4 + i)) for i, p in enumerate(prompts(engine, 3))]
    outcomes = [outcome(h) for h in handles]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors, "the injected failure reached a request"
    assert all(isinstance(e, EngineFault) and expected in str(e) and "injected" in str(e) for e in errors), errors
    assert all(o.choices[0].completion_tokens > 0 for o in outcomes if not isinstance(o, BaseException))
    monkeypatch.undo()
    assert_serves_again(engine)


def _forward_failing_on(call: int, real, broken):
    """The engine's forward pass (lean or transformers') calling ``broken`` instead on its ``call``-th step."""
    calls = {"n": 0}

    def forward(batch, ctx, kwargs):
        calls["n"] += 1
        return broken() if calls["n"] == call else real(batch, ctx, kwargs)

    return forward


def test_a_failing_callback_stops_neither_its_request_nor_the_engine(engine):
    def bad_callback(_outcome):
        raise Injected("injected: on_done")

    handle = engine.submit(prompts(engine, 1)[0], Sampling(max_tokens=3), on_done=bad_callback)
    assert outcome(handle).choices[0].completion_tokens == 3
    assert_serves_again(engine)


# ------------------------------------------------------------------------------------------------ a dead thread
@pytest.mark.parametrize("where", ["loop", "step"])
def test_a_dead_model_thread_ends_every_request_and_refuses_new_work(engine, monkeypatch, where):
    if where == "loop":  # a bug outside any request's protection
        monkeypatch.setattr(engine, "_reap_cancelled", once(1, engine._reap_cancelled, Injected("injected: loop bug")))
    else:  # a BaseException in a forward pass: no `except Exception` catches it
        monkeypatch.setattr(engine, "_forward", _forward_failing_on(1, engine._forward, _raise_thread_killer))
    handles = [engine.submit(p, Sampling(max_tokens=50)) for p in prompts(engine, 3)]
    for h in handles:
        err = outcome(h)
        assert isinstance(err, EngineFailed), err
    assert isinstance(engine.failed, EngineFailed) and "restart" in str(engine.failed)
    with pytest.raises(EngineFailed, match="takes no new requests"):  # refused at once, never queued
        engine.submit([1, 2, 3], Sampling(max_tokens=2))

    async def via_asyncio():
        return await asyncio.wait_for(engine.generate_async([1, 2, 3], Sampling(max_tokens=2)), WAIT_S)

    with pytest.raises(EngineFailed):
        asyncio.run(via_asyncio())
    done = threading.Event()
    errors: list[BaseException] = []

    def load():
        try:
            engine.load_adapter("x", "/nonexistent")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    threading.Thread(target=load, daemon=True).start()
    assert done.wait(WAIT_S) and isinstance(errors[0], EngineFailed), "an adapter command never waits on a dead thread"


def _raise_thread_killer(**kwargs):
    raise ThreadKiller("injected: not an Exception")


def test_a_failed_load_refuses_requests_instead_of_queueing_them(tiny, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    engine = Engine(EngineConfig(model=str(tmp_path / "broken"), cache_dir=str(tmp_path / "cache"), threads=1)).start()
    try:
        with pytest.raises(Exception):
            engine.wait_ready(WAIT_S)
        with pytest.raises(EngineFailed):
            engine.submit([1, 2, 3], Sampling(max_tokens=2))
    finally:
        engine.shutdown(drain=False, timeout=10)


# ------------------------------------------------------------------------------------------------ serve, collect
def test_serve_answers_503_for_engine_failures(tiny, monkeypatch):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from retroformer_cli.serve.app import create_app
    from retroformer_cli.serve.backend import TransformersBackend
    from retroformer_cli.httpserver.runner import ServerThread

    served = TransformersBackend(str(tiny["base"]), served_name="tiny", cache_dir=tiny["base"].parent / "cache",
                                threads=1, max_tokens_limit=64)
    srv = ServerThread(create_app(served)).start()
    base = srv.base_url
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}

    def chat():
        return httpx.post(base + "/chat/completions", json=body, timeout=WAIT_S)

    try:
        engine = served.engine
        monkeypatch.setattr(engine, "_alloc", once(1, engine._alloc, Injected("injected: out of memory")))
        resp = chat()
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "engine_error" and "out of memory" in resp.json()["error"]["message"]
        assert resp.headers.get("Retry-After")
        assert chat().status_code == 200, "the engine serves the next request"

        monkeypatch.setattr(engine, "_reap_cancelled", once(1, engine._reap_cancelled, Injected("injected: loop bug")))
        first, second = chat(), chat()  # in flight when the thread died, then refused
        for resp in (first, second):
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "engine_failed"
        health = httpx.get(base.removesuffix("/v1") + "/health", timeout=WAIT_S)
        assert health.status_code == 503 and health.json()["status"] == "failed"
    finally:
        srv.stop()


def test_collect_records_the_failed_episode_and_stops(tiny, workspace, monkeypatch):
    from retroformer_cli.config import CollectConfig
    from retroformer_cli.llm.hf_local import HFLocalClient
    from retroformer_cli.stages import collect

    # prefix_cache_mb=3: an engine of its own, not the process's shared one other tests use
    client = HFLocalClient(str(tiny["base"]), cache_dir=workspace.cache_dir, threads=1, prefix_cache_mb=3).load()
    engine = client.engine
    monkeypatch.setattr(engine, "_alloc", lambda capacity: (_ for _ in ()).throw(Injected("injected: out of memory")))
    cfg = CollectConfig(env="hotpotqa", tasks=2, trials=1, max_steps=2, concurrency=2, run="faulty")
    box: dict = {}

    def run():
        try:
            box["result"] = collect.run(cfg, workspace, actor=client, reflector=None)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WAIT_S * 2)
    try:
        assert not worker.is_alive(), "collect hung on a failed engine request"
        assert isinstance(box.get("error"), EngineFault), box
        manifest = workspace.read_manifest("faulty")
        assert manifest["status"] == "failed"
        error = manifest["sessions"][-1]["error"]
        assert error["task_id"] in manifest["task_ids"] and error["trial"] == 1
        assert "out of memory" in error["error"]
    finally:
        engine.shutdown(drain=False, timeout=10)
