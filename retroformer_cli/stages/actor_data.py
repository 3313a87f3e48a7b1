"""Training data for the *actor* (FireAct-style SFT): successful ReAct trajectories of train-split tasks, one row
per step, in exactly the prompt format `collect` sends.

Every source is reduced to (task id, memory, [(thought, action), ...]) and **replayed in the env**: the env
gives the observations, :meth:`PromptSet.actor_messages` builds the prompt of each step as ``run_episode`` does,
and only replays that end in success are kept. So a row's prompt is byte-for-byte what the actor would see,
whatever the source's own observations were. Sources:

* ``runs``: successful trials of this workspace's runs (their memory included: a trial that succeeded after a
  reflection teaches the actor to use one);
* ``import_reflexion``: Reflexion's published HotPotQA trajectories (``trials.jsonl`` conversion or the text
  logs), with the reflections that were in their prompts;
* ``expert``: trajectories the env writes from its gold data (HotPotQA: search the supporting pages, then
  answer), shown with no memory or, for a share ``expert_reflection_share`` of them, with the env's
  non-leaking oracle hint (the pages to search) as a reflection, so the actor learns to follow a reflection
  that names what to search.

Tasks of collect's eval split are never used (``split_of(task_id) == "train"`` only), so an evaluation with
``collect --split eval`` measures tasks the actor never trained on.

Rows (``actor.{train,validation}.jsonl`` in ``<workspace>/datasets/<name>/``): ``messages`` (the chat as sent,
ending in the assistant prefill ``...Thought N:``), ``completion`` (`` <thought>\\nAction N: <action>``), ``task_id``,
``step``, ``source``, ``memory`` (reflections shown). `retroformer sft --role actor --dataset NAME` renders
``messages`` with the base model's chat template (the final assistant turn continued, as the engine does).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from retroformer_cli import __version__
from retroformer_cli.config import setting
from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.stages.common.names import check_name
from retroformer_cli.stages.common.splits import split_of
from retroformer_cli.workspace import Workspace, now_iso

_STEP = re.compile(r"^Thought (\d+):(.*?)\nAction \1:(.*?)$", re.MULTILINE | re.DOTALL)
VAL_SALT = "actor-sft"  # validation rows: a salted split of the train tasks (never collect's eval tasks)


@dataclass
class ActorDataConfig:
    """`retroformer datasets actor`: step-level SFT rows for the actor from successful trajectories."""

    env: str = setting("hotpotqa", "environment the trajectories are replayed in")
    data: str | None = setting(None, "the env's data (as for collect); default: sample data")
    name: str = setting("actor", "dataset folder under <workspace>/datasets/")
    runs: list[str] = setting(help="runs of this workspace: their successful trials", factory=list)
    import_reflexion: list[str] = setting(help="Reflexion HotPotQA logs (trials.jsonl or text logs): their successful trajectories", factory=list)
    expert: bool = setting(True, "add the env's expert trajectories (from its gold data)")
    expert_reflection_share: float = setting(0.5, "share of expert trajectories shown with the env's oracle hint as a reflection")
    memory_size: int = setting(3, "reflections kept in memory (as collect's --memory-size)")
    few_shot: bool = setting(False, "prompts with the few-shot examples; collect the tuned actor with the same setting (--no-few-shot)")
    max_tasks: int | None = setting(None, "at most this many train-split tasks per source")
    val_fraction: float = setting(0.1, "share of train tasks held out as validation rows")
    seed: int = setting(0, "seed of the expert/reflection assignment")


@dataclass
class Episode:
    task_id: str
    memory: list[str]
    steps: list[tuple[str, str]]  # (thought, action)
    source: str


@dataclass
class ActorDataResult:
    name: str
    path: Path
    counts: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), **self.counts}


# ------------------------------------------------------------------------------------------------ sources
def parse_scratchpad(text: str) -> list[tuple[str, str]]:
    """(thought, action) pairs of a ``Thought N: ...\\nAction N: ...`` trajectory, in order."""
    return [(" ".join(m.group(2).split()), " ".join(m.group(3).split())) for m in _STEP.finditer(text)]


def reflexion_episodes(path: str | Path, memory_size: int) -> list[Episode]:
    """Correct trajectories of Reflexion's HotPotQA logs, each with the reflections of its prompt."""
    from retroformer_cli.stages.importers import parse_hotpotqa_log, read_trials_jsonl, split_log_entry

    p = Path(path)
    if not p.exists():
        raise DataError(f"Reflexion log '{p}' does not exist (--import-reflexion).")
    if p.is_dir():  # the shared folder layout: the trials.jsonl conversion, else the ReAct text logs
        files = sorted(p.glob("*.jsonl"))[:1] or sorted(p.glob("original/ReAct*.txt"))
    else:
        files = [p]
    records: list[dict[str, Any]] = []
    for f in files:
        records += read_trials_jsonl(f, ("trial", "is_correct", "reflections")) if f.suffix == ".jsonl" \
            else parse_hotpotqa_log(f)
    out, seen = [], set()
    for r in records:
        if not r.get("is_correct") or not r.get("trajectory") or not r.get("id"):
            continue  # text logs carry no ids; the trials.jsonl conversion does
        steps = parse_scratchpad(split_log_entry(r["trajectory"])["scratchpad"])
        memory = list(r.get("reflections") or [])[-memory_size:] if memory_size > 0 else []
        key = (r["id"], json.dumps(steps), json.dumps(memory))
        if steps and key not in seen:
            seen.add(key)
            out.append(Episode(r["id"], memory, steps, f"reflexion:{r.get('run', p.name)}"))
    return out


