"""Starting worker processes with the ``spawn`` method (ALFWorld's game workers, the env server's pool)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Start spawned workers without re-running the caller's ``__main__`` (a script without a
    ``if __name__ == "__main__"`` guard, or ``python -`` on stdin): the worker needs only this package."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)
