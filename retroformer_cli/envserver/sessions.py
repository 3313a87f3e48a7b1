"""Sessions of the environment server: each one owns an env instance (``spawn()`` of one loaded env, so the
catalog, docstore or game list is loaded once), is bounded in number, and is closed after ``ttl_s`` idle.

In-process envs (WebShop, HotPotQA) step in a thread pool. ALFWorld envs step in their engine worker
processes (``areset``/``astep``), which form a pool: a closed or expired session's process stays warm for the
next session (up to ``workers`` idle ones), so a new session skips the engine start.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from retroformer_cli.errors import RetroformerError, UsageError


class EnvServerError(Exception):
    """An HTTP error answer: status, one-sentence message, a machine-readable code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


@dataclass
class Session:
    id: str
    env: Any
    created: float
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    episode_id: str | None = None
    task_id: str | None = None
    episodes: int = 0
    step_count: int = 0
    started: bool = False
    done: bool = True
    total_reward: float = 0.0
    held: bool = False  # a WebSocket connection holds it: no idle expiry (it closes with the connection)

    def state(self) -> dict[str, Any]:
        """OpenEnv's State fields (``episode_id``, ``step_count``) and ours."""
        return {"session_id": self.id, "episode_id": self.episode_id, "step_count": self.step_count,
                "task_id": self.task_id, "episodes": self.episodes, "done": self.done,
                "total_reward": self.total_reward}


def _uses_processes(env: Any) -> bool:
    """ALFWorld (engine processes) and ``--processes`` pools step through ``areset``/``astep``."""
    return bool(getattr(env, "process", False))


