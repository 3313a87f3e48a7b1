"""How well `collect` overlaps LLM calls: wall time at --concurrency 1 vs 32 for the same LLM calls.

The model is the fake OpenAI-compatible server in a SEPARATE process (its threads do not share our
GIL), answering every request after a fixed delay (0.2 s by default) with an action that never
finishes the task, so every episode uses all its steps. The tasks are made-up questions written to a
temporary JSONL file in the real HotPotQA format. Each leg runs ``retroformer_cli.stages.collect.run``
in process on a fresh temporary workspace, actor and reflector both pointing at the server.

    speedup              = t(concurrency 1) / t(concurrency 32)                  target >= 25x
    overhead_ms_per_call = (t(concurrency 1) - calls * delay) / calls            target <= 5 ms

Both legs run ``--repeats`` times, alternating which goes first, and each side's median counts (every run is
in the JSON), so neither side gets more tries or a warmer machine than the other.

The end-to-end leg times what a user waits for: the whole CLI process (``python -m retroformer_cli collect``,
start-up included) for ``--e2e-tasks`` tasks x 2 trials at ``--concurrency`` 1 and 32, and the time from the
process start to the first request the server receives (its ``/stats`` route), reported for each leg.

    e2e_speedup          = CLI wall time at concurrency 1 / at 32                   target >= 12x
    e2e_first_request_s_c1, _c32 = first request arrival - process start, per leg  target <= 1 s

A human summary goes to stderr; the last stdout line is JSON:

    {"calls": N, "t_concurrency_1_s": ..., "t_concurrency_32_s": ..., "speedup": ..., "overhead_ms_per_call": ...,
     "e2e_...": ...}

Usage: python benchmarks/collect_scaling.py [--tasks 64] [--max-steps 2] [--delay 0.2] [--concurrency 32] [--repeats 3]
                                            [--e2e-tasks 40] [--e2e-max-steps 2] [--no-e2e]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Every step searches a page that exists (a cheap exact hit in the docstore) and never answers.
REPLY = "Thought: I need to look this up first.\nAction: Search[Velantia]"
REFLECTION = "I never answered. Next time I will answer after one search."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_questions(path: Path, n: int) -> None:
    """``n`` made-up HotPotQA records (official layout: ``_id``, context as [title, sentences] pairs)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = {
                "_id": f"bench{i:05d}",
                "question": f"In which year was the founder of Benchmark Works No. {i} born?",
                "answer": str(1850 + i % 100),
                "type": "bridge",
                "level": "medium",
                "supporting_facts": [[f"Benchmark Works No. {i}", 0], [f"Founder {i}", 0]],
                "context": [
                    [f"Benchmark Works No. {i}", [f"Benchmark Works No. {i} was founded by Founder {i}.",
                                                 " It made bicycles."]],
                    [f"Founder {i}", [f"Founder {i} (born {1850 + i % 100}) was an engineer.",
                                      " He lived in Velantia."]],
                    ["Velantia", ["Velantia is a fictional country used in benchmarks.",
                                  " Its capital is Lisket."]],
                ],
            }
            f.write(json.dumps(rec) + "\n")


def start_server(delay: float) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "retroformer_cli.testing.fake_openai_server", "--port", "0", "--delay", str(delay),
           "--reply", REPLY]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the server prints its base_url once it listens
    if not line.startswith("http://"):
        proc.kill()
        raise SystemExit(f"the fake server did not start (got {line!r})")
    return proc, line


def one_leg(data: Path, url: str, concurrency: int, tasks: int, max_steps: int, client_concurrency: int) -> dict:
    from retroformer_cli.config import CollectConfig, ModelConfig
    from retroformer_cli.stages import collect
    from retroformer_cli.stages.collect import load_trials
    from retroformer_cli.workspace import Workspace

    # The client's own cap (ModelConfig.concurrency, default 16) must not throttle collect's concurrency.
    cfg = CollectConfig(
        env="hotpotqa", data=str(data), split="all", tasks=tasks, trials=1, max_steps=max_steps,
        concurrency=concurrency, run=f"scale-c{concurrency}",
        actor=ModelConfig(model="openai:fake", base_url=url, max_tokens=64, concurrency=client_concurrency),
        reflector=ModelConfig(model="openai:fake", base_url=url, max_tokens=64, concurrency=client_concurrency),
    )
    with tempfile.TemporaryDirectory(prefix="retroformer-scale-ws-") as tmp:
        ws = Workspace.open(Path(tmp) / "ws")
        t0 = time.perf_counter()
        result = collect.run(cfg, ws)
        elapsed = time.perf_counter() - t0
        trials = load_trials(ws, result.run)
    if result.status != "completed":
        raise SystemExit(f"collect at concurrency {concurrency} ended with status {result.status}")
    calls = sum(len(t.steps) for t in trials) + sum(1 for t in trials if t.reflection is not None)
    return {"seconds": elapsed, "calls": calls, "trials": len(trials)}


