"""`retroformer serve`: an OpenAI-compatible HTTP server over a local base model and its LoRA adapters.

- :mod:`.engine`: the transformers engine (dynamic batching, several LoRA adapters over one base, mixed-adapter
  batches through peft's ``adapter_names``, bounded queue with back-pressure, graceful drain).
- :mod:`.vllm_engine`: the same interface over vLLM's ``AsyncLLMEngine`` (``--engine vllm``, GPU machines).
- :mod:`.app`: the FastAPI app (``/v1/models``, ``/v1/chat/completions`` incl. SSE streaming,
  ``/v1/completions``, ``/health``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).
- :mod:`.runner`: start uvicorn in the foreground (the CLI) or in a background thread (tests, benchmarks).

Nothing here imports FastAPI, uvicorn or torch at module level.
"""
