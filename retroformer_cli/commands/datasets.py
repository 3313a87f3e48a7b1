"""`retroformer datasets build`: rate every reflection and write the rating, SFT, preference and RL prompt sets.
Its options are the fields of ``stages.datasets.DatasetConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import List

from retroformer_cli.commands._common import build, command_app, handle_errors, state, workspace
from retroformer_cli.options import Flag, config_options
from retroformer_cli.stages.actor_data import ActorDataConfig
from retroformer_cli.stages.datasets import DatasetConfig

app = command_app(no_args_is_help=True)

DATASET_FLAGS = (
    Flag("runs", ("-r",), name="--run"), Flag("import_tsv", cli_type=List[Path]),
    Flag("import_reflexion", cli_type=List[Path]), Flag("name"), Flag("val_fraction"), Flag("pair_scope"),
    Flag("max_pairs_per_task"), Flag("min_rating_gap"), Flag("pair_on"), Flag("sft_on"),
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
    console.log(("done", "green"), f": dataset {res.name}: {c['ratings']} rated reflection(s) from {c['tasks']} task(s) "
                         f"({c['positive']} improved, {c['zero']} unchanged, {c['negative']} worse); sft "
                         f"{c['sft.train']}/{c['sft.validation']}, pairs {c['pairs.train']}/{c['pairs.validation']}, "
                         f"prompts {c['prompts.train']}/{c['prompts.validation']} (train/validation) in {res.path}")


ACTOR_FLAGS = (
    Flag("env", ("-e",)), Flag("data", cli_type=Path), Flag("name"), Flag("runs", ("-r",), name="--run"),
    Flag("import_reflexion", cli_type=List[Path]), Flag("expert"), Flag("expert_reflection_share"),
    Flag("memory_size"), Flag("few_shot"), Flag("max_tasks"), Flag("val_fraction"), Flag("seed"),
)


@app.command("actor", epilog="Examples:\n\n  retroformer datasets actor --env hotpotqa --data ../shared/data/hotpotqa/dev.jsonl "
                             "--import-reflexion ../shared/data/hotpotqa/reflexion_logs/trials.jsonl\n\n"
                             "  retroformer datasets actor --run my-run --no-expert --name actor-own")
@handle_errors
@config_options(ActorDataConfig, ACTOR_FLAGS)
def datasets_actor(overrides: dict) -> None:
    """Step-level SFT rows for the actor (FireAct-style): successful trajectories of train-split tasks, replayed in
    the env so every prompt is exactly what collect sends. Train with `retroformer sft --role actor`."""
    from retroformer_cli import console
    from retroformer_cli.stages import actor_data

    res = actor_data.build(build(ActorDataConfig, overrides), workspace())
    if state.json:
        console.print_json(res.to_json())
    c = res.counts
    kept = ", ".join(f"{k} {v['kept']}/{v['episodes']}" for k, v in c["sources"].items())
    console.log(("done", "green"), f": actor dataset {res.name}: {c['train_rows']}/{c['validation_rows']} step rows "
                         f"(train/validation) from {c['tasks']} task(s); episodes kept per source: {kept}; in {res.path}")