def run_episodes(workspace: Workspace, run: str) -> list[Episode]:
    """Successful trials of one run of this workspace (oracle-diagnostic runs are refused)."""
    from retroformer_cli.stages.collect import load_trials

    manifest = workspace.read_manifest(run)
    if manifest.get("diagnostic"):
        raise UsageError(f"Run '{run}' used the diagnostic '{manifest['diagnostic']}' reflector, which reads the "
                         "task's gold data: it cannot be training data (--run).")
    return [Episode(t.task_id, list(t.memory), [(s.thought, s.action) for s in t.steps if s.valid], f"run:{run}")
            for t in load_trials(workspace, run) if t.success and not t.env_error]


def hotpotqa_expert(env: Any, task_id: str) -> list[tuple[str, str]]:
    """Search each supporting page in order, then answer: the path the gold data shows (our own wording)."""
    q = env.get_question(task_id)
    titles = list(dict.fromkeys(t for t, _ in q.supporting_facts))
    steps = []
    for i, title in enumerate(titles):
        thought = (f"I need to search {title} first." if i == 0 else f"Next I need to search {title}.")
        steps.append((thought, f"Search[{title}]"))
    steps.append((f"From these pages, the answer is {q.answer.strip()}.", f"Finish[{q.answer.strip()}]"))
    return steps


EXPERTS: dict[str, Callable[[Any, str], list[tuple[str, str]]]] = {"hotpotqa": hotpotqa_expert}


def expert_episodes(env: Any, env_name: str, task_ids: Iterable[str], share: float, memory_size: int,
                    rng: random.Random) -> list[Episode]:
    if env_name not in EXPERTS:
        raise UsageError(f"The {env_name} environment has no expert trajectories yet (--expert); "
                         f"envs with experts: {', '.join(sorted(EXPERTS))}.")
    from retroformer_cli.envs import get_spec
    from retroformer_cli.plugins import load_ref

    spec = get_spec(env_name)
    oracle = load_ref(spec.oracle, f"oracle of the {env_name} env") if spec.oracle and share > 0 else None
    out = []
    for task_id in task_ids:
        memory: list[str] = []
        if oracle is not None and memory_size > 0 and rng.random() < share:
            memory = [oracle(env, task_id)[0]]  # the hint that names what to search, never the answer
        out.append(Episode(task_id, memory, EXPERTS[env_name](env, task_id), "expert" + ("+hint" if memory else "")))
    return out


# ------------------------------------------------------------------------------------------------ replay
def replay(env: Any, prompts: Any, episode: Episode) -> list[dict[str, Any]] | None:
    """The step rows of ``episode`` replayed in ``env`` (prompts as ``run_episode`` builds them), or None when the
    replay does not end in success."""
    from retroformer_cli.agents.actor import scratchpad_step

    first_obs, _ = env.reset(options={"task_id": episode.task_id})
    scratchpad, rows, info = "", [], {}
    for n, (thought, action) in enumerate(episode.steps, start=1):
        messages = prompts.actor_messages(first_obs, episode.memory, scratchpad, n)
        rows.append({"messages": [{"role": m.role, "content": m.content} for m in messages],
                     "completion": f" {thought}\nAction {n}: {action}", "task_id": episode.task_id, "step": n,
                     "source": episode.source, "memory": list(episode.memory)})
        obs, _, terminated, truncated, info = env.step(action)
        scratchpad += scratchpad_step(n, thought, action, obs)
        if terminated or truncated:
            break
    return rows if info.get("success") else None


