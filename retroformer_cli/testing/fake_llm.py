"""A scripted in-process LLMClient for tests and dry runs: canned or computed replies, no network, no model."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Callable, Sequence

from retroformer_cli.llm.base import Generation, GenerationConfig, Message, Usage, apply_stop

ReplyFn = Callable[[Sequence[Message], GenerationConfig], str]

DEFAULT_REPLIES = ["I am not sure."]


class FakeLLM:
    """Replies from a list (cycled) or a callable ``(messages, config) -> str``.

    Stop strings are applied as a real backend would; usage counts whitespace tokens; every call is
    kept in ``calls`` as ``(messages, config)`` so tests can inspect the prompts.
    """

    def __init__(self, replies: Sequence[str] | ReplyFn | None = None, model_id: str = "fake-llm",
                 delay_s: float = 0.0):
        self.model_id = model_id
        self.delay_s = delay_s
        self.calls: list[tuple[list[Message], GenerationConfig]] = []
        self.closed = False
        if callable(replies):
            self._fn: ReplyFn | None = replies
            self._cycle = None
        else:
            items = list(replies) if replies is not None else list(DEFAULT_REPLIES)
            if not items:
                raise ValueError("FakeLLM needs at least one reply.")
            self._fn = None
            self._cycle = itertools.cycle(items)

    def describe(self) -> dict[str, Any]:
        return {"backend": "fake", "model": self.model_id}

    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        start = time.perf_counter()
        msgs = list(messages)
        self.calls.append((msgs, config))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        raw = self._fn(msgs, config) if self._fn is not None else next(self._cycle)  # type: ignore[arg-type]
        text, _ = apply_stop(raw, config.stop)
        usage = Usage(prompt_tokens=sum(len(m.content.split()) for m in msgs),
                      completion_tokens=len(text.split()))
        return Generation(text=text, model_id=self.model_id, usage=usage,
                          latency_ms=(time.perf_counter() - start) * 1000.0,
                          finish_reason="stop", retries=0)

    async def aclose(self) -> None:
        self.closed = True
