"""Rating data for the retrospective model: ratings, SFT, preference pairs and RL prompts.

The reflection written after trial k of a task is rated by the return difference of the trials around it,
``rating = G(k+1) - G(k)`` (HotPotQA: exact match 0/1, with the F1 difference as ``rating_f1``; WebShop: the
reward in [0, 1]). A task solved at trial 1 has no reflection; a reflection after the last trial of a task
(no successor) cannot be rated and is left out.

Files under ``<workspace>/datasets/<name>/`` (JSONL, ``datasets.load_dataset("json", ...)`` loads them):

- ``ratings.jsonl``: one line per rated reflection: task_id, run, env, trial (k), prompt (the chat messages
  exactly as the reflector saw them), reflection, rating, rating_f1, rating_metric (what ``rating`` is the
  difference of: ``score``), split, source.
- ``sft.{train,validation}.jsonl``: TRL conversational prompt-completion rows for reflections followed by an
  improvement (rating > 0).
- ``pairs.{train,validation}.jsonl``: TRL preference rows (prompt, chosen, rejected, chosen_rating,
  rejected_rating, rejected_prompt): two reflections of the same task (``pair_scope="task"``, the default) or
  of the same env and source (``pair_scope="env"``) with different ratings. ``prompt`` is the chosen
  reflection's prompt; ``rejected_prompt`` is the rejected one's (the same list when both came from one prompt).
- ``prompts.{train,validation}.jsonl``: failed trajectories that have a successor trial, for RL.
- ``manifest.json``: sources, counts, split rule, time, version.

**The prefill rule** (one rule, applied here so every consumer sees the same thing): our reflector prompts end
with an assistant prefill ``{"role": "assistant", "content": "Reflection:"}``. ``ratings.jsonl`` keeps the
prompt exactly as seen. In every training set (sft, pairs, prompts) the trailing assistant message is removed
from ``prompt`` (``stages.common.ratings.strip_prefill``) and the completion is the bare reflection text, without a leading
``Reflection:`` (``stages.common.reflections.clean_reflection``). Scorers and trainers apply the same two functions to their inputs.

**The split** is by task, never by row: a task is in validation when its place under the salt
``retroformer-split:`` is below ``val_fraction`` (default 0.15; the one rule of ``stages.common.splits``, which
also makes collect's eval split), so every reflection of one task, from every run and source, lands on the same
side. The salt keeps validation tasks independent of collect's eval split.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from retroformer_cli import __version__
from retroformer_cli.config import setting
from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.store import write_dir_atomic
from retroformer_cli.workspace import Workspace, now_iso
from retroformer_cli.stages.common.names import check_name
from retroformer_cli.stages.common.reflections import clean_reflection
from retroformer_cli.stages.common.splits import describe as describe_split
from retroformer_cli.stages.common.splits import split_of
from retroformer_cli.stages.common.ratings import completion, strip_prefill

SPLIT_SALT = "retroformer-split:"  # validation tasks are drawn independently of collect's eval split
SPLIT_NAMES = ("validation", "train")
KINDS = ("ratings", "sft", "pairs", "prompts", "actor")  # actor: `datasets actor` (stages.actor_data)
SPLITS = ("train", "validation")


@dataclass
class DatasetConfig:
    """`retroformer datasets build`: rating, SFT, preference and prompt sets from runs and imported logs."""

    name: str = setting("ratings", "dataset folder under <workspace>/datasets/")
    runs: list[str] = setting(help="runs of this workspace to read", factory=list)
    import_tsv: list[str] = setting(help="original Retroformer rating TSV files", factory=list)
    import_reflexion: list[str] = setting(
        help="Reflexion logs: HotPotQA .txt logs (or a folder of them), the trials.jsonl conversion, or an "
        "ALFWorld folder of env_results_trial_N.json", factory=list)
    val_fraction: float = setting(0.15, "share of tasks (not rows) held out for validation")
    pair_scope: str = setting("task", "task | env: which reflections may form a preference pair")
    max_pairs_per_task: int = setting(32, "cap on pairs whose chosen reflection is from one task")
    min_rating_gap: float = setting(0.0, "pairs need |rating difference| > this")
    pair_on: str = setting("rating", "rating | rating_f1: the value that orders a pair (rating_f1 falls back to rating where it is null)")
    sft_on: str = setting(
        "rating", "rating | rating_f1: SFT keeps reflections whose value is above 0 (rating_f1 falls back to rating "
        "where it is null)")
    seed: int = 0


# --- rating rows ---------------------------------------------------------------------------------------------
def rate_trials(trials: Iterable[Any], source: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rating rows from :class:`~retroformer_cli.records.Trial` records of one run.

    Returns (rows without ``split``, counts of what was skipped and why).
    """
    by_task: dict[str, dict[int, Any]] = defaultdict(dict)
    for t in trials:
        by_task[t.task_id][t.trial] = t
    rows, skipped = [], {"no_successor": 0, "empty_reflection": 0}
    for task_id, ks in by_task.items():
        for k in sorted(ks):
            t = ks[k]
            if t.reflection is None:
                continue
            if not clean_reflection(t.reflection.text, stop=()):
                skipped["empty_reflection"] += 1
                continue
            nxt = ks.get(k + 1)
            if nxt is None:
                skipped["no_successor"] += 1
                continue
            f1a, f1b = (t.info or {}).get("f1"), (nxt.info or {}).get("f1")
            rows.append({
                "task_id": task_id, "run": t.run_id, "env": t.env_id, "trial": k,
                "prompt": t.reflection.prompt, "reflection": clean_reflection(t.reflection.text, stop=()),
                "rating": float(nxt.score) - float(t.score),
                "rating_f1": (float(f1b) - float(f1a)) if f1a is not None and f1b is not None else None,
                "source": source,
            })
    return rows, skipped


