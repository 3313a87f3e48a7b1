"""`retroformer datasets build`: rate every reflection and write the rating, SFT, preference and RL prompt sets.
Its options are the fields of ``stages.datasets.DatasetConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import List

from retroformer_cli.commands._common import build, command_app, handle_errors, state, workspace
from retroformer_cli.options import Flag, config_options
from retroformer_cli.stages.datasets import DatasetConfig

app = command_app(no_args_is_help=True)

DATASET_FLAGS = (
    Flag("runs", ("-r",), name="--run"), Flag("import_tsv", cli_type=List[Path]),
    Flag("import_reflexion", cli_type=List[Path]), Flag("name"), Flag("val_fraction"), Flag("pair_scope"),
    Flag("max_pairs_per_task"), Flag("min_rating_gap"), Flag("pair_on"),
)


@app.callback()
def datasets() -> None:
    """Build rating, SFT, preference and RL prompt sets from runs and imported logs."""


@app.command("build", epilog="Examples:\n\n  retroformer datasets build --run demo\n\n"
                             "  retroformer datasets build --import-reflexion ../shared/data/hotpotqa/reflexion_logs/trials.jsonl --name reflexion\n\n"
                             "  retroformer datasets build --import-tsv ratings.tsv --import-reflexion alfworld_logs/ --pair-scope env")
@handle_errors
@config_options(DatasetConfig, DATASET_FLAGS)
def datasets_build(overrides: dict) -> None:
    """Rate every reflection by G(k+1) - G(k) and write ratings, sft, pairs and prompts sets."""
    from retroformer_cli import console
    from retroformer_cli.stages import datasets

    res = datasets.build(build(DatasetConfig, overrides), workspace())
    if state.json:
        console.print_json(res.to_json())
    c = res.counts
    console.stderr.print(f"[green]done[/]: dataset {res.name}: {c['ratings']} rated reflection(s) from {c['tasks']} task(s) "
                         f"({c['positive']} improved, {c['zero']} unchanged, {c['negative']} worse); sft "
                         f"{c['sft.train']}/{c['sft.validation']}, pairs {c['pairs.train']}/{c['pairs.validation']}, "
                         f"prompts {c['prompts.train']}/{c['prompts.validation']} (train/validation) in {res.path}")
