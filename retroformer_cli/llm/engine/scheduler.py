"""The engine: one model, one model thread, one continuous-batching scheduler with prompt-prefix reuse.

Callers on any thread (an asyncio loop, uvicorn's loop, a plain script) :meth:`Engine.submit` token ids and
get a :class:`RequestHandle`; callbacks run on the model thread (``on_delta`` for streamed text, ``on_done``
with the :class:`~.types.Result` or an exception), so async callers hop back with ``call_soon_threadsafe``
(:meth:`Engine.generate_async` does it).

Each scheduler step builds one forward pass:

1. every decoding sequence contributes its last sampled token;
2. prefilling sequences contribute their next prompt chunk (``prefill_chunk`` tokens, whole chunks only, so
   a prompt is always cut the same way) while the step has room (``max_step_tokens``); before a chunk, a
   sequence takes any blocks of its prompt that another request has computed meanwhile, and a chunk whose
   first block another sequence is computing in this very step waits a step and reuses it instead;
3. after the pass, sequences that reached the end of their prompt and decoding ones sample a token; finished
   sequences leave the batch at once, and waiting requests are admitted before the next pass.

Blocks are stored in the :class:`~.prefix_cache.PrefixCache` as each prompt chunk completes and when a
sequence finishes (its generated tokens too: the next ReAct step's prompt starts with them).

Greedy decoding is deterministic; with ``prefix_reuse`` on or off the same token ids come out unless float
reordering flips a near-tie (each greedy :class:`~.types.Choice` reports its smallest top-1/top-2 logit gap).
Sampling draws from a generator per sequence, seeded from the request's ``seed`` and choice index, so a seeded
request gives the same text whatever it is batched with.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from retroformer_cli.errors import BackendError, RetroformerError
from retroformer_cli.llm.base import apply_stop
from retroformer_cli.llm.engine.prefix_cache import PrefixCache, block_keys
from retroformer_cli.llm.engine.types import (
    AdapterNotLoaded,
    Choice,
    ContextTooLong,
    EngineClosed,
    EngineConfig,
    RequestCancelled,
    Result,
    Sampling,
    default_threads,
)

log = logging.getLogger("retroformer.engine")
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
_ids = itertools.count(1)
_started: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    # A model thread still inside torch when the interpreter exits can abort the process ("terminate called
    # without an active exception"); stop every engine first (queued work is abandoned).
    for engine in list(_started):
        engine.shutdown(drain=False, timeout=10)

DeltaFn = Callable[[int, str], None]  # (choice index, new text)
DoneFn = Callable[[Any], None]  # Result or BaseException


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` made concrete: CUDA when present; float32 on CPU (exact and, for small models, memory-bound
    anyway), bfloat16 (or float16 without bf16 support) on GPUs."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, dtype


# ------------------------------------------------------------------------------------------------ requests
class RequestHandle:
    """What :meth:`Engine.submit` returns: ``cancel()``, ``done()``, blocking ``result(timeout)``."""

    def __init__(self, engine: "Engine", req: "_Request"):
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


@dataclass(eq=False)
class _Request:
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
    seqs: list["_Seq"] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)  # completion tokens per choice
    event: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None


@dataclass(eq=False)
class _Seq:
    req: _Request
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


# ------------------------------------------------------------------------------------------------ engine
class Engine:
    """A transformers model behind a continuous-batching scheduler (see the module docstring).

    >>> engine = Engine(EngineConfig(model="embedded", cache_dir="ws/cache"))  # doctest: +SKIP
    >>> ids = engine.encode_chat([{"role": "user", "content": "Say hi."}])  # doctest: +SKIP
    >>> engine.submit(ids, Sampling(max_tokens=8)).result().choices[0].text  # doctest: +SKIP
    'Hi there! How can I'
    """

    def __init__(self, config: EngineConfig, name: str | None = None):
        config.validate()
        self.config = config
        self.name = name or config.model
        self.threads = config.threads if config.threads is not None else default_threads()
        self.adapters: dict[str, str] = {}  # name -> folder, as loaded (model thread writes)
        self.info: dict[str, Any] = {}
        self.context_length: int | None = None
        self.step_sizes: collections.deque[int] = collections.deque(maxlen=100_000)  # sequences per forward pass
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
                         "forward_passes": 0, "forward_tokens": 0, "draft_tokens": 0, "draft_accepted": 0}
        self.prefix: PrefixCache | None = None
        self._cv = threading.Condition()
        self._inbox: list[_Request] = []
        self._commands: list[Callable[[], None]] = []
        self._waiting: collections.deque[_Request] = collections.deque()
        self._waiting_count = 0
        self._running: list[_Seq] = []
        self._stop: str | None = None  # None | "drain" | "now"
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._local = threading.local()
        self._tok: Any = None
        self._base: Any = None
        self._peft: Any = None
        self._namespaces: dict[str | None, bytes] = {}
        self._mixed_adapters = True
        self._active_adapter: str | None = None
        self._rr = 0

    # -------------------------------------------------------------------------------- lifecycle
    def start(self, wait: bool = False, timeout: float | None = None) -> "Engine":
        """Start the model thread (it loads the model first). Idempotent."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=f"retroformer-engine-{self.name}",
                                                daemon=True)
                self._thread.start()
                _started.add(self)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; re-raise the load error if it failed."""
        self.start()
        if not self._ready.wait(timeout):
            raise BackendError(f"The model {self.name} did not load within {timeout} s.")
        if self._load_error is not None:
            raise self._load_error

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain`` finish queued and running ones, else fail them; stop the thread."""
        with self._cv:
            self._stop = "drain" if drain else "now"
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closing(self) -> bool:
        return self._stop is not None

    # -------------------------------------------------------------------------------- tokens
    def tokenizer(self) -> Any:
        """This thread's copy of the tokenizer (fast tokenizers must not be shared across threads)."""
        self.wait_ready()
        tok = getattr(self._local, "tok", None)
        if tok is None:
            import copy

            tok = self._local.tok = self._tok if threading.current_thread() is self._thread else copy.deepcopy(self._tok)
        return tok

    @property
    def chat(self) -> bool:
        self.wait_ready()
        return bool(getattr(self._tok, "chat_template", None))

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of chat messages with the model's template; a final assistant message is continued."""
        tok = self.tokenizer()
        if not self.chat:
            from retroformer_cli.llm.base import Message, messages_to_prompt

            return tok(messages_to_prompt([Message(m["role"], m["content"]) for m in messages]))["input_ids"]
        chat = [{"role": m["role"], "content": m["content"]} for m in messages]
        if chat and chat[-1]["role"] == "assistant":
            text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
        else:
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer()(text)["input_ids"]

    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise :class:`ContextTooLong` when the prompt and the answer do not fit the model's context."""
        if self.context_length and prompt_len + max_tokens > self.context_length:
            raise ContextTooLong(f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                 f"context of {self.name} ({self.context_length} tokens).")

    # -------------------------------------------------------------------------------- requests
    def submit(self, prompt_ids: Sequence[int], sampling: Sampling, *, adapter: str | None = None,
               on_delta: DeltaFn | None = None, on_done: DoneFn | None = None) -> RequestHandle:
        """Queue one request (thread-safe). It joins the running batch at the next step."""
        if sampling.n < 1:
            raise BackendError("n must be at least 1.")
        if not prompt_ids:
            raise BackendError("The prompt is empty.")
        req = _Request(next(_ids), [int(t) for t in prompt_ids], sampling, adapter, on_delta, on_done,
                       time.perf_counter())
        with self._cv:
            if self._stop is not None:
                raise EngineClosed(f"The engine for {self.name} is shutting down.")
            self._inbox.append(req)
            self._cv.notify_all()
        self.start()
        return RequestHandle(self, req)

    async def generate_async(self, prompt_ids: Sequence[int], sampling: Sampling, *, adapter: str | None = None,
                             on_delta: DeltaFn | None = None) -> Result:
        """``submit`` for asyncio callers; cancelling the awaiting task cancels the request."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        abandoned = False

        def settle(outcome: Any) -> None:
            if future.done():
                return
            if abandoned:  # the caller went away: nobody will read an exception ("never retrieved")
                future.cancel()
            elif isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        def done(outcome: Any) -> None:
            try:
                loop.call_soon_threadsafe(settle, outcome)
            except RuntimeError:  # the loop is gone (the caller's asyncio.run ended)
                pass

        handle = self.submit(prompt_ids, sampling, adapter=adapter, on_delta=on_delta, on_done=done)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abandoned = True
            handle.cancel()
            raise

    def num_waiting(self) -> int:
        return len(self._inbox) + self._waiting_count

    def num_running(self) -> int:
        return len({id(s.req) for s in self._running})

    # -------------------------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter under ``name`` (blocking; runs on the model thread between steps)."""
        self._call(lambda: self._load_adapter(name, str(path)))

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; its queued and running requests fail with :class:`AdapterNotLoaded`."""
        self._call(lambda: self._unload_adapter(name))

    def _call(self, fn: Callable[[], Any]) -> Any:
        self.wait_ready()
        if threading.current_thread() is self._thread:
            return fn()
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()

        with self._cv:
            if self._stop is not None:
                raise EngineClosed(f"The engine for {self.name} is shutting down.")
            self._commands.append(run)
            self._cv.notify_all()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # -------------------------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        out = {"model": self.name, "waiting": self.num_waiting(), "running": self.num_running(),
               "max_batch_size": self.config.max_batch_size, "prefix_reuse": self.config.prefix_reuse,
               "threads": self.threads, **self.counters}
        if self.prefix is not None:
            out["prefix_cache"] = self.prefix.stats()
        return out

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"engine": "retroformer", "threads": self.threads, "max_batch_size": cfg.max_batch_size,
                "max_step_tokens": cfg.max_step_tokens, "prefill_chunk": cfg.prefill_chunk,
                "prefix_reuse": cfg.prefix_reuse, "prefix_cache_mb": cfg.prefix_cache_mb, **self.info}

    # ================================================================================ model thread
    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - every caller gets it
            self._load_error = exc if isinstance(exc, RetroformerError) else BackendError(
                f"Cannot load the local model '{self.name}': {exc}")
            self._ready.set()
            self._fail_all(self._load_error)
            return
        self._ready.set()
        import torch

        with torch.inference_mode():
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._commands or self._running or self._waiting or self._stop):
                    self._cv.wait()
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                commands, self._commands = self._commands, []
                stop = self._stop
            self._waiting_count = len(self._waiting)
            for command in commands:
                command()
            self._reap_cancelled()
            if stop == "now":
                self._fail_all(EngineClosed(f"The engine for {self.name} was shut down."))
                return
            if stop == "drain" and not self._waiting and not self._running:
                with self._cv:
                    if not self._inbox and not self._commands:
                        return
                continue
            self._admit()
            self._waiting_count = len(self._waiting)
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # a failed forward fails its batch, never the engine
                    log.exception("engine step failed")
                    err = exc if isinstance(exc, RetroformerError) else BackendError(f"Local generation failed: {exc!r}")
                    for req in {id(s.req): s.req for s in self._running}.values():
                        self._finish_request(req, err)
                    self._running = []

    def _fail_all(self, err: BaseException) -> None:
        with self._cv:
            pending = list(self._inbox) + list(self._waiting)
            self._inbox.clear()
            self._waiting.clear()
            self._waiting_count = 0
            commands, self._commands = self._commands, []
        for req in pending + [s.req for s in self._running]:
            self._finish_request(req, err)
        self._running = []
        for command in commands:
            command()  # adapter commands report their own error (engine closed)

    # -------------------------------------------------------------------------------- loading
    def _load(self) -> None:
        import torch

        from retroformer_cli.llm.engine import attention
        from retroformer_cli.llm.engine.cpu_linear import pack_linear_layers
        from retroformer_cli.llm.model_cache import load_base_model

        torch.set_num_threads(self.threads)
        cfg = self.config
        device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        model, tok, info = load_base_model(cfg.model, cfg.cache_dir, device=device, dtype=getattr(torch, dtype))
        if getattr(model.config, "is_encoder_decoder", False) or not getattr(model, "_supports_attention_backend", False):
            raise BackendError(f"The model {self.name} ({type(model).__name__}) does not support transformers' "
                               "attention backends, which the engine needs (Llama, Qwen, Mistral, Phi-3, Gemma ... do).")
        packed = pack_linear_layers(model) if cfg.cpu_packed_linear else 0
        self._pad_small_batches = not packed and device == "cpu"
        model.set_attn_implementation(attention.register())
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(attention.keep_logit_rows)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id, tok.pad_token_id}
        self._stop_ids = {int(i) for i in eos_ids if i is not None}
        mc = model.config
        text_cfg = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
        self.context_length = getattr(text_cfg, "max_position_embeddings", None)
        heads = text_cfg.num_attention_heads
        self._kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
        self._head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        self._layers = text_cfg.num_hidden_layers
        self._dtype = getattr(torch, dtype)
        self._device = torch.device(device)
        self._token_bytes = self._layers * 2 * self._kv_heads * self._head_dim * self._dtype.itemsize
        bs = cfg.block_size
        self.prefix = PrefixCache(cfg.prefix_cache_mb * 2**20, bs) if cfg.prefix_reuse else None
        self._block_bytes = self._token_bytes * bs
        self._tok, self._base = tok, model
        self._local.tok = tok
        self._namespaces[None] = f"{info.get('path', cfg.model)}|{dtype}|base".encode()
        self.info = {**info, "device": device, "dtype": dtype, "threads": self.threads,
                     "kv_bytes_per_token": self._token_bytes, "packed_linear_layers": packed}

    def _load_adapter(self, name: str, path: str) -> None:
        if name in self.adapters or name == BASE_ADAPTER:
            raise BackendError(f"The LoRA adapter '{name}' is already loaded.")
        import warnings

        try:
            with warnings.catch_warnings():  # peft's own deprecation notices are not the user's business
                warnings.simplefilter("ignore", FutureWarning)
                if self._peft is None:
                    from peft import PeftModel

                    self._peft = PeftModel.from_pretrained(self._base, path, adapter_name=name)
                else:
                    self._peft.load_adapter(path, adapter_name=name)
            self._peft.eval()
        except Exception as exc:  # peft raises many kinds (shape mismatch, bad config, ...)
            raise BackendError(f"Cannot load the LoRA adapter '{name}' from {path} on {self.name}: {exc}") from exc
        self._active_adapter = None
        self.adapters[name] = path
        self._namespaces[name] = f"{self._namespaces[None].decode()}|lora:{name}:{next(_ids)}".encode()

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotLoaded(f"The LoRA adapter '{name}' is not loaded.")
        del self.adapters[name]
        err = AdapterNotLoaded(f"The LoRA adapter '{name}' was unloaded before this request finished.")
        for req in [r for r in self._waiting if r.adapter == name]:
            self._waiting.remove(req)
            self._finish_request(req, err)
        for req in {id(s.req): s.req for s in self._running if s.req.adapter == name}.values():
            self._finish_request(req, err)
        ns = self._namespaces.pop(name)
        if self.prefix is not None:
            self.prefix.drop_namespace(ns)
        if len(self._peft.peft_config) <= 1:
            self._base = self._peft.unload()  # removes the LoRA layers, returns the untouched base model
            self._peft = None
        else:
            self._peft.delete_adapter(name)
        self._active_adapter = None

    # -------------------------------------------------------------------------------- admission
    def _reap_cancelled(self) -> None:
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._finish_request(req, RequestCancelled(f"Request {req.id} was cancelled."))
        for req in {id(s.req): s.req for s in self._running if s.req.cancelled}.values():
            self._finish_request(req, RequestCancelled(f"Request {req.id} was cancelled."))

    def _admit(self) -> None:
        limit = self.config.max_batch_size
        while self._waiting:
            req = self._waiting[0]
            if self._running and len(self._running) + min(req.sampling.n, limit) > limit:
                return
            self._waiting.popleft()
            try:
                if req.adapter is not None and req.adapter not in self.adapters:
                    raise AdapterNotLoaded(f"The LoRA adapter '{req.adapter}' is not loaded.")
                self.check(len(req.prompt), req.sampling.max_tokens)
            except RetroformerError as err:
                self._finish_request(req, err)
                continue
            self._start(req)

    def _start(self, req: _Request) -> None:
        import torch

        req.started = time.perf_counter()
        self.counters["requests"] += 1
        seeds: list[Any] = [None] * req.sampling.n
        if not req.sampling.greedy:
            base_seed = req.sampling.seed if req.sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
            seeds = [(base_seed * 1_000_003 + i) % 2**63 for i in range(req.sampling.n)]
        for i in range(req.sampling.n):
            seq = _Seq(req, i, list(req.prompt), state="prefill" if i == 0 else "follow")
            if seeds[i] is not None:
                seq.rng = torch.Generator(device=self._device)
                seq.rng.manual_seed(seeds[i])
            req.seqs.append(seq)
        if req.sampling.max_tokens <= 0:
            for seq in req.seqs:
                self._finish_seq(seq, "length")
            return
        lead = req.seqs[0]
        lead.kv = self._alloc(len(req.prompt) + req.sampling.max_tokens + self.config.draft_tokens)
        if req.sampling.greedy and self.config.draft_tokens:
            lead.ngrams = {}
        if self.prefix is not None:
            lead.keys = block_keys(self._namespaces[req.adapter], req.prompt, self.config.block_size)
            self._reuse(lead)
        self._running.extend(req.seqs)

    def _alloc(self, capacity: int) -> Any:
        import torch

        return torch.empty(self._layers, 2, self._kv_heads, capacity, self._head_dim, dtype=self._dtype,
                           device=self._device)

    def _reuse(self, seq: _Seq) -> None:
        """Copy cached blocks that extend ``seq``'s computed prompt prefix (never the last prompt token)."""
        bs = self.config.block_size
        if self.prefix is None or seq.computed % bs:
            return
        usable = seq.keys[: (seq.prompt_len - 1) // bs]
        if len(usable) <= seq.computed // bs or usable[seq.computed // bs] not in self.prefix:
            return
        first = seq.computed // bs
        blocks = self.prefix.match(usable, skip=first)
        for i in range(first, len(blocks)):
            seq.kv[:, :, :, i * bs:(i + 1) * bs].copy_(blocks[i])
        if len(blocks) * bs > seq.computed:
            if seq.index == 0:  # choice 0 holds the request's prompt; the others copy it
                seq.req.cached += len(blocks) * bs - seq.computed
            seq.computed = len(blocks) * bs

    def _store(self, seq: _Seq, upto: int) -> None:
        """Put the whole blocks of ``seq.tokens[:upto]`` into the prefix cache."""
        if self.prefix is None:
            return
        bs = self.config.block_size
        whole = upto // bs
        if whole > len(seq.keys):
            previous = seq.keys[-1] if seq.keys else None
            seq.keys += block_keys(self._namespaces[seq.req.adapter], seq.tokens[: whole * bs], bs,
                                   start=len(seq.keys), previous=previous)
        kv = seq.kv
        self.prefix.insert(self._namespaces[seq.req.adapter], seq.keys[:whole],
                           lambda i: kv[:, :, :, i * bs:(i + 1) * bs].clone(), self._block_bytes)

    # -------------------------------------------------------------------------------- one step
    def _step(self) -> None:
        import torch

        from retroformer_cli.llm.engine.attention import Segment, StepContext, causal_mask, use_step

        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_step_tokens
        group = self._adapter_group()
        segments: list[Segment] = []
        ids: list[int] = []
        positions: list[int] = []
        names: list[str | None] = []
        logit_rows: list[int] = []
        scheduled: list[tuple[_Seq, int]] = []
        samplers: list[tuple[_Seq, int, list[int]]] = []  # (sequence, its first logit row, draft tokens)

        def add(seq: _Seq, tokens: list[int], logits: int = 0, draft: list[int] | None = None) -> None:
            n = len(tokens)
            segments.append(Segment(seq.kv, len(ids), n, seq.computed, causal_mask(n, seq.computed, None, self._device)))
            ids.extend(tokens)
            positions.extend(range(seq.computed, seq.computed + n))
            names.extend([seq.req.adapter] * n)
            scheduled.append((seq, n))
            if logits:
                samplers.append((seq, len(logit_rows), draft or []))
                logit_rows.extend(range(len(ids) - logits, len(ids)))

        for seq in self._running:
            if seq.state == "decode" and (group is None or seq.req.adapter == group[0]):
                draft = self._draft(seq, budget - 1)
                add(seq, [seq.tokens[-1], *draft], 1 + len(draft), draft)
                budget -= 1 + len(draft)
        computing: set[bytes] = set()
        for seq in self._running:
            if seq.state != "prefill" or (group is not None and seq.req.adapter != group[0]):
                continue
            self._reuse(seq)
            take = min(seq.prompt_len - seq.computed, cfg.prefill_chunk)
            if take > budget:
                if segments:
                    continue  # whole chunks only: a prompt is cut the same way whatever else runs
                take = budget
            first = seq.computed // bs
            if self.prefix is not None and seq.computed % bs == 0 and first < len(seq.keys) and seq.keys[first] in computing:
                continue  # another sequence computes this very prefix now: reuse it next step
            computing.update(seq.keys[first:(seq.computed + take) // bs])
            add(seq, seq.tokens[seq.computed:seq.computed + take], int(seq.computed + take == seq.prompt_len))
            budget -= take
        if not segments:
            return
        if 1 < len(ids) < 4 and self._pad_small_batches:
            # PyTorch's own CPU GEMM takes a slower path with 2 or 3 rows than with 4 (measured; oneDNN-packed
            # layers do not): pad with rows that attend to nothing and whose logits are never read.
            pad = 4 - len(ids)
            segments.append(Segment(None, len(ids), pad, 0))
            ids.extend([0] * pad)
            positions.extend([0] * pad)
            names.extend([names[-1]] * pad)
        device = self._device
        ctx = StepContext(segments, torch.tensor(logit_rows, dtype=torch.long, device=device)
                          if len(logit_rows) < len(ids) else None)
        kwargs: dict[str, Any] = {}
        model = self._select_adapters(names, kwargs)
        with use_step(ctx):
            try:
                out = model(input_ids=torch.tensor(ids, device=device).view(-1, 1),
                            position_ids=torch.tensor(positions, device=device).view(-1, 1),
                            use_cache=False, **kwargs)
            except ValueError:
                if "adapter_names" not in kwargs:
                    raise
                # peft refuses mixed batches for some adapter kinds (DoRA, modules_to_save): from now on each
                # step runs one adapter's sequences (round robin). Nothing was written for this step's tokens
                # that a retry would not overwrite.
                self._mixed_adapters = False
                return
        self.counters["forward_passes"] += 1
        self.counters["forward_tokens"] += len(ids)
        self.step_sizes.append(len(scheduled))
        for seq, n in scheduled:
            seq.computed += n
            if seq.state == "prefill" and self.prefix is not None:
                self._store(seq, seq.computed)
        logits = out.logits[:, -1, :]
        best, margins = self._greedy(logits, [(r0, 1 + len(d)) for s, r0, d in samplers if s.req.sampling.greedy])
        for seq, r0, draft in samplers:
            if seq.state == "prefill":
                seq.state = "decode"
                for follower in seq.req.seqs[1:]:
                    self._fork(seq, follower, logits[r0], best.get(r0), margins.get(r0))
            if not seq.req.sampling.greedy:
                self._append(seq, self._sample(seq, logits[r0]))
                continue
            accepted = [r0]  # rows whose prediction is kept: the first, then one per draft token confirmed
            for i, token in enumerate(draft):
                if best[r0 + i] != token:
                    break
                accepted.append(r0 + i + 1)
            if draft:
                self.counters["draft_tokens"] += len(draft)
                self.counters["draft_accepted"] += len(accepted) - 1
                seq.computed -= len(draft) - (len(accepted) - 1)  # keys/values past the last confirmed draft are stale
            for row in accepted:
                self._note_margin(seq, margins[row])
                self._append(seq, best[row])
                if seq.state == "done":
                    break

    def _draft(self, seq: _Seq, room: int) -> list[int]:
        """Prompt-lookup drafting (greedy requests): if the last three tokens occurred earlier in the sequence,
        propose the tokens that followed them. The forward pass checks the draft; a confirmed prefix is kept, so
        the output is exactly greedy decoding's, in fewer passes when the model copies from its context (entity
        names, actions, object ids)."""
        k = min(self.config.draft_tokens, room, seq.req.sampling.max_tokens - len(seq.generated) - 1)
        if k <= 0 or not seq.req.sampling.greedy or seq.ngrams is None:
            return []
        tokens = seq.tokens
        index = seq.ngrams
        for end in range(seq.indexed, len(tokens) - 1):  # index trigrams ending before the last token
            if end >= 2:
                index[(tokens[end - 2], tokens[end - 1], tokens[end])] = end
        seq.indexed = max(seq.indexed, len(tokens) - 1)
        if len(tokens) < 3:
            return []
        at = index.get((tokens[-3], tokens[-2], tokens[-1]))
        if at is None:
            return []
        return tokens[at + 1: at + 1 + k]

    def _adapter_group(self) -> tuple[str | None] | None:
        """With mixed-adapter batches off, the one adapter whose sequences run this step (round robin)."""
        if self._mixed_adapters or self._peft is None:
            return None
        present = list(dict.fromkeys(s.req.adapter for s in self._running if s.state in ("prefill", "decode")))
        if not present:
            return None
        self._rr += 1
        return (present[self._rr % len(present)],)

    def _select_adapters(self, names: list[str | None], kwargs: dict[str, Any]) -> Any:
        if self._peft is None:
            return self._base
        distinct = set(names)
        if distinct == {None}:
            return _BaseOnly(self._peft)
        if len(distinct) == 1:
            name = names[0]
            if self._active_adapter != name:
                self._peft.set_adapter(name)
                self._active_adapter = name
            return self._peft
        kwargs["adapter_names"] = [BASE_ADAPTER if n is None else n for n in names]
        return self._peft

    def _fork(self, lead: _Seq, follower: _Seq, lead_logits: Any, greedy_token: int | None,
              margin: float | None) -> None:
        """n > 1: choice i copies choice 0's prompt keys/values and takes its own first token."""
        follower.kv = self._alloc(follower.prompt_len + follower.req.sampling.max_tokens + self.config.draft_tokens)
        follower.kv[:, :, :, :lead.prompt_len].copy_(lead.kv[:, :, :, :lead.prompt_len])
        follower.computed = lead.prompt_len
        follower.keys = list(lead.keys)
        follower.ngrams = dict(lead.ngrams) if lead.ngrams is not None else None
        follower.indexed = lead.indexed
        follower.state = "decode"
        if follower.req.sampling.greedy:
            self._note_margin(follower, margin)
            self._append(follower, int(greedy_token))  # type: ignore[arg-type]
        else:
            self._append(follower, self._sample(follower, lead_logits))

    # -------------------------------------------------------------------------------- sampling and stopping
    @staticmethod
    def _greedy(logits: Any, spans: list[tuple[int, int]]) -> tuple[dict[int, int], dict[int, float]]:
        """Best token and top-1/top-2 logit gap of the rows in ``spans`` ((first row, count) pairs)."""
        import torch

        rows = [r for first, count in spans for r in range(first, first + count)]
        if not rows:
            return {}, {}
        if rows == list(range(logits.shape[0])):
            picked = logits.float().clone()
        else:
            picked = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device)).float()
        top, idx = picked.max(dim=-1)
        picked.scatter_(1, idx.unsqueeze(1), float("-inf"))
        second = picked.max(dim=-1).values
        return dict(zip(rows, idx.tolist())), dict(zip(rows, (top - second).tolist()))

    @staticmethod
    def _note_margin(seq: _Seq, margin: float | None) -> None:
        if margin is not None:
            seq.min_margin = margin if seq.min_margin is None else min(seq.min_margin, margin)

    def _sample(self, seq: _Seq, logits: Any) -> int:
        import torch

        sp = seq.req.sampling
        probs = torch.softmax(logits.float() / sp.temperature, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < sp.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=seq.rng).item())

    def _append(self, seq: _Seq, token: int) -> None:
        seq.tokens.append(token)
        seq.generated.append(token)
        sp = seq.req.sampling
        if token in self._stop_ids:
            seq.generated.pop()
            self._finish_seq(seq, "stop", counted=len(seq.generated) + 1)
            return
        streaming = seq.req.on_delta is not None
        if sp.stop or streaming:
            text = self._decode(seq.generated)
            cut, stopped = apply_stop(text, sp.stop)
            if stopped:
                seq.text = cut
                self._finish_seq(seq, "stop", decoded=True)
                return
            if streaming:
                hold = max((len(s) for s in sp.stop), default=1) - 1
                safe = (text[: len(text) - hold] if hold else text).rstrip("\ufffd")
                if len(safe) > seq.sent:
                    self._emit(seq, safe[seq.sent:])
                    seq.sent = len(safe)
        if len(seq.generated) >= sp.max_tokens:
            self._finish_seq(seq, "length")

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _emit(self, seq: _Seq, text: str) -> None:
        try:
            seq.req.on_delta(seq.index, text)  # type: ignore[misc]
        except Exception:  # a caller's callback must not stop the engine
            log.exception("on_delta callback failed")

    def _finish_seq(self, seq: _Seq, reason: str, counted: int | None = None, decoded: bool = False) -> None:
        if not decoded:
            seq.text = self._decode(seq.generated) if seq.generated else ""
        seq.finish_reason = reason
        if seq.req.on_delta is not None and len(seq.text) > seq.sent:
            self._emit(seq, seq.text[seq.sent:])
            seq.sent = len(seq.text)
        seq.state = "done"
        seq.req.counts[seq.index] = counted if counted is not None else len(seq.generated)
        if seq.kv is not None:
            if self.prefix is not None and seq.computed:
                self._store(seq, min(seq.computed, len(seq.tokens)))
            seq.kv = None
        if seq in self._running:
            self._running.remove(seq)
        req = seq.req
        if all(s.state == "done" for s in req.seqs):
            now = time.perf_counter()
            choices = [Choice(s.index, s.text, s.finish_reason or "length", req.counts[s.index], list(s.generated),
                              s.min_margin) for s in req.seqs]
            name = self.name if req.adapter is None else req.adapter
            result = Result(name, len(req.prompt), choices, cached_tokens=req.cached,
                            queued_s=round((req.started or now) - req.enqueued, 6), total_s=round(now - req.enqueued, 6))
            self.counters["prompt_tokens"] += result.prompt_tokens
            self.counters["cached_tokens"] += result.cached_tokens
            self.counters["completion_tokens"] += result.completion_tokens
            self._finish_request(req, result)

    def _finish_request(self, req: _Request, outcome: Any) -> None:
        if req.event.is_set():
            return
        for seq in req.seqs:
            seq.kv = None
            if seq in self._running:
                self._running.remove(seq)
        req.outcome = outcome
        req.event.set()
        if req.on_done is not None:
            try:
                req.on_done(outcome)
            except Exception:  # a caller's callback must not stop the engine
                log.exception("on_done callback failed")


class _BaseOnly:
    """Call a peft model with its adapters disabled (a batch of base-model rows only)."""

    def __init__(self, peft_model: Any):
        self.peft = peft_model

    def __call__(self, **kwargs: Any) -> Any:
        with self.peft.disable_adapter():
            return self.peft(**kwargs)