class SessionManager:
    """Create, find, step and expire sessions over ``base`` (a loaded env with ``spawn()``)."""

    def __init__(self, base: Any, *, max_sessions: int = 64, ttl_s: float = 300.0, workers: int = 8,
                 step_timeout_s: float = 120.0, close_base: bool = False):
        self.close_base = close_base  # the base owns worker processes (``--processes``): end them at shutdown
        self.base, self.max_sessions, self.ttl_s, self.step_timeout_s = base, max_sessions, ttl_s, step_timeout_s
        self.env_name = getattr(base, "env_id", type(base).__name__)
        self.in_processes = _uses_processes(base)
        self.workers = workers
        self._threads = None if self.in_processes else ThreadPoolExecutor(workers, thread_name_prefix="env-step")
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, str] = OrderedDict()  # id -> why, the latest 4096
        self._idle_envs: list[Any] = []  # ALFWorld: envs whose engine process stays warm
        self._task_ids = list(base.task_ids())
        self._next_task = itertools.count()
        self._sweeper: asyncio.Task | None = None
        self.counters = {"created": 0, "expired": 0, "closed": 0, "steps": 0, "resets": 0}

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for sid in list(self._sessions):
            await self._drop(sid, "closed", recycle=False)
        for env in self._idle_envs:
            await asyncio.to_thread(env.close)
        self._idle_envs.clear()
        if self.close_base:
            await asyncio.to_thread(self.base.close)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    async def _sweep_forever(self) -> None:
        period = max(0.05, min(self.ttl_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            await self.sweep()

    async def sweep(self) -> int:
        """Close the sessions idle longer than ``ttl_s`` (none that is mid-call or held by a connection)."""
        now = time.monotonic()
        stale = [s.id for s in self._sessions.values()
                 if now - s.last_used > self.ttl_s and not s.lock.locked() and not s.held]
        for sid in stale:
            await self._drop(sid, "expired")
        return len(stale)

    def stats(self) -> dict[str, Any]:
        return {"env": self.env_name, "sessions": len(self._sessions), "max_sessions": self.max_sessions,
                "session_ttl_s": self.ttl_s, "pool": "processes" if self.in_processes else "threads",
                "workers": self.workers, "processes": getattr(self.base, "processes", 0), "idle_processes": len(self._idle_envs), **self.counters}

    # ---- sessions --------------------------------------------------------------------------------
    async def create(self) -> Session:
        await self.sweep()
        if len(self._sessions) >= self.max_sessions:
            raise EnvServerError(503, f"All {self.max_sessions} sessions are in use; close one or retry later.",
                                 "capacity_reached", headers={"Retry-After": "1"})
        env = self._idle_envs.pop() if self._idle_envs else self.base.spawn()
        now = time.monotonic()
        session = Session(secrets.token_hex(12), env, now, now)
        self._sessions[session.id] = session
        self.counters["created"] += 1
        return session

    def get(self, sid: str, touch: bool = False) -> Session:
        """The open session ``sid`` (404 when closed, expired or unknown); ``touch``: count it as activity."""
        session = self._sessions.get(sid)
        stale = (session is not None and time.monotonic() - session.last_used > self.ttl_s
                 and not session.lock.locked() and not session.held)
        if session is None or stale:  # a stale one is closed by the next sweep
            why = "expired" if stale else self._expired.get(sid)
            if why == "expired":
                raise EnvServerError(404, f"Session '{sid}' expired after {self.ttl_s:g} s idle; create a new one.",
                                     "session_expired")
            raise EnvServerError(404, f"Session '{sid}' does not exist (closed or never created).",
                                 "session_not_found")
        if touch:
            session.last_used = time.monotonic()
        return session

    async def close(self, sid: str) -> None:
        session = self.get(sid)
        async with session.lock:
            await self._drop(sid, "closed")

    async def _drop(self, sid: str, why: str, recycle: bool = True) -> None:
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        self._expired[sid] = why
        while len(self._expired) > 4096:
            self._expired.popitem(last=False)
        self.counters[why] = self.counters.get(why, 0) + 1
        env = session.env
        proc = getattr(env, "_proc", None)
        if recycle and self.in_processes and proc is not None and proc.is_alive() \
                and len(self._idle_envs) < self.workers:
            self._idle_envs.append(env)  # the engine process stays warm for the next session
            return
        await asyncio.to_thread(env.close)

    # ---- episodes --------------------------------------------------------------------------------
    def pick_task(self, task_id: str | None, seed: int | None) -> str:
        """``task_id`` as given; else the task at ``seed`` (mod the task count); else the next one in turn."""
        if task_id is not None:
            return task_id
        if not self._task_ids:
            raise EnvServerError(400, f"The {self.env_name} environment has no tasks.", "no_tasks")
        k = seed if seed is not None else next(self._next_task)
        return self._task_ids[k % len(self._task_ids)]

    async def _call(self, session: Session, op: str, *args: Any, **kwargs: Any) -> Any:
        env = session.env
        try:
            if self.in_processes:
                coro = getattr(env, "a" + op)(*args, **kwargs)
            else:
                loop = asyncio.get_running_loop()
                coro = loop.run_in_executor(self._threads, lambda: getattr(env, op)(*args, **kwargs))
            return await asyncio.wait_for(coro, self.step_timeout_s)
        except asyncio.TimeoutError:
            await self._drop(session.id, "closed", recycle=False)
            raise EnvServerError(504, f"The environment took over {self.step_timeout_s:g} s to {op}; the session "
                                      "is closed.", "env_timeout") from None
        except UsageError as exc:
            raise EnvServerError(400, str(exc), "invalid_request") from None
        except RetroformerError as exc:  # the env failed (e.g. its engine process died): the episode is over
            session.done = True
            raise EnvServerError(500, str(exc), "env_error") from None

    async def reset(self, sid: str, *, task_id: str | None = None, seed: int | None = None,
                    episode_id: str | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        session = self.get(sid)
        async with session.lock:
            session.last_used = time.monotonic()
            chosen = self.pick_task(task_id, seed)
            obs, info = await self._call(session, "reset", seed=seed, options={**(options or {}), "task_id": chosen})
            session.task_id, session.started, session.done = chosen, True, False
            session.episode_id = episode_id or f"{sid}-{session.episodes}"
            session.episodes += 1
            session.step_count, session.total_reward = 0, 0.0
            session.last_used = time.monotonic()
            self.counters["resets"] += 1
        return {"observation": {"text": obs}, "reward": None, "done": False, "terminated": False,
                "truncated": False, "info": info}

    async def step(self, sid: str, action: str) -> dict[str, Any]:
        session = self.get(sid)
        async with session.lock:
            if not session.started:
                raise EnvServerError(409, "No episode has started in this session; POST .../reset first.",
                                     "no_episode")
            if session.done:
                raise EnvServerError(409, "The episode is over; POST .../reset to start another.", "episode_over")
            session.last_used = time.monotonic()
            obs, reward, terminated, truncated, info = await self._call(session, "step", action)
            session.step_count += 1
            session.total_reward += float(reward)
            session.done = bool(terminated or truncated)
            session.last_used = time.monotonic()
            self.counters["steps"] += 1
        return {"observation": {"text": obs}, "reward": float(reward), "done": session.done,
                "terminated": bool(terminated), "truncated": bool(truncated), "info": info}

    def tasks(self, offset: int, limit: int) -> dict[str, Any]:
        return {"env": self.env_name, "total": len(self._task_ids), "offset": offset,
                "task_ids": self._task_ids[offset: offset + limit]}
