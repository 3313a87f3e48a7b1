"""Faster linear layers on CPU: weights pre-packed once for oneDNN.

Decoding a small model on CPU is bound by reading the weights. Over the embedded model's layer shapes, PyTorch's
fp32 ``F.linear`` takes 1.4-2.4x longer for 2-16 rows than for one, while oneDNN with the weights reordered
once takes about as long for 8 rows as for one (``benchmarks/cpu_linear.py``, docs/benchmarks.md). Its
results also do not depend on how many rows a call has, so a sequence decodes to the same numbers alone or in
any batch.

Each ``nn.Linear`` becomes a :class:`PackedLinear`: the same module with the packed copy of its weight; the
original weight is replaced by a zero-stride placeholder of the same shape, dtype and device, so the model takes
no more memory and PEFT (which reads the base layer's shape, dtype and device to place LoRA weights) keeps
working. An output layer tied to the input embeddings keeps its weight (the embedding lookup reads it) and
gains the packed copy: the one extra copy is worth it, as PyTorch's GEMM over the vocabulary costs ~3x the
packed one for 8 rows. The engine's model is never saved or merged.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("retroformer.engine")


def _linear_cls() -> Any:
    import torch

    class PackedLinear(torch.nn.Linear):
        """``nn.Linear`` computing with a oneDNN-packed weight (``_packed``)."""

        def forward(self, x: Any) -> Any:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

        compute = forward  # the lean forward pass calls the computation without nn.Module's __call__

    return PackedLinear


_PACKED: Any = None


def available(dtype: Any) -> bool:
    """oneDNN present and exact enough on this machine for ``dtype`` (checked on a small random layer)."""
    import torch

    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(64, 48, generator=gen).to(dtype)
        x = torch.randn(3, 48, generator=gen).to(dtype)
        got = ops._linear_pointwise(x, ops._reorder_linear_weight(w, None), None, "none", [], "")
        ref = torch.nn.functional.linear(x.float(), w.float())
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return bool(((got.float() - ref).abs().max() / ref.abs().max()).item() < tol)
    except Exception:  # an op missing or refusing on this build
        return False


def release_pages(tensor: Any) -> None:
    """Give back the memory pages that lie wholly inside ``tensor``'s data, which nothing reads again.

    transformers memory-maps safetensors checkpoints; the pages of a weight read once for packing would stay
    resident (and count towards the process's memory) until the whole mapping goes. ``madvise(MADV_DONTNEED)``
    drops them now: a file-backed page is simply re-read if ever touched, an anonymous one reads as zeros. Only
    whole pages inside the tensor are given back, never a neighbour's. Linux only; elsewhere a no-op."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux") or tensor.device.type != "cpu":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def pack_linear_layers(model: Any) -> int:
    """Pack every eligible ``nn.Linear`` of ``model`` in place; returns how many were packed (0: unavailable)."""
    global _PACKED
    import torch

    dtype = next(model.parameters()).dtype
    if next(model.parameters()).device.type != "cpu" or not available(dtype):
        return 0
    if _PACKED is None:
        _PACKED = _linear_cls()
    embed = model.get_input_embeddings()
    tied = getattr(embed, "weight", None)
    count = 0
    with torch.no_grad():
        for module in list(model.modules()):
            if type(module) is not torch.nn.Linear or module.weight.dtype != dtype:
                continue
            original = module.weight.detach()
            packed = torch.ops.mkldnn._reorder_linear_weight(original, None)
            module.__class__ = _PACKED
            module._packed = packed
            if module.weight is not tied:
                placeholder = torch.zeros((), dtype=dtype).expand(module.out_features, module.in_features)
                module.weight = torch.nn.Parameter(placeholder, requires_grad=False)
                release_pages(original)  # else the checkpoint's mapped pages stay resident beside the packed copy
            del original
            count += 1
        # The remaining tensors (embeddings, norms) may still view the memory-mapped checkpoint file, which keeps
        # every page of it that packing read resident: copy them so the mapping is released.
        for param in model.parameters():
            if param.stride() != (0,) * param.dim():
                param.data = param.data.clone()
        for _name, buf in model.named_buffers():
            buf.data = buf.data.clone()
    # No gc.collect() here: the replaced weights go by reference counting (same resident memory without it), and
    # a full collection over transformers' and torch's objects cost 0.2-0.5 s of every start.
    log.debug("packed %d linear layers for oneDNN", count)
    return count
