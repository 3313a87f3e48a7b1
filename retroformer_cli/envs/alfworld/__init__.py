"""ALFWorld (TextWorld engine) environment: ``make("alfworld", data=..., max_steps=50, wording=...)``.

Imports nothing heavy: the engine (textworld, alfworld) is imported only inside the worker process.
Install it with ``pip install 'retroformer-cli[alfworld]'``.
"""

from retroformer_cli.envs.alfworld.env import NOTHING, ALFWorldEnv, EngineError
from retroformer_cli.envs.alfworld.games import (BENCHMARK_SPLIT, SHORT_TASK_TYPES, TASK_TYPES, Game, discover_games,
                                                 task_type_from_goal, task_type_of)
from retroformer_cli.envs.alfworld.wording import WORDINGS, normalize_command, to_native

__all__ = [
    "ALFWorldEnv", "BENCHMARK_SPLIT", "EngineError", "Game", "NOTHING", "SHORT_TASK_TYPES", "TASK_TYPES", "WORDINGS",
    "discover_games", "normalize_command", "task_type_from_goal", "task_type_of", "to_native",
]
