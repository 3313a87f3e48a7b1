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

from retroformer_cli.llm.engine.attention import Segment, StepContext, attend_segments
from retroformer_cli.llm.engine.decode_attention import DecodeSegments
from retroformer_cli.llm.engine.decode_layers import DecodeStack

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


def _qkv(d: int, q: Any, k: Any, v: Any) -> Callable[[Any, Any, Any], tuple[Any, Any, Any]]:
    """``(x, cos, sin) -> (q, k, v)``, q and k rotated, ``[T, heads, head_dim]`` each (``d``). Stacked q/k/v
    rows: one kernel call, and q and k rotated together (the same elementwise operations on the same numbers)."""
    fused = _fused([q, k, v])
    if fused is not None:
        compute, ((_, nq), (_, nk), (_, nv)) = fused
        heads = nq // d

        def stacked(x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
            y = compute(x)
            rows = y.shape[0]
            qk = _rotate(y[:, :nk].view(rows, -1, d), cos, sin)
            return qk[:, :heads], qk[:, heads:], y[:, nk:nv].view(rows, -1, d)

        return stacked
    q_proj, k_proj, v_proj = (_projection(m) for m in (q, k, v))

    def separate(x: Any, cos: Any, sin: Any) -> tuple[Any, Any, Any]:
        rows = x.shape[0]
        return (_rotate(q_proj(x).view(rows, -1, d), cos, sin), _rotate(k_proj(x).view(rows, -1, d), cos, sin),
                v_proj(x).view(rows, -1, d))

    return separate


def _gate_up(gate_proj: Any, up_proj: Any) -> Callable[[Any], Any]:
    """``x -> silu(gate(x)) * up(x)``."""
    import torch.nn.functional as F

    fused = _fused([gate_proj, up_proj])
    if fused is not None:
        compute, ((_, ng), (_, nu)) = fused
        return lambda x: (lambda y: F.silu(y[:, :ng]) * y[:, ng:nu])(compute(x))
    gate, up = _projection(gate_proj), _projection(up_proj)
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
    """``forward(ids, positions, ctx, decode_rows)``: the logits of ``ctx.logit_rows`` (all rows when None),
    ``[rows, vocab]``.

    ``decode`` (``--weights hybrid``): ``{module name: matrix}`` computing the same layers another way (the GGUF
    blocks, :class:`~.gguf_weights.QuantMatrix`). The first ``decode_rows`` rows of a pass (decoding sequences'
    tokens and drafts, which the batch puts first) go through those, the others (prompt chunks) through the
    model's own layers; each group in its own calls, joined after, so a row's numbers depend only on its kind."""

    def __init__(self, model: Any, decode: dict[str, Any] | None = None):
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.head = _projection(model.get_output_embeddings())
        self.layers = []  # (norm1, attn, norm2, the model's projections, the decode rows' projections)
        for i, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
            attn, mlp = layer.self_attn, layer.mlp
            own = _projections(attn.head_dim, attn, mlp)
            fast = own if decode is None else _projections(
                attn.head_dim, *(_Named(decode, f"model.layers.{i}.{part}.") for part in ("self_attn", "mlp")))
            self.layers.append(((layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon), attn,
                                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                                own, fast))
        self.fast_head = self.head if decode is None else _projection(decode["lm_head"])
        self.splits = decode is not None
        # the decode rows' attention: one C++ call per layer (.decode_attention) in the kernel's library
        head = decode.get("lm_head") if decode else None
        self.kernel = (head.lib, head.threads) if getattr(getattr(head, "lib", None), "rf_decode_attention",
                                                          None) else None
        # and, when every layer's blocks are stacked, all their layers in one C++ call (.decode_layers)
        self.stack = DecodeStack.build(model, decode) if self.kernel else None

    def forward(self, ids: list[int], positions: list[int], ctx: StepContext, decode_rows: int = 0) -> Any:
        import torch
        import torch.nn.functional as F

        rows = len(ids)
        d = decode_rows if self.splits else 0
        h = F.embedding(torch.tensor(ids), self.embed)
        cos, sin = self._rotary(torch.tensor(positions), h.dtype)
        decoding = DecodeSegments.build(ctx.segments, d) if d and self.kernel else None
        if decoding is not None and self.stack is not None:  # the decode rows' layers in one kernel call
            top = self.stack.run(h[:d], cos[:d], sin[:d], decoding)
            if d < rows:  # the prompt rows on their own, their segments counted from their first row
                others = [Segment(s.kv, s.start - d, s.count, s.past, s.mask) for s in ctx.segments if s.start >= d]
                top = torch.cat((top, self._layers(h[d:], cos[d:], sin[d:], 0, None, others)))
            h = top
        else:
            others = [s for s in ctx.segments if s.start >= d] if decoding else ctx.segments
            h = self._layers(h, cos, sin, d, decoding, others)
        h = _rms_norm(h, *self.final_norm)
        if ctx.logit_rows is not None:
            h = h[ctx.logit_rows]
            d = int((ctx.logit_rows < d).sum()) if d else 0  # logit rows ascend: the decode rows' come first
        return _by_kind(self.head, self.fast_head, d, h)

    def _layers(self, h: Any, cos: Any, sin: Any, d: int, decoding: DecodeSegments | None, others: list[Any]) -> Any:
        """``h`` through every layer, operator by operator: rows ``:d`` on the decode matrices (attending through
        the kernel when ``decoding``), the others on the model's own (``others``: their segments)."""
        rows = h.shape[0]
        for i, (norm1, attn, norm2, own, fast) in enumerate(self.layers):
            q, k, v = _by_kind(own[0], fast[0], d, _rms_norm(h, *norm1), cos, sin)
            out = self._attention(i, attn, q, k, v, decoding, others)
            h = h + _by_kind(own[1], fast[1], d, out.reshape(rows, -1))
            x = _by_kind(own[2], fast[2], d, _rms_norm(h, *norm2))
            h = h + _by_kind(own[3], fast[3], d, x)
        return h

    def _attention(self, layer: int, attn: Any, q: Any, k: Any, v: Any, decoding: DecodeSegments | None,
                   others: list[Any]) -> Any:
        """Every row's attention output ``[rows, heads, d]``: the decode rows' through the kernel when
        ``decoding``, the other segments' through PyTorch's (the engine's varlen attention)."""
        import torch

        if decoding is None:
            return attend_segments(layer, q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), others, attn.scaling)
        d = decoding.rows
        lib, threads = self.kernel  # type: ignore[misc]
        top = decoding.attend(lib, layer, q[:d], k[:d], v[:d], attn.scaling, None, threads)
        if not others:
            return top
        bottom = attend_segments(layer, q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), others, attn.scaling)
        return torch.cat((top, bottom.squeeze(1)))

    def _rotary(self, positions: Any, dtype: Any) -> tuple[Any, Any]:
        """transformers' ``LlamaRotaryEmbedding.forward`` for these positions: ``[T, 1, head_dim]`` each."""
        import torch

        freqs = positions[:, None].float() * self.rotary.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rotary.attention_scaling
        return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


