"""The two generation endpoints, ``POST /v1/chat/completions`` and ``POST /v1/completions``: request to
sampling settings, one answer as JSON, or a stream of server-sent events in OpenAI's chunk format ending with
``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from retroformer_cli.serve.backend import Sampling, ServeError
from retroformer_cli.httpserver.errors import error_body
from retroformer_cli.serve.schemas import MAX_STOP, ChatRequest, CompletionRequest, SamplingParams, TextPart


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ServeError(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed.", param="stop")
    return tuple(s for s in stops if s)


def _sampling(engine: Any, body: SamplingParams, prompt_len: int) -> Sampling:
    if body.logprobs:
        raise ServeError("logprobs are not supported by this server.", param="logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or engine.default_max_tokens(prompt_len)
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                    stop=_stops(body.stop), seed=body.seed, n=body.n)


def _text(content: str | list[TextPart] | None) -> str:
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


def _result_usage(result: Any) -> dict[str, Any]:
    return _usage(result.prompt_tokens, result.completion_tokens, getattr(result, "cached_tokens", 0))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ------------------------------------------------------------------------------------------------ endpoints
async def chat_completion(engine: Any, body: ChatRequest) -> Any:
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
            "usage": _result_usage(result),
        }
    chunk = _Chunks(rid, "chat.completion.chunk", created, model)
    first = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None} for i in range(sampling.n)])]
    return _stream_answer(engine, body, prompt_ids, sampling, chunk, first,
                          lambda t: {"delta": {"content": t} if t is not None else {}})


async def text_completion(engine: Any, body: CompletionRequest) -> Any:
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
    chunk = _Chunks(rid, "text_completion", created, model)
    return _stream_answer(engine, body, encoded[0], samplings[0], chunk, [], lambda t: {"text": t or ""})


# ------------------------------------------------------------------------------------------------ streaming
class _Chunks:
    """One streamed answer's chunks: OpenAI's envelope (id, object, created, model) around choice deltas."""

    def __init__(self, rid: str, obj: str, created: int, model: str):
        self.rid, self.obj, self.created, self.model = rid, obj, created, model

    def __call__(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        data: dict[str, Any] = {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model,
                                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return _sse(data)


def _stream_answer(engine: Any, body: SamplingParams, prompt_ids: list[int], sampling: Sampling, chunk: _Chunks,
                   first: list[str], content: Callable[[str | None], dict[str, Any]]) -> StreamingResponse:
    """Submit the request now and stream it: ``first``, a chunk per text delta (``content(text)``), a final
    chunk per choice (``content(None)`` with its finish reason), the usage chunk if asked for, ``[DONE]``."""
    queue: asyncio.Queue = asyncio.Queue()
    handle = engine.submit(body.model, prompt_ids, sampling, lambda i, t: queue.put_nowait((i, t)))
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def delta(i: int, text: str) -> str:
        return chunk([{"index": i, **content(text), "logprobs": None, "finish_reason": None}])

    def final(result: Any) -> list[str]:
        out = [chunk([{"index": c.index, **content(None), "logprobs": None, "finish_reason": c.finish_reason}])
               for c in result.choices]
        return out + ([chunk([], _result_usage(result))] if include_usage else [])

    return _stream(handle, queue, first, delta, final)


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
