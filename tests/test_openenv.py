"""OpenEnv clients, unchanged, against `retroformer env serve` (issue #21): OpenEnv's own client package
(openenv-core) plays a WebShop episode and wins an ALFWorld game with its walkthrough over the WebSocket /ws,
`openenv validate --url` passes, errors come in OpenEnv's shape, each connection has its own session.

The client side uses nothing of ours but the published action, observation and state types
(``retroformer_cli.envserver.openenv_types``); servers run in-process on 127.0.0.1, free ports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="env serve needs `pip install 'retroformer-cli[serve]'`")
pytest.importorskip("openenv.core", reason="OpenEnv's client is not installed: pip install 'openenv-core>=0.3.0,<0.4' "
                                           "(in the dev extra)")
httpx = pytest.importorskip("httpx")

from openenv.core.client_types import StepResult  # noqa: E402
from openenv.core.env_client import EnvClient  # noqa: E402
from openenv.core.env_server.serialization import serialize_observation  # noqa: E402
from openenv.core.env_server.types import Action, Observation, State, WSErrorCode  # noqa: E402
from openenv.core.generic_client import GenericEnvClient  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from conftest import REPO, served_alfworld, shared_data  # noqa: E402
from retroformer_cli.envserver import EnvServerConfig, build_env, server_thread  # noqa: E402
from retroformer_cli.envserver.openenv_types import SessionState, TextAction, TextObservation  # noqa: E402

KEY = "test-key"


class TextEnvClient(EnvClient[TextAction, TextObservation, SessionState]):
    """What an OpenEnv env's ``client.py`` holds: the typed client, over the published types only."""

    def _step_payload(self, action: TextAction) -> dict[str, Any]:
        return action.model_dump()

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[TextObservation]:
        obs = TextObservation(**payload["observation"], reward=payload.get("reward"), done=payload.get("done", False))
        return StepResult(observation=obs, reward=payload.get("reward"), done=payload.get("done", False))

    def _parse_state(self, payload: dict[str, Any]) -> SessionState:
        return SessionState(**payload)


class CounterEnv:
    """A tiny text env: ``win <task>`` wins; every step takes ``delay`` seconds; three steps at most."""

    env_id = "counter"

    def __init__(self, delay: float = 0.0, log: list | None = None):
        self.delay, self.log = delay, log if log is not None else []

    def task_ids(self):
        return ["t0", "t1", "t2"]

    def spawn(self):
        return CounterEnv(self.delay, self.log)

    def reset(self, *, seed=None, options=None):
        from retroformer_cli.errors import UsageError

        if options["task_id"] not in self.task_ids():
            raise UsageError(f"Unknown task '{options['task_id']}'.")
        self.task, self.steps = options["task_id"], 0
        return f"start {self.task}", {"task_id": self.task, "tags": {"x"}}  # a set: info need not be JSON

    def step(self, action):
        if action == "boom":
            raise RuntimeError("a bug in the env")
        time.sleep(self.delay)
        self.steps += 1
        won = action == f"win {self.task}"
        return f"{self.task} saw {action!r}", float(won), won, self.steps >= 3 and not won, {"n": self.steps}

    def close(self):
        self.log.append("closed")


def _serve(base: Any, api_key: str | None = None, **kw: Any):
    return server_thread(EnvServerConfig(port=0, **kw), env=base, api_key=api_key)


def _ws(url: str, **kw: Any):
    return connect(url.replace("http://", "ws://") + "/ws", **kw)


def _ask(ws, message: Any) -> dict:
    ws.send(message if isinstance(message, str) else json.dumps(message))
    return json.loads(ws.recv(timeout=30))


# ---- the published types ----------------------------------------------------------------------------


def test_published_types_are_openenvs_with_our_fields():
    """Every field of OpenEnv's Action, Observation and State, with its type and default, plus ours; on the wire an
    observation is what OpenEnv's own serialize_observation makes of it."""
    for ours, theirs in ((TextAction, Action), (TextObservation, Observation), (SessionState, State)):
        schema, base = ours.model_json_schema()["properties"], theirs.model_json_schema()["properties"]
        for name, spec in base.items():
            assert {k: v for k, v in schema[name].items() if k != "title"} == \
                   {k: v for k, v in spec.items() if k != "title"}, (ours.__name__, name)
        assert ours.model_config.get("extra") == theirs.model_config.get("extra")
    obs = TextObservation(text="You are in a room.", info={"won": False}, reward=0.0, done=False)
    assert serialize_observation(obs) == {"observation": {"text": "You are in a room.", "info": {"won": False},
                                                          "terminated": False, "truncated": False},
                                          "reward": 0.0, "done": False}


