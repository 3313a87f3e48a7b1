"""The OpenAI-compatible FastAPI app over a serving engine (transformers or vLLM).

Endpoints: ``GET /v1/models`` (+ ``/v1/models/{id}``), ``POST /v1/chat/completions`` (``stream: true`` as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``POST /v1/completions``,
``GET /health``, and vLLM's ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``.

Every 4xx/5xx answer has OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``. An API key,
when set, is checked (``Authorization: Bearer KEY``) before the body is read; ``/health`` stays open. Bodies
over ``max_request_bytes`` get 413 without being read in full.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from retroformer_cli.serve.engine import Sampling, ServeError

OPEN_PATHS = frozenset({"/health", "/v1/health"})
MAX_N = 16
MAX_STOP = 16
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list", "_TextPart"})


# ------------------------------------------------------------------------------------------------ schemas
# OpenAI parameters this server accepts and ignores (clients send them routinely); any other unknown field is
# refused with 400, as OpenAI's API does ("Unrecognized request argument supplied").
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "presence_penalty", "frequency_penalty", "logit_bias",
    "top_logprobs", "response_format", "parallel_tool_calls", "prediction", "modalities", "audio",
    "reasoning_effort", "best_of", "top_k", "min_p", "repetition_penalty", "ignore_eos",
})


class _Params(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked in _refuse_unknown

    @model_validator(mode="after")
    def _refuse_unknown(self) -> "_Params":
        unknown = sorted(set(self.model_extra or {}) - IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"Unrecognized request argument supplied: {', '.join(unknown)}")
        return self

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None
    logprobs: Optional[Any] = None


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[_TextPart], None] = None


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_Params):
    prompt: Union[StrictStr, list[StrictStr]]
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None


class LoadAdapterRequest(BaseModel):
    lora_name: StrictStr = Field(..., min_length=1)
    lora_path: StrictStr = Field(..., min_length=1)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: StrictStr = Field(..., min_length=1)


# ------------------------------------------------------------------------------------------------ helpers
def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ServeError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ServeError(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed.", param="stop")
    return tuple(s for s in stops if s)


def _sampling(engine: Any, body: _Params, prompt_len: int) -> Sampling:
    if body.logprobs:
        raise ServeError("logprobs are not supported by this server.", param="logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or engine.default_max_tokens(prompt_len)
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                    stop=_stops(body.stop), seed=body.seed, n=body.n)


def _text(content: str | list[_TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in content)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts prompt tokens served from the
    prefix cache (as OpenAI and vLLM report them)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "The request is invalid.", None
    first = errors[0]
    unknown = re.search(r"Unrecognized request argument supplied: ([\w, ]+)", str(first.get("msg", "")))
    if unknown:
        return f"Unrecognized request argument supplied: {unknown.group(1)}.", unknown.group(1).split(",")[0].strip()
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}).", None
    loc: list[str] = []
    for part in first.get("loc", ())[1:] if first.get("loc", ())[:1] == ("body",) else first.get("loc", ()):
        text = str(part)
        if text in _TYPE_TAGS or "[" in text or "-" in text:  # a union member's tag, not a field
            break
        loc.append(text)
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid value for '{param}': {first.get('msg')}{more}.", param


# ------------------------------------------------------------------------------------------------ middleware
JSON_TYPES = ("application/json",)


class GuardMiddleware:
    """Checks before any handler runs: API key (401), body size (413), body arrival time (408), content type
    (415) and UTF-8 (400). The body is read here, with its deadline, and replayed to the app, so a client that
    trickles its body holds no more than a socket for ``body_timeout_s``."""

    def __init__(self, app: Any, api_key: str | None, max_request_bytes: int, body_timeout_s: float = 10.0):
        self.app, self.api_key, self.max_bytes, self.body_timeout_s = app, api_key, max_request_bytes, body_timeout_s

    @staticmethod
    async def _reply(scope: dict, receive: Any, send: Any, status: int, message: str, code: str | None = None,
                     close: bool = False) -> None:
        headers = {"Connection": "close"} if close else None
        resp = JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=status, headers=headers)
        await resp(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope.get("path") not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "Incorrect API key provided." if token else "No API key provided (Authorization: Bearer KEY)."
                resp = JSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_bytes:
                    return await self._reply(scope, receive, send, 413, f"The request body is larger than "
                                             f"{self.max_bytes} bytes.", "request_too_large", close=True)
            except ValueError:
                return await self._reply(scope, receive, send, 400, "Invalid Content-Length header.", close=True)
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES:
            return await self._reply(scope, receive, send, 415, f"Content-Type must be application/json (got "
                                     f"'{ctype or 'none'}').", "unsupported_media_type", close=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks, total, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.001, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await self._reply(scope, receive, send, 408, f"The request body did not arrive within "
                                         f"{self.body_timeout_s:g} s.", "request_timeout", close=True)
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._reply(scope, receive, send, 413, f"The request body is larger than "
                                         f"{self.max_bytes} bytes.", "request_too_large", close=True)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return await self._reply(scope, receive, send, 400, f"The request body is not valid UTF-8 (byte "
                                     f"{exc.start}).", "invalid_encoding")
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect as usual

        return await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------------ app
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

    @app.exception_handler(ServeError)
    async def _serve_error(_req: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
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

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        status = 503 if stats.get("closing") else 200
        return JSONResponse({"status": "shutting_down" if status == 503 else "ok", **stats}, status_code=status)

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
        engine.resolve(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                    for m in body.messages]
        prompt_ids = engine.encode_chat(messages)
        sampling = _sampling(engine, body, len(prompt_ids))
        model = body.model or engine.base_name
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            result = await engine.generate(body.model, prompt_ids, sampling)
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason} for c in result.choices],
                "usage": _usage(result.prompt_tokens, result.completion_tokens, getattr(result, "cached_tokens", 0)),
            }
        queue: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(body.model, prompt_ids, sampling, lambda i, t: queue.put_nowait((i, t)))
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                    "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return _sse(data)

        first = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for i in range(sampling.n)])]
        return _stream(handle, queue, first,
                       lambda i, t: chunk([{"index": i, "delta": {"content": t}, "logprobs": None, "finish_reason": None}]),
                       lambda result: [chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                               "finish_reason": c.finish_reason}]) for c in result.choices]
                       + ([chunk([], _usage(result.prompt_tokens, result.completion_tokens, getattr(result, "cached_tokens", 0)))] if include_usage else []))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        engine.resolve(body.model)
        if body.echo or body.suffix:
            raise ServeError("echo and suffix are not supported by this server.", param="echo" if body.echo else "suffix")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ServeError("prompt must not be an empty list.", param="prompt")
        encoded = [engine.encode_prompt(p) for p in prompts]
        samplings = [_sampling(engine, body, len(ids)) for ids in encoded]
        n = body.n
        model = body.model or engine.base_name
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            handles = []
            for ids, s in zip(encoded, samplings):
                engine.check(ids, s)  # every prompt is valid before any is queued
            for ids, s in zip(encoded, samplings):
                handles.append(engine.submit(body.model, ids, s))
            results = await asyncio.gather(*(h.result() for h in handles))
            choices = [{"index": p * n + c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for p, r in enumerate(results) for c in r.choices]
            return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                    "usage": _usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results),
                                   sum(getattr(r, "cached_tokens", 0) for r in results))}
        if len(prompts) > 1:
            raise ServeError("Streaming supports one prompt per request.", param="prompt")
        queue: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(body.model, encoded[0], samplings[0], lambda i, t: queue.put_nowait((i, t)))
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            data: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                    "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return _sse(data)

        return _stream(handle, queue, [],
                       lambda i, t: chunk([{"index": i, "text": t, "logprobs": None, "finish_reason": None}]),
                       lambda result: [chunk([{"index": c.index, "text": "", "logprobs": None,
                                               "finish_reason": c.finish_reason}]) for c in result.choices]
                       + ([chunk([], _usage(result.prompt_tokens, result.completion_tokens, getattr(result, "cached_tokens", 0)))] if include_usage else []))

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

    return app


def _stream(handle: Any, queue: asyncio.Queue, first: list[str], delta: Any, final: Any) -> StreamingResponse:
    """SSE response: ``first`` chunks, one chunk per text delta, the ``final`` chunks, then ``[DONE]``.

    If the client disconnects, the request is cancelled and its rows stop at the next decoding step."""

    async def events() -> AsyncIterator[str]:
        task = asyncio.ensure_future(handle.result())
        try:
            for c in first:
                yield c
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield delta(*getter.result())
                    continue
                getter.cancel()
                break
            while not queue.empty():
                yield delta(*queue.get_nowait())
            exc = task.exception()
            if exc is not None:
                if isinstance(exc, ServeError):
                    yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
                else:
                    yield _sse(error_body(f"Generation failed: {exc!r}", "server_error"))
            else:
                for c in final(task.result()):
                    yield c
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
