"""LLMClient for any OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp server, Ollama, ...).

Requests go out with httpx directly (the ``openai`` SDK takes ~1 s to import, a cost every collect paid before
its first request). We run our own retry loop so every backend shares one policy: retry 408, 409, 429, 5xx,
timeouts and dropped connections with capped exponential backoff and full jitter, honouring ``Retry-After`` /
``retry-after-ms``; fail at once on other 4xx with the server's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import time
from typing import Any, Sequence

import httpx

from ..errors import BackendError, ContextTooLong, UsageError
from .base import Generation, GenerationConfig, Message, Usage, apply_stop, messages_to_prompt

RETRYABLE_STATUS = frozenset({408, 409, 429})
MAX_STOP = 4  # OpenAI rejects more than four stop sequences
# A refused connection is usually a wrong URL or a server that is down; retry only briefly so a
# typo fails in about a second, while a server that is restarting still gets a chance.
REFUSED_RETRIES = 3


class _Failure(Exception):
    """One failed attempt, classified."""

    def __init__(self, desc: str, retryable: bool, wait_s: float | None = None, refused: bool = False,
                 status: int | None = None, context: dict[str, int | None] | None = None):
        super().__init__(desc)
        self.desc, self.retryable, self.wait_s, self.refused, self.status = desc, retryable, wait_s, refused, status
        self.context = context  # the prompt does not fit the model's context: the token counts the server named


def _retry_after_s(headers: Any) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After`` (secs or date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


DEFAULT_BASE_URL = "https://api.openai.com/v1"

# How servers say "the prompt does not fit": OpenAI and vLLM ("This model's maximum context length is N tokens"),
# llama.cpp ("exceeds the available context size"), TGI ("`inputs` tokens + `max_new_tokens` must be <= N"),
# retroformer serve (code context_length_exceeded).
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"})
_CONTEXT_MESSAGE = re.compile(r"maximum context length|context (?:length|size|window)|max_new_tokens` must be <=",
                              re.IGNORECASE)
_CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+)|must be <= (\d+)|n_ctx\D{0,8}(\d+)", re.IGNORECASE)
_PROMPT_TOKENS = re.compile(r"(\d+) (?:tokens )?in the messages|messages resulted in (\d+) tokens|prompt has (\d+)"
                            r"|request has (\d+) input tokens|Given: (\d+) `inputs` tokens|n_prompt_tokens\D{0,8}(\d+)",
                            re.IGNORECASE)


def _first_int(pattern: re.Pattern[str], text: str) -> int | None:
    m = pattern.search(text)
    return int(next(g for g in m.groups() if g is not None)) if m else None


def _context_overflow(response: httpx.Response, message: str) -> dict[str, int | None] | None:
    """The token counts of a "prompt too long for the context" error response (values may be None), or None
    when the response is some other error."""
    if response.status_code not in (400, 413, 422):
        return None
    code = None
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        code = err.get("code") or err.get("type")
    if code not in _CONTEXT_CODES and not _CONTEXT_MESSAGE.search(message):
        return None
    return {"context_length": _first_int(_CONTEXT_LIMIT, message), "prompt_tokens": _first_int(_PROMPT_TOKENS, message)}


def _server_message(response: httpx.Response) -> str:
    """The human message inside an error response, falling back to the raw body."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        msg = body.get("message")
        if msg is None and isinstance(body.get("error"), dict):
            msg = body["error"].get("message")
        if msg is None and isinstance(body.get("detail"), str):
            msg = body["detail"]  # FastAPI-style servers
        if msg:
            return str(msg)
    try:
        return response.text.strip()[:300] or "no message"
    except Exception:  # noqa: BLE001 - a broken body must not hide the status code
        return "no message"


