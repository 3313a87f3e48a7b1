"""``--device`` on collect, eval and ppo (issue #19, part 4): the flag parses, reaches the local engine's
configuration, the run manifest records the device and dtype used, and a device the machine lacks is one clear
line with a non-zero exit. The CUDA path itself needs a GPU and is not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from retroformer_cli import cli
from retroformer_cli.config import ModelConfig

torch = pytest.importorskip("torch", reason="the local engine needs torch")
pytest.importorskip("transformers")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@pytest.mark.parametrize("command", ["collect", "eval", "ppo"])
def test_device_is_an_option_of_every_command_that_runs_a_local_model(command):
    res = CliRunner().invoke(cli.app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--device" in res.stdout
    assert "cuda:N" in res.stdout


def test_an_unknown_device_name_is_a_usage_error_before_anything_runs(workspace):
    from retroformer_cli.llm import make_client

    with pytest.raises(Exception, match=r"--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        make_client(ModelConfig(model="embedded", device="gpu"), workspace, "--actor")


def test_device_reaches_the_engine_config(tiny, workspace):
    from retroformer_cli.llm import make_client

    client = make_client(ModelConfig(model=str(tiny["base"]), device="cpu", threads=1), workspace, "--actor")
    assert client.engine_config.device == "cpu"
    described = client.describe()
    assert (described["device"], described["dtype"]) == ("cpu", "float32")


def test_collect_records_the_device_and_dtype_in_the_manifest(tiny, tmp_path):
    ws = tmp_path / "ws"
    res = CliRunner().invoke(cli.app, [
        "--workspace", str(ws), "collect", "--actor", str(tiny["base"]), "--reflector", "none", "--tasks", "1",
        "--trials", "1", "--max-steps", "1", "--actor-max-tokens", "4", "--threads", "1", "--device", "cpu",
        "--run", "on-cpu"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((ws / "runs" / "on-cpu" / "manifest.json").read_text())
    assert manifest["config"]["actor"]["device"] == "cpu" and manifest["config"]["reflector"]["device"] == "cpu"
    actor = manifest["models"]["actor"]
    assert (actor["device"], actor["dtype"]) == ("cpu", "float32")
    # the --weights setting and what the loaded model resolved it to (auto: hybrid is embedded-only)
    assert (actor["weights_setting"], actor["weights"]) == ("auto", "fp32"), actor

    from retroformer_cli.llm.engine import shared

    loaded = [e for e in list(shared._engines.values()) if e.config.model == str(tiny["base"]) and e.ready]
    assert any(e.config.device == "cpu" and e.info["device"] == "cpu" for e in loaded), "the engine collect ran on"


@no_cuda
@pytest.mark.parametrize("command", [["collect", "--tasks", "1", "--trials", "1"],
                                     ["eval", "--env", "hotpotqa", "--tasks", "1", "--trials", "1"],
                                     ["ppo", "--mode", "online"]])
def test_device_cuda_without_cuda_is_one_clear_line(tiny, tmp_path, command):
    ws = tmp_path / "ws"
    args = [sys.executable, "-m", "retroformer_cli", "--workspace", str(ws), *command, "--device", "cuda"]
    if command[0] != "ppo":
        args += ["--actor", str(tiny["base"]), "--reflector", "none"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--device cuda" in errors[0] and "--device cpu" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list(ws.glob("runs/*/manifest.json")), "nothing ran"
