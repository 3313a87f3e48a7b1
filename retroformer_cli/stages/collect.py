"""`retroformer collect`: run the actor (and reflector) over tasks for several trials.

Python API::

    from retroformer_cli.config import CollectConfig
    from retroformer_cli.stages import collect
    from retroformer_cli.workspace import Workspace
    result = collect.run(CollectConfig(trials=2, tasks=2), Workspace.open("ws"))

Tasks run concurrently on one asyncio loop; every finished trial is one fsynced JSONL line, so an
interrupted run loses at most the episodes in flight and ``resume=True`` finishes exactly the rest.
"""

from __future__ import annotations

import asyncio
import platform
import signal
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from retroformer_cli import __version__
from retroformer_cli.agents.env_threads import EnvPool, close_env
from retroformer_cli.cluster.connect import join_cluster
from retroformer_cli.config import CollectConfig, to_dict
from retroformer_cli.envs import make_for
from retroformer_cli.errors import RetroformerError, UsageError
from retroformer_cli.llm.base import GenerationConfig, LLMClient
from retroformer_cli.records import Trial
from retroformer_cli.stages.common.progress import NullProgress, Progress
from retroformer_cli.stages.common.splits import split_of  # collect's train/eval split (1 task in 5 is eval)
from retroformer_cli.store import JsonlWriter, read_jsonl
from retroformer_cli.workspace import Workspace, git_revision, now_iso

SPLITS = ("all", "train", "eval")


def select_tasks(all_ids: list[str], cfg: CollectConfig) -> list[str]:
    if cfg.split not in SPLITS:
        raise UsageError(f"Unknown split '{cfg.split}' (--split): choose one of {', '.join(SPLITS)}.")
    if cfg.task_ids:
        known = set(all_ids)
        missing = [t for t in cfg.task_ids if t not in known]
        if missing:
            raise UsageError(f"{len(missing)} task id(s) not in the data (--task-ids), e.g. '{missing[0]}'.")
        ids = list(dict.fromkeys(cfg.task_ids))
    else:
        ids = list(all_ids)
    if cfg.split != "all":
        ids = [t for t in ids if split_of(t) == cfg.split]
    if cfg.tasks is not None:
        if cfg.tasks < 1:
            raise UsageError("--tasks must be at least 1.")
        ids = ids[: cfg.tasks]
    if not ids:
        raise UsageError("No tasks selected: check --split, --tasks and --task-ids.")
    return ids


def generation_config(m, stop: tuple[str, ...]) -> GenerationConfig:
    """A role's sampling settings (``cfg.actor`` / ``cfg.reflector``) as a request's GenerationConfig."""
    # Stop strings go to the backend so local generation ends early; replies are also cut on our side.
    return GenerationConfig(max_tokens=m.max_tokens, temperature=m.temperature, top_p=m.top_p, stop=stop,
                            seed=None)


def describe(client: LLMClient | None) -> dict[str, Any]:
    if client is None:
        return {"model_id": None, "backend": "none"}
    d = dict(client.describe()) if hasattr(client, "describe") else {}
    d.setdefault("model_id", client.model_id)
    return d


@dataclass
class CollectResult:
    run: str
    trials_path: Path
    tasks: int
    trials_written: int
    trials_total: int
    solved: int
    status: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["trials_path"] = str(self.trials_path)
        return d


class CollectReport:
    """Collect's counters (tasks done, solved, trials, tokens) as one task of a :class:`Progress`."""

    def __init__(self, progress: Progress):
        self.progress, self.handle, self.started = progress, None, False
        self.solved = self.trials = self.tokens = 0

    def info(self) -> str:
        return f"solved {self.solved} trials {self.trials} tokens {self.tokens}"

    def start(self, total_tasks: int, already_done: int) -> None:
        self.handle, self.started = self.progress.task("collect", total_tasks, completed=already_done), True
        if already_done:
            self.progress.log(self.handle, f"resuming: {already_done}/{total_tasks} task(s) already finished")

    def trial(self, trial: Trial) -> None:
        self.trials += 1
        self.tokens += trial.prompt_tokens + trial.completion_tokens
        self.progress.advance(self.handle, 0, info=self.info())
        self.progress.log(self.handle, f"task {trial.task_id} trial {trial.trial}: {'solved' if trial.success else 'failed'} "
                                       f"(score {trial.score:.2f}, {len(trial.steps)} steps)", detail=True)

    def task_done(self, solved: bool) -> None:
        self.solved += int(solved)
        self.progress.advance(self.handle, 1, info=self.info())

    def stop(self) -> None:
        if self.started:
            self.progress.finish(self.handle)
            self.started = False


