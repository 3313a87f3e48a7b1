"""``retroformer serve``'s transformers engine: the shared local :class:`~retroformer_cli.llm.engine.Engine`
(continuous batching, prompt-prefix reuse, LoRA adapters in mixed batches) behind the interface the FastAPI app
speaks: model names and cards, adapter load/unload, prompt encoding with OpenAI errors, the bounded queue
(HTTP 429 with ``Retry-After``), streaming callbacks on the event loop and a graceful drain.

It holds no generation code of its own: collect, eval, ppo's replays and serve run the same engine.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from retroformer_cli.errors import RetroformerError
from retroformer_cli.llm.engine.adapters import safe_adapter_name
from retroformer_cli.llm.engine.types import (
    AdapterNotLoaded,
    Choice,
    ContextTooLong,
    EngineClosed,
    EngineConfig,
    EngineFailed,
    EngineFault,
    RequestCancelled,
    Result,
    Sampling,
)

__all__ = ["Choice", "DeltaFn", "LengthLimits", "Result", "Sampling", "ServeError", "TransformersBackend",
           "model_not_found"]

BASE = "__base__"  # reserved: peft's name for "no adapter"


# ------------------------------------------------------------------------------------------------ errors
class ServeError(Exception):
    """An error with an HTTP status and OpenAI error fields (``type``, ``param``, ``code``)."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}


def model_not_found(name: str, known: Sequence[str]) -> ServeError:
    return ServeError(f"The model '{name}' does not exist. Served models: {', '.join(known)}.", status=404,
                      param="model", code="model_not_found")


def as_serve_error(exc: BaseException) -> ServeError:
    """The engine's errors as HTTP errors."""
    if isinstance(exc, ServeError):
        return exc
    if isinstance(exc, AdapterNotLoaded):
        return ServeError(str(exc), status=404, param="model", code="model_not_found")
    if isinstance(exc, ContextTooLong):
        return ServeError(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, EngineFailed):  # the model thread stopped: every request gets this until a restart
        return ServeError(str(exc), status=503, type="server_error", code="engine_failed")
    if isinstance(exc, EngineFault):  # the engine failed on this request (memory, a step): a retry may pass
        return ServeError(str(exc), status=503, type="server_error", code="engine_error", headers={"Retry-After": "1"})
    if isinstance(exc, EngineClosed):
        return ServeError("The server is shutting down.", status=503, type="server_error", code="shutting_down",
                          headers={"Retry-After": "5"})
    return ServeError(f"Generation failed: {exc}", status=500, type="server_error", code="generation_failed")


DeltaFn = Callable[[int, str], None]  # (choice index, new text), called on the event loop


class _Handle:
    """A queued request: ``await handle.result()``; a caller that goes away cancels it (its rows leave the
    batch at the next step)."""

    def __init__(self, future: asyncio.Future):
        self.future = future
        self.engine_handle: Any = None
        self.cancelled = False

    async def result(self) -> Result:
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        self.cancelled = True
        if self.engine_handle is not None:
            self.engine_handle.cancel()


class LengthLimits:
    """``max_tokens`` defaults and checks shared by the serving engines (they set ``context_length`` and
    ``max_tokens_limit``)."""

    context_length: int | None
    max_tokens_limit: int

    def default_max_tokens(self, prompt_len: int) -> int:
        room = (self.context_length - prompt_len) if self.context_length else self.max_tokens_limit
        return max(1, min(self.max_tokens_limit, room))

    def check(self, prompt_ids: Sequence[int], sampling: Sampling) -> None:
        if sampling.max_tokens > self.max_tokens_limit:
            raise ServeError(f"max_tokens is {sampling.max_tokens}; this server allows at most "
                             f"{self.max_tokens_limit} (--max-tokens-limit).", param="max_tokens")
        if self.context_length and len(prompt_ids) + sampling.max_tokens > self.context_length:
            raise ServeError(f"This model's maximum context length is {self.context_length} tokens; the prompt has "
                             f"{len(prompt_ids)} and max_tokens is {sampling.max_tokens}.", param="messages",
                             code="context_length_exceeded")


