"""``--engine vllm``: the same serving interface as :class:`~retroformer_cli.serve.backend.TransformersBackend`
over vLLM's ``AsyncLLMEngine`` (continuous batching, paged attention, tensor parallelism on several GPUs).

LoRA adapters are vLLM ``LoRARequest`` objects (``enable_lora=True``); each adapter name gets a stable integer
id, and ``add_lora`` / ``remove_lora`` load and drop them while serving. vLLM is not a dependency: install it on a
GPU machine with ``pip install vllm``. The model must be a transformers folder (``embedded`` is converted once
into the workspace cache and served from there).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from retroformer_cli.errors import BackendError
from retroformer_cli.llm.base import apply_stop
from retroformer_cli.serve.backend import Choice, DeltaFn, LengthLimits, Result, Sampling, ServeError, model_not_found

INSTALL_HINT = "pip install vllm"


def require_vllm() -> Any:
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise BackendError(f"--engine vllm needs vLLM, which is not installed: run `{INSTALL_HINT}` (Linux + "
                           f"NVIDIA GPU), or use --engine transformers.") from exc
    return vllm


class _Handle:
    def __init__(self, task: asyncio.Task):
        self.task = task

    async def result(self) -> Result:
        return await self.task


class VLLMBackend(LengthLimits):
    kind = "vllm"

    def __init__(self, model: str = "embedded", *, served_name: str | None = None, adapters: dict[str, str] | None = None,
                 cache_dir: Path | str | None = None, max_batch_size: int = 256, max_queue: int = 1024,
                 max_tokens_limit: int = 1024, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_lora_rank: int = 64, max_loras: int = 8, dtype: str = "auto", prefix_reuse: bool = True,
                 **_ignored: Any):
        require_vllm()
        from retroformer_cli.llm.model_cache import default_cache_dir, is_adapter_dir, resolve_local_model

        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.model_spec = str(model)
        path = resolve_local_model(self.model_spec, self.cache_dir)
        if is_adapter_dir(path):
            raise ServeError(f"--engine vllm serves a base model; pass the adapter with --adapter NAME={model}.")
        self.model_path = str(path)
        self.base_name = served_name or self.model_spec
        self.max_batch_size, self.max_queue, self.max_tokens_limit = max_batch_size, max_queue, max_tokens_limit
        self.tensor_parallel_size, self.gpu_memory_utilization = tensor_parallel_size, gpu_memory_utilization
        self.max_lora_rank, self.max_loras, self.dtype = max_lora_rank, max_loras, dtype
        self.prefix_reuse = prefix_reuse  # vLLM's automatic prefix caching, the same idea as our prefix cache
        self._initial_adapters = dict(adapters or {})
        self.adapters: dict[str, str] = {}
        self._lora: dict[str, Any] = {}  # name -> LoRARequest
        self._ids = itertools.count(1)
        self.context_length: int | None = None
        self.created = int(time.time())
        self.served = 0
        self._engine: Any = None
        self._tok: Any = None
        self._active = 0
        self._closing = False

    async def start(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(model=self.model_path, served_model_name=self.base_name, dtype=self.dtype,
                               tensor_parallel_size=self.tensor_parallel_size,
                               gpu_memory_utilization=self.gpu_memory_utilization, max_num_seqs=self.max_batch_size,
                               enable_lora=True, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                               enable_prefix_caching=self.prefix_reuse)
        self._engine = AsyncLLMEngine.from_engine_args(args)
        self._tok = await self._engine.get_tokenizer()
        config = getattr(self._engine, "model_config", None)  # newer vLLM: an attribute; older: a coroutine
        if config is None:
            config = await self._engine.get_model_config()
        self.context_length = getattr(config, "max_model_len", None)
        for name, path in self._initial_adapters.items():
            await self.load_adapter(name, path)

    async def shutdown(self) -> None:
        self._closing = True
        while self._active:
            await asyncio.sleep(0.05)
        if self._engine is not None:
            self._engine.shutdown()

    # ------------------------------------------------------------------ models
    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def models(self) -> list[dict[str, Any]]:
        cards = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "retroformer",
                  "root": self.model_path, "parent": None, "max_model_len": self.context_length}]
        cards += [{"id": n, "object": "model", "created": self.created, "owned_by": "retroformer", "root": p,
                   "parent": self.base_name, "max_model_len": self.context_length} for n, p in self.adapters.items()]
        return cards

    def resolve(self, name: str | None) -> str | None:
        if not name or name == self.base_name:
            return None
        if name in self.adapters:
            return name
        raise model_not_found(name, self.model_names())

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        if not name or name == self.base_name:
            raise ServeError(f"'{name}' cannot name an adapter.", param="lora_name")
        if name in self.adapters:
            raise ServeError(f"The LoRA adapter '{name}' is already loaded; unload it first.", param="lora_name")
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(f"'{path}' is not a LoRA adapter folder (no adapter_config.json).", param="lora_path")
        request = LoRARequest(name, next(self._ids), str(folder))
        try:
            await self._engine.add_lora(request)
        except Exception as exc:  # vLLM raises ValueError / RuntimeError for bad adapters
            raise ServeError(f"Cannot load the LoRA adapter '{name}' from {path}: {exc}", param="lora_path") from exc
        self._lora[name], self.adapters[name] = request, str(folder)

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ServeError(f"The LoRA adapter '{name}' is not loaded.", status=404, param="lora_name")
        request = self._lora.pop(name)
        del self.adapters[name]
        await self._engine.remove_lora(request.lora_int_id)

    # ------------------------------------------------------------------ prompts
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        prefill = bool(chat) and chat[-1]["role"] == "assistant"
        text = self._tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=not prefill,
                                             continue_final_message=prefill)
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    # ------------------------------------------------------------------ generation
    def submit(self, model: str | None, prompt_ids: list[int], sampling: Sampling,
               on_delta: DeltaFn | None = None) -> _Handle:
        adapter = self.resolve(model)
        self.check(prompt_ids, sampling)
        if self._closing:
            raise ServeError("The server is shutting down.", status=503, type="server_error", headers={"Retry-After": "5"})
        if self._active >= self.max_queue:
            raise ServeError(f"The server is busy ({self._active} requests in flight, --max-queue {self.max_queue}).",
                             status=429, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self._active += 1
        task = asyncio.get_running_loop().create_task(self._run(adapter, prompt_ids, sampling, on_delta))
        return _Handle(task)

    async def generate(self, model: str | None, prompt_ids: list[int], sampling: Sampling,
                       on_delta: DeltaFn | None = None) -> Result:
        return await self.submit(model, prompt_ids, sampling, on_delta).result()

    async def _run(self, adapter: str | None, prompt_ids: list[int], sampling: Sampling,
                   on_delta: DeltaFn | None) -> Result:
        from vllm import SamplingParams

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None, seed=sampling.seed)
        request_id = uuid.uuid4().hex
        sent = [0] * sampling.n
        final: Any = None
        try:
            async for output in self._engine.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                                                      lora_request=self._lora.get(adapter) if adapter else None):
                final = output
                if on_delta is not None:
                    for o in output.outputs:  # cumulative text per choice
                        if len(o.text) > sent[o.index]:
                            on_delta(o.index, o.text[sent[o.index]:])
                            sent[o.index] = len(o.text)
        except asyncio.CancelledError:
            await self._engine.abort(request_id)
            raise
        finally:
            self._active -= 1
        choices = []
        for o in final.outputs:
            text, _ = apply_stop(o.text, sampling.stop)
            choices.append(Choice(o.index, text, o.finish_reason or "stop", len(o.token_ids)))
        self.served += 1
        return Result(adapter or self.base_name, len(final.prompt_token_ids or prompt_ids), choices)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.kind, "running": self._active, "max_queue": self.max_queue,
                "max_batch_size": self.max_batch_size, "served": self.served, "adapters": sorted(self.adapters),
                "closing": self._closing, "tensor_parallel_size": self.tensor_parallel_size}
