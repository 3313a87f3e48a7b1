"""Actor SFT data (`datasets actor`): train-split tasks only, prompts exactly as collect sends them, successful
replays only, sources and refusals; and the learning experiment's statistics."""

from __future__ import annotations

import asyncio
import json

import pytest

from retroformer_cli.stages import actor_data
from retroformer_cli.stages.common.splits import split_of
from tests.conftest import shared_data


def _build(workspace, **kw):
    data = shared_data("hotpotqa") / "dev.jsonl"
    cfg = actor_data.ActorDataConfig(data=str(data), **kw)
    return actor_data.build(cfg, workspace), data


def _rows(res):
    out = []
    for split in ("train", "validation"):
        path = res.path / f"actor.{split}.jsonl"
        out += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return out


@pytest.mark.shared_data
def test_rows_come_from_train_split_tasks_only(workspace):
    logs = shared_data("hotpotqa") / "reflexion_logs" / "trials.jsonl"
    res, _ = _build(workspace, import_reflexion=[str(logs)])
    rows = _rows(res)
    assert rows and {split_of(r["task_id"]) for r in rows} == {"train"}
    sources = res.counts["sources"]
    # Reflexion's logs cover eval-split questions too: they are skipped, never trained on
    assert sources["reflexion"]["eval_split_skipped"] > 0 and sources["reflexion"]["kept"] > 0
    assert any(r["memory"] and r["source"].startswith("reflexion") for r in rows)  # succeeded after reflections
    assert any(r["source"] == "expert+hint" for r in rows) and any(r["source"] == "expert" for r in rows)
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert manifest["kind"] == "actor"


def test_prompts_match_what_collect_sends(workspace):
    """Replay one task's rows through run_episode with a scripted actor: each call's messages equal the row's."""
    from retroformer_cli.agents.actor import run_episode
    from retroformer_cli.agents.prompts.base import get_prompts
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv
    from retroformer_cli.llm.base import GenerationConfig
    from retroformer_cli.testing.fake_llm import FakeLLM

    res, data = _build(workspace, expert_reflection_share=1.0)
    rows = _rows(res)
    task = rows[0]["task_id"]
    steps = sorted((r for r in rows if r["task_id"] == task), key=lambda r: r["step"])
    replies = iter([r["completion"] for r in steps])
    actor = FakeLLM(lambda messages, config: next(replies))
    env = HotPotQAEnv(data=str(data))
    result = asyncio.run(run_episode(env, task, actor, get_prompts("hotpotqa", few_shot=False), steps[0]["memory"],
                                     GenerationConfig(stop=("\nObservation",))))
    assert result.success
    sent = [[{"role": m.role, "content": m.content} for m in msgs] for msgs, _ in actor.calls]
    assert sent == [r["messages"] for r in steps]
    assert steps[0]["memory"] and "Reflections:" in steps[0]["messages"][1]["content"]
    assert "Here are some examples" not in steps[0]["messages"][0]["content"]  # no few-shot: a tuned actor


@pytest.mark.shared_data
def test_failed_replays_and_oracle_runs_are_refused(workspace):
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv
    from retroformer_cli.errors import UsageError

    data = shared_data("hotpotqa") / "dev.jsonl"
    env = HotPotQAEnv(data=str(data))
    task = next(t for t in env.task_ids() if split_of(t) == "train")
    prompts = __import__("retroformer_cli.agents.prompts.base", fromlist=["x"]).get_prompts("hotpotqa", few_shot=False)
    wrong = actor_data.Episode(task, [], [("guess", "Finish[certainly not this]")], "test")
    assert actor_data.replay(env, prompts, wrong) is None
    right = actor_data.Episode(task, [], actor_data.hotpotqa_expert(env, task), "test")
    assert actor_data.replay(env, prompts, right)
    workspace.write_manifest("diag", {"run": "diag", "env": "hotpotqa", "diagnostic": "oracle", "status": "completed"})
    with pytest.raises(UsageError, match="diagnostic"):
        actor_data.run_episodes(workspace, "diag")


def test_parse_scratchpad():
    text = "Thought 1: find it\nAction 1: Search[A b]\nObservation 1: x\nThought 2: done\nAction 2: Finish[y]\n"
    assert actor_data.parse_scratchpad(text) == [("find it", "Search[A b]"), ("done", "Finish[y]")]


def test_paired_mean_difference_and_values():
    from retroformer_cli.stages.learning import paired_mean_difference, value_at

    d = paired_mean_difference([1.0, 1.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0], resamples=2000)
    assert d["difference"] == pytest.approx(0.375) and d["won"] == 2 and d["lost"] == 0
    assert 0.0 <= d["ci_low"] <= d["difference"] <= d["ci_high"] <= 0.75 + 1e-9
    same = paired_mean_difference([0.2, 0.4], [0.2, 0.4], resamples=500)
    assert same["ci_low"] == same["ci_high"] == 0.0

    class T:
        def __init__(self, score, f1, success=False):
            self.score, self.info, self.success = score, {"f1": f1}, success

    by_k = {1: T(0.0, 0.2), 2: T(1.0, 1.0, True)}
    assert value_at(by_k, 1, "f1") == 0.2 and value_at(by_k, 2, "f1") == 1.0 and value_at(by_k, 3, "score") == 1.0
    assert value_at({1: T(1.0, 1.0, True)}, 2, "f1") == 1.0  # solved at trial 1: stays solved
