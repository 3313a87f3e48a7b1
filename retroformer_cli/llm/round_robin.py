"""Several OpenAI-compatible endpoints serving the same model, used in turn: ``--actor-base-url URL1,URL2,...``.

Replicas behind no balancer (one ``retroformer serve`` or vLLM per GPU or machine) share a run's requests: each
request goes to the next endpoint in the list, with that endpoint's own retries, concurrency and connection pool.
Works in one process and on every node of a ``--ray`` run alike.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from retroformer_cli.llm.base import Generation, GenerationConfig, Message


def split_urls(base_url: str | None) -> list[str]:
    """The endpoints a base URL names: one, or several separated by commas."""
    return [u.strip() for u in (base_url or "").split(",") if u.strip()]


class RoundRobinClient:
    """An :class:`~retroformer_cli.llm.base.LLMClient` over several clients of one model, each request to the next."""

    def __init__(self, clients: Sequence[Any]):
        self.clients = list(clients)
        self.model_id = self.clients[0].model_id
        self._next = itertools.cycle(self.clients)

    def describe(self) -> dict[str, Any]:
        """The first endpoint's settings, with every base URL."""
        first = self.clients[0]
        desc = dict(first.describe()) if hasattr(first, "describe") else {"model_id": self.model_id}
        desc["base_url"] = [c.describe().get("base_url") for c in self.clients if hasattr(c, "describe")]
        return desc

    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        return await next(self._next).agenerate(messages, config)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
