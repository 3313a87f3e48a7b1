"""`retroformer serve`: an OpenAI-compatible server for the embedded model, local models and workspace
checkpoints, with LoRA adapters selectable by model name. FastAPI, uvicorn and torch load inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from retroformer_cli.commands.context import command_app, handle_errors
from retroformer_cli.commands.context import workspace as _workspace
from retroformer_cli.errors import BackendError, RetroformerError, UsageError, require
from retroformer_cli.httpserver.exposure import open_server_warning



def _resolve_model(spec: str, ws, option: str) -> str:
    """``embedded`` | a folder | ``hf:PATH`` | ``workspace:STAGE/NAME`` → what the engine loads."""
    from retroformer_cli.config import ModelConfig
    from retroformer_cli.llm import resolve_backend

    backend, target = resolve_backend(ModelConfig(model=spec), ws, option)
    if backend != "hf":
        raise UsageError(f"{option} '{spec}' is not a local model: use embedded, a model or adapter folder, "
                         "hf:PATH or workspace:STAGE/NAME.")
    return target


def _parse_adapters(values: list[str], ws) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--adapter '{value}' must be NAME=PATH (PATH: a LoRA folder or workspace:STAGE/NAME).")
        if name in adapters:
            raise UsageError(f"--adapter name '{name}' is given twice.")
        folder = _resolve_model(path, ws, "--adapter")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {name}={path}: '{folder}' is not a LoRA adapter folder (no adapter_config.json).")
        adapters[name] = folder
    return adapters


def _check_values(engine: str, port: int, threads: Optional[int], counts: dict[str, int],
                  seconds: dict[str, float]) -> None:
    if engine not in ("transformers", "vllm"):
        raise UsageError(f"--engine must be transformers or vllm, got '{engine}'.")
    for name, value in counts.items():
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}.")
    for name, value in seconds.items():
        if value <= 0:
            raise UsageError(f"{name} must be positive, got {value}.")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}.")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}.")


def _make_engine(engine: str, target: str, common: dict, *, tensor_parallel_size: int, **local: object):
    """The vllm engine (GPU) or the in-process transformers engine; ``local`` only concerns the latter."""
    if engine == "vllm":
        from retroformer_cli.serve.vllm_backend import VLLMBackend

        return VLLMBackend(target, tensor_parallel_size=tensor_parallel_size, **common)
    from retroformer_cli.serve.backend import TransformersBackend

    return TransformersBackend(target, **local, **common)


app = command_app()


@app.command("serve", epilog="Examples:\n\n  retroformer serve                                  (the embedded model on http://127.0.0.1:8000/v1)\n\n"
                    "  retroformer serve --model workspace:sft/base --adapter reflector=workspace:ppo/r1 --api-key secret\n\n"
                    "  retroformer collect --actor openai:embedded --actor-base-url http://127.0.0.1:8000/v1")
@handle_errors
def serve(
    model: str = typer.Option("embedded", "--model", "-m", help="Base model: embedded | folder | hf:PATH | workspace:STAGE/NAME."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="LoRA adapter served as model NAME: NAME=PATH or NAME=workspace:STAGE/NAME (repeat)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model name of the base [default: the --model value]."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RETROFORMER_API_KEY", help="Require this key (Authorization: Bearer KEY) [env RETROFORMER_API_KEY]."),
    engine: str = typer.Option("transformers", "--engine", help="transformers (CPU/GPU, in process) | vllm (GPU, pip install vllm)."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Sequences decoding together (continuous batching: a request joins at the next step)."),
    batch_wait_ms: Optional[float] = typer.Option(None, "--batch-wait-ms", hidden=True, help="Ignored since continuous batching (kept so old scripts run)."),
    prefix_reuse: bool = typer.Option(True, "--prefix-reuse/--no-prefix-reuse", help="Reuse the computed keys/values of a known prompt prefix (transformers engine)."),
    prefix_cache_mb: int = typer.Option(512, "--prefix-cache-mb", help="Memory bound of the prefix cache in MiB (least recently used blocks go first)."),
    max_step_tokens: int = typer.Option(512, "--max-step-tokens", help="Tokens per forward pass: one per decoding sequence plus prompt chunks."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bf16/fp16 on GPU) | float32 | bfloat16 | float16 (transformers engine)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Waiting requests before new ones get HTTP 429."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="Largest max_tokens a request may ask for."),
    max_request_bytes: int = typer.Option(1 << 20, "--max-request-bytes", help="Largest request body (HTTP 413 above)."),
    body_timeout_s: float = typer.Option(10.0, "--body-timeout-s", help="A request body must arrive within this many seconds (HTTP 408 after)."),
    idle_timeout_s: float = typer.Option(10.0, "--idle-timeout-s", help="A connection must send its first request within this many seconds (closed after)."),
    max_connections: int = typer.Option(512, "--max-connections", help="Open connections before new ones get HTTP 503."),
    shutdown_grace_s: float = typer.Option(30.0, "--shutdown-grace-s", help="On Ctrl-C or SIGTERM, in-flight requests get this long to finish; then they are cancelled."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads [default: 1 on up to 2 cores, else cores - 1 (at most 8)]."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (transformers engine)."),
    weights: str = typer.Option("auto", "--weights", help="Embedded model on CPU: fp32 (dequantized once) | gguf (the shipped Q4_1/Q8_0 blocks, a C++ kernel built at first use) | hybrid (prompt rows on fp32, decode rows on the GGUF blocks) | auto (hybrid for the embedded model on CPU in float32, else fp32)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="GPUs per model (vllm engine)."),
    runtime_adapters: bool = typer.Option(True, "--runtime-adapters/--no-runtime-adapters", help="Allow /v1/load_lora_adapter and /v1/unload_lora_adapter."),
) -> None:
    """Serve a local model and its LoRA adapters behind the OpenAI API (chat, completions, streaming)."""
    from retroformer_cli import console

    _check_values(engine, port, threads, counts={
        "--max-batch-size": max_batch_size, "--max-queue": max_queue, "--max-tokens-limit": max_tokens_limit,
        "--max-request-bytes": max_request_bytes, "--tensor-parallel-size": tensor_parallel_size,
        "--max-connections": max_connections,
    }, seconds={"--body-timeout-s": body_timeout_s, "--idle-timeout-s": idle_timeout_s,
                "--shutdown-grace-s": shutdown_grace_s})
    require(("fastapi", "uvicorn"), "retroformer serve")
    if engine == "transformers":
        require(("torch", "transformers"), "retroformer serve --engine transformers")
    ws = _workspace()
    target = _resolve_model(model, ws, "--model")
    adapters = _parse_adapters(list(adapter or []), ws)
    name = served_model_name or model
    if name in adapters:
        raise UsageError(f"--adapter name '{name}' is also the base model's name; pick another.")
    warning = open_server_warning(host, api_key, "use the model (and load adapters)")
    if warning:
        console.warning(warning)
    from retroformer_cli.serve.app import create_app

    if batch_wait_ms is not None and engine == "transformers":
        console.warning("--batch-wait-ms is ignored: requests join the running batch at the next step "
                        "(continuous batching).")
    common = dict(served_name=name, adapters=adapters, cache_dir=ws.cache_dir, max_batch_size=max_batch_size,
                  max_queue=max_queue, max_tokens_limit=max_tokens_limit, prefix_reuse=prefix_reuse)
    eng = _make_engine(engine, target, common, tensor_parallel_size=tensor_parallel_size, threads=threads,
                       device=device, dtype=dtype, prefix_cache_mb=prefix_cache_mb, max_step_tokens=max_step_tokens,
                       weights=weights)
    app_ = create_app(eng, api_key=api_key, max_request_bytes=max_request_bytes, allow_runtime_adapters=runtime_adapters,
                      body_timeout_s=body_timeout_s)
    console.log(("serve", "bold"), f" loading {name} ({engine} engine"
                                    + (f", adapters: {', '.join(adapters)}" if adapters else "") + ") ...")
    _run_server(app_, eng, f"{engine} engine for {name}", host, port, auth=bool(api_key),
                shutdown_grace_s=shutdown_grace_s, idle_timeout_s=idle_timeout_s, max_connections=max_connections)


def _run_server(app_: Any, eng: Any, what: str, host: str, port: int, *, auth: bool, shutdown_grace_s: float,
                **limits: Any) -> None:
    """Serve in the foreground until Ctrl-C/SIGTERM; start-up failures become one error line."""
    from retroformer_cli import console
    from retroformer_cli.httpserver.runner import serve_foreground

    def ready(url: str) -> None:
        models = ", ".join(eng.model_names())
        console.log(("ready", "green"), f": {url}  models: {models}  auth: {'api key' if auth else 'none'}  "
                             f"(Ctrl-C: in-flight requests get {shutdown_grace_s:g} s to finish, then the server stops)")

    try:
        serve_foreground(app_, host, port, ready, shutdown_grace_s=shutdown_grace_s, **limits)
    except OSError as exc:
        failed = getattr(app_.state, "startup_error", None)
        if isinstance(failed, RetroformerError):
            raise failed from None
        if failed is not None:
            raise BackendError(f"Cannot start the {what}: {failed}") from None
        raise UsageError(f"Cannot serve on {host}:{port}: {exc}.") from None
    console.log(("serve: stopped", "dim"))