class TransformersBackend(LengthLimits):
    """In-process engine for ``serve``. ``await start()`` loads the model; ``await shutdown()`` drains."""

    kind = "transformers"

    def __init__(
        self,
        model: str = "embedded",
        *,
        served_name: str | None = None,
        adapters: dict[str, str] | None = None,
        cache_dir: Path | str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_tokens_limit: int = 1024,
        prefix_reuse: bool = True,
        prefix_cache_mb: int = 512,
        max_step_tokens: int = 512,
        prefill_chunk: int = 256,
        weights: str = "auto",
    ):
        from retroformer_cli.llm.model_cache import default_cache_dir

        if max_batch_size < 1 or max_queue < 1 or max_tokens_limit < 1:
            raise RetroformerError("--max-batch-size, --max-queue and --max-tokens-limit must be at least 1.")
        self.model_spec = str(model)
        self.base_name = served_name or self.model_spec
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.max_batch_size, self.max_queue, self.max_tokens_limit = max_batch_size, max_queue, max_tokens_limit
        self.config, self._own_path = EngineConfig.for_model(
            self.model_spec, self.cache_dir, device=device, dtype=dtype, threads=threads,
            max_batch_size=max_batch_size, max_step_tokens=max_step_tokens, prefill_chunk=prefill_chunk,
            prefix_reuse=prefix_reuse, prefix_cache_mb=prefix_cache_mb, weights=weights)
        self._initial_adapters = dict(adapters or {})
        self.created = int(time.time())
        self.served = 0
        self.engine: Any = None
        self._own_adapter: str | None = None  # --model is itself a LoRA folder: the base name runs it
        self._request_s = 0.5  # moving average of a request's time in the engine (for Retry-After)

    # -------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._start)
        for name, path in self._initial_adapters.items():
            await self.load_adapter(name, path)

    def _start(self) -> None:
        from retroformer_cli.llm.engine.scheduler import Engine

        self.engine = Engine(self.config, name=self.base_name)
        self.engine.start(wait=True)
        if self._own_path is not None:
            self._own_adapter = "__served_base__"
            self.engine.load_adapter(self._own_adapter, self._own_path, label=self.base_name)

    async def shutdown(self) -> None:
        """Refuse new requests, finish queued and running ones, stop the model thread."""
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)

    @property
    def context_length(self) -> int | None:
        return self.engine.context_length if self.engine is not None else None

    @property
    def info(self) -> dict[str, Any]:
        return self.engine.info if self.engine is not None else {}

    @property
    def step_sizes(self) -> Any:
        return self.engine.step_sizes

    # -------------------------------------------------------------------------------- models
    @property
    def adapters(self) -> dict[str, str]:
        """Served adapters: served name -> folder, read from the engine's one registry (the model thread
        writes it: an unloaded adapter leaves it before its last requests fail)."""
        if self.engine is None:
            return {}
        paths, labels = dict(self.engine.adapters), self.engine.adapter_labels
        return {labels.get(name, name): path for name, path in paths.items() if name != self._own_adapter}

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def models(self) -> list[dict[str, Any]]:
        base_root = self.info.get("path", self.model_spec)
        cards = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "retroformer",
                  "root": base_root, "parent": None, "max_model_len": self.context_length}]
        for name, path in self.adapters.items():
            cards.append({"id": name, "object": "model", "created": self.created, "owned_by": "retroformer",
                          "root": path, "parent": self.base_name, "max_model_len": self.context_length})
        return cards

    def resolve(self, name: str | None) -> str | None:
        """Engine adapter for a request's ``model`` (None = base); :class:`ServeError` 404 when unknown."""
        if not name or name == self.base_name:
            return self._own_adapter
        if name in self.adapters:
            return safe_adapter_name(name)
        raise model_not_found(name, self.model_names())

    async def load_adapter(self, name: str, path: str) -> None:
        if not name or name == self.base_name or name in (BASE, "__served_base__"):
            raise ServeError(f"'{name}' cannot name an adapter (it is the base model's name).", param="lora_name")
        if name in self.adapters:
            raise ServeError(f"The LoRA adapter '{name}' is already loaded; unload it first.", param="lora_name",
                             code="adapter_exists")
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(f"'{path}' is not a LoRA adapter folder (no adapter_config.json).", param="lora_path")
        # A served name may hold dots or slashes ("reflector-v1.2", "org/model"), which peft refuses.
        engine_name = safe_adapter_name(name)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.load_adapter, engine_name, str(folder),
                                                             name)
        except RetroformerError as exc:
            raise ServeError(str(exc), param="lora_path") from exc

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ServeError(f"The LoRA adapter '{name}' is not loaded.", status=404, param="lora_name",
                             code="adapter_not_found")
        # the model thread unloads it between steps; its queued and running requests then fail with 404, and new
        # ones get 404 once this returns
        await asyncio.get_running_loop().run_in_executor(None, self.engine.unload_adapter, safe_adapter_name(name))

    # -------------------------------------------------------------------------------- prompts
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        try:
            return self.engine.encode_chat(messages)
        except Exception as exc:  # jinja templates raise on role orders they do not support
            raise ServeError(f"The model's chat template rejected these messages: {exc}", param="messages") from exc

    def encode_prompt(self, text: str) -> list[int]:
        return self.engine.encode_text(text)

    # -------------------------------------------------------------------------------- requests
    def queue_depth(self) -> int:
        return self.engine.num_waiting() if self.engine is not None else 0

    def retry_after_s(self) -> int:
        rounds = math.ceil((self.queue_depth() + 1) / self.max_batch_size)
        return max(1, math.ceil(rounds * self._request_s))

    def submit(self, model: str | None, prompt_ids: list[int], sampling: Sampling,
               on_delta: DeltaFn | None = None) -> _Handle:
        """Validate and queue one request (raises :class:`ServeError` at once); ``await handle.result()``.

        ``on_delta(choice_index, text)`` is called on the event loop as text is produced (streaming).
        """
        adapter = self.resolve(model)
        self.check(prompt_ids, sampling)
        if self.engine is None or self.engine.closing:
            raise as_serve_error(EngineClosed("closing"))
        if self.queue_depth() >= self.max_queue:
            raise ServeError(f"The server is busy ({self.queue_depth()} requests queued, --max-queue "
                             f"{self.max_queue}); retry later.", status=429, type="rate_limit_error",
                             code="queue_full", headers={"Retry-After": str(self.retry_after_s())})
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        handle = _Handle(future)
        name = self.base_name if model is None or model == self.base_name else model

        def settle(outcome: Any) -> None:
            if future.done():
                return
            if isinstance(outcome, RequestCancelled) or handle.cancelled:
                future.cancel()
            elif isinstance(outcome, BaseException):
                future.set_exception(as_serve_error(outcome))
            else:
                self.served += 1
                self._request_s = 0.8 * self._request_s + 0.2 * outcome.total_s
                outcome.model = name
                future.set_result(outcome)

        def done(outcome: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop has stopped
                pass

        def delta(index: int, text: str) -> None:
            try:
                loop.call_soon_threadsafe(on_delta, index, text)
            except RuntimeError:
                pass

        try:
            handle.engine_handle = self.engine.submit(prompt_ids, sampling, adapter=adapter,
                                                      on_delta=delta if on_delta is not None else None, on_done=done)
        except RetroformerError as exc:
            raise as_serve_error(exc) from exc
        return handle

    async def generate(self, model: str | None, prompt_ids: list[int], sampling: Sampling,
                       on_delta: DeltaFn | None = None) -> Result:
        return await self.submit(model, prompt_ids, sampling, on_delta).result()

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        out = {"engine": self.kind, "queued": self.queue_depth(), "running": engine.num_running() if engine else 0,
               "max_queue": self.max_queue, "max_batch_size": self.max_batch_size, "served": self.served,
               "adapters": sorted(self.adapters), "closing": bool(engine and engine.closing),
               "failed": str(engine.failed) if engine is not None and engine.failed is not None else None}
        if engine is not None:
            out["forward_passes"] = engine.counters["forward_passes"]
            out["prompt_tokens"] = engine.counters["prompt_tokens"]
            out["cached_prompt_tokens"] = engine.counters["cached_tokens"]
            if engine.prefix is not None:
                out["prefix_cache"] = engine.prefix.stats()
        return out