# --- derived sets --------------------------------------------------------------------------------------------
def _value(r: dict[str, Any], key: str) -> float:
    """A rating row's ``rating`` or ``rating_f1`` (the latter falls back to ``rating`` where it is null)."""
    v = r.get(key)
    return float(r["rating"] if v is None else v)


def _sft_rows(ratings: list[dict[str, Any]], on: str = "rating") -> list[dict[str, Any]]:
    return [{"prompt": strip_prefill(r["prompt"]), "completion": completion(r["reflection"]),
             "task_id": r["task_id"], "rating": _value(r, on), "split": r["split"]}
            for r in ratings if _value(r, on) > 0]


def _pair_rows(ratings: list[dict[str, Any]], cfg: DatasetConfig) -> list[dict[str, Any]]:
    if cfg.pair_scope not in ("task", "env"):
        raise UsageError(f"pair_scope must be 'task' or 'env', not '{cfg.pair_scope}' (--pair-scope).")
    if cfg.pair_on not in ("rating", "rating_f1"):
        raise UsageError(f"pair_on must be 'rating' or 'rating_f1', not '{cfg.pair_on}' (--pair-on).")
    rng = random.Random(cfg.seed)

    def value(r: dict[str, Any]) -> float:
        return _value(r, cfg.pair_on)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in ratings:
        key = (r["split"], r["env"], r["task_id"]) if cfg.pair_scope == "task" else (r["split"], r["env"], r["source"])
        groups[key].append(r)
    out = []
    for key in sorted(groups, key=str):
        members = groups[key]
        per_task: dict[str, list] = defaultdict(list)
        for a, b in itertools.combinations(members, 2):
            if abs(value(a) - value(b)) <= cfg.min_rating_gap:
                continue
            hi, lo = (a, b) if value(a) > value(b) else (b, a)
            per_task[hi["task_id"]].append((hi, lo))
        for task_id in sorted(per_task):
            cands = per_task[task_id]
            if len(cands) > cfg.max_pairs_per_task:
                cands = rng.sample(cands, cfg.max_pairs_per_task)
            for hi, lo in cands:
                out.append({
                    "prompt": strip_prefill(hi["prompt"]), "chosen": completion(hi["reflection"]),
                    "rejected": completion(lo["reflection"]), "chosen_rating": value(hi),
                    "rejected_rating": value(lo), "rejected_prompt": strip_prefill(lo["prompt"]),
                    "task_id": hi["task_id"], "rejected_task_id": lo["task_id"], "split": hi["split"],
                })
    return out


def _prompt_rows(ratings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in ratings:
        p = strip_prefill(r["prompt"])
        key = json.dumps(p, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"prompt": p, "task_id": r["task_id"], "run": r["run"], "trial": r["trial"], "env": r["env"],
                    "split": r["split"]})
    return out


# --- build -----------------------------------------------------------------------------------------------------
@dataclass
class DatasetResult:
    name: str
    path: Path
    counts: dict[str, Any]
    manifest: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "counts": self.counts}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def _refuse_diagnostic(workspace: Workspace, run: str, trials: list[Any]) -> None:
    """Oracle runs (agents/oracle.py) hold reflections written from the gold data: never training data."""
    from retroformer_cli.agents.oracle import diagnostic_of, diagnostic_trials

    label = diagnostic_of(workspace.read_manifest(run)) or diagnostic_trials(trials)
    if label:
        raise UsageError(f"Run '{run}' is a diagnostic run (--run): its reflector '{label}' wrote its reflections "
                         "from the tasks' gold data, not with a model, so they cannot be training data.")


