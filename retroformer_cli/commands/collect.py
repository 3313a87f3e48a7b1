"""`retroformer collect`: run the actor (and the reflector after failed trials) over tasks for several trials.

Its options are the fields of ``config.CollectConfig``; ``eval`` reuses the same groups to run its protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import typer

from retroformer_cli.commands.context import RayOpt, build, command_app, config_command, done, examples, workspace
from retroformer_cli.config import CollectConfig
from retroformer_cli.errors import UsageError
from retroformer_cli.options import Flag


def parse_task_ids(value: str) -> list[str]:
    """``a,b,c`` or ``@file`` (one id per line)."""
    if value.startswith("@"):
        p = Path(value[1:])
        if not p.is_file():
            raise UsageError(f"Task id file '{p}' does not exist (--task-ids).")
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_env_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items; values are read as YAML scalars (``true``, ``3``, ``react``)."""
    import yaml

    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--env-option expects KEY=VALUE, got '{item}'.")
        opts[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return opts


def _model_flags(role: str) -> tuple[Flag, ...]:
    return (Flag(f"{role}.model", name=f"--{role}", help_from=role), Flag(f"{role}.base_url", label=role),
            Flag(f"{role}.api", label=role), Flag(f"{role}.max_tokens", label=role),
            Flag(f"{role}.temperature", label=role))


def _engine_flag(name: str) -> Flag:
    """One local engine serves both roles: the flag sets the actor's and the reflector's field."""
    return Flag(f"actor.{name}", name="--" + name.replace("_", "-"), also=(f"reflector.{name}",))


# Shared by collect and eval (the eval protocol runs collect first).
TASK_FLAGS = (
    Flag("env", ("-e",)), Flag("data", cli_type=Path), Flag("split"), Flag("tasks", ("-n",)),
    Flag("task_ids", cli_type=str, parse=parse_task_ids), Flag("trials", ("-k",)), Flag("max_steps"),
    Flag("env_options", name="--env-option", cli_type=List[str], parse=parse_env_options, metavar="KEY=VALUE"), Flag("memory_size"), Flag("few_shot"),
    Flag("concurrency", ("-j",)), Flag("workers"), Flag("seed"),
)
RUN_FLAG = (Flag("run", ("-r",)),)
MODEL_FLAGS = (
    *_model_flags("actor"), *_model_flags("reflector"),
    *(_engine_flag(n) for n in ("threads", "prefix_reuse", "prefix_cache_mb", "device", "dtype", "weights")),
)

app = command_app()


def build_collect_config(overrides: dict[str, Any], resume: bool):
    from retroformer_cli.config import fill_from_env
    from retroformer_cli.envs import canonical_name

    ws = workspace()
    base = None
    if resume:
        if not overrides.get("run"):
            raise UsageError("--resume needs --run NAME (see `retroformer runs`).")
        stored = dict(ws.read_manifest(overrides["run"]).get("config") or {})
        for m in ("actor", "reflector"):  # never stored; comes back from flags or the environment
            if isinstance(stored.get(m), dict):
                stored[m].pop("api_key", None)
        base = stored
    cfg = build(CollectConfig, overrides, base=base)
    cfg.env = canonical_name(cfg.env)
    fill_from_env(cfg)
    return cfg, ws


def run_collect(cfg, ws, resume: bool, label: str = "collect", ray: str | None = None):
    from retroformer_cli.console import RichProgress, log
    from retroformer_cli.stages import collect

    log((label, "bold"), f" env={cfg.env} run={cfg.run or '(new)'} trials={cfg.trials} "
                         f"actor={cfg.actor.model} reflector={cfg.reflector.model} workspace={ws.root}"
                         + (f" ray={ray}" if ray is not None else ""))
    return collect.run(cfg, ws, resume=resume, progress=RichProgress(label=label), ray=ray)


@config_command(app.command("collect", epilog=examples(
    "retroformer collect --env hotpotqa --tasks 2 --trials 2",
    "retroformer collect --env hotpotqa --data ../data/hotpotqa/dev.jsonl --actor openai:gpt-4o-mini",
    "retroformer collect --run my-run --resume",
    "retroformer collect --env alfworld --data ../data/alfworld --trials 10 --ray auto   (on a Ray cluster)")),
                CollectConfig, TASK_FLAGS, RUN_FLAG, MODEL_FLAGS)
def collect(
    overrides: dict,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (needs --run)."),
    ray: RayOpt = None,
) -> None:
    """Run the actor (and the reflector after failed trials) over tasks for several trials."""
    cfg, ws = build_collect_config(overrides, resume)
    result = run_collect(cfg, ws, resume, ray=ray)
    done(result, f"run {result.run}: {result.solved}/{result.tasks} task(s) solved, {result.trials_written} trial(s) "
                 f"written to {result.trials_path}")
