"""`retroformer runs import`: turn published logs (and runs exported from another workspace) into runs.

An imported run is an ordinary run: a manifest plus schema-valid :class:`~retroformer_cli.records.Trial` lines,
so ``eval``, ``show``, ``report`` and ``datasets build`` read it exactly as a collected one. The manifest's
``imported`` entry says where it came from; models the logs do not name are recorded as ``unknown``.

Inputs (the format is detected):

- **Reflexion's HotPotQA logs**: the ``trials.jsonl`` conversion (one run per ``run`` field: ``react_base``,
  ``react_reflexion``, ``cot_context_reflexion`` ...) or the text logs written by Reflexion (a file, or a folder
  of them; one run per file, named from it: ``ReAct__reflexion__...txt`` → ``react_reflexion``). Trajectories
  are parsed into Thought / Action / Observation steps; the reflections in each trial's prompt become the
  trial's memory, and a reflection that first appears in trial k+1's prompt is the one written after trial k.
- **Reflexion's ALFWorld results**: a folder of ``env_results_trial_N.json`` (trial N+1 of every env; the
  logs keep outcomes and reflections, no trajectories).
- **A run exported from another workspace**: its folder (``manifest.json`` + ``trials.jsonl``), copied with
  every line checked.

Reflexion lists a solved agent again, unchanged, in later trials; our loop stops a task at its first success,
so an import keeps each task's trials up to that success (success per trial is cumulative either way).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.records import Reflection, Step, Trial
from retroformer_cli.workspace import Workspace, now_iso

_LABEL = re.compile(r"^(Thought|Action|Observation)(?:\s+\d+)?:\s?(.*)$")
_FINISH = re.compile(r"Finish\[(.*?)\]")
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ImportedRun:
    name: str
    manifest: dict[str, Any]
    trials: list[Trial]


def parse_steps(text: str) -> tuple[str, list[Step]]:
    """Split a logged ReAct or CoT transcript into its preamble (question, context, reflections) and steps."""
    preamble: list[str] = []
    steps: list[Step] = []
    current: dict[str, str] | None = None
    field = None
    for line in (text or "").splitlines():
        m = _LABEL.match(line)
        if m:
            label, rest = m.group(1).lower(), m.group(2)
            if label == "thought" or current is None or (label in current and label != "observation"):
                if current is not None:
                    steps.append(_step(current))
                current = {}
            current[label] = rest
            field = label
        elif current is None:
            preamble.append(line)
        elif field is not None:
            current[field] += "\n" + line
    if current is not None:
        steps.append(_step(current))
    return "\n".join(preamble).strip(), steps


def _step(fields: dict[str, str]) -> Step:
    action = fields.get("action", "").strip()
    return Step(thought=" ".join(fields.get("thought", "").split()), action=action,
                observation=fields.get("observation", "").strip(), valid=bool(action),
                raw="\n".join(f"{k.capitalize()}: {v}" for k, v in fields.items() if k != "observation"))


def _sha(text: str, n: int = 12) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def _question(preamble: str) -> str:
    """The question of a logged prompt (ReAct: "Question: ... [reflection header]"; CoT: "Context: ... Question:")."""
    text = preamble.split("You have attempted to answer following question before and failed.")[0]
    i = text.rfind("Question:")
    return " ".join((text[i + len("Question:"):] if i >= 0 else text).split())


def _manifest(name: str, env: str, task_ids: list[str], trials: int, source: str, fmt: str, *,
              reflector: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "schema_version": 1, "kind": "run", "run": name, "env": env, "status": "completed",
        "started_at": None, "finished_at": None, "task_ids": task_ids,
        "config": {"env": env, "trials": trials, "run": name},
        "models": {"actor": {"backend": "imported", "model_id": "unknown"},
                   "reflector": None if reflector is None else {"backend": "imported", "model_id": reflector}},
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cached_prompt_tokens": 0},
        "imported": {"source": source, "format": fmt, "imported_at": now_iso(),
                     "models": "not named in the logs", **(extra or {})},
        "sessions": [],
    }


# ------------------------------------------------------------------------------------------------ HotPotQA
def _agent_from_filename(path: Path) -> str:
    """``ReAct__reflexion__100_questions_5_trials.txt`` → ``react_reflexion``."""
    parts = [p.lower() for p in path.stem.split("__") if not re.match(r"\d+_questions", p)]
    return "_".join(parts) or path.stem


_GOLD = re.compile(r"^Correct answer: ?(.*)$", re.M)
_REFLECTION_HEAD = "You have attempted to answer following question before and failed."


def parse_text_log(path: Path) -> list[dict[str, Any]]:
    """Records like the ``trials.jsonl`` conversion from one Reflexion text log (ReAct or CoT, with or without
    context): each agent entry runs up to its ``Correct answer:`` line."""
    from retroformer_cli.stages.importers import log_sections

    agent = _agent_from_filename(path)
    out = []
    for trial, section, body in log_sections(path):
        status = section.lower()
        start = 0
        for gm in _GOLD.finditer(body):
            entry = body[start:gm.start()].strip("\n")
            start = gm.end()
            if not entry.strip():
                continue
            preamble, _ = parse_steps(entry)
            finishes = _FINISH.findall(entry)
            out.append({"run": agent, "trial": trial, "id": None, "question": _question(preamble),
                        "gold_answer": gm.group(1).strip(), "status": status, "is_correct": status == "correct",
                        "predicted_answer": finishes[-1] if finishes else None,
                        "reflections": _text_log_reflections(entry), "trajectory": entry})
    return out


def _text_log_reflections(entry: str) -> list[str]:
    """ReAct prompts list reflections as ``- ...`` lines after the reflection header; CoT logs print an empty
    ``Reflections:`` field."""
    if _REFLECTION_HEAD not in entry:
        return []
    block = entry.split(_REFLECTION_HEAD, 1)[1].split("Reflections:", 1)[-1]
    block = re.split(r"\n(?:Thought|Action|Observation)(?:\s+\d+)?:", block, maxsplit=1)[0]
    found: list[str] = []
    for line in block.splitlines():
        if line.startswith("- "):
            found.append(line[2:].strip())
        elif line.strip() and found:
            found[-1] += "\n" + line.strip()
    return found


def _question_ids(data: Path | None) -> dict[str, str]:
    """Normalised question text → HotPotQA id, from a data file in HotPotQA's format (JSON list or JSONL)."""
    if data is None:
        return {}
    from retroformer_cli.envs.hotpotqa import load_questions

    return {" ".join(q.question.split()): q.id for q in load_questions(data)}


