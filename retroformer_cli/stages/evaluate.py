"""`retroformer eval`: success per trial with 95% intervals, mean score, steps, tokens and cost for one or more
runs, paired comparisons of two runs on their shared tasks, and a plot.

Success at trial k is cumulative, as in the Reflexion and Retroformer papers: the fraction of tasks
solved at any trial <= k (a solved task stops, so its success carries forward). Mean score at trial k
uses each task's latest trial <= k. Intervals are Wilson score intervals over the run's tasks; a paired
comparison reports, per trial, the difference A - B, its Bonett-Price 95% interval, the tasks won and lost and
the exact McNemar p-value (:mod:`retroformer_cli.analysis.stats`).
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
    solved_per_trial: list[int] = field(default_factory=list)  # cumulative counts (success_per_trial * tasks)
    success_ci_per_trial: list[list[float]] = field(default_factory=list)  # Wilson 95% [low, high]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_per_solved: float | None = None  # all tokens of the run / tasks solved
    cost_usd: float | None = None  # with prices per million tokens (flags or the run's model configs)
    cost_per_solved_usd: float | None = None
    imported: dict[str, Any] | None = None  # where an imported run came from
    env_errors: int = 0  # tasks whose last trial ended in an env error (not the agent's failure)
    diagnostic: str | None = None  # "oracle" / "oracle-leak": the reflector wrote from gold data (agents/oracle.py)
    sensitivity: dict[str, Any] = field(default_factory=dict)  # reflection_sensitivity(): pairs, changed_share, ...

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Prices:
    """USD per million tokens; ``None`` fields fall back to each run's stored model config."""

    prompt: float | None = None
    completion: float | None = None


def _cost(manifest: dict[str, Any], trials: Sequence[Trial], prices: Prices | None) -> float | None:
    """Actor and reflector tokens at their prices (flags first, then the run's ``price_*_per_m`` settings)."""
    cfg = manifest.get("config") or {}
    refl_in = sum(t.reflection.prompt_tokens for t in trials if t.reflection)
    refl_out = sum(t.reflection.completion_tokens for t in trials if t.reflection)
    parts = {"actor": (sum(t.prompt_tokens for t in trials) - refl_in, sum(t.completion_tokens for t in trials) - refl_out),
             "reflector": (refl_in, refl_out)}
    if not any(tin + tout for tin, tout in parts.values()):
        return None  # no tokens recorded (imported logs): no estimate rather than a misleading 0
    total = 0.0
    for role, (tin, tout) in parts.items():
        role_cfg = cfg.get(role) if isinstance(cfg.get(role), dict) else {}
        p_in = prices.prompt if prices and prices.prompt is not None else role_cfg.get("price_in_per_m")
        p_out = prices.completion if prices and prices.completion is not None else role_cfg.get("price_out_per_m")
        if tin + tout == 0:
            continue
        if p_in is None or p_out is None:
            return None
        total += (tin * float(p_in) + tout * float(p_out)) / 1e6
    return total


def reflection_sensitivity(trials: Sequence[Trial]) -> dict[str, Any]:
    """How the actor responds to reflections: over consecutive trials (k, k+1) of a task where trial k+1 had a
    reflection in its prompt (``memory``), ``changed_share`` is the share whose action sequence differs from trial
    k's, ``score_change_after_reflection`` the mean of score(k+1) - score(k), and ``pairs`` their count (both
    None without pairs). Trials that ended in an env error are left out (not the actor's doing).

    >>> from retroformer_cli.records import Step
    >>> def t(k, acts, score, memory=()):
    ...     return Trial("r", "hotpotqa", "q", k, "", [Step("", a, "") for a in acts], score == 1, score, True, False,
    ...                  list(memory), None, "a", "b", [])
    >>> reflection_sensitivity([t(1, ["Finish[x]"], 0.0), t(2, ["Search[y]", "Finish[y]"], 1.0, ["plan"])])
    {'pairs': 1, 'changed_share': 1.0, 'score_change_after_reflection': 1.0}
    """
    by_task: dict[str, dict[int, Trial]] = defaultdict(dict)
    for t in trials:
        by_task[t.task_id][t.trial] = t
    changed, deltas = 0, []
    for ks in by_task.values():
        for k, before in ks.items():
            after = ks.get(k + 1)
            if after is None or not after.memory or before.env_error or after.env_error:
                continue
            changed += [s.action for s in before.steps] != [s.action for s in after.steps]
            deltas.append(float(after.score) - float(before.score))
    n = len(deltas)
    return {"pairs": n, "changed_share": changed / n if n else None,
            "score_change_after_reflection": sum(deltas) / n if n else None}


