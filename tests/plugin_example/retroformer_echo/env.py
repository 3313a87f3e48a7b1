"""Echo: the observation shows a word; ``Say[word]`` with that word wins (reward 1)."""

from __future__ import annotations

import re
from typing import Any

from retroformer_cli.errors import UsageError

ACTION = re.compile(r"^\s*(\w+)\[(.*)\]\s*$", re.DOTALL)


class EchoEnv:
    env_id = "echo"

    def __init__(self, data: str | None = None, max_steps: int = 3, words: str = "apple,banana,cherry"):
        self.max_steps = max_steps
        self.words = [w.strip() for w in str(words).split(",") if w.strip()]
        self._word: str | None = None
        self._steps = 0

    def task_ids(self) -> list[str]:
        return [f"word_{i}" for i in range(len(self.words))]

    def spawn(self) -> "EchoEnv":
        return EchoEnv(max_steps=self.max_steps, words=",".join(self.words))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        task = str((options or {}).get("task_id", "word_0"))
        if task not in self.task_ids():
            raise UsageError(f"Unknown echo task id '{task}'.")
        self._task, self._word, self._steps = task, self.words[int(task.split("_")[1])], 0
        obs = f"Instruction: say the word '{self._word}'."
        return obs, {"task_id": task, "instruction": obs}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._steps += 1
        m = ACTION.match(action)
        said = m.group(2).strip() if m and m.group(1).lower() == "say" else None
        won = said == self._word
        terminated = said is not None
        truncated = not terminated and self._steps >= self.max_steps
        info = {"task_id": self._task, "instruction": f"say '{self._word}'"}
        if terminated or truncated:
            info.update(success=won, score=1.0 if won else 0.0)
        obs = "Correct." if won else ("Wrong word." if said is not None else "Invalid action: use Say[word].")
        return obs, 1.0 if won else 0.0, terminated, truncated, info

    def close(self) -> None:
        self._word = None
