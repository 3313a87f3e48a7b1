"""In-process envs (WebShop, HotPotQA) stepped in worker processes instead of threads (``--processes N``).

Each worker process loads the env once (catalog, index from the cache, docstore) and holds the sessions given to
it, one ``spawn()`` each; a session stays on its worker. Calls to one worker go one at a time over its pipe, from
a thread, so N workers step N sessions at once without sharing a GIL. A worker that dies or hangs is replaced;
the episodes it held end with an env error.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from retroformer_cli.errors import RetroformerError, UsageError


class WorkerError(RetroformerError):
    """An env worker process failed or exited."""


def _worker_main(conn: Any, env_cfg: Any, cache_dir: str | None) -> None:
    from retroformer_cli.envs import make_for

    try:
        base = make_for(env_cfg, Path(cache_dir) if cache_dir else None)
    except Exception as exc:  # reported to the server's start-up as one line
        conn.send(("usage" if isinstance(exc, UsageError) else "error", f"{exc}"))
        return
    conn.send(("ok", {"task_ids": list(base.task_ids()), "max_steps": getattr(base, "max_steps", None),
                      "env_id": getattr(base, "env_id", None), "doc": type(base).__doc__,
                      "asynchronous": hasattr(base, "astep") and bool(getattr(base, "process", False))}))
    envs: dict[str, Any] = {}
    while True:
        try:
            op, sid, arg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "reset":
                out = envs.setdefault(sid, base.spawn()).reset(**arg)
            elif op == "step":
                out = envs[sid].step(arg)
            else:  # close
                env = envs.pop(sid, None)
                out = env.close() if env is not None else None
            conn.send(("ok", out))
        except UsageError as exc:
            conn.send(("usage", str(exc)))
        except Exception as exc:  # noqa: BLE001 - the server answers it as an env error
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, env_cfg: Any, cache_dir: str | None):
        self.args, self.lock, self.sessions, self.generation = (env_cfg, cache_dir), threading.Lock(), 0, 0
        self.conn: Any = None
        self.proc: Any = None

    def start(self) -> dict[str, Any]:
        from retroformer_cli.spawning import main_module_hidden

        ctx = mp.get_context("spawn")
        self.generation += 1
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, *self.args), daemon=True, name="env-worker")
        with main_module_hidden():
            self.proc.start()
        child.close()
        try:
            return self._reply(self.conn.recv())
        except (EOFError, OSError):
            self.proc.join(5)
            raise WorkerError(f"The env worker process exited while loading the env (exit code "
                              f"{self.proc.exitcode}).") from None

    def kill(self, wait_s: float = 0.0) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            if wait_s:
                self.proc.join(wait_s)

    def call(self, op: str, sid: str, arg: Any, generation: int | None = None) -> Any:
        """``op`` for session ``sid``; ``generation``: the worker the session's episode lives in."""
        with self.lock:
            if self.proc is None or not self.proc.is_alive():
                self.start()  # a fresh worker: the sessions it held lost their episodes
            if generation is not None and generation != self.generation:
                raise WorkerError("The env worker process holding this episode exited and was replaced; the "
                                  "episode is lost (reset to play again).")
            try:
                self.conn.send((op, sid, arg))
                return self._reply(self.conn.recv())
            except (EOFError, OSError):
                code = self.proc.exitcode
                self.proc.join(1)
                raise WorkerError(f"The env worker process exited (exit code {code}) during {op}; the episode "
                                  "is lost.") from None

    @staticmethod
    def _reply(reply: tuple) -> Any:
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "usage":
            raise UsageError(reply[1])
        raise WorkerError(f"The environment failed: {reply[1]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.conn.close()  # the worker's recv ends
            self.proc.join(2)
            self.kill(wait_s=5)


class ProcessPoolEnv:
    """What :class:`~retroformer_cli.envserver.sessions.SessionManager` sees as the base env: ``spawn()`` gives
    a session proxy with ``areset``/``astep`` on the least loaded worker."""

    process = True

    def __init__(self, env_cfg: Any, processes: int, cache_dir: str | Path | None = None):
        self._workers = [_Worker(env_cfg, str(cache_dir) if cache_dir else None) for _ in range(processes)]
        self._threads = ThreadPoolExecutor(2 * processes, thread_name_prefix="env-pipe")
        with ThreadPoolExecutor(processes) as starting:
            infos = list(starting.map(lambda w: w.start(), self._workers))
        info = infos[0]
        if info["asynchronous"]:
            self.close()
            raise UsageError(f"--processes is for in-process envs: {env_cfg.env} sessions already step in "
                             "their own engine processes.")
        self._task_ids, self.max_steps, self.env_id = info["task_ids"], info["max_steps"], info["env_id"]
        self.__doc__ = info["doc"]
        self._count = 0

    @property
    def processes(self) -> int:
        return len(self._workers)

    def task_ids(self) -> list[str]:
        return list(self._task_ids)

    def spawn(self) -> "PooledEnv":
        worker = min(self._workers, key=lambda w: w.sessions)
        worker.sessions += 1
        self._count += 1
        return PooledEnv(self, worker, f"s{self._count}")

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)


class PooledEnv:
    """One session's env, living in a worker process."""

    process = True
    _proc = None  # nothing to keep warm: the worker stays for other sessions

    def __init__(self, pool: ProcessPoolEnv, worker: _Worker, sid: str):
        self.pool, self.worker, self.sid, self._closed = pool, worker, sid, False
        self.generation: int | None = None  # the worker generation holding the current episode

    async def _run(self, op: str, arg: Any, generation: int | None = None) -> Any:
        fut = asyncio.get_running_loop().run_in_executor(self.pool._threads, self.worker.call, op, self.sid, arg,
                                                         generation)
        try:
            return await fut
        except asyncio.CancelledError:  # a timeout: the worker may hang, replace it
            self.worker.kill()
            raise

    async def areset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        out = await self._run("reset", {"seed": seed, "options": options})
        self.generation = self.worker.generation
        return out

    async def astep(self, action: str) -> Any:
        return await self._run("step", action, self.generation)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.worker.sessions -= 1
            if self.worker.proc is None or not self.worker.proc.is_alive():
                return  # its episode went with the worker
            try:
                self.worker.call("close", self.sid, None)
            except RetroformerError:
                pass

