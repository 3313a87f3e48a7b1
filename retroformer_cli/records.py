"""Typed, versioned records written to the workspace as JSON lines.

One :class:`Trial` per line: attempt ``trial`` (1-based) at task ``task_id`` in run ``run_id``.
``schema_version`` lets later versions upgrade old lines through :data:`UPGRADES`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from retroformer_cli.errors import DataError

SCHEMA_VERSION = 1


@dataclass
class Step:
    thought: str
    action: str
    observation: str
    reward: float = 0.0
    valid: bool = True  # False when the model's output held no parsable action
    raw: str = ""  # the exact model output for this step
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cached_tokens: int = 0  # prompt tokens reused from the backend's prefix cache (not computed again)
    min_margin: float | None = None  # local greedy decoding: smallest top-1/top-2 logit gap of this step


@dataclass
class Reflection:
    """A reflection written after a failed trial, with the exact prompt the reflector saw."""

    text: str
    prompt: list[dict[str, str]]  # chat messages [{"role", "content"}]
    model_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    cached_tokens: int = 0
    truncated_scratchpad: bool = False  # the trajectory was too long for the reflector: its start was cut


@dataclass
class Trial:
    run_id: str
    env_id: str
    task_id: str
    trial: int
    instruction: str
    steps: list[Step]
    success: bool
    score: float  # the episode return G_k
    terminated: bool
    truncated: bool
    memory: list[str]  # reflections the actor saw in this trial
    reflection: Reflection | None
    actor_model_id: str
    reflector_model_id: str | None
    actor_prompt: list[dict[str, str]]  # the actor's messages at step 1 (later steps append the scratchpad)
    info: dict[str, Any] = field(default_factory=dict)  # env end-of-episode info (em, f1, answer ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, how many the backend reused from its prefix cache
    env_error: str | None = None  # the env failed (crashed, hung, raised) on every attempt: not the agent's failure
    env_attempts: int = 1  # episodes played for this trial (more than 1 when the env failed and it was replayed)
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0
    kind: str = "trial"
    schema_version: int = SCHEMA_VERSION

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.trial)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Trial":
        data = upgrade(dict(data))
        try:
            steps = [Step(**s) for s in data.pop("steps")]
            refl = data.pop("reflection")
            reflection = Reflection(**refl) if refl else None
            return cls(steps=steps, reflection=reflection, **data)
        except (TypeError, KeyError) as e:
            raise DataError(f"Trial record does not match schema {SCHEMA_VERSION}: {e}.") from None


# schema_version N -> function upgrading a line of version N to N+1
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    version = data.get("schema_version", 1)
    if version > SCHEMA_VERSION:
        raise DataError(
            f"Record has schema_version {version}, newer than this retroformer understands ({SCHEMA_VERSION}).",
            hint="upgrade retroformer-cli",
        )
    while version < SCHEMA_VERSION:
        data = UPGRADES[version](data)
        version += 1
        data["schema_version"] = version
    return data
