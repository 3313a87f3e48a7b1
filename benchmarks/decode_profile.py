"""Where one decode step of the embedded model spends its time (``torch.profiler``).

    python benchmarks/decode_profile.py [--workspace DIR] [--threads 1] [--weights fp32 gguf hybrid] [--steps 32]
                                        [--forward lean transformers] [--batch 1 8]

Loads the model as the engine does (``load_model``), computes a ~300-token prompt, then decodes ``--steps``
greedy tokens one forward pass at a time (the engine's varlen attention, one row per pass) and profiles them,
through the engine's lean forward pass (``lean``, what the engine runs for base-model rows) and/or through
transformers' modules (``transformers``, what it runs for LoRA rows).
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


def forward(m, lean: bool, ids: list[int], positions: list[int], ctx, decode: bool = False) -> object:
    """The logits of ``ctx``'s logit rows, ``[rows, vocab]``; ``decode``: the rows are decode rows (``--weights
    hybrid`` computes them on the GGUF blocks, prompt rows on the fp32 weights)."""
    import torch

    if lean:
        return m.lean.forward(ids, positions, ctx, len(ids) if decode else 0)
    return m.model(input_ids=torch.tensor(ids).view(-1, 1), position_ids=torch.tensor(positions).view(-1, 1),
                   use_cache=False).logits[:, -1, :]


def prefill(m, lean: bool, prompt: list[int], steps: int) -> tuple[object, int]:
    """A key/value buffer holding ``prompt`` (room for ``steps`` more tokens) and the first greedy token."""
    import torch

    from retroformer_cli.llm.engine.attention import Segment, StepContext, causal_mask, use_step

    kv = m.kv_buffer(len(prompt) + steps + 1)
    seg = Segment(kv, 0, len(prompt), 0, causal_mask(len(prompt), 0, None, m.device))
    with use_step(StepContext([seg], torch.tensor([len(prompt) - 1]))) as ctx:
        logits = forward(m, lean, prompt, list(range(len(prompt))), ctx)
    return kv, int(logits[-1].argmax())


def decode_steps(m, lean: bool, kv, token: int, past: int, steps: int, batch: int = 1) -> tuple[list[float], list[int]]:
    """``steps`` greedy passes after ``past`` positions, each with one row for each of ``batch`` sequences (copies
    of the prompt's buffer, as the engine's decoding sequences each have their own); (seconds per pass, the first
    sequence's tokens)."""
    import torch

    from retroformer_cli.llm.engine.attention import Segment, StepContext, use_step

    kvs = [kv] + [kv.clone() for _ in range(batch - 1)]
    last = [token] * batch
    times, tokens = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with use_step(StepContext([Segment(b, i, 1, past) for i, b in enumerate(kvs)])) as ctx:
            logits = forward(m, lean, last, [past] * batch, ctx, decode=True)
        last = logits.argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
        tokens.append(last[0])
        past += 1
    return times, tokens


def profile(m, weights: str, lean: bool, steps: int, batch: int = 1) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    text = (REPO / "retroformer_cli" / "agents" / "prompts" / "hotpotqa.py").read_text()
    prompt = m.tok(text, add_special_tokens=False)["input_ids"][:300]
    with torch.inference_mode():
        kv, first = prefill(m, lean, prompt, 2 * steps + 4)
        decode_steps(m, lean, kv, first, len(prompt), 4, batch)  # warm-up
        times, tokens = decode_steps(m, lean, kv, first, len(prompt), steps, batch)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_steps(m, lean, kv, first, len(prompt), steps, batch)
    events = prof.key_averages()
    calls = steps
    total_us = sum(e.self_cpu_time_total for e in events)
    linear_us = sum(e.self_cpu_time_total for e in events if e.key.startswith(LINEAR_OPS))
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    ms = statistics.median(times) * 1000
    return {"weights": weights, "forward": "lean" if lean else "transformers", "info_weights": m.info.get("weights"),
            "batch": batch, "ms_per_step": round(ms, 2), "tok_per_s": round(batch * 1000 / ms, 1), "profiled_ms_per_pass": round(total_us / calls / 1000, 2),
            "linear_share": round(linear_us / total_us, 3) if total_us else None,
            "top_self_ms_per_pass": {e.key: round(e.self_cpu_time_total / calls / 1000, 3) for e in top},
            "ops_per_pass": round(sum(e.count for e in events) / calls), "tokens": tokens[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", nargs="+", default=["fp32", "gguf", "hybrid"],
                    help="weight formats to profile, in order")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1],
                    help="decoding sequences per pass (one row each), e.g. 1 8")
    ap.add_argument("--forward", nargs="+", default=["lean", "transformers"], choices=["lean", "transformers"],
                    help="forward passes to profile for each weight format, in order")
    args = ap.parse_args()
    import torch

    from retroformer_cli.llm.engine import gguf_kernel
    from retroformer_cli.llm.engine.model import load_model
    from retroformer_cli.llm.engine.types import EngineConfig

    plain = gguf_kernel.matmul

    def named(*a, **kw):  # the kernel is a ctypes call: name it for the profiler
        with torch.profiler.record_function("retroformer::gguf_matmul"):
            return plain(*a, **kw)

    gguf_kernel.matmul = named
    cache = str(Path(args.workspace) / "cache")
    out: dict = {"benchmark": "decode_profile", "threads": args.threads, "runs": []}
    for weights in args.weights:
        cfg = EngineConfig(model="embedded", cache_dir=cache, threads=args.threads, weights=weights)
        m = load_model(cfg, args.threads, "embedded")
        for how in args.forward:
            if how == "lean" and m.lean is None:
                sys.exit("this model has no lean forward pass")
            for batch in args.batch:
                row = profile(m, weights, how == "lean", args.steps, batch)
                print(json.dumps(row), file=sys.stderr, flush=True)
                out["runs"].append(row)
        del m
    print(json.dumps(out))


if __name__ == "__main__":
    main()