def _hotpotqa_records(path: Path) -> tuple[list[dict[str, Any]], str]:
    if path.is_dir():
        txts = sorted(path.glob("*.txt"))
        if not txts:
            raise DataError(f"Folder '{path}' holds no Reflexion .txt logs or env_results_trial_N.json files.")
        return [r for t in txts for r in parse_text_log(t)], "reflexion-hotpotqa-text-logs"
    if path.suffix == ".jsonl":
        from retroformer_cli.stages.importers import read_trials_jsonl

        return read_trials_jsonl(path, ("run", "trial", "is_correct")), "reflexion-hotpotqa-trials-jsonl"
    return parse_text_log(path), "reflexion-hotpotqa-text-log"


def reflexion_hotpotqa(path: Path, prefix: str, data: Path | None = None) -> list[ImportedRun]:
    from retroformer_cli.envs.hotpotqa_metrics import exact_match, f1_score

    records, fmt = _hotpotqa_records(path)
    ids = _question_ids(data)
    for r in records:
        if not r.get("id") and ids:
            r["id"] = ids.get(" ".join(str(r.get("question") or "").split()))
    by_run: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    order: dict[str, list[str]] = defaultdict(list)
    for r in records:
        task = r.get("id") or f"hotpotqa-q-{_sha(r.get('question') or '')}"
        if task not in by_run[r["run"]]:
            order[r["run"]].append(task)
        by_run[r["run"]][task].setdefault(int(r["trial"]), r)
    runs = []
    for agent in sorted(by_run):
        name = f"{prefix}-hotpotqa-{agent}"
        trials_out: list[Trial] = []
        k_max = max(k for tasks in by_run[agent].values() for k in tasks)
        uses_reflections = any(r.get("reflections") for tasks in by_run[agent].values() for r in tasks.values())
        for task in order[agent]:
            trials = by_run[agent][task]
            for k in sorted(trials):
                r = trials[k]
                text = r.get("trajectory")
                if not text and r.get("trajectory_same_as_trial"):
                    text = (trials.get(int(r["trajectory_same_as_trial"])) or {}).get("trajectory")
                preamble, steps = parse_steps(text or "")
                memory = list(r.get("reflections") or [])
                nxt = trials.get(k + 1)
                reflection = None
                if nxt is not None and not r.get("is_correct") and len(nxt.get("reflections") or []) > len(memory):
                    reflection = Reflection(text=(nxt["reflections"] or [])[-1], prompt=[], model_id="unknown")
                pred, gold = r.get("predicted_answer"), r.get("gold_answer") or ""
                question = r.get("question") or _question(preamble)
                info = {"status": r.get("status"), "answer": pred, "gold": gold,
                        "em": float(exact_match(pred, gold)) if pred is not None else 0.0,
                        "f1": f1_score(pred, gold) if pred is not None else 0.0}
                if r.get("also_listed_as"):
                    info["also_listed_as"] = r["also_listed_as"]
                trials_out.append(Trial(
                    run_id=name, env_id="hotpotqa", task_id=task, trial=k, instruction=f"Question: {question}",
                    steps=steps, success=bool(r.get("is_correct")), score=1.0 if r.get("is_correct") else 0.0,
                    terminated=r.get("status") != "halted", truncated=r.get("status") == "halted", memory=memory,
                    reflection=reflection, actor_model_id="unknown",
                    reflector_model_id="unknown" if uses_reflections else None,
                    actor_prompt=[{"role": "user", "content": preamble}] if preamble else [], info=info))
                if r.get("is_correct"):
                    break  # our loop stops a task at its first success; Reflexion only lists it again
        runs.append(ImportedRun(name, _manifest(name, "hotpotqa", order[agent], k_max, str(path), fmt,
                                               reflector="unknown" if uses_reflections else None,
                                               extra={"agent": agent}), trials_out))
    return runs


