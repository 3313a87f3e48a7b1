"""Importers for rating data users already have. Each returns rating rows in the ``ratings.jsonl`` shape
(without ``split``; ``retroformer_cli.stages.datasets.build`` assigns it).

- **Retroformer rating TSV** (the file the original Retroformer scripts read): tab-separated with a header,
  columns ``query``, ``response`` and the rating as ``rating`` (the data) or ``labels`` (its reward script).
  The prompt is ``[{"role": "user", "content": query}]``; rows with the same query form one task
  (``tsv-<sha1(query)[:12]>``).
- **Reflexion HotPotQA logs**: the text logs written by Reflexion's ``log_trial`` (``BEGIN TRIAL N`` blocks with
  CORRECT / INCORRECT / HALTED agents; each entry is the question, the reflections so far, the scratchpad and
  ``Correct answer: ...``), or a JSONL conversion of them with one line per (run, trial, question) and the
  fields ``run, trial, id, question, gold_answer, is_correct, predicted_answer, reflections, trajectory``.
  The reflection written after trial t is the one that appears in the prompt at trial t+1; its rating is
  correct(t+1) - correct(t), and ``rating_f1`` the F1 difference of the predicted answers (a halted agent has
  F1 0). Reflexion never shows the reflector prompt, so the prompt is rebuilt with OUR HotPotQA reflection
  prompt (:mod:`retroformer_cli.agents.prompts.hotpotqa`) around the logged question and scratchpad, with the
  same outcome line our collect writes. Task ids are the HotPotQA ids in the JSONL conversion and
  ``hotpotqa-q-<sha1(question)[:12]>`` for the text logs (which carry no ids).
- **Reflexion ALFWorld logs**: a folder of ``env_results_trial_N.json`` (each a list of
  ``{"name", "memory", "is_success"}``, written after trial N with the reflection of a failed trial N appended
  to ``memory``). The rating of that reflection is is_success(N+1) - is_success(N). These logs keep no
  trajectories: the prompt is a reflection instruction plus a user message naming the env and listing the
  earlier reflections; use them for reward/SFT data on the reflection text, not for trajectory-conditioned RL.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from retroformer_cli.errors import DataError
from retroformer_cli.stages.common.ratings import rows_from_sequences


def _sha(text: str, n: int = 12) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


# --- TSV -------------------------------------------------------------------------------------------------------
def import_tsv(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Rating TSV '{p}' does not exist (--import-tsv).")
    csv.field_size_limit(1 << 30)
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        cols = reader.fieldnames or []
        rating_col = "rating" if "rating" in cols else "labels" if "labels" in cols else None
        if "query" not in cols or "response" not in cols or rating_col is None:
            raise DataError(f"Rating TSV '{p}' needs the columns query, response and rating (or labels); it has "
                            f"{', '.join(cols) or 'none'}.")
        rows = []
        for i, rec in enumerate(reader, start=2):
            try:
                rating = float(rec[rating_col])
            except (TypeError, ValueError):
                raise DataError(f"{p}: line {i}: {rating_col} '{rec.get(rating_col)}' is not a number.") from None
            query = rec["query"] or ""
            rows.append({
                "task_id": f"tsv-{_sha(query)}", "run": None, "env": "unknown", "trial": None,
                "prompt": [{"role": "user", "content": query}], "reflection": (rec["response"] or "").strip(),
                "rating": rating, "rating_f1": None, "source": f"tsv:{p.name}",
            })
    return [r for r in rows if r["reflection"]]


# --- Reflexion HotPotQA ----------------------------------------------------------------------------------------
_TRIAL = re.compile(r"^BEGIN TRIAL (\d+)\s*$", re.M)
_SECTION = re.compile(r"^-+ BEGIN (CORRECT|INCORRECT|HALTED) AGENTS -+\s*$", re.M)
_FINISH = re.compile(r"Finish\[(.*?)\]")
_REFL_HEAD = "You have attempted to answer following question before and failed."


def split_log_entry(entry: str) -> dict[str, Any]:
    """Question, reflections and scratchpad of one logged agent prompt."""
    text = entry.strip("\n")
    gold = None
    m = re.search(r"\nCorrect answer: (.*)\s*$", text)
    if m:
        gold, text = m.group(1).strip(), text[: m.start()]
    t1 = text.find("\nThought 1:")
    head, scratch = (text, "") if t1 < 0 else (text[:t1], text[t1 + 1:])
    head = head[len("Question:"):].strip() if head.startswith("Question:") else head.strip()
    reflections: list[str] = []
    if _REFL_HEAD in head:
        question, _, rest = head.partition(_REFL_HEAD)
        _, _, block = rest.partition("Reflections:")
        for line in block.splitlines():
            if line.startswith("- "):
                reflections.append(line[2:].strip())
            elif line.strip() and reflections:
                reflections[-1] += "\n" + line.strip()
        head = question.strip()
    return {"question": head, "reflections": reflections, "scratchpad": scratch.rstrip() + "\n" if scratch else "",
            "gold": gold}


def parse_hotpotqa_log(path: Path) -> list[dict[str, Any]]:
    """Rows like the JSONL conversion (run, trial, id=None, question, ...) from one Reflexion text log."""
    out = []
    for trial, status, body in log_sections(path):
        body = body.split("\n#####")[0]
        for entry in re.split(r"\n(?=Question:)", "\n" + body):
            if not entry.strip().startswith("Question:"):
                continue
            e = split_log_entry(entry)
            finishes = _FINISH.findall(e["scratchpad"])
            out.append({"run": path.stem, "trial": trial, "id": None, "question": e["question"],
                        "gold_answer": e["gold"], "status": status.lower(),
                        "is_correct": status == "CORRECT", "predicted_answer": finishes[-1] if finishes else None,
                        "reflections": e["reflections"], "trajectory": entry.strip("\n")})
    return out


def log_sections(path: Path) -> Iterator[tuple[int, str, str]]:
    """(trial number, CORRECT | INCORRECT | HALTED, section text) for each agents section of a Reflexion text log."""
    text = path.read_text(encoding="utf-8")
    trials = list(_TRIAL.finditer(text))
    if not trials:
        raise DataError(f"'{path}' is not a Reflexion HotPotQA log: no 'BEGIN TRIAL N' line.")
    for i, tm in enumerate(trials):
        block = text[tm.end(): trials[i + 1].start() if i + 1 < len(trials) else len(text)]
        sections = list(_SECTION.finditer(block))
        for j, sm in enumerate(sections):
            yield int(tm.group(1)), sm.group(1), block[sm.end(): sections[j + 1].start() if j + 1 < len(sections) else len(block)]


def _hotpotqa_rows(records: list[dict[str, Any]], source: str, run_label: str) -> list[dict[str, Any]]:
    from retroformer_cli.agents.prompts.hotpotqa import PROMPTS
    from retroformer_cli.envs.hotpotqa_metrics import f1_score

    by_task: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    by_trial: dict[tuple, dict[str, Any]] = {}
    for r in records:
        task = r.get("id") or f"hotpotqa-q-{_sha(r.get('question') or '')}"
        by_trial[(r.get("run"), task, r["trial"])] = r
        by_task[f"{r.get('run')}\x00{task}"].setdefault(int(r["trial"]), r)
    seqs: dict[str, list[dict[str, Any]]] = {}
    runs = set()
    for key, trials in by_task.items():
        run, task = key.split("\x00", 1)
        runs.add(run)
        items = []
        for k in sorted(trials):
            r = trials[k]
            traj = r.get("trajectory")
            if not traj and r.get("trajectory_same_as_trial"):
                traj = (by_trial.get((run, task, r["trajectory_same_as_trial"])) or {}).get("trajectory")
            nxt = trials.get(k + 1)
            after = None
            if nxt is not None and not r.get("is_correct"):
                before, later = r.get("reflections") or [], nxt.get("reflections") or []
                if len(later) > len(before):
                    after = later[-1]
            pred, gold = r.get("predicted_answer"), r.get("gold_answer") or ""
            items.append({"trial": k, "score": 1.0 if r.get("is_correct") else 0.0,
                          "f1": f1_score(pred, gold) if pred is not None else 0.0, "reflection_after": after,
                          "halted": r.get("status") == "halted", "trajectory": traj or "", "question": r.get("question")})
        seqs[key] = items

    def prompt_fn(key: str, item: dict[str, Any]) -> list[dict[str, str]]:
        e = split_log_entry(item["trajectory"]) if item["trajectory"] else {"question": item["question"], "scratchpad": ""}
        question = e["question"] or item["question"] or ""
        scratch = re.sub(r"\nObservation \d+: Answer is (IN)?CORRECT\s*$", "\n", e["scratchpad"])
        outcome = "Observation: Ran out of steps before finishing." if item["halted"] else "Observation: Answer is INCORRECT"
        return [{"role": m.role, "content": m.content}
                for m in PROMPTS.reflection_messages(f"Question: {question}", scratch, outcome)]

    rows = rows_from_sequences(seqs, run="", env="hotpotqa", source=source, prompt_fn=prompt_fn)
    for row in rows:
        run, task = row["task_id"].split("\x00", 1)
        row["task_id"], row["run"] = task, f"{run_label}:{run}"
    return rows


def import_reflexion(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows from a Reflexion log file or folder (see the module docstring); returns (rows, info)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"Reflexion log '{p}' does not exist (--import-reflexion).")
    if p.is_dir():
        alf = sorted(p.glob("env_results_trial_*.json"))
        if alf:
            return import_alfworld_results(p), {"format": "alfworld-env-results", "files": len(alf)}
        txts = sorted(p.glob("*.txt"))
        if not txts:
            raise DataError(f"Folder '{p}' holds neither env_results_trial_N.json files nor Reflexion .txt logs "
                            "(--import-reflexion).")
        rows = []
        for t in txts:
            rows += _hotpotqa_rows(parse_hotpotqa_log(t), f"reflexion-log:{t.name}", "reflexion")
        return rows, {"format": "hotpotqa-text-logs", "files": len(txts)}
    if p.suffix == ".jsonl":
        recs = read_trials_jsonl(p, ("trial", "is_correct", "reflections"))
        return _hotpotqa_rows(recs, f"reflexion-log:{p.name}", "reflexion"), {"format": "hotpotqa-trials-jsonl"}
    return _hotpotqa_rows(parse_hotpotqa_log(p), f"reflexion-log:{p.name}", "reflexion"), {"format": "hotpotqa-text-log"}


def read_trials_jsonl(path: Path, needs: tuple[str, ...]) -> list[dict[str, Any]]:
    """The records of Reflexion's HotPotQA ``trials.jsonl`` conversion (each line must have ``needs``)."""
    recs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path}: line {i} is not valid JSON.") from None
    if not recs or not set(needs) <= set(recs[0]):
        raise DataError(f"'{path}' is not Reflexion's trials JSONL (lines need {', '.join(needs)}).")
    return recs