def _check_run(cfg: CollectConfig, workspace: Workspace, resume: bool) -> str:
    """The run's name; a new run must not exist yet and a resumed one must."""
    if cfg.trials < 1:
        raise UsageError("--trials must be at least 1.")
    run_name = cfg.run or workspace.new_run_name(cfg.env)
    cfg.run = run_name
    manifest_path = workspace.manifest_path(run_name)
    if manifest_path.exists() and not resume:
        raise UsageError(f"Run '{run_name}' already exists in '{workspace.root}'.",
                         hint="pass --resume to continue it, or choose another --run name")
    if resume and not manifest_path.exists():
        raise UsageError(f"Cannot resume run '{run_name}': it does not exist in '{workspace.root}'.")
    return run_name


def _clients(cfg: CollectConfig, workspace: Workspace, actor: LLMClient | None,
             reflector: LLMClient | None | str) -> tuple[LLMClient, LLMClient | None]:
    """The actor and reflector clients: those passed in, else built from the config."""
    from retroformer_cli.llm import make_client, resolve_backend

    for model in (cfg.actor, cfg.reflector):  # an endpoint takes as many requests as collect runs episodes
        if model.concurrency is None:
            model.concurrency = max(1, cfg.concurrency)
    if actor is None:
        actor = make_client(cfg.actor, workspace, "--actor")
        if actor is None:
            raise UsageError("The actor cannot be 'none' (--actor).")
    if reflector == "config":
        same = resolve_backend(cfg.reflector, workspace, "--reflector") == resolve_backend(cfg.actor, workspace, "--actor")
        if same and resolve_backend(cfg.actor, workspace, "--actor")[0] == "hf":
            reflector = actor  # one in-process copy of the same weights serves both roles
        else:
            reflector = make_client(cfg.reflector, workspace, "--reflector")
    return actor, reflector


def _start_manifest(cfg: CollectConfig, workspace: Workspace, run_name: str, resume: bool, task_ids: list[str],
                    actor: LLMClient, reflector: LLMClient | None, cluster: Any = None) -> tuple[dict, dict]:
    """Write the manifest with a new running session (a resumed run keeps its earlier sessions and usage);
    ``cluster``: the Ray cluster the session runs on (address, nodes), kept in the session and at the top."""
    from retroformer_cli.agents.prompts.base import PROMPT_VERSION

    manifest = workspace.read_manifest(run_name) if resume else {
        "schema_version": 1, "kind": "run", "run": run_name, "env": cfg.env, "started_at": now_iso(),
        "sessions": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cached_prompt_tokens": 0},
    }
    manifest.update({
        "status": "running", "config": to_dict(cfg), "retroformer_version": __version__, "git_revision": git_revision(),
        "python": platform.python_version(), "platform": platform.platform(), "prompt_version": PROMPT_VERSION,
        "models": {"actor": describe(actor), "reflector": describe(reflector)}, "seed": cfg.seed,
        "task_ids": task_ids, "finished_at": None,
    })
    if getattr(reflector, "diagnostic", False):  # oracle runs: a diagnostic, never a reflector's result or training data
        manifest["diagnostic"] = reflector.model_id  # type: ignore[union-attr]
    else:
        manifest.pop("diagnostic", None)
    session = {"started_at": now_iso(), "finished_at": None, "status": "running", "resume": resume}
    manifest.pop("cluster", None)
    if cluster is not None:
        manifest["cluster"] = session["cluster"] = cluster.describe()
    manifest["sessions"].append(session)
    workspace.write_manifest(run_name, manifest)
    return manifest, session


def _end_session(manifest: dict, session: dict, status: str, counters: dict[str, int], failure: dict[str, Any],
                 clients: tuple[LLMClient, LLMClient | None], cluster: Any) -> None:
    """The manifest at the end of a session: token usage, the session's status, engine counters and error, and the
    models as they ran."""
    manifest["usage"]["prompt_tokens"] += counters["prompt"]
    manifest["usage"]["completion_tokens"] += counters["completion"]
    manifest["usage"]["cached_prompt_tokens"] = manifest["usage"].get("cached_prompt_tokens", 0) + counters["cached"]
    engines = cluster.engine_stats if cluster is not None else {  # --ray: each node's model server's
        role: client.stats() for role, client in zip(("actor", "reflector"), clients)
        if client is not None and hasattr(client, "stats")}
    session.update(finished_at=now_iso(), status=status, trials_written=counters["written"],
                   **({"engine_stats": engines} if any(engines.values()) else {}),
                   **({"error": failure} if failure else {}))
    if cluster is None:  # a local model resolved its weights (and kernel) while loading: record what ran
        manifest["models"] = {"actor": describe(clients[0]), "reflector": describe(clients[1])}
    manifest.update(status=status, finished_at=now_iso())


