"""How many torch threads the local engine should use: prompt (prefill) and decode speed of the embedded model
with 1 and with 2 threads, on a quiet machine and with another process keeping one core busy.

    python benchmarks/engine_threads.py [--workspace DIR] [--threads 1 2] [--dtype float32]

Each (threads, load) cell runs in a fresh process: load the engine, then time one ~1,000-token prompt computed
from scratch (prefix reuse off) and 64 greedy tokens decoded for 1 and for 4 concurrent requests. "busy" starts a
pure-Python busy loop in a separate process for the cell's duration (what an env worker, a tokenizer or another
job does to a 2-core machine). Progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CELL = r"""
import json, sys, time
from retroformer_cli.llm.engine.scheduler import Engine
from retroformer_cli.llm.engine.types import EngineConfig, Sampling
cache, threads, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3]
engine = Engine(EngineConfig(model="embedded", cache_dir=cache, threads=threads, dtype=dtype, prefix_reuse=False,
                             draft_tokens=0)).start(wait=True)
text = open(sys.argv[4]).read()
ids = engine.encode_text(text)[:1000]
engine.submit(ids[:64], Sampling(max_tokens=2)).result()  # warm-up
t0 = time.perf_counter(); engine.submit(ids, Sampling(max_tokens=1)).result(); prefill = time.perf_counter() - t0
out = {"prefill_tok_per_s": round(len(ids) / prefill, 1)}
for batch in (1, 4):
    prompts = [ids[:200] + [1000 + b] for b in range(batch)]
    t0 = time.perf_counter()
    handles = [engine.submit(p, Sampling(max_tokens=64)) for p in prompts]
    tokens = sum(h.result().completion_tokens for h in handles)
    out[f"decode_b{batch}_tok_per_s"] = round(tokens / (time.perf_counter() - t0), 1)
print(json.dumps(out))
"""


def burn(stop) -> None:  # noqa: ANN001 - a multiprocessing Event
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    cache = str(Path(args.workspace) / "cache")
    subprocess.run([sys.executable, "-c", "import sys; from retroformer_cli.llm.model_cache import resolve_local_model; "
                    "resolve_local_model('embedded', sys.argv[1])", cache], check=True, cwd=REPO)
    source = str(REPO / "retroformer_cli" / "agents" / "prompts" / "hotpotqa.py")  # our few-shot prompt as text
    cells = {}
    for load in ("quiet", "busy"):
        for threads in args.threads:
            stop = mp.Event()
            burner = mp.Process(target=burn, args=(stop,), daemon=True) if load == "busy" else None
            if burner:
                burner.start()
            try:
                proc = subprocess.run([sys.executable, "-c", CELL, cache, str(threads), args.dtype, source],
                                      cwd=REPO, capture_output=True, text=True, timeout=1200)
            finally:
                stop.set()
                if burner:
                    burner.join(5)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-2000:])
            cells[f"{load}_threads{threads}"] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{load}, {threads} thread(s): {cells[f'{load}_threads{threads}']}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "engine_threads", "cpu_count": os.cpu_count(), "dtype": args.dtype, **cells}))


if __name__ == "__main__":
    main()
