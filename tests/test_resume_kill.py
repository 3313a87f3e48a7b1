"""Crash safety of `retroformer collect` in a real process: SIGKILL mid-run, Ctrl-C (SIGINT) mid-run, then
`--resume` finishes exactly the missing (task, trial) pairs. The model is a FakeOpenAIServer whose answers
never solve a task, so every task runs all its trials; a gate in the server holds requests so that each
signal lands while the run is certainly still in flight."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from retroformer_cli.testing.fake_openai_server import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]
TRIALS = 3

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")


class GatedReply:
    """Wrong answers; once armed, requests past the next ``n`` block until released (or 60 s pass)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls = 0
        self.limit = math.inf
        self.blocked = 0  # requests held since the last release
        self._generation = 0

    def arm(self, n: int) -> None:
        with self._cond:
            self.limit = self.calls + n

    def release(self) -> None:
        with self._cond:
            self.limit = math.inf
            self.blocked = 0
            self._generation += 1  # wakes exactly the requests held so far, even if re-armed at once
            self._cond.notify_all()

    def __call__(self, body: dict) -> str:
        with self._cond:
            self.calls += 1
            if self.calls > self.limit:
                gen = self._generation
                self.blocked += 1
                self._cond.wait_for(lambda: self._generation != gen, timeout=60)
        prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
        if prompt.rstrip().endswith("Reflection:"):
            return "I guessed. Next time I will search before answering."
        return "Thought: a guess.\nAction: Finish[certainly not the answer]"


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the collect process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture
def setup(tmp_path):
    gate = GatedReply()
    with FakeOpenAIServer(gate, delay_s=0.05) as srv:
        env = dict(os.environ)
        for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "DATA_DIR", "CKPT_DIR",
                    "RETROFORMER_WORKSPACE", "RETROFORMER_DEBUG"):
            env.pop(var, None)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        ws = tmp_path / "ws"
        base = [sys.executable, "-m", "retroformer_cli", "-w", str(ws), "collect", "--run", "killme",
                "--actor", "openai:fake", "--actor-base-url", srv.base_url,
                "--reflector", "openai:fake", "--reflector-base-url", srv.base_url]
        procs: list[subprocess.Popen] = []

        def start(*extra: str, log: str) -> subprocess.Popen:
            with open(tmp_path / f"{log}.out", "wb") as out, open(tmp_path / f"{log}.err", "wb") as err:
                p = subprocess.Popen(base + list(extra), cwd=tmp_path, env=env, stdout=out, stderr=err,
                                     start_new_session=True)  # its own process group, killed as one
            procs.append(p)
            return p

        try:
            yield gate, ws, start, tmp_path
        finally:
            gate.release()
            for p in procs:  # never leave a child behind, whatever failed
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def test_sigkill_then_sigint_then_resume_runs_every_trial_exactly_once(setup):
    gate, ws, start, tmp = setup
    trials_path = ws / "runs" / "killme" / "trials.jsonl"
    manifest_path = ws / "runs" / "killme" / "manifest.json"

    # 1) SIGKILL the whole process group while requests are in flight.
    gate.arm(12)  # three tasks at a time: ~4 calls each, so at least three trials are on disk by then
    p = start("--trials", str(TRIALS), "--concurrency", "3", log="run1")
    wait_for(lambda: count_lines(trials_path) >= 3 and gate.blocked > 0, 60, "three trials on disk", p)
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    killed_at = count_lines(trials_path)
    assert json.loads(manifest_path.read_text())["status"] == "running"  # nobody got to write anything else
    task_ids = json.loads(manifest_path.read_text())["task_ids"]
    assert killed_at < len(task_ids) * TRIALS

    # 2) Resume, and Ctrl-C it mid-run: exit 130, one line, manifest says interrupted.
    gate.release()
    gate.arm(6)
    p = start("--resume", log="run2")
    wait_for(lambda: gate.blocked > 0, 60, "the resumed run to reach the server", p)
    os.killpg(p.pid, signal.SIGINT)
    assert p.wait(30) == 130, read_text(tmp / "run2.err")
    err = read_text(tmp / "run2.err")
    assert "Traceback" not in err and "Interrupted" in err and "--resume" in err, err
    m = json.loads(manifest_path.read_text())
    assert m["status"] == "interrupted" and m["sessions"][-1]["status"] == "interrupted"
    interrupted_at = count_lines(trials_path)
    assert killed_at <= interrupted_at < len(task_ids) * TRIALS

    # 3) Resume to completion (the stored config supplies trials and concurrency; the flags the endpoint).
    gate.release()
    p = start("--resume", log="run3")
    assert p.wait(60) == 0, read_text(tmp / "run3.err")
    assert "Traceback" not in read_text(tmp / "run3.err")

    records = [json.loads(line) for line in trials_path.read_text(encoding="utf-8").splitlines()]  # all valid JSON
    keys = [(r["task_id"], r["trial"]) for r in records]
    assert len(keys) == len(set(keys)), "a (task, trial) was written twice"
    assert set(keys) == {(t, k) for t in task_ids for k in range(1, TRIALS + 1)}
    assert not any(r["success"] for r in records)
    # memory came back from disk across both restarts: trial k saw the k-1 earlier reflections
    assert all(len(r["memory"]) == r["trial"] - 1 for r in records)

    m = json.loads(manifest_path.read_text())
    assert m["status"] == "completed" and m["config"]["trials"] == TRIALS and m["config"]["concurrency"] == 3
    assert [s["status"] for s in m["sessions"]] == ["running", "interrupted", "completed"]
    assert [s["resume"] for s in m["sessions"]] == [False, True, True]
