"""`retroformer datasets build`: rate every reflection and write the rating, SFT, preference and RL prompt sets.
Its options are the fields of ``stages.datasets.DatasetConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import List

from retroformer_cli.commands.context import build, config_command, done, examples, group_app, workspace
from retroformer_cli.options import Flag
from retroformer_cli.stages.actor_data import ActorDataConfig
from retroformer_cli.stages.datasets import DatasetConfig

app = group_app("Build rating, SFT, preference and RL prompt sets from runs and imported logs.")

DATASET_FLAGS = (
    Flag("runs", ("-r",), name="--run"), Flag("import_tsv", cli_type=List[Path]),
    Flag("import_reflexion", cli_type=List[Path]), Flag("name"), Flag("val_fraction"), Flag("pair_scope"),
    Flag("max_pairs_per_task"), Flag("min_rating_gap"), Flag("pair_on"), Flag("sft_on"),
)


@config_command(app.command("build", epilog=examples(
    "retroformer datasets build --run demo",
    "retroformer datasets build --import-reflexion ../shared/data/hotpotqa/reflexion_logs/trials.jsonl --name reflexion",
    "retroformer datasets build --import-tsv ratings.tsv --import-reflexion alfworld_logs/ --pair-scope env")),
                DatasetConfig, DATASET_FLAGS)
def datasets_build(overrides: dict) -> None:
    """Rate every reflection by G(k+1) - G(k) and write ratings, sft, pairs and prompts sets."""
    from retroformer_cli.stages import datasets

    res = datasets.build(build(DatasetConfig, overrides), workspace())
    c = res.counts
    done(res, f"dataset {res.name}: {c['ratings']} rated reflection(s) from {c['tasks']} task(s) ({c['positive']} "
              f"improved, {c['zero']} unchanged, {c['negative']} worse); sft {c['sft.train']}/{c['sft.validation']}, "
              f"pairs {c['pairs.train']}/{c['pairs.validation']}, prompts {c['prompts.train']}/"
              f"{c['prompts.validation']} (train/validation) in {res.path}")


ACTOR_FLAGS = (
    Flag("env", ("-e",)), Flag("data", cli_type=Path), Flag("name"), Flag("runs", ("-r",), name="--run"),
    Flag("import_reflexion", cli_type=List[Path]), Flag("expert"), Flag("expert_reflection_share"),
    Flag("memory_size"), Flag("few_shot"), Flag("max_tasks"), Flag("val_fraction"), Flag("seed"),
)


@config_command(app.command("actor", epilog=examples(
    "retroformer datasets actor --env hotpotqa --data ../shared/data/hotpotqa/dev.jsonl --import-reflexion ../shared/data/hotpotqa/reflexion_logs/trials.jsonl",
    "retroformer datasets actor --run my-run --no-expert --name actor-own")),
                ActorDataConfig, ACTOR_FLAGS)
def datasets_actor(overrides: dict) -> None:
    """Step-level SFT rows for the actor (FireAct-style): successful trajectories of train-split tasks, replayed in
    the env so every prompt is exactly what collect sends. Train with `retroformer sft --role actor`."""
    from retroformer_cli.stages import actor_data

    res = actor_data.build(build(ActorDataConfig, overrides), workspace())
    c = res.counts
    kept = ", ".join(f"{k} {v['kept']}/{v['episodes']}" for k, v in c["sources"].items())
    done(res, f"actor dataset {res.name}: {c['train_rows']}/{c['validation_rows']} step rows (train/validation) from "
              f"{c['tasks']} task(s); episodes kept per source: {kept}; in {res.path}")
