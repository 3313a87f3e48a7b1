"""What `collect --ray` costs and gains: episodes per second on 1, 2 and 4 local Ray "nodes" against local mode.

Two workloads, each run once in local mode and once per node count (a fresh ``ray.cluster_utils.Cluster`` of N
nodes, 1 CPU each, all on this machine):

* ALFWorld (CPU-bound: TextWorld in worker processes), the actor a scripted walkthrough policy: it plays each
  game's expert walkthrough (``env.walkthrough``, as ``envs/alfworld/oracle.py`` reads it), so every episode wins
  in as many steps as its walkthrough has and no model runs (games are taken in task id order, skipping those whose
  first observation another taken game already has: the policy tells games apart by it).
* HotPotQA (waiting-bound): the actor an OpenAI-compatible endpoint that answers after ``--delay`` seconds
  (``fake_openai_server --delay 0.2``, its own process) with a search that never finishes the task, so every
  episode takes ``--max-steps`` calls.

``--concurrency`` (ALFWorld) and ``--hotpot-concurrency`` are tasks in flight per node (with ``--ray`` collect's
concurrency is per node; locally it is the whole run's), one trial per task. Reported per workload and leg: wall time of ``collect.run`` (nodes' runner start and env builds
included; the cluster's own start is reported apart), episodes per second over the whole run and in the steady
state (the episodes after the first, over the time from the first trial to the last), the first trial's wait, and

    overhead_ms_per_episode        = (t(ray, 1 node) - t(local)) / episodes      whole runs, same concurrency
    steady_overhead_ms_per_episode = 1/steady eps (ray, 1 node) - 1/steady eps (local)
    extra_first_trial_s            = first trial's wait on Ray, 1 node - locally   (the once-per-run start)
    speedup_N, steady_speedup_N    = episodes/s on N nodes / episodes/s local

With ``--repeats R`` every leg runs R times, the legs' order reversed on every other repeat, and each leg's run
with the median wall time is the one reported (all runs are in the JSON).

The last stdout line is JSON with every figure. Usage:

    python benchmarks/cluster_collect.py [--nodes 1,2,4] [--alf-tasks 40] [--hotpot-tasks 64] [--concurrency 2]
                                         [--hotpot-concurrency 8] [--delay 0.2] [--max-steps 4]
                                         [--data ../shared/data/alfworld] [--skip alfworld|hotpotqa] [--repeats 1]
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
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # the nodes

from benchmarks.collect_scaling import write_questions  # noqa: E402

NEVER_FINISHES = "Thought: I need to look this up first.\nAction: Search[Velantia]"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class WalkthroughActor:
    """An LLMClient that plays each ALFWorld game's walkthrough, step N answering its N-th command (the game found
    by its first observation in the prompt). Shipped to the nodes as is (``collect.run(actor=...)``)."""

    model_id = "walkthrough"

    def __init__(self, walks: dict[str, list[str]]):
        self.walks = walks

    async def agenerate(self, messages, config):
        from retroformer_cli.llm.base import Generation

        task = messages[1].content
        n = int(messages[-1].content.rstrip().rsplit("Thought ", 1)[1].rstrip(":"))
        walk = next(w for first, w in self.walks.items() if first in task)
        return Generation(text=f" next step.\nAction {n}: {walk[min(n, len(walk)) - 1]}", model_id=self.model_id)

    async def aclose(self) -> None:
        pass


class TrialClock:
    """A Progress that notes when each trial arrives (collect logs one detail line per trial)."""

    def __init__(self):
        self.arrivals: list[float] = []

    def task(self, description, total=None, *, completed=0):
        return None

    def advance(self, task, steps=1, *, completed=None, info=None):
        pass

    def log(self, task, message, *, detail=False):
        if detail and " trial " in message:
            self.arrivals.append(time.perf_counter())

    def finish(self, task):
        pass


def walkthroughs(data: str, n: int) -> tuple[list[str], dict[str, list[str]]]:
    from retroformer_cli.envs import make

    env = make("alfworld", data=data)
    try:
        ids, walks = [], {}
        for tid in sorted(env.task_ids()):  # games whose first observation tells them apart (some share one)
            obs, _ = env.reset(options={"task_id": tid})
            if obs.strip() not in walks:
                ids.append(tid)
                walks[obs.strip()] = list(env.walkthrough(tid))
            if len(ids) == n:
                break
        return ids, walks
    finally:
        env.close()


def run_leg(cfg_kw: dict, actor, nodes: int | None) -> dict:
    """One collect run (local when ``nodes`` is None) on a fresh workspace and, for Ray, a fresh cluster."""
    import ray

    from retroformer_cli.config import CollectConfig
    from retroformer_cli.stages import collect
    from retroformer_cli.workspace import Workspace

    cluster, started = None, 0.0
    if nodes is not None:
        from ray.cluster_utils import Cluster

        t = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        started = time.perf_counter() - t
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg, clock = CollectConfig(**cfg_kw), TrialClock()
            t = time.perf_counter()
            res = collect.run(cfg, Workspace.open(Path(tmp) / "ws"), actor=actor, reflector=None, progress=clock,
                              ray=cluster.address if cluster else None)
            seconds = time.perf_counter() - t
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    assert res.status == "completed" and len(clock.arrivals) == res.trials_written, res
    first, last = clock.arrivals[0], clock.arrivals[-1]
    # steady state: episodes after the first over the time they took (the run's fixed start-up left out)
    steady = (len(clock.arrivals) - 1) / (last - first) if last > first else float("nan")
    return {"nodes": nodes, "seconds": round(seconds, 2), "episodes": res.trials_written,
            "episodes_per_s": round(res.trials_written / seconds, 3), "steady_episodes_per_s": round(steady, 3),
            "first_trial_s": round(first - t, 2), "solved": res.solved, "cluster_start_s": round(started, 2)}


def median_leg(runs: list[dict]) -> dict:
    """The leg's run with the median wall time (every run stays in the JSON)."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def workload(name: str, cfg_kw: dict, actor, node_counts: list[int], repeats: int) -> dict:
    """Every leg (local, then each node count) ``repeats`` times, the order reversed on every other repeat so no
    leg always runs first or last on a machine whose load drifts; each leg's median run counts."""
    order: list[int | None] = [None, *node_counts]
    runs: dict[int | None, list[dict]] = {n: [] for n in order}
    for r in range(repeats):
        for n in (order if r % 2 == 0 else order[::-1]):
            runs[n].append(run_leg(cfg_kw, actor, n))
            log(f"{name} {'local' if n is None else f'ray {n} node(s)'} (repeat {r + 1}): {runs[n][-1]}")
    legs = [median_leg(runs[n]) for n in order]
    local = legs[0]
    out = {"legs": legs, "runs": {str(n): runs[n] for n in order}, "concurrency_per_node": cfg_kw["concurrency"],
           "repeats": repeats}
    one = next((leg for leg in legs[1:] if leg["nodes"] == 1), None)
    if one is not None:  # what Ray adds to each episode at the same concurrency, and once per run
        out["overhead_ms_per_episode"] = round((one["seconds"] - local["seconds"]) / local["episodes"] * 1000, 1)
        out["steady_overhead_ms_per_episode"] = round(
            (1 / one["steady_episodes_per_s"] - 1 / local["steady_episodes_per_s"]) * 1000, 1)
        out["extra_first_trial_s"] = round(one["first_trial_s"] - local["first_trial_s"], 2)
    out["local_s_per_episode"] = round(local["seconds"] / local["episodes"], 3)
    for leg in legs[1:]:
        out[f"speedup_{leg['nodes']}"] = round(leg["episodes_per_s"] / local["episodes_per_s"], 2)
        out[f"steady_speedup_{leg['nodes']}"] = round(leg["steady_episodes_per_s"] / local["steady_episodes_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--alf-tasks", type=int, default=40)
    ap.add_argument("--hotpot-tasks", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=2, help="ALFWorld tasks in flight per node")
    ap.add_argument("--hotpot-concurrency", type=int, default=8, help="HotPotQA tasks in flight per node")
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alfworld"))
    ap.add_argument("--skip", choices=("alfworld", "hotpotqa"), default=None)
    ap.add_argument("--repeats", type=int, default=1, help="runs of every leg, alternating order; medians count")
    args = ap.parse_args()
    node_counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    report: dict = {"cpus": os.cpu_count(), "node_counts": node_counts}
    if args.skip != "alfworld":
        ids, walks = walkthroughs(args.data, args.alf_tasks)
        cfg = dict(env="alfworld", data=args.data, task_ids=ids, trials=1, concurrency=args.concurrency,
                   run="bench-alf")
        report["alfworld"] = workload("alfworld", cfg, WalkthroughActor(walks), node_counts, args.repeats)
        report["alfworld"]["steps_per_episode"] = round(sum(map(len, walks.values())) / len(walks), 1)
    if args.skip != "hotpotqa":
        from retroformer_cli.config import ModelConfig

        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "questions.jsonl"
            write_questions(data, args.hotpot_tasks)
            server = subprocess.Popen([sys.executable, "-m", "retroformer_cli.testing.fake_openai_server", "--port", "0",
                                       "--delay", str(args.delay), "--reply", NEVER_FINISHES],
                                      stdout=subprocess.PIPE, text=True)
            try:
                url = server.stdout.readline().strip()
                cfg = dict(env="hotpotqa", data=str(data), trials=1, concurrency=args.hotpot_concurrency,
                           max_steps=args.max_steps, run="bench-hotpot",
                           actor=ModelConfig(model="openai:fake", base_url=url))
                report["hotpotqa"] = workload("hotpotqa", cfg, None, node_counts, args.repeats)
                report["hotpotqa"]["delay_s"], report["hotpotqa"]["calls_per_episode"] = args.delay, args.max_steps
            finally:
                server.terminate()
                server.wait(10)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
