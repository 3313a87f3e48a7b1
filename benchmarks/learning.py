#!/usr/bin/env python3
"""Does training help? Runs the learning recipe (``retroformer_cli.stages.learning``) at a size chosen by flags and
prints its figures; the last line is JSON with env, train_tasks, eval_tasks, steps, wall_s (this invocation),
stages_s (every stage's time, across resumes), trained_minus_frozen,
ci_low, ci_high, oracle_headroom (base and tuned actor), sensitivity.

    python benchmarks/learning.py                                   # configs/learning.yaml as is (docs/training.md: 73 min of stages)
    python benchmarks/learning.py --train-tasks 8 --eval-tasks 6 --ppo-steps 2 --actor-sft-steps 4 --name tiny

Resumable: rerunning with the same --name and --workspace skips finished stages. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import retroformer_cli  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

from retroformer_cli.config import build_config
from retroformer_cli.stages.learning import LearningConfig, run
from retroformer_cli.workspace import Workspace

SIZES = ("train_tasks", "eval_tasks", "ppo_steps", "actor_sft_steps", "reflector_sft_steps", "num_generations",
         "prompts_per_step", "eval_trials", "concurrency", "threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "learning.yaml")
    p.add_argument("--workspace", type=Path, default=ROOT / "retroformer-workspace")
    p.add_argument("--name", default=None, help="experiment name (prefix of its runs and checkpoints)")
    p.add_argument("--data", default=None, help="env data (default: the config's, relative to the repository)")
    for key in SIZES:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    args = p.parse_args()
    data = args.data or str(ROOT.parent / "shared" / "data" / "hotpotqa" / "dev.jsonl")
    overrides = {k: getattr(args, k) for k in SIZES if getattr(args, k) is not None}
    overrides.update(data=data, **({"name": args.name} if args.name else {}),
                     actor_import_reflexion=[str(ROOT.parent / "shared" / "data" / "hotpotqa" / "reflexion_logs" / "trials.jsonl")])
    cfg = build_config(LearningConfig, args.config, overrides)
    from retroformer_cli import console

    s = run(cfg, Workspace.open(args.workspace), progress=console.RichProgress())
    for label, arm in s["arms"].items():
        print(f"{label:>18}: success/trial {['%.3f' % v for v in arm['success_per_trial']]}, "
              f"mean {s['metric']} at trial {s['eval_trials']} {arm['mean_' + s['metric'] + '_last']:.3f}", file=sys.stderr)
    print(f"report: {s['report']}", file=sys.stderr)
    keys = ("env", "train_tasks", "eval_tasks", "steps", "wall_s", "stages_s", "trained_minus_frozen", "ci_low", "ci_high",
            "oracle_headroom", "sensitivity", "metric", "reward_metric", "verdict")
    print(json.dumps({k: s.get(k) for k in keys}))


if __name__ == "__main__":
    main()
