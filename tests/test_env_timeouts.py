"""Every env reset and step is time-bounded (issue #20 part 3): a synchronous env (HotPotQA, WebShop, a plugin's)
whose reset or step hangs is timed out, its episode replayed on a fresh instance up to ``env_retries`` and then
recorded as ``env_error``; other episodes keep running meanwhile; the hung instance is never used again. The same
holds for ppo's online replays, a run stays deterministic, and SIGTERM stops a run whose step is hung.
(ALFWorld, an asynchronous env, is covered by tests/test_reliability.py: a SIGSTOPped worker times out.)"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retroformer_cli import envs
from retroformer_cli.agents import env_threads
from retroformer_cli.config import CollectConfig
from retroformer_cli.envs.hotpotqa import HotPotQAEnv
from retroformer_cli.envs.webshop.env import WebShopEnv
from retroformer_cli.stages import collect
from retroformer_cli.testing.fake_llm import FakeLLM

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PLUGIN = TESTS / "plugin_example"


class Hangs:
    """What the hanging envs do and saw: ``plan`` maps a task id to (op, how many calls of op hang)."""

    plan: dict[str, list] = {}
    release = threading.Event()  # set at teardown: the stuck threads return
    hung: set[int] = set()  # id() of the instances whose call hung
    calls: list[tuple[int, str, str]] = []  # (instance, op, task) of every call
    reused: list[tuple[int, str]] = []  # calls made on an instance after it hung: must stay empty
    marker: str | None = None  # a file written when a call hangs (the SIGTERM test waits for it)


class HangMixin:
    def _maybe_hang(self, op: str, task: str) -> None:
        me = id(self)
        Hangs.calls.append((me, op, task))
        if me in Hangs.hung:
            Hangs.reused.append((me, op))
        rule = Hangs.plan.get(task)
        if rule and rule[0] == op and rule[1] > 0:
            rule[1] -= 1
            Hangs.hung.add(me)
            if Hangs.marker:
                Path(Hangs.marker).write_text(task)
            Hangs.release.wait(30)  # blocks the thread: only the timeout gets the run out (30 s: a test that fails)

    def reset(self, *, seed=None, options=None):
        self._hang_task = options["task_id"]
        self._maybe_hang("reset", self._hang_task)
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self._maybe_hang("step", self._hang_task)
        return super().step(action)


class HangingHotPotQA(HangMixin, HotPotQAEnv):
    pass  # spawn() makes twins of the subclass


class HangingWebShop(HangMixin, WebShopEnv):
    pass


REPLY = {"hotpotqa": "Thought: look it up.\nAction: Search[Velantia]",
         "webshop": "Thought: look.\nAction: search[merino wool socks]",
         "echo": "Thought: say it.\nAction: Say[kiwi]"}


def _reset_hangs() -> None:
    Hangs.release.set()
    deadline = time.monotonic() + 10
    while env_threads.stuck_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    Hangs.plan, Hangs.hung, Hangs.calls, Hangs.reused, Hangs.marker = {}, set(), [], [], None
    Hangs.release = threading.Event()


@pytest.fixture
def hanging(monkeypatch):
    """``hanging(name)``: env ``name``'s spec now builds its hanging twin (the actor reads the spec)."""
    _reset_hangs()

    def use(name: str) -> None:
        if name == "echo":  # the plugin example's env, as a third-party package ships it
            monkeypatch.syspath_prepend(str(PLUGIN))
            from retroformer_echo import ENV_SPEC
            from retroformer_echo.env import EchoEnv

            class HangingEcho(HangMixin, EchoEnv):
                def spawn(self):
                    return HangingEcho(max_steps=self.max_steps, words=",".join(self.words))

            monkeypatch.setattr(sys.modules[__name__], "HangingEcho", HangingEcho, raising=False)
            base = ENV_SPEC
        else:
            base = envs.get_spec(name)
        entry = {"hotpotqa": "HangingHotPotQA", "webshop": "HangingWebShop", "echo": "HangingEcho"}[name]
        spec = dataclasses.replace(base, entry_point=f"{__name__}:{entry}")
        if name == "echo":
            envs._REGISTRY.register(spec, replace=True)
        else:
            monkeypatch.setitem(envs._REGISTRY.specs(), name, spec)

    yield use
    envs._REGISTRY.unregister("echo")
    _reset_hangs()
    for mod in [m for m in sys.modules if m == "retroformer_echo" or m.startswith("retroformer_echo.")]:
        del sys.modules[mod]  # tests/test_registry.py checks the plugin loads lazily


