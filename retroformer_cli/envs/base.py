"""The environment contract: Gymnasium's ``reset``/``step`` shape with text observations and actions.

``reset(seed=None, options={"task_id": ...}) -> (observation, info)``
``step(action) -> (observation, reward, terminated, truncated, info)``

``info`` always holds ``task_id`` and ``instruction``; at the end of an episode also ``success``
(bool) and ``score`` (float, the episode return used as G_k).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class TextEnv(Protocol):
    env_id: str
    max_steps: int

    def task_ids(self) -> Sequence[str]: ...

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]: ...

    def close(self) -> None: ...