# ------------------------------------------------------------------------------------------------ ALFWorld
def reflexion_alfworld(folder: Path, prefix: str) -> ImportedRun:
    from retroformer_cli.stages.importers import read_alfworld_results

    order, by_env, n_files = read_alfworld_results(folder)
    name = f"{prefix}-alfworld-{_NAME_OK.sub('-', folder.name)}"
    # Reflexion's ALFWorld script writes reflections into `memory` in base runs too, but a base agent never sees
    # them; the folder name is the only mark (Reflexion names them base_run_logs / reflexion_run_logs).
    base = "base" in folder.name.lower()
    trials_out: list[Trial] = []
    uses_reflections = False
    for env in order:
        before: list[str] = []
        for n in sorted(by_env[env]):
            e = by_env[env][n]
            memory = [] if base else list(e.get("memory") or [])
            success = bool(e.get("is_success"))
            written = memory[-1] if (not success and len(memory) > len(before)) else None
            uses_reflections |= bool(memory)
            trials_out.append(Trial(
                run_id=name, env_id="alfworld", task_id=env, trial=n + 1, instruction=f"ALFWorld {env}",
                steps=[], success=success, score=1.0 if success else 0.0, terminated=success, truncated=not success,
                memory=before, reflection=Reflection(text=written, prompt=[], model_id="unknown") if written else None,
                actor_model_id="unknown", reflector_model_id=None, actor_prompt=[], info={"won": success}))
            if success:
                break
            before = memory
    if uses_reflections:
        for t in trials_out:
            t.reflector_model_id = "unknown"
    manifest = _manifest(name, "alfworld", order, n_files, str(folder), "reflexion-alfworld-env-results",
                         reflector="unknown" if uses_reflections else None,
                         extra={"note": "outcomes and reflections only: the logs keep no trajectories"
                                + ("; a base run: the reflections its log holds were not shown to the agent" if base else "")})
    return ImportedRun(name, manifest, trials_out)


