"""What the training stages return: the checkpoint they wrote, their metrics and (RL stages) the log history."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class JsonResult:
    """``to_json``: the dataclass fields, paths as strings (what ``--json`` prints)."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v for f in fields(self)}


@dataclass
class TrainResult(JsonResult):
    """A finished `retroformer sft` / `reward` run: ``path`` is ``<checkpoints>/<stage>/<name>/``."""

    stage: str
    name: str
    path: Path
    metrics: dict[str, Any]


@dataclass
class RLResult(JsonResult):
    """A finished GRPO run: steps, wall time, metrics and every logged step."""

    name: str
    path: Path
    steps: int
    seconds: float
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]


@dataclass
class PPOResult(RLResult):
    """A finished `retroformer ppo` run (the reflector)."""

    mode: str = "offline"
    resumed_from: str | None = None
    rows: int = 0
    skipped_long_prompts: int = 0


@dataclass
class ActorGRPOResult(RLResult):
    """A finished actor GRPO run (``stages.actor_grpo``)."""

    env: str = ""
    chat_template: str = ""
    tasks: int = 0