class OpenAICompatClient:
    """Async client with bounded concurrency, per-request timeout and our own retry policy."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        api: str = "chat",
        max_concurrency: int = 16,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        option_name: str = "--actor",
    ):
        if api not in ("chat", "completions"):
            raise UsageError(f"Unknown API '{api}' for {option_name}: use 'chat' or 'completions'.")
        if max_concurrency < 1:
            raise UsageError(f"Concurrency for {option_name} must be at least 1, got {max_concurrency}.")
        self.model_id = model
        self.api = api
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.option_name = option_name
        # Local servers ignore the key; "EMPTY" is the placeholder they (and vLLM's docs) expect.
        self._api_key = api_key or "EMPTY"
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        try:
            httpx.URL(self.base_url + "/chat/completions")
        except Exception as exc:  # noqa: BLE001 - httpx raises several kinds for bad URLs
            raise UsageError(f"'{base_url}' is not a valid base URL for {option_name} ({exc}).") from None
        self._client = self._make_client()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None

    def _make_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=max(self.max_concurrency, 10), max_keepalive_connections=self.max_concurrency)
        return httpx.AsyncClient(timeout=self.timeout_s, limits=limits,
                                 headers={"Authorization": f"Bearer {self._api_key}", "User-Agent": "retroformer"})

    def _bind_loop(self) -> asyncio.Semaphore:
        """Semaphore and HTTP pool belong to one event loop; rebuild them if the caller's loop changed
        (e.g. successive ``asyncio.run`` calls), since a pool from a closed loop cannot be reused."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._client = self._make_client()
            self._loop = loop
            self._sem = asyncio.Semaphore(self.max_concurrency)
        assert self._sem is not None
        return self._sem

    def describe(self) -> dict[str, Any]:
        """Settings for run manifests. Never includes the API key."""
        return {"backend": "openai", "model": self.model_id, "base_url": self.base_url, "api": self.api}

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- generation ---------------------------------------------------------------------------
    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        sem = self._bind_loop()
        # The slot is held through backoff sleeps on purpose: a rate-limited server should see
        # fewer requests, not the same number from other tasks.
        async with sem:
            start = time.perf_counter()
            failures = 0
            while True:
                try:
                    text, usage, finish = await self._attempt(messages, config)
                    break
                except _Failure as f:
                    failures += 1
                    budget = min(self.max_retries, REFUSED_RETRIES) if f.refused else self.max_retries
                    if not f.retryable or failures > budget:
                        raise self._final_error(f, failures) from None
                    await asyncio.sleep(self._delay(failures, f.wait_s))
            latency_ms = (time.perf_counter() - start) * 1000.0  # includes retries: what a caller waited
        text, cut = apply_stop(text, config.stop)
        if cut:
            finish = "stop"
        return Generation(text=text, model_id=self.model_id, usage=usage, latency_ms=latency_ms,
                          finish_reason=finish, retries=failures)

    def _delay(self, failures: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max_s)
        # Full jitter: spreads a burst of failed requests so they do not retry in lockstep.
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** (failures - 1)))
        return random.uniform(0.0, cap)

    async def _attempt(self, messages: Sequence[Message], config: GenerationConfig) -> tuple[str, Usage, str | None]:
        kwargs: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
        }
        if config.stop:
            kwargs["stop"] = [s for s in config.stop if s][:MAX_STOP]
        if config.seed is not None:
            kwargs["seed"] = config.seed
        if self.api == "chat":
            path, body = "/chat/completions", {"messages": [{"role": m.role, "content": m.content} for m in messages]}
        else:
            path, body = "/completions", {"prompt": messages_to_prompt(messages)}
        body.update(kwargs)
        try:
            # wait_for caps the total time; httpx's timeout alone is per socket operation.
            resp = await asyncio.wait_for(self._client.post(self.base_url + path, json=body), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - classified below; CancelledError is not an Exception
            raise self._classify(e) from e
        if resp.status_code >= 400:
            raise self._status_failure(resp)
        try:
            data = resp.json()
        except ValueError:
            raise _Failure("the response was not valid JSON", retryable=True) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            raise _Failure("the response had no choices", retryable=False)
        choice = choices[0] or {}
        if self.api == "chat":
            text = (choice.get("message") or {}).get("content") or ""
        else:
            text = choice.get("text") or ""
        u = data.get("usage") or {}
        details = u.get("prompt_tokens_details") or {}
        usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0),
                      cached_tokens=int((details.get("cached_tokens") if isinstance(details, dict) else 0) or 0))
        return text, usage, choice.get("finish_reason")

    def _classify(self, e: Exception) -> _Failure:
        if isinstance(e, (asyncio.TimeoutError, httpx.TimeoutException)):
            return _Failure(f"no answer within {self.timeout_s:g} s", retryable=True)
        if isinstance(e, httpx.ConnectError):
            chain, c = [e], e.__cause__ or e.__context__
            while c is not None and len(chain) < 8:
                chain.append(c)
                c = c.__cause__ or c.__context__
            if any(isinstance(c, ConnectionRefusedError) or "refused" in str(c).lower()
                   or "all connection attempts failed" in str(c).lower() for c in chain):
                return _Failure("connection refused", retryable=True, refused=True)
            return _Failure(f"connection failed ({self._redact(str(e)) or type(e).__name__})", retryable=True)
        if isinstance(e, httpx.TransportError):  # dropped connection, protocol error mid-response
            return _Failure(f"connection failed ({self._redact(str(e)) or type(e).__name__})", retryable=True)
        return _Failure(f"{type(e).__name__}: {self._redact(str(e))}", retryable=False)

    def _status_failure(self, resp: httpx.Response) -> _Failure:
        status = resp.status_code
        message = self._redact(_server_message(resp))
        desc = f"HTTP {status}: {message}"
        if status in RETRYABLE_STATUS or status >= 500:
            return _Failure(desc, retryable=True, wait_s=_retry_after_s(resp.headers), status=status)
        return _Failure(desc, retryable=False, status=status, context=_context_overflow(resp, message))

    def _redact(self, text: str) -> str:
        """Servers sometimes echo the key in error messages; never let it reach the terminal or logs."""
        if self._api_key != "EMPTY" and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    def _final_error(self, f: _Failure, failures: int) -> BackendError:
        url, opt = self.base_url, self.option_name
        if f.context is not None:
            return ContextTooLong(f"The prompt does not fit the context of model '{self.model_id}' at {url} "
                                  f"({f.desc}) ({opt}).", **f.context)
        if f.refused:
            return BackendError(f"Cannot reach the OpenAI-compatible endpoint at {url}: connection refused "
                                f"({opt}-base-url).", hint="Is the server running and is the port right?")
        if f.status in (401, 403):
            return BackendError(f"The OpenAI-compatible endpoint at {url} rejected the API key ({f.desc}).",
                                hint=f"Check the API key used for {opt}.")
        if f.status == 404:
            return BackendError(f"The OpenAI-compatible endpoint at {url} answered {f.desc} for model "
                                f"'{self.model_id}' ({opt}, {opt}-base-url).",
                                hint="Check the model name and that the base URL ends in /v1.")
        if not f.retryable:
            return BackendError(f"The OpenAI-compatible endpoint at {url} rejected a request for model "
                                f"'{self.model_id}' ({f.desc}) ({opt}).")
        return BackendError(f"The OpenAI-compatible endpoint at {url} failed {failures} times in a row for "
                            f"model '{self.model_id}'; last error: {f.desc} ({opt}-base-url).")