# ------------------------------------------------------------------------------------------------ exported runs
def exported_run(folder: Path) -> ImportedRun:
    from retroformer_cli.store import read_jsonl

    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"'{folder / 'manifest.json'}' cannot be read as a run manifest: {exc}.") from None
    trials = []
    path = folder / "trials.jsonl"
    if path.exists():
        for i, rec in enumerate(read_jsonl(path), start=1):
            try:
                trials.append(Trial.from_json(rec))
            except DataError as exc:
                raise DataError(f"{path}: line {i}: {exc}") from None
    name = str(manifest.get("run") or folder.name)
    manifest["imported"] = {"source": str(folder), "format": "retroformer-run", "original_run": name,
                            "imported_at": now_iso()}
    return ImportedRun(name, manifest, trials)


# ------------------------------------------------------------------------------------------------ entry point
def detect(path: Path) -> str:
    if not path.exists():
        raise UsageError(f"'{path}' does not exist (runs import).")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return "retroformer-run"
        if any(path.glob("env_results_trial_*.json")):
            return "reflexion-alfworld"
        if any(path.glob("*.txt")):
            return "reflexion-hotpotqa"
        raise UsageError(f"Folder '{path}' is neither a run folder (manifest.json), Reflexion's ALFWorld results "
                         "(env_results_trial_N.json) nor Reflexion's HotPotQA logs (.txt).")
    if path.suffix in (".jsonl", ".txt"):
        return "reflexion-hotpotqa"
    raise UsageError(f"'{path}' is not an importable log: pass Reflexion's trials.jsonl or .txt logs, an "
                     "env_results folder, or a run folder.")


def load(path: str | Path, prefix: str = "reflexion", data: str | Path | None = None) -> list[ImportedRun]:
    p = Path(path).expanduser()
    kind = detect(p)
    if kind == "retroformer-run":
        return [exported_run(p)]
    if kind == "reflexion-alfworld":
        return [reflexion_alfworld(p, prefix)]
    return reflexion_hotpotqa(p, prefix, Path(data).expanduser() if data else None)


def import_runs(workspace: Workspace, path: str | Path, *, prefix: str = "reflexion", name: str | None = None,
                overwrite: bool = False, data: str | Path | None = None) -> list[dict[str, Any]]:
    """Write the runs found at ``path`` into ``workspace``; returns one summary per run. ``data`` (HotPotQA text
    logs only) maps the logged questions to HotPotQA ids, so the runs pair with runs collected on that data."""
    from retroformer_cli.store import write_dir_atomic, write_json_atomic

    runs = load(path, prefix, data)
    if name is not None:
        if len(runs) != 1:
            raise UsageError(f"--name fits one run, but '{path}' holds {len(runs)} ({', '.join(r.name for r in runs)}).")
        runs[0].name = name
    for r in runs:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.name):
            raise UsageError(f"'{r.name}' is not a valid run name (letters, digits, '.', '_', '-').")
        if workspace.manifest_path(r.name).exists() and not overwrite:
            raise UsageError(f"Run '{r.name}' already exists in '{workspace.root}'.",
                             hint="pass --overwrite to replace it, or --name / --prefix for another name")
    out = []
    for r in runs:
        r.manifest["run"] = r.name
        r.manifest.setdefault("config", {})["run"] = r.name
        for t in r.trials:
            t.run_id = r.name

        def write(folder: Path, run: ImportedRun = r) -> None:
            with (folder / "trials.jsonl").open("w", encoding="utf-8") as fh:
                for t in run.trials:
                    fh.write(json.dumps(t.to_json(), ensure_ascii=False) + "\n")
            write_json_atomic(folder / "manifest.json", run.manifest)

        write_dir_atomic(workspace.run_dir(r.name), write)
        out.append({"run": r.name, "env": r.manifest.get("env"), "tasks": len(r.manifest.get("task_ids") or []),
                    "trials": len(r.trials), "format": r.manifest["imported"]["format"]})
    return out
