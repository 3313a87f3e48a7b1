"""The driver side of a ``--ray`` run: whole tasks out to the nodes' runners, trials back as they finish.

The driver keeps ``concurrency`` tasks in flight per node (one :class:`~retroformer_cli.cluster.runner.NodeRunner`
per node), hands every trial that streams back to collect's own writer and progress (so the store, manifest,
resume and token accounting are a local run's), and owns the faults: a runner whose process or node dies loses
only the trial in flight; its task goes again, elsewhere when it can, from the trials already received, up to
``env_retries`` times, and is then recorded as an ``env_error`` trial, as an env that keeps failing is.
Cancelling the coroutine (Ctrl-C, SIGTERM) cancels the cluster's tasks and kills the run's actors.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from retroformer_cli.cluster.node_models import start_node_models
from retroformer_cli.cluster.runner import NodeRunner, RunSetup, TaskOrder
from retroformer_cli.errors import BackendError, RetroformerError
from retroformer_cli.records import Trial
from retroformer_cli.workspace import now_iso

log = logging.getLogger("retroformer.cluster")
SUSPECT_S = 30.0  # a node whose runner died gets a new one only after this long (unless no node has one)


def lost_worker(exc: BaseException) -> bool:
    """The error says the worker (process, node, its objects) went away, not that the task itself failed."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        return isinstance(exc.cause, rex.RayError) and not isinstance(exc.cause, rex.RayTaskError)
    return isinstance(exc, rex.RayError) and not isinstance(exc, rex.TaskCancelledError)


