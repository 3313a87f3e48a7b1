"""The `retroformer` command: thin Typer commands that parse options and call the stage APIs.

Errors a user can cause become one red line on stderr (plus a hint) and a non-zero exit; set
RETROFORMER_DEBUG=1 to see tracebacks. Nothing heavy is imported here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import typer
import typer.core

from retroformer_cli import __version__
from retroformer_cli.errors import RetroformerError, UsageError

class _RootGroup(typer.core.TyperGroup):
    """The root command: ``--json`` is a global option but is also accepted after the subcommand
    (``retroformer eval --run x --json``), as users type it; it is moved in front before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--json" in args[:end]:
            args = ["--json", *[a for a in args[:end] if a != "--json"], *args[end:]]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RootGroup,
    name="retroformer",
    help="Make LLM agents learn from their own failures: collect trials with reflections, train the "
         "retrospective model, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts use literal [brackets]
    context_settings={"help_option_names": ["-h", "--help"]},
)


class State:
    workspace: Optional[Path] = None
    config: Optional[Path] = None
    json: bool = False


state = State()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"retroformer {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", envvar="RETROFORMER_WORKSPACE",
                                             help="Workspace directory shared by all stages [default: ./retroformer-workspace]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file (see configs/)."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout; logs stay on stderr (also accepted after the subcommand)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    state.workspace, state.config, state.json = workspace, config, json_output
    from retroformer_cli.config import load_dotenv_file

    load_dotenv_file(".env")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map our errors (and Ctrl-C) to one line + exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from retroformer_cli import console

        try:
            return fn(*args, **kwargs)
        except RetroformerError as e:
            console.error(str(e), e.hint)
            if os.environ.get("RETROFORMER_DEBUG"):
                raise
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.error("Interrupted.")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # an unexpected failure still gets one line; the traceback is opt-in
            if os.environ.get("RETROFORMER_DEBUG"):
                raise
            console.error(f"unexpected {type(e).__name__}: {e}", "set RETROFORMER_DEBUG=1 to see the traceback")
            raise typer.Exit(1) from None

    return wrapper


def _workspace():
    from retroformer_cli.workspace import Workspace

    return Workspace.open(state.workspace)


def _task_ids(value: Optional[str]) -> Optional[list[str]]:
    """``a,b,c`` or ``@file`` (one id per line)."""
    if not value:
        return None
    if value.startswith("@"):
        p = Path(value[1:])
        if not p.is_file():
            raise UsageError(f"Task id file '{p}' does not exist (--task-ids).")
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [v.strip() for v in value.split(",") if v.strip()]


# Options shared by collect and eval (the eval protocol runs collect first).
EnvOpt = typer.Option(None, "--env", "-e", help="Environment: hotpotqa | webshop | alfworld [default: hotpotqa].")
DataOpt = typer.Option(None, "--data", help="Data file or folder in the env's real format [env DATA_DIR; default: sample data].")
SplitOpt = typer.Option(None, "--split", help="all | train | eval (deterministic by task id).")
TasksOpt = typer.Option(None, "--tasks", "-n", help="Run the first N tasks of the split.")
TaskIdsOpt = typer.Option(None, "--task-ids", help="Comma-separated task ids, or @FILE with one id per line.")
TrialsOpt = typer.Option(None, "--trials", "-k", help="Trials per task [default: 3].")
MaxStepsOpt = typer.Option(None, "--max-steps", help="Step limit per episode [default: the env's].")
EnvOptionOpt = typer.Option(None, "--env-option", help="Extra env argument KEY=VALUE (repeatable), e.g. wording=react for ALFWorld.")
MemoryOpt = typer.Option(None, "--memory-size", help="Latest reflections shown to the actor [default: 3].")
ConcOpt = typer.Option(None, "--concurrency", "-j", help="Tasks run at once [default: 8].")
WorkersOpt = typer.Option(None, "--workers", help="Environment instances / worker processes [default: --concurrency].")
RunOpt = typer.Option(None, "--run", "-r", help="Run name [default: ENV-TIMESTAMP].")
SeedOpt = typer.Option(None, "--seed", help="Seed recorded in the manifest and passed to env.reset.")
ActorOpt = typer.Option(None, "--actor", help="Actor model: embedded | openai:NAME | hf:PATH | PATH | workspace:STAGE/NAME.")
ActorUrlOpt = typer.Option(None, "--actor-base-url", help="OpenAI-compatible base URL for the actor [env OPENAI_BASE_URL].")
ActorApiOpt = typer.Option(None, "--actor-api", help="chat | completions.")
ActorTokOpt = typer.Option(None, "--actor-max-tokens", help="Max new tokens per actor step.")
ActorTempOpt = typer.Option(None, "--actor-temperature", help="Actor sampling temperature.")
ReflOpt = typer.Option(None, "--reflector", help="Reflector: none (ReAct) | embedded | openai:NAME | hf:PATH | PATH | workspace:STAGE/NAME.")
ReflUrlOpt = typer.Option(None, "--reflector-base-url", help="OpenAI-compatible base URL for the reflector.")
ReflApiOpt = typer.Option(None, "--reflector-api", help="chat | completions.")
ReflTokOpt = typer.Option(None, "--reflector-max-tokens", help="Max new tokens per reflection.")
ThreadsOpt = typer.Option(None, "--threads", help="torch threads for local models [default: 1 on up to 2 cores, else cores - 1, at most 8].")
PrefixReuseOpt = typer.Option(None, "--prefix-reuse/--no-prefix-reuse", help="Local models: reuse the computed keys/values of a known prompt prefix [default: on].")
PrefixCacheOpt = typer.Option(None, "--prefix-cache-mb", help="Local models: memory bound of the prefix cache in MiB [default: 512].")
DtypeOpt = typer.Option(None, "--dtype", help="Local models: auto (float32 on CPU, bf16/fp16 on GPU) | float32 | bfloat16 | float16.")


