"""stages/common: checkpoint precedence, the newest complete trainer checkpoint, names, reflections, the progress
protocol and its rich renderer; stages draw nothing themselves."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest

from retroformer_cli.errors import UsageError
from retroformer_cli.stages.common import checkpoints, names, progress, reflections

STAGES = Path(__file__).resolve().parents[1] / "retroformer_cli" / "stages"


def test_checkpoint_name_wins_over_a_folder_of_the_same_name(workspace, tmp_path, monkeypatch):
    named = workspace.checkpoint_dir("sft", "default")
    named.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    assert checkpoints.resolve_checkpoint(workspace, "sft", "default") == named
    assert checkpoints.resolve_checkpoint(workspace, "sft", "./default") == Path("./default")
    (tmp_path / "elsewhere").mkdir()
    assert checkpoints.resolve_checkpoint(workspace, "reward", str(tmp_path / "elsewhere")) == tmp_path / "elsewhere"
    with pytest.raises(UsageError, match=r"sft checkpoint 'nope' not found .*\(--sft\); known: default\."):
        checkpoints.resolve_checkpoint(workspace, "sft", "nope", "--sft")


def test_latest_trainer_checkpoint_skips_incomplete_ones(tmp_path):
    assert checkpoints.latest_trainer_checkpoint(tmp_path / "missing") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert checkpoints.latest_trainer_checkpoint(tmp_path).name == "checkpoint-10"  # 10 > 2 numerically; 12 unfinished


def test_names_follow_the_run_name_rule():
    assert names.check_name("a.b_c-1") == "a.b_c-1"
    for bad in ("", "-x", "a/b", "a b", "x" * 129):
        with pytest.raises(UsageError, match=r"not allowed \(--name\)"):
            names.check_name(bad)


def test_clean_reflection_cuts_at_stops_unless_told_not_to():
    assert reflections.clean_reflection(" Reflection: plan A\n\nQuestion: x") == "plan A"
    assert reflections.clean_reflection("reflection: a\n\nb", stop=()) == "a\n\nb"
    assert reflections.clean_reflection(None) == ""


class Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def task(self, description, total=None, *, completed=0):
        self.events.append(("task", description, total, completed))
        return description

    def advance(self, task, steps=1, *, completed=None, info=None):
        self.events.append(("advance", task, steps, completed, info))

    def log(self, task, message, *, detail=False):
        self.events.append(("log", task, message, detail))

    def finish(self, task):
        self.events.append(("finish", task))


def test_protocol_is_met_by_the_renderers():
    from retroformer_cli.console import RichProgress

    for p in (progress.NullProgress(), RichProgress(), Recorder()):
        assert isinstance(p, progress.Progress)


def test_rich_renderer_prints_plain_lines_off_a_terminal():
    from rich.console import Console

    from retroformer_cli.console import RichProgress

    out = io.StringIO()
    p = RichProgress(Console(file=out, force_terminal=False, width=200), label="eval")
    t = p.task("collect", 3, completed=1)
    p.advance(t, 1, info="solved 1")
    p.log(t, "task a trial 1: solved", detail=True)
    p.log(t, "resuming")
    p.finish(t)
    p.finish(t)  # twice is harmless
    assert out.getvalue().splitlines() == ["eval: task a trial 1: solved", "eval: resuming"]


def test_rich_renderer_keeps_detail_lines_off_a_terminal_bar():
    from rich.console import Console

    from retroformer_cli.console import RichProgress

    out = io.StringIO()
    p = RichProgress(Console(file=out, force_terminal=True, width=120))
    t = p.task("sft x", 4)
    p.log(t, "step 1/4 loss=1", detail=True)
    p.advance(t, 0, completed=4, info="loss=0.5")
    p.finish(t)
    text = out.getvalue()
    assert "step 1/4" not in text and "sft x" in text and "4/4" in text and "loss=0.5" in text


def test_trainer_callback_reports_steps_logs_and_history():
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    rec, history = Recorder(), []
    cb = progress.trainer_callback(rec, "ppo x", history=history,
                                   info=lambda logs: progress.metrics_info(logs, ("reward", "kl"), exact=True))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=2)
    cb.on_train_begin(None, state, None)
    state.global_step = 3
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"kl": 0.5, "reward": 1.0, "reward_std": 0.1, "mode": "train"})
    cb.on_train_end(None, state, None)
    assert rec.events == [
        ("task", "ppo x", 4, 2), ("log", "ppo x", "resuming at step 2/4", False),
        ("advance", "ppo x", 0, 3, None),
        ("advance", "ppo x", 0, None, "reward=1 kl=0.5"), ("log", "ppo x", "step 3/4 reward=1 kl=0.5", True),
        ("finish", "ppo x"),
    ]
    assert history == [{"step": 3, "kl": 0.5, "reward": 1.0, "reward_std": 0.1}]
    other = SimpleNamespace(is_world_process_zero=False, max_steps=4, global_step=0)
    n = len(rec.events)
    cb.on_train_begin(None, other, None)
    cb.on_log(None, other, None, logs={"kl": 1.0})
    assert len(rec.events) == n  # only the main process reports


def test_stages_import_no_rich():
    offenders = []
    for path in sorted(STAGES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno}" for m in mods if m == "rich" or m.startswith("rich.")
                          or m == "retroformer_cli.console"]
    assert not offenders, offenders


def test_collect_reports_through_the_protocol(workspace):
    from retroformer_cli.config import CollectConfig
    from retroformer_cli.testing.fake_llm import FakeLLM
    from retroformer_cli.stages import collect

    rec = Recorder()
    collect.run(CollectConfig(trials=1, tasks=2, run="p"), workspace, actor=FakeLLM(["Action: Finish[x]"]),
                reflector=None, progress=rec)
    kinds = [e[0] for e in rec.events]
    assert rec.events[0] == ("task", "collect", 2, 0) and kinds[-1] == "finish"
    assert kinds.count("log") == 2 and all(e[3] for e in rec.events if e[0] == "log")  # one detail line a trial
    done = [e for e in rec.events if e[0] == "advance" and e[2] == 1]
    assert len(done) == 2 and re.fullmatch(r"solved 0 trials 2 tokens \d+", done[-1][4])