class Runners:
    """The run's runner actors, one per alive node, and the tasks each is playing."""

    def __init__(self, session: Any, concurrency: int, local_models: bool, workspace_root: str):
        self.session, self.concurrency = session, max(1, concurrency)
        self.handles: dict[str, Any] = {}
        self.load: dict[str, int] = {}
        self.suspect: dict[str, float] = {}  # node -> when its runner was lost
        nodes = session.alive_nodes()
        self.model_servers = start_node_models(nodes, workspace_root) if local_models else {}
        self.workspace_root = workspace_root
        self.ensure()

    def ensure(self, include_suspect: bool = False) -> None:
        """A runner on every alive node that has none (a node that just lost one waits, unless none is left)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        now = time.monotonic()
        for node in self.session.alive_nodes():
            recently_lost = node in self.suspect and now - self.suspect[node] < SUSPECT_S
            if node in self.handles or (recently_lost and not include_suspect):
                continue
            if self.model_servers and node not in self.model_servers:
                self.model_servers.update(start_node_models([node], self.workspace_root))
            self.handles[node] = ray.remote(NodeRunner).options(
                num_cpus=0, max_concurrency=self.concurrency + 2, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(self.model_servers)
            self.load[node] = 0

    def pick(self, avoid: set[str]) -> str | None:
        """A node with a free slot, the least busy first, nodes this task was lost on last."""
        free = [n for n in self.handles if self.load[n] < self.concurrency]
        return min(free, key=lambda n: (n in avoid, self.load[n])) if free else None

    def lost(self, node: str) -> None:
        import ray

        handle = self.handles.pop(node, None)
        self.load.pop(node, None)
        self.suspect[node] = time.monotonic()
        if handle is not None:
            ray.kill(handle, no_restart=True)

    def close(self) -> None:
        """Close the runners' envs and kill the run's actors, after noting the model servers' engine counters in the
        session (for the manifest)."""
        import ray

        asked = {server.stats.remote(): node for node, server in self.model_servers.items()}
        answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=2) if asked else ([], [])
        for ref in answered:  # a server gone with its node, or too busy to answer, is left out
            try:
                stats = ray.get(ref)
            except Exception:
                continue
            if any(stats.values()):
                self.session.engine_stats[asked[ref]] = stats
        closing = [handle.close.remote() for handle in self.handles.values()]  # their envs (and env workers)
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=2)
        for handle in [*self.handles.values(), *self.model_servers.values()]:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone with its node
                pass
        self.handles, self.model_servers = {}, {}


@dataclass
class _TaskState:
    task_id: str
    history: list[Trial]
    losses: int = 0  # workers lost while playing the current trial
    avoid: set[str] = field(default_factory=set)
    started: str = ""


def lost_trial(setup: RunSetup, state: _TaskState, error: str) -> Trial:
    """The record of a trial whose worker was lost more than ``env_retries`` times (as an env failure's)."""
    cfg = setup.cfg
    done = sorted((t for t in state.history if not t.env_error), key=lambda t: t.trial)
    reflections = [t.reflection.text for t in done if t.reflection and t.reflection.text]
    memory = reflections[-cfg.memory_size:] if cfg.memory_size > 0 else []
    return Trial(run_id=cfg.run or "", env_id=cfg.env, task_id=state.task_id, trial=(done[-1].trial if done else 0) + 1,
                 instruction="", steps=[], success=False, score=0.0, terminated=False, truncated=False,
                 memory=memory, reflection=None, actor_model_id=setup.model_ids[0], reflector_model_id=setup.model_ids[1],
                 actor_prompt=[], info={}, env_error=error, env_attempts=state.losses, started_at=state.started,
                 finished_at=now_iso(), duration_s=0.0)


def run_setup(cfg: Any, workspace: Any, given: tuple[Any, Any], clients: tuple[Any, Any], actor_gen: Any,
              reflector_gen: Any) -> tuple[RunSetup, bool]:
    """What the nodes get of a collect run (its config with the data path made absolute, the clients passed in
    ready), and whether a role runs a local model (then each node gets a model server)."""
    import copy
    import uuid
    from pathlib import Path

    from retroformer_cli.llm.registry import find

    shipped = copy.deepcopy(cfg)
    if shipped.data and Path(shipped.data).expanduser().exists():  # workers may start in another folder
        shipped.data = str(Path(shipped.data).expanduser().resolve())
    actor, reflector = clients
    local = [given[0] is None and find(cfg.actor.model.strip(), cfg.actor, workspace, "--actor")[0].in_process,
             given[1] == "config" and find(cfg.reflector.model.strip(), cfg.reflector, workspace, "--reflector")[0].in_process]
    setup = RunSetup(key=f"{cfg.run}:{uuid.uuid4().hex}", cfg=shipped, workspace_root=str(Path(workspace.root).resolve()),
                     model_ids=(actor.model_id, reflector.model_id if reflector is not None else None),
                     actor_gen=actor_gen, reflector_gen=reflector_gen, actor=given[0], reflector=given[1])
    return setup, any(local)


def task_error(exc: BaseException, state: _TaskState, failure: dict[str, Any]) -> BaseException:
    """The error a task raised itself (not a lost worker): the run stops on it, as a local run does, and a model's
    error (a RetroformerError) is named in the manifest with its task and trial."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, RetroformerError):
        failure.setdefault("task_id", state.task_id)
        failure.setdefault("trial", max((t.trial for t in state.history if not t.env_error), default=0) + 1)
        failure.setdefault("error", f"{type(cause).__name__}: {cause}")
    return cause


async def collect_on_cluster(session: Any, setup: RunSetup, remaining: list[str], history: dict[str, list[Trial]],
                             on_trial: Callable[[Trial], Awaitable[None]], progress: Any, failure: dict[str, Any],
                             local_models: bool) -> None:
    """Play ``remaining`` tasks on the cluster; every trial goes through ``on_trial`` (collect's writer)."""
    import ray

    loop, main = asyncio.get_running_loop(), asyncio.current_task()
    try:  # SIGTERM stops as cleanly as Ctrl-C
        loop.add_signal_handler(signal.SIGTERM, lambda: main and main.cancel())
    except (NotImplementedError, RuntimeError):
        pass
    cfg = setup.cfg
    runners = Runners(session, cfg.concurrency, local_models, setup.workspace_root)
    pending = deque(_TaskState(t, list(history.get(t, []))) for t in remaining)
    streams: list[Any] = []

    async def drive(state: _TaskState, node: str) -> None:
        handle = runners.handles.get(node)
        if handle is None:  # its runner was lost after this task was given to it: the task waits for another
            pending.appendleft(state)
            return
        state.started = state.started or now_iso()
        order = TaskOrder(setup, state.task_id, [t.to_json() for t in state.history])
        stream = handle.play.options(num_returns="streaming").remote(order)
        streams.append(stream)
        try:
            async for ref in stream:
                trial = Trial.from_json(await ref)
                state.history.append(trial)
                state.losses, state.started = 0, now_iso()
                await on_trial(trial)
        except Exception as exc:
            if not lost_worker(exc):
                raise task_error(exc, state, failure) from None
            runners.lost(node)
            state.losses += 1
            state.avoid.add(node)
            error = f"worker lost: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("task %s: %s (attempt %d of %d)", state.task_id, error, state.losses, cfg.env_retries + 1)
            if state.losses <= max(0, cfg.env_retries):
                pending.appendleft(state)
                return
            trial = lost_trial(setup, state, error)
            state.history.append(trial)
            await on_trial(trial)
        finally:
            if node in runners.load:
                runners.load[node] -= 1
            streams.remove(stream)
        progress.task_done(any(t.success for t in state.history))

    running: set[asyncio.Task] = set()
    try:
        while pending or running:
            while pending and (node := runners.pick(pending[0].avoid)) is not None:
                runners.load[node] += 1
                running.add(asyncio.create_task(drive(pending.popleft(), node)))
            if not running:  # every runner was lost: wait for a node
                runners.ensure(include_suspect=True)
                if not runners.handles:
                    raise BackendError("The Ray cluster has no alive node left to run tasks on (--ray).")
                continue
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            runners.ensure()
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        for task in running:
            task.cancel()
        for stream in list(streams):
            try:
                ray.cancel(stream, force=False)
            except Exception:  # already finished or gone with its node; the kill below ends the rest
                pass
        await asyncio.gather(*running, return_exceptions=True)
        runners.close()
