"""OpenAICompatClient against a real HTTP server on 127.0.0.1 (FakeOpenAIServer), plus FakeLLM."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from retroformer_cli.errors import BackendError
from retroformer_cli.llm.base import GenerationConfig, LLMClient, Message, messages_to_prompt
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.testing.fake_openai_server import FakeOpenAIServer
from retroformer_cli.llm.openai_compat import OpenAICompatClient, _retry_after_s

FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05)


def user(text: str) -> list[Message]:
    return [Message("system", "be brief"), Message("user", text)]


def client_for(server: FakeOpenAIServer, **kw) -> OpenAICompatClient:
    opts = {"timeout_s": 5.0, **FAST, **kw}
    return OpenAICompatClient("fake-model", base_url=server.base_url, **opts)


async def _gen(client: OpenAICompatClient, messages, config=GenerationConfig()):
    try:
        return await client.agenerate(messages, config)
    finally:
        await client.aclose()


def test_chat_round_trip_applies_stop_client_side():
    with FakeOpenAIServer(reply="Answer: 42\nObservation: the server ignores stop") as srv:
        client = client_for(srv)
        assert isinstance(client, LLMClient)
        config = GenerationConfig(max_tokens=16, stop=("\nObservation", "a", "b", "c", "d"), seed=3)
        gen = asyncio.run(_gen(client, user("what is six times seven?"), config))
    assert gen.text == "Answer: 42"
    assert gen.model_id == "fake-model"
    assert gen.finish_reason == "stop"
    assert gen.retries == 0
    assert gen.usage.prompt_tokens == 7 and gen.usage.completion_tokens == 7
    assert gen.latency_ms > 0
    body = srv.bodies[0]
    assert body["model"] == "fake-model" and body["max_tokens"] == 16 and body["seed"] == 3
    assert body["stop"] == ["\nObservation", "a", "b", "c"]  # OpenAI allows at most four
    assert body["messages"][-1] == {"role": "user", "content": "what is six times seven?"}
    assert srv.served == 1


def test_completions_round_trip_uses_flat_prompt():
    msgs = user("continue this")
    with FakeOpenAIServer() as srv:
        client = client_for(srv, api="completions")
        gen = asyncio.run(_gen(client, msgs, GenerationConfig(stop=("this",))))
    assert srv.bodies[0]["prompt"] == messages_to_prompt(msgs)
    assert gen.text == "echo: be brief\n\ncontinue "
    assert gen.usage.prompt_tokens == 4 and gen.usage.completion_tokens == 5


def test_retries_every_fault_kind_then_succeeds():
    faults = ["429", "500", "503", "timeout", "drop"]
    with FakeOpenAIServer(faults=faults, fault_sleep_s=1.0) as srv:
        client = client_for(srv, timeout_s=0.3)
        gen = asyncio.run(_gen(client, user("hello")))
    assert gen.text == "echo: hello"
    assert gen.retries == len(faults)
    assert srv.requests == len(faults) + 1 and srv.served == 1


def test_concurrent_requests_with_faults_lose_nothing():
    faults = ["429", "500", "drop", "503", "429", "500", "drop", "502"]

    async def run(client):
        try:
            return await asyncio.gather(*(client.agenerate(user(f"q{i}"), GenerationConfig()) for i in range(20)))
        finally:
            await client.aclose()

    with FakeOpenAIServer(faults=faults, delay_s=0.01) as srv:
        gens = asyncio.run(run(client_for(srv, max_concurrency=8)))
    assert [g.text for g in gens] == [f"echo: q{i}" for i in range(20)]
    assert sum(g.retries for g in gens) == len(faults)
    assert srv.served == 20 and srv.requests == 20 + len(faults)


def test_retry_after_header_is_honoured():
    with FakeOpenAIServer(faults=["429:1"]) as srv:
        client = client_for(srv, backoff_max_s=5.0)
        t0 = time.perf_counter()
        gen = asyncio.run(_gen(client, user("wait")))
        elapsed = time.perf_counter() - t0
    assert gen.retries == 1
    assert elapsed >= 1.0


def test_retry_after_parsing():
    assert _retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert _retry_after_s({"retry-after": "2"}) == 2.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _retry_after_s({"retry-after": date}) <= 31
    assert _retry_after_s({"retry-after": "soon"}) is None
    assert _retry_after_s({}) is None


def test_exhausted_retries_raise_backend_error():
    with FakeOpenAIServer(faults=["500"] * 5) as srv:
        client = client_for(srv, max_retries=2)
        with pytest.raises(BackendError) as ei:
            asyncio.run(_gen(client, user("x")))
    assert srv.requests == 3  # first try + two retries
    msg = str(ei.value)
    assert "3 times" in msg and "HTTP 500" in msg and "Injected fault" in msg and srv.base_url in msg


def test_bad_api_key_fails_at_once_without_leaking_it():
    secret = "sk-wrong-key-123456"
    with FakeOpenAIServer(api_key="right-key") as srv:
        client = client_for(srv, api_key=secret, option_name="--critic")
        with pytest.raises(BackendError) as ei:
            asyncio.run(_gen(client, user("x")))
    assert srv.requests == 1  # no retry on 401
    msg = str(ei.value)
    assert "401" in msg and "Incorrect API key" in msg and secret not in msg
    assert "--critic" in (ei.value.hint or "")
    assert secret not in json.dumps(client.describe())


def test_right_api_key_is_sent():
    with FakeOpenAIServer(api_key="right-key") as srv:
        gen = asyncio.run(_gen(client_for(srv, api_key="right-key"), user("ok")))
    assert gen.text == "echo: ok"


def test_unreachable_endpoint_gives_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAICompatClient("m", base_url=f"http://127.0.0.1:{port}/v1", **FAST)
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as ei:
        asyncio.run(_gen(client, user("x")))
    assert time.perf_counter() - t0 < 5
    assert str(ei.value) == (f"Cannot reach the OpenAI-compatible endpoint at http://127.0.0.1:{port}/v1: "
                             "connection refused (--actor-base-url).")


def test_concurrency_bound_is_respected():
    async def run(client):
        try:
            return await asyncio.gather(*(client.agenerate(user(str(i)), GenerationConfig()) for i in range(24)))
        finally:
            await client.aclose()

    with FakeOpenAIServer(delay_s=0.05) as srv:
        gens = asyncio.run(run(client_for(srv, max_concurrency=4)))
    assert len(gens) == 24
    assert 2 <= srv.max_in_flight <= 4


def test_client_survives_successive_event_loops():
    with FakeOpenAIServer() as srv:
        client = client_for(srv)
        a = asyncio.run(client.agenerate(user("one"), GenerationConfig()))
        b = asyncio.run(_gen(client, user("two")))
    assert (a.text, b.text) == ("echo: one", "echo: two")


def test_describe_has_no_key():
    client = OpenAICompatClient("m", base_url="http://127.0.0.1:9/v1", api_key="sk-secret-xyz", api="completions")
    d = client.describe()
    assert d["model"] == "m" and d["base_url"] == "http://127.0.0.1:9/v1" and d["api"] == "completions"
    assert "sk-secret-xyz" not in json.dumps(d)


def test_fake_server_runs_as_a_module():
    proc = subprocess.Popen([sys.executable, "-m", "retroformer_cli.testing.fake_openai_server", "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with urllib.request.urlopen(f"{base_url}/models", timeout=5) as r:
            data = json.load(r)
        assert data["object"] == "list" and data["data"][0]["id"] == "fake-model"
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def test_fake_llm_cycles_replies_and_records_calls():
    llm = FakeLLM(["a b STOP c", "d"])
    cfg = GenerationConfig(stop=("STOP",))

    async def run():
        return [await llm.agenerate(user(f"m{i}"), cfg) for i in range(3)]

    gens = asyncio.run(run())
    assert [g.text for g in gens] == ["a b ", "d", "a b "]
    assert gens[0].usage.completion_tokens == 2 and gens[0].usage.prompt_tokens == 3
    assert len(llm.calls) == 3 and llm.calls[1][0][-1].content == "m1"
    fn = FakeLLM(lambda msgs, config: msgs[-1].content.upper())
    assert asyncio.run(fn.agenerate(user("hi"), cfg)).text == "HI"
    assert isinstance(fn, LLMClient)


def test_comma_separated_base_urls_are_used_in_turn(workspace):
    from retroformer_cli.config import ModelConfig
    from retroformer_cli.llm import make_client

    with FakeOpenAIServer("A") as a, FakeOpenAIServer("B") as b:
        client = make_client(ModelConfig(model="openai:m", base_url=f"{a.base_url}, {b.base_url}"), workspace, "--actor")

        async def six():
            try:
                return [(await client.agenerate([Message("user", "hi")], GenerationConfig())).text for _ in range(6)]
            finally:
                await client.aclose()

        assert asyncio.run(six()) == ["A", "B"] * 3
        assert a.requests == b.requests == 3
    assert client.model_id == "m" and client.describe()["base_url"] == [a.base_url, b.base_url]
