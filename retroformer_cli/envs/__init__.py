"""Environment registry: ``make("hotpotqa", data=..., max_steps=...)`` and each env's :class:`EnvSpec`.

Every env declares one ``EnvSpec`` (name, versioned id, ``"module:factory"`` entry point, prompt set, default step
limit, protocol split, capabilities). Built-in envs declare it as a module-level ``SPEC = EnvSpec(...)`` in their
module (``envs/<name>.py``) or package ``__init__`` (``envs/<name>/__init__.py``); third-party packages through
the ``retroformer.envs`` entry point group (:mod:`retroformer_cli.plugins`). ``collect``, the actor and ``eval``
read the spec instead of probing env objects; registering imports no env class.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from retroformer_cli.envs.spec import EnvSpec
from retroformer_cli.errors import UsageError, did_you_mean
from retroformer_cli.plugins import ENV_GROUP, Registry, load_ref

__all__ = ["EnvSpec", "canonical_name", "get_spec", "list_envs", "make", "make_for", "prompts_for", "protocol_split",
           "register", "spec_of", "specs"]

_DECLARES_SPEC = re.compile(r"^SPEC\s*(?::\s*EnvSpec\s*)?=\s*EnvSpec\(", re.MULTILINE)


def _builtin_specs() -> list[EnvSpec]:
    """Modules and packages of this folder that declare ``SPEC = EnvSpec(...)``; only those are imported."""
    import pkgutil

    here = Path(__file__).resolve().parent
    found = []
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda i: i.name):
        source = here / info.name / "__init__.py" if info.ispkg else here / f"{info.name}.py"
        try:
            text = source.read_text(encoding="utf-8")
        except OSError:
            continue
        if _DECLARES_SPEC.search(text):
            found.append(importlib.import_module(f"{__name__}.{info.name}").SPEC)
    return found


_REGISTRY = Registry(ENV_GROUP, EnvSpec, _builtin_specs, lambda spec: spec.names())


def register(spec: EnvSpec, replace: bool = False) -> None:
    """Add an env at run time (plugins use the ``retroformer.envs`` entry point group instead)."""
    _REGISTRY.register(spec, replace=replace)


def specs() -> list[EnvSpec]:
    return sorted(_REGISTRY.specs().values(), key=lambda s: s.name)


def list_envs() -> list[str]:
    return [s.name for s in specs()]


def get_spec(name: str) -> EnvSpec:
    spec = _REGISTRY.lookup(str(name).lower())
    if spec is None:
        note = ""
        if _REGISTRY.broken:
            note = " (plugins that failed to load: " + ", ".join(
                f"{k}: {v}" for k, v in sorted(_REGISTRY.broken.items())) + ")"
        raise UsageError(f"Unknown environment '{name}' (--env): {did_you_mean(name, list_envs())}{note}.")
    return spec


def canonical_name(name: str) -> str:
    return get_spec(name).name


def spec_of(env: Any) -> EnvSpec | None:
    """The spec of a built env (by its ``env_id``); None for an object no spec describes (test doubles)."""
    env_id = getattr(env, "env_id", None)
    return _REGISTRY.lookup(env_id.lower()) if isinstance(env_id, str) else None


def protocol_split(name: str) -> str:
    """The split `retroformer eval --env` collects on: ``all`` where the data folder already is the papers'
    evaluation games (ALFWorld's valid_unseen), else our deterministic ``eval`` split."""
    return get_spec(name).protocol_split


def prompts_for(name: str) -> Any:
    """The env's PromptSet, named by its spec (``EnvSpec.prompts``)."""
    spec = get_spec(name)
    return load_ref(spec.prompts, f"prompt set of the {spec.name} environment")


def make(name: str, *, data: Any = None, max_steps: int | None = None, cache_dir: Any = None,
         options: dict[str, Any] | None = None, **more_options: Any) -> Any:
    """The one env factory: build ``name`` with its ``data``, step limit and spec ``options`` (a dict, or
    keywords), check that every option is one the spec declares, and check the built env keeps its contract.

    ``cache_dir`` reaches only envs whose spec keeps indexes there (``EnvSpec.cache_dir``); others ignore it.
    ``collect``, ``eval --env``, ``ppo``'s replays, the env server, Gymnasium and TRL all build envs here.
    """
    from retroformer_cli.envs.base import check_contract

    spec = get_spec(name)
    given = {**(options or {}), **more_options}
    unknown = sorted(k for k in given if k not in spec.options)
    if unknown:
        takes = ", ".join(sorted(spec.options)) or "none"
        raise UsageError(f"The {spec.name} environment has no option '{unknown[0]}' (--env-option / "
                         f"env_options; its options: {takes}).")
    kwargs: dict[str, Any] = dict(given)
    if data is not None:  # unset: the factory's default (its sample data)
        kwargs["data"] = data
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    if cache_dir is not None and spec.cache_dir:  # envs with indexes cache them in the workspace
        kwargs["cache_dir"] = cache_dir
    env = load_ref(spec.entry_point, f"entry point of the {spec.name} environment")(**kwargs)
    check_contract(env, spec)
    return env


def make_for(cfg: Any, cache_dir: Any = None) -> Any:
    """:func:`make` with a run config's env fields (``env``, ``data``, ``max_steps``, ``env_options``)."""
    return make(cfg.env, data=cfg.data, max_steps=cfg.max_steps, cache_dir=cache_dir,
                options=dict(cfg.env_options or {}))
