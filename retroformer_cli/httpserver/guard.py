"""Hardening in front of every handler: OpenAI's error body, and :class:`GuardMiddleware` (API key, body size,
body deadline, content type, UTF-8) so that no handler reads an unchecked or trickled body.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi.responses import JSONResponse

from retroformer_cli.httpserver.errors import error_body

OPEN_PATHS = frozenset({"/health", "/v1/health"})
JSON_TYPES = ("application/json",)


def api_key_problem(headers: dict[bytes, bytes], api_key: str) -> str | None:
    """Why a request's headers (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) do not carry ``api_key``, in
    one sentence; None when they do. For HTTP requests here and for WebSocket handshakes (``/ws``)."""
    auth = headers.get(b"authorization", b"").decode("latin-1")
    token = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get(b"x-api-key", b"").decode("latin-1")
    if hmac.compare_digest(token.encode(), api_key.encode()):
        return None
    return "Incorrect API key provided." if token else "No API key provided (Authorization: Bearer KEY)."


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
        if scope["type"] != "http":  # WebSocket handshakes check the key in their handler (it answers in-band)
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope.get("path") not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            msg = api_key_problem(headers, self.api_key)
            if msg is not None:
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
