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


def _fused(modules: list[Any]) -> tuple[Callable[[Any], Any], list[tuple[int, int]]] | None:
    """``(x -> [T, all rows], each module's columns)`` when the first module computes the others' rows too."""
    spans = getattr(modules[0], "stacked_spans", lambda: None)()
    if spans is not None and len(spans) == len(modules) and spans == sorted(spans) and spans[0][0] == 0 and \
            all(a == b for (_, a), (b, _) in zip(spans, spans[1:])):
        return modules[0].compute_stacked, spans
    return None


def _qkv(attn: Any) -> Callable[[Any, Any, Any], tuple[Any, Any, Any]]:
    """``(x, cos, sin) -> (q, k, v)``, q and k rotated, ``[T, heads, head_dim]`` each. Stacked q/k/v rows: one
    kernel call, and q and k rotated together (the same elementwise operations on the same numbers)."""
    d = attn.head_dim
    fused = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
    if fused is not None:
        compute, ((_, nq), (_, nk), (_, nv)) = fused
        heads = nq // d

        def stacked(x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
            y = compute(x)
            rows = y.shape[0]
            qk = _rotate(y[:, :nk].view(rows, -1, d), cos, sin)
            return qk[:, :heads], qk[:, heads:], y[:, nk:nv].view(rows, -1, d)

        return stacked
    q_proj, k_proj, v_proj = (_projection(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))

    def separate(x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        rows = x.shape[0]
        return (_rotate(q_proj(x).view(rows, -1, d), cos, sin), _rotate(k_proj(x).view(rows, -1, d), cos, sin),
                v_proj(x).view(rows, -1, d))

    return separate


def _gate_up(mlp: Any) -> Callable[[Any], Any]:
    """``x -> silu(gate(x)) * up(x)``."""
    import torch.nn.functional as F

    fused = _fused([mlp.gate_proj, mlp.up_proj])
    if fused is not None:
        compute, ((_, ng), (_, nu)) = fused
        return lambda x: (lambda y: F.silu(y[:, :ng]) * y[:, ng:nu])(compute(x))
    gate, up = _projection(mlp.gate_proj), _projection(mlp.up_proj)
    return lambda x: F.silu(gate(x)) * up(x)


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
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon), _qkv(attn), attn,
                _projection(attn.o_proj),
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                _gate_up(mlp), _projection(mlp.down_proj)))

    def forward(self, ids: list[int], positions: list[int], ctx: StepContext) -> Any:
        import torch
        import torch.nn.functional as F

        rows = len(ids)
        h = F.embedding(torch.tensor(ids), self.embed)
        cos, sin = self._rotary(torch.tensor(positions), h.dtype)
        for norm1, qkv, attn, o_proj, norm2, gate_up, down in self.layers:
            q, k, v = qkv(_rms_norm(h, *norm1), cos, sin)
            out, _ = varlen_attention(attn, q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), None, scaling=attn.scaling)
            h = h + o_proj(out.reshape(rows, -1))
            h = h + down(gate_up(_rms_norm(h, *norm2)))
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
    if dtype != torch.float32:
        x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x if dtype == torch.float32 else x.to(dtype))


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
