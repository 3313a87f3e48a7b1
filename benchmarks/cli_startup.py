"""How long `retroformer --help` takes, next to a minimal two-command Typer app, in one run.

Each command runs in a fresh subprocess, so imports are paid every time, exactly as a user typing the command
pays them. After one untimed warm-up of each, the commands take turns (round robin, so a busy moment of the
machine hits all of them alike) and the median of N runs is reported. `retroformer collect --help` (which loads
one command module and its config dataclass) is measured too. The last stdout line is JSON:

    {"retroformer_help_s": ..., "typer_minimal_help_s": ..., "ratio": ..., "collect_help_s": ...,
     "collect_ratio": ..., "budget_ratio": 1.5, "within_budget": true}

Usage: python benchmarks/cli_startup.py [--runs 9] [--cmd "python -m retroformer_cli --help"]
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
BUDGET = 1.5  # `retroformer --help` may take at most this many times the minimal Typer app's --help

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


def _once(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{proc.stderr.strip()}")
    return elapsed


def time_commands(cmds: dict[str, list[str]], runs: int, env: dict[str, str]) -> dict[str, float]:
    """Median wall time of each command in seconds: one untimed warm-up each (fills the OS file cache), then
    ``runs`` rounds in which every command runs once."""
    for cmd in cmds.values():
        _once(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, cmd in cmds.items():
            times[name].append(_once(cmd, env))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9, help="timed runs per command (default 9)")
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
        t = time_commands({"typer": [sys.executable, str(app), "--help"], "ours": shlex.split(args.cmd),
                           "collect": [sys.executable, "-m", "retroformer_cli", "collect", "--help"]}, args.runs, env)

    ratio = t["ours"] / t["typer"]
    print(f"retroformer --help: {t['ours'] * 1000:.0f} ms (median of {args.runs})", file=sys.stderr)
    print(f"minimal Typer app --help: {t['typer'] * 1000:.0f} ms", file=sys.stderr)
    print(f"retroformer collect --help: {t['collect'] * 1000:.0f} ms", file=sys.stderr)
    print(json.dumps({
        "retroformer_help_s": round(t["ours"], 4),
        "typer_minimal_help_s": round(t["typer"], 4),
        "ratio": round(ratio, 3),
        "collect_help_s": round(t["collect"], 4),
        "collect_ratio": round(t["collect"] / t["typer"], 3),
        "budget_ratio": BUDGET,
        "within_budget": ratio <= BUDGET,
    }))


if __name__ == "__main__":
    main()
