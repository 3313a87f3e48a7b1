"""Request and sequence state of the engine, and the handle a caller holds.

A :class:`Request` is what :meth:`~.scheduler.Engine.submit` queued; once admitted it runs as ``n`` :class:`Seq`
(one per choice), each with its own key/value buffer. Only the model thread mutates them, except
``Request.cancelled`` (set by :meth:`RequestHandle.cancel` from any thread).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from retroformer_cli.llm.engine.types import Choice, Result, Sampling

DeltaFn = Callable[[int, str], None]  # (choice index, new text)
DoneFn = Callable[[Any], None]  # Result or BaseException
_ids = itertools.count(1)


def next_id() -> int:
    """A process-wide increasing id (requests, adapter namespaces)."""
    return next(_ids)


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    sampling: Sampling
    adapter: str | None
    on_delta: DeltaFn | None
    on_done: DoneFn | None
    enqueued: float
    cancelled: bool = False
    started: float | None = None
    cached: int = 0
    seqs: list["Seq"] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # completion tokens per choice
    event: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None

    def result(self, model: str) -> Result:
        """The result of a request whose choices are all done, timed now."""
        now = time.perf_counter()
        choices = [Choice(s.index, s.text, s.finish_reason or "length", self.counts[s.index], list(s.generated),
                          s.min_margin) for s in self.seqs]
        return Result(model, len(self.prompt), choices, cached_tokens=self.cached,
                      queued_s=round((self.started or now) - self.enqueued, 6), total_s=round(now - self.enqueued, 6))


@dataclass(eq=False)
class Seq:
    req: Request
    index: int
    tokens: list[int]  # prompt, then generated tokens
    kv: Any = None  # [layers, 2, kv_heads, capacity, head_dim]
    computed: int = 0  # leading positions whose keys/values are in ``kv``
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the leading whole blocks
    generated: list[int] = field(default_factory=list)
    state: str = "prefill"  # prefill | follow (n > 1: waits for choice 0's prompt) | decode | done
    rng: Any = None
    ngrams: dict[tuple[int, int, int], int] | None = None  # trigram -> position of its last token (drafting)
    indexed: int = 0  # tokens[:indexed] are in ``ngrams``
    min_margin: float | None = None
    sent: int = 0  # characters streamed
    text: str = ""
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt)

    def fork_from(self, lead: "Seq", kv: Any) -> None:
        """n > 1: start decoding from choice 0's computed prompt, copied into this choice's buffer ``kv``."""
        self.kv = kv
        kv[:, :, :, :lead.prompt_len].copy_(lead.kv[:, :, :, :lead.prompt_len])
        self.computed = lead.prompt_len
        self.keys = list(lead.keys)
        self.ngrams = dict(lead.ngrams) if lead.ngrams is not None else None
        self.indexed = lead.indexed
        self.state = "decode"


class RequestHandle:
    """What :meth:`~.scheduler.Engine.submit` returns: ``cancel()``, ``done()``, blocking ``result(timeout)``."""

    def __init__(self, engine: Any, req: Request):
        self._engine, self._req = engine, req

    @property
    def id(self) -> int:
        return self._req.id

    def cancel(self) -> None:
        """Stop the request at the next step (its batch slot is freed); ``on_done`` gets RequestCancelled."""
        self._req.cancelled = True
        self._engine._wake()

    def done(self) -> bool:
        return self._req.event.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._req.event.wait(timeout):
            raise TimeoutError(f"request {self._req.id} did not finish within {timeout} s")
        if isinstance(self._req.outcome, BaseException):
            raise self._req.outcome
        return self._req.outcome
