"""ALFWorld (TextWorld engine) environment: ``make("alfworld", data=..., max_steps=50, wording=...)``.

Imports nothing heavy: the engine (textworld, alfworld) is imported only inside the worker process.
Install it with ``pip install 'retroformer-cli[alfworld]'``.
"""

from retroformer_cli.envs.alfworld.env import NOTHING, ALFWorldEnv, TextWorldError
from retroformer_cli.envs.alfworld.games import (BENCHMARK_SPLIT, SHORT_TASK_TYPES, TASK_TYPES, Game, discover_games,
                                                 task_type_from_goal, task_type_of)
from retroformer_cli.envs.alfworld.wording import WORDINGS, normalize_command, to_native
from retroformer_cli.envs.spec import EnvSpec

SPEC = EnvSpec(
    name="alfworld", id="ALFWorld-v0", entry_point="retroformer_cli.envs.alfworld.env:ALFWorldEnv",
    prompts="retroformer_cli.agents.prompts.alfworld:PROMPTS", max_steps=50,
    protocol_split="all",  # the data folder (valid_unseen) already is the evaluation games of the papers
    options=("split", "wording", "process", "cache_games", "include_unsupported"), spawn=True, asynchronous=True,
    oracle="retroformer_cli.envs.alfworld.oracle:oracle_hints",
    description="ALFWorld household text games on the real TextWorld engine (worker processes)",
)

__all__ = [
    "ALFWorldEnv", "BENCHMARK_SPLIT", "TextWorldError", "Game", "NOTHING", "SHORT_TASK_TYPES", "SPEC", "TASK_TYPES",
    "WORDINGS",
    "discover_games", "normalize_command", "task_type_from_goal", "task_type_of", "to_native",
]
