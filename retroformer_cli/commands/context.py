"""What every command module shares: the global options' state (set by the root callback in ``cli.py``), the
error handler, the workspace, and the Typer app factory. Commands import this, never ``cli``."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Tuple

import typer

from retroformer_cli.errors import RetroformerError, missing_extra
from retroformer_cli.options import Flag

# Fields every trainer config (sft, reward, ppo) has; help texts come from each config's metadata.
TRAIN_FLAGS = (
    Flag("dataset", ("-d",)), Flag("base"), Flag("name"), Flag("max_steps"), Flag("learning_rate", ("--lr",)),
    Flag("save_steps"), Flag("threads"), Flag("seed"), Flag("report_to"),
)
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest trainer checkpoint of --name.")]
# collect and eval --env: play the episodes on a Ray cluster (docs/cluster.md; ppo's is its config field `ray`).
# Not a collect config field: a run's config, which --resume reads back, stays the same with or without it.
# Typer has no optional option values, so the bare `--ray` of issue #20 is spelled `--ray local`.
RayOpt = Annotated[Optional[str], typer.Option(
    "--ray", metavar="ADDRESS", help="Play the episodes on a Ray cluster: local (start one on this machine), auto (join "
                                     "the one `ray start` made here) or HOST:PORT; needs the 'ray' extra.")]


# Options of eval and report (not config fields).
CompareOpt = Annotated[Optional[Tuple[str, str]], typer.Option(
    "--compare", help="Compare two runs task by task (paired): --compare A B. Two runs given with --run that share "
                      "tasks are compared anyway.")]
PriceInOpt = Annotated[Optional[float], typer.Option(
    "--price-in", help="USD per million prompt tokens, for a cost estimate [default: the runs' price_in_per_m settings].")]
PriceOutOpt = Annotated[Optional[float], typer.Option(
    "--price-out", help="USD per million completion tokens, for a cost estimate [default: the runs' price_out_per_m settings].")]


class State:
    """Global options: ``--workspace``, ``--config``, ``--json`` (filled before any command runs)."""

    workspace: Optional[Path] = None
    config: Optional[Path] = None
    json: bool = False


state = State()


def command_app(**kwargs: Any) -> typer.Typer:
    """A command module's Typer app, rendered like the root (plain help text: literal [brackets] stay)."""
    return typer.Typer(rich_markup_mode=None, add_completion=False, pretty_exceptions_enable=False, **kwargs)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map our errors (and Ctrl-C) to one red line + exit code; tracebacks only with RETROFORMER_DEBUG=1."""

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
            missing = missing_extra(e)  # an optional package imported deep inside: name its extra
            if missing is not None:
                console.error(str(missing))
                raise typer.Exit(missing.exit_code) from None
            console.error(f"unexpected {type(e).__name__}: {e}", "set RETROFORMER_DEBUG=1 to see the traceback")
            raise typer.Exit(1) from None

    return wrapper


def workspace():
    from retroformer_cli.workspace import Workspace

    return Workspace.open(state.workspace)


def build(cls: type, overrides: dict[str, Any], base: Optional[dict[str, Any]] = None) -> Any:
    """The stage config: defaults < ``base`` < the global ``--config`` YAML < the flags given."""
    from retroformer_cli.config import build_config

    return build_config(cls, state.config, overrides, base=base)


def group_app(summary: str) -> typer.Typer:
    """A command group's app (``datasets``, ``env``): ``summary`` is its help, and it stays a group (with
    subcommands to name) even while it has one command."""
    app = command_app(no_args_is_help=True)
    app.callback(help=summary)(lambda: None)
    return app


def done(result: Any, summary: str, use: str | None = None) -> None:
    """A finished command's output: the result as JSON on stdout with ``--json``; one summary line (and how to use
    what it made) on stderr, printed as written."""
    from retroformer_cli import console

    if state.json:
        console.print_json(result.to_json())
    console.log(("done", "green"), ": ", summary)
    if use:
        console.log((f"use it: {use}", "dim"))


def config_command(register: Callable[[Callable[..., Any]], Any], cls: type,
                   *groups: Any) -> Callable[[Callable[..., Any]], Any]:
    """A command whose options are ``cls``'s fields listed in ``groups`` (passed to it as ``overrides``), with our
    errors mapped to one line. ``register``: Typer's decorator, ``app.command(...)`` or ``app.callback(...)``."""
    from retroformer_cli.options import config_options

    def decorate(fn: Callable[..., Any]) -> Any:
        return register(handle_errors(config_options(cls, *groups)(fn)))

    return decorate


def examples(*command_lines: str) -> str:
    """A command's ``--help`` epilog: one example command line per paragraph."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in command_lines)
