"""CLI options derived from the config dataclasses (retroformer_cli/options.py) and the root that adds each command
module's own Typer app: help everywhere, help text from field metadata, flags > --config YAML > defaults for every
config kind, consistent flag names, no command module importing the root."""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from retroformer_cli import cli
from retroformer_cli.options import Flag, config_options, help_text, resolve_field

REPO = Path(__file__).resolve().parents[1]
GLOBAL_NAMES = {"--workspace", "-w", "--config", "-c", "--json", "--version", "-h", "--help"}


def all_commands():
    """(path, click command) for every command and subcommand the root adds."""
    root = typer.main.get_command(cli.app)
    ctx = root.make_context("retroformer", ["--help"], resilient_parsing=True)
    out = []

    def walk(path, cmd):
        out.append((path, cmd))
        for name in getattr(cmd, "commands", {}) or {}:
            walk(f"{path} {name}", cmd.commands[name])

    for name in root.list_commands(ctx):
        walk(name, root.get_command(ctx, name))
    return out


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def unwrap(text: str) -> str:
    """Help text without the line breaks click adds (also inside hyphenated words)."""
    return re.sub(r"-\s+", "-", flat(text))


# --- (a) help on every option --------------------------------------------------------------------

def test_every_option_of_every_command_has_help():
    commands = all_commands()
    assert {p for p, _ in commands} >= {"collect", "eval", "runs", "runs import", "show", "report", "datasets",
                                        "datasets build", "sft", "reward", "reward score", "ppo", "serve",
                                        "env", "env serve"}
    missing = [f"{path} {p.opts}" for path, cmd in commands for p in cmd.params
               if not getattr(p, "hidden", False) and not (getattr(p, "help", None) or "").strip()]
    assert not missing, f"options without help: {missing}"
    assert all((cmd.help or "").strip() for _, cmd in commands)


def test_every_command_and_subcommand_help_renders():
    runner = CliRunner()
    for path, _ in all_commands():
        res = runner.invoke(cli.app, [*path.split(), "--help"])
        assert res.exit_code == 0 and "Usage:" in res.stdout, (path, res.output)


def test_root_lists_commands_from_the_registry():
    res = CliRunner().invoke(cli.app, ["--help"])
    assert res.exit_code == 0
    listed = re.findall(r"^  (\w+)\s{2,}", res.stdout.split("Commands:")[1], re.M)
    assert listed == list(cli.COMMANDS)


# --- (b) the dataclass field's help reaches --help ----------------------------------------------

@dataclasses.dataclass
class _Inner:
    depth: int = dataclasses.field(default=2, metadata={"help": "zebra depth of the inner thing"})


@dataclasses.dataclass
class _Demo:
    width: int = dataclasses.field(default=7, metadata={"help": "quokka width in cells"})
    mode: str = dataclasses.field(default="a", metadata={"help": "a | b: how it runs"})
    names: list[str] = dataclasses.field(default_factory=list, metadata={"help": "wombat names"})
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    bare: int = 0


def _demo_app(*flags: Flag):
    app = typer.Typer(rich_markup_mode=None)
    seen = {}

    @app.command()
    @config_options(_Demo, flags)
    def demo(overrides: dict) -> None:
        seen.update(overrides)

    return app, seen


def test_field_metadata_help_and_default_reach_help():
    app, _ = _demo_app(Flag("width", ("-W",)), Flag("mode"), Flag("names", name="--name"), Flag("inner.depth"))
    out = flat(CliRunner().invoke(app, ["--help"]).stdout)
    assert "-W, --width" in out and "Quokka width in cells [default: 7]." in out
    assert "a | b: how it runs [default: a]." in out  # a value list stays lower case
    assert "--name" in out and "Wombat names (repeatable)." in out
    assert "--inner-depth" in out and "Zebra depth of the inner thing [default: 2]." in out


def test_flags_become_dotted_overrides_only_when_given():
    app, seen = _demo_app(Flag("width"), Flag("names", name="--name"), Flag("inner.depth", also=("width",)))
    res = CliRunner().invoke(app, ["--name", "x", "--name", "y", "--inner-depth", "5"])
    assert res.exit_code == 0, res.output
    assert seen == {"names": ["x", "y"], "inner.depth": 5, "width": 5}
    seen.clear()
    assert CliRunner().invoke(app, []).exit_code == 0 and seen == {}


