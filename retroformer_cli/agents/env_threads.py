"""Time-bounded calls into synchronous envs, and the pool of env instances episodes borrow from.

A synchronous env (HotPotQA, WebShop, a plugin's) steps in one daemon thread of its own, so a hung ``reset`` or
``step`` times out (``env_step_timeout_s``) while the event loop, and every other episode, goes on. A Python
thread cannot be killed: the hung instance is retired (never handed to an episode again; its thread closes it if
the call ever returns) and the thread is left behind. At most :data:`MAX_STUCK_THREADS` may be stuck at once;
the next call then stops the run (:class:`TooManyHungEnvs`), since an env that hangs that often is broken.
Daemon threads never keep the process alive, so Ctrl-C and SIGTERM still end a run at once.
Asynchronous envs (ALFWorld: ``areset``/``astep`` in worker processes) need none of this: their hung worker is
killed and replaced by the env itself, and the instance stays usable.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import weakref
from typing import Any, Callable

from retroformer_cli.errors import RetroformerError

MAX_STUCK_THREADS = 8  # hung env calls whose threads may be left behind in one process
_names = itertools.count(1)


class TooManyHungEnvs(RetroformerError):
    """So many env calls hung (each one's thread still stuck) that the run stops rather than leak more."""


class EnvThread:
    """One daemon thread running one env instance's calls, one at a time, in order."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.busy = False
        self.thread = threading.Thread(target=self._serve, name=f"env-step-{next(_names)}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, args, kwargs, loop, fut = item
            self.busy = True
            try:
                ok, value = True, fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
                ok, value = False, exc
            self.busy = False
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(_settle, fut, ok, value)
                except RuntimeError:  # the loop closed meanwhile (the run ended): nobody waits
                    pass

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._calls.put((fn, args, kwargs, loop, fut))
        return await fut

    def finish(self, fn: Callable[[], Any] | None = None) -> None:
        """Run ``fn`` (a close) after the current call, whenever that returns, then end the thread."""
        if fn is not None:
            self._calls.put((fn, (), {}, None, None))
        self._calls.put(None)


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():  # timed out or interrupted: the result comes too late
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


_threads: "weakref.WeakKeyDictionary[Any, EnvThread]" = weakref.WeakKeyDictionary()
_hung: "weakref.WeakSet[Any]" = weakref.WeakSet()
_stuck: list[EnvThread] = []  # threads of hung calls; one leaves the list when its call returns
_lock = threading.Lock()


def stuck_threads() -> int:
    """How many hung env calls still hold their thread in this process."""
    with _lock:
        _stuck[:] = [t for t in _stuck if t.thread.is_alive()]
        return len(_stuck)


def _thread_of(env: Any) -> EnvThread:
    with _lock:
        thread = _threads.get(env)
        if thread is None:
            thread = _threads[env] = EnvThread()
            weakref.finalize(env, thread.finish)  # the env is gone: so is its thread
        return thread


async def call_bounded(env: Any, fn: Callable[..., Any], timeout_s: float | None, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a method of ``env``) in the env's thread, at most ``timeout_s`` seconds; on a
    timeout ``env`` is marked hung (:func:`is_hung`) and ``asyncio.TimeoutError`` raised. No ``timeout_s``: the
    call runs on the event loop, as before this module existed."""
    if not timeout_s:
        return fn(*args, **kwargs)
    if stuck_threads() >= MAX_STUCK_THREADS:
        raise TooManyHungEnvs(f"{MAX_STUCK_THREADS} env calls hung and their threads are still stuck; the run "
                              "stops rather than leak more threads.",
                              hint="fix the env (or raise --env-step-timeout-s), then continue with --resume")
    thread = _thread_of(env)
    try:
        return await asyncio.wait_for(thread.call(fn, *args, **kwargs), timeout_s)
    except asyncio.TimeoutError:
        with _lock:
            _hung.add(env)
            _threads.pop(env, None)
            _stuck.append(thread)
        thread.finish(getattr(env, "close", None))  # if the call ever returns, the instance is closed
        raise


def is_hung(env: Any) -> bool:
    """Whether a call of ``env`` timed out: the instance must not be used again."""
    return env in _hung


def close_env(env: Any) -> None:
    """Close ``env``: in its thread when it has one (after a call still running there, which may never end;
    nothing waits for it), else here."""
    if env in _hung:
        return  # its thread closes it if the hung call returns
    with _lock:
        thread = _threads.pop(env, None)
    if thread is None:
        env.close()
    elif thread.busy:
        thread.finish(env.close)
    else:
        thread.finish()
        env.close()


class EnvPool:
    """The env instances a run's episodes borrow, one per concurrent episode: ``first`` and up to ``limit``
    built by ``build`` (``None``: as many as asked for). A released instance that hung is retired, never lent
    again, and a fresh one is built in its place when next needed."""

    def __init__(self, first: Any, build: Callable[[], Any], limit: int | None = None):
        self.first, self.build, self.limit = first, build, limit
        self.idle: list[Any] = [first]
        self.live: list[Any] = [first]
        self.retired = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self) -> Any:
        while True:
            if self.idle:
                return self.idle.pop()
            if self.limit is None or len(self.live) < self.limit:
                env = self.build()
                self.live.append(env)
                return env
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def release(self, env: Any) -> None:
        if is_hung(env):
            self.live.remove(env)
            self.retired += 1
        else:
            self.idle.append(env)
        while self._waiters:
            fut = self._waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                break

    def close(self, keep_first: bool = False) -> None:
        """Close every live instance (but ``first`` with ``keep_first``: its owner closes it)."""
        for env in self.live:
            if not (keep_first and env is self.first):
                close_env(env)

