"""The commands, one module per concern. Each module owns a Typer app (``app``; ``train`` has ``sft_app`` and
``reward_app``) that the root in ``cli.py`` adds under a name, importing the module only when that command is used.
Modules import ``commands/context.py`` for the shared state and error handler, never ``cli``, and nothing heavy at
top level."""