def outcomes(workspace: Workspace, run: str) -> tuple[dict[str, Any], dict[str, dict[int, Trial]]]:
    """A run's manifest and its trials by task and trial number."""
    from retroformer_cli.stages.collect import load_trials

    manifest = workspace.read_manifest(run)
    by_task: dict[str, dict[int, Trial]] = defaultdict(dict)
    for t in load_trials(workspace, run):
        by_task[t.task_id][t.trial] = t
    return manifest, by_task


def report_run(workspace: Workspace, run: str, trials: Sequence[Trial] | None = None,
               prices: Prices | None = None) -> RunReport:
    from retroformer_cli.agents.oracle import diagnostic_of, diagnostic_trials
    from retroformer_cli.stages.collect import load_trials
    from retroformer_cli.analysis.stats import wilson

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
    solved = [round(v * len(task_ids)) for v in success]
    tokens = sum(t.prompt_tokens + t.completion_tokens for t in trials)
    final_solved = solved[-1] if solved else 0
    cost = _cost(manifest, trials, prices)
    imported = manifest.get("imported")
    return RunReport(
        run=run, env=manifest.get("env"), actor=(models.get("actor") or {}).get("model_id"),
        reflector=(models.get("reflector") or {}).get("model_id"), status=manifest.get("status"),
        tasks=len(task_ids), trials=k_max, success_per_trial=success, score_per_trial=score,
        f1_per_trial=f1 if has_f1 else None,
        mean_steps=(sum(len(t.steps) for t in trials) / len(trials)) if trials else 0.0,
        tokens=tokens, by_group=groups, solved_per_trial=solved,
        success_ci_per_trial=[list(wilson(s_, len(task_ids))) for s_ in solved],
        prompt_tokens=sum(t.prompt_tokens for t in trials), completion_tokens=sum(t.completion_tokens for t in trials),
        tokens_per_solved=(tokens / final_solved) if final_solved and tokens else None,
        cost_usd=cost, cost_per_solved_usd=(cost / final_solved) if cost is not None and final_solved else None,
        imported={k: imported.get(k) for k in ("format", "source", "agent") if k in imported} if imported else None,
        env_errors=sum(1 for task in task_ids if by_task.get(task) and by_task[task][max(by_task[task])].env_error),
        diagnostic=diagnostic_of(manifest) or diagnostic_trials(trials),
        sensitivity=reflection_sensitivity(trials),
    )


def compare(workspace: Workspace, run_a: str, run_b: str) -> dict[str, Any]:
    """Paired comparison of two runs on the tasks both have, per trial, plus warnings about what differs."""
    from retroformer_cli.analysis.stats import paired

    (ma, ta), (mb, tb) = outcomes(workspace, run_a), outcomes(workspace, run_b)
    ids_a = list(ma.get("task_ids") or sorted(ta))
    ids_b = set(mb.get("task_ids") or sorted(tb))
    shared = [t for t in ids_a if t in ids_b]
    warnings = []
    only_a, only_b = len(set(ids_a) - ids_b), len(ids_b - set(ids_a))
    if only_a or only_b:
        warnings.append(f"the runs' task sets differ: {only_a} task(s) only in {run_a}, {only_b} only in {run_b}; "
                        f"the comparison uses the {len(shared)} shared task(s)")
    if ma.get("env") != mb.get("env"):
        warnings.append(f"the runs are on different envs ({ma.get('env')} vs {mb.get('env')})")
    actor_a = ((ma.get("models") or {}).get("actor") or {}).get("model_id")
    actor_b = ((mb.get("models") or {}).get("actor") or {}).get("model_id")
    if actor_a != actor_b:
        warnings.append(f"the actors differ ({actor_a} vs {actor_b}): differences are not the reflectors' alone")
    k_a = max([(ma.get("config") or {}).get("trials") or 0] + [k for ts in ta.values() for k in ts])
    k_b = max([(mb.get("config") or {}).get("trials") or 0] + [k for ts in tb.values() for k in ts])
    if k_a != k_b:
        warnings.append(f"the runs have different trial counts ({k_a} vs {k_b}); trials past the shorter run carry "
                        "its last outcome forward")

    def solved(by_task: dict[str, dict[int, Trial]], task: str, k: int) -> bool:
        return any(t.success for i, t in by_task.get(task, {}).items() if i <= k)

    per_trial = [paired([solved(ta, x, k) for x in shared], [solved(tb, x, k) for x in shared], trial=k).to_json()
                 for k in range(1, max(k_a, k_b, 1) + 1)]
    return {"a": run_a, "b": run_b, "shared_tasks": len(shared), "per_trial": per_trial, "warnings": warnings}


