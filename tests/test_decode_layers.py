"""``--weights hybrid``'s decode rows through every layer in one C++ call (``decode_layers``): the numbers of the
operator-by-operator path on the same GGUF blocks up to fp32 rounding, the same keys and values written, and a
row's numbers independent of its batch, of prompt rows in the same pass and of the thread count."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
transformers = pytest.importorskip("transformers")

from retroformer_cli.llm.engine import attention, gguf_kernel, lean_forward  # noqa: E402
from retroformer_cli.llm.engine.attention import Segment, StepContext, causal_mask, use_step  # noqa: E402
from retroformer_cli.llm.engine.gguf_weights import QuantMatrix  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    built = gguf_kernel.load(tmp_path_factory.mktemp("kernel-cache"))
    assert built is not None
    return built


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.set_attn_implementation(attention.register())
    return model


def blocks(kind, rows, cols, rng):
    """Random GGUF blocks (small finite fp16 scales), packed for the kernel."""
    from conftest import random_gguf_blocks

    return gguf_kernel.pack(random_gguf_blocks(kind, rows, cols, rng), kind)


def decode_matrices(model, lib, threads=1):
    """Decode matrices like ``gguf_weights.decode_matrices`` builds them: q/k/v and gate/up stacked."""
    rng = np.random.default_rng(7)
    cfg = model.config
    h, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * 16
    out = {"lm_head": QuantMatrix(lib, "q8_0", blocks("q8_0", cfg.vocab_size, h, rng), cfg.vocab_size, None, threads)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = blocks("q4_1", h + 2 * kv, h, rng)
        out[p + "self_attn.q_proj"] = QuantMatrix(lib, "q4_1", qkv, h, [(0, h), (h, h + kv), (h + kv, h + 2 * kv)],
                                                  threads)
        out[p + "self_attn.k_proj"] = QuantMatrix(lib, "q4_1", qkv[h:h + kv], kv, None, threads)
        out[p + "self_attn.v_proj"] = QuantMatrix(lib, "q4_1", qkv[h + kv:], kv, None, threads)
        out[p + "self_attn.o_proj"] = QuantMatrix(lib, "q4_1", blocks("q4_1", h, h, rng), h, None, threads)
        gate_up = blocks("q4_1", 2 * inter, h, rng)
        out[p + "mlp.gate_proj"] = QuantMatrix(lib, "q4_1", gate_up, inter, [(0, inter), (inter, 2 * inter)], threads)
        out[p + "mlp.up_proj"] = QuantMatrix(lib, "q4_1", gate_up[inter:], inter, None, threads)
        out[p + "mlp.down_proj"] = QuantMatrix(lib, "q4_1", blocks("q4_1", h, inter, rng), h, None, threads)
    return out


PROMPTS = [[5, 9, 2, 7], list(range(10, 31)), [3, 4]]


def prefilled(model, lean):
    """Each prompt in a prompt pass of its own: (buffers, each sequence's next token)."""
    kvs, first = [torch.zeros(2, 2, 2, len(p) + 8, 16) for p in PROMPTS], []
    with torch.inference_mode():
        for p, kv in zip(PROMPTS, kvs):
            ctx = StepContext([Segment(kv, 0, len(p), 0, causal_mask(len(p), 0, None, CPU))], torch.tensor([len(p) - 1]))
            with use_step(ctx):
                first.append(int(lean.forward(p, list(range(len(p))), ctx).argmax()))
    return kvs, first


def decode(lean, kvs, tokens, which, prompt=None):
    """One pass: a decode row for each sequence in ``which`` (then a prompt chunk ``(buffer, ids)``): logits."""
    segs, ids, pos = [], [], []
    for i in which:
        segs.append(Segment(kvs[i], len(ids), 1, len(PROMPTS[i])))
        ids.append(tokens[i])
        pos.append(len(PROMPTS[i]))
    d = len(ids)
    if prompt is not None:
        kv, chunk = prompt
        segs.append(Segment(kv, d, len(chunk), 0, causal_mask(len(chunk), 0, None, CPU)))
        ids, pos = ids + chunk, pos + list(range(len(chunk)))
    ctx = StepContext(segs, None)
    with torch.inference_mode(), use_step(ctx):
        return lean.forward(ids, pos, ctx, decode_rows=d)


def test_one_call_per_pass_computes_what_the_operator_path_computes(lib):
    model = tiny_llama()
    lean = lean_forward.build(model, decode_matrices(model, lib))
    assert lean is not None and lean.stack is not None
    kvs, first = prefilled(model, lean)
    copies = [kv.clone() for kv in kvs]
    fused = decode(lean, kvs, first, [0, 1, 2])
    lean.stack = None  # the per-operator path on the same matrices (attention through the kernel)
    plain = decode(lean, copies, first, [0, 1, 2])
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert not torch.equal(fused, plain)  # another order of fp32 operations: the stack really ran
    for a, b in zip(kvs, copies):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_rows_numbers_do_not_depend_on_its_batch_prompt_rows_or_threads(lib):
    model = tiny_llama()
    lean = lean_forward.build(model, decode_matrices(model, lib))
    kvs, first = prefilled(model, lean)
    kept = [kv.clone() for kv in kvs]
    together = decode(lean, kvs, first, [0, 1, 2])
    for i in range(3):
        for kv, k in zip(kvs, kept):
            kv.copy_(k)
        assert torch.equal(decode(lean, kvs, first, [i])[0], together[i])
    for kv, k in zip(kvs, kept):
        kv.copy_(k)
    chunk = torch.zeros(2, 2, 2, 16, 16)
    mixed = decode(lean, kvs, first, [0, 1, 2], prompt=(chunk, [40, 41, 42, 43, 44]))
    assert torch.equal(mixed[:3], together)
    for kv, k in zip(kvs, kept):
        kv.copy_(k)
    threaded = lean_forward.build(model, decode_matrices(model, lib, threads=2))
    assert threaded.stack is not None and threaded.stack.threads == 2
    assert torch.equal(decode(threaded, kvs, first, [0, 1, 2]), together)


def test_layers_it_cannot_stack_keep_the_operator_path(lib):
    model = tiny_llama()
    matrices = decode_matrices(model, lib)
    matrices["model.layers.1.mlp.gate_proj"].spans = None  # gate and up not stacked in one layer
    lean = lean_forward.build(model, matrices)
    assert lean is not None and lean.stack is None and lean.kernel is not None
