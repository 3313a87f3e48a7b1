"""WebShop episodes per second over HTTP (`retroformer env serve`, 8 clients) against in-process.

Usage: python benchmarks/env_server.py [--data ../shared/data/webshop] [--episodes 80] [--clients 8] [--workers 8]
                                      [--processes N]

--data defaults to ../shared/data/webshop when present (the 1k catalog), else our sample catalog. Every episode is
the same scripted policy: reset, search the instruction, open the first result, Buy Now (4 calls, the reward
computed with spaCy, loaded first). Each of the five measurements below plays its own goals (measurement k: goal k,
k+5, k+10, ...), so no search or reward is served from a cache filled by an earlier measurement (while
5 x --episodes + 21 goals fit the catalog's goals; otherwise the script says the sets overlap). Measured:

- in-process, 1 thread, and in-process with ``--clients`` threads (one spawned env each): the GIL's share;
- over HTTP: the real `env serve` command in its own process, ``--clients`` client threads in this process, each
  with its own connection and session; and 1 client (per-step latency over loopback);
- over HTTP again with ``env serve --processes N`` (env steps in N worker processes instead of threads).

Prints a few lines; the last one is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import retroformer_cli  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))
from retroformer_cli.envserver import EnvServerConfig, build_env
from retroformer_cli.envserver.client import EnvClient

SHARED = REPO.parent / "shared" / "data" / "webshop"
SKIP = ("back to search", "next >", "< prev")


def episode(env, task_id: str, lat: list[float] | None = None) -> int:
    """One scripted episode on ``env`` (local or remote); returns its steps; appends step latencies to ``lat``."""
    def timed(call, *args, **kw):
        t0 = time.perf_counter()
        out = call(*args, **kw)
        if lat is not None:
            lat.append(time.perf_counter() - t0)
        return out

    _, info = timed(env.reset, options={"task_id": task_id})
    *_, info = timed(env.step, f"search[{info['instruction'].split(' with ')[0]}]")
    hits = [c for c in info["available_actions"]["clickables"] if c not in SKIP]
    if not hits:
        return 1
    timed(env.step, f"click[{hits[0]}]")
    timed(env.step, "click[buy now]")
    return 3


def run(make_env, tasks: list[str], clients: int) -> tuple[float, int]:
    """Episodes over ``tasks`` by ``clients`` threads, each with its own env; (seconds, steps)."""
    chunks = [tasks[i::clients] for i in range(clients)]

    def worker(chunk: list[str]) -> int:
        env = make_env()
        try:
            return sum(episode(env, t) for t in chunk)
        finally:
            env.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        steps = sum(pool.map(worker, chunks))
    return time.perf_counter() - t0, steps


def start_server(data: Path | None, port: int, workspace: str, extra: list[str]) -> subprocess.Popen:
    args = [sys.executable, "-c", "from retroformer_cli.commands.env import app; app()", "serve", "--env", "webshop",
            "--port", str(port), "--max-sessions", "256", *extra]
    if data is not None:
        args += ["--data", str(data)]
    env = {**os.environ, "RETROFORMER_WORKSPACE": workspace}
    env.pop("RETROFORMER_ENV_API_KEY", None)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with EnvClient(f"http://127.0.0.1:{port}", timeout_s=2) as c:
                c.health()
                return proc
        except Exception:
            if proc.poll() is not None:
                raise SystemExit(f"env serve exited with {proc.returncode}")
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("env serve did not start within 300 s")


def over_http(args, ws: str, extra: list[str], runs: list[tuple[str, int, list[str]]], warm_task: str,
              probe: list[str], figures: dict) -> list[float]:
    """Start `env serve` with ``extra`` flags, warm every worker, time ``runs``; per-step latencies of ``probe``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.data, port, ws, extra)
    url = f"http://127.0.0.1:{port}"
    try:
        with EnvClient(url) as client:
            warm = [client.session() for _ in range(max(1, args.processes))]
            for env in warm:  # each worker process loads spaCy at its first purchase
                episode(env, warm_task)
                env.close()
            lat: list[float] = []
            with client.session() as env:
                for t in probe:
                    episode(env, t, lat)
        for label, clients, tasks in runs:
            secs, steps = run(lambda: EnvClient(url).session(), tasks, clients)
            figures[f"{label}_episodes_per_s"] = round(len(tasks) / secs, 1)
            print(f"HTTP ({' '.join(extra)}), {clients} client(s): {len(tasks)} episodes, {steps} steps in "
                  f"{secs:.2f} s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
    return lat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED if SHARED.is_dir() else None)
    ap.add_argument("--episodes", type=int, default=80)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8, help="server threads (the default server)")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2, help="server worker processes (second run)")
    args = ap.parse_args(argv)
    n = args.clients

    with tempfile.TemporaryDirectory() as ws:
        cfg = EnvServerConfig(env="webshop", data=str(args.data) if args.data else None)
        base = build_env(cfg, cache_dir=Path(ws) / "cache")
        ids = base.task_ids()
        stride = 5  # one offset per measurement: inproc_1, inproc_N, http_1, http_N, http_N_processes
        sets = [[ids[(k + stride * i) % len(ids)] for i in range(args.episodes)] for k in range(stride)]
        if stride * args.episodes + 21 > len(ids):
            print(f"note: {len(ids)} goals are too few for {stride} x {args.episodes} distinct episodes plus 21 "
                  "probes: the goal sets overlap", file=sys.stderr)
        probe = [ids[-1 - i] for i in range(20)]  # per-step latency, in-process and over HTTP
        episode(base.spawn(), ids[-21])  # spaCy loads at the first purchase
        local_lat: list[float] = []
        for t in probe:
            episode(base.spawn(), t, local_lat)
        figures = {"catalog": len(base.catalog), "goals": len(ids), "episodes": args.episodes, "clients": n,
                   "workers": args.workers, "processes": args.processes, "cpu_count": os.cpu_count()}
        for k, (label, clients) in enumerate((("inproc_1", 1), (f"inproc_{n}", n))):
            secs, steps = run(base.spawn, sets[k], clients)
            figures[f"{label}_episodes_per_s"] = round(args.episodes / secs, 1)
            print(f"in-process, {clients} thread(s): {args.episodes} episodes, {steps} steps in {secs:.2f} s",
                  file=sys.stderr)
        http_lat = over_http(args, ws, ["--workers", str(args.workers)],
                             [("http_1", 1, sets[2]), (f"http_{n}", n, sets[3])], ids[-21], probe, figures)
        over_http(args, ws, ["--processes", str(args.processes)], [(f"http_{n}_processes", n, sets[4])],
                  ids[-21], [], figures)
    figures["step_p50_ms_inproc"] = round(statistics.median(local_lat) * 1000, 2)
    figures["step_p50_ms_http"] = round(statistics.median(http_lat) * 1000, 2)
    figures["http_vs_inproc"] = round(figures[f"http_{n}_episodes_per_s"] / figures[f"inproc_{n}_episodes_per_s"], 2)
    print(f"per step p50: {figures['step_p50_ms_inproc']} ms in-process, {figures['step_p50_ms_http']} ms over HTTP",
          file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