def test_manifest_ships_as_package_data():
    import importlib.resources

    import yaml

    from retroformer_cli.envserver import openenv_types

    manifest = yaml.safe_load((importlib.resources.files("retroformer_cli.envserver") / "openenv.yaml").read_text())
    assert manifest["spec_version"] == 1 and manifest["runtime"] == "fastapi" and manifest["name"]
    assert hasattr(openenv_types, manifest["action"]) and hasattr(openenv_types, manifest["observation"])
    assert "envserver/openenv.yaml" in (REPO / "pyproject.toml").read_text()


# ---- real envs, OpenEnv's client ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def webshop_env(tmp_path_factory):
    return build_env(EnvServerConfig(env="webshop", data=str(shared_data("webshop"))),
                     cache_dir=tmp_path_factory.mktemp("webshop-cache"))


@pytest.fixture(scope="module")
def webshop(webshop_env):
    srv = _serve(webshop_env, env="webshop", max_sessions=4)
    yield srv
    srv.stop()


def _play(reset, step, task_id: str) -> list:
    """Search the instruction, open the first product, buy it: ``[(text, reward, done, info), ...]``."""
    text, reward, done, info = reset(task_id)
    trace = [(text, reward, done)]
    text, reward, done, info = step(f"search[{info['instruction'].split(' with ')[0]}]")
    trace.append((text, reward, done))
    products = [c for c in info["available_actions"]["clickables"] if c not in ("back to search", "next >", "< prev")]
    for action in (f"click[{products[0]}]", "click[buy now]"):
        text, reward, done, info = step(action)
        trace.append((text, reward, done))
    return trace


@pytest.mark.shared_data
def test_generic_client_plays_a_webshop_episode(webshop, webshop_env):
    """OpenEnv's GenericEnvClient (plain dicts, no code of ours) buys a product; the trace is the in-process one."""
    local = webshop_env.spawn()

    def local_reset(task_id):
        obs, info = local.reset(options={"task_id": task_id})
        return obs, None, False, info

    def local_step(action):
        obs, reward, terminated, truncated, info = local.step(action)
        return obs, reward, terminated or truncated, info

    with GenericEnvClient(base_url=webshop.url).sync() as env:
        def remote_reset(task_id):
            r = env.reset(task_id=task_id)
            return r.observation["text"], r.reward, r.done, r.observation["info"]

        def remote_step(action):
            r = env.step({"text": action})
            return r.observation["text"], r.reward, r.done, r.observation["info"]

        got = _play(remote_reset, remote_step, "fixed_3")
        state = env.state()
    assert got == _play(local_reset, local_step, "fixed_3")
    assert got[-1][2] is True and 0.0 <= got[-1][1] <= 1.0  # bought: the episode is over, with WebShop's reward
    assert state["task_id"] == "fixed_3" and state["step_count"] == 3 and state["done"]
    time.sleep(0.2)
    assert httpx.get(webshop.url + "/health").json()["sessions"] == 0  # the connection's session closed with it


@pytest.mark.shared_data
def test_typed_client_wins_an_alfworld_game_with_its_walkthrough():
    base = served_alfworld()
    game = base.task_ids()[0]
    walk = base.walkthrough(game)
    srv = _serve(base, env="alfworld", workers=1)
    try:
        with TextEnvClient(base_url=srv.url).sync() as env:
            first = env.reset(task_id=game)
            assert "Your task is to:" in first.observation.text and first.reward is None and not first.done
            assert env.step(TextAction(text="fly to the moon")).observation.text == "Nothing happens."
            for command in walk:
                result = env.step(TextAction(text=command))
                if result.done:
                    break
            state = env.state()
        assert (result.reward, result.done, result.observation.terminated) == (1.0, True, True)
        assert result.observation.info["success"] is True
        assert isinstance(state, SessionState) and state.step_count == len(walk) + 1 and state.task_id == game
    finally:
        srv.stop()


