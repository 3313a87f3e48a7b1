"""How requests end, on the model thread: every submitted request ends with its result or an error, whatever
the thread hits.

- A failure while admitting one request (memory for its keys/values, a prefix-reuse copy) fails that request;
- a failure in a step (the forward pass, sampling, finishing a sequence) fails the requests of that step
  (every admitted request: also one that left the batch but had not finished when the failure struck);
- anything else (a bug outside those, a ``BaseException``) stops the model thread: every pending request ends
  with :class:`~.types.EngineFailed` and new work is refused with it (see :meth:`EngineEndings._die`).

Callers register in ``_live`` (:meth:`~.frontend.EngineFrontend.submit`) until they end, so a sweep never
depends on which queue a request happened to be in.
"""

from __future__ import annotations

import logging
from typing import Any

from retroformer_cli.errors import RetroformerError
from retroformer_cli.llm.engine.frontend import EngineFrontend
from retroformer_cli.llm.engine.requests import Request, Seq
from retroformer_cli.llm.engine.types import EngineFailed, EngineFault

log = logging.getLogger("retroformer.engine")


def as_fault(exc: BaseException, stage: str) -> BaseException:
    """Our own errors as they are (a context overflow, an unloaded adapter); anything else as an EngineFault."""
    if isinstance(exc, RetroformerError):
        return exc
    return EngineFault(f"Local generation failed while {stage}: {type(exc).__name__}: {exc}")


class EngineEndings(EngineFrontend):
    """The model thread's ways to end requests (the scheduler, :class:`~.scheduler.Engine`, subclasses it)."""

    _running: list[Seq]
    _waiting: Any  # collections.deque[Request]
    _waiting_count: int

    def _finish_request(self, req: Request, outcome: Any) -> None:
        if req.event.is_set():
            return
        for seq in req.seqs:
            seq.kv = None
            if seq in self._running:
                self._running.remove(seq)
        with self._cv:
            self._live.pop(req.id, None)
        req.outcome = outcome
        req.event.set()
        if req.on_done is not None:
            try:
                req.on_done(outcome)
            except Exception:  # a caller's callback must not stop the engine
                log.exception("on_done callback failed")

    def _fail_admitted(self, err: BaseException) -> None:
        """End every admitted request that has not ended (a failed step's batch) with ``err``."""
        with self._cv:
            admitted = [r for r in self._live.values() if r.started is not None]
        for req in admitted:
            self._finish_request(req, err)
        self._running = []

    def _fail_all(self, err: BaseException) -> None:
        """End every request (queued, waiting, running) with ``err``; queued commands run (or, on a failed
        engine, report the failure)."""
        with self._cv:
            self._inbox.clear()
            self._waiting.clear()
            self._waiting_count = 0
            commands, self._commands = self._commands, []
            pending = list(self._live.values())  # every submitted request is here until it ends, in any queue
        for req in pending:
            self._finish_request(req, err)
        self._running = []
        for command in commands:
            command()  # adapter commands report their own error (engine closed or failed)

    def _die(self, exc: BaseException) -> None:
        """The model thread hit an error no request owns: end every request and refuse new work.

        No restart: such an error leaves the thread's own state (the batch, the prefix cache, a CUDA context)
        unknown, and a restart would reload and fail again out of sight, or give answers from a broken cache. One
        clear error for every caller (serve: 503 on every request and /health) lets whoever runs the process
        restart it.
        """
        log.error("the engine's model thread stopped", exc_info=(type(exc), exc, exc.__traceback__))
        err = EngineFailed(f"The local engine for {self.name} stopped after an internal error "
                           f"({type(exc).__name__}: {exc}) and takes no new requests; restart the process.")
        with self._cv:  # under the lock: a request is either refused by submit or swept below
            self._failed = err
        self._ready.set()
        self._fail_all(err)
