"""The transformers serving engine: one base model, several LoRA adapters, dynamically batched generation.

Requests wait in a bounded queue. One asyncio worker takes the oldest waiting request and every other waiting
request with the same sampling settings (temperature, top_p, seed, stop strings), up to ``max_batch_size``
sequences; while a burst is still arriving it keeps collecting (until no new request came for
``batch_wait_ms``, at most ``max_batch_wait_ms``). It left-pads them and runs one ``model.generate`` on the engine's single model thread. Requests for
different LoRA adapters share a batch: peft's ``adapter_names=`` generate argument routes each row through its
own adapter (``"__base__"`` for the base model). Each row stops at its own ``max_tokens`` (a per-row stopping
criterion), so a short request does not pay for a long neighbour beyond the batch's lifetime.

Only the model thread touches the model; adapters are loaded and unloaded on that same thread, between
batches. When the queue holds ``max_queue`` requests, new ones are refused with :class:`QueueFull`
(HTTP 429 with ``Retry-After``). :meth:`TransformersEngine.shutdown` refuses new work, finishes everything
queued or running, then stops the thread.

Greedy decoding gives the same text batched or alone (left padding, fp32). Sampling with a ``seed`` is
reproducible for the same batch composition only (a batch shares one RNG).

Nothing heavy is imported at module level.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from retroformer_cli.errors import RetroformerError
from retroformer_cli.llm.base import apply_stop, messages_to_prompt
from retroformer_cli.llm.hf_local import finish_tokens

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


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


# ------------------------------------------------------------------------------------------------ types
@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1

    @property
    def batch_key(self) -> tuple:
        """Requests with the same key can share one ``generate`` call (greedy ignores seed and top_p)."""
        if self.temperature <= 0:
            return (0.0, 1.0, None, self.stop)
        return (self.temperature, self.top_p, self.seed, self.stop)


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Result:
    model: str
    prompt_tokens: int
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


DeltaFn = Callable[[int, str], None]  # (choice index, new text), called on the event loop


@dataclass
class _Request:
    adapter: str | None
    prompt_ids: list[int]
    sampling: Sampling
    future: asyncio.Future
    on_delta: DeltaFn | None
    enqueued: float
    cancelled: bool = False

    @property
    def key(self) -> tuple:
        return self.sampling.batch_key

    async def result(self) -> Result:
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancelled = True  # a client that left: its rows stop at the next decoding step
            raise


@dataclass
class _Row:
    req: _Request
    index: int  # choice index within its request
    emit: Callable[[str], None] | None = None
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters already streamed
    done: bool = False


# ------------------------------------------------------------------------------------------------ engine
class TransformersEngine:
    """In-process transformers engine. ``await start()`` loads the model; ``await shutdown()`` drains."""

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
        batch_wait_ms: float = 10.0,
        max_batch_wait_ms: float = 100.0,
        max_tokens_limit: int = 1024,
        mixed_adapter_batches: bool = True,
    ):
        from retroformer_cli.llm.model_cache import default_cache_dir

        if max_batch_size < 1 or max_queue < 1 or max_tokens_limit < 1:
            raise RetroformerError("--max-batch-size, --max-queue and --max-tokens-limit must be at least 1.")
        self.model_spec = str(model)
        self.base_name = served_name or self.model_spec
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.device_spec, self.dtype_spec = device, dtype
        self.threads = threads if threads is not None else min(2, os.cpu_count() or 1)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch_wait_ms, self.max_tokens_limit = batch_wait_ms, max_tokens_limit
        self.max_batch_wait_ms = max(batch_wait_ms, max_batch_wait_ms)
        self.mixed_adapter_batches = mixed_adapter_batches
        self._initial_adapters = dict(adapters or {})
        self.adapters: dict[str, str] = {}  # name -> path, as loaded
        self.context_length: int | None = None
        self.created = int(time.time())
        self.batches: collections.deque[int] = collections.deque(maxlen=10_000)
        self.served = 0
        self._base: Any = None  # the transformers model (possibly wrapped in a peft model below)
        self._peft: Any = None
        self._tok: Any = None  # model thread only
        self._front_tok: Any = None  # event loop only (fast tokenizers are not shareable across threads)
        self._chat = False
        self._stop_ids: set[int] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._running = 0  # requests inside a batch now
        self._batch_s = 0.5  # moving average of one batch's wall time (for Retry-After)
        self.info: dict[str, Any] = {}

    # -------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-model")
        await loop.run_in_executor(self._executor, self._load)
        for name, path in self._initial_adapters.items():
            await self.load_adapter(name, path)
        self._wakeup = asyncio.Event()
        self._worker = loop.create_task(self._work(), name="serve-batcher")

    def _load(self) -> None:
        import torch

        from retroformer_cli.llm.model_cache import load_model_and_tokenizer

        torch.set_num_threads(self.threads)
        device = self.device_spec
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.dtype_spec
        if dtype == "auto":
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device.startswith("cuda") else "float32"
        model, tok, info = load_model_and_tokenizer(self.model_spec, self.cache_dir, device=device,
                                                    dtype=getattr(torch, dtype))
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id, tok.pad_token_id}
        self._stop_ids = {int(i) for i in eos_ids if i is not None}
        self._chat = bool(getattr(tok, "chat_template", None))
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.info = {**info, "device": device, "dtype": dtype, "threads": self.threads}
        self._tok, self._front_tok, self._base = tok, copy.deepcopy(tok), model

    async def shutdown(self) -> None:
        """Refuse new requests, finish queued and running ones, stop the model thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -------------------------------------------------------------------------------- models
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
        """Adapter name for a request's ``model`` (None = base); :class:`ServeError` 404 when unknown."""
        if not name or name == self.base_name:
            return None
        if name in self.adapters:
            return name
        raise model_not_found(name, self.model_names())

    async def load_adapter(self, name: str, path: str) -> None:
        if not name or name == self.base_name or name == BASE:
            raise ServeError(f"'{name}' cannot name an adapter (it is the base model's name).", param="lora_name")
        if name in self.adapters:
            raise ServeError(f"The LoRA adapter '{name}' is already loaded; unload it first.", param="lora_name",
                             code="adapter_exists")
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ServeError(f"'{path}' is not a LoRA adapter folder (no adapter_config.json).", param="lora_path")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load_adapter, name, str(folder))
        self.adapters[name] = str(folder)

    def _load_adapter(self, name: str, path: str) -> None:
        try:
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self._base, path, adapter_name=name)
            else:
                self._peft.load_adapter(path, adapter_name=name)
            self._peft.eval()
        except Exception as exc:  # peft raises many kinds (shape mismatch, bad config, ...)
            raise ServeError(f"Cannot load the LoRA adapter '{name}' from {path} on {self.base_name}: {exc}",
                             param="lora_path") from exc

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ServeError(f"The LoRA adapter '{name}' is not loaded.", status=404, param="lora_name",
                             code="adapter_not_found")
        del self.adapters[name]  # new requests for it now get 404; queued ones fail when their batch forms
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload_adapter, name)

    def _unload_adapter(self, name: str) -> None:
        if len(self._peft.peft_config) <= 1:
            self._base = self._peft.unload()  # removes the LoRA layers, returns the untouched base model
            self._peft = None
        else:
            self._peft.delete_adapter(name)

    # -------------------------------------------------------------------------------- prompts
    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        tok = self._front_tok
        if not self._chat:
            from retroformer_cli.llm.base import Message

            return tok(messages_to_prompt([Message(m["role"], m["content"]) for m in messages]))["input_ids"]
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            if chat and chat[-1]["role"] == "assistant":  # continue a prefilled answer
                text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
            else:
                text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja templates raise on role orders they do not support
            raise ServeError(f"The model's chat template rejected these messages: {exc}", param="messages") from exc
        return tok(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        return self._front_tok(text)["input_ids"]

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

    # -------------------------------------------------------------------------------- requests
    def queue_depth(self) -> int:
        return len(self._pending)

    def retry_after_s(self) -> int:
        batches_ahead = math.ceil((len(self._pending) + 1) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_s))

    def submit(self, model: str | None, prompt_ids: list[int], sampling: Sampling,
               on_delta: DeltaFn | None = None) -> "_Request":
        """Validate and queue one request (raises :class:`ServeError` at once); ``await handle.result()``.

        ``on_delta(choice_index, text)`` is called on the event loop as text is produced (streaming).
        """
        adapter = self.resolve(model)
        self.check(prompt_ids, sampling)
        if self._closing or self._worker is None:
            raise ServeError("The server is shutting down.", status=503, type="server_error",
                             code="shutting_down", headers={"Retry-After": "5"})
        if len(self._pending) >= self.max_queue:
            raise ServeError(f"The server is busy ({len(self._pending)} requests queued, --max-queue "
                             f"{self.max_queue}); retry later.", status=429, type="rate_limit_error",
                             code="queue_full", headers={"Retry-After": str(self.retry_after_s())})
        loop = asyncio.get_running_loop()
        req = _Request(adapter, list(prompt_ids), sampling, loop.create_future(), on_delta, time.perf_counter())
        self._pending.append(req)
        assert self._wakeup is not None
        self._wakeup.set()
        return req

    async def generate(self, model: str | None, prompt_ids: list[int], sampling: Sampling,
                       on_delta: DeltaFn | None = None) -> Result:
        return await self.submit(model, prompt_ids, sampling, on_delta).result()

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take([self._pending.popleft()])
            # Debounce: while requests keep arriving (a burst of clients), keep collecting; go once no new one
            # came for batch_wait_ms, the batch is full, or max_batch_wait_ms passed since the first.
            waited, size = 0.0, 0
            while (len(batch) != size and sum(r.sampling.n for r in batch) < self.max_batch_size
                   and self.batch_wait_ms > 0 and waited < self.max_batch_wait_ms and not self._closing):
                size = len(batch)
                await asyncio.sleep(self.batch_wait_ms / 1000)
                waited += self.batch_wait_ms
                batch = self._take(batch)
            batch = [r for r in batch if not r.cancelled and not r.future.done()]
            if batch:
                await self._dispatch(batch)

    def _take(self, batch: list[_Request]) -> list[_Request]:
        """Move waiting requests that can share ``batch[0]``'s generate call into ``batch`` (oldest first)."""
        key, adapter = batch[0].key, batch[0].adapter
        rows = sum(r.sampling.n for r in batch)
        for r in list(self._pending):
            if rows + r.sampling.n > self.max_batch_size:
                continue
            if r.key == key and (self.mixed_adapter_batches or r.adapter == adapter):
                self._pending.remove(r)
                batch.append(r)
                rows += r.sampling.n
        return batch

    async def _dispatch(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        rows: list[_Row] = []
        for req in batch:
            for i in range(req.sampling.n):
                emit = None
                if req.on_delta is not None:
                    emit = (lambda text, fn=req.on_delta, i=i: loop.call_soon_threadsafe(fn, i, text))
                rows.append(_Row(req, i, emit))
        self._running = len(batch)
        started = time.perf_counter()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._run_batch, rows)
        except BaseException as exc:
            err = exc if isinstance(exc, ServeError) else ServeError(
                f"Generation failed: {exc!r}", status=500, type="server_error", code="generation_failed")
            for req in batch:
                if req.cancelled:
                    req.future.cancel()
                elif not req.future.done():
                    req.future.set_exception(err)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._running = 0
        self._batch_s = 0.8 * self._batch_s + 0.2 * (time.perf_counter() - started)
        by_req: dict[int, list[Choice]] = collections.defaultdict(list)
        errors: dict[int, ServeError] = {}
        for row, out in zip(rows, outcomes):
            if isinstance(out, ServeError):
                errors[id(row.req)] = out
            else:
                by_req[id(row.req)].append(out)
        for req in batch:
            if req.future.done():
                continue
            if req.cancelled:
                req.future.cancel()
            elif id(req) in errors:
                req.future.set_exception(errors[id(req)])
            else:
                self.served += 1
                name = self.base_name if req.adapter is None else req.adapter
                req.future.set_result(Result(name, len(req.prompt_ids), by_req[id(req)]))

    # -------------------------------------------------------------------------------- model thread
    def _run_batch(self, rows: list[_Row]) -> list[Choice | ServeError]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        outcomes: list[Choice | ServeError | None] = [None] * len(rows)
        live: list[int] = []
        for k, row in enumerate(rows):
            if row.req.adapter is not None and row.req.adapter not in self._loaded_adapters():
                outcomes[k] = ServeError(f"The LoRA adapter '{row.req.adapter}' was unloaded before this request "
                                         "ran.", status=404, param="model", code="model_not_found")
            else:
                live.append(k)
        if not live:
            return outcomes  # type: ignore[return-value]
        rows_live = [rows[k] for k in live]
        sampling = rows_live[0].req.sampling
        tok = self._tok
        width = max(len(r.req.prompt_ids) for r in rows_live)
        pad = tok.pad_token_id
        ids = [[pad] * (width - len(r.req.prompt_ids)) + r.req.prompt_ids for r in rows_live]
        mask = [[0] * (width - len(r.req.prompt_ids)) + [1] * len(r.req.prompt_ids) for r in rows_live]
        model = self._peft if self._peft is not None else self._base
        device = self._base.device
        enc = {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}
        limits = [r.req.sampling.max_tokens for r in rows_live]
        self.batches.append(len(rows_live))

        class RowStop(StoppingCriteria):  # each row ends at its own max_tokens, or when its client left
            def __call__(self, input_ids, scores, **kwargs):
                n = input_ids.shape[1] - width
                return torch.tensor([n >= lim or r.req.cancelled for lim, r in zip(limits, rows_live)],
                                    device=input_ids.device)

        kwargs: dict[str, Any] = {"max_new_tokens": max(limits), "pad_token_id": pad,
                                  "stopping_criteria": StoppingCriteriaList([RowStop()])}
        sampled = sampling.temperature > 0
        if sampled:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=[s for s in sampling.stop if s], tokenizer=tok)
        if any(r.emit is not None for r in rows_live):
            kwargs["streamer"] = _Streamer(self, rows_live)
        names = [r.req.adapter for r in rows_live]
        try:
            with torch.inference_mode(), self._adapter_context(names, kwargs):
                if sampled and sampling.seed is not None:
                    cuda = [device.index or 0] if device.type == "cuda" else []
                    with torch.random.fork_rng(devices=cuda):
                        torch.manual_seed(sampling.seed)
                        out = model.generate(**enc, **kwargs)
                else:
                    out = model.generate(**enc, **kwargs)
        except ValueError:
            if "adapter_names" not in kwargs:
                raise
            # peft refuses mixed batches for some adapter kinds (e.g. DoRA, modules_to_save): from now on
            # requests for different adapters form separate batches.
            self.mixed_adapter_batches = False
            for adapter in dict.fromkeys(names):
                part = [k for k, r in zip(live, rows_live) if r.req.adapter == adapter]
                for k, outcome in zip(part, self._run_batch([rows[k] for k in part])):
                    outcomes[k] = outcome
            return outcomes  # type: ignore[return-value]
        gen = out[:, width:].tolist()
        for k, row, toks in zip(live, rows_live, gen):
            choice = self._finish(row, toks[: row.req.sampling.max_tokens])
            if row.emit is not None and len(choice.text) > row.sent:
                row.emit(choice.text[row.sent:])
            outcomes[k] = choice
        return outcomes  # type: ignore[return-value]

    def _loaded_adapters(self) -> set[str]:
        return set(self._peft.peft_config) if self._peft is not None else set()

    def _adapter_context(self, names: list[str | None], kwargs: dict[str, Any]):
        import contextlib

        if self._peft is None:
            return contextlib.nullcontext()
        distinct = set(names)
        if distinct == {None}:
            return self._peft.disable_adapter()
        if len(distinct) == 1:
            self._peft.set_adapter(names[0])
            return contextlib.nullcontext()
        kwargs["adapter_names"] = [BASE if n is None else n for n in names]  # peft's mixed-adapter batch
        return contextlib.nullcontext()

    def _finish(self, row: _Row, ids: list[int]) -> Choice:
        text, reason, n = finish_tokens(ids, self._stop_ids, row.req.sampling.stop, self._decode)
        return Choice(row.index, text, reason, n)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.kind, "queued": len(self._pending), "running": self._running,
                "max_queue": self.max_queue, "max_batch_size": self.max_batch_size, "served": self.served,
                "batches": len(self.batches), "adapters": sorted(self.adapters), "closing": self._closing}


class _Streamer:
    """A ``generate`` streamer for a whole batch: turns each row's new tokens into text deltas.

    Text that might still become part of a stop string, or an incomplete UTF-8 character, is held back; the
    final text (sent once generation ends) always completes what was streamed.
    """

    def __init__(self, engine: TransformersEngine, rows: list[_Row]):
        self.engine, self.rows, self.prompt_seen = engine, rows, False
        self.hold = max((len(s) for s in rows[0].req.sampling.stop), default=1) - 1

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first pushes the prompt
            self.prompt_seen = True
            return
        for row, tok_id in zip(self.rows, value.reshape(-1).tolist()):
            if row.done or row.emit is None:
                continue
            if tok_id in self.engine._stop_ids or len(row.ids) >= row.req.sampling.max_tokens:
                row.done = True
                continue
            row.ids.append(int(tok_id))
            text, stopped = apply_stop(self.engine._decode(row.ids), row.req.sampling.stop)
            if stopped:
                row.done = True
                safe = text
            else:
                safe = text[: len(text) - self.hold] if self.hold else text
                safe = safe.rstrip("\ufffd")
            if len(safe) > row.sent:
                row.emit(safe[row.sent:])
                row.sent = len(safe)

    def end(self) -> None:
        pass
