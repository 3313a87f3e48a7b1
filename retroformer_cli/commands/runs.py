"""`retroformer runs` (list the workspace's runs) and `runs import` (published logs or exported runs into runs).
Results go to stdout, logs to stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from retroformer_cli.commands.context import command_app, handle_errors, state
from retroformer_cli.commands.context import workspace as _workspace

app = command_app(help="List the runs in the workspace (and their status), or import runs.",
                  invoke_without_command=True, no_args_is_help=False)


@app.callback()
@handle_errors
def runs_(ctx: typer.Context) -> None:
    """List the runs in the workspace and their status (`runs import` adds runs from logs)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from retroformer_cli import console

    rows = _workspace().list_runs()
    if state.json:
        console.print_json(rows)
        return
    if not rows:
        console.log(("no runs yet", "dim"))
        return
    table = Table(title="Runs", title_justify="left")
    for col in ("run", "env", "status", "trials", "actor", "reflector", "started"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run"], str(r["env"]), str(r["status"]), str(r["trials_written"]), console.short_model_id(r["actor"]) or "-",
                      (console.short_model_id(r["reflector"]) or "none")
                      + (f" (diagnostic: {r['diagnostic']})" if r.get("diagnostic") else ""),
                      str(r["started_at"] or "imported"))
    console.stdout.print(table)


@app.command("import", epilog="Examples:\n\n"
                  "  retroformer runs import ../shared/data/hotpotqa/reflexion_logs/trials.jsonl\n\n"
                  "  retroformer runs import ../shared/data/alfworld/reflexion_logs/reflexion_run_logs\n\n"
                  "  retroformer runs import ../other-workspace/runs/my-run --name my-run-from-laptop")
@handle_errors
def runs_import(
    path: Path = typer.Argument(..., help="Reflexion's HotPotQA trials.jsonl or .txt logs (file or folder), a folder of "
                                          "ALFWorld env_results_trial_N.json, or a run folder from another workspace."),
    prefix: str = typer.Option("reflexion", "--prefix", help="Run names for logs: PREFIX-ENV-AGENT."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the run (only when the input holds one run)."),
    data: Optional[Path] = typer.Option(None, "--data", help="HotPotQA data file: maps text logs' questions to HotPotQA ids."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace runs of the same name."),
) -> None:
    """Turn logs into runs of this workspace: eval, show, report and datasets read them like collected runs."""
    from rich.table import Table

    from retroformer_cli import console
    from retroformer_cli.stages import run_import

    made = run_import.import_runs(_workspace(), path, prefix=prefix, name=name, overwrite=overwrite, data=data)
    if state.json:
        console.print_json(made)
        return
    table = Table(title=f"Imported from {path}", title_justify="left")
    for col in ("run", "env", "tasks", "trials", "format"):
        table.add_column(col)
    for r in made:
        table.add_row(r["run"], str(r["env"]), str(r["tasks"]), str(r["trials"]), r["format"])
    console.stdout.print(table)
    console.log((f"next: retroformer eval --run {made[0]['run']}", "dim"))
