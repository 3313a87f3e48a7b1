"""WebShop environment performance: search latency, index build, env start, episode throughput, memory.

Usage: python benchmarks/webshop_perf.py [--data ../shared/data/webshop] [--queries REF.jsonl] [--episodes 50]

--data defaults to ../shared/data/webshop when present (the 1k catalog), else our sample catalog; --queries to
the lucene_bm25_reference_top50.jsonl beside it (else the goals' instructions). Prints a few lines, the last
one a JSON object: search_p50_ms / search_p95_ms (per query, analysis + scoring + top-50), index_build_s
(from scratch, stemmer import included), env_start_cached_s (a second env, index read from the cache),
episodes_per_s / steps_per_s (reset + search + click product + click option + Buy Now, reward with spaCy warm),
peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from retroformer_cli.envs.webshop.env import WebShopEnv
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))
    from retroformer_cli.envs.webshop.env import WebShopEnv
from retroformer_cli.envs.webshop.search import BM25Index
from webshop_scale import search_latency  # noqa: E402  (benchmarks/ is the script's folder)

SHARED = REPO.parent / "shared" / "data" / "webshop"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else None)
    ap.add_argument("--queries", type=Path, default=None)
    ap.add_argument("--episodes", type=int, default=50)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        env = WebShopEnv(data=args.data, cache_dir=cache)
        first_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        BM25Index.build(env.catalog.documents())
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        env = WebShopEnv(data=args.data, cache_dir=cache)
        cached_start = time.perf_counter() - t0

    qfile = args.queries
    if qfile is None and args.data is not None and (Path(args.data) / "lucene_bm25_reference_top50.jsonl").is_file():
        qfile = Path(args.data) / "lucene_bm25_reference_top50.jsonl"
    if qfile is not None:
        queries = [json.loads(line)["query"] for line in qfile.open(encoding="utf-8") if line.strip()]
    else:
        queries = [g["instruction_text"].lower() for g in env.goals[:500]]
    p50, p95, n_queries = search_latency(env.index, queries)  # the first 20 untimed: they warm the caches
    print(f"search: {n_queries} queries, p50 {p50:.3f} ms, p95 {p95:.3f} ms", file=sys.stderr)

    ids = env.task_ids()
    # episode 0 is not timed: it loads spaCy (seconds, once per process, at the first purchase)
    steps = 0
    t_start = None
    for k in range(args.episodes + 1):
        if k == 1:
            t_start, steps = time.perf_counter(), 0
        goal_idx = k % len(ids)
        obs, info = env.reset(options={"task_id": ids[goal_idx]})
        goal = env.goals[int(ids[goal_idx].split("_")[1])]
        obs, *_ , info = env.step(f"search[{goal['instruction_text'].split(' with ')[0]}]")
        steps += 1
        clicks = [c for c in info["available_actions"]["clickables"] if c not in ("back to search", "next >", "< prev")]
        if clicks:
            obs, *_ , info = env.step(f"click[{clicks[0]}]")
            steps += 1
            opts = info["available_actions"]["clickables"][6:]
            if opts:
                env.step(f"click[{opts[0]}]")
                steps += 1
            env.step("click[buy now]")
            steps += 1
    elapsed = time.perf_counter() - t_start
    eps = args.episodes / elapsed
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"episodes: {args.episodes} in {elapsed:.2f}s ({eps:.1f}/s, {steps / elapsed:.0f} steps/s)", file=sys.stderr)
    print(json.dumps({
        "catalog": len(env.catalog), "goals": len(env.goals), "queries": n_queries,
        "search_p50_ms": round(p50, 3), "search_p95_ms": round(p95, 3), "index_build_s": round(build_s, 3),
        "env_first_start_s": round(first_start, 3), "env_start_cached_s": round(cached_start, 3),
        "episodes_per_s": round(eps, 1), "steps_per_s": round(steps / elapsed, 1), "peak_rss_mb": round(peak, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
