"""`retroformer serve`: the real server (uvicorn on 127.0.0.1, a free port, started and stopped by the tests)
over a tiny random Llama with the embedded tokenizer and two tiny LoRA adapters, driven by the official
``openai`` client and raw HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serve needs `pip install 'retroformer-cli[serve]'`")
pytest.importorskip("uvicorn", reason="serve needs `pip install 'retroformer-cli[serve]'`")
torch = pytest.importorskip("torch", reason="the transformers engine needs torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from retroformer_cli.serve.app import create_app  # noqa: E402
from retroformer_cli.serve.backend import TransformersBackend  # noqa: E402
from retroformer_cli.httpserver.runner import ServerThread  # noqa: E402

KEY = "test-key-123"
BASE = "tiny"


def chat(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def make_server(tiny, **kw) -> ServerThread:
    api_key = kw.pop("api_key", KEY)
    max_request_bytes = kw.pop("max_request_bytes", 1 << 20)
    opts = dict(served_name=BASE, adapters={"a": str(tiny["a"]), "b": str(tiny["b"])}, cache_dir=tiny["base"].parent / "cache",
                threads=1, max_batch_size=8, max_queue=128, max_tokens_limit=64)
    opts.update(kw)
    engine = TransformersBackend(str(tiny["base"]), **opts)
    srv = ServerThread(create_app(engine, api_key=api_key, max_request_bytes=max_request_bytes))
    srv.engine = engine
    return srv.start()


@pytest.fixture(scope="module")
def server(tiny):
    srv = make_server(tiny)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def ask(client, text: str, model: str = BASE, max_tokens: int = 8, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=chat(text), max_tokens=max_tokens, temperature=0, **kw)
    return r.choices[0].message.content


def post(server, path: str, body=None, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, (bytes, str)):
        return httpx.post(server.base_url + path, content=body, headers={"content-type": "application/json", **headers},
                          timeout=30, **kw)
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=30, **kw)


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# --------------------------------------------------------------------------------------------------- tests
def test_command_module_is_light():
    code = ("import sys, retroformer_cli.cli, retroformer_cli.commands.serve; "
            "bad = [m for m in ('torch', 'fastapi', 'uvicorn', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_list_and_health(server, client):
    ids = [m.id for m in client.models.list()]
    assert ids[:3] == [BASE, "a", "b"]
    card = httpx.get(server.base_url + "/models/a", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["parent"] == BASE and card["object"] == "model"
    health = httpx.get(server.base_url.removesuffix("/v1") + "/health")  # open without a key
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_matches_the_local_backend_and_counts_usage(tiny, client):
    from retroformer_cli.llm.base import GenerationConfig, Message
    from retroformer_cli.llm.hf_local import HFLocalClient

    r = client.chat.completions.create(model=BASE, messages=chat("Who wrote Hamlet?"), max_tokens=10, temperature=0)
    local = HFLocalClient(str(tiny["base"]), cache_dir=tiny["base"].parent / "cache", threads=1)
    try:
        ref = local.generate([Message("system", "You are terse."), Message("user", "Who wrote Hamlet?")],
                             GenerationConfig(max_tokens=10))
    finally:
        local.close()
    assert r.object == "chat.completion" and r.model == BASE
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens
    assert r.usage.completion_tokens == ref.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_with_prompt_list_n_and_stop(client):
    r = client.completions.create(model=BASE, prompt=["Once upon a time", "Action: search["], max_tokens=6,
                                  temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy
    assert r.choices[0].text != r.choices[2].text
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 4 * 6
    full = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=12, temperature=0).choices[0]
    stop = full.text.replace("\ufffd", "")[4:6]
    assert stop.strip()
    cut = client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_streaming_chat_equals_the_whole_answer(server, client):
    whole = client.chat.completions.create(model="a", messages=chat("stream me"), max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="a", messages=chat("stream me"), max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                parts.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert len(parts) > 1, "tokens arrive as separate chunks"
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    raw = post(server, "/completions", {"model": BASE, "prompt": "hi", "max_tokens": 4, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(server, client):
    body = {"model": BASE, "messages": chat("long story"), "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        first = next(resp.iter_lines())
        assert first.startswith("data: ")
    assert ask(client, "next one")  # the dropped stream's rows were cancelled; serving goes on
    assert server.engine.stats()["queued"] == 0


def test_adapters_are_selected_by_model_name_even_in_one_batch(tiny, server, client):
    prompt = "Reflect on the failed trial."
    alone = {m: ask(client, prompt, m) for m in (BASE, "a", "b")}
    assert len(set(alone.values())) == 3, alone
    from retroformer_cli.llm.base import GenerationConfig, Message
    from retroformer_cli.llm.hf_local import HFLocalClient

    merged = HFLocalClient(str(tiny["a"]), cache_dir=tiny["base"].parent / "cache", threads=1)  # peft, merged
    try:
        ref = merged.generate([Message("system", "You are terse."), Message("user", prompt)], GenerationConfig(max_tokens=8))
    finally:
        merged.close()
    assert alone["a"] == ref.text
    before = len(server.engine.step_sizes)
    models = [BASE, "a", "b"] * 4
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: ask(client, prompt, m), models))
    assert together == [alone[m] for m in models]
    assert max(list(server.engine.step_sizes)[before:]) > 1, "mixed-adapter requests shared forward passes"


def test_load_and_unload_adapters_at_runtime(tiny, server, client):
    assert post(server, "/load_lora_adapter", {"lora_name": "c", "lora_path": str(tiny["b"])}).status_code == 200
    assert "c" in [m.id for m in client.models.list()]
    assert ask(client, "same weights as b", "c") == ask(client, "same weights as b", "b")
    err = assert_openai_error(post(server, "/load_lora_adapter", {"lora_name": "c", "lora_path": str(tiny["b"])}), 400)
    assert err["param"] == "lora_name"
    assert_openai_error(post(server, "/load_lora_adapter", {"lora_name": "d", "lora_path": str(tiny["base"] / "nope")}), 400)
    assert post(server, "/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert "c" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        ask(client, "gone", "c")
    assert_openai_error(post(server, "/unload_lora_adapter", {"lora_name": "c"}), 404)
    assert ask(client, "still there", "b")


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.get(server.base_url + "/models", headers=headers)
        err = assert_openai_error(resp, 401)
        assert err["code"] == "invalid_api_key"
    resp = post(server, "/chat/completions", b"{not json", key=None)
    assert_openai_error(resp, 401)  # checked before the body is read
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(server, client):
    assert_openai_error(post(server, "/chat/completions", b'{"model": "tiny", "messages": ['), 400)
    err = assert_openai_error(post(server, "/chat/completions", {"model": "nope", "messages": chat("x")}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    cases = {
        "max_tokens": {"model": BASE, "messages": chat("x"), "max_tokens": "ten"},
        "messages": {"model": BASE, "messages": "hello"},
        "temperature": {"model": BASE, "messages": chat("x"), "temperature": 7},
        "n": {"model": BASE, "messages": chat("x"), "n": 0},
        "messages.0.role": {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]},
        "stop": {"model": BASE, "messages": chat("x"), "stop": 5},
    }
    for param, body in cases.items():
        err = assert_openai_error(post(server, "/chat/completions", body), 400)
        assert err["param"] == param, (param, err)
    err = assert_openai_error(post(server, "/chat/completions", {"model": BASE, "messages": chat("x"), "max_tokens": 65}), 400)
    assert err["param"] == "max_tokens" and "64" in err["message"]
    long = {"model": BASE, "messages": chat("word " * 4200), "max_tokens": 8}
    assert assert_openai_error(post(server, "/chat/completions", long), 400)["code"] == "context_length_exceeded"
    assert_openai_error(post(server, "/completions", {"model": BASE}), 400)
    assert_openai_error(post(server, "/chat/completions", b"x" * (2 << 20)), 413)
    assert_openai_error(httpx.get(server.base_url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}), 404)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=chat("x"), max_tokens=-1)
    assert ask(client, "still alive?")


def test_64_concurrent_clients_each_get_their_own_answer(server):
    prompts = [f"Question {i}: what is {i} plus {i * 7 % 13}?" for i in range(64)]
    sync = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    alone = [ask(sync, p, max_tokens=6) for p in prompts]  # one at a time: batch size 1
    before = len(server.engine.step_sizes)

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)
        try:
            rs = await asyncio.gather(*(aclient.chat.completions.create(
                model=BASE, messages=chat(p), max_tokens=6, temperature=0) for p in prompts))
        finally:
            await aclient.close()
        return [r.choices[0].message.content for r in rs]

    answers = asyncio.run(main())
    assert answers == alone
    sizes = list(server.engine.step_sizes)[before:]
    assert max(sizes) == 8, sizes  # continuous batching keeps the batch full (--max-batch-size 8)


def test_full_queue_answers_429_with_retry_after(tiny):
    srv = make_server(tiny, max_batch_size=1, max_queue=1, api_key=None)
    try:
        body = {"model": BASE, "messages": chat("busy"), "max_tokens": 64, "temperature": 0}
        with ThreadPoolExecutor(12) as pool:
            resps = list(pool.map(lambda _: post(srv, "/chat/completions", body, key=None), range(12)))
        codes = sorted(r.status_code for r in resps)
        assert codes.count(200) >= 2 and 429 in codes, codes
        busy = next(r for r in resps if r.status_code == 429)
        assert_openai_error(busy, 429)
        assert int(busy.headers["Retry-After"]) >= 1
        assert post(srv, "/chat/completions", body, key=None).status_code == 200  # recovers
    finally:
        srv.stop()


def test_graceful_shutdown_finishes_in_flight_requests(tiny):
    srv = make_server(tiny, max_batch_size=2, api_key=None)
    body = {"model": BASE, "messages": chat("finish me"), "max_tokens": 64, "temperature": 0}
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(post(srv, "/chat/completions", body, key=None)))
               for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while srv.engine.stats()["queued"] + srv.engine.stats()["running"] < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    srv.stop()
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in results)


def test_collect_runs_against_the_server(server, workspace):
    from retroformer_cli.config import CollectConfig, ModelConfig
    from retroformer_cli.stages import collect

    actor = ModelConfig(model=f"openai:{BASE}", base_url=server.base_url, api_key=KEY, max_tokens=16)
    reflector = ModelConfig(model="openai:a", base_url=server.base_url, api_key=KEY, max_tokens=16)
    cfg = CollectConfig(env="hotpotqa", tasks=2, trials=2, max_steps=2, run="served", actor=actor, reflector=reflector)
    res = collect.run(cfg, workspace)
    assert res.status == "completed" and res.trials_written >= 2
    trials = [json.loads(line) for line in res.trials_path.read_text().splitlines()]
    assert all(t["actor_model_id"] == BASE for t in trials)
    assert res.prompt_tokens > 0 and res.completion_tokens > 0
    reflected = [t for t in trials if t.get("reflection")]
    assert reflected and all(t["reflection"]["model_id"] == "a" for t in reflected)


def test_cli_serves_a_workspace_checkpoint(tiny, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(tiny["a"], ws / "checkpoints" / "sft" / "r1")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(ws), "serve", "--model", str(tiny["base"]),
           "--served-model-name", BASE, "--adapter", "r1=workspace:sft/r1", "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**__import__("os").environ,
                                                                            "RETROFORMER_API_KEY": KEY})
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "ready" in line:
                break
        assert any(f"http://127.0.0.1:{port}/v1" in x for x in lines), lines
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in c.models.list()] == [BASE, "r1"]
        assert ask(c, "hello", "r1")
    finally:
        proc.send_signal(__import__("signal").SIGINT)
        assert proc.wait(30) == 0


def test_vllm_engine_without_vllm_fails_with_one_clear_line(tiny, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(tmp_path / "ws"), "serve", "--engine", "vllm",
           "--model", str(tiny["base"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "pip install vllm" in lines[0], proc.stderr
