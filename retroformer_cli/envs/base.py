"""The environment contract: Gymnasium's ``reset``/``step`` shape with text observations and actions.

``reset(seed=None, options={"task_id": ...}) -> (observation, info)``
``step(action) -> (observation, reward, terminated, truncated, info)``

``info`` always holds ``task_id`` and ``instruction``; at the end of an episode also ``success``
(bool) and ``score`` (float, the episode return used as G_k).

:func:`check_contract` holds an env to this protocol and to what its :class:`EnvSpec` promises; the registry
runs it on every env it makes (``envs.make``), so a plugin env that breaks it fails at once with one sentence.
:func:`check_factory` checks the spec against the factory's signature (tests run it over every registered env).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from retroformer_cli.errors import DataError, RetroformerError

if TYPE_CHECKING:
    from retroformer_cli.envs.spec import EnvSpec


class EnvContractError(RetroformerError):
    """An environment does not keep the TextEnv contract or its EnvSpec (a bug in that env, not the user's)."""


@runtime_checkable
class TextEnv(Protocol):
    env_id: str  # the EnvSpec name
    max_steps: int

    def task_ids(self) -> Sequence[str]: ...

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]: ...

    def close(self) -> None: ...


@runtime_checkable
class SpawningTextEnv(TextEnv, Protocol):
    """``EnvSpec.spawn``: a twin over the same loaded data (one per concurrent episode)."""

    def spawn(self) -> "TextEnv": ...


@runtime_checkable
class AsyncTextEnv(TextEnv, Protocol):
    """``EnvSpec.asynchronous``: coroutine versions of reset and step for engines that must not block the loop."""

    async def areset(self, *, seed: int | None = None,
                     options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]: ...

    async def astep(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]: ...


def check_can_step(started: bool, done: bool) -> None:
    """What every env's ``step`` checks first: an episode has been reset and has not ended."""
    if not started:
        raise RuntimeError("no episode has started; call reset()")
    if done:
        raise RuntimeError("episode is over; call reset()")


def _missing(env: Any, protocol: type) -> list[str]:
    members = [m for m in protocol.__dict__.get("__annotations__", {})] + \
              [m for m, v in protocol.__dict__.items() if callable(v) and not m.startswith("_")]
    return [m for m in members if not hasattr(env, m)]


def check_contract(env: Any, spec: "EnvSpec") -> None:
    """Raise :class:`EnvContractError` naming every way ``env`` breaks the protocol or its spec."""
    problems = [f"has no '{m}'" for m in _missing(env, TextEnv)]
    if not problems and env.env_id != spec.name:
        problems.append(f"says env_id={env.env_id!r}, not its spec name {spec.name!r}")
    if spec.spawn and not isinstance(env, SpawningTextEnv):
        problems.append("declares spawn=True but has no spawn()")
    if spec.asynchronous:
        for name in [m for m, v in vars(AsyncTextEnv).items() if inspect.iscoroutinefunction(v)]:
            if not inspect.iscoroutinefunction(getattr(env, name, None)):
                problems.append(f"declares asynchronous=True but {name}() is not a coroutine function")
    if problems:
        raise EnvContractError(f"The {spec.name} environment ({type(env).__name__}) breaks its contract: "
                               + "; ".join(problems) + ".")


def check_factory(spec: "EnvSpec") -> None:
    """The spec's factory takes ``data``, ``max_steps``, every declared option and ``cache_dir`` when declared."""
    from retroformer_cli.plugins import load_ref

    factory = load_ref(spec.entry_point, f"entry point of the {spec.name} environment")
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    wanted = ("data", "max_steps", *spec.options, *(("cache_dir",) if spec.cache_dir else ()))
    missing = [k for k in wanted if k not in params]
    if missing:
        raise EnvContractError(f"The {spec.name} environment's factory {spec.entry_point} takes no "
                               + ", ".join(repr(k) for k in missing) + " (declared by its EnvSpec).")


def data_or_sample(data: str | Path | None, sample: Path, label: str) -> Path:
    """``data`` as a path, or the env's bundled made-up sample data when no data was given."""
    if data is not None:
        return Path(data)
    if not sample.is_dir():
        raise DataError(f"The bundled {label} sample data {sample} is missing; pass a data path.")
    return sample
