"""The worker side: one :class:`NodeRunner` actor per node plays whole tasks (all their trials) and replays.

A runner keeps, per run setup, what collect keeps in one process: a pool of envs built with ``envs.make_for`` from
the run's config (so the data path must be readable on the node), the actor and reflector clients (endpoints
built here from the config, local models through the node's :class:`~retroformer_cli.cluster.node_models.NodeModels`)
and the prompts. Each task runs through the same ``agents.reflexion.run_task`` as a local run; its trials stream
back to the driver as they finish, and the driver alone writes them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from retroformer_cli.cluster.node_models import NodeModelClient

_DONE = object()


@dataclass
class RunSetup:
    """What every node needs to play a run's episodes. ``actor``/``reflector``: a ready client shipped from the
    driver (tests' scripted ones), else built from ``cfg`` on the node (``reflector="config"``)."""

    key: str  # one per run and models: the runner's cache key
    cfg: Any  # CollectConfig, data path made absolute
    workspace_root: str
    model_ids: tuple[str, str | None]  # (actor, reflector) as the driver's manifest records them
    actor_gen: Any  # GenerationConfig of each role (collect's generation_config)
    reflector_gen: Any
    actor: Any = None
    reflector: Any = "config"


@dataclass
class TaskOrder:
    """Play the rest of ``task_id``: ``history`` holds its trials on disk or already streamed back (as JSON)."""

    setup: RunSetup
    task_id: str
    history: list[dict] = field(default_factory=list)


@dataclass
class ReplayOrder:
    """Replay ``task_id`` once with ``memory`` (ppo's online reward); the outcome goes back."""

    setup: RunSetup
    task_id: str
    memory: list[str]


@dataclass
class _Played:
    """One run setup on this node: its envs, clients and prompts."""

    pool: Any  # agents.env_threads.EnvPool, as a local run's
    spec: Any  # the env's EnvSpec
    actor: Any
    reflector: Any
    prompts: Any


class NodeRunner:
    """The body of the per-node Ray actor (async: its episodes share one event loop, as in a local collect)."""

    def __init__(self, model_servers: dict[str, Any]):
        self.model_servers = model_servers  # node id -> that node's NodeModels (local models only)
        self.setups: dict[str, _Played] = {}

    def _model_client(self, setup: RunSetup, role: str) -> Any:
        """The client of ``role`` ('actor' or 'reflector') on this node, from the run's config."""
        from retroformer_cli.llm import make_client
        from retroformer_cli.llm.registry import find
        from retroformer_cli.workspace import Workspace

        model_cfg, option = getattr(setup.cfg, role), f"--{role}"
        workspace = Workspace.open(setup.workspace_root)
        spec, _ = find((model_cfg.model or "").strip(), model_cfg, workspace, option)
        if spec.in_process:  # weights: the node's one model server
            import ray

            server = self.model_servers[ray.get_runtime_context().get_node_id()]
            return NodeModelClient(server, model_cfg, option, setup.model_ids[0 if role == "actor" else 1] or "")
        return make_client(model_cfg, workspace, option)

    def _setup(self, setup: RunSetup) -> _Played:
        if setup.key in self.setups:
            return self.setups[setup.key]
        from retroformer_cli.agents.env_threads import EnvPool
        from retroformer_cli.agents.prompts.base import get_prompts
        from retroformer_cli.config import fill_from_env
        from retroformer_cli.envs import get_spec, make_for
        from retroformer_cli.workspace import Workspace

        cfg = fill_from_env(setup.cfg)  # the job's runtime env carries OPENAI_API_KEY and friends
        cache_dir, spec = Workspace.open(setup.workspace_root).cache_dir, get_spec(cfg.env)
        concurrency = max(1, cfg.concurrency)
        first = make_for(cfg, cache_dir)  # the node's envs: built here from the run's config and data path
        pool = EnvPool(first, lambda: first.spawn() if spec.spawn else make_for(cfg, cache_dir),
                       min(concurrency, cfg.workers or concurrency))
        actor = setup.actor if setup.actor is not None else self._model_client(setup, "actor")
        reflector = setup.reflector
        if reflector == "config":
            reflector = self._model_client(setup, "reflector")
        if getattr(reflector, "diagnostic", False):  # an oracle reads the gold data of the node's env
            reflector.bind(first, spec)
        played = _Played(pool, spec, actor, reflector, get_prompts(cfg.env, cfg.few_shot))
        self.setups[setup.key] = played
        return played

    async def play(self, order: TaskOrder) -> AsyncIterator[dict]:
        """The task's remaining trials, each yielded (as JSON) as soon as it is played."""
        from retroformer_cli.agents.reflexion import TaskSpec, run_task
        from retroformer_cli.records import Trial

        played = self._setup(order.setup)
        cfg = order.setup.cfg
        spec = TaskSpec(run_id=cfg.run or "", env_id=cfg.env, task_id=order.task_id, trials=cfg.trials,
                        memory_size=cfg.memory_size, seed=cfg.seed, env_timeout_s=cfg.env_step_timeout_s or None,
                        env_retries=max(0, cfg.env_retries))
        out: asyncio.Queue = asyncio.Queue()

        async def on_trial(trial: Trial) -> None:
            await out.put(trial.to_json())

        async def task() -> None:
            try:
                await run_task(spec, [Trial.from_json(d) for d in order.history], played.pool.acquire,
                               played.pool.release, played.actor, played.reflector, played.prompts,
                               order.setup.actor_gen, order.setup.reflector_gen, on_trial, played.spec.action_names)
            finally:
                await out.put(_DONE)

        running = asyncio.create_task(task())
        try:
            while (item := await out.get()) is not _DONE:
                yield item
            await running  # the task's own error (a model that failed for good) goes to the driver
        finally:
            running.cancel()

    async def replay(self, order: ReplayOrder) -> tuple[float, bool, dict[str, Any]] | None:
        """ppo's online replay: one episode of ``task_id`` with ``memory``; its (score, success, end info), or None
        when its env failed every attempt (as a local replay: retried from reset ``env_retries`` times)."""
        from retroformer_cli.agents.actor import play_with_retries, run_episode

        played = self._setup(order.setup)
        cfg = order.setup.cfg

        async def play(env: Any) -> Any:
            return await run_episode(env, order.task_id, played.actor, played.prompts, order.memory,
                                     order.setup.actor_gen, played.spec.action_names, seed=cfg.seed,
                                     env_timeout_s=cfg.env_step_timeout_s or None)

        tried = await play_with_retries(play, played.pool.acquire, played.pool.release, max(0, cfg.env_retries),
                                        f"online replay of task {order.task_id} on a node")
        result = tried.result
        return None if result is None else (result.score, result.success, result.info)

    def identity(self) -> dict[str, Any]:
        """The node and process this runner lives in."""
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def close(self) -> None:
        for played in self.setups.values():
            played.pool.close()
        self.setups = {}
