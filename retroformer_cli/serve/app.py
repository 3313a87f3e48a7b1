"""The OpenAI-compatible FastAPI app over a serving engine (transformers or vLLM).

Endpoints: ``GET /v1/models`` (+ ``/v1/models/{id}``), ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``POST /v1/completions``,
``GET /health``, and vLLM's ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``.

Every 4xx/5xx answer has OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``. An API key,
when set, is checked (``Authorization: Bearer KEY``) before the body is read; ``/health`` stays open. Bodies
over ``max_request_bytes`` get 413 without being read in full (:mod:`.guard`). Request bodies are in
:mod:`.schemas`, the generation endpoints in :mod:`.completions`.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retroformer_cli.serve.completions import chat_completion, text_completion
from retroformer_cli.serve.backend import ServeError
from retroformer_cli.httpserver.errors import error_body, validation_message
from retroformer_cli.httpserver.guard import JSON_TYPES, OPEN_PATHS, GuardMiddleware
from retroformer_cli.serve.schemas import (
    IGNORED_FIELDS,
    MAX_N,
    MAX_STOP,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)

# Names other modules import from here.
__all__ = ["GuardMiddleware", "IGNORED_FIELDS", "JSON_TYPES", "MAX_N", "MAX_STOP", "OPEN_PATHS", "ChatMessage",
           "create_app", "error_body", "error_response"]


def error_response(exc: ServeError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def create_app(engine: Any, *, api_key: str | None = None, max_request_bytes: int = 1 << 20,
               allow_runtime_adapters: bool = True, start_engine: bool = True, body_timeout_s: float = 10.0) -> FastAPI:
    """The FastAPI app. With ``start_engine`` the app's lifespan loads the model and, on shutdown, lets the
    engine finish every queued and running request before the process exits."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if start_engine:
            try:
                await engine.start()
            except Exception as exc:
                _app.state.startup_error = exc  # the CLI reports it as one line
                raise
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="retroformer serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.add_middleware(GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout_s=body_timeout_s)
    _add_error_handlers(app)
    _add_routes(app, engine, allow_runtime_adapters)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI's error body for every error: ours, invalid bodies, unknown paths and methods, crashes."""
    @app.exception_handler(ServeError)
    async def _serve_error(_req: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                       "internal_error"), status_code=500)


def _add_routes(app: FastAPI, engine: Any, allow_runtime_adapters: bool) -> None:
    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        state = "failed" if stats.get("failed") else "shutting_down" if stats.get("closing") else "ok"
        return JSONResponse({"status": state, **stats}, status_code=200 if state == "ok" else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": engine.models()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        for card in engine.models():
            if card["id"] == model_id:
                return card
        engine.resolve(model_id)  # raises the 404
        return {}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest) -> Any:
        return await chat_completion(engine, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        return await text_completion(engine, body)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        if not allow_runtime_adapters:
            raise ServeError("Loading adapters at runtime is disabled (--no-runtime-adapters).", status=403,
                             type="permission_error")
        await engine.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        if not allow_runtime_adapters:
            raise ServeError("Unloading adapters at runtime is disabled (--no-runtime-adapters).", status=403,
                             type="permission_error")
        await engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
