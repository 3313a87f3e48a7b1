"""`--ray`: collect and ppo's online replays on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``,
3 CPU-only nodes on this machine, started once for the module). The actor is a FakeOpenAIServer in this process
(its replies depend only on the prompt, so every node's episodes are scripted alike), or a tiny random model for
the per-node model server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install 'retroformer-cli[ray]')")

from retroformer_cli.config import CollectConfig  # noqa: E402
from retroformer_cli.stages import collect  # noqa: E402
from retroformer_cli.stages.collect import load_trials  # noqa: E402
from retroformer_cli.testing.fake_openai_server import FakeOpenAIServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]
ANSWERS: dict[str, str] = {}
TIP = "Next time I will search both entities first."


def answers() -> dict[str, str]:
    if not ANSWERS:
        from retroformer_cli.envs.hotpotqa import HotPotQAEnv

        env = HotPotQAEnv()
        for tid in env.task_ids():
            ANSWERS[env.get_question(tid).question.strip()] = env.get_question(tid).answer
    return ANSWERS


def learner(body: dict) -> str:
    """Wrong until the reflection ``TIP`` is in the prompt, then right; reflections are ``TIP``."""
    messages = body["messages"]
    if messages[-1]["content"].rstrip().endswith("Reflection:"):
        return f"I answered too fast. {TIP}"
    task = messages[1]["content"]
    question = task.split("Question:")[1].split("\n")[0].strip()
    if TIP in task:
        return f"Thought: the plan says to check.\nAction: Finish[{answers()[question]}]"
    return "Thought: I guess.\nAction: Finish[definitely wrong]"


def never_solves(body: dict) -> str:
    if body["messages"][-1]["content"].rstrip().endswith("Reflection:"):
        return "I guessed. Next time I will search."
    return "Thought: I look around.\nAction: Search[Velantia]"


@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), old_path) if p)  # nodes import this tree
    fast_failure = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                    "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": fast_failure})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def endpoint_config(url: str, **kw) -> CollectConfig:
    cfg = CollectConfig(**kw)
    for m in (cfg.actor, cfg.reflector):
        m.model, m.base_url = "openai:fake", url
    return cfg


def rows(workspace, run: str) -> list[tuple]:
    return sorted((t.task_id, t.trial, t.success, t.score, tuple(t.memory), t.reflection.text if t.reflection else None,
                   tuple(s.action for s in t.steps), t.env_error) for t in load_trials(workspace, run))


def lines_per_trial(workspace, run: str) -> Counter:
    records = [json.loads(x) for x in workspace.trials_path(run).read_text().splitlines() if x.strip()]
    return Counter((r["task_id"], r["trial"]) for r in records)


def collect_with_fault(cfg: CollectConfig, workspace, ray_cluster, caplog, after_lines: int, fault) -> Any:
    """``collect --ray`` of ``cfg`` against a never-solving endpoint, with ``fault()`` run from another thread once
    ``after_lines`` trials are on disk (the run is then mid-task)."""
    def when_running() -> None:
        path = workspace.trials_path(cfg.run)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not path.exists() or path.read_text().count("\n") < after_lines):
            time.sleep(0.05)
        fault()

    caplog.set_level(logging.WARNING, logger="retroformer.cluster")
    with FakeOpenAIServer(never_solves, delay_s=0.1) as srv:
        for m in (cfg.actor, cfg.reflector):
            m.base_url = srv.base_url
        faulter = threading.Thread(target=when_running)
        faulter.start()
        result = collect.run(cfg, workspace, ray=ray_cluster.address)
        faulter.join()
    return result


def test_ray_run_equals_a_local_run(ray_cluster, workspace):
    with FakeOpenAIServer(learner) as srv:
        local = collect.run(endpoint_config(srv.base_url, trials=3, run="local"), workspace)
        on_ray = collect.run(endpoint_config(srv.base_url, trials=3, run="ray", concurrency=2), workspace,
                             ray=ray_cluster.address)
    assert local.status == on_ray.status == "completed"
    assert rows(workspace, "ray") == rows(workspace, "local")  # same tasks, trials, actions, reflections, scores
    assert on_ray.solved == local.solved == len(answers()) and on_ray.trials_written == 2 * len(answers())
    assert (on_ray.prompt_tokens, on_ray.completion_tokens) == (local.prompt_tokens, local.completion_tokens)
    manifest = workspace.read_manifest("ray")
    assert manifest["cluster"]["nodes"] == alive_nodes() == 3 and manifest["sessions"][-1]["cluster"]["nodes"] == 3
    assert manifest["usage"] == workspace.read_manifest("local")["usage"]
    assert "cluster" not in workspace.read_manifest("local")


def test_online_replays_on_the_cluster_give_the_local_rewards(ray_cluster, workspace, monkeypatch):
    from retroformer_cli.cluster.replays import ClusterReplays
    from retroformer_cli.stages.ppo_rewards import OnlineReward

    on_cluster: list[str] = []
    replay = ClusterReplays.replay

    async def counted(self, run, task_id, memory):  # the replays really went to the cluster
        on_cluster.append(task_id)
        return await replay(self, run, task_id, memory)

    monkeypatch.setattr(ClusterReplays, "replay", counted)
    with FakeOpenAIServer(learner) as srv:
        collect.run(endpoint_config(srv.base_url, trials=2, run="base", memory_size=1), workspace)
        failed = [t for t in load_trials(workspace, "base") if t.trial == 1]
        candidates = [f"I guessed. {TIP}", "I was unlucky.", f"Be careful. {TIP}", "Nothing to change."] * 2
        batch = dict(prompts=[""] * len(candidates), completions=candidates,
                     task_id=[failed[i % len(failed)].task_id for i in range(len(candidates))],
                     run=["base"] * len(candidates), trial=[1] * len(candidates))
        here, there = OnlineReward(workspace), OnlineReward(workspace, ray=ray_cluster.address)
        try:
            local, remote = asyncio.run(here(**batch)), asyncio.run(there(**batch))
            runner_nodes = len(there.cluster.runners.handles)
        finally:
            here.close()
            there.close()
    assert remote == local and sorted(set(local)) == [0.0, 1.0]  # the tip solves the task: +1; anything else: 0
    assert there.episodes == here.episodes == len(on_cluster) == len(candidates) and runner_nodes == 3


def test_a_node_removed_mid_run_loses_no_trial(ray_cluster, workspace, caplog):
    doomed = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    cfg = endpoint_config("", trials=3, run="faults", concurrency=1, max_steps=3)

    # once a few trials are on disk, every node is mid-task
    result = collect_with_fault(cfg, workspace, ray_cluster, caplog, 4,
                                lambda: ray_cluster.remove_node(doomed, allow_graceful=False))
    assert result.status == "completed"
    assert any("worker lost" in r.getMessage() for r in caplog.records)  # the node died with a task in flight
    counts = lines_per_trial(workspace, "faults")
    assert counts == Counter({(t, k): 1 for t in {t for t, _ in counts} for k in (1, 2, 3)})  # every one, once
    assert len({t for t, _ in counts}) == len(answers())
    assert not any(t.env_error for t in load_trials(workspace, "faults"))
    assert alive_nodes() == 3


def test_sigkill_then_sigterm_then_ctrl_c_then_resume(ray_cluster, tmp_path):
    ws = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "RETROFORMER_"))}
    with FakeOpenAIServer(never_solves, delay_s=0.1) as srv:
        cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(ws), "collect", "--run", "sig", "--trials", "3",
               "--max-steps", "2", "--concurrency", "1", "--actor", "openai:fake", "--actor-base-url", srv.base_url,
               "--reflector", "openai:fake", "--reflector-base-url", srv.base_url, "--ray", ray_cluster.address]
        trials = ws / "runs" / "sig" / "trials.jsonl"

        def start(*extra: str, after: int) -> subprocess.Popen:
            proc = subprocess.Popen(cmd + list(extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            deadline = time.monotonic() + 90
            while not (trials.exists() and trials.read_text().count("\n") >= after):
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "no trials written"
                time.sleep(0.05)
            return proc

        killed = start(after=2)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(10)
        for sig in (signal.SIGTERM, signal.SIGINT):  # SIGINT: Ctrl-C
            stopped = start("--resume", after=trials.read_text().count("\n") + 2)
            t0 = time.monotonic()
            stopped.send_signal(sig)
            _, err = stopped.communicate(timeout=30)
            stopped_s = time.monotonic() - t0
            assert stopped.returncode == 130 and stopped_s < 10, (sig, stopped.returncode, stopped_s, err.decode()[-2000:])
            assert "Interrupted: run 'sig' kept" in err.decode()
            manifest = json.loads((ws / "runs" / "sig" / "manifest.json").read_text())
            assert manifest["status"] == "interrupted" and manifest["cluster"]["address"] == ray_cluster.address
        done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = [json.loads(x) for x in trials.read_text().splitlines()]
    counts = Counter((r["task_id"], r["trial"]) for r in records)
    assert len({t for t, _ in counts}) == len(answers()) and set(counts.values()) == {1}  # none lost, none twice
    assert set(k for _, k in counts) == {1, 2, 3}


def test_local_models_run_in_one_server_per_node(ray_cluster, workspace, tiny, monkeypatch):
    from retroformer_cli.cluster import dispatch

    servers: list[dict] = []

    def keep(nodes, root):  # the run kills its servers at the end: keep the handles to ask them first
        made = start_node_models(nodes, root)
        servers.append(made)
        return made

    start_node_models = dispatch.start_node_models
    monkeypatch.setattr(dispatch, "start_node_models", keep)
    identities: list[dict] = []
    real_close = dispatch.Runners.close

    def close(self):
        identities.extend(ray.get([s.identity.remote() for s in self.model_servers.values()]))
        identities.extend(ray.get([s.stats.remote() for s in self.model_servers.values()]))
        real_close(self)

    monkeypatch.setattr(dispatch.Runners, "close", close)
    cfg = CollectConfig(trials=1, run="tiny", tasks=6, max_steps=2, concurrency=2)
    cfg.actor.model, cfg.actor.max_tokens, cfg.reflector.model = f"hf:{tiny['base']}", 8, "none"
    result = collect.run(cfg, workspace, ray=ray_cluster.address)
    assert result.status == "completed" and result.trials_written == 6
    where, stats = identities[:3], identities[3:]
    assert len(servers) == 1 and sorted(w["node_id"] for w in where) == sorted(servers[0])  # one per node
    assert len({w["pid"] for w in where}) == 3 and all(w["models"] <= 1 for w in where)
    served = [s for per_node in stats for s in per_node.values()]
    assert served and sum(s.get("requests", 0) for s in served) >= 6  # the steps ran in the nodes' servers
    recorded = workspace.read_manifest("tiny")["sessions"][-1]["engine_stats"]  # as a local run records its engine's
    assert set(recorded) <= set(servers[0]) and sum(s["requests"] for n in recorded.values() for s in n.values()) >= 6


def test_without_ray_nothing_imports_it_and_a_missing_extra_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    local = ("import sys\nfrom retroformer_cli.config import CollectConfig\nfrom retroformer_cli.stages import collect\n"
             "from retroformer_cli.testing.fake_llm import FakeLLM\nfrom retroformer_cli.workspace import Workspace\n"
             f"r = collect.run(CollectConfig(tasks=2, trials=1), Workspace.open({str(tmp_path / 'ws')!r}), "
             "actor=FakeLLM(['Action: Finish[x]']), reflector=None)\n"
             "assert r.status == 'completed' and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'ray' in m)\n")
    assert subprocess.run([sys.executable, "-c", local], env=env, capture_output=True).returncode == 0
    blocked = ("import sys, runpy\nsys.modules['ray'] = None\nsys.argv = ['retroformer', '-w', "
               f"{str(tmp_path / 'ws2')!r}, 'collect', '--tasks', '1', '--actor', 'openai:x', '--actor-base-url', "
               "'http://127.0.0.1:9/v1', '--ray', 'local']\nrunpy.run_module('retroformer_cli', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", blocked], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "needs the 'ray' extra" in out.stderr and "pip install 'retroformer-cli[ray]'" in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.strip()]) <= 3, out.stderr


def test_an_address_that_does_not_answer_is_one_error_at_once():
    import socket

    from retroformer_cli.cluster.connect import check_address
    from retroformer_cli.errors import BackendError, UsageError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=f"Cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        check_address(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 6  # not Ray's minutes of retries
    for bad in ("", "nonsense", "host:port"):
        with pytest.raises(UsageError):
            check_address(bad)
    assert check_address("auto") == "auto" and check_address(" local ") == "local"


def parity(body: dict) -> str:
    """Right iff the newest reflection in the prompt has an even length; reflections are a fixed sentence."""
    messages = body["messages"]
    if messages[-1]["content"].rstrip().endswith("Reflection:"):
        return "I answered too fast."
    task = messages[1]["content"]
    question = task.split("Question:")[1].split("\n")[0].strip()
    if "Reflections:\n" in task:
        latest = task.split("Reflections:\n", 1)[1].split("\n\n", 1)[0].splitlines()[-1][2:]
        if len(latest) % 2 == 0:
            return f"Thought: the plan helps.\nAction: Finish[{answers()[question]}]"
    return "Thought: I guess.\nAction: Finish[definitely wrong]"


def test_ppo_online_on_the_cluster_trains_on_the_local_rewards(ray_cluster, workspace, tiny, monkeypatch):
    pytest.importorskip("trl")
    from retroformer_cli.cluster.replays import ClusterReplays
    from retroformer_cli.stages.datasets import DatasetConfig, build
    from retroformer_cli.stages.ppo import PPOStageConfig, run_ppo

    on_cluster: list[str] = []
    replay = ClusterReplays.replay

    async def counted(self, run, task_id, memory):
        on_cluster.append(task_id)
        return await replay(self, run, task_id, memory)

    monkeypatch.setattr(ClusterReplays, "replay", counted)
    with FakeOpenAIServer(parity) as srv:
        collect.run(endpoint_config(srv.base_url, trials=2, tasks=3, run="r1"), workspace)
        build(DatasetConfig(name="ratings", runs=["r1"]), workspace)
        results = [run_ppo(PPOStageConfig(base=str(tiny["base"]), mode="online", reward_model=None, name=name,
                                          max_steps=2, num_generations=4, prompts_per_step=1, max_completion_length=8,
                                          save_steps=2, threads=1, max_prompt_tokens=4000, ray=ray), workspace)
                   for name, ray in (("here", None), ("there", ray_cluster.address))]
    rewards = [[h["reward"] for h in r.log_history if "reward" in h] for r in results]
    assert len(rewards[0]) == 2 and rewards[1] == rewards[0]  # the same reflections got the same rewards
    assert results[1].metrics["online_episodes"] == results[0].metrics["online_episodes"] == len(on_cluster) > 0


def test_a_worker_process_killed_mid_run_loses_no_trial(ray_cluster, workspace, caplog, monkeypatch):
    from retroformer_cli.cluster import dispatch

    made: list = []
    ensure = dispatch.Runners.ensure

    def noting(self, include_suspect=False):  # the test needs a runner's handle to find its process
        ensure(self, include_suspect)
        made.extend(h for h in self.handles.values() if h not in made)

    monkeypatch.setattr(dispatch.Runners, "ensure", noting)
    cfg = endpoint_config("", trials=3, run="killed", concurrency=1, max_steps=3)

    result = collect_with_fault(cfg, workspace, ray_cluster, caplog, 3,
                                lambda: os.kill(ray.get(made[0].identity.remote())["pid"], signal.SIGKILL))
    assert result.status == "completed"
    assert any("worker lost" in r.getMessage() for r in caplog.records)
    counts = lines_per_trial(workspace, "killed")
    assert set(counts.values()) == {1} and len(counts) == 3 * len(answers())  # every task x trial, once
    assert not any(t.env_error for t in load_trials(workspace, "killed"))


def test_eval_env_runs_the_protocol_on_the_cluster(ray_cluster, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from retroformer_cli.cli import app
    from retroformer_cli.workspace import Workspace

    monkeypatch.chdir(tmp_path)
    with FakeOpenAIServer(learner) as srv:
        out = CliRunner().invoke(app, ["-w", str(tmp_path / "ws"), "--json", "eval", "--env", "hotpotqa", "--trials", "2",
                                       "--actor", "openai:fake", "--actor-base-url", srv.base_url, "--reflector",
                                       "openai:fake", "--reflector-base-url", srv.base_url, "--ray", ray_cluster.address])
    assert out.exit_code == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)["runs"][0]
    manifest = Workspace.open(tmp_path / "ws").read_manifest(report["run"])
    assert manifest["cluster"]["nodes"] == 3 and manifest["config"]["split"] == "eval"
    assert report["success_per_trial"] == [0.0, 1.0]  # the scripted learner: wrong, reflect, right


def test_a_model_error_on_a_node_stops_the_run_as_locally(ray_cluster, workspace):
    from retroformer_cli.errors import BackendError

    with FakeOpenAIServer(learner, api_key="right-key") as srv:  # the nodes' requests carry no key: 401
        cfg = endpoint_config(srv.base_url, trials=2, tasks=2, run="denied")
        with pytest.raises(BackendError) as err:
            collect.run(cfg, workspace, ray=ray_cluster.address)
    manifest = workspace.read_manifest("denied")
    assert manifest["status"] == "failed" and "401" in str(err.value)
    error = manifest["sessions"][-1]["error"]
    assert error["task_id"] in manifest["task_ids"] and error["trial"] == 1 and error["error"].startswith("BackendError")
