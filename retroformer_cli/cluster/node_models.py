"""Local models on a cluster: one model server per node (a Ray actor), and the client the node's workers use.

A local model (``embedded``, ``hf:PATH``, a checkpoint or an adapter) loads once per node, in :class:`NodeModels`,
so every episode the node plays goes through the same batches and prefix cache. The driver creates one per node
(it owns them, so they outlive a worker that dies) and hands each node's runner the handle of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Sequence

from retroformer_cli.llm.base import Generation, GenerationConfig, Message

# Requests one node's model server accepts at once: its batches fill from every episode of the node.
MAX_REQUESTS = 512


def model_key(model_cfg: Any, option: str) -> str:
    """One server-side client per model config and role."""
    return json.dumps([asdict(model_cfg), option], sort_keys=True, default=str)


class NodeModels:
    """The body of the per-node Ray actor: a client per local model config, sharing the process's engines."""

    def __init__(self, workspace_root: str):
        self.workspace_root = workspace_root
        self.clients: dict[str, Any] = {}

    def _client(self, model_cfg: Any, option: str) -> Any:
        key = model_key(model_cfg, option)
        if key not in self.clients:
            from retroformer_cli.llm import make_client
            from retroformer_cli.workspace import Workspace

            self.clients[key] = make_client(model_cfg, Workspace.open(self.workspace_root), option)
        return self.clients[key]

    async def generate(self, model_cfg: Any, option: str, messages: Sequence[Message],
                       config: GenerationConfig) -> Generation:
        return await self._client(model_cfg, option).agenerate(messages, config)

    def identity(self) -> dict[str, Any]:
        """Where this server runs (tests check one per node) and how many models it holds."""
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "models": len(self.clients)}

    def stats(self) -> dict[str, Any]:
        """The engine counters of each loaded model (for the run manifest)."""
        return {key: c.stats() for key, c in self.clients.items() if hasattr(c, "stats")}


def start_node_models(node_ids: Sequence[str], workspace_root: str) -> dict[str, Any]:
    """One model server per node (by node affinity); they load their models on the first request."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(NodeModels)
    return {node: remote.options(num_cpus=0, max_concurrency=MAX_REQUESTS, max_restarts=-1,
                                 scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(workspace_root)
            for node in node_ids}


class NodeModelClient:
    """An :class:`~retroformer_cli.llm.base.LLMClient` whose generate calls go to its node's :class:`NodeModels`."""

    def __init__(self, server: Any, model_cfg: Any, option: str, model_id: str):
        self.server, self.model_cfg, self.option, self.model_id = server, model_cfg, option, model_id

    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        import ray

        try:
            return await self.server.generate.remote(self.model_cfg, self.option, list(messages), config)
        except ray.exceptions.RayTaskError as exc:  # the model's own error (a context overflow): as the local client's
            raise exc.cause from None

    async def aclose(self) -> None:
        """Nothing to release: the node's server stays for the node's other episodes."""
