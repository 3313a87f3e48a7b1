"""The engine's model: device and dtype, loading (with the varlen attention swapped in and, on CPU, packed
linear layers), the shape of a sequence's key/value buffer, end-of-turn tokens, and chat encoding.

Runs on the engine's model thread (loading) or with its tokenizer; torch is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from retroformer_cli.errors import BackendError, UsageError
from retroformer_cli.llm.engine.types import EngineConfig, check_device_name


def check_device(device: str) -> None:
    """A device this machine has: ``cuda``/``cuda:N`` without a CUDA device is one clear line (a usage error),
    not a traceback from the first tensor moved there."""
    check_device_name(device)
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device here"
        raise UsageError(f"--device {device} asks for a GPU, but {why}; use --device cpu or auto.")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0.")


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``auto`` made concrete: CUDA when present; float32 on CPU (exact and, for small models, memory-bound
    anyway), bfloat16 (or float16 without bf16 support) on GPUs. A device the machine lacks is a UsageError."""
    import torch

    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    return device, dtype


@dataclass
class LoadedModel:
    model: Any  # the transformers model, attention swapped for the engine's
    tok: Any
    stop_ids: set[int]  # end-of-turn tokens: a sequence stops on any of them
    context_length: int | None
    layers: int
    kv_heads: int
    head_dim: int
    dtype: Any  # torch dtype
    device: Any  # torch device
    token_bytes: int  # key/value bytes per token (all layers)
    pad_small_batches: bool  # PyTorch's CPU GEMM: pad 2-3 row batches to 4 rows
    namespace: bytes  # the base model's prefix-cache namespace
    info: dict[str, Any]
    lean: Any = None  # the lean forward pass (lean_forward.LeanForward) for base-model batches; None: transformers

    def kv_buffer(self, capacity: int) -> Any:
        """An empty key/value buffer for one sequence: ``[layers, 2, kv_heads, capacity, head_dim]``."""
        import torch

        return torch.empty(self.layers, 2, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                           device=self.device)


def load_model(cfg: EngineConfig, threads: int, name: str) -> LoadedModel:
    """Load ``cfg.model`` for the engine (sets torch's thread count for the calling thread's process)."""
    import torch

    from retroformer_cli.llm.engine import attention, lean_forward
    from retroformer_cli.llm.engine.cpu_linear import pack_linear_layers
    from retroformer_cli.llm.model_cache import load_base_model

    torch.set_num_threads(threads)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    model, tok, info = load_base_model(cfg.model, cfg.cache_dir, device=device, dtype=getattr(torch, dtype))
    if getattr(model.config, "is_encoder_decoder", False) or not getattr(model, "_supports_attention_backend", False):
        raise BackendError(f"The model {name} ({type(model).__name__}) does not support transformers' "
                           "attention backends, which the engine needs (Llama, Qwen, Mistral, Phi-3, Gemma ... do).")
    quant, decode = _gguf_weights(cfg, model, device, dtype, threads)
    packed = pack_linear_layers(model) if cfg.cpu_packed_linear else 0
    model.set_attn_implementation(attention.register())
    lean = lean_forward.build(model, decode)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(attention.keep_logit_rows)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id, tok.pad_token_id}
    mc = model.config
    text_cfg = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    heads = text_cfg.num_attention_heads
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    layers = text_cfg.num_hidden_layers
    torch_dtype = getattr(torch, dtype)
    token_bytes = layers * 2 * kv_heads * head_dim * torch_dtype.itemsize
    return LoadedModel(
        model=model, tok=tok, stop_ids={int(i) for i in eos_ids if i is not None},
        context_length=getattr(text_cfg, "max_position_embeddings", None), layers=layers, kv_heads=kv_heads,
        head_dim=head_dim, dtype=torch_dtype, device=torch.device(device), token_bytes=token_bytes,
        pad_small_batches=not packed and quant["weights"] != "gguf" and device == "cpu",
        namespace=f"{info.get('path', cfg.model)}|{dtype}|base".encode(),
        info={**info, "device": device, "dtype": dtype, "threads": threads, "kv_bytes_per_token": token_bytes,
              "packed_linear_layers": packed, **quant, "forward": "transformers" if lean is None else "lean"},
        lean=lean,
    )


def _gguf_weights(cfg: EngineConfig, model: Any, device: str, dtype: str,
                  threads: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``--weights gguf``: the embedded model's linear layers on its GGUF blocks; ``hybrid``: those blocks beside
    the fp32 weights, for the lean forward pass's decode rows (:mod:`.gguf_weights`); ``auto``: hybrid for the
    embedded model on CPU in float32, else fp32. ``(info, decode matrices or None)``; without a compiler,
    ``{"weights": "fp32", "why": ...}``."""
    applies = cfg.model == "embedded" and device == "cpu" and dtype == "float32"
    mode = ("hybrid" if applies else "fp32") if cfg.weights == "auto" else cfg.weights
    if mode not in ("gguf", "hybrid"):
        return {"weights": "fp32"}, None
    if not applies:
        raise UsageError(f"--weights {mode} runs the embedded model on CPU in float32, not {cfg.model} on "
                         f"{device} in {dtype}; use --weights fp32 or auto.")
    from retroformer_cli.llm.engine.gguf_weights import decode_matrices, use_gguf_weights
    from retroformer_cli.llm.model_cache import default_cache_dir, embedded_gguf_path

    path, cache = str(embedded_gguf_path()), str(cfg.cache_dir or default_cache_dir())
    if mode == "hybrid":
        return decode_matrices(model, path, cache, threads)
    return use_gguf_weights(model, path, cache, threads), None


def chat_token_ids(tok: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of chat messages with the tokenizer's template (a final assistant message is continued);
    without a template, the plain-text prompt of :func:`~retroformer_cli.llm.base.messages_to_prompt`."""
    if not getattr(tok, "chat_template", None):
        from retroformer_cli.llm.base import Message, messages_to_prompt

        return tok(messages_to_prompt([Message(m["role"], m["content"]) for m in messages]))["input_ids"]
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if chat and chat[-1]["role"] == "assistant":
        text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    else:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]
