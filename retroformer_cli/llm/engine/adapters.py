"""LoRA adapters over the engine's base model: loading and unloading with PEFT, each adapter's prefix-cache
namespace, and which model object runs a step's rows (base only, one adapter, or a mixed-adapter batch).

Everything here runs on the engine's model thread.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from retroformer_cli.errors import BackendError
from retroformer_cli.llm.engine.requests import next_id
from retroformer_cli.llm.engine.types import AdapterNotLoaded

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def safe_adapter_name(label: str, key: str | bytes | None = None) -> str:
    """An engine (peft) adapter name for ``label``: ``lora_<label as [A-Za-z0-9_]>_<hash of key>``.

    peft and torch refuse module names holding ``.`` (and a path is full of them), so a folder or a served name
    never becomes an adapter name as it is. The hash (of ``key``, default ``label``) keeps two labels that
    sanitize alike apart; the ``lora_`` prefix keeps the name off peft's reserved ``__base__``.
    """
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode("ascii")
    stem = _UNSAFE.sub("_", ascii_label).strip("_")[:40] or "adapter"
    raw = key if key is not None else label
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return f"lora_{stem}_{hashlib.sha256(data).hexdigest()[:12]}"


def adapter_name_for(path: str | os.PathLike[str]) -> str:
    """The adapter name a LoRA folder loads under: its basename made safe plus a hash of its resolved path (the
    same folder always gets the same name; two folders with one basename get different ones)."""
    resolved = Path(path).expanduser().resolve()
    return safe_adapter_name(resolved.name or "adapter", os.fsencode(str(resolved)))


class Adapters:
    def __init__(self) -> None:
        self.paths: dict[str, str] = {}  # name -> folder, as loaded
        self.labels: dict[str, str] = {}  # name -> what its user calls it (serve's model name; default: name)
        self.namespaces: dict[str | None, bytes] = {}  # prefix-cache namespace per adapter (None: the base)
        self.base: Any = None
        self.peft: Any = None
        self.mixed = True  # mixed-adapter batches (off once peft refuses one)
        self.separate_base = False  # base rows never share a pass with adapter rows (see group)
        self._active: str | None = None
        self._rr = 0

    def attach(self, base_model: Any, namespace: bytes, separate_base: bool = False) -> None:
        self.base = base_model
        self.namespaces[None] = namespace
        self.separate_base = separate_base

    def load(self, name: str, path: str, model_name: str, label: str | None = None) -> None:
        label = label or name
        if name in self.paths or name == BASE_ADAPTER:
            raise BackendError(f"The LoRA adapter '{label}' is already loaded.")
        import warnings

        try:
            with warnings.catch_warnings():  # peft's own deprecation notices are not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                else:
                    self.peft.load_adapter(path, adapter_name=name)
            self.peft.eval()
        except Exception as exc:  # peft raises many kinds (shape mismatch, bad config, ...)
            raise BackendError(f"Cannot load the LoRA adapter '{label}' from {path} on {model_name}: {exc}") from exc
        self._active = None
        self.paths[name] = path
        self.labels[name] = label
        self.namespaces[name] = f"{self.namespaces[None].decode()}|lora:{name}:{next_id()}".encode()

    def forget(self, name: str) -> None:
        """First half of an unload: no new request may use ``name`` (raises if it is not loaded)."""
        if name not in self.paths:
            raise AdapterNotLoaded(f"The LoRA adapter '{name}' is not loaded.")
        del self.paths[name]
        self.labels.pop(name, None)

    def remove(self, name: str) -> bytes:
        """Second half of an unload (after its requests failed): remove the LoRA layers; returns the adapter's
        prefix-cache namespace for the caller to drop."""
        namespace = self.namespaces.pop(name)
        if len(self.peft.peft_config) <= 1:
            self.base = self.peft.unload()  # removes the LoRA layers, returns the untouched base model
            self.peft = None
        else:
            self.peft.delete_adapter(name)
        self._active = None
        return namespace

    def group(self, running_adapters: Iterable[str | None]) -> tuple[str | None, ...] | None:
        """The adapters whose sequences run this step (None: every running one), taking turns (round robin):
        one adapter at a time with mixed-adapter batches off; with ``separate_base`` (``--weights hybrid``, whose
        base decode rows run on the GGUF blocks while PEFT's run on the fp32 weights), the base model's sequences
        and the adapters' in turns, so a base sequence's numbers never depend on an adapter request beside it."""
        present = list(dict.fromkeys(running_adapters))
        if not present or self.peft is None:
            return None
        self._rr += 1
        if not self.mixed:
            return (present[self._rr % len(present)],)
        if not self.separate_base or None not in present or len(present) == 1:
            return None
        return (None,) if self._rr % 2 else tuple(a for a in present if a is not None)

    def select(self, names: list[str | None], kwargs: dict[str, Any]) -> Any:
        """The model to call for rows of adapters ``names`` (adds peft's ``adapter_names`` to ``kwargs`` for a
        mixed batch)."""
        if self.peft is None:
            return self.base
        distinct = set(names)
        if distinct == {None}:
            return _BaseOnly(self.peft)
        if len(distinct) == 1:
            name = names[0]
            if self._active != name:
                self.peft.set_adapter(name)
                self._active = name
            return self.peft
        kwargs["adapter_names"] = [BASE_ADAPTER if n is None else n for n in names]
        return self.peft


class _BaseOnly:
    """Call a peft model with its adapters disabled (a batch of base-model rows only)."""

    def __init__(self, peft_model: Any):
        self.peft = peft_model

    def __call__(self, **kwargs: Any) -> Any:
        with self.peft.disable_adapter():
            return self.peft(**kwargs)
