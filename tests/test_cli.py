"""The `retroformer` command line: startup, one-line errors, and collect/eval/runs end to end against a
real OpenAI-compatible HTTP server (FakeOpenAIServer) as actor and reflector. Never the embedded model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retroformer_cli.cli import app
from retroformer_cli.testing.fake_openai_server import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "openai", "matplotlib")


def reply(body: dict) -> str:
    """A model that reflects when asked to and otherwise answers at once (right only for '1889')."""
    prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
    if prompt.rstrip().endswith("Reflection:"):
        return "I answered without searching. Next time I will search both entities first."
    return "Thought: I know this one.\nAction: Finish[1889]"


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(reply) as srv:
        yield srv


def model_flags(url: str, reflector: bool = True) -> list[str]:
    flags = ["--actor", "openai:fake", "--actor-base-url", url]
    flags += ["--reflector", "openai:fake", "--reflector-base-url", url] if reflector else ["--reflector", "none"]
    return flags


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Invoke the app in process, in an empty cwd (no developer .env), with workspace tmp/ws."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str, json_out: bool = False):
        argv = ["-w", str(tmp_path / "ws")] + (["--json"] if json_out else []) + list(args)
        return runner.invoke(app, argv)

    invoke.ws = tmp_path / "ws"
    return invoke


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "DATA_DIR", "CKPT_DIR", "RETROFORMER_WORKSPACE",
                "RETROFORMER_DEBUG"):
        env.pop(var, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with-block ends: nothing listens there


def assert_one_line_error(result, *needles: str, code: int) -> str:
    out = result.stdout + result.stderr
    assert result.exit_code == code, out
    assert "Traceback" not in out
    # handle_errors turns every failure into an exit code; nothing escapes as an exception
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    assert result.stdout.strip() == ""  # errors never pollute stdout (which --json readers parse)
    return errors[0]


# --- startup -------------------------------------------------------------------------------------

def test_help_runs_and_imports_nothing_heavy(tmp_path):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "retroformer_cli", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "collect" in proc.stdout and "eval" in proc.stdout and "Traceback" not in proc.stderr

    # root --help first (it must load no command module), then every command's --help in the same process
    probe = (
        "import json, sys\n"
        "from retroformer_cli import cli\n"
        "codes, after_root = [], None\n"
        "for args in [['--help']] + [[*name.split(), '--help'] for name in (*cli.COMMANDS, 'runs import', "
        "'datasets build', 'reward score', 'env serve')]:\n"
        "    sys.argv = ['retroformer', *args]\n"
        "    try:\n"
        "        cli.main()\n"
        "    except SystemExit as e:\n"
        "        codes.append(e.code)\n"
        "    if after_root is None:\n"
        "        after_root = sorted(m for m in sys.modules if m.startswith('retroformer_cli.commands.') "
        "and m != 'retroformer_cli.commands.context')\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "sys.stderr.write(json.dumps({'codes': codes, 'heavy': heavy, 'after_root': after_root}) + '\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["codes"] and set(report["codes"]) == {0}, report["codes"]
    assert len(report["codes"]) >= 16
    assert report["after_root"] == [], f"root --help loaded command modules {report['after_root']}"
    assert report["heavy"] == [], f"--help imported {report['heavy']}"


def test_help_script_entry_point(tmp_path):
    exe = Path(sys.executable).with_name("retroformer")
    if not exe.exists():
        pytest.skip("the retroformer console script is not installed next to this interpreter")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0 and "Usage" in proc.stdout, proc.stderr


# --- one-line errors -----------------------------------------------------------------------------

def test_exit_skips_the_last_collections_only_when_the_process_exits(tmp_path):
    """``main`` registers ``gc.freeze`` to run at exit (the interpreter's last collections over torch and
    transformers took ~0.7 s of every model-loading command), and freezes nothing while the process goes on."""
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: sys.stderr.write(f'frozen at exit: {gc.get_freeze_count() > 0}\\n'))\n"
        "sys.argv = ['retroformer', '--version']\n"
        "from retroformer_cli import cli\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "sys.stderr.write(f'frozen after main: {gc.get_freeze_count() > 0}\\n')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-2:] == ["frozen after main: False", "frozen at exit: True"], proc.stderr


def test_unknown_env(cli, server):
    line = assert_one_line_error(cli("collect", "--env", "nosuch", *model_flags(server.base_url)),
                                 "Unknown environment", "nosuch", code=2)
    assert "hotpotqa" in line  # lists what is known
    assert_one_line_error(cli("collect", "--env", "hotpotq", *model_flags(server.base_url)),
                          "Unknown environment", "did you mean 'hotpotqa'", code=2)


def test_missing_data_file(cli, server):
    assert_one_line_error(cli("collect", "--data", "missing.jsonl", *model_flags(server.base_url)),
                          "missing.jsonl", code=2)


def test_malformed_config(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trials: [1, 2\nactor: {model: : x\n", encoding="utf-8")
    assert_one_line_error(cli("--config", str(bad), "collect"), "bad.yaml", "YAML", code=2)
    assert_one_line_error(cli("--config", str(tmp_path / "nope.yaml"), "collect"), "nope.yaml", code=2)


def test_unknown_config_key(cli, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("trails: 3\n", encoding="utf-8")
    assert_one_line_error(cli("--config", str(cfg), "collect"), "trails", "did you mean 'trials'", code=2)
    cfg.write_text("actor:\n  modle: openai:x\n", encoding="utf-8")
    assert_one_line_error(cli("--config", str(cfg), "collect"), "modle", code=2)


def test_resume_needs_run(cli):
    assert_one_line_error(cli("collect", "--resume"), "--resume", "--run", code=2)
    assert_one_line_error(cli("collect", "--resume", "--run", "ghost"), "ghost", code=2)


def test_eval_unknown_run(cli):
    assert_one_line_error(cli("eval", "--run", "ghost"), "ghost", "not found", code=2)
    assert_one_line_error(cli("eval"), "--run", code=2)


def test_unreachable_endpoint_subprocess(tmp_path):
    """Real process, real stderr: one 'Cannot reach' line, exit 1, no traceback (not even at shutdown)."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "retroformer_cli", "-w", str(tmp_path / "ws"), "--json", "collect", "--tasks", "1",
         "--trials", "1", "--actor", "openai:x", "--actor-base-url", url, "--reflector", "none"],
        capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Cannot reach" in errors[0] and url in errors[0], proc.stderr
    assert proc.stdout.strip() == ""
    assert elapsed < 30  # a refused connection is retried only briefly


