"""In-process local models: the embedded SmolLM2-135M-Instruct by default, any local transformers folder, or a
PEFT LoRA adapter folder on top of either.

A thin client of the shared :mod:`retroformer_cli.llm.engine`: it renders chat messages with the model's
template, hands the token ids to the process's engine for that base model (continuous batching, prompt-prefix
reuse, one model thread) and turns the result into a :class:`~retroformer_cli.llm.base.Generation`. An adapter
folder runs as a named adapter over its base, so an actor on the base and a reflector adapter share one copy of
the weights. Concurrent ``agenerate`` calls from any number of tasks are batched by the engine.

>>> client = HFLocalClient("embedded", cache_dir="cache")  # doctest: +SKIP
>>> client.generate([Message("user", "Say hi.")], GenerationConfig(max_tokens=8)).text  # doctest: +SKIP
'Hi there! How can I'
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from retroformer_cli.errors import ContextTooLong
from retroformer_cli.llm.base import Generation, GenerationConfig, Message, Usage
from retroformer_cli.llm.engine.adapters import adapter_name_for
from retroformer_cli.llm.engine.types import EngineConfig, Result, Sampling
from retroformer_cli.llm.engine.types import ContextTooLong as EngineContextTooLong
from retroformer_cli.llm.model_cache import (
    EMBEDDED,
    EMBEDDED_MODEL_ID,
    default_cache_dir,
    embedded_cache_path,
    embedded_gguf_path,
    is_adapter_dir,
    read_adapter_base,
    resolve_local_model,
)

__all__ = ["EMBEDDED_MODEL_ID", "HFLocalClient", "embedded_gguf_path", "resolve_local_model"]


def local_model_id(model: str) -> str:
    """Exact id recorded in results: the embedded id, the path given, or ``<base id>+<adapter path>``."""
    if model == EMBEDDED:
        return EMBEDDED_MODEL_ID
    path = Path(model).expanduser()
    if path.is_dir() and is_adapter_dir(path):
        base = read_adapter_base(path)
        return f"{EMBEDDED_MODEL_ID if base == EMBEDDED else base}+{model}"
    return model


def sampling_for(config: GenerationConfig) -> Sampling:
    return Sampling(max_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
                    stop=tuple(s for s in config.stop if s), seed=config.seed)


class HFLocalClient:
    """An :class:`~retroformer_cli.llm.base.LLMClient` over the process's shared local engine.

    The engine (and the model) load on first use; ``"embedded"`` is converted from GGUF once into
    ``<cache_dir>/models/``. Clients with the same base model and engine settings share one engine.
    """

    def __init__(
        self,
        model: str = EMBEDDED,
        cache_dir: Path | str | None = None,
        device: str = "auto",
        threads: int | None = None,
        max_batch_size: int = 8,
        dtype: str = "auto",
        prefix_reuse: bool = True,
        prefix_cache_mb: int = 512,
        max_step_tokens: int = 512,
        prefill_chunk: int = 256,
        weights: str = "auto",
    ):
        self.model_spec = str(model)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.model_id = local_model_id(self.model_spec)
        # a bad path or setting fails now, not mid-run
        self.engine_config, adapter_path = EngineConfig.for_model(
            self.model_spec, self.cache_dir, device=device, dtype=dtype, threads=threads,
            max_batch_size=max_batch_size, max_step_tokens=max_step_tokens, prefill_chunk=prefill_chunk,
            prefix_reuse=prefix_reuse, prefix_cache_mb=prefix_cache_mb, weights=weights)
        self.threads = self.engine_config.threads
        self.max_batch_size = max_batch_size
        self._engine: Any = None
        self._adapter_path = adapter_path  # the adapter folder (what describe() reports)
        # the engine's (peft's) name of the adapter
        self._adapter = adapter_name_for(adapter_path) if adapter_path is not None else None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- engine
    def _prepare(self) -> tuple[Any, str | None]:
        """The shared engine for this model, loaded, with this client's adapter (blocking)."""
        if self._engine is not None and self._engine.ready:
            return self._engine, self._adapter
        with self._lock:
            if self._engine is None or self._engine.closing:
                from retroformer_cli.llm.engine.shared import shared_engine

                self._engine = shared_engine(self.engine_config)
            engine, adapter, path = self._engine, self._adapter, self._adapter_path
        engine.wait_ready()
        if adapter is not None:
            from retroformer_cli.llm.engine.shared import ensure_adapter

            ensure_adapter(engine, adapter, path)
        return engine, adapter

    @property
    def engine(self) -> Any:
        return self._prepare()[0]

    def load(self) -> "HFLocalClient":
        """Load the model now (blocking) instead of on first use."""
        self._prepare()
        return self

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """The prompt token ids the model reads for ``messages`` (chat template; a final assistant turn is
        continued)."""
        engine, _ = self._prepare()
        return engine.encode_chat([{"role": m.role, "content": m.content} for m in messages])

    def _context_error(self, exc: BaseException, prompt_len: int, config: GenerationConfig) -> ContextTooLong:
        """The engine's context error as the backend-neutral :class:`~retroformer_cli.errors.ContextTooLong`."""
        engine = self._engine
        return ContextTooLong(str(exc), prompt_tokens=prompt_len, max_tokens=config.max_tokens,
                              context_length=getattr(engine, "context_length", None))

    def _generation(self, result: Result, started: float) -> Generation:
        choice = result.choices[0]
        usage = Usage(prompt_tokens=result.prompt_tokens, completion_tokens=choice.completion_tokens,
                      cached_tokens=result.cached_tokens)
        return Generation(text=choice.text, model_id=self.model_id, usage=usage, finish_reason=choice.finish_reason,
                          latency_ms=(time.perf_counter() - started) * 1000, min_margin=choice.min_margin)

    # ----------------------------------------------------------------- async API
    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        started = time.perf_counter()
        if self._engine is None or not self._engine.ready or (self._adapter and self._adapter not in self._engine.adapters):
            await asyncio.get_running_loop().run_in_executor(None, self._prepare)  # the first load stays off the loop
        engine, adapter = self._engine, self._adapter
        ids = engine.encode_chat([{"role": m.role, "content": m.content} for m in messages])
        try:
            result = await engine.generate_async(ids, sampling_for(config), adapter=adapter)
        except EngineContextTooLong as exc:
            raise self._context_error(exc, len(ids), config) from exc
        return self._generation(result, started)

    async def aclose(self) -> None:
        """Nothing to release: the shared engine stays loaded for the process's other clients."""

    def close(self) -> None:
        """Nothing to release (see :meth:`aclose`)."""

    # ----------------------------------------------------------------- sync API for scripts
    def generate(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> Generation:
        """Blocking single request."""
        return self.generate_batch([messages], config)[0]

    def generate_batch(self, batch: Sequence[Sequence[Message]], config: GenerationConfig | None = None) -> list[Generation]:
        """Blocking: all of ``batch`` submitted at once (the engine batches them)."""
        config = config or GenerationConfig()
        started = time.perf_counter()
        engine, adapter = self._prepare()
        prompts = [self.encode(m) for m in batch]
        handles = [engine.submit(ids, sampling_for(config), adapter=adapter) for ids in prompts]
        out = []
        for ids, handle in zip(prompts, handles):
            try:
                out.append(self._generation(handle.result(), started))
            except EngineContextTooLong as exc:
                raise self._context_error(exc, len(ids), config) from exc
        return out

    def stats(self) -> dict[str, Any]:
        """The shared engine's counters (requests, prompt/cached/completion tokens, forward passes, drafts, prefix
        cache), for the run manifest; empty before the model loaded."""
        engine = self._engine
        return engine.stats() if engine is not None and engine.ready else {}

    def describe(self) -> dict[str, Any]:
        """Facts for run manifests: model id, folder, device, dtype, threads, engine settings (``forward``: the
        engine's lean Llama forward pass or transformers' modules). ``weights_setting`` is ``--weights`` as given;
        once the model loaded, ``weights`` is what it resolved to (``hybrid``, ``gguf``, ``fp32``), with the GGUF
        kernel's instruction set (``gguf_kernel``) or why it fell back to fp32 (``weights_why``)."""
        cfg = self.engine_config
        desc: dict[str, Any] = {"backend": "hf_local", "model": self.model_spec, "model_id": self.model_id,
                                "threads": self.threads, "max_batch_size": cfg.max_batch_size,
                                "prefix_reuse": cfg.prefix_reuse, "prefix_cache_mb": cfg.prefix_cache_mb,
                                "weights_setting": cfg.weights}
        engine = self._engine
        if engine is not None and engine.ready:
            info = engine.info
            desc.update(path=self._adapter_path or info.get("path"), device=info["device"], dtype=info["dtype"],
                        weights=info.get("weights", cfg.weights), forward=info.get("forward"),
                        load_seconds=info.get("load_seconds"))
            desc.update({key: info[name] for key, name in (("gguf_kernel", "gguf_kernel"), ("weights_why", "why"))
                         if info.get(name) is not None})
            if self._adapter_path is not None:
                desc.update(adapter=self._adapter_path, adapter_name=self._adapter, base=cfg.model,
                            base_path=info.get("path"))
        else:
            from retroformer_cli.llm.engine.model import resolve_device_dtype

            device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
            path = str(embedded_cache_path(self.cache_dir)) if self.model_spec == EMBEDDED else self.model_spec
            desc.update(path=path, device=device, dtype=dtype)
            if self._adapter_path is not None:
                desc.update(adapter=self._adapter_path, adapter_name=self._adapter)
        return desc
