"""Start-up (and exit) of the embedded model: fresh processes, phase by phase.

    python benchmarks/engine_startup.py [--workspace DIR] [--runs 3] [--weights auto] [--tree DIR ...]

Two kinds of fresh `python` process, every import paid as a user's command pays them:

- engine: loads the engine through `HFLocalClient` and generates one token for a one-line chat prompt. Reported
  from the moment the parent started the process: when the child's script began (interpreter start), when
  `retroformer_cli` was imported, when the engine was ready (torch, transformers, model, GGUF blocks, packing),
  when the first token came back (one prompt pass), and when the process had exited (`process_s`).
- cli: the whole `python -m retroformer_cli collect --env hotpotqa --tasks 1 --trials 1` (the embedded model as
  actor and reflector): its wall time, and its exit, from its last output line to the end of the process.

After one untimed warm-up per tree (it converts the model and builds the kernel when the workspace cache lacks
them, and fills the OS file cache), the trees take turns, so a busy moment of the machine hits all alike; medians
are reported. `--tree` (repeatable; default this checkout) puts another checkout first on the path, to compare
two versions of the code on the same cache. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
marks = {"script": time.time()}
from retroformer_cli.llm.base import GenerationConfig, Message
from retroformer_cli.llm.hf_local import HFLocalClient
marks["retroformer_imported"] = time.time()
client = HFLocalClient("embedded", cache_dir=sys.argv[1], weights=sys.argv[2], threads=1).load()
marks["engine_ready"] = time.time()
out = client.generate([Message("user", "Say hi.")], GenerationConfig(max_tokens=1))
marks["first_token"] = time.time()
info = client.engine.info
print(json.dumps({"marks": marks, "tokens": out.usage.completion_tokens, "weights": info.get("weights"),
                  "load_seconds": info.get("load_seconds")}))
"""


def run_once(tree: Path, cache: str, weights: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, cache, weights], cwd=tree, env=env, capture_output=True,
                          text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"the start-up run in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["tokens"] != 1:
        sys.exit(f"the start-up run in {tree} generated {out['tokens']} tokens, not 1")
    row = {name: at - t0 for name, at in out["marks"].items()}
    return {**row, "process_s": wall, "weights": out["weights"], "load_seconds": out["load_seconds"]}


def run_cli(tree: Path, workspace: str, weights: str, run: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", workspace, "collect", "--env", "hotpotqa", "--tasks", "1",
           "--trials", "1", "--run", run, "--weights", weights]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines, last = [], t0
    for line in proc.stdout:
        lines.append(line)
        last = time.time()
    code = proc.wait()
    end = time.time()
    if code != 0:
        sys.exit(f"`{' '.join(cmd)}` in {tree} failed ({code}):\n{''.join(lines)[-3000:]}")
    return {"cli_s": end - t0, "cli_exit_s": end - last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"), help="its cache/ holds the model")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of each kind per tree (default 3)")
    ap.add_argument("--weights", default="auto", help="the engine's --weights (auto, fp32, gguf or hybrid)")
    ap.add_argument("--tree", action="append", type=Path, help="a checkout to run (repeatable; default: this one)")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [REPO])]
    workspace = str(Path(args.workspace).resolve())
    cache = str(Path(workspace) / "cache")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for tree in trees:  # warm-up: model conversion, kernel build, GGUF check marker, OS file cache
        run_once(tree, cache, args.weights)
    rows: dict[str, list[dict]] = {str(t): [] for t in trees}
    for i in range(args.runs):
        for j, tree in enumerate(trees):
            row = run_once(tree, cache, args.weights)
            row.update(run_cli(tree, workspace, args.weights, f"startup-{stamp}-{i}-{j}"))
            rows[str(tree)].append(row)
            print(f"run {i + 1} {tree.name}: first token at {row['first_token']:.2f} s, engine ready at "
                  f"{row['engine_ready']:.2f} s; cli {row['cli_s']:.2f} s, its exit {row['cli_exit_s']:.2f} s",
                  file=sys.stderr, flush=True)
    phases = ("script", "retroformer_imported", "engine_ready", "first_token", "process_s", "cli_s", "cli_exit_s")
    result = {"benchmark": "engine_startup", "runs": args.runs, "weights": args.weights, "trees": {
        tree: {**{f"{p}_median_s": round(statistics.median(r[p] for r in runs), 2) for p in phases},
               "first_token_s": [round(r["first_token"], 2) for r in runs],
               "cli_s": [round(r["cli_s"], 2) for r in runs], "engine_weights": runs[0]["weights"]}
        for tree, runs in rows.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