def build(cfg: ActorDataConfig, workspace: Workspace) -> ActorDataResult:
    """Replay every source's episodes and write the dataset folder atomically."""
    from retroformer_cli.agents.prompts.base import get_prompts
    from retroformer_cli.envs import make

    check_name(cfg.name)
    if not (0.0 <= cfg.val_fraction < 1.0):
        raise UsageError(f"val_fraction must be in [0, 1), got {cfg.val_fraction} (--val-fraction).")
    if not (cfg.runs or cfg.import_reflexion or cfg.expert):
        raise UsageError("Nothing to build from: pass --run NAME, --import-reflexion PATH or --expert.")
    env = make(cfg.env, data=cfg.data, cache_dir=workspace.cache_dir)
    prompts = get_prompts(cfg.env, cfg.few_shot)
    known = list(env.task_ids())
    train_ids = [t for t in known if split_of(t) == "train"]
    rng = random.Random(cfg.seed)
    episodes: list[Episode] = []
    for run in cfg.runs:
        episodes += run_episodes(workspace, run)
    for path in cfg.import_reflexion:
        episodes += reflexion_episodes(path, cfg.memory_size)
    if cfg.expert:
        ids = train_ids[: cfg.max_tasks] if cfg.max_tasks else train_ids
        episodes += expert_episodes(env, cfg.env, ids, cfg.expert_reflection_share, cfg.memory_size, rng)
    allowed, known_ids = set(train_ids), set(known)
    stats: dict[str, dict[str, int]] = {}
    rows: list[dict[str, Any]] = []
    per_source_tasks: dict[str, set[str]] = {}
    for ep in episodes:
        s = stats.setdefault(ep.source.split(":")[0], {"episodes": 0, "eval_split_skipped": 0, "unknown_task": 0,
                                                       "failed_replay": 0, "kept": 0, "rows": 0})
        s["episodes"] += 1
        if ep.task_id not in known_ids:
            s["unknown_task"] += 1
            continue
        if ep.task_id not in allowed:
            s["eval_split_skipped"] += 1
            continue
        tasks = per_source_tasks.setdefault(ep.source, set())
        if cfg.max_tasks and ep.task_id not in tasks and len(tasks) >= cfg.max_tasks:
            continue
        got = replay(env, prompts, ep)
        if got is None:
            s["failed_replay"] += 1
            continue
        tasks.add(ep.task_id)
        s["kept"] += 1
        s["rows"] += len(got)
        rows += got
    env.close()
    if not rows:
        raise DataError("No successful trajectory of a train-split task could be replayed: nothing to train on.",
                        hint="add --expert, more runs, or check --data")
    for r in rows:
        r["split"] = split_of(r["task_id"], cfg.val_fraction, salt=VAL_SALT, names=("validation", "train"))
    dest = workspace.datasets_dir / cfg.name
    counts = {"rows": len(rows), "train_rows": sum(r["split"] == "train" for r in rows),
              "validation_rows": sum(r["split"] == "validation" for r in rows),
              "tasks": len({r["task_id"] for r in rows}), "sources": stats}

    from retroformer_cli.config import to_dict

    def fill(tmp: Path) -> None:
        for split in ("train", "validation"):
            with (tmp / f"actor.{split}.jsonl").open("w", encoding="utf-8") as f:
                for r in rows:
                    if r["split"] == split:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
        manifest = {"schema_version": 1, "name": cfg.name, "kind": "actor", "env": cfg.env, "created_at": now_iso(),
                    "retroformer_version": __version__, "config": to_dict(cfg), "counts": counts,
                    "split_rule": "collect's train split only; validation: salted split of those tasks"}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")

    from retroformer_cli.store import write_dir_atomic

    write_dir_atomic(dest, fill)
    return ActorDataResult(cfg.name, dest, counts)


def render_rows(rows: Iterable[dict[str, Any]], tokenizer: Any) -> list[dict[str, str]]:
    """TRL prompt-completion rows (text): the prompt rendered as the engine renders it (final assistant turn
    continued); TRL appends the end-of-sequence token to the completion, which is where a step ends."""
    out = []
    for r in rows:
        prompt = tokenizer.apply_chat_template(r["messages"], tokenize=False, continue_final_message=True) \
            if getattr(tokenizer, "chat_template", None) else _plain(r["messages"])
        out.append({"prompt": prompt, "completion": r["completion"]})
    return out


def _plain(messages: list[dict[str, str]]) -> str:
    from retroformer_cli.llm.base import Message, messages_to_prompt

    return messages_to_prompt([Message(m["role"], m["content"]) for m in messages])