def _collect_overrides(**kw: Any) -> dict[str, Any]:
    mapping = {
        "env": "env", "data": "data", "split": "split", "tasks": "tasks", "trials": "trials", "max_steps": "max_steps",
        "memory_size": "memory_size", "concurrency": "concurrency", "workers": "workers", "run": "run", "seed": "seed",
        "actor": "actor.model", "actor_base_url": "actor.base_url", "actor_api": "actor.api",
        "actor_max_tokens": "actor.max_tokens", "actor_temperature": "actor.temperature",
        "reflector": "reflector.model", "reflector_base_url": "reflector.base_url", "reflector_api": "reflector.api",
        "reflector_max_tokens": "reflector.max_tokens",
    }
    out = {mapping[k]: v for k, v in kw.items() if k in mapping and v is not None}
    if kw.get("data") is not None:
        out["data"] = str(kw["data"])
    ids = _task_ids(kw.get("task_ids"))
    if ids is not None:
        out["task_ids"] = ids
    if kw.get("env_option"):
        import yaml

        opts = {}
        for item in kw["env_option"]:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise UsageError(f"--env-option expects KEY=VALUE, got '{item}'.")
            opts[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        out["env_options"] = opts
    for flag in ("threads", "prefix_reuse", "prefix_cache_mb", "dtype"):  # one local engine serves both roles
        if kw.get(flag) is not None:
            out[f"actor.{flag}"] = out[f"reflector.{flag}"] = kw[flag]
    return out


def _build_collect_config(overrides: dict[str, Any], resume: bool):
    from retroformer_cli.config import CollectConfig, build_config, fill_from_env
    from retroformer_cli.envs import canonical_name

    ws = _workspace()
    base = None
    if resume:
        if not overrides.get("run"):
            raise UsageError("--resume needs --run NAME (see `retroformer runs`).")
        stored = dict(ws.read_manifest(overrides["run"]).get("config") or {})
        for m in ("actor", "reflector"):  # never stored; comes back from flags or the environment
            if isinstance(stored.get(m), dict):
                stored[m].pop("api_key", None)
        base = stored
    cfg = build_config(CollectConfig, state.config, overrides, base=base)
    cfg.env = canonical_name(cfg.env)
    fill_from_env(cfg)
    return cfg, ws


def _run_collect(cfg, ws, resume: bool, label: str = "collect"):
    from retroformer_cli.console import RichCollectProgress, stderr
    from retroformer_cli.stages import collect

    stderr.print(f"[bold]{label}[/] env={cfg.env} run={cfg.run or '(new)'} trials={cfg.trials} "
                 f"actor={cfg.actor.model} reflector={cfg.reflector.model} workspace={ws.root}")
    return collect.run(cfg, ws, resume=resume, progress=RichCollectProgress(label=label))


@app.command(epilog="Examples:\n\n  retroformer collect --env hotpotqa --tasks 2 --trials 2\n\n"
                    "  retroformer collect --env hotpotqa --data ../data/hotpotqa/dev.jsonl --actor openai:gpt-4o-mini\n\n"
                    "  retroformer collect --run my-run --resume")
@handle_errors
def collect(
    env: Optional[str] = EnvOpt, data: Optional[Path] = DataOpt, split: Optional[str] = SplitOpt,
    tasks: Optional[int] = TasksOpt, task_ids: Optional[str] = TaskIdsOpt, trials: Optional[int] = TrialsOpt,
    max_steps: Optional[int] = MaxStepsOpt, env_option: Optional[List[str]] = EnvOptionOpt,
    memory_size: Optional[int] = MemoryOpt,
    concurrency: Optional[int] = ConcOpt, workers: Optional[int] = WorkersOpt, run: Optional[str] = RunOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (needs --run)."),
    actor: Optional[str] = ActorOpt, actor_base_url: Optional[str] = ActorUrlOpt, actor_api: Optional[str] = ActorApiOpt,
    actor_max_tokens: Optional[int] = ActorTokOpt, actor_temperature: Optional[float] = ActorTempOpt,
    reflector: Optional[str] = ReflOpt, reflector_base_url: Optional[str] = ReflUrlOpt,
    reflector_api: Optional[str] = ReflApiOpt, reflector_max_tokens: Optional[int] = ReflTokOpt,
    threads: Optional[int] = ThreadsOpt, prefix_reuse: Optional[bool] = PrefixReuseOpt,
    prefix_cache_mb: Optional[int] = PrefixCacheOpt, dtype: Optional[str] = DtypeOpt,
) -> None:
    """Run the actor (and the reflector after failed trials) over tasks for several trials."""
    from retroformer_cli import console

    overrides = _collect_overrides(**locals())
    cfg, ws = _build_collect_config(overrides, resume)
    result = _run_collect(cfg, ws, resume)
    if state.json:
        console.print_json(result.to_json())
    console.stderr.print(f"[green]done[/]: run {result.run}: {result.solved}/{result.tasks} task(s) solved, "
                         f"{result.trials_written} trial(s) written to {result.trials_path}")


@app.command("eval", epilog="Examples:\n\n  retroformer eval --run react --run reflexion\n\n"
                            "  retroformer eval --env hotpotqa --tasks 5 --trials 3   (collect on the eval split, then report)\n\n"
                            "  retroformer --json eval --run my-run | jq '.runs[0].success_per_trial'")
@handle_errors
def eval_(
    runs: Optional[List[str]] = typer.Option(None, "--run", "-r", help="Run(s) to report; repeat to compare."),
    compare: Optional[Tuple[str, str]] = typer.Option(None, "--compare", help="Compare two runs task by task (paired): --compare A B. Two runs given with --run that share tasks are compared anyway."),
    price_in: Optional[float] = typer.Option(None, "--price-in", help="USD per million prompt tokens, for a cost estimate [default: the runs' price_in_per_m settings]."),
    price_out: Optional[float] = typer.Option(None, "--price-out", help="USD per million completion tokens, for a cost estimate."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the PNG plot [default: reports/]."),
    env: Optional[str] = EnvOpt, data: Optional[Path] = DataOpt, split: Optional[str] = SplitOpt,
    tasks: Optional[int] = TasksOpt, task_ids: Optional[str] = TaskIdsOpt, trials: Optional[int] = TrialsOpt,
    max_steps: Optional[int] = MaxStepsOpt, env_option: Optional[List[str]] = EnvOptionOpt,
    memory_size: Optional[int] = MemoryOpt,
    concurrency: Optional[int] = ConcOpt, workers: Optional[int] = WorkersOpt, seed: Optional[int] = SeedOpt,
    actor: Optional[str] = ActorOpt, actor_base_url: Optional[str] = ActorUrlOpt, actor_api: Optional[str] = ActorApiOpt,
    actor_max_tokens: Optional[int] = ActorTokOpt, actor_temperature: Optional[float] = ActorTempOpt,
    reflector: Optional[str] = ReflOpt, reflector_base_url: Optional[str] = ReflUrlOpt,
    reflector_api: Optional[str] = ReflApiOpt, reflector_max_tokens: Optional[int] = ReflTokOpt,
    threads: Optional[int] = ThreadsOpt, prefix_reuse: Optional[bool] = PrefixReuseOpt,
    prefix_cache_mb: Optional[int] = PrefixCacheOpt, dtype: Optional[str] = DtypeOpt,
) -> None:
    """Success per trial for runs; with --env, first run the evaluation protocol (collect on the eval split)."""
    from retroformer_cli import console
    from retroformer_cli.config import load_yaml
    from retroformer_cli.envs import protocol_split
    from retroformer_cli.stages import evaluate

    from retroformer_cli.stages.evaluate import Prices

    ws = _workspace()
    runs = list(runs or [])
    pairs = [tuple(compare)] if compare else []
    if env is not None:
        kw = dict(locals())
        kw["run"] = None
        overrides = _collect_overrides(**kw)
        cfg, ws = _build_collect_config(overrides, resume=False)
        yaml_split = state.config is not None and "split" in load_yaml(state.config)
        if "split" not in overrides and not yaml_split:
            cfg.split = protocol_split(cfg.env)
        result = _run_collect(cfg, ws, resume=False, label="eval")
        runs.append(result.run)
    if not runs and not pairs:
        raise UsageError("Nothing to evaluate: pass --run NAME (see `retroformer runs`) or --env ENV to run the protocol.")
    data_out = evaluate.run(ws, runs, plot_path=plot, pairs=pairs, prices=Prices(price_in, price_out))
    for warning in data_out["warnings"]:
        console.stderr.print(f"[yellow]warning[/]: {warning}")
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
    console.stderr.print(f"[dim]plot: {data_out['plot']}  (HTML report: retroformer report {' '.join(runs)})[/]")


def _register_command_modules() -> None:
    import importlib

    from retroformer_cli.commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"retroformer_cli.commands.{name}")


_register_command_modules()


def main() -> None:
    app()