def test_a_flag_without_metadata_help_or_field_is_refused():
    with pytest.raises(TypeError, match="bare"):
        _demo_app(Flag("bare"))
    with pytest.raises(TypeError, match="nosuch"):
        _demo_app(Flag("nosuch"))


def test_real_commands_show_their_config_fields_help():
    """Each derived option's help is the one built from its field's metadata, and --help prints it."""
    runner = CliRunner()
    checked = 0
    for path, cmd in all_commands():
        flags = getattr(cmd.callback, "config_flags", None)
        if flags is None:
            continue
        cls, group = flags
        out = flat(runner.invoke(cli.app, [*path.split(), "--help"]).stdout)
        by_name = {p.name: p for p in cmd.params}
        repeatable = {p.name for p in cmd.params if getattr(p, "multiple", False)}
        for flag in group:
            f, _, default = resolve_field(cls, flag.path)
            if flag.help_from:
                f = resolve_field(cls, flag.help_from)[0]
            expected = help_text(flag, f, default, cls.__name__, repeatable=flag.param in repeatable)
            assert by_name[flag.param].help == expected
            assert unwrap(expected) in unwrap(out), (path, flag.path)  # as printed, line breaks aside
            checked += 1
    assert checked >= 60


# --- (c) flag > YAML > default, per config kind ----------------------------------------------------

@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "DATA_DIR", "RETROFORMER_WORKSPACE"):
        monkeypatch.delenv(var, raising=False)

    def run(yaml_text: str | None, *args: str):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml_text or "", encoding="utf-8")
        config = ["--config", str(cfg)] if yaml_text is not None else []
        res = CliRunner().invoke(cli.app, ["-w", str(tmp_path / "ws"), *config, *args])
        assert res.exit_code == 0, res.output
        return res

    return run


def _capture(monkeypatch, module, attr, result):
    seen = []

    def fake(cfg, *args, **kwargs):
        seen.append(cfg)
        return result(cfg)

    monkeypatch.setattr(module, attr, fake)
    return seen


def _train_result(cfg):
    return SimpleNamespace(stage="x", name=cfg.name, path="p", metrics={}, mode="offline", steps=0,
                           to_json=lambda: {})


def test_collect_flag_over_yaml_over_default(run_cli, monkeypatch):
    from retroformer_cli.config import CollectConfig, ModelConfig
    from retroformer_cli.stages import collect

    seen = _capture(monkeypatch, collect, "run", lambda cfg: SimpleNamespace(
        run="r", solved=0, tasks=0, trials_written=0, trials_path="t", to_json=lambda: {}))
    run_cli("trials: 5\nmemory_size: 1\nactor: {model: 'openai:yaml', max_tokens: 11}\n",
            "collect", "--trials", "2", "--actor", "openai:flag", "--threads", "3", "--env-option", "wording=react",
            "--task-ids", "a,b")
    (cfg,) = seen
    assert cfg.trials == 2 and cfg.memory_size == 1 and cfg.concurrency == CollectConfig().concurrency
    assert cfg.actor.model == "openai:flag" and cfg.actor.max_tokens == 11
    assert cfg.reflector.max_tokens == 128 and cfg.actor.temperature == ModelConfig().temperature
    assert cfg.actor.threads == cfg.reflector.threads == 3  # one local engine: the flag sets both roles
    assert cfg.env_options == {"wording": "react"} and cfg.task_ids == ["a", "b"]


def test_datasets_flag_over_yaml_over_default(run_cli, monkeypatch):
    from retroformer_cli.stages import datasets

    seen = _capture(monkeypatch, datasets, "build", lambda cfg: SimpleNamespace(
        name=cfg.name, path="p", counts=defaultdict(int), to_json=lambda: {}))
    run_cli("name: fromyaml\nval_fraction: 0.3\nruns: [y1]\n", "datasets", "build", "--name", "fromflag", "-r", "a",
            "--run", "b")
    (cfg,) = seen
    assert cfg.name == "fromflag" and cfg.val_fraction == 0.3 and cfg.runs == ["a", "b"]
    assert cfg.pair_scope == datasets.DatasetConfig().pair_scope