def test_json_stdout_stays_empty_on_error(cli):
    res = cli("eval", "--run", "ghost", json_out=True)
    assert res.exit_code == 2 and res.stdout == ""


# --- end to end ----------------------------------------------------------------------------------

def test_collect_eval_runs_end_to_end(cli, server):
    url = server.base_url
    res = cli("collect", "--run", "a", "--tasks", "3", "--trials", "2", *model_flags(url), json_out=True)
    assert res.exit_code == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.endswith("\n")  # exactly one JSON document
    out = json.loads(res.stdout)
    assert out["run"] == "a" and out["status"] == "completed" and out["tasks"] == 3
    assert out["trials_total"] == out["trials_written"] >= 3
    trials_path = Path(out["trials_path"])
    if not trials_path.is_absolute():
        trials_path = cli.ws.parent / trials_path
    lines = trials_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == out["trials_written"] and all(json.loads(line)["run_id"] == "a" for line in lines)

    # the ReAct baseline (no reflector) for comparison
    res = cli("collect", "--run", "b", "--tasks", "3", "--trials", "2", *model_flags(url, reflector=False),
              json_out=True)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["run"] == "b"

    res = cli("eval", "--run", "a", json_out=True)
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    (a,) = rep["runs"]
    assert a["run"] == "a" and len(a["success_per_trial"]) == 2
    assert all(0.0 <= v <= 1.0 for v in a["success_per_trial"])
    assert a["success_per_trial"] == sorted(a["success_per_trial"])  # cumulative
    plot = Path(rep["plot"])
    plot = plot if plot.is_absolute() else cli.ws.parent / plot
    assert plot.read_bytes()[:4] == b"\x89PNG"

    res = cli("eval", "--run", "a", "--run", "b", "--plot", "cmp.png", json_out=True)
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert [r["run"] for r in rep["runs"]] == ["a", "b"]
    assert rep["runs"][0]["reflector"] == "fake" and rep["runs"][1]["reflector"] is None
    assert (cli.ws.parent / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    res = cli("eval", "--run", "a", "--run", "b")  # people's tables are results: stdout, like gh and pip
    assert res.exit_code == 0, res.stderr
    assert "trial 1" in res.stdout and "trial 2" in res.stdout and "trial 1" not in res.stderr

    res = cli("runs", json_out=True)
    assert res.exit_code == 0, res.stderr
    rows = {r["run"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {"a", "b"} and rows["a"]["status"] == "completed"
    res = cli("runs")
    assert res.exit_code == 0 and "completed" in res.stdout and "completed" not in res.stderr

    # an existing run is refused unless resumed; resuming a finished run is a no-op
    assert_one_line_error(cli("collect", "--run", "a", *model_flags(url)), "already exists", code=2)
    before = server.requests
    res = cli("collect", "--run", "a", "--resume", *model_flags(url), json_out=True)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["trials_written"] == 0 and server.requests == before


def test_eval_protocol_collects_on_eval_split(cli, server):
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv
    from retroformer_cli.stages.collect import split_of

    eval_ids = [t for t in HotPotQAEnv().task_ids() if split_of(t) == "eval"]
    split = [] if eval_ids else ["--split", "all"]  # the sample data may have no eval-split task
    res = cli("eval", "--env", "hotpotqa", "--tasks", "2", "--trials", "2", *split, *model_flags(server.base_url),
              json_out=True)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.count("\n") == 1  # collect's own summary is not printed: one document
    (r,) = json.loads(res.stdout)["runs"]
    assert r["env"] == "hotpotqa" and r["status"] == "completed" and len(r["success_per_trial"]) == 2
    assert r["tasks"] == (min(2, len(eval_ids)) if eval_ids else 2)
    from retroformer_cli.workspace import Workspace

    manifest = Workspace.open(cli.ws).read_manifest(r["run"])
    assert manifest["config"]["split"] == ("eval" if eval_ids else "all")
    if eval_ids:
        assert set(manifest["task_ids"]) <= set(eval_ids)
