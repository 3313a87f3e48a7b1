"""Environment registry: ``make("hotpotqa", data=..., max_steps=...)``.

Names are short (``hotpotqa``) with versioned aliases (``HotPotQA-v0``). Entry points are
``"module:factory"`` strings so that registering an env imports nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from retroformer_cli.errors import UsageError, did_you_mean

_REGISTRY: dict[str, str] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, entry_point: str, aliases: tuple[str, ...] = ()) -> None:
    _REGISTRY[name] = entry_point
    for a in aliases:
        _ALIASES[a.lower()] = name


def canonical_name(name: str) -> str:
    key = name.lower()
    if key in _REGISTRY:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise UsageError(f"Unknown environment '{name}' (--env): {did_you_mean(name, list(_REGISTRY))}.")


def list_envs() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> Any:
    module_name, factory = _REGISTRY[canonical_name(name)].split(":")
    return getattr(importlib.import_module(module_name), factory)


def accepts(name: str, keyword: str) -> bool:
    """Whether the env's constructor takes ``keyword`` (e.g. ``cache_dir`` for envs with indexes)."""
    import inspect

    return keyword in inspect.signature(_factory(name)).parameters


def protocol_split(name: str) -> str:
    """The split `retroformer eval --env` collects on: the env's ``protocol_split`` (ALFWorld's data folder is
    already the evaluation games: ``all``), else our deterministic ``eval`` split."""
    return getattr(_factory(name), "protocol_split", "eval")


def make(name: str, **kwargs: Any):
    return _factory(name)(**kwargs)


register("hotpotqa", "retroformer_cli.envs.hotpotqa:HotPotQAEnv", aliases=("HotPotQA-v0",))
register("alfworld", "retroformer_cli.envs.alfworld:ALFWorldEnv", aliases=("ALFWorld-v0",))
register("webshop", "retroformer_cli.envs.webshop.env:WebShopEnv", aliases=("WebShop-v0",))
