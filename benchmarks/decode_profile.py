"""Where one single-sequence decode step of the embedded model spends its time (``torch.profiler``).

    python benchmarks/decode_profile.py [--workspace DIR] [--threads 1] [--weights fp32 gguf] [--steps 32]

Loads the model as the engine does (``load_model``), computes a ~300-token prompt, then decodes ``--steps``
greedy tokens one forward pass at a time (the engine's varlen attention, one row per pass) and profiles them.
For each ``--weights`` setting it reports the milliseconds per step measured without the profiler (median), and
from the profiler the share of the step in the linear layers (the weight reading) and the top operators by self
CPU time; what is neither is Python and small-op overhead. Progress on stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINEAR_OPS = ("aten::linear", "aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "retroformer::")


def prefill(m, prompt: list[int], steps: int) -> tuple[object, int]:
    """A key/value buffer holding ``prompt`` (room for ``steps`` more tokens) and the first greedy token."""
    import torch

    from retroformer_cli.llm.engine.attention import Segment, StepContext, causal_mask, use_step

    kv = m.kv_buffer(len(prompt) + steps + 1)
    seg = Segment(kv, 0, len(prompt), 0, causal_mask(len(prompt), 0, None, m.device))
    with use_step(StepContext([seg], torch.tensor([len(prompt) - 1]))):
        out = m.model(input_ids=torch.tensor(prompt).view(-1, 1), position_ids=torch.arange(len(prompt)).view(-1, 1),
                      use_cache=False)
    return kv, int(out.logits[0, -1].argmax())


def decode_steps(m, kv, token: int, past: int, steps: int) -> tuple[list[float], list[int]]:
    """``steps`` greedy single-row passes after ``past`` positions; (seconds per pass, tokens)."""
    import torch

    from retroformer_cli.llm.engine.attention import Segment, StepContext, use_step

    times, tokens = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with use_step(StepContext([Segment(kv, 0, 1, past)])):
            out = m.model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[past]]), use_cache=False)
        token = int(out.logits[0, -1].argmax())
        times.append(time.perf_counter() - t0)
        tokens.append(token)
        past += 1
    return times, tokens


def profile(weights: str, cache: str, threads: int, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from retroformer_cli.llm.engine.model import load_model
    from retroformer_cli.llm.engine.types import EngineConfig

    from retroformer_cli.llm.engine import gguf_kernel

    plain = gguf_kernel.matmul
    if not getattr(plain, "profiled", False):  # the kernel is a ctypes call: name it for the profiler
        def named(*args, **kwargs):
            with torch.profiler.record_function("retroformer::gguf_matmul"):
                return plain(*args, **kwargs)
        named.profiled = True
        gguf_kernel.matmul = named
    cfg = EngineConfig(model="embedded", cache_dir=cache, threads=threads, weights=weights)
    m = load_model(cfg, threads, "embedded")
    text = (REPO / "retroformer_cli" / "agents" / "prompts" / "hotpotqa.py").read_text()
    prompt = m.tok(text, add_special_tokens=False)["input_ids"][:300]
    with torch.inference_mode():
        kv, first = prefill(m, prompt, 2 * steps + 4)
        decode_steps(m, kv, first, len(prompt), 4)  # warm-up
        times, tokens = decode_steps(m, kv, first, len(prompt), steps)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_steps(m, kv, first, len(prompt), steps)
    events = prof.key_averages()
    calls = steps
    total_us = sum(e.self_cpu_time_total for e in events)
    linear_us = sum(e.self_cpu_time_total for e in events if e.key.startswith(LINEAR_OPS))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    ms = statistics.median(times) * 1000
    return {"weights": weights, "info_weights": m.info.get("weights"), "ms_per_step": round(ms, 2),
            "tok_per_s": round(1000 / ms, 1), "profiled_ms_per_pass": round(total_us / calls / 1000, 2),
            "linear_share": round(linear_us / total_us, 3) if total_us else None,
            "top_self_ms_per_pass": {e.key: round(e.self_cpu_time_total / calls / 1000, 3) for e in top},
            "ops_per_pass": round(sum(e.count for e in events) / calls), "tokens": tokens[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", nargs="+", default=["fp32", "gguf"], help="weight formats to profile, in order")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    cache = str(Path(args.workspace) / "cache")
    out: dict = {"benchmark": "decode_profile", "threads": args.threads, "runs": []}
    for weights in args.weights:
        row = profile(weights, cache, args.threads, args.steps)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out["runs"].append(row)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