@pytest.mark.parametrize("command", ["sft", "reward"])
def test_trainer_flag_over_yaml_over_default(run_cli, monkeypatch, command):
    import importlib

    stage = importlib.import_module(f"retroformer_cli.stages.{command}")
    seen = _capture(monkeypatch, stage, "run", _train_result)
    run_cli("batch_size: 3\nlearning_rate: 0.5\nlora: {r: 6, alpha: 9}\n",
            command, "-d", "mine", "--lr", "0.25", "--lora-r", "12", "--lora-targets", "q_proj,k_proj")
    (cfg,) = seen
    default = type(cfg)()
    assert cfg.dataset == "mine" and cfg.learning_rate == 0.25 and cfg.batch_size == 3
    assert cfg.lora.r == 12 and cfg.lora.alpha == 9 and cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.max_length == default.max_length and cfg.lora.dropout == default.lora.dropout


def test_ppo_flag_over_yaml_over_default_and_config_after_the_command(run_cli, monkeypatch, tmp_path):
    from retroformer_cli.stages import ppo

    seen = _capture(monkeypatch, ppo, "run_ppo", _train_result)
    cfg_file = tmp_path / "ppo.yaml"
    cfg_file.write_text("beta: 0.5\nnum_generations: 3\n", encoding="utf-8")
    # `retroformer ppo --config FILE` (as the accelerate examples write it) is the global --config
    run_cli(None, "ppo", "--config", str(cfg_file), "-G", "6", "--learning-rate", "0.125", "-d", "p")
    (cfg,) = seen
    assert cfg.beta == 0.5 and cfg.num_generations == 6 and cfg.learning_rate == 0.125 and cfg.dataset == "p"
    assert cfg.max_steps == ppo.PPOStageConfig().max_steps


# --- consistency -----------------------------------------------------------------------------------

def test_no_command_shadows_a_global_option_and_names_agree():
    names_of = defaultdict(set)
    for path, cmd in all_commands():
        for p in cmd.params:
            opts = set(p.opts) | set(p.secondary_opts)
            assert not (opts & GLOBAL_NAMES - {"-h", "--help"}), f"{path} shadows a global option: {opts}"
            longs = sorted(o for o in p.opts if o.startswith("--"))
            if longs:
                names_of[longs[0]].add(tuple(sorted(p.opts)))
    for main, variants in names_of.items():
        if main not in ("--run", "--name", "--model"):  # a run/name/model means different things per command
            assert len(variants) == 1, f"{main} is spelt differently across commands: {variants}"
    assert names_of["--dataset"] == {("--dataset", "-d")}
    assert names_of["--learning-rate"] == {("--learning-rate", "--lr")}
    assert "--lr" not in names_of  # no separate --lr option beside --learning-rate


def test_global_options_after_the_subcommand_are_moved_in_front():
    hoist = cli._hoist_globals
    assert hoist(["eval", "--run", "x", "--json"]) == ["--json", "eval", "--run", "x"]
    assert hoist(["ppo", "-c", "p.yaml", "--max-steps", "2"]) == ["-c", "p.yaml", "ppo", "--max-steps", "2"]
    assert hoist(["ppo", "--config=p.yaml", "-w", "ws"]) == ["--config=p.yaml", "-w", "ws", "ppo"]
    assert hoist(["serve", "--", "--json"]) == ["serve", "--", "--json"]


def test_commands_never_import_the_root():
    for path in (REPO / "retroformer_cli" / "commands").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert "retroformer_cli.cli" not in names, f"{path.name} imports retroformer_cli.cli"


def test_every_registered_module_exists_and_exposes_its_app():
    import importlib

    for name, (module, attr, short) in cli.COMMANDS.items():
        assert short.strip().endswith("."), name
        assert isinstance(getattr(importlib.import_module(f"retroformer_cli.commands.{module}"), attr), typer.Typer)
