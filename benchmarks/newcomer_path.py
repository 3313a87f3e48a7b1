"""A newcomer's path, timed: a fresh clone and a fresh virtual environment, the README's Quick start, then WebShop
and ALFWorld installed and run as docs/environments.md says.

    python benchmarks/newcomer_path.py [--python python3] [--keep] [--webshop-tasks 2] [--alfworld-tasks 2]

WebShop and ALFWorld run the docs' first-look commands (2 tasks, 1 trial each). The clone goes beside this checkout (``../retroformer-newcomer``) so that the docs' ``../shared/data`` paths
resolve as they do for a user; the virtual environment goes to a temporary folder. Each step is one shell command
run exactly as a user would type it, timed from start to exit (downloads included: pip's cache is whatever this
machine has). Progress on stderr; the last stdout line is JSON with each step's command, seconds and exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def steps(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [
        ("quick start: install", "bash scripts/install.sh"),
        ("quick start: collect + eval", "retroformer collect --env hotpotqa --tasks 2 --trials 2 --run demo "
                                        "&& retroformer eval --run demo"),
        ("webshop: install the extra", "pip install -q 'retroformer-cli[webshop]'"),
        ("webshop: collect", f"retroformer collect --env webshop --data ../shared/data/webshop --tasks "
                             f"{args.webshop_tasks} --trials 1"),
        ("alfworld: install the extra", "pip install -q 'retroformer-cli[alfworld]'"),
        ("alfworld: collect", f"retroformer collect --env alfworld --data ../shared/data/alfworld --tasks "
                              f"{args.alfworld_tasks} --trials 1"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter that makes the virtual environment")
    ap.add_argument("--keep", action="store_true", help="keep the clone and the virtual environment")
    ap.add_argument("--webshop-tasks", type=int, default=2)
    ap.add_argument("--alfworld-tasks", type=int, default=2)
    args = ap.parse_args()
    clone = REPO.parent / "retroformer-newcomer"
    venv = Path(tempfile.mkdtemp(prefix="retroformer-newcomer-venv-"))
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": "", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONHOME", None)
    results, started = [], time.perf_counter()
    try:
        for label, command in steps(args):
            print(f"{label}: {command}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True)
            seconds = round(time.perf_counter() - t0, 1)
            tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:]
            results.append({"step": label, "command": command, "seconds": seconds, "exit_code": proc.returncode})
            print(f"  {seconds} s, exit {proc.returncode}" + (f": {tail[0][:200]}" if proc.returncode else ""),
                  file=sys.stderr, flush=True)
            if proc.returncode != 0:
                break
    finally:
        if not args.keep:
            shutil.rmtree(clone, ignore_errors=True)
            shutil.rmtree(venv, ignore_errors=True)
    print(json.dumps({"benchmark": "newcomer_path", "cpu_count": os.cpu_count(), "steps": results,
                      "total_s": round(time.perf_counter() - started, 1),
                      "all_passed": all(r["exit_code"] == 0 for r in results) and len(results) == len(steps(args))}))


if __name__ == "__main__":
    main()
