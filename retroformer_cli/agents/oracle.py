"""Diagnostic oracle reflectors: ``--reflector oracle`` and ``--reflector oracle-leak``.

They call no model. After a failed trial they write, from the task's gold data, the reflection a perfect
reflector could write; each env provides those texts through ``EnvSpec.oracle`` (``(env, task_id) -> (hint,
leak)``):

* ``oracle`` — a plan that does not give the answer away (HotPotQA: the supporting pages to search; WebShop: the
  goal's attributes, options and price bound; ALFWorld: the places the expert walkthrough visits). Its success
  is the headroom a reflector could bring to this actor.
* ``oracle-leak`` — states the answer (HotPotQA's answer, WebShop's product, ALFWorld's walkthrough actions): the
  actor's ceiling, i.e. whether it follows an instruction at all.

Runs with an oracle reflector are diagnostics: the manifest says ``"diagnostic": "oracle"`` (or
``"oracle-leak"``), ``eval`` and ``report`` label them, and ``datasets build`` refuses them as training data.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

from retroformer_cli.errors import UsageError
from retroformer_cli.records import Reflection

ORACLE_SPECS = ("oracle", "oracle-leak")
_ABOUT = {
    "oracle": "diagnostic: reflections written from the task's gold data without giving the answer away "
              "(the headroom a reflector could bring); no model is called",
    "oracle-leak": "diagnostic: reflections that state the answer (the actor's ceiling: does it follow an "
                   "instruction?); no model is called",
}


def diagnostic_of(manifest: Mapping[str, Any]) -> str | None:
    """``"oracle"``/``"oracle-leak"`` for a diagnostic run's manifest, else None."""
    label = manifest.get("diagnostic")
    if label:
        return str(label)
    reflector = (manifest.get("models") or {}).get("reflector") or {}
    label = reflector.get("diagnostic") or reflector.get("model_id")
    return str(label) if label in ORACLE_SPECS else None


def diagnostic_trials(trials: Sequence[Any]) -> str | None:
    """The oracle that wrote a reflection among ``trials`` (a manifest may be lost in a copy), else None."""
    for t in trials:
        if t.reflection is not None and t.reflection.model_id in ORACLE_SPECS:
            return t.reflection.model_id
    return None


class OracleReflector:
    """A reflector that writes from the gold data of the env it is bound to (:meth:`bind`)."""

    diagnostic = True

    def __init__(self, leak: bool = False):
        self.leak = bool(leak)
        self.model_id = "oracle-leak" if self.leak else "oracle"
        self._hints: Any = None
        self._env: Any = None

    def describe(self) -> dict[str, Any]:
        return {"backend": "oracle", "model_id": self.model_id, "diagnostic": self.model_id,
                "description": _ABOUT[self.model_id]}

    def bind(self, env: Any, spec: Any = None) -> None:
        """Read gold hints from ``env`` (its spec's ``oracle`` function); a UsageError if the env has none."""
        from retroformer_cli.envs import spec_of
        from retroformer_cli.plugins import load_ref

        spec = spec if spec is not None else spec_of(env)
        if spec is None or not spec.oracle:
            name = spec.name if spec is not None else type(env).__name__
            raise UsageError(f"The {name} environment declares no oracle hints (EnvSpec.oracle), so "
                             f"--reflector {self.model_id} cannot run on it.")
        self._hints = load_ref(spec.oracle, f"oracle hints of the {spec.name} environment")
        self._env = env

    def reflection(self, task_id: str) -> Reflection:
        """The reflection after a failed trial of ``task_id``: a Reflection record with zero tokens."""
        if self._hints is None:
            raise UsageError(f"The {self.model_id} reflector is not bound to an environment: call bind(env) "
                             "first (collect does).")
        t0 = time.perf_counter()
        hint, leak = self._hints(self._env, task_id)
        return Reflection(text=leak if self.leak else hint,
                          prompt=[{"role": "system", "content": f"{self.model_id} ({_ABOUT[self.model_id]})"}],
                          model_id=self.model_id, latency_ms=round((time.perf_counter() - t0) * 1000, 2))

    async def agenerate(self, messages: Any, config: Any) -> Any:
        raise UsageError(f"The {self.model_id} reflector writes from the gold data and generates no text; "
                         "it can only be the reflector (--reflector).")

    async def aclose(self) -> None:
        self._env = None


__all__ = ["ORACLE_SPECS", "OracleReflector", "diagnostic_of", "diagnostic_trials"]
