"""ALFWorld: our env's reset/step latency next to the raw engine on the same game, and episodes per
minute of the walkthrough policy with 1 and 2 engine workers.

* raw engine: TextWorld's gym env over one game with alfworld's wrappers, as ``AlfredTWEnv`` builds it
  (its ``reset`` loads the game file and resets: ``reset_cold``), and the same engine's core env reset
  without the reload (``reset_warm``); ``step``: one walkthrough command.
* ours: ``ALFWorldEnv`` (engine in a worker process; every call crosses a pipe): ``cache_games=0``
  reloads the game on every reset like the raw gym env (``reset_cold``); the default keeps loaded
  games, so a repeated reset only rebuilds the start state (``reset_warm``).
  Raw and ours are measured in alternating rounds, so machine load hits both alike.
* throughput: N games, each played once by its walkthrough (so every reset loads its game), on a pool
  of 1 and then 2 workers via ``areset``/``astep``; workers are started before the clock starts.

The last stdout line is JSON. Usage:
    python benchmarks/alfworld_env_overhead.py [--data DIR] [--game TASK_ID] [--rounds 5] [--games 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alfworld"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def raw_engine(path: str):
    """(gym env, core env) of the raw engine over one game, built as alfworld does."""
    argv = list(sys.argv)
    import textworld
    import textworld.gym
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
    env_id = textworld.gym.register_games([path], infos, batch_size=1, asynchronous=False, max_episode_steps=50,
                                          wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])
    gym_env = textworld.gym.make(env_id)
    core = textworld.start(path, infos, wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])
    sys.argv[:] = argv  # loading rewrites sys.argv
    return gym_env, core


def latency(args, data: Path) -> dict:
    from retroformer_cli.envs.alfworld import ALFWorldEnv
    from retroformer_cli.envs.alfworld.wording import commands_in

    ours_warm = ALFWorldEnv(data, split="all")
    ours_cold = ALFWorldEnv(data, split="all", cache_games=0)
    game = ours_warm.get_game(args.game) if args.game else next(g for g in ours_warm.games if g.task_type == "pick")
    walk = json.loads(game.path.read_text(encoding="utf-8"))["walkthrough"]  # the game's own wording
    gym_env, core = raw_engine(str(game.path))
    ours_warm.start()
    ours_cold.start()
    tid = game.task_id
    ours_warm.reset(options={"task_id": tid})  # loads it once; later resets are warm
    ours_cold.reset(options={"task_id": tid})
    t = {k: [] for k in ("raw_cold", "ours_cold", "raw_warm", "ours_warm", "raw_step", "ours_step")}
    for _ in range(args.rounds):
        t0 = time.perf_counter(); gym_env.reset(); t["raw_cold"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); ours_cold.reset(options={"task_id": tid}); t["ours_cold"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); core.reset(); t["raw_warm"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); ours_warm.reset(options={"task_id": tid}); t["ours_warm"].append(time.perf_counter() - t0)
        for c in walk:  # raw core steps, then ours, command by command on the same states
            t0 = time.perf_counter(); core.step(c); t["raw_step"].append(time.perf_counter() - t0)
            t0 = time.perf_counter(); ours_warm.step(c); t["ours_step"].append(time.perf_counter() - t0)
    assert commands_in(walk, "alfworld")  # the walkthrough is playable in our wording too
    ping = []
    for _ in range(50):  # the bare cost of one request to the worker and its reply
        t0 = time.perf_counter(); ours_warm._call("ping", None); ping.append(time.perf_counter() - t0)
    out = {"game": tid, "rounds": args.rounds, "steps_timed": len(t["raw_step"]),
           "ipc_roundtrip_ms": round(1000 * _med(ping), 3)}
    for kind in ("cold", "warm"):
        out[f"reset_{kind}_raw_s"] = round(_med(t[f"raw_{kind}"]), 4)
        out[f"reset_{kind}_ours_s"] = round(_med(t[f"ours_{kind}"]), 4)
        out[f"reset_{kind}_ratio"] = round(_med(t[f"ours_{kind}"]) / _med(t[f"raw_{kind}"]), 3)
    out["step_raw_s"] = round(statistics.fmean(t["raw_step"]), 5)
    out["step_ours_s"] = round(statistics.fmean(t["ours_step"]), 5)
    out["step_ratio"] = round(statistics.fmean(t["ours_step"]) / statistics.fmean(t["raw_step"]), 3)
    out["step_overhead_ms"] = round(1000 * (out["step_ours_s"] - out["step_raw_s"]), 2)
    gym_env.close()
    core.close()
    ours_warm.close()
    ours_cold.close()
    return out


def throughput(data: Path, n_games: int, workers: int) -> dict:
    from retroformer_cli.envs.alfworld import ALFWorldEnv

    first = ALFWorldEnv(data)
    by_type: dict[str, list] = {}
    for g in first.games:
        by_type.setdefault(g.task_type, []).append(g)
    games = []  # round-robin over task types: a mix like the benchmark's
    while len(games) < min(n_games, len(first.games)):
        for gs in by_type.values():
            if gs and len(games) < n_games:
                games.append(gs.pop(0))
    envs = [first] + [first.spawn() for _ in range(workers - 1)]
    for e in envs:
        e.start()

    async def main() -> tuple[float, int]:
        pool: asyncio.Queue = asyncio.Queue()
        for e in envs:
            pool.put_nowait(e)
        won = 0

        async def play(g) -> None:
            nonlocal won
            env = await pool.get()
            try:
                await env.areset(options={"task_id": g.task_id})
                for c in env.walkthrough(g.task_id):
                    _, _, term, trunc, info = await env.astep(c)
                    if term or trunc:
                        won += bool(info["success"])
                        break
            finally:
                pool.put_nowait(env)

        t0 = time.perf_counter()
        await asyncio.gather(*(play(g) for g in games))
        return time.perf_counter() - t0, won

    seconds, won = asyncio.run(main())
    for e in envs:
        e.close()
    return {"episodes": len(games), "won": won, "seconds": round(seconds, 2),
            "episodes_per_min": round(60 * len(games) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("ALFWORLD_DATA") or str(DEFAULT_DATA))
    ap.add_argument("--game", default=None, help="task id (default: the first pick_and_place game)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--games", type=int, default=12, help="episodes for the throughput runs")
    args = ap.parse_args()  # parsed before any engine load (it rewrites sys.argv)
    data = Path(args.data)
    lat = latency(args, data)
    print(f"reset (load+reset): raw {lat['reset_cold_raw_s']:.3f} s, ours {lat['reset_cold_ours_s']:.3f} s, "
          f"ratio {lat['reset_cold_ratio']:.3f}", file=sys.stderr)
    print(f"reset (loaded game): raw {lat['reset_warm_raw_s']:.3f} s, ours {lat['reset_warm_ours_s']:.3f} s, "
          f"ratio {lat['reset_warm_ratio']:.3f}", file=sys.stderr)
    print(f"step: raw {1000 * lat['step_raw_s']:.1f} ms, ours {1000 * lat['step_ours_s']:.1f} ms, "
          f"ratio {lat['step_ratio']:.3f}", file=sys.stderr)
    one = throughput(data, args.games, 1)
    two = throughput(data, args.games, 2)
    print(f"walkthrough policy: 1 worker {one['episodes_per_min']} episodes/min, "
          f"2 workers {two['episodes_per_min']} episodes/min", file=sys.stderr)
    out = dict(lat)
    out.update({"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                "throughput_1_worker": one, "throughput_2_workers": two,
                "episodes_per_min_1_worker": one["episodes_per_min"], "episodes_per_min_2_workers": two["episodes_per_min"],
                "speedup_2_vs_1": round(two["episodes_per_min"] / one["episodes_per_min"], 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
