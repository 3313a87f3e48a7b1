"""One naming rule for runs, datasets and checkpoints: letters, digits, '.', '_' or '-', starting with a letter
or digit, at most 128 characters (the workspace's ``NAME_RE``)."""

from __future__ import annotations

from retroformer_cli.errors import UsageError
from retroformer_cli.workspace import NAME_RE


def is_name(text: str | None) -> bool:
    return bool(text) and NAME_RE.match(text) is not None


def check_name(name: str, option: str = "--name") -> str:
    """``name`` unchanged, or a :class:`UsageError` naming the option."""
    if not is_name(name):
        raise UsageError(f"Name '{name}' is not allowed ({option}): use letters, digits, '.', '_' or '-'.")
    return name
