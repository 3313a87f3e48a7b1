"""Env and backend registries: specs instead of probing, the same backend rules and errors as before, and
third-party plugins through entry points (tests/plugin_example: the `echo` env and the `parrot:NAME` backend)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retroformer_cli import envs
from retroformer_cli.config import ModelConfig
from retroformer_cli.envs.base import EnvContractError, TextEnv, check_contract, check_factory
from retroformer_cli.envs.spec import EnvSpec
from retroformer_cli.errors import UsageError
from retroformer_cli.llm import registry as backends
from retroformer_cli.llm import resolve_backend

REPO = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().parent / "plugin_example"


@pytest.fixture
def fresh_registries():
    """Registries load again (built-ins + whatever entry points sys.path shows) before and after the test."""
    envs._REGISTRY.reset()
    backends.REGISTRY.reset()
    yield
    envs._REGISTRY.reset()
    backends.REGISTRY.reset()


@pytest.fixture
def plugin(monkeypatch, fresh_registries):
    monkeypatch.syspath_prepend(str(PLUGIN))
    yield
    for name in [m for m in sys.modules if m == "retroformer_echo" or m.startswith("retroformer_echo.")]:
        del sys.modules[name]


# ---- env specs ------------------------------------------------------------------------------------------
def test_builtin_specs_names_ids_and_capabilities():
    by_name = {s.name: s for s in envs.specs()}
    assert set(by_name) >= {"hotpotqa", "webshop", "alfworld"}
    names = [envs.canonical_name(i) for i in ("HotPotQA-v0", "webshop-V0", "ALFWORLD")]
    assert names == ["hotpotqa", "webshop", "alfworld"]
    alf, web, hot = by_name["alfworld"], by_name["webshop"], by_name["hotpotqa"]
    assert alf.asynchronous and alf.protocol_split == "all" and alf.max_steps == 50 and alf.action_names == ()
    assert web.cache_dir and not web.asynchronous and web.action_names == ("search", "click")
    assert hot.protocol_split == "eval" and hot.max_steps == 6 and not hot.cache_dir
    assert envs.protocol_split("ALFWorld-v0") == "all" and envs.protocol_split("webshop") == "eval"
    with pytest.raises(UsageError, match="Unknown environment 'hotpot'.*did you mean 'hotpotqa'"):
        envs.get_spec("hotpot")


def test_every_builtin_factory_takes_what_its_spec_declares():
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv
    from retroformer_cli.envs.webshop.env import WebShopEnv

    for spec in envs.specs():
        check_factory(spec)
    for cls, name in ((HotPotQAEnv, "hotpotqa"), (WebShopEnv, "webshop")):
        assert cls.env_id == name and tuple(cls.action_names) == envs.get_spec(name).action_names
    broken = dataclasses.replace(envs.get_spec("hotpotqa"), options=("split", "no_such_option"))
    with pytest.raises(EnvContractError, match="takes no 'no_such_option'"):
        check_factory(broken)


def test_registering_imports_no_env_class_prompt_or_heavy_library():
    code = ("import sys, retroformer_cli.envs as e; e.specs(); "
            "bad = [m for m in ('retroformer_cli.envs.webshop.env', 'retroformer_cli.agents.prompts.hotpotqa', "
            "'gymnasium', 'numpy', 'torch', 'transformers', 'textworld') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _Plain:
    env_id, max_steps = "hotpotqa", 3

    def task_ids(self):
        return ["a"]

    def reset(self, *, seed=None, options=None):
        return "obs", {}

    def step(self, action):
        return "obs", 0.0, True, False, {}

    def close(self):
        pass


def test_contract_check_names_every_broken_promise():
    spec = envs.get_spec("hotpotqa")
    assert isinstance(_Plain(), TextEnv)
    check_contract(_Plain(), dataclasses.replace(spec, spawn=False))
    with pytest.raises(EnvContractError, match="declares spawn=True but has no spawn()"):
        check_contract(_Plain(), spec)
    with pytest.raises(EnvContractError, match="areset\\(\\) is not a coroutine.*astep"):
        check_contract(_Plain(), dataclasses.replace(spec, spawn=False, asynchronous=True))
    other = _Plain()
    other.env_id = "other"
    with pytest.raises(EnvContractError, match="env_id='other'"):
        check_contract(other, dataclasses.replace(spec, spawn=False))
    del _Plain.close
    try:
        with pytest.raises(EnvContractError, match="has no 'close'"):
            check_contract(_Plain(), dataclasses.replace(spec, spawn=False))
    finally:
        _Plain.close = lambda self: None


def test_make_checks_the_contract(fresh_registries):
    envs.register(EnvSpec(name="plain", id="Plain-v0", entry_point="test_registry:_Plain",
                          prompts="retroformer_cli.agents.prompts.hotpotqa:PROMPTS"))
    with pytest.raises(EnvContractError, match="env_id='hotpotqa', not its spec name 'plain'"):
        envs.make("Plain-v0")
    with pytest.raises(ValueError, match="already registered"):
        envs.register(dataclasses.replace(envs.get_spec("plain"), name="plain2"))  # same id Plain-v0


def test_spec_validation():
    with pytest.raises(ValueError, match="entry_point 'nomodule' must be a 'module:attribute' string"):
        EnvSpec(name="x", id="X-v0", entry_point="nomodule", prompts="a:b")
    with pytest.raises(ValueError, match="id 'x' must look like 'Name-v0'"):
        EnvSpec(name="x", id="x", entry_point="a:b", prompts="a:b")


def test_prompts_come_from_the_spec(fresh_registries):
    from retroformer_cli.agents.prompts import get_prompts
    from retroformer_cli.agents.prompts.webshop import PROMPTS as WEBSHOP

    hot = envs.get_spec("hotpotqa")
    envs.register(dataclasses.replace(hot, prompts="retroformer_cli.agents.prompts.webshop:PROMPTS"), replace=True)
    assert get_prompts("HotPotQA-v0") is WEBSHOP
    envs.register(dataclasses.replace(hot, prompts="retroformer_cli.agents.prompts.nope:PROMPTS"), replace=True)
    with pytest.raises(UsageError, match="Cannot import prompt set of the hotpotqa environment"):
        get_prompts("hotpotqa")


# ---- backends: the same rules and messages as the former if-chain -------------------------------------
def test_backend_resolution_matches_the_documented_table(workspace, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (workspace.checkpoints_dir / "sft" / "a").mkdir(parents=True)
    cases = {
        "none": ("none", ""), "": ("none", ""), "NONE": ("none", ""), "embedded": ("hf", "embedded"),
        "openai:gpt-x": ("openai", "gpt-x"), f"hf:{folder}": ("hf", str(folder)), str(folder): ("hf", str(folder)),
        "workspace:sft/a": ("hf", str(workspace.checkpoints_dir / "sft" / "a")),
    }
    for spec, expected in cases.items():
        assert resolve_backend(ModelConfig(model=spec), workspace, "--actor") == expected, spec
    endpoint = ModelConfig(model="llama", base_url="http://x/v1")
    assert resolve_backend(endpoint, workspace, "--actor") == ("openai", "llama")


@pytest.mark.parametrize("spec, message", [
    ("openai:", "--actor openai: needs a model name"),
    ("workspace:sft/none", "Checkpoint 'sft/none' not found under"),
    ("hf:/no/such/folder", "Local model folder '/no/such/folder' does not exist (--actor)."),
    ("llama", "Model 'llama' (--actor) is neither 'embedded', 'none', a local folder nor an endpoint model."),
])
def test_backend_errors_are_unchanged(workspace, spec, message):
    with pytest.raises(UsageError) as err:
        resolve_backend(ModelConfig(model=spec), workspace, "--actor")
    assert message in str(err.value)
    if spec == "llama":
        assert err.value.hint == ("for an OpenAI-compatible endpoint use --actor openai:llama "
                                  "(and --actor-base-url or OPENAI_BASE_URL)")


def test_make_client_builds_the_endpoint_client(workspace):
    from retroformer_cli.llm import make_client
    from retroformer_cli.llm.openai_compat import OpenAICompatClient

    assert make_client(ModelConfig(model="none"), workspace, "--reflector") is None
    cfg = ModelConfig(model="openai:m", base_url="http://127.0.0.1:9/v1", api_key="k")
    client = make_client(cfg, workspace, "--actor")
    assert isinstance(client, OpenAICompatClient) and client.model_id == "m"


# ---- plugins through entry points ----------------------------------------------------------------------
def test_plugin_env_backend_and_prompts_load_lazily_once(plugin, workspace):
    from retroformer_cli.agents.prompts import get_prompts
    from retroformer_cli.llm import make_client

    assert "echo" in envs.list_envs() and envs.canonical_name("Echo-v0") == "echo"
    assert "retroformer_echo.env" not in sys.modules and "retroformer_echo.prompts" not in sys.modules
    assert get_prompts("echo").actor_instruction.startswith("ECHO-PLUGIN-PROMPT")
    env = envs.make("echo", words="kiwi")
    assert env.task_ids() == ["word_0"] and env.reset(options={"task_id": "word_0"})[0].endswith("'kiwi'.")
    assert resolve_backend(ModelConfig(model="parrot:polly"), workspace, "--actor") == ("parrot", "polly")
    assert make_client(ModelConfig(model="parrot:polly"), workspace, "--actor").model_id == "parrot:polly"
    with pytest.raises(UsageError, match="parrot: needs a name"):
        resolve_backend(ModelConfig(model="parrot:"), workspace, "--actor")
    loaded = envs._REGISTRY._specs
    envs.list_envs()
    assert envs._REGISTRY._specs is loaded  # loaded once


def test_collect_runs_a_plugin_env_with_a_plugin_backend_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN), str(REPO)])}
    cmd = [sys.executable, "-m", "retroformer_cli", "--workspace", str(tmp_path / "ws"), "collect", "--env", "Echo-v0",
           "--actor", "parrot:polly", "--reflector", "parrot:polly", "--trials", "2", "--run", "echo1", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "completed" and result["tasks"] == 3 and result["solved"] == 3
    lines = (tmp_path / "ws" / "runs" / "echo1" / "trials.jsonl").read_text().splitlines()
    trials = [json.loads(line) for line in lines]
    assert len(trials) == 4 and {t["env_id"] for t in trials} == {"echo"}
    first_banana = next(t for t in trials if t["task_id"] == "word_1" and t["trial"] == 1)
    assert not first_banana["success"] and first_banana["reflection"]["text"].startswith("I said the wrong word")
    assert first_banana["actor_prompt"][0]["content"].startswith("ECHO-PLUGIN-PROMPT")
    assert first_banana["reflection"]["prompt"][0]["content"].startswith("ECHO-PLUGIN-REFLECT")
    assert all(t["actor_model_id"] == "parrot:polly" for t in trials)


def test_a_broken_plugin_costs_one_warning_line(tmp_path, monkeypatch, fresh_registries, capsys, workspace):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[retroformer.envs]\nghost = no_such_module_xyz:SPEC\nnotaspec = os:sep\n"
                                           "[retroformer.backends]\nghostly = no_such_module_xyz:B\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "hotpotqa" in envs.list_envs()
    with pytest.raises(UsageError, match="Unknown environment 'ghost'.*plugins that failed to load: ghost: "
                                         "ModuleNotFoundError"):
        envs.get_spec("ghost")
    assert resolve_backend(ModelConfig(model="embedded"), workspace, "--actor") == ("hf", "embedded")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 3, err
    assert any("retroformer.envs plugin 'ghost'" in line and "no_such_module_xyz" in line for line in lines)
    assert any("'notaspec'" in line and "expected a EnvSpec" in line for line in lines)
    assert any("retroformer.backends plugin 'ghostly'" in line for line in lines)
