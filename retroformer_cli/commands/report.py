"""`retroformer report RUN...`: one self-contained HTML report (success plot with intervals, sortable task
table, trials side by side). The report's path goes to stdout."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retroformer_cli.commands.context import CompareOpt, PriceInOpt, PriceOutOpt, command_app, handle_errors, state
from retroformer_cli.commands.context import workspace as _workspace

app = command_app()


@app.command("report", epilog="Examples:\n\n  retroformer report my-run\n\n"
                              "  retroformer report reflexion-hotpotqa-react_reflexion reflexion-hotpotqa-react_base -o report.html")
@handle_errors
def report(
    runs: List[str] = typer.Argument(..., help="Run(s) to put in the report."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file [default: reports/<runs>.html]."),
    compare: CompareOpt = None,
    price_in: PriceInOpt = None,
    price_out: PriceOutOpt = None,
) -> None:
    """Write one self-contained HTML report: success plot with intervals, sortable task table, trials side by side."""
    from retroformer_cli import console
    from retroformer_cli.analysis import report as report_stage
    from retroformer_cli.stages.evaluate import Prices

    pairs = [tuple(compare)] if compare else []
    path = report_stage.write(_workspace(), runs, output, pairs=pairs, prices=Prices(price_in, price_out))
    if state.json:
        console.print_json({"report": str(path)})
    else:
        console.stdout.print(str(path))
