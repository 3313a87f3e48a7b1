"""ALFWorld game discovery: ``game.tw-pddl`` files under an ``ALFWORLD_DATA``-style folder.

Layout: ``<root>/json_2.1.1/<split>/<task dir>/<trial dir>/game.tw-pddl`` (``traj_data.json`` beside it
is optional: the engine does not need it). ``data`` may also point at a split folder, a task folder, a
trial folder or one game file. Task ids are the game folder's path relative to ``data`` (POSIX
separators), so they are stable across machines and runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from retroformer_cli.errors import DataError

GAME_FILE = "game.tw-pddl"
DATA_ENV_VAR = "ALFWORLD_DATA"
BENCHMARK_SPLIT = "valid_unseen"  # the eval split of ALFWorld, ReAct, Reflexion and Retroformer (134 games)
KNOWN_SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")

# ALFRED task-type names (the task folder prefix, or traj_data.json's "task_type") -> our short names.
TASK_TYPES = {
    "pick_and_place_simple": "pick",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "look_at_obj_in_light": "look",
    "pick_two_obj_and_place": "pick_two",
    "pick_and_place_with_movable_recep": "pick_movable",  # ALFRED only; ALFWorld skips it
}
SHORT_TASK_TYPES = ("pick", "clean", "heat", "cool", "look", "pick_two")


@dataclass(frozen=True)
class Game:
    task_id: str  # game folder relative to the data root, e.g. json_2.1.1/valid_unseen/<task>/<trial>
    path: Path  # the game.tw-pddl file
    split: str  # e.g. valid_unseen ("" when the layout does not say)
    task_type: str  # pick | clean | heat | cool | look | pick_two | other


def task_type_of(name: str) -> str:
    """``'pick_heat_then_place_in_recep-Egg-None-GarbageCan-10'`` -> ``'heat'``; unknown -> ``'other'``."""
    prefix = name.split("-", 1)[0]
    return TASK_TYPES.get(prefix, "other")


def task_type_from_goal(goal: str) -> str:
    """Task type from the goal text ("Your task is to: put a hot mug in cabinet."), per ALFWorld's templates."""
    g = goal.lower()
    if "your task is to:" in g:
        g = g.split("your task is to:", 1)[1]
    g = g.strip().split("\n", 1)[0]
    if "clean" in g:
        return "clean"
    if "heat" in g or " hot " in f" {g} ":
        return "heat"
    if "cool" in g:
        return "cool"
    if ("examine" in g and " with " in g) or "look at" in g:
        return "look"
    if " two " in f" {g} ":
        return "pick_two"
    return "pick"


def resolve_root(data: str | os.PathLike | None) -> Path:
    if data is None or str(data) == "":
        env = os.environ.get(DATA_ENV_VAR)
        if not env:
            raise DataError(
                "ALFWorld needs its game files: pass --data DIR (an ALFWORLD_DATA folder holding "
                f"json_2.1.1/<split>/<task>/<trial>/{GAME_FILE}) or set {DATA_ENV_VAR}.")
        data = env
    root = Path(os.path.expandvars(os.path.expanduser(str(data))))
    if not root.exists():
        raise DataError(f"ALFWorld data path {root} does not exist.")
    return root


def _type_from_traj(game_dir: Path) -> str:
    traj = game_dir / "traj_data.json"
    if not traj.is_file():
        return "other"
    try:
        with traj.open(encoding="utf-8") as fh:
            return TASK_TYPES.get(str(json.load(fh).get("task_type", "")), "other")
    except (OSError, ValueError, AttributeError):
        return "other"


def discover_games(data: str | os.PathLike | None, split: str | None = None,
                   include_unsupported: bool = False) -> tuple[Path, list[Game]]:
    """All games under ``data`` (sorted by task id) -> ``(root, games)``.

    ``split``: a split folder name (``valid_unseen``...), ``"all"``, or None: the benchmark split
    ``valid_unseen`` when the folder has it, else every game. As ALFWorld does, tasks with a movable
    receptacle or a sliced object are skipped unless ``include_unsupported``.
    """
    root = resolve_root(data)
    if root.is_file():
        if root.name != GAME_FILE and root.suffix != ".tw-pddl":
            raise DataError(f"ALFWorld data file {root} is not a {GAME_FILE} game file.")
        files, base = [root], root.parent.parent.parent  # id: <task>/<trial>
    else:
        files, base = [], root
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            if GAME_FILE in filenames:
                files.append(Path(dirpath) / GAME_FILE)
    games: list[Game] = []
    for f in files:
        rel = f.parent.relative_to(base).as_posix() if f.parent != base else f.parent.name
        parts = rel.split("/")
        task_dir = f.parent.parent.name
        if not include_unsupported and ("movable" in task_dir or "Sliced" in task_dir):
            continue
        task_type = task_type_of(task_dir)
        if task_type == "other":
            task_type = _type_from_traj(f.parent)
        game_split = parts[-3] if len(parts) >= 3 else (root.name if root.name in KNOWN_SPLITS else "")
        games.append(Game(task_id=rel, path=f, split=game_split, task_type=task_type))
    if not games:
        raise DataError(f"ALFWorld data path {root} holds no {GAME_FILE} files "
                        f"(expected json_2.1.1/<split>/<task>/<trial>/{GAME_FILE}).")
    games.sort(key=lambda g: g.task_id)
    splits = sorted({g.split for g in games})
    if split is None:
        split = BENCHMARK_SPLIT if BENCHMARK_SPLIT in splits else "all"
    if split != "all":
        chosen = [g for g in games if g.split == split]
        if not chosen:
            raise DataError(f"ALFWorld split '{split}' not found under {root}: it has "
                            f"{', '.join(s or '(no split)' for s in splits)}.")
        games = chosen
    return root, games