def _cfg(name: str, **kw) -> CollectConfig:
    base = dict(env=name, tasks=3, trials=1, max_steps=2, concurrency=3, run="hang", env_step_timeout_s=0.3,
                env_retries=1)
    if name == "echo":
        base["env_options"] = {"words": "kiwi,plum,fig"}
    base.update(kw)
    return CollectConfig(**base)


@pytest.mark.parametrize("op", ["reset", "step"])
@pytest.mark.parametrize("name", ["hotpotqa", "webshop", "echo"])
def test_a_hung_sync_env_is_timed_out_replayed_then_recorded_and_never_reused(workspace, hanging, name, op):
    hanging(name)
    cfg = _cfg(name)
    always, once, fine = collect.select_tasks(list(envs.make_for(cfg).task_ids()), cfg)
    Hangs.plan = {always: [op, 99], once: [op, 1]}
    t0 = time.perf_counter()
    res = collect.run(cfg, workspace, actor=FakeLLM([REPLY[name]]), reflector=None)
    assert res.status == "completed" and time.perf_counter() - t0 < 20
    lines = [json.loads(x) for x in workspace.trials_path("hang").read_text().splitlines()]
    by_task = {t["task_id"]: t for t in lines}
    assert by_task[always]["env_attempts"] == 2  # played, timed out, replayed once (env_retries=1), recorded
    assert by_task[always]["env_error"] == f"the env did not answer {op} within 0.3 s"
    assert by_task[once]["env_attempts"] == 2 and by_task[once]["env_error"] is None
    assert by_task[once]["steps"], "the replay played the episode"
    assert by_task[fine]["env_attempts"] == 1 and by_task[fine]["env_error"] is None
    # the other episodes kept running while one was hung: the fine task's trial is on disk first
    order = [t["task_id"] for t in lines]
    assert order.index(fine) < order.index(once) < order.index(always)
    # three hangs, three instances retired: none was handed to an episode again, fresh ones were built
    assert len(Hangs.hung) == 3 and Hangs.reused == []
    assert len({inst for inst, _, _ in Hangs.calls}) >= 4, "a fresh instance replaced each hung one"
    assert env_threads.stuck_threads() == 3  # the threads cannot be killed: left behind, counted


def test_too_many_stuck_threads_stop_the_run(workspace, hanging, monkeypatch):
    hanging("hotpotqa")
    monkeypatch.setattr(env_threads, "MAX_STUCK_THREADS", 1)
    cfg = _cfg("hotpotqa", concurrency=1)
    first = collect.select_tasks(list(HotPotQAEnv().task_ids()), cfg)[0]
    Hangs.plan = {first: ["step", 99]}
    with pytest.raises(env_threads.TooManyHungEnvs, match="1 env calls hung"):
        collect.run(cfg, workspace, actor=FakeLLM([REPLY["hotpotqa"]]), reflector=None)
    manifest = workspace.read_manifest("hang")
    assert manifest["status"] == "failed" and "TooManyHungEnvs" in manifest["sessions"][-1]["error"]["error"]


def test_threaded_steps_give_the_same_trials_as_steps_on_the_event_loop(workspace):
    def actor(messages, config):  # the reply depends on what the env answered so far
        return f"Thought: step.\nAction: Search[{'Velantia' if len(messages[-1].content) % 2 else 'Orvand'}]"

    runs = {}
    for run, timeout in (("threads", 30.0), ("loop", 0.0), ("threads2", 30.0)):
        cfg = CollectConfig(tasks=6, trials=2, max_steps=3, concurrency=4, run=run, env_step_timeout_s=timeout)
        collect.run(cfg, workspace, actor=FakeLLM(actor), reflector=FakeLLM(["Search sooner."]))
        runs[run] = sorted((t.task_id, t.trial, t.score, [(s.action, s.observation) for s in t.steps])
                           for t in collect.load_trials(workspace, run))
    assert runs["threads"] == runs["loop"] == runs["threads2"]
    assert len(runs["loop"]) == 12 and env_threads.stuck_threads() == 0


