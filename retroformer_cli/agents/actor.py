"""The ReAct actor: one Thought + one Action per model call, the environment answers with an Observation.

Works with chat and completion models alike: the prompt ends with ``Thought N:``, the reply is cut at
``Observation`` on our side (a chat API may ignore ``stop``), and parsing is tolerant, so a reply with
no usable action becomes an invalid step with a helpful observation rather than a crash.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Sequence

from retroformer_cli.agents.env_threads import TooManyHungEnvs, call_bounded
from retroformer_cli.agents.prompts.base import PromptSet
from retroformer_cli.errors import ContextTooLong, DataError, RetroformerError, UsageError
from retroformer_cli.llm.base import GenerationConfig, LLMClient, Usage, apply_stop
from retroformer_cli.records import Step

_ACTION_LABEL = re.compile(r"^\s*Action\s*\d*\s*:\s*(.*)$", re.IGNORECASE | re.MULTILINE)
_THOUGHT_LABEL = re.compile(r"^\s*Thought\s*\d*\s*:\s*", re.IGNORECASE)
_BARE_ACTION = re.compile(r"\b([A-Za-z_]+)\s*\[([^\]\n]*)\]?")
STOP = ("\nObservation", "\nThought", "\nQuestion:", "\n\n")  # sent to backends: end after the action line
_PARSE_CUT = ("\nObservation", "\nQuestion:")  # a reply from a backend that ignored STOP: drop invented turns
log = logging.getLogger("retroformer.collect")


@dataclass
class ParsedReply:
    thought: str
    action: str | None  # None: no action could be found


def parse_reply(text: str, action_names: Sequence[str] = ()) -> ParsedReply:
    """Split a model reply into thought and action.

    Accepts ``Thought 3: ...\\nAction 3: Search[x]``, a reply that continues after ``Thought 3:`` directly,
    an action on the same line as the thought, or a bare ``Search[x]`` when the label is missing.
    """
    text, _ = apply_stop(text, _PARSE_CUT)
    text = _THOUGHT_LABEL.sub("", text.strip(), count=1)
    m = _ACTION_LABEL.search(text)
    if m:
        thought = text[: m.start()].strip()
        action = m.group(1).strip()
        return ParsedReply(thought=_one_line(thought), action=action or None)
    names = {n.lower() for n in action_names}
    for bare in _BARE_ACTION.finditer(text):
        if not names or bare.group(1).lower() in names:
            return ParsedReply(thought=_one_line(text[: bare.start()]), action=bare.group(0).strip())
    return ParsedReply(thought=_one_line(text), action=None)


def _one_line(s: str) -> str:
    return " ".join(s.split())


def scratchpad_step(n: int, thought: str, action: str, observation: str) -> str:
    """One step as the actor's next prompt shows it (the actor SFT data replays trajectories with it too)."""
    return f"Thought {n}: {thought}\nAction {n}: {action}\nObservation {n}: {_one_line(observation)}\n"


class EnvFailure(RetroformerError):
    """The environment (not the agent, not the model) failed: its worker died or hung, or it raised.
    ``steps`` and ``usage`` hold what the failed episode played and spent (set by :func:`run_episode`)."""

    steps: list[Step] = []
    usage: Usage = Usage()


