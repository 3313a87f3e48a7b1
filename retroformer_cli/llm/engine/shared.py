"""One engine per base model and settings in a process, shared by every in-process client.

``--actor embedded --reflector workspace:ppo/r1`` thus runs one copy of the embedded weights with the
reflector's LoRA adapter loaded beside it (mixed-adapter batches), and both roles share one scheduler, one
model thread and one prefix cache.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from retroformer_cli.llm.engine.scheduler import Engine
from retroformer_cli.llm.engine.types import EngineConfig

_lock = threading.Lock()
_engines: dict[tuple, Engine] = {}
_adapter_lock = threading.Lock()


def _key(config: EngineConfig) -> tuple:
    fields = dataclasses.asdict(config)
    if config.model != "embedded":
        fields["model"] = str(Path(config.model).expanduser().resolve())
    else:
        fields["model"] = f"embedded@{Path(config.cache_dir or '').expanduser().resolve()}"
    fields.pop("cache_dir")
    return tuple(sorted(fields.items()))


def shared_engine(config: EngineConfig) -> Engine:
    """The process's engine for ``config`` (created, not yet loaded, on first use)."""
    key = _key(config)
    with _lock:
        engine = _engines.get(key)
        if engine is None or engine.closing:
            engine = _engines[key] = Engine(config)
        return engine


def ensure_adapter(engine: Engine, name: str, path: str) -> None:
    """Load adapter ``path`` as ``name`` on ``engine`` unless it is there already (blocking)."""
    with _adapter_lock:
        engine.wait_ready()
        if name not in engine.adapters:
            engine.load_adapter(name, path)
