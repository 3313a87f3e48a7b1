"""The learning experiment's analysis: paired comparisons against the frozen arm on hand-made runs, the verdict
that names the failed lever, and the HTML report."""

from __future__ import annotations

import json

import pytest

from retroformer_cli.config import CollectConfig, ModelConfig
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.stages import collect
from retroformer_cli.stages.learning import LearningConfig, _Stages, summarize, verdict
from retroformer_cli.analysis.learning_report import write_report

SAMPLE = [json.loads(line) for line in open("sample_data/hotpotqa/questions.jsonl", encoding="utf-8")]
GOLD = {q["id"]: q["answer"] for q in SAMPLE}


def _actor(helped_by_reflection: bool) -> FakeLLM:
    """Answers wrong without a reflection; with one, answers right only if ``helped_by_reflection``."""
    def reply(messages, config):
        user = messages[1].content
        qid = next(q["id"] for q in SAMPLE if q["question"].strip() in user)
        answer = GOLD[qid] if (helped_by_reflection and "Reflections:" in user) else "nobody knows"
        return f"I will answer.\nAction 1: Finish[{answer}]"
    return FakeLLM(reply, model_id="scripted-actor")


def _run(workspace, name: str, helped: bool, reflector: str = "none-needed") -> None:
    cfg = CollectConfig(env="hotpotqa", tasks=6, trials=2, run=name, concurrency=2,
                        actor=ModelConfig(model="embedded"), reflector=ModelConfig(model="embedded"))
    collect.run(cfg, workspace, actor=_actor(helped), reflector=FakeLLM(["I should search the pages first."]))


@pytest.fixture
def arms(workspace):
    cfg = LearningConfig(name="t", eval_trials=2, arms=["frozen", "ppo"], base_arms=[], bootstrap=500)
    _run(workspace, "t-eval-frozen", helped=False)
    _run(workspace, "t-eval-ppo", helped=True)
    _run(workspace, "t-train-frozen", helped=False)
    return cfg, workspace


def test_trained_arm_that_solves_after_reflections_beats_frozen(arms):
    cfg, ws = arms
    st = _Stages(cfg, ws, None)
    s = summarize(cfg, ws, st, ["frozen", "ppo"], [], {"reflector_sft": False})
    assert s["eval_tasks"] == 6 and s["train_tasks"] == 6
    assert s["arms"]["frozen"]["success_per_trial"] == [0.0, 0.0]
    assert s["arms"]["ppo"]["success_per_trial"] == [0.0, 1.0]
    assert s["trained_minus_frozen"] == pytest.approx(1.0)  # f1 1 vs 0 on every task at trial 2
    assert s["ci_low"] == pytest.approx(1.0) and s["verdict"]["target_met"]
    trial2 = s["comparisons"]["ppo"]["success_per_trial"][1]
    assert trial2["won"] == 6 and trial2["lost"] == 0
    assert s["comparisons"]["ppo"]["success_per_trial"][0]["difference"] == 0.0
    assert s["sensitivity"]["ppo"] == 1.0 and s["sensitivity"]["frozen"] == 0.0
    page = write_report(cfg, ws, s).read_text(encoding="utf-8")
    assert "target met" in page and "ppo − frozen" in page and "data:image/png;base64," in page


def test_no_gain_names_the_levers(arms):
    cfg, ws = arms
    st = _Stages(cfg, ws, None)
    s = summarize(cfg, ws, st, ["frozen"], [], {"reflector_sft": False})
    s.update(ci_low=-0.1, oracle_headroom={"tuned": 0.0, "base": 0.0}, steps=4,
             curve=[{"step": 1, "reward": 0.0, "kl": 0.0, "frac_reward_zero_std": 1.0}])
    v = verdict(s)
    assert not v["target_met"]
    text = " ".join(v["levers"])
    for lever in ("headroom", "sensitivity", "reward variance", "KL", "steps"):
        assert lever in text


def test_bad_arms_are_refused(workspace):
    from retroformer_cli.errors import UsageError
    from retroformer_cli.stages.learning import run

    with pytest.raises(UsageError, match="frozen"):
        run(LearningConfig(arms=["ppo"]), workspace)
    with pytest.raises(UsageError, match="Unknown arm"):
        run(LearningConfig(arms=["frozen", "magic"]), workspace)


def test_a_lever_experiment_reuses_what_does_not_depend_on_the_reflector(workspace):
    st = _Stages(LearningConfig(name="lever2", reuse="base"), workspace, None)
    assert st.actor_spec == "workspace:sft/base-actor"
    assert st.shared("train-frozen") == "base-train-frozen" and st.shared("ratings") == "base-ratings"
    assert st.eval_run("frozen") == "base-eval-frozen" and st.eval_run("oracle") == "base-eval-oracle"
    assert st.eval_run("ppo") == "lever2-eval-ppo" and st.reflector_spec("ppo") == "workspace:ppo/lever2-ppo"


def test_a_stage_in_its_own_process_returns_its_result_and_raises_its_errors():
    import math

    from retroformer_cli.stages.learning import _in_child

    assert _in_child(math.sqrt, (16.0,), {}, None) == 4.0
    with pytest.raises(ValueError):
        _in_child(math.sqrt, (-1.0,), {}, None)