def read_alfworld_results(folder: Path) -> tuple[list[str], dict[str, dict[int, dict[str, Any]]], int]:
    """Reflexion's ALFWorld ``env_results_trial_N.json`` files: env names in first-seen order, each env's entry
    (``{"name", "memory", "is_success"}``) by trial index N, and the number of trial files."""
    files: dict[int, Path] = {}
    for f in folder.glob("env_results_trial_*.json"):
        m = re.search(r"env_results_trial_(\d+)\.json$", f.name)
        if m:
            files[int(m.group(1))] = f
    if not files:
        raise DataError(f"Folder '{folder}' holds no env_results_trial_N.json files.")
    order: list[str] = []
    by_env: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for n in sorted(files):
        try:
            data = json.loads(files[n].read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise DataError(f"'{files[n]}' is not valid JSON.") from None
        if not isinstance(data, list) or any(not isinstance(e, dict) or "name" not in e for e in data):
            raise DataError(f"'{files[n]}' must hold a list of {{name, memory, is_success}} entries.")
        for e in data:
            env = str(e["name"])
            if env not in by_env:
                order.append(env)
            by_env[env][n] = e
    return order, by_env, max(files) + 1


# --- Reflexion ALFWorld ----------------------------------------------------------------------------------------
ALFWORLD_REFLECT = ("You are an agent that improves by reflecting on its own mistakes. You tried to solve a "
                    "household task by giving text commands and failed. In a few sentences, state the root cause "
                    "of the failure and a concrete plan for the next attempt.")


def import_alfworld_results(folder: Path) -> list[dict[str, Any]]:
    _, by_env, _ = read_alfworld_results(folder)
    seqs: dict[str, list[dict[str, Any]]] = {}
    for name, trials in by_env.items():
        items, prev_mem = [], []
        for n in sorted(trials):
            e = trials[n]
            mem = list(e.get("memory") or [])
            after = mem[-1] if (not e.get("is_success") and len(mem) > len(prev_mem)) else None
            items.append({"trial": n + 1, "score": 1.0 if e.get("is_success") else 0.0, "reflection_after": after,
                          "earlier": prev_mem})
            prev_mem = mem
        seqs[name] = items

    def prompt_fn(name: str, item: dict[str, Any]) -> list[dict[str, str]]:
        user = f"Previous trial: ALFWorld {name}, trial {item['trial']}: the task was not completed " \
               "(the log keeps no trajectory)."
        if item["earlier"]:
            user += "\nEarlier reflections:\n" + "\n".join(f"- {m.strip()}" for m in item["earlier"])
        return [{"role": "system", "content": ALFWORLD_REFLECT}, {"role": "user", "content": user},
                {"role": "assistant", "content": "Reflection:"}]

    return rows_from_sequences(seqs, run=f"reflexion:{folder.name}", env="alfworld",
                               source=f"reflexion-log:{folder.name}", prompt_fn=prompt_fn)
