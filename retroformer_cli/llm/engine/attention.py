"""Varlen attention over per-sequence key/value buffers, plugged into transformers' ``AttentionInterface``.

A forward pass of the engine carries the new tokens of several sequences flattened into one batch of
``T`` rows of length 1 (``input_ids`` of shape ``[T, 1]``): a row per token, so PEFT's mixed-adapter batches
(one adapter name per batch row) work per token, and the linear layers see one ``[T, hidden]`` matrix. The
model's own modules (embeddings, norms, RoPE from our ``position_ids``, projections, MLPs) run unchanged;
only the attention function is ours: for each sequence it writes the new keys and values into that
sequence's buffer, then attends its new queries over the buffer's first ``past + n`` positions with
PyTorch's scaled-dot-product attention (causal, aligned bottom-right; sliding windows honoured).

The step being run is handed over in a thread-local :class:`StepContext` (only the engine's model thread
runs forward passes). The output-embedding pre-hook keeps only the rows whose logits are needed, so a
prompt chunk does not pay for the vocabulary projection of every token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

ATTENTION_NAME = "retroformer_varlen"
_local = threading.local()


@dataclass
class Segment:
    kv: Any  # the sequence's buffer: [layers, 2, kv_heads, capacity, head_dim]; None for padding rows
    start: int  # first row of this sequence's tokens in the flattened batch
    count: int  # new tokens this step
    past: int  # positions already in the buffer
    mask: Any = None  # [count, past + count] bool, built once per step (None: attend to everything)


@dataclass
class StepContext:
    segments: list[Segment]
    logit_rows: Any = None  # LongTensor of the rows whose logits are wanted (None: all)


def current() -> StepContext | None:
    return getattr(_local, "step", None)


class use_step:
    """``with use_step(ctx): model(...)`` makes ``ctx`` visible to the attention function and the head hook."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx

    def __enter__(self) -> StepContext:
        _local.step = self.ctx
        return self.ctx

    def __exit__(self, *exc: Any) -> None:
        _local.step = None


def causal_mask(count: int, past: int, window: int | None, device: Any) -> Any:
    """Boolean mask ``[count, past + count]``: query i (position past+i) sees keys j <= past+i (and, with a
    sliding window, j > past+i-window). None when every query may see every key."""
    import torch

    if count == 1 and (window is None or past + 1 <= window):
        return None
    mask = torch.ones(count, past + count, dtype=torch.bool, device=device).tril(past)
    if window is not None:
        mask &= ~torch.ones(count, past + count, dtype=torch.bool, device=device).tril(past - window)
    return mask


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                     dropout: float = 0.0, sliding_window: int | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: ``query`` ``[T, heads, 1, d]``, ``key``/``value`` ``[T, kv_heads, 1, d]``
    (RoPE already applied); returns ``[T, 1, heads, d]``."""
    ctx = current()
    if ctx is None:
        raise RuntimeError("retroformer's varlen attention runs only inside the engine (no step context)")
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise RuntimeError("this model's attention (logit soft-capping or sinks) is not supported by the engine")
    return attend_segments(module.layer_idx, query, key, value, ctx.segments, scaling, sliding_window), None


def attend_segments(layer: int, query: Any, key: Any, value: Any, segments: list[Segment], scaling: float | None,
                    sliding_window: int | None = None) -> Any:
    """:func:`varlen_attention` for ``segments`` only (their rows of ``query``/``key``/``value``, the whole pass's
    ``[T, heads, 1, d]`` tensors): ``[their rows, 1, heads, d]``, in segment order."""
    import torch
    import torch.nn.functional as F

    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    gqa = heads != kv_heads
    # Few operators per sequence (a decode step runs this for every sequence in every layer): the new keys and
    # values of all rows side by side once, each sequence's written with one copy, the outputs joined once.
    new_kv = torch.stack((key[:, :, 0], value[:, :, 0]), dim=1)  # [rows, 2, kv_heads, dim]
    queries = query[:, :, 0]
    outs = []
    for seg in segments:
        a, n, past = seg.start, seg.count, seg.past
        if seg.kv is None:  # padding rows: no sequence, nothing to attend to
            outs.append(query.new_zeros(n, heads, dim))
            continue
        buf = seg.kv[layer]
        buf[:, :, past:past + n] = new_kv[a:a + n].permute(1, 2, 0, 3)
        lo, mask = 0, seg.mask
        if sliding_window is not None and past + n > sliding_window:  # this layer sees only the last keys
            if n == 1:
                lo = past + 1 - sliding_window
            else:
                mask = causal_mask(n, past, sliding_window, query.device)
        seen = buf[:, :, lo:past + n]
        o = F.scaled_dot_product_attention(queries[a:a + n].transpose(0, 1).unsqueeze(0), seen[0:1], seen[1:2],
                                           attn_mask=mask, scale=scaling, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.unsqueeze(1)


def keep_logit_rows(_module: Any, args: tuple) -> tuple | None:
    """Forward pre-hook on the output embeddings: project only the rows the engine will sample from."""
    ctx = current()
    if ctx is None or ctx.logit_rows is None:
        return None
    return (args[0][ctx.logit_rows], *args[1:])


_registered = False
_lock = threading.Lock()


def register() -> str:
    """Register the attention function with transformers (once per process); returns its name."""
    global _registered
    with _lock:
        if not _registered:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTENTION_NAME, varlen_attention)
            _registered = True
    return ATTENTION_NAME
