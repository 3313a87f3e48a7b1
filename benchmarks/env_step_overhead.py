"""What bounding every env call costs: HotPotQA and WebShop resets and steps through the actor's ``env_reset`` /
``env_step`` with ``env_step_timeout_s`` set (each instance steps in its own thread, ``agents/env_threads.py``)
next to the same calls with the bound off (``--env-step-timeout-s 0``: on the event loop, as before), and whole
``collect`` runs (every task, ``--trials`` each) with a scripted actor that answers at once, bound on and off.

Scripted episodes (HotPotQA: Search, Lookup, Finish; WebShop: search, click the first result, buy), one at a time
(the latency a call gains) and ``--concurrent`` at once on one loop (throughput); the two modes alternate round by
round, so machine load hits both alike. The last stdout line is JSON. Usage:
    python benchmarks/env_step_overhead.py [--rounds 7] [--episodes 40] [--concurrent 8] [--trials 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retroformer_cli import envs  # noqa: E402
from retroformer_cli.agents.actor import env_reset, env_step  # noqa: E402

ASIN = re.compile(r"\bB0[A-Z0-9]{6,}\b")


def script(name: str, obs: str) -> list:
    """The actions of one scripted episode (a function of the last observation where it must be)."""
    if name == "hotpotqa":
        return ["Search[Velantia]", "Lookup[river]", "Search[Orvand]", "Finish[yes]"]
    return ["search[" + " ".join(obs.split("Instruction: [SEP]")[-1].split()[:6]) + "]",
            lambda o: f"click[{(ASIN.findall(o) or ['B0NONE0000'])[0]}]", lambda o: "click[Buy Now]"]


async def episode(name: str, env, task: str, timeout_s: float | None, calls: list[float]) -> None:
    t = time.perf_counter()
    obs, _ = await env_reset(env, timeout_s, seed=0, options={"task_id": task})
    calls.append(time.perf_counter() - t)
    for action in script(name, obs):
        t = time.perf_counter()
        obs, _, terminated, truncated, _ = await env_step(env, action(obs) if callable(action) else action, timeout_s)
        calls.append(time.perf_counter() - t)
        if terminated or truncated:
            break


async def play(name: str, pool: list, tasks: list[str], timeout_s: float | None, concurrent: int) -> tuple[list[float], float]:
    calls: list[float] = []
    gate = asyncio.Semaphore(concurrent)
    free = list(pool[:concurrent])

    async def one(task: str) -> None:
        async with gate:
            env = free.pop()
            try:
                await episode(name, env, task, timeout_s, calls)
            finally:
                free.append(env)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(t) for t in tasks])
    return calls, time.perf_counter() - t0


def measure(name: str, args) -> dict:
    first = envs.make(name)
    pool = [first] + [first.spawn() for _ in range(args.concurrent - 1)]
    tasks = (list(first.task_ids()) * 10)[: args.episodes]
    out: dict = {}
    for concurrent in (1, args.concurrent):
        per: dict[str, list[float]] = {"loop": [], "threads": []}
        rate: dict[str, list[float]] = {"loop": [], "threads": []}
        for r in range(args.rounds + 1):
            order = (("loop", None), ("threads", 120.0)) if r % 2 else (("threads", 120.0), ("loop", None))
            for mode, timeout in order:
                calls, seconds = asyncio.run(play(name, pool, tasks, timeout, concurrent))
                if r:  # round 0 warms caches and threads
                    per[mode].append(statistics.median(calls) * 1e6)
                    rate[mode].append(len(calls) / seconds)
        loop_us, thread_us = statistics.median(per["loop"]), statistics.median(per["threads"])
        out[f"concurrent_{concurrent}"] = {
            "call_us_loop": round(loop_us, 1), "call_us_threads": round(thread_us, 1),
            "overhead_us": round(thread_us - loop_us, 1),
            "calls_per_s_loop": round(statistics.median(rate["loop"])),
            "calls_per_s_threads": round(statistics.median(rate["threads"]))}
    return out


def collect_seconds(name: str, args) -> dict:
    """Whole ``collect`` runs with a scripted actor that answers at once (the worst case: no model time to hide
    the thread hops), bound on and off, alternating; trials must be identical."""
    import tempfile

    from retroformer_cli.config import CollectConfig
    from retroformer_cli.stages import collect
    from retroformer_cli.testing.fake_llm import FakeLLM
    from retroformer_cli.workspace import Workspace

    reply = {"hotpotqa": "Thought: look.\nAction: Search[Velantia]", "webshop": "Thought: look.\nAction: search[wool socks]"}
    seconds: dict[str, list[float]] = {"loop": [], "threads": []}
    seen: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.open(Path(tmp) / "ws")
        for r in range(args.rounds + 1):
            order = (("loop", 0.0), ("threads", 120.0)) if r % 2 else (("threads", 120.0), ("loop", 0.0))
            for mode, timeout in order:
                cfg = CollectConfig(env=name, trials=args.trials, max_steps=6, concurrency=args.concurrent,
                                    run=f"{mode}{r}", env_step_timeout_s=timeout)
                t0 = time.perf_counter()
                collect.run(cfg, ws, actor=FakeLLM([reply[name]]), reflector=None)
                if r:
                    seconds[mode].append(time.perf_counter() - t0)
                seen[mode] = sorted((t.task_id, t.trial, [s.observation for s in t.steps])
                                    for t in collect.load_trials(ws, cfg.run))
    loop_s, thread_s = statistics.median(seconds["loop"]), statistics.median(seconds["threads"])
    episodes, steps = len(seen["loop"]), sum(len(obs) for _, _, obs in seen["loop"])
    return {"episodes": episodes, "steps": steps, "seconds_loop": round(loop_s, 3),
            "seconds_threads": round(thread_s, 3), "ratio": round(thread_s / loop_s, 3),
            "ms_per_episode_added": round((thread_s - loop_s) / episodes * 1000, 3),
            "identical_trials": seen["loop"] == seen["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--concurrent", type=int, default=8)
    ap.add_argument("--trials", type=int, default=5, help="trials per task of the collect runs (every task's)")
    ap.add_argument("--envs", nargs="+", default=["hotpotqa", "webshop"])
    args = ap.parse_args()
    result = {"rounds": args.rounds, "episodes": args.episodes}
    for name in args.envs:
        result[name] = measure(name, args)
        result[name]["collect_fake_actor"] = collect_seconds(name, args)
        print(f"{name}: {json.dumps(result[name])}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
