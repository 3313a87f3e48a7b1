"""Tokens/s of the embedded model in process: 8 concurrent requests (batched by the engine) vs the same 8 in turn.

    python benchmarks/hf_local_batching.py [--threads N] [--max-tokens 64] [--cache-dir DIR] [--dtype float32]

Greedy decoding, so the batched and sequential answers must match; the script checks it. Progress goes
to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

from retroformer_cli.llm.base import GenerationConfig, Message
from retroformer_cli.llm.hf_local import HFLocalClient
from retroformer_cli.llm.model_cache import default_cache_dir

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in two sentences why the sky is blue.",
    "Give one tip for writing clear code.",
    "What does a thermometer measure?",
    "Write a haiku about autumn.",
    "How many legs does a spider have?",
    "Suggest a name for a pet turtle and say why.",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cache-dir", default=None, help="model cache (default: %(default)s → user cache)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    client = HFLocalClient(args.model, cache_dir=args.cache_dir or default_cache_dir(), device=args.device,
                           threads=args.threads, max_batch_size=len(QUESTIONS), dtype=args.dtype)
    t0 = time.perf_counter()
    client.load()
    load_s = time.perf_counter() - t0
    log(f"loaded {client.model_id} in {load_s:.1f} s")
    cfg = GenerationConfig(max_tokens=args.max_tokens)
    requests = [[Message("user", q)] for q in QUESTIONS]
    client.generate(requests[0], GenerationConfig(max_tokens=4))  # warm-up

    t0 = time.perf_counter()
    sequential = [client.generate(r, cfg) for r in requests]
    seq_s = time.perf_counter() - t0
    seq_tokens = sum(g.usage.completion_tokens for g in sequential)
    log(f"sequential: {seq_tokens} tokens in {seq_s:.1f} s")

    async def concurrent():
        out = await asyncio.gather(*(client.agenerate(r, cfg) for r in requests))
        await client.aclose()
        return out

    steps = client.engine.step_sizes
    before = len(steps)
    t0 = time.perf_counter()
    batched = asyncio.run(concurrent())
    bat_s = time.perf_counter() - t0
    bat_tokens = sum(g.usage.completion_tokens for g in batched)
    sizes = list(steps)[before:]
    log(f"batched: {bat_tokens} tokens in {bat_s:.1f} s, {len(sizes)} forward passes, up to {max(sizes)} sequences each")
    same = sum(a.text == b.text for a, b in zip(sequential, batched))
    desc = client.describe()
    client.close()
    result = {
        "benchmark": "hf_local_batching",
        "model_id": client.model_id,
        "device": desc["device"],
        "dtype": desc["dtype"],
        "threads": desc["threads"],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "requests": len(requests),
        "max_tokens": args.max_tokens,
        "load_s": round(load_s, 2),
        "sequential_tokens": seq_tokens,
        "sequential_s": round(seq_s, 2),
        "sequential_tok_per_s": round(seq_tokens / seq_s, 1),
        "batched_tokens": bat_tokens,
        "batched_s": round(bat_s, 2),
        "batched_tok_per_s": round(bat_tokens / bat_s, 1),
        "forward_passes": len(sizes),
        "max_sequences_per_pass": max(sizes),
        "speedup": round((bat_tokens / bat_s) / (seq_tokens / seq_s), 2),
        "identical_answers": f"{same}/{len(requests)}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
