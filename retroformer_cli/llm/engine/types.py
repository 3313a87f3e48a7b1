"""Plain types of the engine's API: what a request asks for, what it gets back, how the engine is set up.

No torch here: the CLI, the serve app and the configs import these without loading a model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from retroformer_cli.errors import BackendError, UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS = ("auto", "fp32", "gguf", "hybrid")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(device: str) -> None:
    """``auto | cpu | cuda | cuda:N``, or one line naming the flag (whether CUDA is there is checked at load)."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'.")


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding settings (OpenAI's fields)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" (end-of-turn token or stop string) | "length"
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    # Greedy only: the smallest gap between the best and the second-best logit over the generated tokens. A
    # tiny gap is a near-tie that float reordering (another batch shape, a reused prefix) may flip.
    min_margin: float | None = None


@dataclass
class Result:
    model: str  # the served name: the base model's or the adapter's
    prompt_tokens: int  # the whole prompt (what usage reports)
    choices: list[Choice]
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    queued_s: float = 0.0  # waiting before the first forward pass
    total_s: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


@dataclass
class EngineConfig:
    """How an engine is built. ``model`` is a base model: ``embedded`` or a transformers folder."""

    model: str = "embedded"
    cache_dir: str | None = None  # where the embedded model is converted to (the workspace's cache/)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bf16/fp16 on GPU) | float32 | bfloat16 | float16
    threads: int | None = None  # torch threads; None: default_threads()
    max_batch_size: int = 8  # sequences decoding together
    max_step_tokens: int = 512  # tokens per forward pass: one per decoding sequence + prompt chunks
    prefill_chunk: int = 256  # a prompt is computed in chunks of this many tokens
    prefix_reuse: bool = True  # reuse cached keys/values of a known prompt prefix
    prefix_cache_mb: int = 512  # memory bound of the prefix cache (LRU beyond it)
    block_size: int = 16  # tokens per cached block (only whole blocks are reused)
    draft_tokens: int = 4  # greedy requests: prompt-lookup draft tokens checked per step (0: off)
    cpu_packed_linear: bool = True  # CPU: linear layers with oneDNN-packed weights (faster batches, batch-invariant)
    # embedded model on CPU: fp32 | gguf (the Q4_1/Q8_0 blocks) | hybrid (prompt rows fp32, decode rows gguf) |
    # auto (hybrid where it applies: the embedded model on CPU in float32; else fp32)
    weights: str = "auto"

    @classmethod
    def for_model(cls, model: str, cache_dir: str | os.PathLike[str], **settings: object) -> tuple[EngineConfig, str | None]:
        """The one place an engine configuration is assembled from a model spec and the user's settings, for
        in-process clients and ``serve`` alike: ``(config, adapter folder or None)``.

        A LoRA folder runs on its base model with the adapter loaded on top, so the spec is split here; the step
        budget is raised to one token per decoding sequence at least; unset threads get :func:`default_threads`.
        """
        from retroformer_cli.llm.model_cache import split_model_spec

        base, adapter = split_model_spec(str(model), cache_dir)
        batch = int(settings.get("max_batch_size", cls.max_batch_size))  # type: ignore[call-overload]
        step = int(settings.get("max_step_tokens", cls.max_step_tokens))  # type: ignore[call-overload]
        settings["max_step_tokens"] = max(step, batch)
        config = cls(model=base, cache_dir=str(cache_dir), **settings)  # type: ignore[arg-type]
        if config.threads is None:
            config.threads = default_threads()
        config.validate()
        return config, adapter

    def validate(self) -> None:
        checks = (("--max-batch-size", self.max_batch_size, 1), ("--max-step-tokens", self.max_step_tokens, 1),
                  ("--prefill-chunk", self.prefill_chunk, 1), ("--prefix-cache-mb", self.prefix_cache_mb, 0),
                  ("block_size", self.block_size, 1), ("draft_tokens", self.draft_tokens, 0))
        for name, value, least in checks:
            if value < least:
                raise UsageError(f"{name} must be at least {least}, got {value}.")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}.")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'.")
        if self.weights not in WEIGHTS:
            raise UsageError(f"--weights must be one of {', '.join(WEIGHTS)}, got '{self.weights}'.")
        check_device_name(self.device)
        if self.max_step_tokens < self.max_batch_size:
            raise UsageError(f"--max-step-tokens ({self.max_step_tokens}) must be at least --max-batch-size "
                             f"({self.max_batch_size}): every decoding sequence needs one token per step.")


def default_threads() -> int:
    """torch threads when none are given: one per core, leaving a core free on small machines.

    Measured on a 2-core machine (docs/benchmarks.md): decoding is memory-bound and runs as fast on 1
    thread as on 2, prompts run ~1.3x faster on 2 threads when the machine is quiet, and 2 threads collapse
    (up to ~8x slower) as soon as anything else (the event loop, env worker processes, another job) wants the
    second core. One thread on machines with up to 2 cores; otherwise all cores but one, at most 8.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores <= 2:
        return 1
    return min(8, cores - 1)


class EngineClosed(BackendError):
    """The engine is shutting down and takes no new requests."""


class EngineFault(BackendError):
    """The engine failed while running this request (memory for its keys/values, a forward pass, sampling,
    finishing): not the request's fault, and the engine goes on with the others (serve answers 503)."""


class EngineFailed(EngineFault):
    """The model thread hit an error outside any one request and stopped: every pending request ends with this
    error, and new ones are refused with it (serve answers 503 until it is restarted)."""


class RequestCancelled(BackendError):
    """The caller cancelled the request (or went away) before it finished."""


class AdapterNotLoaded(BackendError):
    """The request names a LoRA adapter that is not (or no longer) loaded."""


class ContextTooLong(BackendError):
    """Prompt plus max_tokens exceed the model's context."""