def test_online_replays_time_out_hung_envs_retry_and_give_no_reward_after_the_retries(workspace, hanging):
    from retroformer_cli.stages.ppo_rewards import OnlineReward

    collect.run(CollectConfig(tasks=2, trials=2, max_steps=2, run="r1", env_step_timeout_s=0.3, env_retries=1),
                workspace, actor=FakeLLM(["Thought: guess.\nAction: Finish[definitely wrong]"]),
                reflector=FakeLLM(["Answer later."]))
    hanging("hotpotqa")
    always, once = sorted({t.task_id for t in collect.load_trials(workspace, "r1")})
    Hangs.plan = {always: ["step", 99], once: ["reset", 1]}
    reward = OnlineReward(workspace, actor=FakeLLM(["Thought: guess.\nAction: Finish[definitely wrong]"]))
    logged: dict[str, float] = {}
    out = asyncio.run(reward(prompts=["", ""], completions=["plan a", "plan b"], task_id=[always, once],
                             run=["r1", "r1"], trial=[1, 1], log_metric=logged.__setitem__))
    assert out == [None, 0.0]  # no reward where the env failed every attempt; the other was replayed
    assert reward.env_errors == 1 and reward.episodes == 1 and logged["online/env_errors"] == 1.0
    assert len(Hangs.hung) == 3 and Hangs.reused == []
    reward.close()


def test_cancel_ends_the_online_replays_in_flight_on_another_threads_loop(workspace):
    """What ppo does on Ctrl-C/SIGTERM: TRL runs the reward on its own loop thread; cancel() ends those replays."""
    from retroformer_cli.stages.ppo_rewards import OnlineReward

    class Stuck:  # an actor whose request never answers
        model_id = "stuck"
        started = threading.Event()

        async def agenerate(self, messages, config):
            self.started.set()
            await asyncio.sleep(3600)

        async def aclose(self):
            pass

    collect.run(CollectConfig(tasks=1, trials=2, max_steps=2, run="r1"), workspace,
                actor=FakeLLM(["Thought: guess.\nAction: Finish[definitely wrong]"]), reflector=FakeLLM(["Later."]))
    (task,) = {t.task_id for t in collect.load_trials(workspace, "r1")}
    actor = Stuck()
    reward = OnlineReward(workspace, actor=actor)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        call = asyncio.run_coroutine_threadsafe(reward(prompts=[""], completions=["plan"], task_id=[task], run=["r1"],
                                                       trial=[1]), loop)
        assert actor.started.wait(30)
        t0 = time.perf_counter()
        reward.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            call.result(1)
        assert time.perf_counter() - t0 < 2.0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        reward.close()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_stops_a_collect_whose_env_step_is_hung_within_seconds(tmp_path, sig):
    marker = tmp_path / "hung"
    script = f"""
import dataclasses, sys
from retroformer_cli import envs
from retroformer_cli.config import CollectConfig
from retroformer_cli.stages import collect
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.workspace import Workspace
import test_env_timeouts as t
envs._REGISTRY.specs()["hotpotqa"] = dataclasses.replace(envs.get_spec("hotpotqa"),
                                                         entry_point="test_env_timeouts:HangingHotPotQA")
t.Hangs.marker = {str(marker)!r}
t.Hangs.plan = {{task: ["step", 99] for task in envs.make("hotpotqa").task_ids()}}
try:
    collect.run(CollectConfig(tasks=2, trials=1, max_steps=2, run="term", env_step_timeout_s=600),
                Workspace.open({str(tmp_path / 'ws')!r}), actor=FakeLLM([t.REPLY["hotpotqa"]]), reflector=None)
except collect.CollectInterrupted as exc:
    print(exc, file=sys.stderr)
    sys.exit(130)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=TESTS, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "no step hung"
    time.sleep(0.2)
    t0 = time.perf_counter()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert time.perf_counter() - t0 < 3.0, "the signal waited for the hung step"
    assert proc.returncode == 130 and "Interrupted: run 'term'" in err
    manifest = json.loads((tmp_path / "ws" / "runs" / "term" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