def run(cfg: CollectConfig, workspace: Workspace, *, resume: bool = False, progress: Progress | None = None,
        actor: LLMClient | None = None, reflector: LLMClient | None | str = "config",
        ray: str | None = None) -> CollectResult:
    """Collect trajectories. ``actor``/``reflector`` may be passed in (tests); else built from ``cfg``. ``ray``: on a
    Ray cluster (``local``, ``auto`` or an address; :mod:`retroformer_cli.cluster`)."""
    progress = CollectReport(progress or NullProgress())
    run_name = _check_run(cfg, workspace, resume)
    env = make_for(cfg, workspace.cache_dir)
    task_ids = select_tasks(list(env.task_ids()), cfg)

    from retroformer_cli.agents.prompts.base import get_prompts

    prompts = get_prompts(cfg.env, cfg.few_shot)
    given = (actor, reflector)  # --ray: what the nodes get (a ready client is shipped, a config is built there)
    actor, reflector = _clients(cfg, workspace, actor, reflector)
    if getattr(reflector, "diagnostic", False):  # an oracle reflector reads the gold data of this run's env
        from retroformer_cli.envs import get_spec

        reflector.bind(env, get_spec(cfg.env))  # type: ignore[union-attr]

    history: dict[str, list[Trial]] = defaultdict(list)
    trials_path = workspace.trials_path(run_name)
    if resume and trials_path.exists():
        for t in load_trials(workspace, run_name):
            history[t.task_id].append(t)
    cluster = join_cluster(ray)  # None without --ray
    manifest, session = _start_manifest(cfg, workspace, run_name, resume, task_ids, actor, reflector, cluster)

    counters = {"written": 0, "prompt": 0, "completion": 0, "cached": 0}
    writer = JsonlWriter(trials_path)

    write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trials-writer")

    async def on_trial(trial: Trial) -> None:
        # fsync takes milliseconds: run it off the event loop (one writer thread keeps lines in order)
        record = trial.to_json()
        await asyncio.get_running_loop().run_in_executor(write_thread, writer.append, record)
        counters["written"] += 1
        counters["prompt"] += trial.prompt_tokens
        counters["completion"] += trial.completion_tokens
        counters["cached"] += trial.cached_tokens
        progress.trial(trial)

    status = "failed"
    failure: dict[str, Any] = {}  # the episode whose error ended the run (an engine fault, an exhausted endpoint)
    t0 = time.perf_counter()
    try:
        asyncio.run(_collect_async(cfg, workspace, env, task_ids, history, actor, reflector, prompts, on_trial, progress,
                                   failure) if cluster is None else _collect_on_cluster(
            cluster, cfg, workspace, task_ids, history, given, (actor, reflector), on_trial, progress, failure))
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        write_thread.shutdown(wait=True)
        writer.close()
        progress.stop()
        _end_session(manifest, session, status, counters, failure, (actor, reflector), cluster)
        workspace.write_manifest(run_name, manifest)
        close_env(env)
        if cluster is not None:
            cluster.close()

    trials = [Trial.from_json(r) for r in read_jsonl(trials_path)] if trials_path.exists() else []
    solved = len({t.task_id for t in trials if t.success})
    result = CollectResult(run=run_name, trials_path=trials_path, tasks=len(task_ids), trials_written=counters["written"],
                           trials_total=len(trials), solved=solved, status=status, prompt_tokens=counters["prompt"],
                           completion_tokens=counters["completion"], cached_tokens=counters["cached"], seconds=round(time.perf_counter() - t0, 2))
    if status == "interrupted":
        raise CollectInterrupted(result)
    return result


class CollectInterrupted(RetroformerError):
    exit_code = 130

    def __init__(self, result: CollectResult):
        super().__init__(f"Interrupted: run '{result.run}' kept {result.trials_total} finished trial(s).",
                         hint=f"continue with: retroformer collect --run {result.run} --resume")
        self.result = result


