"""Oracle reflectors (diagnostics: headroom and ceiling) and the reflection sensitivity reported by `eval`."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from typer.testing import CliRunner

from conftest import shared_data
from retroformer_cli.agents.oracle import OracleReflector
from retroformer_cli.config import CollectConfig, ModelConfig
from retroformer_cli.envs import get_spec
from retroformer_cli.envs.hotpotqa import SAMPLE_DATA as HOTPOTQA_SAMPLE
from retroformer_cli.envs.hotpotqa import HotPotQAEnv, load_questions
from retroformer_cli.envs.hotpotqa_metrics import normalize_answer
from retroformer_cli.envs.hotpotqa_oracle import contains_answer, hints_for
from retroformer_cli.errors import UsageError
from retroformer_cli.llm import make_client
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.records import Reflection, Step, Trial
from retroformer_cli.stages import collect, evaluate
from retroformer_cli.stages.collect import load_trials
from retroformer_cli.stages.evaluate import reflection_sensitivity


# ---- reflection sensitivity on hand-made trials ------------------------------------------------------------
def _trial(task: str, k: int, actions: list[str], score: float, memory: tuple[str, ...] = (),
           env_error: str | None = None) -> Trial:
    return Trial(run_id="r", env_id="hotpotqa", task_id=task, trial=k, instruction="q",
                 steps=[Step(thought="", action=a, observation="") for a in actions], success=score == 1.0,
                 score=score, terminated=True, truncated=False, memory=list(memory), reflection=None,
                 actor_model_id="a", reflector_model_id="b", actor_prompt=[], env_error=env_error)


def test_sensitivity_identical_actions_count_as_unchanged():
    trials = [_trial("a", 1, ["Search[x]", "Finish[y]"], 0.0), _trial("a", 2, ["Search[x]", "Finish[y]"], 0.0, ("m",))]
    assert reflection_sensitivity(trials) == {"pairs": 1, "changed_share": 0.0, "score_change_after_reflection": 0.0}


def test_sensitivity_changed_actions_pairs_without_memory_and_mean_score_change():
    trials = [
        _trial("a", 1, ["Finish[x]"], 0.0), _trial("a", 2, ["Search[x]", "Finish[y]"], 1.0, ("m",)),  # changed, +1
        _trial("b", 1, ["Finish[x]"], 0.5), _trial("b", 2, ["Finish[z]"], 0.25, ("m",)),  # changed, -0.25
        _trial("b", 3, ["Finish[z]"], 0.0, ("m", "n")),  # same actions as trial 2, -0.25
        _trial("c", 1, ["Finish[x]"], 0.0), _trial("c", 2, ["Finish[q]"], 1.0),  # no memory: ignored
        _trial("d", 1, ["Finish[x]"], 0.0), _trial("d", 2, [], 0.0, ("m",), env_error="crashed"),  # env error: ignored
    ]
    sens = reflection_sensitivity(trials)
    assert sens["pairs"] == 3
    assert sens["changed_share"] == pytest.approx(2 / 3)
    assert sens["score_change_after_reflection"] == pytest.approx((1.0 - 0.25 - 0.25) / 3)
    assert reflection_sensitivity([_trial("c", 1, ["a"], 0.0), _trial("c", 2, ["b"], 1.0)]) == {
        "pairs": 0, "changed_share": None, "score_change_after_reflection": None}


# ---- HotPotQA: the non-leaking oracle never gives the answer away ------------------------------------------------
def _check_questions(questions) -> None:
    assert questions
    for q in questions:
        hint, leak = hints_for(q)
        assert hint, q.id
        assert not contains_answer(hint, q.answer), (q.id, q.answer, hint)
        gold = normalize_answer(q.answer)
        assert f" {gold} " not in f" {normalize_answer(hint)} ", (q.id, q.answer, hint)
        assert contains_answer(leak, q.answer) and f"Finish[{q.answer}]" in leak


def test_hotpotqa_oracle_never_contains_the_answer_sample_data():
    _check_questions(load_questions(HOTPOTQA_SAMPLE))


@pytest.mark.shared_data
def test_hotpotqa_oracle_never_contains_the_answer_dev_set():
    _check_questions(load_questions(shared_data("hotpotqa") / "dev.jsonl"))


def test_hotpotqa_oracle_names_supporting_pages_or_their_place():
    q = load_questions(HOTPOTQA_SAMPLE)[0]
    hint, _ = hints_for(q)
    titles = list(dict.fromkeys(t for t, _ in q.supporting_facts))
    for i, title in enumerate(titles):
        assert f"Search[{title}]" in hint or "page the question points to" in hint
    answer_title = dataclasses.replace(q, answer=titles[-1])  # the answer is a supporting page's title
    hint, leak = hints_for(answer_title)
    assert f"Search[{titles[-1]}]" not in hint and "page the question points to" in hint
    assert not contains_answer(hint, titles[-1]) and titles[-1] in leak


# ---- WebShop and ALFWorld ------------------------------------------------------------------------------------
def test_webshop_oracle_from_sample_data():
    from retroformer_cli.envs.webshop.env import WebShopEnv
    from retroformer_cli.envs.webshop.oracle import oracle_hints

    env = WebShopEnv()
    for tid in env.task_ids():
        goal = env.get_goal(tid)[1]
        hint, leak = oracle_hints(env, tid)
        assert hint and leak
        assert goal["asin"].lower() not in hint.lower() and goal["name"].lower() not in hint.lower()
        assert all(str(a) in hint for a in goal["attributes"])
        assert goal["asin"] in leak and goal["name"] in leak and "click[Buy Now]" in leak


@pytest.mark.shared_data
def test_alfworld_oracle_from_shared_games():
    from retroformer_cli.envs.alfworld.worker import missing_dependency

    if missing_dependency() is not None:
        pytest.skip("the alfworld extra is not installed (pip install '.[alfworld]')")
    from retroformer_cli.envs.alfworld import ALFWorldEnv
    from retroformer_cli.envs.alfworld.oracle import oracle_hints, places

    env = ALFWorldEnv(data=shared_data("alfworld"))
    try:
        for tid in env.task_ids()[:10]:
            walkthrough = env.walkthrough(tid)
            hint, leak = oracle_hints(env, tid)
            assert walkthrough and hint and leak
            assert all(p in hint for p in places(walkthrough))
            assert not any(c in hint for c in walkthrough if not c.startswith("go to "))  # places only
            assert all(c in leak for c in walkthrough)
    finally:
        env.close()


# ---- the reflector in collect, its labels in manifest, eval and report; refused by datasets ------------------------
def _always_wrong(messages, config):
    return "Thought: I guess.\nAction: Finish[definitely wrong]"


def _oracle_run(workspace, name: str = "orc", model: str = "oracle"):
    cfg = CollectConfig(trials=2, tasks=2, run=name)
    cfg.reflector.model = model
    collect.run(cfg, workspace, actor=FakeLLM(_always_wrong, model_id="fake-actor"))
    return load_trials(workspace, name)


def test_collect_with_oracle_reflector_writes_the_hint_into_trial_2(workspace):
    trials = {(t.task_id, t.trial): t for t in _oracle_run(workspace)}
    env = HotPotQAEnv()
    assert len(trials) == 4
    for tid in {t for t, _ in trials}:
        hint, _ = hints_for(env.get_question(tid))
        first, second = trials[(tid, 1)], trials[(tid, 2)]
        assert isinstance(first.reflection, Reflection) and first.reflection.text == hint
        assert first.reflection.model_id == "oracle" and first.reflector_model_id == "oracle"
        assert first.reflection.prompt_tokens == first.reflection.completion_tokens == 0
        assert second.memory == [hint] and second.reflection is None  # no reflection after the last trial
    manifest = workspace.read_manifest("orc")
    assert manifest["diagnostic"] == "oracle"
    assert manifest["models"]["reflector"]["diagnostic"] == "oracle"
    assert [r["diagnostic"] for r in workspace.list_runs()] == ["oracle"]  # `runs` labels it too
    assert manifest["models"]["reflector"]["backend"] == "oracle"

    data = evaluate.run(workspace, ["orc"])
    rep = data["runs"][0]
    assert rep["diagnostic"] == "oracle" and rep["reflector"] == "oracle"
    assert rep["sensitivity"] == {"pairs": 2, "changed_share": 0.0, "score_change_after_reflection": 0.0}
    assert any("diagnostic" in w for w in data["warnings"])

    from rich.console import Console

    from retroformer_cli.console import eval_table

    out = Console(record=True, width=250)
    out.print(eval_table([evaluate.RunReport(**rep)]))
    text = out.export_text()
    assert "(diagnostic: oracle)" in text and "changed 0.0%" in text

    from retroformer_cli.analysis import report

    page = report.build(workspace, ["orc"])
    assert "<span class=diagnostic>diagnostic: oracle</span>" in page
    assert "actions changed after a reflection" in page


def test_oracle_leak_states_the_answer(workspace):
    trials = _oracle_run(workspace, "leak", "oracle-leak")
    env = HotPotQAEnv()
    first = [t for t in trials if t.trial == 1]
    assert first and all(t.reflection.model_id == "oracle-leak" for t in first)
    for t in first:
        answer = env.get_question(t.task_id).answer
        assert t.reflection.text == f"The answer is {answer}. Next time I will answer Finish[{answer}]."
    assert workspace.read_manifest("leak")["diagnostic"] == "oracle-leak"
    assert evaluate.report_run(workspace, "leak").diagnostic == "oracle-leak"


def test_datasets_build_refuses_an_oracle_run(workspace):
    from retroformer_cli.stages.datasets import DatasetConfig, build

    _oracle_run(workspace)
    with pytest.raises(UsageError, match="Run 'orc' is a diagnostic run.*cannot be training data"):
        build(DatasetConfig(name="d", runs=["orc"]), workspace)
    # a copy whose manifest lost the label is still refused: its reflections name the oracle
    shutil.copytree(workspace.runs_dir / "orc", workspace.runs_dir / "copy")
    manifest = workspace.read_manifest("copy")
    manifest.pop("diagnostic")
    manifest["models"]["reflector"] = {"model_id": "unknown"}
    manifest["run"] = "copy"
    workspace.write_manifest("copy", manifest)
    with pytest.raises(UsageError, match="Run 'copy' is a diagnostic run"):
        build(DatasetConfig(name="d", runs=["copy"]), workspace)
    assert not (workspace.datasets_dir / "d").exists()


# ---- specs and errors ----------------------------------------------------------------------------------------
def test_the_actor_cannot_be_an_oracle(workspace, tmp_path):
    with pytest.raises(UsageError, match="'oracle' \\(--actor\\) is a diagnostic reflector"):
        make_client(ModelConfig(model="oracle"), workspace, "--actor")
    assert make_client(ModelConfig(model="oracle-leak"), workspace, "--reflector").model_id == "oracle-leak"
    from retroformer_cli.cli import app

    result = CliRunner().invoke(app, ["-w", str(tmp_path / "cli-ws"), "collect", "--actor", "oracle", "--tasks", "1"])
    assert result.exit_code == 2
    assert "is a diagnostic reflector" in result.output and "Traceback" not in result.output


def test_every_builtin_env_declares_an_oracle_and_binding_needs_one():
    for name in ("hotpotqa", "webshop", "alfworld"):
        assert get_spec(name).oracle
    with pytest.raises(ValueError, match="oracle 'not a ref' must be a 'module:attribute' string"):
        dataclasses.replace(get_spec("hotpotqa"), oracle="not a ref")
    oracle = OracleReflector()
    with pytest.raises(UsageError, match="not bound"):
        oracle.reflection("x")
    with pytest.raises(UsageError, match="declares no oracle hints"):
        oracle.bind(HotPotQAEnv(), dataclasses.replace(get_spec("hotpotqa"), oracle=None))
