"""A prompt that outgrows the model's context ends the episode as truncated (the run goes on); a reflection
prompt that does not fit is retried once with the start of the trajectory cut, else the trial has no reflection.
Scripted clients count whitespace words as tokens; one test runs the local engine with a small context."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from retroformer_cli.config import CollectConfig
from retroformer_cli.errors import BackendError, ContextTooLong
from retroformer_cli.llm.base import GenerationConfig, Message
from retroformer_cli.testing.fake_llm import FakeLLM
from retroformer_cli.stages import collect
from retroformer_cli.stages.collect import load_trials

VERBOSE = "Thought: " + " ".join(["hmm"] * 400) + "\nAction: Search[Python]"
WRONG = "Thought: I guess.\nAction: Finish[definitely wrong]"


class SmallContext(FakeLLM):
    """FakeLLM with a context of ``limit`` words: a longer prompt (plus max_tokens) raises ContextTooLong."""

    def __init__(self, replies, limit: int, **kw):
        super().__init__(replies, **kw)
        self.limit, self.refused = limit, []

    async def agenerate(self, messages, config):
        words = sum(len(m.content.split()) for m in messages)
        if words + config.max_tokens > self.limit:
            self.refused.append(words)
            raise ContextTooLong(f"{words} + {config.max_tokens} > {self.limit}", prompt_tokens=words,
                                 context_length=self.limit, max_tokens=config.max_tokens)
        return await super().agenerate(messages, config)


def first_task_rambles(task_ids):
    """The actor writes a 400-word thought on the first task (its next prompt overflows), answers wrong on others."""

    def reply(messages, config):
        if messages[-1].content == "Reflection:":
            return "I rambled. Next time I will search once and answer."
        return VERBOSE if _question_task(messages) == task_ids[0] else WRONG

    return reply


def _question_task(messages) -> str:
    return QUESTIONS.get(messages[1].content.split("Question:")[1].split("\n")[0].strip(), "")


QUESTIONS: dict[str, str] = {}


def _task_ids(n: int) -> list[str]:
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv

    env = HotPotQAEnv()
    ids = list(env.task_ids())[:n]
    for tid in ids:
        QUESTIONS[env.get_question(tid).question.strip()] = tid
    return ids


def _collect(workspace, actor, reflector, run="ctx"):
    res = collect.run(CollectConfig(trials=2, tasks=2, run=run), workspace, actor=actor, reflector=reflector)
    trials = {(t.task_id, t.trial): t for t in load_trials(workspace, run)}
    return res, trials


def test_actor_overflow_truncates_the_trial_and_the_reflection_is_cut(workspace):
    ids = _task_ids(2)
    actor = SmallContext(first_task_rambles(ids), limit=900, model_id="actor")
    reflector = SmallContext(first_task_rambles(ids), limit=600, model_id="reflector")
    res, trials = _collect(workspace, actor, reflector)
    assert res.status == "completed" and workspace.read_manifest("ctx")["status"] == "completed"
    assert set(trials) == {(t, k) for t in ids for k in (1, 2)}  # every trial of both tasks is there
    for k in (1, 2):
        t = trials[(ids[0], k)]
        assert t.truncated and not t.terminated and not t.success and t.score == 0.0 and t.env_error is None
        assert t.info["truncated_reason"] == "context_too_long"
        assert t.info["overflow_prompt_tokens"] > 500 and t.info["overflow_context_length"] == 900
        assert len(t.steps) == 1 and t.steps[0].action == "Search[Python]"  # the step played is kept
        other = trials[(ids[1], k)]
        assert other.terminated and not other.truncated and "truncated_reason" not in other.info
    refl = trials[(ids[0], 1)].reflection
    assert refl is not None and refl.truncated_scratchpad and refl.text.startswith("I rambled")
    user = refl.prompt[1]["content"]
    assert "[earlier steps omitted]" in user and "Action 1: Search[Python]" in user and "Question:" in user
    assert "hmm hmm" not in user
    assert trials[(ids[0], 2)].memory == [refl.text]
    assert not trials[(ids[1], 1)].reflection.truncated_scratchpad
    assert len(reflector.refused) == 1  # refused once, then the cut prompt fit
    lines = [json.loads(x) for x in res.trials_path.read_text().splitlines()]
    assert sorted(x["reflection"]["truncated_scratchpad"] for x in lines if x["reflection"]) == [False, True]


def test_reflection_that_never_fits_leaves_the_trial_without_one(workspace):
    ids = _task_ids(2)
    actor = SmallContext(first_task_rambles(ids), limit=900)
    reflector = SmallContext(first_task_rambles(ids), limit=300)  # not even the instructions fit
    res, trials = _collect(workspace, actor, reflector, run="noreflect")
    assert res.status == "completed" and len(trials) == 4
    assert all(t.reflection is None for t in trials.values())
    assert all(t.memory == [] for (_, k), t in trials.items() if k == 2)


def test_first_prompt_too_long_records_an_empty_truncated_episode(workspace):
    ids = _task_ids(2)
    actor = SmallContext([WRONG], limit=300)
    res, trials = _collect(workspace, actor, FakeLLM(["Try harder."]), run="tiny")
    assert res.status == "completed" and len(trials) == 4
    for t in trials.values():
        assert t.truncated and t.steps == [] and t.info["truncated_reason"] == "context_too_long"
        assert t.actor_prompt  # the prompt that did not fit is on record
    assert {t.task_id for t in trials.values()} == set(ids)


def test_old_reflection_lines_still_load():
    from retroformer_cli.records import Reflection, Trial

    line = {"run_id": "r", "env_id": "hotpotqa", "task_id": "t", "trial": 1, "instruction": "", "steps": [],
            "success": False, "score": 0.0, "terminated": True, "truncated": False, "memory": [],
            "reflection": {"text": "x", "prompt": [], "model_id": "m"}, "actor_model_id": "a",
            "reflector_model_id": "m", "actor_prompt": []}
    assert Trial.from_json(line).reflection == Reflection(text="x", prompt=[], model_id="m")


# ---------------------------------------------------------------------------------------------- OpenAI-compatible
@pytest.mark.parametrize("status,body,prompt,context", [
    (400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested 2100 "
                                "tokens (2004 in the messages, 96 in the completion).", "code": None}}, 2004, 2048),
    (400, {"error": {"message": "'max_tokens' is too large: 96. This model's maximum context length is 1024 tokens "
                                "and your request has 1000 input tokens (96 > 1024 - 1000)."}}, 1000, 1024),
    (400, {"error": {"message": "the request exceeds the available context size, try increasing it",
                     "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}, None, None),
    (422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. Given: 2000 "
                    "`inputs` tokens and 96 `max_new_tokens`"}, 2000, 2048),
    (400, {"error": {"message": "too long", "code": "context_length_exceeded"}}, None, None),
])
def test_openai_context_errors_are_typed(status, body, prompt, context):
    err = _openai_error(status, body)
    assert isinstance(err, ContextTooLong) and "does not fit the context" in str(err)
    assert err.prompt_tokens == prompt and err.context_length == context


def test_openai_other_400s_stay_plain_backend_errors():
    err = _openai_error(400, {"error": {"message": "Invalid value for 'temperature'."}})
    assert isinstance(err, BackendError) and not isinstance(err, ContextTooLong)


def _openai_error(status: int, body: dict) -> BackendError:
    from retroformer_cli.llm.openai_compat import OpenAICompatClient

    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(status, json=body)

    client = OpenAICompatClient("m", base_url="http://127.0.0.1:9/v1", backoff_base_s=0.01, backoff_max_s=0.01)
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))

    async def go():
        try:
            await client.agenerate([Message("user", "hi")], GenerationConfig(max_tokens=96))
        finally:
            await client.aclose()

    with pytest.raises(BackendError) as info:
        asyncio.run(go())
    assert len(calls) == 1  # never retried
    return info.value


# ---------------------------------------------------------------------------------------------- the local engine
def test_local_engine_overflow_ends_the_episode_not_the_run(workspace, tiny, monkeypatch):
    pytest.importorskip("torch")
    from retroformer_cli.agents.prompts.base import get_prompts
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv
    from retroformer_cli.llm.hf_local import HFLocalClient

    client = HFLocalClient(str(tiny["base"]), cache_dir=workspace.cache_dir, threads=1, max_batch_size=2).load()
    env, prompts = HotPotQAEnv(), get_prompts("hotpotqa")
    ids = list(env.task_ids())[:2]
    longest = max(len(client.encode(prompts.actor_messages(env.reset(options={"task_id": t})[0], [], "", 1)))
                  for t in ids)
    # room for the first prompt and a little more: a later step's prompt (or the reflection's) overflows
    monkeypatch.setattr(client.engine, "context_length", longest + 40)
    with pytest.raises(ContextTooLong) as info:  # the backend-neutral error, with the counts
        client.generate([Message("user", "x " * (longest + 40))], GenerationConfig(max_tokens=8))
    assert info.value.prompt_tokens > longest and info.value.context_length == longest + 40
    cfg = CollectConfig(trials=2, tasks=2, run="local", max_steps=6)
    cfg.actor.max_tokens = cfg.reflector.max_tokens = 16
    res = collect.run(cfg, workspace, actor=client, reflector=client)
    assert res.status == "completed"
    trials = load_trials(workspace, "local")
    assert {t.task_id for t in trials} == set(ids) and len(trials) == 4  # a random tiny model never answers right
    overflowed = [t for t in trials if t.info.get("truncated_reason") == "context_too_long"]
    assert overflowed and all(t.truncated and not t.success for t in overflowed)
    assert all(t.info["overflow_context_length"] == longest + 40 and t.info["overflow_prompt_tokens"] > 0
               for t in overflowed)
