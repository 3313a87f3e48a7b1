"""`retroformer ppo --reward-metric`: the online reward is the change of score, success or F1 between the failed
trial k and trial k+1 replayed with the candidate reflection.

The runs are hand-made with scripted actors on the HotPotQA sample tasks: the actor's Finish answer is the gold
answer padded with filler words, so its F1 is exact (gold of g tokens + m fillers: F1 = 2g / (2g + m)) while its
exact match stays 0. No model is trained here (see tests/test_training_logs.py for a PPO run).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from retroformer_cli.config import CollectConfig
from retroformer_cli.errors import UsageError
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.stages import collect
from retroformer_cli.stages.ppo_rewards import OnlineReward, metric_value, outcome

_GOLD: dict[str, str] = {}


def _gold() -> dict[str, str]:
    if not _GOLD:
        from retroformer_cli.envs.hotpotqa import HotPotQAEnv

        env = HotPotQAEnv()
        for tid in env.task_ids():
            _GOLD[env.get_question(tid).question.strip()] = env.get_question(tid).answer
    return _GOLD


def padded(answer: str, f1: float) -> str:
    """``answer`` plus filler words so that its token F1 against ``answer`` is ``f1`` (0.2 or 0.5 here)."""
    from retroformer_cli.envs.hotpotqa_metrics import f1_score, normalize_answer

    g = len(normalize_answer(answer).split())
    text = answer + " qx" * round(2 * g * (1 - f1) / f1)
    assert f1_score(text, answer) == pytest.approx(f1)
    return text


def _latest_reflection(task_text: str) -> str | None:
    if "Reflections:\n" not in task_text:
        return None
    return task_text.split("Reflections:\n", 1)[1].split("\n\n", 1)[0].splitlines()[-1][2:]


def scripted_actor(messages, config):
    """F1 0.2 by default; with a newest reflection starting 'closer': F1 0.5; 'exact': the gold answer."""
    task = messages[1].content
    gold = _gold()[task.split("Question:")[1].split("\n")[0].strip()]
    latest = _latest_reflection(task) or ""
    answer = gold if latest.startswith("exact") else padded(gold, 0.5 if latest.startswith("closer") else 0.2)
    return f"Thought: I answer.\nAction: Finish[{answer}]"


@pytest.fixture
def run_f1(workspace):
    """Run 'r1': 2 tasks x 2 trials, every trial fails with F1 0.2, a reflection after trial 1 (tasks whose
    answer is not yes/no: the official F1 of a padded yes/no answer is 0)."""
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv

    env = HotPotQAEnv()
    ids = [t for t in env.task_ids() if env.get_question(t).answer.lower() not in ("yes", "no")][:2]
    collect.run(CollectConfig(trials=2, task_ids=ids, run="r1"), workspace,
                actor=FakeLLM(scripted_actor, model_id="script"),
                reflector=FakeLLM(["I answered with too many words."], model_id="fake-reflector"))
    trials = collect.load_trials(workspace, "r1")
    assert trials and all(not t.success and t.info["f1"] == pytest.approx(0.2) for t in trials)
    return workspace


def _call(reward: OnlineReward, ws, completions: list[str], logged: dict | None = None) -> list[float]:
    task = collect.load_trials(ws, "r1")[0].task_id
    n = len(completions)
    log = (lambda k, v: logged.__setitem__(k, v)) if logged is not None else None
    return asyncio.run(reward(prompts=[""] * n, completions=completions, task_id=[task] * n, run=["r1"] * n,
                              trial=[1] * n, log_metric=log))


def test_metric_of_an_outcome():
    assert metric_value("score", outcome(0.4, False, {})) == 0.4
    assert metric_value("success", outcome(1.0, True, {})) == 1.0
    assert metric_value("success", outcome(0.9, False, {"f1": 0.9})) == 0.0
    assert metric_value("f1", outcome(0.0, False, {"f1": 0.5})) == 0.5
    # an episode that ended without an F1 (truncated before Finish) counts 0
    assert metric_value("f1", outcome(0.0, False, {"truncated": True})) == 0.0


@pytest.mark.parametrize("metric, expected", [
    ("f1", [0.3, 0.8, 0.0]),  # 0.5 - 0.2, 1.0 - 0.2, 0.2 - 0.2
    ("score", [0.0, 1.0, 0.0]),  # exact match 0 both times unless the answer is the gold one
    ("success", [0.0, 1.0, 0.0]),
])
def test_dense_reward_from_a_pair_of_trials(run_f1, metric, expected):
    reward = OnlineReward(run_f1, actor=FakeLLM(scripted_actor, model_id="script"), metric=metric)
    logged: dict[str, float] = {}
    out = _call(reward, run_f1, ["closer: answer with the bare name.", "exact: the gold.", "plain plan"], logged)
    assert out == pytest.approx(expected)
    assert logged["online/episodes"] == 3.0
    assert logged["online/success"] == pytest.approx(1 / 3)
    assert logged["online/metric_delta_mean"] == pytest.approx(sum(expected) / 3)
    reward.close()


def test_cache_keeps_every_metric_and_reads_old_lines(run_f1, tmp_path):
    cache = tmp_path / "online_cache.0.jsonl"
    actor = FakeLLM(scripted_actor, model_id="script")
    first = OnlineReward(run_f1, actor=actor, metric="f1", cache_path=cache)
    assert _call(first, run_f1, ["closer plan"]) == pytest.approx([0.3])
    first.close()
    (line,) = [json.loads(x) for x in cache.read_text().splitlines()]
    assert line["metric"] == "f1" and line["score"] == 0.0 and line["success"] is False
    assert line["f1"] == pytest.approx(0.5)
    # the same replay serves another metric without running the episode again
    calls = len(actor.calls)
    again = OnlineReward(run_f1, actor=actor, metric="score", cache_path=cache)
    assert _call(again, run_f1, ["closer plan"]) == [0.0] and again.episodes == 0 and again.hits == 1
    assert len(actor.calls) == calls
    again.close()

    # a line written before --reward-metric existed has only "score": it still serves the score metric ...
    old = tmp_path / "old" / "online_cache.0.jsonl"
    old.parent.mkdir()
    old.write_text(json.dumps({"key": line["key"], "run": "r1", "task_id": line["task_id"], "trial": 1,
                               "reflection": "closer plan", "score": 1.0}) + "\n")
    legacy = OnlineReward(run_f1, actor=actor, metric="score", cache_path=old)
    assert _call(legacy, run_f1, ["closer plan"]) == [1.0] and legacy.episodes == 0
    legacy.close()
    # ... and a metric it lacks replays the episode instead of guessing
    dense = OnlineReward(run_f1, actor=actor, metric="f1", cache_path=old)
    assert _call(dense, run_f1, ["closer plan"]) == pytest.approx([0.3]) and dense.episodes == 1
    dense.close()


def test_f1_on_an_env_without_f1_fails_at_setup(workspace):
    shopper = FakeLLM(["Thought: look.\nAction: search[red shoes]"], model_id="shopper")
    collect.run(CollectConfig(env="webshop", trials=2, tasks=1, run="w1", max_steps=2), workspace, actor=shopper,
                reflector=FakeLLM(["I should click a product."]))
    with pytest.raises(UsageError, match="--reward-metric f1") as err:
        OnlineReward(workspace, actor=shopper, metric="f1").context("w1")
    assert "webshop" in str(err.value) and "\n" not in str(err.value)
    ok = OnlineReward(workspace, actor=shopper, metric="success")
    assert ok.context("w1").env_id == "webshop"
    ok.close()


def test_bogus_metric_is_one_line(workspace, tmp_path):
    from retroformer_cli.stages.ppo import PPOStageConfig, run_ppo

    with pytest.raises(UsageError, match="--reward-metric") as err:
        run_ppo(PPOStageConfig(mode="online", reward_metric="bogus"), workspace)
    assert "score, success, f1" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--reward-metric"):
        OnlineReward(workspace, metric="bogus")

    import retroformer_cli.commands.ppo  # noqa: F401  (registers the command)
    from retroformer_cli.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["-w", str(tmp_path / "ws2"), "ppo", "--mode", "online", "--reward-metric", "bogus"])
    errors = [line for line in r.output.splitlines() if "Error" in line]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output
    assert "--reward-metric" in errors[0] and "score, success, f1" in errors[0]
    r = runner.invoke(app, ["ppo", "--help"])
    assert r.exit_code == 0 and "--reward-metric" in r.output


def test_ratings_say_what_rating_measures(run_f1):
    from retroformer_cli.stages.datasets import DatasetConfig, build, read_split

    build(DatasetConfig(name="ratings", runs=["r1"]), run_f1)
    rows = list(read_split(run_f1, "ratings", "ratings", "train")) + \
        list(read_split(run_f1, "ratings", "ratings", "validation"))
    assert rows and all(r["rating_metric"] == "score" and r["rating"] == 0.0 for r in rows)
    assert all(r["rating_f1"] == pytest.approx(0.0) for r in rows)  # 0.2 -> 0.2
