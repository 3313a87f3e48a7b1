"""`retroformer eval`: success per trial, mean score, steps and tokens for one or more runs, plus a plot.

Success at trial k is cumulative, as in the Reflexion and Retroformer papers: the fraction of tasks
solved at any trial <= k (a solved task stops, so its success carries forward). Mean score at trial k
uses each task's latest trial <= k.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from retroformer_cli.records import Trial
from retroformer_cli.workspace import Workspace


@dataclass
class RunReport:
    run: str
    env: str | None
    actor: str | None
    reflector: str | None
    status: str | None
    tasks: int
    trials: int  # K: the largest trial index configured (or seen)
    success_per_trial: list[float]  # cumulative
    score_per_trial: list[float]
    f1_per_trial: list[float] | None
    mean_steps: float
    tokens: int
    by_group: dict[str, list[float]] = field(default_factory=dict)  # e.g. per task type (ALFWorld)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def report_run(workspace: Workspace, run: str, trials: Sequence[Trial] | None = None) -> RunReport:
    from retroformer_cli.stages.collect import load_trials

    manifest = workspace.read_manifest(run)
    trials = list(trials) if trials is not None else load_trials(workspace, run)
    cfg = manifest.get("config") or {}
    k_max = max([cfg.get("trials") or 0] + [t.trial for t in trials]) or 1
    task_ids = manifest.get("task_ids") or sorted({t.task_id for t in trials})
    by_task: dict[str, dict[int, Trial]] = defaultdict(dict)
    for t in trials:
        by_task[t.task_id][t.trial] = t

    def latest(task: str, k: int) -> Trial | None:
        ts = by_task.get(task, {})
        best = [i for i in ts if i <= k]
        return ts[max(best)] if best else None

    n = max(1, len(task_ids))
    success, score, f1 = [], [], []
    has_f1 = any("f1" in t.info for t in trials)
    for k in range(1, k_max + 1):
        s = sc = f = 0.0
        for task in task_ids:
            solved = any(t.success for i, t in by_task.get(task, {}).items() if i <= k)
            s += solved
            last = latest(task, k)
            if last is not None:
                sc += last.score
                f += float(last.info.get("f1", 0.0) or 0.0)
        success.append(s / n)
        score.append(sc / n)
        f1.append(f / n)
    groups: dict[str, list[float]] = {}
    group_key = "task_type"
    if any(group_key in t.info for t in trials):
        members: dict[str, set[str]] = defaultdict(set)
        for t in trials:
            members[str(t.info.get(group_key))].add(t.task_id)
        for g, ids in sorted(members.items()):
            groups[g] = [sum(any(t.success for i, t in by_task[x].items() if i <= k) for x in ids) / len(ids)
                         for k in range(1, k_max + 1)]
    models = manifest.get("models") or {}
    return RunReport(
        run=run, env=manifest.get("env"), actor=(models.get("actor") or {}).get("model_id"),
        reflector=(models.get("reflector") or {}).get("model_id"), status=manifest.get("status"),
        tasks=len(task_ids), trials=k_max, success_per_trial=success, score_per_trial=score,
        f1_per_trial=f1 if has_f1 else None,
        mean_steps=(sum(len(t.steps) for t in trials) / len(trials)) if trials else 0.0,
        tokens=sum(t.prompt_tokens + t.completion_tokens for t in trials), by_group=groups,
    )


def plot(reports: Sequence[RunReport], path: Path) -> Path:
    """Success rate vs trial, one line per run, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # runs that coincide stay visible
    for i, r in enumerate(reports):
        xs = list(range(1, len(r.success_per_trial) + 1))
        line, marker = styles[i % len(styles)]
        ax.plot(xs, [100 * v for v in r.success_per_trial], linestyle=line, marker=marker, markersize=7 - i % 3,
                label=r.run)
    ax.set_xlabel("trial")
    ax.set_ylabel("success rate (%)")
    ax.set_title(f"{reports[0].env or ''} success per trial".strip())
    ax.set_ylim(-2, 102)
    ax.set_xticks(range(1, max(len(r.success_per_trial) for r in reports) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def run(workspace: Workspace, runs: Sequence[str], *, plot_path: Path | None = None) -> dict[str, Any]:
    """Report on existing runs; writes ``reports/<name>.json`` and a PNG plot."""
    from retroformer_cli.store import write_json_atomic

    reports = [report_run(workspace, r) for r in runs]
    name = "-vs-".join(runs) if len(runs) <= 3 else f"{runs[0]}-and-{len(runs) - 1}-more"
    name = name[:150]
    plot_path = plot_path or workspace.reports_dir / f"{name}.png"
    plot(reports, plot_path)
    data = {"runs": [r.to_json() for r in reports], "plot": str(plot_path)}
    write_json_atomic(workspace.reports_dir / f"{name}.json", data)
    return data
