"""Where a local-model collect spends its time: start-up, forward passes that compute prompts, decode-only passes.

    python benchmarks/collect_timeline.py [--data ../shared/data/hotpotqa/dev.jsonl] [--tasks 3] [--trials 2]
                                          [--workspace DIR] [--threads 1] [--no-prefix-reuse] [--weights auto]

Runs `retroformer_cli.stages.collect.run` in process on the embedded model with the engine's step timed, then
prints the time to the first forward pass (imports, model load, env), the time in passes that carry prompt
chunks, the time in passes that only decode, the engine's idle time, and the decode batch sizes. The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/hotpotqa/dev.jsonl", help="relative to the repository root")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-prefix-reuse", action="store_true")
    ap.add_argument("--weights", default=None, help="the models' --weights (auto, fp32, gguf or hybrid); default: auto")
    args = ap.parse_args()

    t_start = time.perf_counter()
    from retroformer_cli.config import CollectConfig
    from retroformer_cli.llm.engine import scheduler
    from retroformer_cli.stages import collect
    from retroformer_cli.workspace import Workspace

    passes: list[tuple[float, float, int, int]] = []  # (start, seconds, decoding sequences, prefilling sequences)
    original = scheduler.Engine._step

    def timed_step(self: scheduler.Engine) -> None:
        t0 = time.perf_counter()
        decoding = sum(1 for s in self._running if s.state == "decode")
        prefilling = sum(1 for s in self._running if s.state == "prefill")
        original(self)
        passes.append((t0, time.perf_counter() - t0, decoding, prefilling))

    scheduler.Engine._step = timed_step  # type: ignore[method-assign]
    cfg = CollectConfig(env="hotpotqa", data=str(REPO / args.data), tasks=args.tasks, trials=args.trials,
                        run=f"timeline-{time.strftime('%Y%m%d-%H%M%S')}")
    for model in (cfg.actor, cfg.reflector):
        model.threads = args.threads
        model.prefix_reuse = not args.no_prefix_reuse
        if args.weights:
            model.weights = args.weights
    collect.run(cfg, Workspace.open(args.workspace))
    total = time.perf_counter() - t_start
    busy = sum(p[1] for p in passes)
    prompt_passes = [p for p in passes if p[3] > 0]
    decode_passes = [p for p in passes if p[3] == 0]
    result = {
        "benchmark": "collect_timeline",
        "total_s": round(total, 1),
        "first_pass_at_s": round(passes[0][0] - t_start, 1) if passes else None,
        "passes": len(passes),
        "prompt_passes": len(prompt_passes),
        "prompt_passes_s": round(sum(p[1] for p in prompt_passes), 1),
        "decode_only_passes": len(decode_passes),
        "decode_only_passes_s": round(sum(p[1] for p in decode_passes), 1),
        "engine_idle_after_first_pass_s": round(total - (passes[0][0] - t_start) - busy, 1) if passes else None,
        "decode_batch_sizes": dict(sorted(collections.Counter(p[2] for p in decode_passes).items())),
    }
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
