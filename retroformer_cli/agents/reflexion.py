"""The Reflexion loop: trials 1..K at one task; after a failed trial the reflector writes a reflection
from the trajectory, and the latest ``memory_size`` reflections go into the next trial's prompt.

The reflector is pluggable: ``None`` (ReAct baseline: no reflections), a frozen model (Reflexion) or a
trained checkpoint (Retroformer) — all are just an :class:`LLMClient`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from retroformer_cli.agents.actor import EpisodeResult, play_with_retries, run_episode
from retroformer_cli.agents.prompts.base import PromptSet
from retroformer_cli.errors import ContextTooLong
from retroformer_cli.llm.base import GenerationConfig, LLMClient, Usage, apply_stop
from retroformer_cli.records import Reflection, Trial
from retroformer_cli.workspace import now_iso

REFLECTION_STOP = ("\nPrevious trial", "\nQuestion:", "\n\n")
log = logging.getLogger("retroformer.collect")


def outcome_line(result: EpisodeResult) -> str:
    if result.truncated:
        return "Observation: Ran out of steps before finishing."
    return "Observation: Answer is INCORRECT" if not result.success else "Observation: Answer is CORRECT"


SCRATCHPAD_CUT = "[earlier steps omitted]\n"


def cut_scratchpad(scratchpad: str, exc: ContextTooLong, prompt_chars: int) -> str:
    """The end of ``scratchpad`` (whole lines, after :data:`SCRATCHPAD_CUT`) short enough for the reflection
    prompt (``prompt_chars`` long) to fit: by the token counts in ``exc`` when the backend named them (with a
    margin), else a quarter of it. Empty when nothing would be left."""
    keep = len(scratchpad) // 4
    prompt, context = exc.prompt_tokens, exc.context_length
    if prompt and context:
        excess = prompt + (exc.max_tokens or 0) - context  # tokens to drop
        chars_per_token = prompt_chars / prompt
        keep = int(len(scratchpad) - 1.25 * (excess + 16) * chars_per_token) - len(SCRATCHPAD_CUT)
    if keep <= 0:
        return ""
    tail = scratchpad[-keep:]
    newline = tail.find("\n")
    tail = tail[newline + 1:] if newline != -1 else ""
    return SCRATCHPAD_CUT + tail if tail else ""


async def reflect(reflector: LLMClient, prompts: PromptSet, result: EpisodeResult,
                  gen: GenerationConfig) -> Reflection | None:
    """The reflector's reflection on a failed trial. A prompt too long for the reflector's context is retried once
    with the start of the trajectory cut (the task and the last steps kept; ``truncated_scratchpad``); when even
    that does not fit, there is no reflection (None) and the run goes on."""
    scratchpad, cut = result.scratchpad, False
    t0 = time.perf_counter()
    while True:
        messages = prompts.reflection_messages(result.first_observation, scratchpad, outcome_line(result))
        try:
            out = await reflector.agenerate(messages, gen)
            break
        except ContextTooLong as exc:
            shorter = "" if cut else cut_scratchpad(scratchpad, exc, sum(len(m.content) for m in messages))
            if not shorter:
                log.warning("the reflection prompt does not fit the reflector's context%s; no reflection: %s",
                            " even with the trajectory cut" if cut else "", exc)
                return None
            scratchpad, cut = shorter, True
    text, _ = apply_stop(out.text, REFLECTION_STOP)
    text = text.strip()
    if text.lower().startswith("reflection:"):
        text = text[len("reflection:"):].strip()
    return Reflection(text=text, prompt=[{"role": m.role, "content": m.content} for m in messages],
                      model_id=reflector.model_id, prompt_tokens=out.usage.prompt_tokens,
                      completion_tokens=out.usage.completion_tokens, cached_tokens=out.usage.cached_tokens,
                      latency_ms=round((time.perf_counter() - t0) * 1000, 2), truncated_scratchpad=cut)


@dataclass
class TaskSpec:
    run_id: str
    env_id: str
    task_id: str
    trials: int
    memory_size: int
    seed: int
    env_timeout_s: float | None = None  # a hung env reset/step fails after this long (its worker is replaced)
    env_retries: int = 2  # replays of an episode whose env failed, before the trial is recorded as an env error


async def run_task(spec: TaskSpec, history: Sequence[Trial], acquire_env: Callable[[], Awaitable[Any]],
                   release_env: Callable[[Any], None], actor: LLMClient, reflector: LLMClient | None,
                   prompts: PromptSet, actor_gen: GenerationConfig, reflector_gen: GenerationConfig,
                   on_trial: Callable[[Trial], Awaitable[None]], action_names: Sequence[str] = ()) -> list[Trial]:
    """Run the remaining trials of one task. ``history`` holds trials already on disk (resume).

    An episode whose env fails (its worker crashed or hung, it raised) is replayed from reset up to
    ``spec.env_retries`` times; if it still fails, the trial is recorded with ``env_error`` (not the agent's
    failure) and the task stops there; ``--resume`` replays it."""
    done = sorted(history, key=lambda t: t.trial)
    while done and done[-1].env_error:  # the env failed last time: play that trial again
        done.pop()
    reflections = [t.reflection.text for t in done if t.reflection and t.reflection.text]
    if done and (done[-1].success or done[-1].trial >= spec.trials):
        return []
    start = done[-1].trial + 1 if done else 1
    new: list[Trial] = []
    for k in range(start, spec.trials + 1):
        memory = reflections[-spec.memory_size:] if spec.memory_size > 0 else []
        started, t0 = now_iso(), time.perf_counter()

        async def play(env: Any) -> EpisodeResult:
            return await run_episode(env, spec.task_id, actor, prompts, memory, actor_gen, action_names,
                                     seed=spec.seed, env_timeout_s=spec.env_timeout_s)

        tried = await play_with_retries(play, acquire_env, release_env, spec.env_retries,
                                        f"task {spec.task_id} trial {k}")
        attempts, spent, result = tried.attempts, tried.spent, tried.result
        if result is None:
            exc = tried.failure
            trial = Trial(
                run_id=spec.run_id, env_id=spec.env_id, task_id=spec.task_id, trial=k, instruction="",
                steps=list(exc.steps), success=False, score=0.0, terminated=False, truncated=False,
                memory=list(memory), reflection=None, actor_model_id=actor.model_id,
                reflector_model_id=reflector.model_id if reflector else None, actor_prompt=[],
                info={}, prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens,
                cached_tokens=spent.cached_tokens, env_error=str(exc), env_attempts=attempts,
                started_at=started, finished_at=now_iso(), duration_s=round(time.perf_counter() - t0, 3))
            await on_trial(trial)
            new.append(trial)
            return new
        result.usage.add(spent)
        reflection = None
        # No reflection after a success or after the last trial: nothing would read it.
        if reflector is not None and not result.success and k < spec.trials:
            if getattr(reflector, "diagnostic", False):  # an oracle (agents/oracle.py): gold data, no model call
                reflection = reflector.reflection(spec.task_id)  # type: ignore[attr-defined]
            else:
                reflection = await reflect(reflector, prompts, result, reflector_gen)
            if reflection is not None:  # None: the trajectory did not fit the reflector's context
                reflections.append(reflection.text)
        trial = Trial(
            run_id=spec.run_id, env_id=spec.env_id, task_id=spec.task_id, trial=k, instruction=result.instruction,
            steps=result.steps, success=result.success, score=result.score, terminated=result.terminated,
            truncated=result.truncated, memory=list(memory), reflection=reflection,
            actor_model_id=actor.model_id, reflector_model_id=reflector.model_id if reflector else None,
            actor_prompt=result.actor_prompt, info=result.info,
            prompt_tokens=result.usage.prompt_tokens + (reflection.prompt_tokens if reflection else 0),
            completion_tokens=result.usage.completion_tokens + (reflection.completion_tokens if reflection else 0),
            cached_tokens=result.usage.cached_tokens + (reflection.cached_tokens if reflection else 0),
            env_attempts=attempts, started_at=started, finished_at=now_iso(), duration_s=round(time.perf_counter() - t0, 3),
        )
        await on_trial(trial)  # durable on disk before the next trial starts
        new.append(trial)
        if result.success:
            break
    return new
