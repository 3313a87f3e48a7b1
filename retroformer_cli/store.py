"""Append-only JSONL store: one record per line, each written with a single ``write`` + fsync.

A line is either fully on disk or not at all for the reader: a torn tail (a process killed mid-write)
is moved aside to ``<file>.torn`` when the store is opened for appending, never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from retroformer_cli.errors import DataError


def read_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> Iterator[dict[str, Any]]:
    """Yield records; a bad line raises DataError naming file and line (a torn last line is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"File '{p}' does not exist.")
    with p.open("rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines) - 1
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            if i == last and tolerate_torn_tail:  # no trailing newline: an interrupted write
                return
            raise DataError(f"{p}: line {i + 1} is not valid JSON.") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}: line {i + 1} is not a JSON object.")
        yield rec


class JsonlWriter:
    """Durable appender. Use as a context manager or call ``close``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _repair_tail(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            with open(str(self.path) + ".torn", "ab") as torn:
                torn.write(data[cut:] + b"\n")
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        # One write call on an O_APPEND descriptor, then fsync: the line lands whole or (if the process dies
        # mid-write) as a torn tail that _repair_tail moves aside next time.
        os.write(self._fd, line)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file beside ``path`` and rename over it: readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_dir_atomic(dest: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a temp folder beside ``dest`` with ``write(tmp)``, then rename it over ``dest``: readers see the old
    folder or the new one, never half of one; a failed write leaves ``dest`` as it was."""
    import shutil
    import tempfile

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        old = None
        if dest.exists():
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
