"""`retroformer runs` (list the workspace's runs), `runs import` (published logs or exported runs into runs),
`retroformer show RUN [TASK]` (one task's trials in the terminal) and `retroformer report RUN...` (an HTML
report). Results go to stdout, logs to stderr."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import typer

from retroformer_cli.cli import _workspace, app, handle_errors, state

runs_app = typer.Typer(help="List the runs in the workspace (and their status), or import runs.",
                       invoke_without_command=True, no_args_is_help=False)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
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
        console.stderr.print("[dim]no runs yet[/]")
        return
    table = Table(title="Runs", title_justify="left")
    for col in ("run", "env", "status", "trials", "actor", "reflector", "started"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["run"], str(r["env"]), str(r["status"]), str(r["trials_written"]), console._short(r["actor"]) or "-",
                      console._short(r["reflector"]) or "none", str(r["started_at"] or "imported"))
    console.stdout.print(table)


@runs_app.command("import", epilog="Examples:\n\n"
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
    console.stderr.print(f"[dim]next: retroformer eval --run {made[0]['run']}[/]")


@app.command("show", epilog="Examples:\n\n  retroformer show reflexion-hotpotqa-react_reflexion\n\n"
                            "  retroformer show reflexion-hotpotqa-react_reflexion 5a8b57f25542995d1e6f1371")
@handle_errors
def show(
    run: str = typer.Argument(..., help="Run name (see `retroformer runs`)."),
    task: Optional[str] = typer.Argument(None, help="Task id, or a part of it that matches one task; omit to list tasks."),
) -> None:
    """Show one task's trials: steps, the reflections in the prompt and the reflection written after each trial."""
    from retroformer_cli import console
    from retroformer_cli.stages import show as show_stage

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


PriceInOpt = typer.Option(None, "--price-in", help="USD per million prompt tokens, for a cost estimate [default: the runs' model configs].")
PriceOutOpt = typer.Option(None, "--price-out", help="USD per million completion tokens, for a cost estimate.")
CompareOpt = typer.Option(None, "--compare", help="Compare two runs task by task: --compare A B.")


@app.command("report", epilog="Examples:\n\n  retroformer report my-run\n\n"
                              "  retroformer report reflexion-hotpotqa-react_reflexion reflexion-hotpotqa-react_base -o report.html")
@handle_errors
def report(
    runs: List[str] = typer.Argument(..., help="Run(s) to put in the report."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file [default: reports/<runs>.html]."),
    compare: Optional[Tuple[str, str]] = CompareOpt,
    price_in: Optional[float] = PriceInOpt,
    price_out: Optional[float] = PriceOutOpt,
) -> None:
    """Write one self-contained HTML report: success plot with intervals, sortable task table, trials side by side."""
    from retroformer_cli import console
    from retroformer_cli.stages import report as report_stage
    from retroformer_cli.stages.evaluate import Prices

    pairs = [tuple(compare)] if compare else []
    path = report_stage.write(_workspace(), runs, output, pairs=pairs, prices=Prices(price_in, price_out))
    if state.json:
        console.print_json({"report": str(path)})
    else:
        console.stdout.print(str(path))
