"""`retroformer eval`: success per trial for runs, paired comparisons and cost; with --env it first runs the
evaluation protocol (collect on the eval split) with collect's options."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retroformer_cli.commands.context import (CompareOpt, PriceInOpt, PriceOutOpt, RayOpt, command_app, config_command,
                                              examples, state, workspace)
from retroformer_cli.commands.collect import MODEL_FLAGS, TASK_FLAGS, build_collect_config, run_collect
from retroformer_cli.config import CollectConfig
from retroformer_cli.errors import UsageError

app = command_app()


def _protocol_run(overrides: dict, ray: str | None = None) -> tuple[str, object]:
    """Collect on the env's protocol split (unless --split or the YAML sets one); the new run's name."""
    from retroformer_cli.config import load_yaml
    from retroformer_cli.envs import protocol_split

    cfg, ws = build_collect_config(overrides, resume=False)
    yaml_split = state.config is not None and "split" in load_yaml(state.config)
    if "split" not in overrides and not yaml_split:
        cfg.split = protocol_split(cfg.env)
    return run_collect(cfg, ws, resume=False, label="eval", ray=ray).run, ws


@config_command(app.command("eval", epilog=examples(
    "retroformer eval --run react --run reflexion",
    "retroformer eval --env hotpotqa --tasks 5 --trials 3   (collect on the eval split, then report)",
    "retroformer --json eval --run my-run | jq '.runs[0].success_per_trial'")),
                CollectConfig, TASK_FLAGS, MODEL_FLAGS)
def eval_(
    runs: Optional[List[str]] = typer.Option(None, "--run", "-r", help="Run(s) to report; repeat to compare."),
    compare: CompareOpt = None,
    price_in: PriceInOpt = None,
    price_out: PriceOutOpt = None,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the PNG plot [default: reports/]."),
    ray: RayOpt = None,
    *,
    overrides: dict,
) -> None:
    """Success per trial for runs; with --env, first run the evaluation protocol (collect on the eval split)."""
    from retroformer_cli import console
    from retroformer_cli.stages import evaluate
    from retroformer_cli.stages.evaluate import Prices

    ws = workspace()
    runs = list(runs or [])
    pairs = [tuple(compare)] if compare else []
    if ray is not None and "env" not in overrides:
        raise UsageError("--ray plays episodes: it goes with --env (eval --env runs the protocol on the cluster).")
    if "env" in overrides:
        run, ws = _protocol_run(overrides, ray)
        runs.append(run)
    if not runs and not pairs:
        raise UsageError("Nothing to evaluate: pass --run NAME (see `retroformer runs`) or --env ENV to run the protocol.")
    data_out = evaluate.run(ws, runs, plot_path=plot, pairs=pairs, prices=Prices(price_in, price_out))
    for warning in data_out["warnings"]:
        console.warning(warning)
    if state.json:
        console.print_json(data_out)
        return
    reports = [evaluate.RunReport(**r) for r in data_out["runs"]]
    console.stdout.print(console.eval_table(reports))
    for r in reports:
        t = console.group_table(r)
        if t is not None:
            console.stdout.print(t)
    for comparison in data_out["comparisons"]:
        console.stdout.print(console.comparison_table(comparison))
    console.log((f"plot: {data_out['plot']}  (HTML report: retroformer report {' '.join(runs)})", "dim"))