async def _env_call(what: str, call: Any, timeout_s: float | None, bounded: bool = False) -> Any:
    """``call`` awaited within ``timeout_s`` (``bounded``: the call applies it itself)."""
    try:
        return await asyncio.wait_for(call, timeout_s) if timeout_s and not bounded else await call
    except asyncio.TimeoutError:
        # an async env's worker process is replaced (ALFWorld); a sync env's instance is retired (env_threads)
        raise EnvFailure(f"the env did not answer {what} within {timeout_s:g} s") from None
    except (UsageError, DataError, TooManyHungEnvs):
        raise  # the user's mistake (unknown task id, bad data), or an env that keeps hanging: no retry helps
    except RetroformerError as exc:
        raise EnvFailure(f"{what} failed: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any env bug becomes an env failure, never a crashed run
        raise EnvFailure(f"{what} raised {type(exc).__name__}: {exc}") from exc


async def env_reset(env: Any, timeout_s: float | None = None, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Envs whose engine is slow (ALFWorld runs in worker processes) declare ``asynchronous`` in their spec and
    offer ``areset``/``astep``, so the event loop, and the LLM calls of other episodes, never wait on them. The
    others step in a thread of their own (:mod:`~retroformer_cli.agents.env_threads`). Either way a call that
    takes over ``timeout_s`` (``None``/0: no bound, a sync env then steps on the event loop) and any failure
    become :class:`EnvFailure`."""
    if _asynchronous(env):
        return await _env_call("reset", env.areset(**kwargs), timeout_s)
    return await _env_call("reset", call_bounded(env, env.reset, timeout_s, **kwargs), timeout_s, True)


async def env_step(env: Any, action: str, timeout_s: float | None = None) -> tuple[str, float, bool, bool, dict[str, Any]]:
    if _asynchronous(env):
        return await _env_call("step", env.astep(action), timeout_s)
    return await _env_call("step", call_bounded(env, env.step, timeout_s, action), timeout_s, True)


def _asynchronous(env: Any) -> bool:
    """Whether the env's spec (``EnvSpec.asynchronous``) promises ``areset``/``astep``."""
    from retroformer_cli.envs import spec_of

    spec = spec_of(env)
    return spec is not None and spec.asynchronous


def context_overflow_info(exc: ContextTooLong) -> dict[str, Any]:
    """What a trial's ``info`` records when a prompt outgrew the model's context (the episode ends truncated)."""
    info: dict[str, Any] = {"truncated_reason": "context_too_long"}
    for key in ("prompt_tokens", "context_length", "max_tokens"):
        if getattr(exc, key, None) is not None:
            info[f"overflow_{key}"] = getattr(exc, key)
    return info


def _overflowed(end_info: dict[str, Any], exc: ContextTooLong, task_id: str, n: int) -> dict[str, Any]:
    log.warning("task %s: the actor's prompt at step %d outgrew its context; the episode ends truncated: %s",
                task_id, n, exc)
    return {**end_info, **context_overflow_info(exc)}


@dataclass
class EpisodeResult:
    """One episode as the actor played it: its steps and outcome, and what the reflector needs after a failure."""

    steps: list[Step]
    success: bool
    score: float  # info["score"] at the end (HotPotQA: exact match; WebShop: the purchase reward; ALFWorld: 0 or 1)
    terminated: bool  # the episode ended in the env (an answer, a purchase, a win)
    truncated: bool  # the step limit, or a prompt past the context (info["truncated_reason"])
    instruction: str
    first_observation: str
    scratchpad: str  # the trajectory as the actor saw it: the reflector's input
    info: dict[str, Any]
    actor_prompt: list[dict[str, str]]
    usage: Usage = field(default_factory=Usage)


async def run_episode(env: Any, task_id: str, actor: LLMClient, prompts: PromptSet, memory: Sequence[str],
                      gen: GenerationConfig, action_names: Sequence[str] = (), seed: int | None = None,
                      env_timeout_s: float | None = None) -> EpisodeResult:
    """Play one episode of ``task_id`` with the actor; ``memory`` holds the reflections to show. A failing env
    raises :class:`EnvFailure` (the caller replays the episode). A prompt that outgrows the actor's context
    (:class:`ContextTooLong`) ends the episode as truncated, unsolved, with ``info["truncated_reason"]``; the steps
    played so far are kept."""
    steps: list[Step] = []
    usage = Usage()
    try:
        obs, info = await env_reset(env, env_timeout_s, seed=seed, options={"task_id": task_id})
        first_obs = obs
        instruction = info.get("instruction", obs)
        scratchpad = ""
        first_prompt: list[dict[str, str]] = []
        end_info: dict[str, Any] = {}
        terminated = truncated = overflow = False
        n = 0
        while not (terminated or truncated):
            n += 1
            messages = prompts.actor_messages(first_obs, memory, scratchpad, n)
            if not first_prompt:
                first_prompt = [{"role": m.role, "content": m.content} for m in messages]
            t0 = time.perf_counter()
            try:
                out = await actor.agenerate(messages, gen)
            except ContextTooLong as exc:
                end_info, truncated, overflow = _overflowed(end_info, exc, task_id, n), True, True
                break
            usage.add(out.usage)
            raw = out.text
            parsed = parse_reply(raw, action_names)
            step_usage = Usage(out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_tokens)
            margins = [out.min_margin]
            if parsed.action is None and parsed.thought:
                # ReAct's two-call pattern: the model gave a thought but stopped; ask for the action alone.
                try:
                    follow = await actor.agenerate(prompts.actor_messages(first_obs, memory, scratchpad, n,
                                                                          parsed.thought), replace(gen, stop=("\n",)))
                except ContextTooLong as exc:
                    end_info, truncated, overflow = _overflowed(end_info, exc, task_id, n), True, True
                    break
                usage.add(follow.usage)
                step_usage.add(follow.usage)
                margins.append(follow.min_margin)
                raw += f"\nAction {n}:{follow.text}"
                action_text = follow.text.strip()
                if action_text:
                    action = parse_reply(action_text, action_names).action  # "Search[x]" or "Action 2: Search[x]"
                    if action is None:  # anything else is the action as written; the env judges it
                        action = parse_reply(f"Action: {action_text}", action_names).action
                    parsed = ParsedReply(parsed.thought, action)
            latency = (time.perf_counter() - t0) * 1000
            if parsed.action is None:
                # An unparsable reply still costs a step (the protocol's budget) and tells the model the format.
                obs, reward, terminated, truncated, end_info = await env_step(env, f"<no action: {parsed.thought[:80]}>",
                                                                              env_timeout_s)
                obs = f"Invalid reply: no action found. Reply with 'Thought {n}: ...' and 'Action {n}: {prompts.action_format}'."
                action, valid = "", False
            else:
                action, valid = parsed.action, True
                obs, reward, terminated, truncated, end_info = await env_step(env, action, env_timeout_s)
            steps.append(Step(thought=parsed.thought, action=action, observation=obs, reward=float(reward), valid=valid,
                              raw=raw, prompt_tokens=step_usage.prompt_tokens,
                              completion_tokens=step_usage.completion_tokens, latency_ms=round(latency, 2),
                              cached_tokens=step_usage.cached_tokens,
                              min_margin=min((m for m in margins if m is not None), default=None)))
            scratchpad += scratchpad_step(n, parsed.thought, action, obs)
    except EnvFailure as exc:
        exc.steps, exc.usage = steps, usage  # what the failed attempt played and spent
        raise
    return EpisodeResult(
        steps=steps, success=bool(end_info.get("success", False)) and not overflow,
        score=float(end_info.get("score", 0.0)),
        terminated=terminated, truncated=truncated, instruction=instruction, first_observation=first_obs,
        scratchpad=scratchpad, info={k: v for k, v in end_info.items() if k not in ("task_id", "instruction")},
        actor_prompt=first_prompt, usage=usage,
    )


@dataclass
class Attempts:
    """What :func:`play_with_retries` got: the episode, or (``result`` None) the last env failure."""

    result: EpisodeResult | None
    failure: EnvFailure | None
    attempts: int
    spent: Usage  # the tokens of the failed attempts


async def play_with_retries(play: Callable[[Any], Awaitable[EpisodeResult]], acquire_env: Callable[[], Awaitable[Any]],
                            release_env: Callable[[Any], None], retries: int, what: str) -> Attempts:
    """``play(env)`` (a :func:`run_episode`) on an env from the pool, replayed from reset on a (fresh, if the
    last one hung) env while the env fails, at most ``retries`` times more. Collect's trials and ppo's online
    replays both go through here."""
    spent, attempts = Usage(), 0
    while True:
        attempts += 1
        env = await acquire_env()
        try:
            return Attempts(await play(env), None, attempts, spent)
        except EnvFailure as exc:
            spent.add(exc.usage)
            log.warning("%s: env failure (attempt %d of %d): %s", what, attempts, retries + 1, exc)
            if attempts > retries:
                return Attempts(None, exc, attempts, spent)
        finally:
            release_env(env)  # a hung instance is retired by the pool, never lent again
