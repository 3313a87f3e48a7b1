"""The caller side of the engine: everything here is safe to call from any thread (an asyncio loop, uvicorn's
loop, a plain script) and talks to the model thread only through a condition-guarded inbox.

:meth:`EngineFrontend.submit` queues token ids and returns a :class:`~.requests.RequestHandle`; callbacks run on
the model thread (``on_delta`` for streamed text, ``on_done`` with the :class:`~.types.Result` or an
exception), so async callers hop back with ``call_soon_threadsafe`` (:meth:`EngineFrontend.generate_async` does
it). Adapter loads and other commands run on the model thread between steps (:meth:`EngineFrontend._call`).
The model thread itself (loading, admission, the steps) is :class:`~.scheduler.Engine`, a subclass.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from retroformer_cli.errors import BackendError
from retroformer_cli.llm.engine.model import chat_token_ids
from retroformer_cli.llm.engine.requests import DeltaFn, DoneFn, Request, RequestHandle, next_id
from retroformer_cli.llm.engine.types import (ContextTooLong, EngineClosed, EngineConfig, EngineFailed, Result, Sampling,
                                              default_threads)

_started: "weakref.WeakSet[EngineFrontend]" = weakref.WeakSet()
_E = TypeVar("_E", bound="EngineFrontend")


@atexit.register
def _stop_engines() -> None:
    # A model thread still inside torch when the interpreter exits can abort the process ("terminate called
    # without an active exception"); stop every engine first (queued work is abandoned).
    for engine in list(_started):
        engine.shutdown(drain=False, timeout=10)


class EngineFrontend:
    """The thread-safe half of :class:`~.scheduler.Engine`: lifecycle, tokenizing, submitting, adapter commands."""

    def __init__(self, config: EngineConfig, name: str | None = None):
        config.validate()
        self.config = config
        self.name = name or config.model
        self.threads = config.threads if config.threads is not None else default_threads()
        self.info: dict[str, Any] = {}
        self.context_length: int | None = None
        self._cv = threading.Condition()
        self._inbox: list[Request] = []  # submitted, not yet seen by the model thread
        self._commands: list[Callable[[], None]] = []  # to run on the model thread between steps
        self._stop: str | None = None  # None | "drain" | "now"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._failed: BaseException | None = None  # set once the model thread has stopped for good
        self._live: dict[int, Request] = {}  # submitted and not yet ended (guarded by _cv)
        self._local = threading.local()
        self._tok: Any = None

    # The model thread's side (the subclass).
    def _main(self) -> None:
        raise NotImplementedError

    def _load_adapter(self, name: str, path: str, label: str | None = None) -> None:
        raise NotImplementedError

    def _unload_adapter(self, name: str) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------------------------- lifecycle
    def start(self: _E, wait: bool = False, timeout: float | None = None) -> _E:
        """Start the model thread (it loads the model first). Idempotent."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=f"retroformer-engine-{self.name}",
                                                daemon=True)
                self._thread.start()
                _started.add(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; re-raise the load error if it failed."""
        self.start()
        if not self._ready.wait(timeout):
            raise BackendError(f"The model {self.name} did not load within {timeout} s.")
        if self._load_error is not None:
            raise self._load_error

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain`` finish queued and running ones, else fail them; stop the thread."""
        with self._cv:
            self._stop = "drain" if drain else "now"
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._stop is not None

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the model thread (a failed load, an internal error), or None."""
        return self._failed

    # -------------------------------------------------------------------------------- tokens
    def tokenizer(self) -> Any:
        """This thread's copy of the tokenizer (fast tokenizers must not be shared across threads)."""
        self.wait_ready()
        tok = getattr(self._local, "tok", None)
        if tok is None:
            import copy

            tok = self._local.tok = self._tok if threading.current_thread() is self._thread else copy.deepcopy(self._tok)
        return tok

    @property
    def chat(self) -> bool:
        self.wait_ready()
        return bool(getattr(self._tok, "chat_template", None))

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of chat messages with the model's template; a final assistant message is continued."""
        return chat_token_ids(self.tokenizer(), messages)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer()(text)["input_ids"]

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`ContextTooLong` when the prompt and the answer do not fit the model's context."""
        if self.context_length and prompt_len + max_tokens > self.context_length:
            raise ContextTooLong(f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                 f"context of {self.name} ({self.context_length} tokens).")

    # -------------------------------------------------------------------------------- requests
    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, *, adapter: str | None = None,
               on_delta: DeltaFn | None = None, on_done: DoneFn | None = None) -> RequestHandle:
        """Queue one request (thread-safe). It joins the running batch at the next step."""
        if sampling.n < 1:
            raise BackendError("n must be at least 1.")
        if not prompt_ids:
            raise BackendError("The prompt is empty.")
        req = Request(next_id(), [int(t) for t in prompt_ids], sampling, adapter, on_delta, on_done,
                       time.perf_counter())
        self._post(self._inbox, req, live=req)
        self.start()
        return RequestHandle(self, req)

    async def generate_async(self, prompt_ids: Sequence[int], sampling: Sampling, *, adapter: str | None = None,
                             on_delta: DeltaFn | None = None) -> Result:
        """``submit`` for asyncio callers; cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        abandoned = False

        def settle(outcome: Any) -> None:
            if future.done():
                return
            if abandoned:  # the caller went away: nobody will read an exception ("never retrieved")
                future.cancel()
            elif isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        def done(outcome: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop is gone (the caller's asyncio.run ended)
                pass

        handle = self.submit(prompt_ids, sampling, adapter=adapter, on_delta=on_delta, on_done=done)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abandoned = True
            handle.cancel()
            raise

    # -------------------------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | Path, label: str | None = None) -> None:
        """Load a PEFT LoRA adapter under ``name`` (blocking; runs on the model thread between steps). ``label``:
        what its user calls it (serve's model name), kept in :attr:`adapter_labels` and used in messages."""
        self._call(lambda: self._load_adapter(name, str(path), label))

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; its queued and running requests fail with :class:`AdapterNotLoaded`."""
        self._call(lambda: self._unload_adapter(name))

    def _call(self, fn: Callable[[], Any]) -> Any:
        self.wait_ready()
        if threading.current_thread() is self._thread:
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                if self._failed is not None:  # run by the dying thread's sweep: report, do not load
                    raise EngineFailed(str(self._failed))
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()

        self._post(self._commands, run)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _post(self, queue: list, item: Any, live: Request | None = None) -> None:
        """Hand ``item`` to the model thread (the inbox or the commands) unless the engine is shutting down or
        has failed; a request (``live``) is registered until it ends, so no failure can forget it."""
        with self._cv:
            if self._failed is not None:  # a fresh error each time: a re-raised one would grow its traceback
                raise EngineFailed(str(self._failed))
            if self._stop is not None:
                raise EngineClosed(f"The engine for {self.name} is shutting down.")
            queue.append(item)
            if live is not None:
                self._live[live.id] = live
            self._cv.notify_all()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

