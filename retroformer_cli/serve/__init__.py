"""`retroformer serve`: an OpenAI-compatible HTTP server over a local base model and its LoRA adapters.

- :mod:`.backend`: the in-process engine behind the API (dynamic batching, several LoRA adapters over one base,
  mixed-adapter batches through peft's ``adapter_names``, bounded queue with back-pressure, graceful drain).
- :mod:`.vllm_backend`: the same interface over vLLM's ``AsyncLLMEngine`` (``--engine vllm``, GPU machines).
- :mod:`.app`: the FastAPI app (``/v1/models``, ``/v1/chat/completions`` incl. SSE streaming,
  ``/v1/completions``, ``/health``, ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).
- The HTTP parts ``env serve`` shares (guard, error bodies, the uvicorn runner) are in :mod:`retroformer_cli.httpserver`.

Nothing here imports FastAPI, uvicorn or torch at module level.
"""
