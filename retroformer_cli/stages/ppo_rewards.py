"""Reward functions for `retroformer ppo`, in the form TRL's ``GRPOTrainer`` calls them.

GRPO calls ``reward_func(prompts=..., completions=..., completion_ids=..., **columns)`` where ``columns``
are the other dataset columns, repeated once per generation (TRL 1.16, ``_calculate_rewards``), plus
``trainer_state``, ``log_extra`` and ``log_metric``. An ``async`` ``__call__`` is run by TRL on its own
event loop thread, so the online reward can run a whole group of episodes with ``asyncio.gather``.

* :class:`OfflineReward` — the paper's setting: the reward model's score of the generated reflection.
* :class:`OnlineReward` — the true return difference G(k+1) − G(k): the candidate reflection goes into the
  actor's memory (with the reflections trial k+1 would have seen), trial k+1 is replayed with a fresh
  environment through :func:`retroformer_cli.agents.actor.run_episode`, and the new value minus the value
  of the failed trial k is the reward. The value is the ``metric``: ``score`` (the env's return), ``success``
  (1/0) or ``f1`` (from the env's end-of-episode info, HotPotQA: the answer F1; an episode that ended without
  one, e.g. truncated before Finish, counts 0). Replays are cached by (env, task, memory incl. the candidate,
  actor); a cache line keeps the whole outcome (score, success, f1), so one replay serves every metric.

Nothing heavy is imported here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from retroformer_cli.agents.env_threads import EnvPool
from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.llm.base import GenerationConfig, LLMClient
from retroformer_cli.stages.common.reflections import clean_reflection

Scorer = Callable[[list[list[dict]], list[str]], list[float]]
METRICS = ("score", "success", "f1")  # --reward-metric
INFO_METRICS = ("f1",)  # read from the env's end-of-episode info (absent in envs that do not report them)


def outcome(score: float, success: bool, info: dict[str, Any] | None) -> dict[str, Any]:
    """What the replay cache keeps of an episode (or of a stored trial): enough to compute every metric."""
    out: dict[str, Any] = {"score": float(score), "success": bool(success)}
    for key in INFO_METRICS:
        v = (info or {}).get(key)
        out[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


def metric_value(metric: str, result: dict[str, Any]) -> float:
    """The ``metric`` of an :func:`outcome`: ``score``; ``success`` as 1.0/0.0; an info metric (``f1``), 0.0
    when the episode ended without it (truncated before Finish)."""
    if metric == "score":
        return float(result["score"])
    if metric == "success":
        return 1.0 if result["success"] else 0.0
    v = result.get(metric)
    return float(v) if v is not None else 0.0


class OfflineReward:
    """reward = scorer(reflection prompt, generated reflection); the prompt comes from the ``chat`` column."""

    __name__ = "reward_model"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self.calls = 0

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], chat: Sequence[list[dict]] | None = None,
                 **_: Any) -> list[float]:
        self.calls += 1
        texts = [clean_reflection(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
        convs = list(chat) if chat is not None else [[{"role": "user", "content": str(p)}] for p in prompts]
        return [float(s) for s in self.scorer(convs, texts)]


@dataclass
class _RunContext:
    """What replaying trial k+1 of one run needs: its env pool, actor, prompts and trials."""

    run: str
    env_id: str
    pool: EnvPool  # one instance per concurrent replay; a hung one is retired and replaced
    actor: LLMClient
    gen: GenerationConfig
    prompts: Any
    action_names: tuple[str, ...]
    memory_size: int
    seed: int
    trials: dict[tuple[str, int], Any]
    env_timeout_s: float | None = None  # the run's --env-step-timeout-s
    env_retries: int = 2  # the run's --env-retries


class OnlineReward:
    """reward = ``metric`` of the replayed trial k+1 with the candidate reflection − ``metric`` of trial k.

    ``actor`` overrides every run's actor (a spec string like ``--actor``, or a ready client in tests);
    ``None`` uses the actor model of each run's manifest. ``cache_path`` keeps replay outcomes across
    resumes (one JSON line per replay: score, success, f1 and the metric of the run that wrote it; lines of
    older versions with only ``score`` still serve ``metric="score"``); ``cache_glob`` also reads the files of
    other processes.
    """

    __name__ = "return_difference"

    def __init__(self, workspace: Any, actor: str | LLMClient | None = None, concurrency: int = 8,
                 memory_size: int | None = None, cache_path: Path | None = None, threads: int | None = None,
                 cache_glob: str | None = None, metric: str = "score", device: str | None = None,
                 ray: str | None = None):
        if metric not in METRICS:
            raise UsageError(f"Unknown --reward-metric '{metric}': choose {', '.join(METRICS)}.")
        self.metric = metric
        self.workspace = workspace
        self.actor_override = actor
        self.concurrency = max(1, concurrency)
        self.memory_size = memory_size
        self.threads = threads
        self.device = device  # where a local actor runs (ppo --device); None: each run's own setting
        self.cache: dict[str, dict[str, Any]] = {}  # key -> outcome (the keys a cache line had)
        self.episodes = 0  # replays actually run (cache misses)
        self.hits = 0
        self.env_errors = 0  # replays whose env failed every attempt (no reward)
        self._contexts: dict[str, _RunContext] = {}
        self._clients: dict[str, LLMClient] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._calls: set[asyncio.Task] = set()  # the __call__s running now (cancel() ends them)
        self._gate: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer = None
        self.cluster = None  # --ray: replays on the cluster's nodes (retroformer_cli.cluster.replays)
        if ray is not None:
            from retroformer_cli.cluster.replays import ClusterReplays

            self.cluster = ClusterReplays(ray, workspace, self.concurrency)
        if cache_path is not None:  # one file per process; every process reads all of them on resume
            import glob

            from retroformer_cli.store import JsonlWriter, read_jsonl

            for f in sorted(set(glob.glob(cache_glob or str(cache_path))) | {str(cache_path)}):
                if Path(f).is_file():
                    for rec in read_jsonl(f):
                        self.cache[rec["key"]] = {k: rec[k] for k in ("score", "success", *INFO_METRICS) if k in rec}
            self._writer = JsonlWriter(cache_path)

    # ------------------------------------------------------------------ setup per run
    def _client(self, model_cfg: Any) -> LLMClient:
        from retroformer_cli.llm import make_client

        key = json.dumps([model_cfg.model, model_cfg.base_url, model_cfg.api], sort_keys=True)
        if key not in self._clients:
            client = make_client(model_cfg, self.workspace, "--actor")
            if client is None:
                raise UsageError("The actor for online rewards cannot be 'none' (--actor).")
            self._clients[key] = client
        return self._clients[key]

    def context(self, run: str) -> _RunContext:
        if run in self._contexts:
            return self._contexts[run]
        from retroformer_cli.agents.actor import STOP as ACTOR_STOP
        from retroformer_cli.agents.prompts.base import get_prompts
        from retroformer_cli.config import CollectConfig, build_config, fill_from_env
        from retroformer_cli.envs import get_spec, make_for
        from retroformer_cli.stages.collect import generation_config, load_trials

        stored = dict(self.workspace.read_manifest(run).get("config") or {})
        for m in ("actor", "reflector"):  # secrets are never stored; they come back from the environment
            if isinstance(stored.get(m), dict):
                stored[m] = {k: v for k, v in stored[m].items() if k != "api_key"}
        known = {f.name for f in CollectConfig.__dataclass_fields__.values()}
        cfg = build_config(CollectConfig, None, base={k: v for k, v in stored.items() if k in known})
        if isinstance(self.actor_override, str):
            cfg.actor.model = self.actor_override
        if self.threads is not None:
            cfg.actor.threads = self.threads
        if self.device is not None:
            cfg.actor.device = self.device
        fill_from_env(cfg)
        trials = {(t.task_id, t.trial): t for t in load_trials(self.workspace, run)}
        self._check_metric(run, cfg.env, trials.values())
        actor = self.actor_override if (self.actor_override is not None and not isinstance(self.actor_override, str)) \
            else self._client(cfg.actor)
        first = make_for(cfg, self.workspace.cache_dir)
        spec = get_spec(cfg.env)
        pool = EnvPool(first, lambda: first.spawn() if spec.spawn else make_for(cfg, self.workspace.cache_dir))
        ctx = _RunContext(run=run, env_id=cfg.env, pool=pool, actor=actor,
                          gen=generation_config(cfg.actor, ACTOR_STOP), prompts=get_prompts(cfg.env, cfg.few_shot),
                          action_names=spec.action_names,
                          memory_size=self.memory_size if self.memory_size is not None else cfg.memory_size,
                          seed=cfg.seed, trials=trials, env_timeout_s=cfg.env_step_timeout_s or None,
                          env_retries=max(0, cfg.env_retries))
        if self.cluster is not None:
            shipped = None if isinstance(self.actor_override, (str, type(None))) else self.actor_override
            self.cluster.add_run(run, cfg, shipped, actor.model_id, ctx.gen)
        self._contexts[run] = ctx
        return ctx

    def _check_metric(self, run: str, env: str, trials: Any) -> None:
        """An info metric (``f1``) needs an env that reports it: EnvSpec declares no metrics, so the run's stored
        trials are probed (an env that has it puts it in every trial's end info)."""
        if self.metric not in INFO_METRICS:
            return
        trials = list(trials)
        if trials and not any(self.metric in (t.info or {}) for t in trials):
            raise UsageError(f"--reward-metric {self.metric}: run '{run}' (env {env}) reports no '{self.metric}' "
                             "in its trials; choose score or success.")

    def memory_for(self, ctx: _RunContext, task_id: str, trial: int, reflection: str) -> list[str]:
        """The memory trial k+1 would have shown, with the candidate in place of trial k's reflection."""
        earlier = [ctx.trials[(task_id, j)] for j in range(1, trial) if (task_id, j) in ctx.trials]
        texts = [t.reflection.text for t in earlier if t.reflection is not None and t.reflection.text]
        texts.append(reflection)
        return texts[-ctx.memory_size:] if ctx.memory_size > 0 else []

    # ------------------------------------------------------------------ reward
    def _key(self, ctx: _RunContext, task_id: str, memory: list[str]) -> str:
        blob = json.dumps([ctx.env_id, task_id, memory, ctx.actor.model_id, ctx.seed], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _cached(self, key: str) -> dict[str, Any] | None:
        """The cached outcome of a replay if it has this reward's metric (old lines only have ``score``)."""
        found = self.cache.get(key)
        return found if found is not None and self.metric in found else None

    async def replay_outcome(self, run: str, task_id: str, trial: int,
                             reflection: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """(:func:`outcome` of the replayed trial k+1 with the candidate, :func:`outcome` of the stored trial k).
        The first is None when the env failed every attempt (the run's ``env_retries``): nothing is cached."""
        ctx = self.context(run)
        base = ctx.trials.get((task_id, int(trial)))
        if base is None:
            raise DataError(f"Trial {trial} of task '{task_id}' is not in run '{run}': the prompt set and the "
                            "run's trials.jsonl disagree (rebuild the dataset).")
        old = outcome(base.score, base.success, base.info)
        memory = self.memory_for(ctx, task_id, int(trial), reflection)
        key = self._key(ctx, task_id, memory)
        cached = self._cached(key)
        if cached is not None:
            self.hits += 1
            return cached, old
        if key in self._inflight:  # an identical candidate in the same group: run once
            self.hits += 1
            return await asyncio.shield(self._inflight[key]), old
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            from retroformer_cli.agents.actor import play_with_retries, run_episode

            async def play(env: Any) -> Any:
                return await run_episode(env, task_id, ctx.actor, ctx.prompts, memory, ctx.gen, ctx.action_names,
                                         seed=ctx.seed, env_timeout_s=ctx.env_timeout_s)

            assert self._gate is not None
            async with self._gate:
                if self.cluster is not None:  # --ray: the same episode on a node, with the same env retries
                    played = await self.cluster.replay(run, task_id, memory)
                else:
                    tried = await play_with_retries(play, ctx.pool.acquire, ctx.pool.release, ctx.env_retries,
                                                    f"online replay of run {run} task {task_id} trial {int(trial) + 1}")
                    played = None if tried.result is None else (tried.result.score, tried.result.success,
                                                                tried.result.info)
            if played is None:  # the env failed every attempt: no reward (TRL gives it no advantage)
                self.env_errors += 1
                fut.set_result(None)
                return None, old
            new = outcome(*played)
            self.episodes += 1
            self.cache[key] = new
            if self._writer is not None:
                self._writer.append({"key": key, "run": run, "task_id": task_id, "trial": int(trial),
                                     "reflection": reflection, "metric": self.metric, **new})
            fut.set_result(new)
            return new, old
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._inflight.pop(key, None)

    async def replay(self, run: str, task_id: str, trial: int, reflection: str) -> tuple[float | None, float]:
        """(metric of the replayed trial k+1, None if its env failed; metric of trial k) for one candidate."""
        new, old = await self.replay_outcome(run, task_id, trial, reflection)
        return (metric_value(self.metric, new) if new is not None else None), metric_value(self.metric, old)

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], task_id: Sequence[str],
                       run: Sequence[str], trial: Sequence[int], log_metric: Callable | None = None,
                       **_: Any) -> list[float | None]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._gate, self._inflight = loop, asyncio.Semaphore(self.concurrency), {}
        me = asyncio.current_task()
        if me is not None:
            self._calls.add(me)
            me.add_done_callback(self._calls.discard)
        texts = [clean_reflection(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
        before, errors_before = self.episodes, self.env_errors
        pairs = await asyncio.gather(*[self.replay_outcome(r, t, k, x)
                                       for r, t, k, x in zip(run, task_id, trial, texts)])
        # a replay whose env failed every attempt has no reward: None, which TRL scores as no advantage
        deltas = [metric_value(self.metric, new) - metric_value(self.metric, old) if new is not None else None
                  for new, old in pairs]
        if log_metric is not None:
            played = [new for new, _ in pairs if new is not None]
            n = max(1, len(played))
            log_metric("online/episodes", float(self.episodes - before))
            log_metric("online/env_errors", float(self.env_errors - errors_before))
            # cache lines of older versions have no success: their score > 0 stands in (as before)
            log_metric("online/success", sum(1.0 for new in played if new.get("success", new["score"] > 0)) / n)
            log_metric("online/metric_delta_mean", sum(d for d in deltas if d is not None) / n)
        return deltas

    def devices(self) -> list[dict[str, Any]]:
        """Each actor client's model, device and dtype (for the checkpoint manifest)."""
        described = [c.describe() if hasattr(c, "describe") else {} for c in self._clients.values()]
        return [{k: d.get(k) for k in ("model", "device", "dtype")} for d in described]

    def cancel(self, wait_s: float = 3.0) -> None:
        """Cancel the reward calls in flight (TRL runs them on its own event loop thread) and wait up to
        ``wait_s`` for them to end: their model requests are dropped, a hung env step is left to its thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def cancel_all() -> None:  # on the loop's thread, where the calls come and go
            calls = list(self._calls)
            for task in calls:
                task.cancel()
            if calls:
                await asyncio.wait(calls, timeout=wait_s)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(wait_s + 1)
        except Exception:  # noqa: BLE001 - stopping anyway: the loop may already be gone
            pass

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    def close(self) -> None:
        for ctx in self._contexts.values():
            ctx.pool.close()
        for client in self._clients.values():
            if hasattr(client, "close"):
                client.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
