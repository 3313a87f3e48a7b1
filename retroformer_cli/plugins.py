"""Third-party environments and backends through entry points (``importlib.metadata``), loaded lazily, once.

A package adds to the env and backend registries by declaring, in its ``pyproject.toml``::

    [project.entry-points."retroformer.envs"]
    myenv = "my_package:ENV_SPEC"          # an EnvSpec, a sequence of them, or a callable returning either

    [project.entry-points."retroformer.backends"]
    mybackend = "my_package:BACKEND_SPEC"  # a BackendSpec, a sequence of them, or a callable returning either

The object an entry point names should live in a light module: its env class and client factory are
``"module:attribute"`` strings imported only when used. A plugin that fails to load costs one warning line on
stderr; the rest of the registry keeps working, and asking for a name it would have provided says why it is missing.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from retroformer_cli.errors import UsageError, missing_extra

ENV_GROUP = "retroformer.envs"
BACKEND_GROUP = "retroformer.backends"


def load_ref(ref: str, what: str) -> Any:
    """Import ``"module:attr.sub"`` and return the object; one clear UsageError when it is not there."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as exc:
        raise missing_extra(exc) or UsageError(f"Cannot import {what} '{ref}': {exc}.") from None
    except AttributeError:
        raise UsageError(f"{what[0].upper()}{what[1:]} '{ref}' does not exist "
                         f"('{module_name}' has no '{attr}').") from None
    return obj


def _warn(message: str) -> None:
    from retroformer_cli.console import warning  # rich loads only when a plugin is broken, not with every registry

    warning(message)


def load_group(group: str, kind: type) -> tuple[list[Any], dict[str, str]]:
    """Load every entry point of ``group``; return the ``kind`` objects they declare and, per broken entry
    point name, why it was skipped (each also printed as one warning line)."""
    from importlib.metadata import entry_points

    found: list[Any] = []
    broken: dict[str, str] = {}
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        try:
            objs = _as_specs(ep.load(), kind)
        except Exception as exc:  # noqa: BLE001 - any plugin bug is that plugin's, never ours
            reason = f"{type(exc).__name__}: {exc}"
            broken[ep.name] = reason
            _warn(f"skipped the {group} plugin '{ep.name}' ({ep.value}, from {dist}): {reason}")
            continue
        found.extend(objs)
    return found, broken


def _as_specs(obj: Any, kind: type) -> list[Any]:
    if callable(obj) and not isinstance(obj, kind):
        obj = obj()
    items = [obj] if isinstance(obj, kind) else list(obj) if isinstance(obj, (list, tuple)) else None
    if items is None or not all(isinstance(i, kind) for i in items):
        raise TypeError(f"expected a {kind.__name__} (or a list of them), got {type(obj).__name__}")
    return items


class Registry:
    """Name -> spec with built-ins and entry-point plugins, filled on first use. ``names(spec)`` gives the
    lower-case keys a spec answers to (its name first)."""

    def __init__(self, group: str, kind: type, builtins: Callable[[], list[Any]],
                 names: Callable[[Any], tuple[str, ...]]):
        self.group, self.kind, self._builtins, self._names = group, kind, builtins, names
        self._specs: dict[str, Any] | None = None
        self._index: dict[str, str] = {}
        self.broken: dict[str, str] = {}

    def specs(self) -> dict[str, Any]:
        if self._specs is None:
            self._specs = {}
            for spec in self._builtins():
                self._add(spec, replace=False)
            plugins, self.broken = load_group(self.group, self.kind)
            for spec in plugins:
                try:
                    self._add(spec, replace=False)
                except ValueError as exc:
                    self.broken[spec.name] = str(exc)
                    _warn(f"skipped the {self.group} plugin '{spec.name}': {exc}")
        return self._specs

    def register(self, spec: Any, replace: bool = False) -> None:
        if not isinstance(spec, self.kind):
            raise TypeError(f"expected a {self.kind.__name__}, got {type(spec).__name__}")
        self.specs()
        self._add(spec, replace)

    def _add(self, spec: Any, replace: bool) -> None:
        assert self._specs is not None
        if replace:
            self.unregister(spec.name)
        taken = [k for k in self._names(spec) if k in self._index]
        if taken:
            raise ValueError(f"the name '{taken[0]}' is already registered (by '{self._index[taken[0]]}')")
        self._specs[spec.name] = spec
        for key in self._names(spec):
            self._index[key] = spec.name

    def unregister(self, name: str) -> None:
        if self._specs is not None:
            self._specs.pop(name, None)
        self._index = {k: v for k, v in self._index.items() if v != name}

    def lookup(self, key: str) -> Any | None:
        specs = self.specs()
        name = self._index.get(key)
        return specs.get(name) if name is not None else None

    def reset(self) -> None:
        """Forget everything; the next use loads built-ins and plugins again (tests)."""
        self._specs, self._index, self.broken = None, {}, {}
