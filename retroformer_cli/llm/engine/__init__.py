"""The local inference engine shared by every in-process model user: collect, eval, the reflector, ppo's
online replays (through :class:`~retroformer_cli.llm.hf_local.HFLocalClient`) and ``retroformer serve``.

One :class:`~.scheduler.Engine` owns one transformers model (plus any LoRA adapters over it), one model
thread and one scheduler:

- **continuous batching**: every forward pass carries one new token for each decoding sequence plus prompt
  chunks of newly arrived requests, so a request joins at the next step and a finished one leaves at once;
- **prompt-prefix reuse** (:mod:`.prefix_cache`): the keys and values of every computed 16-token block are
  kept in a byte-bounded LRU store keyed by the exact token prefix, the model and the adapter, so a ReAct
  step, a shared few-shot block or a reflector instruction is computed once;
- **varlen attention** (:mod:`.attention`): the model's own modules run unchanged; only the attention
  function is swapped (transformers' ``AttentionInterface``) for one that reads and writes our per-sequence
  key/value buffers, so PEFT LoRA layers, mixed-adapter batches and any decoder-only architecture that
  supports attention backends keep working.

Nothing here imports torch at module level.
"""

from retroformer_cli.llm.engine.types import Choice, EngineConfig, Result, Sampling

__all__ = ["Choice", "EngineConfig", "Result", "Sampling"]
