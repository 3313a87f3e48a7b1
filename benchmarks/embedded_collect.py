"""Prompt-prefix reuse end to end: the same `retroformer collect` on the embedded model with reuse on and off.

    python benchmarks/embedded_collect.py [--data ../shared/data/hotpotqa/dev.jsonl] [--tasks 3] [--trials 2]
                                          [--workspace DIR] [--threads N] [--dtype float32] [--weights hybrid] [--repeats 1]

Runs the whole CLI process (`python -m retroformer_cli collect --env hotpotqa ...`, greedy), start-up included,
with `--prefix-reuse` and with `--no-prefix-reuse`, `--repeats` times each in the same run, the legs' order
alternating from one repeat to the next (on, off; off, on; ...) so neither leg always runs on a warmer machine,
after one warm-up start that converts or loads the embedded model into the workspace cache. Reports each leg's
median wall time (and every time) and the ratio of the medians, the
prompt tokens the model read (logical) against those it computed (logical minus those reused from the prefix
cache, from each run's manifest), and whether the trajectories are identical: every step's raw output, action
and observation, every reflection. Any difference is listed with the smallest top-1/top-2 logit gap of the
differing step in each run (a near-tie flipped by float reordering has a gap close to 0). Progress on stderr;
the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def collect(ws: str, run: str, args: argparse.Namespace, reuse: bool) -> float:
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", ws, "collect", "--env", "hotpotqa", "--data", args.data,
           "--tasks", str(args.tasks), "--trials", str(args.trials), "--run", run, "--actor-temperature", "0",
           "--prefix-reuse" if reuse else "--no-prefix-reuse"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.weights:
        cmd += ["--weights", args.weights]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"collect failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def load_run(ws: str, run: str) -> tuple[dict, dict]:
    root = Path(ws) / "runs" / run
    manifest = json.loads((root / "manifest.json").read_text())
    trials = {}
    for line in (root / "trials.jsonl").read_text().splitlines():
        t = json.loads(line)
        trials[(t["task_id"], t["trial"])] = t
    return manifest, trials


def compare(on: dict, off: dict) -> tuple[int, list[dict]]:
    """Identical trials and the first difference of each other trial (with both runs' logit gaps)."""
    same, diffs = 0, []
    for key in sorted(set(on) | set(off)):
        a, b = on.get(key), off.get(key)
        if a is None or b is None:
            diffs.append({"task": key[0], "trial": key[1], "what": "missing in one run"})
            continue
        view = lambda t: ([(s["raw"], s["action"], s["observation"]) for s in t["steps"]],  # noqa: E731
                          (t.get("reflection") or {}).get("text"))
        if view(a) == view(b):
            same += 1
            continue
        for i, (sa, sb) in enumerate(zip(a["steps"], b["steps"])):
            if sa["raw"] != sb["raw"]:
                diffs.append({"task": key[0], "trial": key[1], "step": i + 1, "min_margin_on": sa.get("min_margin"),
                              "min_margin_off": sb.get("min_margin"), "on": sa["raw"][:80], "off": sb["raw"][:80]})
                break
        else:
            diffs.append({"task": key[0], "trial": key[1], "what": "steps equal; reflection or step count differs"})
    return same, diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/hotpotqa/dev.jsonl", help="relative to the repository root")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--weights", default=None, help="collect's --weights (auto, fp32, gguf or hybrid); default: collect's own")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each leg, in alternating order")
    args = ap.parse_args()
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    if not (REPO / args.data).exists():
        sys.exit(f"no data at {args.data} (pass --data)")
    ws = args.workspace
    log("warm-up: convert or load the embedded model into the workspace cache")
    subprocess.run([sys.executable, "-c", "import sys; from retroformer_cli.llm.model_cache import resolve_local_model; "
                    "resolve_local_model('embedded', sys.argv[1])", str(Path(ws) / "cache")], check=True, cwd=REPO)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    walls: dict[bool, list[float]] = {True: [], False: []}
    runs: dict[bool, tuple[dict, dict]] = {}
    for repeat in range(args.repeats):
        for reuse in ((True, False) if repeat % 2 == 0 else (False, True)):
            name = f"bench-{'reuse' if reuse else 'noreuse'}-{stamp}-{repeat + 1}"
            log(f"repeat {repeat + 1}/{args.repeats}: collect with prefix reuse {'on' if reuse else 'off'} ({name}) ...")
            walls[reuse].append(collect(ws, name, args, reuse))
            runs.setdefault(reuse, load_run(ws, name))  # trajectories of the first run of each leg are compared
            log(f"  {walls[reuse][-1]:.1f} s")
    (m_on, t_on), (m_off, t_off) = runs[True], runs[False]
    same, diffs = compare(t_on, t_off)
    usage_on, usage_off = m_on["usage"], m_off["usage"]
    computed_on = usage_on["prompt_tokens"] - usage_on.get("cached_prompt_tokens", 0)
    computed_off = usage_off["prompt_tokens"] - usage_off.get("cached_prompt_tokens", 0)
    result = {
        "benchmark": "embedded_collect",
        "command": f"collect --env hotpotqa --data {args.data} --tasks {args.tasks} --trials {args.trials}",
        "threads": m_on["models"]["actor"].get("threads"),
        "dtype": m_on["models"]["actor"].get("dtype"),
        "weights": m_on["models"]["actor"].get("weights"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "wall_s_reuse": round(statistics.median(walls[True]), 1),
        "wall_s_no_reuse": round(statistics.median(walls[False]), 1),
        "wall_s_reuse_all": [round(w, 1) for w in walls[True]],
        "wall_s_no_reuse_all": [round(w, 1) for w in walls[False]],
        "speedup": round(statistics.median(walls[False]) / statistics.median(walls[True]), 2),
        "logical_prompt_tokens_reuse": usage_on["prompt_tokens"],
        "computed_prompt_tokens_reuse": computed_on,
        "computed_fraction_reuse": round(computed_on / max(1, usage_on["prompt_tokens"]), 3),
        "logical_prompt_tokens_no_reuse": usage_off["prompt_tokens"],
        "computed_prompt_tokens_no_reuse": computed_off,
        "completion_tokens_reuse": usage_on["completion_tokens"],
        "completion_tokens_no_reuse": usage_off["completion_tokens"],
        "trials": len(t_on),
        "identical_trials": f"{same}/{max(len(t_on), len(t_off))}",
        "trajectories_identical": not diffs,
        "differences": diffs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
