"""`retroformer env serve`: sessions over HTTP from several clients, expiry, capacity, auth, 4xx for bad requests
while the server keeps serving, bad actions as observations, the CLI's one-line errors, and a real ALFWorld game
won with its walkthrough through HTTP. Real servers on 127.0.0.1, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="env serve needs `pip install 'retroformer-cli[serve]'`")
httpx = pytest.importorskip("httpx")

from conftest import REPO, served_alfworld  # noqa: E402
from retroformer_cli.envserver import EnvServerConfig, build_env, server_thread  # noqa: E402
from retroformer_cli.envserver.client import EnvClient, EnvServerClientError  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class SleepyEnv:
    """A Gymnasium-shaped text env whose step takes ``delay`` seconds; records closes."""

    env_id = "sleepy"
    max_steps = 3

    def __init__(self, delay: float = 0.0, log: list | None = None):
        self.delay, self.log, self.task = delay, log if log is not None else [], None

    def task_ids(self):
        return ["t0", "t1", "t2"]

    def spawn(self):
        return SleepyEnv(self.delay, self.log)

    def reset(self, *, seed=None, options=None):
        self.task, self.steps = options["task_id"], 0
        return f"start {self.task}", {"task_id": self.task}

    def step(self, action):
        time.sleep(self.delay)
        self.steps += 1
        won = action == f"win {self.task}"
        return f"{self.task} saw {action!r}", float(won), won, self.steps >= self.max_steps and not won, {"n": self.steps}

    def close(self):
        self.log.append("closed")


def _cfg(**kw) -> EnvServerConfig:
    return EnvServerConfig(port=0, **kw)


@pytest.fixture(scope="module")
def webshop_env():
    return build_env(EnvServerConfig(env="webshop"))


@pytest.fixture(scope="module")
def webshop(webshop_env):
    srv = server_thread(_cfg(env="webshop", max_sessions=16, max_body_bytes=32768), env=webshop_env, api_key=KEY)
    yield srv
    srv.stop()


def _play_webshop(env, task_id: str) -> list:
    """A scripted episode: search the instruction, open the first product, buy it."""
    obs, info = env.reset(options={"task_id": task_id})
    trace = [obs]
    step = env.step(f"search[{info['instruction'].split(' with ')[0]}]")
    trace.append(step)
    products = [c for c in step[4]["available_actions"]["clickables"] if c not in ("back to search", "next >", "< prev")]
    if products:
        trace.append(env.step(f"click[{products[0]}]"))
        trace.append(env.step("click[buy now]"))
    return trace


def test_episodes_over_http_from_several_clients_match_in_process(webshop, webshop_env):
    """8 clients, each with its own connection and session, play at once; every trace equals the in-process one."""
    tasks = webshop_env.task_ids()[:8]
    expected = {t: _play_webshop(webshop_env.spawn(), t) for t in tasks}

    def remote(task_id: str) -> list:
        with EnvClient(webshop.url, api_key=KEY) as client, client.session() as env:
            return _play_webshop(env, task_id)

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(tasks, pool.map(remote, tasks)))
    assert got == expected
    assert any(trace[-1][2] for trace in got.values())  # some episodes end with a purchase (terminated)
    health = httpx.get(webshop.url + "/health").json()
    assert health["sessions"] == 0 and health["created"] >= 8 and health["closed"] >= 8


def test_process_pool_plays_the_same_and_replaces_a_dead_worker(webshop_env):
    """--processes 2: sessions step in worker processes, traces equal in-process ones; a killed worker costs its
    episode one 500 env_error, then the session plays again on a fresh worker."""
    srv = server_thread(_cfg(env="webshop", processes=2), api_key=KEY)
    try:
        tasks = webshop_env.task_ids()[8:12]
        expected = {t: _play_webshop(webshop_env.spawn(), t) for t in tasks}

        def remote(task_id: str) -> list:
            with EnvClient(srv.url, api_key=KEY) as client, client.session() as env:
                return _play_webshop(env, task_id)

        with ThreadPoolExecutor(4) as pool:
            assert dict(zip(tasks, pool.map(remote, tasks))) == expected
        health = httpx.get(srv.url + "/health").json()
        assert health["pool"] == "processes" and health["processes"] == 2
        with EnvClient(srv.url, api_key=KEY) as client, client.session() as env:
            env.reset(options={"task_id": tasks[0]})
            worker = srv.manager._sessions[env.session_id].env.worker
            worker.kill()
            worker.proc.join(5)
            with pytest.raises(EnvServerClientError) as err:
                env.step("search[socks]")
            assert err.value.status == 500 and err.value.code == "env_error" and "exited and was replaced" in str(err.value)
            assert _play_webshop(env, tasks[1]) == expected[tasks[1]]
    finally:
        srv.stop()
    assert not any(w.proc.is_alive() for w in srv.manager.base._workers)  # shutdown ends the workers


def test_sessions_step_in_parallel_threads():
    """Steps of different sessions run at once in the thread pool: 8 steps of 0.4 s take far less than 3.2 s."""
    srv = server_thread(_cfg(workers=8), env=SleepyEnv(delay=0.4))
    try:
        def one(i: int) -> float:
            with EnvClient(srv.url) as client, client.session() as env:
                env.reset(options={"task_id": f"t{i % 3}"})
                t0 = time.perf_counter()
                env.step("look")
                return time.perf_counter() - t0

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            lat = list(pool.map(one, range(8)))
        assert time.perf_counter() - t0 < 2.0 and max(lat) < 1.6
    finally:
        srv.stop()


def test_session_lifecycle_state_capacity_and_episode_rules():
    log: list = []
    srv = server_thread(_cfg(max_sessions=2), env=SleepyEnv(log=log))
    try:
        with EnvClient(srv.url) as client:
            a, b = client.session(), client.session()
            with pytest.raises(EnvServerClientError) as full:
                client.session()
            assert full.value.status == 503 and full.value.code == "capacity_reached"
            with pytest.raises(EnvServerClientError) as early:
                a.step("look")
            assert early.value.status == 409 and early.value.code == "no_episode"
            # reset without a task: by seed (mod the task count), else the next task in turn
            assert a.reset(seed=4)[0] == "start t1"
            assert a.state()["task_id"] == "t1" and a.state()["step_count"] == 0
            obs, reward, terminated, truncated, info = a.step("win t1")
            assert (reward, terminated, truncated, info) == (1.0, True, False, {"n": 1})
            state = a.state()
            assert state["done"] and state["step_count"] == 1 and state["total_reward"] == 1.0
            with pytest.raises(EnvServerClientError) as over:
                a.step("look")
            assert over.value.status == 409 and over.value.code == "episode_over"
            # step limit: truncated, not terminated
            b.reset(options={"task_id": "t2"})
            results = [b.step("look") for _ in range(3)]
            assert [r[3] for r in results] == [False, False, True] and not results[-1][2]
            a.close()
            assert log == ["closed"]
            client.session()  # the slot is free again
            with pytest.raises(EnvServerClientError) as gone:
                a.step("look")
            assert gone.value.status == 404 and gone.value.code == "session_not_found"
            with pytest.raises(EnvServerClientError) as unknown:
                client.request("POST", "/sessions/nope/reset", {})
            assert unknown.value.status == 404
    finally:
        srv.stop()


def test_idle_sessions_expire_and_their_envs_close():
    log: list = []
    srv = server_thread(_cfg(session_ttl_s=0.3), env=SleepyEnv(log=log))
    try:
        with EnvClient(srv.url) as client:
            kept, idle = client.session(), client.session()
            kept.reset(options={"task_id": "t0"})
            idle.reset(options={"task_id": "t1"})
            for _ in range(6):  # any request keeps a session alive: never idle for 0.3 s
                time.sleep(0.1)
                kept.state()
            with pytest.raises(EnvServerClientError) as expired:
                idle.step("look")
            assert expired.value.status == 404 and expired.value.code == "session_expired"
            assert "expired after 0.3 s idle" in str(expired.value)
            assert kept.state()["task_id"] == "t0"
            time.sleep(1.0)  # the sweeper closes the rest without any request
            health = client.health()
            assert health["sessions"] == 0 and health["expired"] == 2 and log == ["closed", "closed"]
    finally:
        srv.stop()


def test_auth(webshop):
    assert httpx.get(webshop.url + "/health").status_code == 200  # open, for load balancers
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        r = httpx.post(webshop.url + "/sessions", json={}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(webshop.url + "/tasks", headers={"X-API-Key": "wrong"}).status_code == 401
    r = httpx.post(webshop.url + "/sessions", json={}, headers={"X-API-Key": KEY})
    assert r.status_code == 201
    with EnvClient(webshop.url, api_key="wrong") as client, pytest.raises(EnvServerClientError) as err:
        client.session()
    assert err.value.status == 401
    httpx.delete(webshop.url + f"/sessions/{r.json()['session_id']}", headers=AUTH)


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(webshop):
    url = webshop.url
    sid = httpx.post(url + "/sessions", json={}, headers=AUTH).json()["session_id"]
    step = f"{url}/sessions/{sid}/step"
    cases = [
        (lambda: httpx.post(step, content=b'{"action": ', headers={**AUTH, "Content-Type": "application/json"}),
         400, "invalid_json"),
        (lambda: httpx.post(step, content=b"x" * 40000, headers={**AUTH, "Content-Type": "application/json"}),
         413, "request_too_large"),
        (lambda: httpx.post(step, content=b'{"action": "look"}', headers={**AUTH, "Content-Type": "text/plain"}),
         415, "unsupported_media_type"),
        (lambda: httpx.post(step, content=b'{"action": "\xff"}', headers={**AUTH, "Content-Type": "application/json"}),
         400, "invalid_encoding"),
        (lambda: httpx.post(step, json={"action": 3}, headers=AUTH), 400, "invalid_request"),
        (lambda: httpx.post(step, json={"action": {"txt": "look"}}, headers=AUTH), 400, "invalid_request"),
        (lambda: httpx.post(step, json={"act": "look"}, headers=AUTH), 400, "invalid_request"),
        (lambda: httpx.post(step, json=[1, 2], headers=AUTH), 400, "invalid_request"),
        (lambda: httpx.post(step, json={"action": "look"}, headers=AUTH), 409, "no_episode"),
        (lambda: httpx.post(f"{url}/sessions/{sid}/reset", json={"task_id": "fixed_99999"}, headers=AUTH),
         400, "invalid_request"),
        (lambda: httpx.post(f"{url}/sessions/{sid}/reset", json={"seed": -1}, headers=AUTH), 400, "invalid_request"),
        (lambda: httpx.post(f"{url}/sessions/nope/step", json={"action": "look"}, headers=AUTH), 404,
         "session_not_found"),
        (lambda: httpx.get(f"{url}/nowhere", headers=AUTH), 404, "not_found"),
        (lambda: httpx.get(step, headers=AUTH), 405, "method_not_allowed"),
    ]
    for send, status, code in cases:
        r = send()
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
        assert r.json()["error"]["message"].endswith(".")
        assert httpx.get(url + "/health").status_code == 200  # still serving
    # a chunked oversize body (no Content-Length) is cut off at the limit too
    head = (f"POST /sessions/{sid}/step HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
    assert _raw(webshop.port, head + chunk * 2 + b"0\r\n\r\n").startswith(b"HTTP/1.1 413")
    # and the session still plays a whole episode
    with EnvClient(url, api_key=KEY) as client:
        from retroformer_cli.envserver.client import RemoteEnv

        trace = _play_webshop(RemoteEnv(client, sid), "fixed_2")
        assert len(trace) >= 2
        RemoteEnv(client, sid).close()


@pytest.mark.parametrize("env_name", ["webshop", "hotpotqa"])
def test_bad_actions_are_observations(env_name, webshop):
    srv = webshop if env_name == "webshop" else server_thread(_cfg(env="hotpotqa", max_steps=50), api_key=KEY)
    weird = ["", " ", "click[", "search[]", "click[]]", "Search[" + "x" * 20000 + "]", "\x00\x01", "🙂[🙂]",
             "finish[", "lookup[", "click[buy now]", "a" * 3000, "[[[]]]", "search[a][b]", "\n\n"]
    try:
        with EnvClient(srv.url, api_key=KEY) as client, client.session() as env:
            env.reset(seed=0)
            for action in weird:
                r = client._http.post(f"/sessions/{env.session_id}/step", json={"action": action})
                assert r.status_code == 200, (action[:20], r.text)
                body = r.json()
                assert isinstance(body["observation"]["text"], str) and body["reward"] == 0.0
                if body["done"]:
                    env.reset(seed=1)
    finally:
        if srv is not webshop:
            srv.stop()


def test_client_errors_are_one_sentence():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EnvClient(f"http://127.0.0.1:{port}", timeout_s=2) as client, pytest.raises(EnvServerClientError) as err:
        client.health()
    assert err.value.status == 0 and "Cannot reach the environment server" in str(err.value)


# ---- the command -----------------------------------------------------------------------------------


def test_cli_errors_are_one_line():
    from typer.testing import CliRunner

    from retroformer_cli.commands.env import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["serve", "--env", "nowhere"], "Unknown environment 'nowhere'"),
            (["serve", "--env", "webshop", "--data", "no/such/folder"], "does not exist (--data)"),
            (["serve", "--port", str(port)], f"Cannot serve on 127.0.0.1:{port}"),
            (["serve", "--max-sessions", "0"], "--max-sessions must be a positive integer"),
            (["serve", "--env-option", "nope=1"], "has no option 'nope'"),
        ]
        for args, text in cases:
            res = CliRunner().invoke(app, args)
            assert res.exit_code == 2, res.output
            errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and text in errors[0] and "Traceback" not in res.output


def test_cli_serves_until_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RETROFORMER_ENV_API_KEY": KEY, "RETROFORMER_WORKSPACE": str(tmp_path / "ws")}
    code = "from retroformer_cli.commands.env import app; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--env", "hotpotqa", "--port", str(port)],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        with EnvClient(f"http://127.0.0.1:{port}", api_key=KEY) as client, client.session() as env:
            obs, info = env.reset(options={"task_id": client.task_ids()[0]})
            assert obs.startswith("Question: ")
            assert env.step("Finish[nobody]")[2] is True
        assert httpx.post(f"http://127.0.0.1:{port}/sessions", json={}).status_code == 401  # the env var's key
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and f"ready: http://127.0.0.1:{port}" in err and "stopped" in err


# ---- ALFWorld: a real game, won through HTTP -----------------------------------------------------------


@pytest.mark.shared_data
def test_alfworld_walkthroughs_win_over_http_in_parallel_engine_processes():
    base = served_alfworld()
    games = base.task_ids()[:2]
    walks = {g: base.walkthrough(g) for g in games}
    srv = server_thread(_cfg(env="alfworld", workers=2), env=base, api_key=KEY)
    try:
        def play(task_id: str) -> tuple:
            with EnvClient(srv.url, api_key=KEY) as client, client.session() as env:
                obs, info = env.reset(options={"task_id": task_id})
                assert "Your task is to:" in obs
                assert env.step("fly to the moon")[0] == "Nothing happens."  # a bad command: an observation
                for command in walks[task_id]:
                    obs, reward, terminated, truncated, info = env.step(command)
                    if terminated or truncated:
                        break
                return reward, terminated, info["success"], env.state()["step_count"]

        with ThreadPoolExecutor(2) as pool:
            results = dict(zip(games, pool.map(play, games)))
        for g in games:
            assert results[g] == (1.0, True, True, len(walks[g]) + 1), (g, results[g])
        health = httpx.get(srv.url + "/health").json()
        assert health["pool"] == "processes" and health["idle_processes"] == 2  # both engines kept warm
        reused = play(games[0])  # a new session takes a warm engine process
        assert reused[2] and httpx.get(srv.url + "/health").json()["idle_processes"] == 2
    finally:
        srv.stop()
