"""The engine: one model, one model thread, one continuous-batching scheduler with prompt-prefix reuse.

Callers on any thread use the methods of :class:`~.frontend.EngineFrontend` (``submit``, ``generate_async``,
``load_adapter`` ...); this module is the model thread's side: loading, admission, the steps, finishing. How a
request ends when something fails on the way (its admission, a step, the thread itself) is :mod:`.endings`.

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

import collections
import logging
import time
from typing import Any

from retroformer_cli.errors import BackendError, RetroformerError, missing_extra
from retroformer_cli.llm.base import apply_stop
from retroformer_cli.llm.engine.adapters import Adapters
from retroformer_cli.llm.engine.batch import StepBatch
from retroformer_cli.llm.engine.endings import EngineEndings, as_fault
from retroformer_cli.llm.engine.model import LoadedModel, load_model
from retroformer_cli.llm.engine.prefix_cache import PrefixCache, block_keys
from retroformer_cli.llm.engine.requests import RequestHandle, Request, Seq
from retroformer_cli.llm.engine.sampling import greedy_rows, note_margin, prompt_lookup_draft, sample_token, streamable
from retroformer_cli.llm.engine.types import AdapterNotLoaded, EngineClosed, EngineConfig, RequestCancelled

__all__ = ["Engine", "RequestHandle"]
log = logging.getLogger("retroformer.engine")


# ------------------------------------------------------------------------------------------------ engine
class Engine(EngineEndings):
    """A transformers model behind a continuous-batching scheduler (see the module docstring).

    >>> engine = Engine(EngineConfig(model="embedded", cache_dir="ws/cache"))  # doctest: +SKIP
    >>> ids = engine.encode_chat([{"role": "user", "content": "Say hi."}])  # doctest: +SKIP
    >>> engine.submit(ids, Sampling(max_tokens=8)).result().choices[0].text  # doctest: +SKIP
    'Hi there! How can I'
    """

    def __init__(self, config: EngineConfig, name: str | None = None):
        super().__init__(config, name)
        self.step_sizes: collections.deque[int] = collections.deque(maxlen=100_000)  # sequences per forward pass
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
                         "forward_passes": 0, "forward_tokens": 0, "draft_tokens": 0, "draft_accepted": 0}
        self.prefix: PrefixCache | None = None
        self._waiting: collections.deque[Request] = collections.deque()  # admitted in order, model thread only
        self._waiting_count = 0
        self._running: list[Seq] = []
        self._model: LoadedModel | None = None
        self._lora = Adapters()  # model thread only
        self._stage = "idle"  # what the step is doing, for the error of a failed step
        self._prompt_blocks_only = False  # cache only prompt blocks (hybrid weights: see _finish_seq)

    def num_waiting(self) -> int:
        return len(self._inbox) + self._waiting_count

    def num_running(self) -> int:
        return len({id(s.req) for s in self._running})

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> folder (the model thread writes it)."""
        return self._lora.paths

    @property
    def adapter_labels(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> the label it was loaded with (its name when none was given)."""
        return dict(self._lora.labels)

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
                "prefix_reuse": cfg.prefix_reuse, "prefix_cache_mb": cfg.prefix_cache_mb,
                "weights": cfg.weights, **self.info}

    # ================================================================================ model thread
    def _main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - every caller gets it
            self._load_error = exc if isinstance(exc, RetroformerError) else missing_extra(
                exc, "The local model backend") or BackendError(f"Cannot load the local model '{self.name}': {exc}")
            with self._cv:  # later submits are refused with it, never queued for a thread that is gone
                self._failed = self._load_error
            self._ready.set()
            self._fail_all(self._load_error)
            return
        self._ready.set()
        import torch

        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - no request may wait for a thread that is gone
            self._die(exc)

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
                self._stage = "building a step"
                try:
                    self._step()
                except Exception as exc:  # a failed step fails its batch, never the engine
                    log.exception("engine step failed")
                    self._fail_admitted(as_fault(exc, self._stage))

    # -------------------------------------------------------------------------------- loading
    def _load(self) -> None:
        cfg = self.config
        m = self._model = load_model(cfg, self.threads, self.name)
        self._tok = self._local.tok = m.tok
        self._stop_ids, self._device, self._pad_small_batches = m.stop_ids, m.device, m.pad_small_batches
        self._prompt_blocks_only = m.info.get("weights") == "hybrid"
        self.context_length = m.context_length
        self.prefix = PrefixCache(cfg.prefix_cache_mb * 2**20, cfg.block_size) if cfg.prefix_reuse else None
        self._block_bytes = m.token_bytes * cfg.block_size
        self._lora.attach(m.model, m.namespace, separate_base=bool(m.lean is not None and m.lean.splits))
        self.info = m.info

    def _load_adapter(self, name: str, path: str, label: str | None = None) -> None:
        self._lora.load(name, path, self.name, label)

    def _unload_adapter(self, name: str) -> None:
        label = self._lora.labels.get(name, name)
        self._lora.forget(name)
        err = AdapterNotLoaded(f"The LoRA adapter '{label}' was unloaded before this request finished.")
        for req in [r for r in self._waiting if r.adapter == name]:
            self._waiting.remove(req)
            self._finish_request(req, err)
        for req in {id(s.req): s.req for s in self._running if s.req.adapter == name}.values():
            self._finish_request(req, err)
        namespace = self._lora.remove(name)
        if self.prefix is not None:
            self.prefix.drop_namespace(namespace)

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
                self._start(req)
            except Exception as exc:  # memory for its keys/values, a reuse copy: this request fails, not the engine
                if not isinstance(exc, RetroformerError):
                    log.exception("starting request %d failed", req.id)
                self._finish_request(req, as_fault(exc, "starting the request"))

    def _start(self, req: Request) -> None:
        import torch

        req.started = time.perf_counter()
        self.counters["requests"] += 1
        seeds: list[Any] = [None] * req.sampling.n
        if not req.sampling.greedy:
            base_seed = req.sampling.seed if req.sampling.seed is not None else int(torch.randint(0, 2**62, ()).item())
            seeds = [(base_seed * 1_000_003 + i) % 2**63 for i in range(req.sampling.n)]
        for i in range(req.sampling.n):
            seq = Seq(req, i, list(req.prompt), state="prefill" if i == 0 else "follow")
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
            lead.keys = block_keys(self._lora.namespaces[req.adapter], req.prompt, self.config.block_size)
            self._reuse(lead)
        self._running.extend(req.seqs)

    def _alloc(self, capacity: int) -> Any:
        return self._model.kv_buffer(capacity)  # type: ignore[union-attr]

    def _reuse(self, seq: Seq) -> None:
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

    def _store(self, seq: Seq, upto: int) -> None:
        """Put the whole blocks of ``seq.tokens[:upto]`` into the prefix cache."""
        if self.prefix is None:
            return
        bs = self.config.block_size
        whole = upto // bs
        if whole > len(seq.keys):
            previous = seq.keys[-1] if seq.keys else None
            seq.keys += block_keys(self._lora.namespaces[seq.req.adapter], seq.tokens[: whole * bs], bs,
                                   start=len(seq.keys), previous=previous)
        kv = seq.kv
        self.prefix.insert(self._lora.namespaces[seq.req.adapter], seq.keys[:whole],
                           lambda i: kv[:, :, :, i * bs:(i + 1) * bs].clone(), self._block_bytes)

    # -------------------------------------------------------------------------------- one step
    def _step(self) -> None:
        """One forward pass over the scheduled rows, then a token (or confirmed drafts) for each sampler."""
        from retroformer_cli.llm.engine.attention import use_step

        batch = self._build_batch()
        if batch is None:
            return
        if 1 < len(batch.ids) < 4 and self._pad_small_batches:
            # PyTorch's own CPU GEMM takes a slower path with 2 or 3 rows than with 4 (measured; oneDNN-packed
            # layers do not): pad with rows that attend to nothing and whose logits are never read.
            batch.pad_to(4)
        kwargs: dict[str, Any] = {}
        self._stage = "running a forward pass"
        with use_step(batch.context()) as ctx:
            try:
                logits = self._forward(batch, ctx, kwargs)
            except ValueError:
                if "adapter_names" not in kwargs:
                    raise
                # peft refuses mixed batches for some adapter kinds (DoRA, modules_to_save): from now on each
                # step runs one adapter's sequences (round robin). Nothing was written for this step's tokens
                # that a retry would not overwrite.
                self._lora.mixed = False
                return
        self.counters["forward_passes"] += 1
        self.counters["forward_tokens"] += len(batch.ids)
        self.step_sizes.append(len(batch.scheduled))
        self._stage = "storing computed prompt blocks"
        for seq, n in batch.scheduled:
            seq.computed += n
            if seq.state == "prefill" and self.prefix is not None:
                self._store(seq, seq.computed)
        self._stage = "sampling and finishing sequences"
        self._take_tokens(batch.samplers, logits)

    def _forward(self, batch: StepBatch, ctx: Any, kwargs: dict[str, Any]) -> Any:
        """The logits of the step's logit rows: base-model rows only through the lean forward pass (the same
        numbers without transformers' modules), else through the model (PEFT for adapter rows; ``kwargs`` gets
        its ``adapter_names`` for a mixed batch)."""
        model = self._lora.select(batch.names, kwargs)
        lean = self._model.lean
        if lean is not None and not kwargs and set(batch.names) == {None}:
            return lean.forward(batch.ids, batch.positions, ctx, batch.decode_rows)
        return model(**batch.inputs(), use_cache=False, **kwargs).logits[:, -1, :]

    def _build_batch(self) -> StepBatch | None:
        """Decoding sequences' last tokens (and drafts) first, then whole prompt chunks while the step has room."""
        cfg = self.config
        bs = cfg.block_size
        budget = cfg.max_step_tokens
        group = self._lora.group(s.req.adapter for s in self._running if s.state in ("prefill", "decode"))
        batch = StepBatch(self._device)
        for seq in self._running:
            if seq.state == "decode" and (group is None or seq.req.adapter in group):
                draft = prompt_lookup_draft(seq, cfg.draft_tokens, budget - 1)
                batch.add(seq, [seq.tokens[-1], *draft], 1 + len(draft), draft, decode=True)
                budget -= 1 + len(draft)
        computing: set[bytes] = set()
        for seq in self._running:
            if seq.state != "prefill" or (group is not None and seq.req.adapter not in group):
                continue
            self._reuse(seq)
            take = min(seq.prompt_len - seq.computed, cfg.prefill_chunk)
            if take > budget:
                if batch.segments:
                    continue  # whole chunks only: a prompt is cut the same way whatever else runs
                take = budget
            first = seq.computed // bs
            if self.prefix is not None and seq.computed % bs == 0 and first < len(seq.keys) and seq.keys[first] in computing:
                continue  # another sequence computes this very prefix now: reuse it next step
            computing.update(seq.keys[first:(seq.computed + take) // bs])
            batch.add(seq, seq.tokens[seq.computed:seq.computed + take], int(seq.computed + take == seq.prompt_len))
            budget -= take
        return batch if batch.segments else None

    def _take_tokens(self, samplers: list[tuple[Seq, int, list[int]]], logits: Any) -> None:
        """Each sampler's next token from its logit rows; for a greedy draft, every confirmed draft token too."""
        best, margins = greedy_rows(logits, [(r0, 1 + len(d)) for s, r0, d in samplers if s.req.sampling.greedy])
        for seq, r0, draft in samplers:
            if seq.state == "prefill":
                seq.state = "decode"
                for follower in seq.req.seqs[1:]:
                    self._fork(seq, follower, logits[r0], best.get(r0), margins.get(r0))
            if not seq.req.sampling.greedy:
                self._append(seq, sample_token(seq, logits[r0]))
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
                note_margin(seq, margins[row])
                self._append(seq, best[row])
                if seq.state == "done":
                    break

    def _fork(self, lead: Seq, follower: Seq, lead_logits: Any, greedy_token: int | None,
              margin: float | None) -> None:
        """n > 1: choice i copies choice 0's prompt keys/values and takes its own first token."""
        follower.fork_from(lead, self._alloc(follower.prompt_len + follower.req.sampling.max_tokens
                                             + self.config.draft_tokens))
        if follower.req.sampling.greedy:
            note_margin(follower, margin)
            self._append(follower, int(greedy_token))  # type: ignore[arg-type]
        else:
            self._append(follower, sample_token(follower, lead_logits))

    # -------------------------------------------------------------------------------- stopping and finishing
    def _append(self, seq: Seq, token: int) -> None:
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
                safe = streamable(text, sp.stop)
                if len(safe) > seq.sent:
                    self._emit(seq, safe[seq.sent:])
                    seq.sent = len(safe)
        if len(seq.generated) >= sp.max_tokens:
            self._finish_seq(seq, "length")

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _emit(self, seq: Seq, text: str) -> None:
        try:
            seq.req.on_delta(seq.index, text)  # type: ignore[misc]
        except Exception:  # a caller's callback must not stop the engine
            log.exception("on_delta callback failed")

    def _finish_seq(self, seq: Seq, reason: str, counted: int | None = None, decoded: bool = False) -> None:
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
                # hybrid weights: generated tokens' keys/values come from the decode path, and a prompt's must be
                # the prompt path's whether or not it is reused, so only the prompt's blocks are kept
                self._store(seq, min(seq.computed, seq.prompt_len if self._prompt_blocks_only else len(seq.tokens)))
            seq.kv = None
        if seq in self._running:
            self._running.remove(seq)
        req = seq.req
        if all(s.state == "done" for s in req.seqs):
            result = req.result(self.name if req.adapter is None else req.adapter)
            self.counters["prompt_tokens"] += result.prompt_tokens
            self.counters["cached_tokens"] += result.cached_tokens
            self.counters["completion_tokens"] += result.completion_tokens
            self._finish_request(req, result)