def build(cfg: DatasetConfig, workspace: Workspace) -> DatasetResult:
    """Read the runs and imports in ``cfg`` and write the dataset folder atomically."""
    from retroformer_cli.stages import importers
    from retroformer_cli.stages.collect import load_trials

    if not (0.0 <= cfg.val_fraction < 1.0):
        raise UsageError(f"val_fraction must be in [0, 1), got {cfg.val_fraction} (--val-fraction).")
    check_name(cfg.name)
    if not (cfg.runs or cfg.import_tsv or cfg.import_reflexion):
        raise UsageError("Nothing to build from: pass --run NAME, --import-tsv FILE or --import-reflexion PATH.")
    ratings: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    for run in cfg.runs:
        trials = load_trials(workspace, run)
        _refuse_diagnostic(workspace, run, trials)
        rows, skipped = rate_trials(trials, f"run:{run}")
        ratings += rows
        sources.append({"kind": "run", "run": run, "trials": len(trials), "rated": len(rows), "skipped": skipped})
    for f in cfg.import_tsv:
        rows = importers.import_tsv(f)
        ratings += rows
        sources.append({"kind": "tsv", "file": Path(f).name, "rated": len(rows)})
    for p in cfg.import_reflexion:
        rows, info = importers.import_reflexion(p)
        ratings += rows
        sources.append({"kind": "reflexion-log", "path": Path(p).name, "rated": len(rows), **info})
    if not ratings:
        raise DataError("No rated reflections found in the given sources: a reflection needs a failed trial with a "
                        "successor trial.", hint="collect with --trials 2 or more and a reflector")
    for r in ratings:
        r["split"] = split_of(r["task_id"], cfg.val_fraction, salt=SPLIT_SALT, names=SPLIT_NAMES)
        r.setdefault("rating_metric", "score")  # files say what `rating` measures (ppo --reward-metric's names)
    if cfg.sft_on not in ("rating", "rating_f1"):
        raise UsageError(f"sft_on must be 'rating' or 'rating_f1', not '{cfg.sft_on}' (--sft-on).")
    sets = {"sft": _sft_rows(ratings, cfg.sft_on), "pairs": _pair_rows(ratings, cfg), "prompts": _prompt_rows(ratings)}

    dest = workspace.datasets_dir / cfg.name
    counts: dict[str, Any] = {}
    manifest: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        counts["ratings"] = _write_jsonl(tmp / "ratings.jsonl", ratings)
        for kind, rows in sets.items():
            for split in SPLITS:
                part = [{k: v for k, v in r.items() if k != "split"} for r in rows if r["split"] == split]
                counts[f"{kind}.{split}"] = _write_jsonl(tmp / f"{kind}.{split}.jsonl", part)
        tasks = {r["task_id"] for r in ratings}
        val_tasks = {r["task_id"] for r in ratings if r["split"] == "validation"}
        counts.update(tasks=len(tasks), validation_tasks=len(val_tasks),
                      positive=sum(r["rating"] > 0 for r in ratings), negative=sum(r["rating"] < 0 for r in ratings),
                      zero=sum(r["rating"] == 0 for r in ratings))
        from retroformer_cli.config import to_dict

        manifest.update({
            "name": cfg.name, "kind": "ratings", "created_at": now_iso(), "retroformer_version": __version__,
            "sources": sources, "counts": counts, "config": to_dict(cfg),
            "split_rule": describe_split(cfg.val_fraction, SPLIT_SALT, "validation"),
            "prefill_rule": "training sets drop a trailing assistant prefill from prompt; completions are the bare "
                            "reflection without a leading 'Reflection:'",
        })
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    write_dir_atomic(dest, fill)
    return DatasetResult(cfg.name, dest, counts, manifest)


def dataset_dir(workspace: Workspace, name: str) -> Path:
    d = workspace.datasets_dir / name
    if not (d / "manifest.json").is_file():
        known = sorted(p.name for p in workspace.datasets_dir.glob("*") if (p / "manifest.json").is_file()) \
            if workspace.datasets_dir.is_dir() else []
        raise UsageError(f"Dataset '{name}' not found in {workspace.datasets_dir} (--dataset); known: "
                         f"{', '.join(known) or 'none'}.", hint="build one with `retroformer datasets build --run RUN`")
    return d


def read_split(workspace: Workspace, name: str, kind: str, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of one set: ``kind`` in ratings | sft | pairs | prompts; ``split`` train | validation (ratings:
    None for all rows, or filtered by its ``split`` field)."""
    from retroformer_cli.store import read_jsonl

    if kind not in KINDS:
        raise UsageError(f"Unknown dataset kind '{kind}': one of {', '.join(KINDS)}.")
    if split is not None and split not in SPLITS:
        raise UsageError(f"Unknown split '{split}': one of {', '.join(SPLITS)}.")
    d = dataset_dir(workspace, name)
    if kind == "ratings":
        rows = list(read_jsonl(d / "ratings.jsonl", tolerate_torn_tail=False))
        return [r for r in rows if split is None or r.get("split") == split]
    return list(read_jsonl(d / f"{kind}.{split or 'train'}.jsonl", tolerate_torn_tail=False))


def read_manifest(workspace: Workspace, name: str) -> dict[str, Any]:
    return json.loads((dataset_dir(workspace, name) / "manifest.json").read_text(encoding="utf-8"))