class _Named:
    """``obj.q_proj`` -> ``matrices[prefix + "q_proj"]``: decode matrices addressed like the model's modules."""

    def __init__(self, matrices: dict[str, Any], prefix: str):
        self.matrices, self.prefix = matrices, prefix

    def __getattr__(self, name: str) -> Any:
        return self.matrices[self.prefix + name]


def _projections(head_dim: int, attn: Any, mlp: Any) -> tuple[Callable[..., Any], ...]:
    """One layer's ``(qkv, o_proj, gate_up, down)`` computations over ``attn``'s and ``mlp``'s projections."""
    return (_qkv(head_dim, attn.q_proj, attn.k_proj, attn.v_proj), _projection(attn.o_proj),
            _gate_up(mlp.gate_proj, mlp.up_proj), _projection(mlp.down_proj))


def _by_kind(own: Callable[..., Any], fast: Callable[..., Any], d: int, x: Any, *rowwise: Any) -> Any:
    """``own`` over rows ``d:`` and ``fast`` over rows ``:d`` of ``x`` (and of each ``rowwise`` tensor), joined
    in row order: each group in calls of its own, so no row's numbers depend on the other group."""
    import torch

    if d == 0:
        return own(x, *rowwise)
    if d == x.shape[0]:
        return fast(x, *rowwise)
    top = fast(x[:d], *(t[:d] for t in rowwise))
    bottom = own(x[d:], *(t[d:] for t in rowwise))
    if isinstance(top, tuple):
        return tuple(torch.cat((a, b)) for a, b in zip(top, bottom))
    return torch.cat((top, bottom))


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


def build(model: Any, decode: dict[str, Any] | None = None) -> LeanForward | None:
    """The lean forward pass for ``model`` (``decode``: see :class:`LeanForward`), or None (one debug line says
    why) when it is not a model it takes."""
    why = supported(model)
    if why is None:
        try:
            return LeanForward(model, decode)
        except (TypeError, AttributeError) as exc:
            why = str(exc)
    log.debug("the engine runs this model through transformers' modules: %s", why)
    return None
