"""The engine's own forward pass for Llama-architecture models: the same operations as transformers' modules, in
the same order on the same tensors, so the logits are bit-identical, without their per-module Python.

A decode step of the embedded model is 30 layers of small operations; through transformers' modules (``__call__``,
hooks, keyword plumbing, mask creation, output capture) a step ran ~6,000 operators and spent about as long
outside the linear layers as inside them (``benchmarks/decode_profile.py``). Here each layer is RMSNorm,
projections (one kernel call for q/k/v and one for gate/up when ``--weights gguf`` stacked them), rotary
embedding, the engine's varlen attention (the very function transformers would call), residuals and the MLP.

Used for every forward pass whose rows are all the base model's; a batch with a LoRA adapter's rows runs through
transformers and PEFT as before (same numbers for the base rows, just slower). Only plain Llama models on CPU are
taken (no biases, default rotary embedding, SiLU MLP); any other model keeps the transformers path.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from retroformer_cli.llm.engine.attention import StepContext, varlen_attention

log = logging.getLogger("retroformer.engine")


def _projection(module: Any) -> Callable[[Any], Any]:
    """``x [T, in] -> [T, out]`` computing exactly what ``module(x)`` computes."""
    import torch
    import torch.nn.functional as F

    compute = getattr(module, "compute", None)  # QuantLinear / PackedLinear: their own kernel, called directly
    if compute is not None:
        return compute
    if type(module) is not torch.nn.Linear:
        raise TypeError(f"{type(module).__name__} is not a linear layer")
    return lambda x: F.linear(x, module.weight, module.bias)


def _fused(modules: list[Any]) -> Callable[[Any], list[Any]]:
    """``x -> [each module's output]``, in one kernel call when the first module computes the others' rows too."""
    first = modules[0]
    spans = getattr(first, "stacked_spans", lambda: None)()
    if spans is not None and len(spans) == len(modules):
        compute = first.compute_stacked
        return lambda x: [y[:, a:b] for y in (compute(x),) for a, b in spans]
    projections = [_projection(m) for m in modules]
    return lambda x: [p(x) for p in projections]


def supported(model: Any) -> str | None:
    """None when :class:`LeanForward` computes this model exactly; else why not."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama" or type(model).__name__ != "LlamaForCausalLM":
        return f"{type(model).__name__} is not a plain Llama model"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "biases in the projections"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rotary embedding {rope.get('rope_type')}"
    if getattr(cfg, "hidden_act", None) != "silu" or next(model.parameters()).device.type != "cpu":
        return "not a SiLU MLP on CPU"
    return None


class LeanForward:
    """``forward(ids, positions, ctx)``: the logits of ``ctx.logit_rows`` (all rows when None), ``[rows, vocab]``."""

    def __init__(self, model: Any):
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.head = _projection(model.get_output_embeddings())
        self.layers = []
        for layer in inner.layers[: model.config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                _fused([attn.q_proj, attn.k_proj, attn.v_proj]), attn, _projection(attn.o_proj),
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                _fused([mlp.gate_proj, mlp.up_proj]), _projection(mlp.down_proj)))

    def forward(self, ids: list[int], positions: list[int], ctx: StepContext) -> Any:
        import torch
        import torch.nn.functional as F

        rows = len(ids)
        h = F.embedding(torch.tensor(ids), self.embed)
        cos, sin = self._rotary(torch.tensor(positions), h.dtype)
        for norm1, qkv, attn, o_proj, norm2, gate_up, down in self.layers:
            q, k, v = qkv(_rms_norm(h, *norm1))
            d = attn.head_dim
            q, k = _rotate(q.view(rows, -1, d), cos, sin), _rotate(k.view(rows, -1, d), cos, sin)
            out, _ = varlen_attention(attn, q.unsqueeze(2), k.unsqueeze(2), v.view(rows, -1, 1, d), None,
                                      scaling=attn.scaling)
            h = h + o_proj(out.reshape(rows, -1))
            gate, up = gate_up(_rms_norm(h, *norm2))
            h = h + down(F.silu(gate) * up)
        h = _rms_norm(h, *self.final_norm)
        if ctx.logit_rows is not None:
            h = h[ctx.logit_rows]
        return self.head(h)

    def _rotary(self, positions: Any, dtype: Any) -> tuple[Any, Any]:
        """transformers' ``LlamaRotaryEmbedding.forward`` for these positions: ``[T, 1, head_dim]`` each."""
        import torch

        freqs = positions[:, None].float() * self.rotary.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rotary.attention_scaling
        return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _rms_norm(x: Any, weight: Any, eps: float) -> Any:
    import torch

    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    """``x * cos + rotate_half(x) * sin`` as transformers' ``apply_rotary_pos_emb`` computes it."""
    import torch

    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def build(model: Any) -> LeanForward | None:
    """The lean forward pass for ``model``, or None (one debug line says why) when it is not a model it takes."""
    why = supported(model)
    if why is None:
        try:
            return LeanForward(model)
        except (TypeError, AttributeError) as exc:
            why = str(exc)
    log.debug("the engine runs this model through transformers' modules: %s", why)
    return None