def figure(reports: Sequence[RunReport]) -> Any:
    """Success rate vs trial, one line per run, with its 95% Wilson interval as a band (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # runs that coincide stay visible
    for i, r in enumerate(reports):
        xs = list(range(1, len(r.success_per_trial) + 1))
        line, marker = styles[i % len(styles)]
        (drawn,) = ax.plot(xs, [100 * v for v in r.success_per_trial], linestyle=line, marker=marker,
                           markersize=7 - i % 3, label=r.run)
        if r.success_ci_per_trial:
            ax.fill_between(xs, [100 * lo for lo, _ in r.success_ci_per_trial],
                            [100 * hi for _, hi in r.success_ci_per_trial], color=drawn.get_color(), alpha=0.12,
                            linewidth=0)
    ax.set_xlabel("trial")
    ax.set_ylabel("success rate (%)")
    ax.set_title(f"{reports[0].env or ''} success per trial".strip())
    ax.set_ylim(-2, 102)
    ax.set_xticks(range(1, max(len(r.success_per_trial) for r in reports) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.text(0.99, 0.01, "bands: 95% Wilson intervals", transform=ax.transAxes, ha="right", va="bottom",
            fontsize=7, alpha=0.7)
    fig.tight_layout()
    return fig


def plot(reports: Sequence[RunReport], path: Path) -> Path:
    """The success-per-trial figure as a PNG, written atomically."""
    import matplotlib.pyplot as plt

    fig = figure(reports)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix or '.png'}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def report_name(runs: Sequence[str]) -> str:
    name = "-vs-".join(runs) if len(runs) <= 3 else f"{runs[0]}-and-{len(runs) - 1}-more"
    return name[:150]


def run(workspace: Workspace, runs: Sequence[str], *, plot_path: Path | None = None,
        pairs: Sequence[tuple[str, str]] = (), prices: Prices | None = None) -> dict[str, Any]:
    """Report on existing runs; writes ``reports/<name>.json`` and a PNG plot.

    ``pairs`` are compared task by task; with exactly two runs that share task ids they are compared anyway.
    """
    from retroformer_cli.store import write_json_atomic

    runs = list(dict.fromkeys([*runs, *(r for pair in pairs for r in pair)]))
    reports = [report_run(workspace, r, prices=prices) for r in runs]
    pairs = list(pairs)
    if not pairs and len(runs) == 2:
        (ma, _), (mb, _) = outcomes(workspace, runs[0]), outcomes(workspace, runs[1])
        if set(ma.get("task_ids") or []) & set(mb.get("task_ids") or []):
            pairs = [(runs[0], runs[1])]
    comparisons = [compare(workspace, a, b) for a, b in pairs]
    env_warnings = [f"run {r.run}: {r.env_errors} task(s) ended in an env error (the env failed, not the agent); "
                    f"they count as unsolved; `retroformer collect --run {r.run} --resume` replays them"
                    for r in reports if r.env_errors]
    env_warnings += [f"run {r.run} is a diagnostic: its reflector '{r.diagnostic}' wrote from the gold data "
                     "(no model), so its success bounds what a reflector could do and is no reflector's result"
                     for r in reports if r.diagnostic]
    name = report_name(runs)
    plot_path = plot_path or workspace.reports_dir / f"{name}.png"
    plot(reports, plot_path)
    data = {"runs": [r.to_json() for r in reports], "comparisons": comparisons,
            "warnings": env_warnings + [w for c in comparisons for w in c["warnings"]], "plot": str(plot_path),
            "intervals": "95% Wilson score intervals over tasks; paired: Bonett-Price interval, exact McNemar p"}
    write_json_atomic(workspace.reports_dir / f"{name}.json", data)
    return data
