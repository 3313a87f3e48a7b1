"""`retroformer show RUN [TASK]`: what happened at one task, trial by trial (data for the terminal and for JSON).

Without a task, the run's tasks in a table (solved at which trial, score, steps, tokens) so one can be picked.
A task may be named by its id, or by any part of it that matches one task only (ALFWorld ids are long paths).
"""

from __future__ import annotations

from typing import Any

from retroformer_cli.errors import UsageError
from retroformer_cli.records import Trial
from retroformer_cli.workspace import Workspace


def task_rows(workspace: Workspace, run: str) -> list[dict[str, Any]]:
    """One row per task of the run, in the run's task order."""
    from retroformer_cli.stages.evaluate import outcomes

    manifest, by_task = outcomes(workspace, run)
    ids = list(manifest.get("task_ids") or sorted(by_task))
    rows = []
    for task in ids:
        trials = [by_task[task][k] for k in sorted(by_task.get(task, {}))]
        solved_at = next((t.trial for t in trials if t.success), None)
        rows.append({"task": task, "solved_at": solved_at, "trials": len(trials),
                     "score": trials[-1].score if trials else None,
                     "steps": sum(len(t.steps) for t in trials),
                     "tokens": sum(t.prompt_tokens + t.completion_tokens for t in trials),
                     "reflections": sum(1 for t in trials if t.reflection and t.reflection.text),
                     "instruction": trials[0].instruction if trials else ""})
    return rows


def resolve_task(workspace: Workspace, run: str, task: str) -> str:
    from retroformer_cli.stages.evaluate import outcomes

    manifest, by_task = outcomes(workspace, run)
    ids = list(manifest.get("task_ids") or sorted(by_task))
    if task in ids:
        return task
    matches = [t for t in ids if task in t]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:5]) + (" ..." if len(matches) > 5 else "")
        raise UsageError(f"'{task}' matches {len(matches)} tasks of run '{run}': {shown}.",
                         hint="give more of the task id")
    raise UsageError(f"Run '{run}' has no task '{task}'.", hint=f"list its tasks with: retroformer show {run}")


def task_trials(workspace: Workspace, run: str, task: str) -> tuple[str, list[Trial]]:
    from retroformer_cli.stages.evaluate import outcomes

    task = resolve_task(workspace, run, task)
    _, by_task = outcomes(workspace, run)
    return task, [by_task[task][k] for k in sorted(by_task.get(task, {}))]
