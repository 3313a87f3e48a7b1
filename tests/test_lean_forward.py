"""The engine's lean Llama forward pass gives bit-identical logits and key/value buffers to transformers' modules
(prompts, then decode steps of several sequences in one batch), with plain and oneDNN-packed linear layers; models
it does not take keep the transformers path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from retroformer_cli.llm.engine import attention, lean_forward  # noqa: E402
from retroformer_cli.llm.engine.attention import Segment, StepContext, causal_mask, use_step  # noqa: E402


def tiny_llama(**overrides):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=256, **overrides)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.set_attn_implementation(attention.register())
    model.get_output_embeddings().register_forward_pre_hook(attention.keep_logit_rows)
    return model


def run(model, lean, prompts, steps):
    """Prompts in one pass, then ``steps`` greedy decode passes of every sequence together: (logits, buffers)."""
    layers, heads, dim = model.config.num_hidden_layers, model.config.num_key_value_heads, 16
    kvs = [torch.zeros(layers, 2, heads, len(p) + steps + 1, dim) for p in prompts]
    segs, ids, pos, rows = [], [], [], []
    for kv, p in zip(kvs, prompts):
        segs.append(Segment(kv, len(ids), len(p), 0, causal_mask(len(p), 0, None, torch.device("cpu"))))
        ids, pos = ids + p, pos + list(range(len(p)))
        rows.append(len(ids) - 1)
    past, out = [len(p) for p in prompts], []
    with torch.inference_mode():
        for _ in range(steps + 1):
            ctx = StepContext(segs, torch.tensor(rows))
            with use_step(ctx):
                if lean is not None:
                    logits = lean.forward(ids, pos, ctx)
                else:
                    logits = model(input_ids=torch.tensor(ids).view(-1, 1), position_ids=torch.tensor(pos).view(-1, 1),
                                   use_cache=False).logits[:, -1, :]
            out.append(logits.clone())
            ids, pos, rows = logits.argmax(-1).tolist(), list(past), list(range(len(kvs)))
            segs = [Segment(kv, i, 1, past[i]) for i, kv in enumerate(kvs)]
            past = [x + 1 for x in past]
    return out, kvs


@pytest.mark.parametrize("packed", [False, True])
def test_lean_forward_is_bit_identical_to_transformers(packed):
    from retroformer_cli.llm.engine.cpu_linear import available, pack_linear_layers

    model = tiny_llama()
    if packed:
        if not available(torch.float32):
            pytest.skip("no oneDNN here")
        assert pack_linear_layers(model) > 0
    lean = lean_forward.build(model)
    assert lean is not None
    prompts = [list(range(3, 40)), list(range(50, 61)), [7]]
    ref, ref_kv = run(model, None, prompts, 5)
    got, got_kv = run(model, lean, prompts, 5)
    assert len(ref) == len(got) == 6
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert all(torch.equal(a, b) for a, b in zip(ref_kv, got_kv))


@pytest.mark.parametrize("change", [{"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}])
def test_models_it_does_not_take_keep_the_transformers_path(change):
    model = tiny_llama(**change)
    assert lean_forward.supported(model) is not None
    assert lean_forward.build(model) is None
