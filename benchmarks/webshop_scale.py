"""WebShop at full scale: a synthetic catalog of up to 1M products, index build, second start and search latency.

Usage: python benchmarks/webshop_scale.py [--sizes 10000,100000,1000000] [--workspace DIR] [--source documents_1k.jsonl]
           [--queries lucene_bm25_reference_top50.jsonl] [--timeout 1500]

Generates (once, deterministic, seed 0) a synthetic catalog of max(--sizes) products from the 1k catalog into
<workspace>/cache/webshop-scale/ (``retroformer_cli/envs/webshop/synth.py``); each size N uses its first N products
(``WebShopEnv(num_products=N)``). Per size, two fresh child processes (each killed after --timeout seconds):

* ``build``: a cold ``WebShopEnv`` start with an empty cache folder: catalog scan, goals, index build and save
  (``build_s``; ``index_build_s`` is the index part alone), and the child's peak RSS (``build_rss_mb``, VmHWM);
* ``start``: a second start from that cache (``start_s``), then the reference queries: the first 20 (at most half)
  run once as a warm-up and are left out of the timings; every other query is timed once (``search_p50_ms`` /
  ``search_p95_ms``: analysis + scoring + top-50; ``queries`` says how many), and that child's peak RSS.

The last line printed is one JSON object: the generation time and one entry per size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("retroformer_cli") is None:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "webshop"
WARMUP = 20


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def search_latency(index, queries: list[str], warmup: int = WARMUP) -> tuple[float, float, int]:
    """(p50 ms, p95 ms, queries timed) of ``index.search(q)``: the first ``warmup`` queries (at most half) run
    untimed to fill the analyzer's caches, as in a running env, and are not timed again (a repeat would be a cache
    hit); each of the others is timed once."""
    warmup = min(warmup, len(queries) // 2)
    for q in queries[:warmup]:
        index.search(q)
    lat = []
    for q in queries[warmup:]:
        t = time.perf_counter()
        index.search(q)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return statistics.median(lat), lat[min(len(lat) - 1, int(0.95 * len(lat)))], len(lat)


def leg(mode: str, data: Path, n: int, cache: Path, queries: Path | None) -> dict:
    """One measurement in this (fresh) process."""
    from retroformer_cli.envs.webshop import env as env_mod
    from retroformer_cli.envs.webshop.env import WebShopEnv

    timed = {}
    real = env_mod.load_or_build

    def timed_load_or_build(*a, **kw):
        t = time.perf_counter()
        out = real(*a, **kw)
        timed["index_s"] = time.perf_counter() - t
        return out

    env_mod.load_or_build = timed_load_or_build
    t0 = time.perf_counter()
    env = WebShopEnv(data=data, num_products=n, cache_dir=cache)
    start = time.perf_counter() - t0
    out = {"docs": len(env.catalog), "goals": len(env.goals), f"{mode}_index": env._world.index_source}
    if mode == "build":
        return {**out, "build_s": round(start, 2), "index_build_s": round(timed["index_s"], 2),
                "build_rss_mb": peak_rss_mb()}
    qs = [json.loads(line)["query"] for line in queries.open(encoding="utf-8") if line.strip()] if queries else \
        [g["instruction_text"].lower() for g in env.goals[:600]]
    p50, p95, n_q = search_latency(env.index, qs)
    return {**out, "start_s": round(start, 2), "queries": n_q, "search_p50_ms": round(p50, 2),
            "search_p95_ms": round(p95, 2), "start_rss_mb": peak_rss_mb()}


def run_leg(mode: str, data: Path, n: int, cache: Path, queries: Path | None, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--leg", mode, "--data", str(data), "--n", str(n), "--cache", str(cache)]
    if queries:
        cmd += ["--queries", str(queries)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {f"{mode}_error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {f"{mode}_error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--workspace", default=None, help="workspace folder (default: RETROFORMER_WORKSPACE or ./retroformer-workspace)")
    ap.add_argument("--source", type=Path, default=SHARED / "documents_1k.jsonl")
    ap.add_argument("--queries", type=Path, default=None, help="reference queries (default: beside --source)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per child process")
    ap.add_argument("--leg", choices=("build", "start"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.leg:
        print(json.dumps(leg(args.leg, args.data, args.n, args.cache, args.queries)))
        return 0

    from retroformer_cli.envs.webshop.synth import generate
    from retroformer_cli.workspace import Workspace

    sizes = sorted(int(s) for s in args.sizes.split(","))
    queries = args.queries or args.source.parent / "lucene_bm25_reference_top50.jsonl"
    queries = queries if queries.is_file() else None
    root = Workspace.open(args.workspace).cache_dir / "webshop-scale"
    t0 = time.perf_counter()
    data = generate(args.source, root / f"synth-{max(sizes)}-seed{args.seed}", max(sizes), seed=args.seed)
    result = {"catalog": "synthetic", "generate_s": round(time.perf_counter() - t0, 1),
              "catalog_mb": round((data / "documents.jsonl").stat().st_size / 2**20), "sizes": {}}
    for n in sizes:
        cache = root / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        got = run_leg("build", data, n, cache, queries, args.timeout)
        if "build_error" not in got:
            got.update(run_leg("start", data, n, cache, queries, args.timeout))
        result["sizes"][str(n)] = got
        print(f"{n}: {json.dumps(got)}", file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