@pytest.mark.shared_data
def test_openenv_validate_passes_against_the_running_server(webshop):
    """`openenv validate --url` (its running-server checks: /openapi.json, /health, /metadata, /schema, /mcp and the
    simulation mode's /reset, /step, /state), run as its CLI."""
    out = subprocess.run([sys.executable, "-m", "openenv.cli", "validate", "--url", webshop.url],
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["passed"], out.stdout + out.stderr
    assert report["standard_profile"] == "openenv-http/1.x" and report["mode"] == "simulation"
    assert {c["id"] for c in report["criteria"]} >= {"openapi_version_available", "health_endpoint",
                                                     "metadata_endpoint", "schema_endpoint", "mcp_endpoint",
                                                     "mode_endpoint_consistency"}
    schema = httpx.get(webshop.url + "/schema").json()
    assert schema["action"] == TextAction.model_json_schema()
    assert schema["observation"] == TextObservation.model_json_schema()


# ---- errors and sessions --------------------------------------------------------------------------------


def test_errors_come_in_openenvs_shape_and_the_connection_goes_on():
    srv = _serve(CounterEnv())
    try:
        with _ws(srv.url) as ws:
            cases = [
                ({"type": "step", "data": {"text": "look"}}, WSErrorCode.EXECUTION_ERROR, "no_episode"),
                ({"type": "dance"}, WSErrorCode.UNKNOWN_TYPE, None),
                ({"type": ["reset"]}, WSErrorCode.UNKNOWN_TYPE, None),
                ("{not json", WSErrorCode.INVALID_JSON, None),
                ("[1, 2]", WSErrorCode.VALIDATION_ERROR, None),
                ({"type": "step", "data": {"txt": "look"}}, WSErrorCode.VALIDATION_ERROR, None),
                ({"type": "step"}, WSErrorCode.VALIDATION_ERROR, None),
                ({"type": "reset", "data": {"seed": -1}}, WSErrorCode.VALIDATION_ERROR, None),
                ({"type": "reset", "data": {"task_id": "t9"}}, WSErrorCode.EXECUTION_ERROR, "invalid_request"),
                ({"type": "state", "extra": 1}, WSErrorCode.VALIDATION_ERROR, None),
                ("x" * 70000, WSErrorCode.VALIDATION_ERROR, None),
            ]
            for message, code, reason in cases:
                reply = _ask(ws, message)
                assert reply["type"] == "error" and reply["data"]["code"] == code.value, (message, reply)
                assert isinstance(reply["data"]["message"], str) and reply["data"].get("reason") == reason
                if code is WSErrorCode.VALIDATION_ERROR and isinstance(message, dict):
                    assert reply["data"]["errors"]
            # still open, and an episode plays
            assert _ask(ws, {"type": "reset", "data": {"task_id": "t1"}})["data"]["observation"]["text"] == "start t1"
            bug = _ask(ws, {"type": "step", "data": {"text": "boom"}})["data"]
            assert (bug["code"], bug["reason"]) == ("EXECUTION_ERROR", "internal_error") and "a bug" in bug["message"]
            won = _ask(ws, {"type": "step", "data": {"text": "win t1"}})
            assert won == {"type": "observation", "data": {"observation": {
                "text": "t1 saw 'win t1'", "info": {"n": 1}, "terminated": True, "truncated": False},
                "reward": 1.0, "done": True}}
            over = _ask(ws, {"type": "step", "data": {"text": "look"}})["data"]
            assert (over["code"], over["reason"]) == ("EXECUTION_ERROR", "episode_over")
        # and OpenEnv's client reports one as its RuntimeError with the code
        with GenericEnvClient(base_url=srv.url).sync() as env, pytest.raises(RuntimeError, match="EXECUTION_ERROR"):
            env.step({"text": "look"})
    finally:
        srv.stop()


def test_each_connection_has_its_own_session_within_capacity():
    log: list = []
    srv = _serve(CounterEnv(delay=0.3, log=log), max_sessions=2)
    try:
        def play(task: str) -> tuple:
            with GenericEnvClient(base_url=srv.url).sync() as env:
                env.reset(task_id=task)
                env.step({"text": "look"})
                result = env.step({"text": f"win {task}"})
                return result.reward, result.done, env.state()["task_id"], env.state()["step_count"]

        with ThreadPoolExecutor(2) as pool:  # two connections at once, each with its own task and step count
            assert list(pool.map(play, ["t0", "t2"])) == [(1.0, True, "t0", 2), (1.0, True, "t2", 2)]
        with _ws(srv.url) as a, _ws(srv.url) as b, _ws(srv.url) as c:
            assert _ask(a, {"type": "state"})["type"] == "state" and _ask(b, {"type": "state"})["type"] == "state"
            full = json.loads(c.recv(timeout=10))
            assert full["type"] == "error" and full["data"]["code"] == "CAPACITY_REACHED"
            assert (full["data"]["active_sessions"], full["data"]["max_sessions"]) == (2, 2)
            a.send(json.dumps({"type": "close"}))
        time.sleep(0.3)
        health = httpx.get(srv.url + "/health").json()
        assert health["sessions"] == 0 and len(log) == health["closed"] == 4  # every env closed with its connection
    finally:
        srv.stop()


def test_timeouts_idle_connections_and_auth():
    """A connection quiet for longer than --idle-timeout-s (the deadline for a first HTTP request) and
    --session-ttl-s stays open with its session (it is not idle: it is held); a step over --step-timeout-s ends
    the connection after its error; with --api-key, /ws wants the key."""
    srv = _serve(CounterEnv(delay=1.0), step_timeout_s=0.3, idle_timeout_s=0.3, session_ttl_s=0.3, api_key=KEY)
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        with _ws(srv.url, additional_headers=auth) as ws:
            _ask(ws, {"type": "reset", "data": {"task_id": "t0"}})
            time.sleep(1.0)  # quiet for longer than the idle timeout and the session TTL (the sweeper ran)
            assert _ask(ws, {"type": "state"})["data"]["task_id"] == "t0"
            slow = _ask(ws, {"type": "step", "data": {"text": "look"}})["data"]
            assert (slow["code"], slow["reason"]) == ("EXECUTION_ERROR", "env_timeout")
            with pytest.raises(Exception):  # the session is gone: so is the connection
                ws.recv(timeout=10)
        with GenericEnvClient(base_url=srv.url).sync() as env, pytest.raises(RuntimeError, match="API key"):
            env.reset()
        with pytest.raises(InvalidStatus) as refused:  # a browser page of another site
            _ws(srv.url, additional_headers=auth, origin="http://evil.example")
        assert refused.value.response.status_code == 403
    finally:
        srv.stop()


def test_http_reset_step_state_and_mcp_follow_openenv():
    """HTTP /reset and /step get a fresh env per call, as in OpenEnv: /reset answers the first observation, /step
    has no episode to step (409 no_episode, pointing to /ws); /state is a fresh env's; /mcp speaks JSON-RPC."""
    log: list = []
    srv = _serve(CounterEnv(log=log))
    try:
        r = httpx.post(srv.url + "/reset", json={"task_id": "t2", "unknown": 1})
        assert r.status_code == 200 and r.json() == {"observation": {"text": "start t2", "info": {
            "task_id": "t2", "tags": "{'x'}"}, "terminated": False, "truncated": False}, "reward": None, "done": False}
        assert log == ["closed"] and httpx.get(srv.url + "/health").json()["sessions"] == 0
        r = httpx.post(srv.url + "/step", json={"action": {"text": "look"}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "no_episode" and "/ws" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/step", json={"action": {"txt": "look"}}).status_code == 400
        assert httpx.get(srv.url + "/state").json()["episode_id"] is None
        rpc = httpx.post(srv.url + "/mcp", json={"jsonrpc": "2.0", "method": "tools/list", "id": 7}).json()
        assert rpc["jsonrpc"] == "2.0" and rpc["id"] == 7 and rpc["error"]["code"] == -32603
        assert httpx.post(srv.url + "/mcp", json={}).json()["error"]["code"] == -32600
        # our own session API is unchanged beside it, and takes the published action too
        sid = httpx.post(srv.url + "/sessions", json={}).json()["session_id"]
        httpx.post(f"{srv.url}/sessions/{sid}/reset", json={"task_id": "t0"})
        step = httpx.post(f"{srv.url}/sessions/{sid}/step", json={"action": {"text": "win t0", "metadata": {}}}).json()
        assert step["observation"] == {"text": "t0 saw 'win t0'"} and step["terminated"] is True
    finally:
        srv.stop()
