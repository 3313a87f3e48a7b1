"""`retroformer show RUN [TASK]`: one task's trials in the terminal (steps, reflections in the prompt, the
reflection written after each trial), or the run's task list. Results go to stdout."""

from __future__ import annotations

from typing import Optional

import typer

from retroformer_cli.commands.context import command_app, handle_errors, state
from retroformer_cli.commands.context import workspace as _workspace

app = command_app()


@app.command("show", epilog="Examples:\n\n  retroformer show reflexion-hotpotqa-react_reflexion\n\n"
                            "  retroformer show reflexion-hotpotqa-react_reflexion 5a8b57f25542995d1e6f1371")
@handle_errors
def show(
    run: str = typer.Argument(..., help="Run name (see `retroformer runs`)."),
    task: Optional[str] = typer.Argument(None, help="Task id, or a part of it that matches one task; omit to list tasks."),
) -> None:
    """Show one task's trials: steps, the reflections in the prompt and the reflection written after each trial."""
    from retroformer_cli import console
    from retroformer_cli.analysis import show as show_stage

    ws = _workspace()
    if task is None:
        rows = show_stage.task_rows(ws, run)
        if state.json:
            console.print_json(rows)
        else:
            console.stdout.print(console.task_list_table(run, rows))
        return
    task_id, trials = show_stage.task_trials(ws, run, task)
    if state.json:
        console.print_json({"run": run, "task": task_id, "trials": [t.to_json() for t in trials]})
        return
    console.stdout.print(console.task_view(run, task_id, trials))
