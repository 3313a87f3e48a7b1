"""How long `retroformer --help` takes, next to a minimal two-command Typer app, in one run.

Each command runs in a fresh subprocess (one warm-up, then the median of N timed runs), so imports
are paid every time, exactly as a user typing the command pays them. The last stdout line is JSON:

    {"retroformer_help_s": ..., "typer_minimal_help_s": ..., "ratio": ...}

Usage: python benchmarks/cli_startup.py [--runs 7] [--cmd "python -m retroformer_cli --help"]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MINIMAL_APP = '''
import typer

app = typer.Typer(rich_markup_mode=None)  # same help renderer as retroformer: a like-for-like floor


@app.command()
def hello(name: str = "world") -> None:
    """Say hello."""
    print(f"hello {name}")


@app.command()
def bye() -> None:
    """Say bye."""
    print("bye")


if __name__ == "__main__":
    app()
'''


def time_command(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    """Median wall time of ``cmd`` in seconds after one untimed warm-up (fills the OS file cache)."""

    def once() -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{proc.stderr.strip()}")
        return elapsed

    once()
    return statistics.median(once() for _ in range(runs))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per command (default 7)")
    ap.add_argument("--cmd", default=f"{shlex.quote(sys.executable)} -m retroformer_cli --help",
                    help="command to measure instead of the retroformer CLI (for trying the script)")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    # Import the checkout, not some other installed copy; no colour codes, no width probing.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("NO_COLOR", "1")
    env.setdefault("COLUMNS", "100")

    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "minimal_typer_app.py"
        app.write_text(MINIMAL_APP)
        typer_s = time_command([sys.executable, str(app), "--help"], args.runs, env)
        ours_s = time_command(shlex.split(args.cmd), args.runs, env)

    print(f"retroformer --help: {ours_s * 1000:.0f} ms (median of {args.runs})", file=sys.stderr)
    print(f"minimal Typer app --help: {typer_s * 1000:.0f} ms", file=sys.stderr)
    print(json.dumps({
        "retroformer_help_s": round(ours_s, 4),
        "typer_minimal_help_s": round(typer_s, 4),
        "ratio": round(ours_s / typer_s, 3),
    }))


if __name__ == "__main__":
    main()