def median_run(legs: list[dict]) -> dict:
    """The run with the median time (the lower middle one for an even count)."""
    return sorted(legs, key=lambda r: r["seconds"])[(len(legs) - 1) // 2]


def e2e_leg(data: Path, url: str, concurrency: int, tasks: int, max_steps: int) -> dict:
    """The whole CLI process for tasks x 2 trials; wall time and time from process start to first request."""
    import urllib.request

    with tempfile.TemporaryDirectory(prefix="retroformer-e2e-ws-") as tmp:
        cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(Path(tmp) / "ws"), "collect", "--env", "hotpotqa",
               "--data", str(data), "--split", "all", "--tasks", str(tasks), "--trials", "2", "--max-steps",
               str(max_steps), "--concurrency", str(concurrency), "--run", f"e2e-c{concurrency}",
               "--actor", "openai:fake", "--actor-base-url", url, "--reflector", "openai:fake",
               "--reflector-base-url", url, "--actor-max-tokens", "64", "--reflector-max-tokens", "64"]
        started = time.time()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"collect (concurrency {concurrency}) failed:\n{proc.stderr[-2000:]}")
    base = url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/stats?since={started}") as resp:
        stats = json.loads(resp.read())
    return {"seconds": wall, "requests": stats["requests"], "first_request_s": stats["first_at"] - started}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=64, help="made-up questions (one episode each)")
    ap.add_argument("--max-steps", type=int, default=2, help="steps per episode = LLM calls per task")
    ap.add_argument("--delay", type=float, default=0.2, help="server delay per request (s)")
    ap.add_argument("--concurrency", type=int, default=32, help="the concurrent leg's --concurrency")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each leg (alternating order); each side's median counts")
    ap.add_argument("--e2e-tasks", type=int, default=40, help="tasks of the end-to-end CLI leg (2 trials each)")
    ap.add_argument("--e2e-max-steps", type=int, default=2, help="steps per episode in the end-to-end leg")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end CLI leg")
    args = ap.parse_args(argv)
    client_concurrency = max(64, args.concurrency)

    server, url = start_server(args.delay)
    try:
        with tempfile.TemporaryDirectory(prefix="retroformer-scale-data-") as tmp:
            data = Path(tmp) / "questions.jsonl"
            write_questions(data, args.tasks)
            log(f"fake server at {url} (separate process, {args.delay:g} s per request); "
                f"{args.tasks} tasks x {args.max_steps} steps, 1 trial")
            one_leg(data, url, 4, 4, 1, client_concurrency)  # warm-up: imports, connection set-up
            runs: dict[int, list[dict]] = {args.concurrency: [], 1: []}
            for i in range(max(1, args.repeats)):  # the same number of runs per side, alternating which goes first
                for c in ((args.concurrency, 1) if i % 2 == 0 else (1, args.concurrency)):
                    runs[c].append(one_leg(data, url, c, args.tasks, args.max_steps, client_concurrency))
            fast, slow = median_run(runs[args.concurrency]), median_run(runs[1])
            for c, leg in ((args.concurrency, fast), (1, slow)):
                each = ", ".join(f"{r['seconds']:.2f}" for r in runs[c])
                log(f"concurrency {c:>2}: {leg['seconds']:.2f} s for {leg['calls']} calls "
                    f"(median of {len(runs[c])}: {each})")
            e2e: dict = {}
            if not args.no_e2e:
                write_questions(data, max(args.tasks, args.e2e_tasks))
                e2e_fast = e2e_leg(data, url, args.concurrency, args.e2e_tasks, args.e2e_max_steps)
                e2e_slow = e2e_leg(data, url, 1, args.e2e_tasks, args.e2e_max_steps)
                if e2e_fast["requests"] != e2e_slow["requests"]:
                    raise SystemExit("the end-to-end legs made different numbers of requests")
                log(f"end to end (whole CLI, {args.e2e_tasks} tasks x 2 trials): concurrency {args.concurrency} "
                    f"{e2e_fast['seconds']:.2f} s, concurrency 1 {e2e_slow['seconds']:.2f} s "
                    f"({e2e_slow['seconds'] / e2e_fast['seconds']:.1f}x, target >= 12x); first request "
                    f"{e2e_fast['first_request_s']:.2f} s (concurrency {args.concurrency}) and "
                    f"{e2e_slow['first_request_s']:.2f} s (concurrency 1) after the process started (target <= 1 s)")
                e2e = {"e2e_tasks": args.e2e_tasks, "e2e_requests": e2e_fast["requests"],
                       f"e2e_t_concurrency_{args.concurrency}_s": round(e2e_fast["seconds"], 3),
                       "e2e_t_concurrency_1_s": round(e2e_slow["seconds"], 3),
                       "e2e_speedup": round(e2e_slow["seconds"] / e2e_fast["seconds"], 2),
                       f"e2e_first_request_s_c{args.concurrency}": round(e2e_fast["first_request_s"], 3),
                       "e2e_first_request_s_c1": round(e2e_slow["first_request_s"], 3)}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    if slow["calls"] != fast["calls"]:
        raise SystemExit(f"the legs made different numbers of calls ({slow['calls']} vs {fast['calls']})")
    n = slow["calls"]
    speedup = slow["seconds"] / fast["seconds"]
    overhead_ms = (slow["seconds"] - n * args.delay) / n * 1000.0
    # Perfect overlap: tasks run in waves of `concurrency`, each wave max_steps sequential calls.
    waves = -(-args.tasks // args.concurrency)
    ideal = (n * args.delay) / (waves * args.max_steps * args.delay)
    log(f"speedup {speedup:.1f}x (ideal {ideal:.1f}x, target >= 25x); "
        f"client overhead {overhead_ms:.2f} ms per call (target <= 5 ms)")
    print(json.dumps({
        "calls": n,
        "t_concurrency_1_s": round(slow["seconds"], 3),
        f"t_concurrency_{args.concurrency}_s": round(fast["seconds"], 3),
        "speedup": round(speedup, 2),
        "overhead_ms_per_call": round(overhead_ms, 3),
        "ideal_speedup": round(ideal, 2),
        "delay_s": args.delay,
        "repeats": len(runs[1]),
        f"t_concurrency_{args.concurrency}_s_each": [round(r["seconds"], 3) for r in runs[args.concurrency]],
        "t_concurrency_1_s_each": [round(r["seconds"], 3) for r in runs[1]],
        **e2e,
    }), flush=True)


if __name__ == "__main__":
    main()
