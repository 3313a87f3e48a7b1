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


def _other_weights(model):
    """``{module name: module}`` of every projection and the head of a differently initialised twin of ``model``:
    decode matrices whose numbers differ from the model's, so a row computed by the wrong side shows."""
    from retroformer_cli.llm.engine.cpu_linear import pack_linear_layers

    torch.manual_seed(1)
    twin = transformers.LlamaForCausalLM(model.config).eval()
    assert pack_linear_layers(twin) > 0  # oneDNN's results do not depend on the rows in a call; F.linear's do
    return {name: module for name, module in twin.named_modules() if isinstance(module, torch.nn.Linear)}


def test_mixed_batch_rows_take_the_path_of_their_kind():
    """``--weights hybrid``'s split: the first ``decode_rows`` rows go through the decode matrices only, the
    others through the model's own layers only, whatever the mix: each row equals the same row computed with
    every row on its side."""
    from retroformer_cli.llm.engine.cpu_linear import available, pack_linear_layers

    if not available(torch.float32):
        pytest.skip("no oneDNN here")
    model = tiny_llama()
    assert pack_linear_layers(model) > 0
    lean = lean_forward.build(model, _other_weights(model))
    assert lean is not None
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    decoding = torch.zeros(layers, 2, heads, 40, 16)
    prompt = torch.zeros(layers, 2, heads, 40, 16)
    with torch.inference_mode():  # a sequence's first 9 tokens, then a step: its 3 decode rows + a prompt chunk
        ctx = StepContext([Segment(decoding, 0, 9, 0, causal_mask(9, 0, None, torch.device("cpu")))], None)
        with use_step(ctx):
            lean.forward(list(range(5, 14)), list(range(9)), ctx)
        ids, pos = [20, 21, 22] + list(range(30, 37)), [9, 10, 11] + list(range(7))
        ctx = StepContext([Segment(decoding, 0, 3, 9, causal_mask(3, 9, None, torch.device("cpu"))),
                           Segment(prompt, 3, 7, 0, causal_mask(7, 0, None, torch.device("cpu")))],
                          torch.tensor([0, 1, 2, 9]))
        out = {}
        for d in (0, 3, 10):
            with use_step(ctx):
                out[d] = lean.forward(ids, pos, ctx, decode_rows=d)
    assert not torch.equal(out[0][:3], out[10][:3])  # the two sides compute different numbers
    assert torch.equal(out[3][:3], out[10][:3])  # decode rows: as if every row were a decode row
    assert torch.equal(out[3][3:], out[0][3:])  # the prompt chunk's logit row: as if no row were
    plain = lean_forward.build(model)
    with torch.inference_mode(), use_step(ctx):
        assert torch.equal(plain.forward(ids, pos, ctx, decode_rows=3), out[0])  # no decode matrices: no split
