"""Subcommands that live outside cli.py (one module per concern). Each module registers its Typer
commands on ``retroformer_cli.cli.app`` at import time and must import nothing heavy at top level."""

COMMAND_MODULES: tuple[str, ...] = ("runs", "serve", "train")
