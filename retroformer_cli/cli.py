"""The `retroformer` command: a thin root that adds the commands' own Typer apps (``retroformer_cli/commands/``).

The root holds the global options (``--workspace``, ``--config``, ``--json``, ``--version``) and loads ``.env``.
Command modules are imported only when their command runs or shows its help, so ``retroformer --help`` pays for
Typer and this file alone. Commands import ``commands/context.py`` (state, error handler), never this module.
Errors a user can cause become one red line on stderr (plus a hint) and a non-zero exit; set RETROFORMER_DEBUG=1
to see tracebacks.
"""

from __future__ import annotations

import atexit
import gc
import importlib
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

from retroformer_cli import __version__
from retroformer_cli.commands.context import state

# name -> (module under retroformer_cli/commands/, its Typer app attribute, the line `retroformer --help` shows).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "collect": ("collect", "app", "Run the actor and the reflector over tasks for several trials."),
    "eval": ("eval", "app", "Success per trial, paired comparisons and cost; --env runs the eval protocol."),
    "runs": ("runs", "app", "List the runs in the workspace, or import runs from published logs."),
    "show": ("show", "app", "Show one task's trials: steps and reflections."),
    "report": ("report", "app", "Write a self-contained HTML report for runs."),
    "datasets": ("datasets", "app", "Build rating, SFT, preference and RL prompt sets."),
    "sft": ("train", "sft_app", "Supervised fine-tuning of the reflector (LoRA)."),
    "reward": ("train", "reward_app", "Train a reward model for reflections, or score one."),
    "ppo": ("ppo", "app", "Fine-tune the reflector with GRPO against a reward."),
    "serve": ("serve", "app", "Serve local models and LoRA adapters behind the OpenAI API."),
    "env": ("env", "app", "Serve the environments over HTTP (`retroformer env serve`)."),
}

# Global options that users also type after the subcommand; they are moved in front before parsing.
_GLOBAL_FLAGS = ("--json",)
_GLOBAL_VALUED = ("--config", "-c", "--workspace", "-w")


def _hoist_globals(args: list[str]) -> list[str]:
    end = args.index("--") if "--" in args else len(args)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < end:
        a = args[i]
        if a in _GLOBAL_FLAGS or a.startswith(("--config=", "--workspace=")):
            front.append(a)
        elif a in _GLOBAL_VALUED and i + 1 < end:
            front += [a, args[i + 1]]
            i += 1
        else:
            rest.append(a)
        i += 1
    return [*front, *rest, *args[end:]]


def _load(name: str) -> Any:
    """Import a command module and build its click command (or group) under ``name``."""
    module, attr, short_help = COMMANDS[name]
    sub_app = getattr(importlib.import_module(f"retroformer_cli.commands.{module}"), attr)
    command = typer.main.get_command(sub_app)
    command.name, command.short_help = name, short_help
    return command


class _LazyCommands(MutableMapping):
    """The root's subcommands: names known up front, each module imported the first time it is looked up."""

    def __init__(self, loaded: dict[str, Any]):
        self._loaded = dict(loaded)

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in COMMANDS:
                raise KeyError(name)
            self._loaded[name] = _load(name)
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*COMMANDS, *self._loaded]))

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._loaded))


class _RootGroup(typer.core.TyperGroup):
    """The root command: lazy subcommands; ``--json``, ``--config`` and ``--workspace`` are also accepted after
    the subcommand (``retroformer eval --run x --json``, ``retroformer ppo --config ppo.yaml``)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.commands = _LazyCommands(self.commands)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_globals(args))

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # names only: TyperGroup's items() would import every module

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The command list from ``COMMANDS`` alone: no command module is imported to show it."""
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx) if name in COMMANDS]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


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
    epilog="--json, --config and --workspace may also follow the subcommand. Help for one command: "
           "retroformer COMMAND --help.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"retroformer {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", envvar="RETROFORMER_WORKSPACE",
                                             help="Workspace directory shared by all stages [default: ./retroformer-workspace]."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file of the command's settings (see configs/)."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout; logs stay on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    state.workspace, state.config, state.json = workspace, config, json_output
    from retroformer_cli.config import load_dotenv_file

    load_dotenv_file(".env")


def main() -> None:
    # At exit, exempt every object from the interpreter's last garbage collections: after a command that loaded
    # torch and transformers they traverse millions of objects (exit 0.9 s, 0.2 s frozen: cli_exit_s of
    # benchmarks/engine_startup.py). atexit handlers (logging, temp folders, Ray) and module teardown still run;
    # only objects that nothing but a reference cycle holds go unfinalized, and the OS frees them. Registered
    # here, it touches only a process that is really exiting.
    atexit.register(gc.freeze)
    app()
