"""Evidence a researcher can trust: published logs imported as runs, intervals and paired comparisons checked
against hand-computed values, `show`, costs, output conventions, and the HTML report in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import shared_data
from retroformer_cli.cli import app
from retroformer_cli.config import CollectConfig, ModelConfig
from retroformer_cli.errors import UsageError
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.stages import collect, evaluate, run_import
from retroformer_cli.analysis import report, show
from retroformer_cli.analysis.stats import mcnemar_exact_p, paired, wilson

FIX = Path(__file__).parent / "fixtures"
runner = CliRunner()


# ------------------------------------------------------------------------------------------------ statistics
def test_wilson_interval_matches_hand_computed_values():
    # 51/100: centre (0.51 + 1.96^2/200) / (1 + 1.96^2/100) = 0.50963; half-width 0.09615
    assert wilson(51, 100) == pytest.approx((0.41348, 0.60578), abs=1e-5)
    # 34/100: centre (0.34 + 0.019207) / 1.038415 = 0.345919; half 1.959964 * sqrt(0.002244 + 0.000096) / 1.038415
    # = 0.091304
    assert wilson(34, 100) == pytest.approx((0.25462, 0.43722), abs=1e-5)
    # 0/10: the upper end is z^2/(n + z^2) = 3.8415/13.8415
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)


def test_paired_comparison_matches_hand_computed_values():
    # 100 tasks: A alone solves 18, B alone 1, both 33. Bonett-Price: p12 = 19/102, p21 = 2/102,
    # d = 17/102 = 0.16667, se = sqrt((21/102 - d^2) / 102) = 0.041787, d +- 1.96 se = [0.08477, 0.24857].
    a = [True] * 18 + [False] * 1 + [True] * 33 + [False] * 48
    b = [False] * 18 + [True] * 1 + [True] * 33 + [False] * 48
    p = paired(a, b, trial=5)
    assert (p.won, p.lost, p.both, p.neither, p.tasks) == (18, 1, 33, 48, 100)
    assert p.difference == pytest.approx(0.17)
    assert (p.ci_low, p.ci_high) == pytest.approx((0.08477, 0.24857), abs=1e-5)
    assert p.p_value == pytest.approx(2 * 20 / 2**19)  # 2 * P(X <= 1), X ~ Bin(19, 1/2)
    assert mcnemar_exact_p(5, 5) == 1.0 and mcnemar_exact_p(0, 0) == 1.0
    with pytest.raises(ValueError):
        paired([True], [True, False])


# ------------------------------------------------------------------------------------------------ imports (shared data)
HOTPOTQA_EXPECTED = {
    "react_base": [34, 34, 34, 34, 34],
    "react_reflexion": [32, 42, 48, 50, 51],
    "cot_context_reflexion": [61, 69, 69, 70, 72],
    "cot_no_context_reflexion": [32, 37, 40, 40, 40],
    "cot_no_context_base": [32, 33, 33, 33, 33],
}
ALFWORLD_EXPECTED = {
    "reflexion_run_logs": [84, 103, 111, 113, 117, 118, 123, 126, 128, 129, 130, 130, 131, 133, 134],
    "base_run_logs": [84, 94, 97, 98, 100, 101, 101],
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from retroformer_cli.workspace import Workspace

    hotpotqa, alfworld = shared_data("hotpotqa"), shared_data("alfworld")
    ws = Workspace.open(tmp_path_factory.mktemp("evidence") / "ws")
    made = run_import.import_runs(ws, hotpotqa / "reflexion_logs" / "trials.jsonl")
    for folder in ALFWORLD_EXPECTED:
        made += run_import.import_runs(ws, alfworld / "reflexion_logs" / folder)
    return ws, made


@pytest.mark.shared_data
def test_reflexion_hotpotqa_logs_import_as_runs_with_the_published_counts(imported):
    ws, made = imported
    for agent, counts in HOTPOTQA_EXPECTED.items():
        rep = evaluate.report_run(ws, f"reflexion-hotpotqa-{agent}")
        assert rep.tasks == 100 and rep.solved_per_trial == counts, agent
        assert rep.success_ci_per_trial[-1] == list(wilson(counts[-1], 100))
    manifest = ws.read_manifest("reflexion-hotpotqa-react_reflexion")
    assert manifest["imported"]["format"] == "reflexion-hotpotqa-trials-jsonl"
    assert manifest["models"]["actor"]["model_id"] == "unknown"
    assert ws.read_manifest("reflexion-hotpotqa-react_base")["models"]["reflector"] is None
    # trajectories and reflections are kept: the reflection written after a failed trial is the one that shows up
    # in the next trial's prompt
    trials = collect.load_trials(ws, "reflexion-hotpotqa-react_reflexion")
    reflected = [t for t in trials if t.reflection]
    assert reflected and all(t.steps for t in trials)
    later = {(t.task_id, t.trial): t for t in trials}
    for t in reflected:
        nxt = later.get((t.task_id, t.trial + 1))
        if nxt is not None:
            assert nxt.memory[-1] == t.reflection.text


@pytest.mark.shared_data
def test_reflexion_text_logs_give_the_same_runs_as_their_conversion(imported, tmp_path):
    from retroformer_cli.workspace import Workspace

    ws_txt = Workspace.open(tmp_path / "txt")
    data = shared_data("hotpotqa")
    run_import.import_runs(ws_txt, data / "reflexion_logs" / "original", prefix="txt", data=data / "dev.jsonl")
    ws, _ = imported
    for agent, counts in HOTPOTQA_EXPECTED.items():
        rep = evaluate.report_run(ws_txt, f"txt-hotpotqa-{agent}")
        assert rep.solved_per_trial == counts, agent
        assert sorted(ws_txt.read_manifest(f"txt-hotpotqa-{agent}")["task_ids"]) == \
            sorted(ws.read_manifest(f"reflexion-hotpotqa-{agent}")["task_ids"]), "questions map to HotPotQA ids"


@pytest.mark.shared_data
def test_reflexion_alfworld_logs_import_with_the_published_counts(imported):
    ws, _ = imported
    for folder, counts in ALFWORLD_EXPECTED.items():
        rep = evaluate.report_run(ws, f"reflexion-alfworld-{folder}")
        assert rep.tasks == 134 and rep.solved_per_trial == counts, folder
    assert ws.read_manifest("reflexion-alfworld-base_run_logs")["models"]["reflector"] is None


@pytest.mark.shared_data
def test_paired_comparison_of_reflexion_against_react(imported):
    ws, _ = imported
    data = evaluate.run(ws, ["reflexion-hotpotqa-react_reflexion", "reflexion-hotpotqa-react_base"])
    (comparison,) = data["comparisons"]  # two runs on the same tasks are compared without --compare
    fifth = comparison["per_trial"][4]
    assert fifth["trial"] == 5 and comparison["shared_tasks"] == 100
    assert (fifth["won"], fifth["lost"]) == (18, 1) and fifth["difference"] == pytest.approx(0.17)
    assert 0 < fifth["ci_low"] < fifth["ci_high"], "the interval excludes 0"
    assert fifth["p_value"] < 0.001 and data["warnings"] == []
    first = comparison["per_trial"][0]
    assert (first["won"], first["lost"]) == (4, 6) and first["ci_low"] < 0 < first["ci_high"]


@pytest.mark.shared_data
def test_comparing_runs_on_different_tasks_warns(imported):
    ws, _ = imported
    data = evaluate.run(ws, [], pairs=[("reflexion-hotpotqa-react_reflexion", "reflexion-alfworld-base_run_logs")])
    text = " ".join(data["warnings"])
    assert "task sets differ" in text and "different envs" in text and "trial counts" in text
    assert data["comparisons"][0]["shared_tasks"] == 0


# ------------------------------------------------------------------------------------------------ fixtures, no shared data
def test_text_log_fixture_imports_and_refuses_a_second_import_without_overwrite(workspace):
    made = run_import.import_runs(workspace, FIX / "reflexion_hotpotqa.txt", prefix="fx")
    assert [m["run"] for m in made] == ["fx-hotpotqa-reflexion_hotpotqa"]
    rep = evaluate.report_run(workspace, made[0]["run"])
    assert rep.tasks >= 1 and rep.trials >= 2
    with pytest.raises(UsageError, match="already exists"):
        run_import.import_runs(workspace, FIX / "reflexion_hotpotqa.txt", prefix="fx")
    assert run_import.import_runs(workspace, FIX / "reflexion_hotpotqa.txt", prefix="fx", overwrite=True)
    with pytest.raises(UsageError, match="does not exist"):
        run_import.import_runs(workspace, FIX / "nope.jsonl")


def _collected(workspace, name="mine", prices=True, solve=False):
    """Two sample tasks, two trials; ``solve``: the actor knows the answer to the Harrowind question."""

    def actor(messages, config):
        prompt = " ".join(m.content for m in messages)
        if solve and "founder of Harrowind Aeronautics" in prompt:
            return "Thought: I know this one.\nAction: Finish[1889]"
        return "Thought: I will answer.\nAction: Finish[no idea]"

    actor_cfg = ModelConfig(model="fake", price_in_per_m=2.0, price_out_per_m=8.0) if prices else ModelConfig(model="fake")
    cfg = CollectConfig(trials=2, run=name, tasks=2, actor=actor_cfg,
                        reflector=ModelConfig(model="fake", price_in_per_m=1.0, price_out_per_m=4.0))
    collect.run(cfg, workspace, actor=FakeLLM(actor, model_id="fake-actor"),
                reflector=FakeLLM(["Search first next time."], model_id="fake-reflector"))
    return collect.load_trials(workspace, name)


def test_exported_runs_import_into_another_workspace(workspace, tmp_path):
    from retroformer_cli.workspace import Workspace

    trials = _collected(workspace)
    other = Workspace.open(tmp_path / "other")
    (made,) = run_import.import_runs(other, workspace.run_dir("mine"), name="laptop-run")
    assert made == {"run": "laptop-run", "env": "hotpotqa", "tasks": 2, "trials": len(trials), "format": "retroformer-run"}
    copied = collect.load_trials(other, "laptop-run")
    assert [t.to_json() | {"run_id": "x"} for t in copied] == [t.to_json() | {"run_id": "x"} for t in trials]
    assert all(t.run_id == "laptop-run" for t in copied)
    assert evaluate.report_run(other, "laptop-run").success_per_trial == evaluate.report_run(workspace, "mine").success_per_trial
    bad = tmp_path / "bad-run"
    shutil.copytree(workspace.run_dir("mine"), bad)
    (bad / "trials.jsonl").write_text('{"kind": "trial", "task_id": 3}\n')
    with pytest.raises(Exception, match="line 1"):
        run_import.import_runs(other, bad, name="bad")
    assert not other.run_dir("bad").exists(), "nothing half-written"


def test_tokens_per_solved_task_and_cost(workspace):
    trials = _collected(workspace)
    rep = evaluate.report_run(workspace, "mine")
    refl_in = sum(t.reflection.prompt_tokens for t in trials if t.reflection)
    refl_out = sum(t.reflection.completion_tokens for t in trials if t.reflection)
    actor_in = sum(t.prompt_tokens for t in trials) - refl_in
    actor_out = sum(t.completion_tokens for t in trials) - refl_out
    assert refl_in > 0 and actor_in > 0
    assert rep.cost_usd == pytest.approx((actor_in * 2 + actor_out * 8 + refl_in * 1 + refl_out * 4) / 1e6)
    assert rep.tokens_per_solved is None and rep.cost_per_solved_usd is None  # nothing solved
    solved_trials = _collected(workspace, "solver", solve=True)
    won = evaluate.report_run(workspace, "solver")
    assert won.tasks == 2 and won.solved_per_trial[-1] == 1, won.solved_per_trial
    tokens = sum(t.prompt_tokens + t.completion_tokens for t in solved_trials)
    assert tokens > 0 and won.tokens_per_solved == pytest.approx(tokens / 1)
    assert won.cost_usd > 0 and won.cost_per_solved_usd == pytest.approx(won.cost_usd / 1)
    flat = evaluate.report_run(workspace, "mine", prices=evaluate.Prices(10.0, 20.0))
    assert flat.cost_usd == pytest.approx((rep.prompt_tokens * 10 + rep.completion_tokens * 20) / 1e6)
    _collected(workspace, "unpriced", prices=False)
    assert evaluate.report_run(workspace, "unpriced").cost_usd is None  # no price for the actor: no estimate


def test_show_lists_tasks_and_renders_one(workspace):
    trials = _collected(workspace)
    rows = show.task_rows(workspace, "mine")
    assert [r["task"] for r in rows] == workspace.read_manifest("mine")["task_ids"]
    task = rows[0]["task"]
    resolved, got = show.task_trials(workspace, "mine", task[-6:])  # a unique part of the id is enough
    assert resolved == task and [t.trial for t in got] == [1, 2]
    with pytest.raises(UsageError, match="matches 2 tasks"):
        show.task_trials(workspace, "mine", task[:10])
    with pytest.raises(UsageError, match="no task"):
        show.task_trials(workspace, "mine", "zzz-not-a-task")
    res = runner.invoke(app, ["-w", str(workspace.root), "show", "mine", task])
    assert res.exit_code == 0, res.output
    assert "reflection written after this trial" in res.stdout and "Search first next time." in res.stdout
    assert "Reflections in the prompt" in res.stdout and trials[0].steps[0].action in res.stdout


def test_results_go_to_stdout_and_json_is_accepted_after_the_subcommand(workspace):
    _collected(workspace)
    ws = str(workspace.root)
    table = subprocess.run([sys.executable, "-m", "retroformer_cli", "-w", ws, "eval", "--run", "mine"],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "Success rate per trial" in table.stdout, table.stderr
    assert "Success rate per trial" not in table.stderr and "plot:" in table.stderr
    for argv in (["eval", "--run", "mine", "--json"], ["--json", "eval", "--run", "mine"], ["runs", "--json"],
                 ["show", "mine", "--json"]):
        res = subprocess.run([sys.executable, "-m", "retroformer_cli", "-w", ws, *argv], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, (argv, res.stderr)
        json.loads(res.stdout)  # stdout is exactly one JSON document
    listed = subprocess.run([sys.executable, "-m", "retroformer_cli", "-w", ws, "runs"], capture_output=True,
                            text=True, timeout=120)
    assert "mine" in listed.stdout


# ------------------------------------------------------------------------------------------------ HTML report
def _report(workspace, tmp_path) -> Path:
    _collected(workspace, "a")
    _collected(workspace, "b")
    out = report.write(workspace, ["a", "b"], tmp_path / "report.html")
    return out


def test_report_is_one_self_contained_file(workspace, tmp_path):
    page = _report(workspace, tmp_path).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no network assets"
    assert "<link" not in page and "@import" not in page
    assert page.count("class='task-row") == 4  # 2 runs x 2 tasks
    assert "Search first next time." in page and "reflection written after this trial" in page
    assert "Paired comparisons" in page  # the two runs share their tasks
    escaped = report._e("<script>alert(1)</script>")
    assert "<script>alert" not in escaped


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed (apt-get install chromium); "
                                                 ".ci/run installs it")
def test_report_in_headless_chromium_sorts_filters_and_renders(workspace, tmp_path):
    page = _report(workspace, tmp_path)
    chrome = _chromium()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]

    def dom(fragment: str) -> str:
        res = subprocess.run([chrome, *CHROME_FLAGS, *profile, "--dump-dom", page.as_uri() + fragment],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    sorted_dom = dom("#sort=tokens&desc=1")
    rows = re.findall(r'<tr class="task-row[^"]*"[^>]*data-tokens="(\d+)"[^>]*>', sorted_dom)
    assert len(rows) == 4, "the browser built the task table"
    assert [int(x) for x in rows] == sorted((int(x) for x in rows), reverse=True), "the script sorted the rows"
    assert 'data-sorted="tokens:desc"' in sorted_dom
    task = json.loads(json.dumps(workspace.read_manifest("a")["task_ids"][0]))
    filtered = dom(f"#filter={task}")
    visible = [r for r in re.findall(r'<tr class="task-row[^>]*>', filtered) if "display: none" not in r]
    assert len(visible) == 2, "filtering by a task id leaves that task's row in each run"
    shot = tmp_path / "report.png"
    res = subprocess.run([chrome, *CHROME_FLAGS, *profile, "--window-size=1280,1400", f"--screenshot={shot}",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