async def _collect_async(cfg: CollectConfig, workspace: Workspace, first_env: Any, task_ids: list[str], history: dict[str, list[Trial]],
                         actor: LLMClient, reflector: LLMClient | None, prompts: Any,
                         on_trial: Callable[[Trial], Awaitable[None]], progress: CollectReport,
                         failure: dict[str, Any]) -> None:
    from retroformer_cli.agents.actor import STOP as ACTOR_STOP
    from retroformer_cli.agents.reflexion import REFLECTION_STOP, TaskSpec, run_task

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    try:  # SIGTERM stops as cleanly as Ctrl-C
        loop.add_signal_handler(signal.SIGTERM, lambda: main and main.cancel())
    except (NotImplementedError, RuntimeError):
        pass

    from retroformer_cli.envs import get_spec

    env_spec = get_spec(cfg.env)
    # A pool of environment instances, one per concurrent episode (capped by --workers); built lazily. A hung one
    # is retired and replaced (agents/env_threads.py).
    concurrency = max(1, cfg.concurrency)
    pool = EnvPool(first_env, lambda: first_env.spawn() if env_spec.spawn else make_for(cfg, workspace.cache_dir),
                   limit=max(1, min(concurrency, cfg.workers or concurrency)))
    acquire_env, release_env = pool.acquire, pool.release

    remaining = [t for t in task_ids if not _finished(history.get(t, []), cfg.trials)]
    progress.start(len(task_ids), len(task_ids) - len(remaining))
    gate = asyncio.Semaphore(concurrency)
    action_names = env_spec.action_names

    async def one(task_id: str) -> None:
        async with gate:
            spec = TaskSpec(run_id=cfg.run or "", env_id=cfg.env, task_id=task_id, trials=cfg.trials,
                            memory_size=cfg.memory_size, seed=cfg.seed, env_timeout_s=cfg.env_step_timeout_s or None,
                            env_retries=max(0, cfg.env_retries))
            written: list[Trial] = []

            async def on_task_trial(trial: Trial) -> None:
                written.append(trial)
                await on_trial(trial)

            try:
                new = await run_task(spec, history.get(task_id, []), acquire_env, release_env, actor, reflector, prompts,
                                     generation_config(cfg.actor, ACTOR_STOP), generation_config(cfg.reflector, REFLECTION_STOP), on_task_trial, action_names)
            except RetroformerError as exc:  # the run stops (as for any model error); the manifest names the episode
                failure.setdefault("task_id", task_id)
                failure.setdefault("trial", _next_trial(history.get(task_id, []) + written))
                failure.setdefault("error", f"{type(exc).__name__}: {exc}")
                raise
            all_trials = history.get(task_id, []) + new
            progress.task_done(any(t.success for t in all_trials))

    tasks = [asyncio.create_task(one(t)) for t in remaining]
    try:
        await asyncio.gather(*tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise KeyboardInterrupt from None
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        pool.close(keep_first=True)  # run() closes the first, which also listed the tasks
        for client in {id(c): c for c in (actor, reflector) if c is not None}.values():
            await client.aclose()


async def _collect_on_cluster(cluster: Any, cfg: CollectConfig, workspace: Workspace, task_ids: list[str],
                              history: dict[str, list[Trial]], given: tuple[Any, Any], clients: tuple[Any, Any],
                              on_trial: Callable[[Trial], Awaitable[None]], progress: CollectReport,
                              failure: dict[str, Any]) -> None:
    """--ray: the tasks not finished yet go to the cluster; trials come back through ``on_trial`` as locally."""
    from retroformer_cli.agents.actor import STOP as ACTOR_STOP
    from retroformer_cli.agents.reflexion import REFLECTION_STOP
    from retroformer_cli.cluster.dispatch import collect_on_cluster, run_setup

    remaining = [t for t in task_ids if not _finished(history.get(t, []), cfg.trials)]
    progress.start(len(task_ids), len(task_ids) - len(remaining))
    setup, local_models = run_setup(cfg, workspace, given, clients, generation_config(cfg.actor, ACTOR_STOP),
                                    generation_config(cfg.reflector, REFLECTION_STOP))
    try:
        await collect_on_cluster(cluster, setup, remaining, history, on_trial, progress, failure, local_models)
    finally:
        for client in {id(c): c for c in clients if c is not None}.values():
            await client.aclose()


def _next_trial(trials: list[Trial]) -> int:
    """The trial a task plays next (one whose env failed is played again)."""
    return max((t.trial for t in trials if not t.env_error), default=0) + 1


def _finished(trials: list[Trial], k: int) -> bool:
    if not trials:
        return False
    last = max(trials, key=lambda t: t.trial)
    if last.env_error:  # the env failed: the agent did not finish this task; --resume replays it
        return False
    return any(t.success for t in trials) or last.trial >= k


def load_trials(workspace: Workspace, run: str) -> list[Trial]:
    workspace.read_manifest(run)  # clear error for an unknown run
    path = workspace.trials_path(run)
    if not path.exists():
        return []
    # Append-only: a trial replayed after an env error (--resume) appears again; the later line wins.
    latest: dict[tuple[str, int], Trial] = {}
    for r in read_jsonl(path):
        t = Trial.from_json(r)
        latest.pop(t.key, None)
        latest[t.key] = t
    return list(latest.values())


