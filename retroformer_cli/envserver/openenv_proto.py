"""OpenEnv's protocol on the env server's app, beside our session API: an unmodified OpenEnv client (``EnvClient``,
``GenericEnvClient``) plays episodes over the WebSocket ``/ws``, and ``openenv validate --url`` passes.

=====  =========  ================================================================================================
WS     /ws        one session per connection (our sessions: capacity, step timeout; no idle expiry while
                  connected: the session closes with its connection);
                  in: ``{"type": "reset"|"step"|"state"|"close", "data": ...}``,
                  out: ``{"type": "observation"|"state"|"error", "data": ...}``
POST   /reset     OpenEnv's HTTP reset: a fresh env per call (a session, reset, closed); the first observation
POST   /step      OpenEnv's HTTP step on a fresh env, which has no episode: 409 ``no_episode`` (use ``/ws``)
GET    /state     a fresh env's state
POST   /mcp       JSON-RPC 2.0; these envs have no MCP tools
=====  =========  ================================================================================================

An observation is ``{"observation": {"text", "info", "terminated", "truncated"}, "reward", "done"}``
(:class:`~retroformer_cli.envserver.openenv_types.TextObservation` as OpenEnv serializes one). An error is
``{"type": "error", "data": {"message", "code"}}`` with OpenEnv's ``WSErrorCode`` (``INVALID_JSON``,
``UNKNOWN_TYPE``, ``VALIDATION_ERROR`` with ``errors``, ``EXECUTION_ERROR``, ``CAPACITY_REACHED``,
``SESSION_ERROR``) and, when we know more, ``reason``: our own code (``no_episode``, ``episode_over``,
``env_timeout``, ``session_expired``, ...). The connection stays open after an error, unless its session is gone.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal, Optional
from urllib.parse import urlsplit

from fastapi import Body, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from retroformer_cli.envserver.openenv_types import WIRE_TOP_LEVEL, SessionState, TextAction, TextObservation
from retroformer_cli.envserver.sessions import EnvServerError, SessionManager
from retroformer_cli.httpserver.guard import api_key_problem

# OpenEnv's WSErrorCode values (openenv.core.env_server.types)
INVALID_JSON, UNKNOWN_TYPE, VALIDATION_ERROR = "INVALID_JSON", "UNKNOWN_TYPE", "VALIDATION_ERROR"
EXECUTION_ERROR, CAPACITY_REACHED, SESSION_ERROR = "EXECUTION_ERROR", "CAPACITY_REACHED", "SESSION_ERROR"
# JSON-RPC 2.0 error codes
RPC_PARSE_ERROR, RPC_INVALID_REQUEST, RPC_METHOD_NOT_FOUND, RPC_INTERNAL_ERROR = -32700, -32600, -32601, -32603
# our codes after which the session is gone (the connection ends after the error)
SESSION_GONE = frozenset({"env_timeout", "session_expired", "session_not_found"})
# our session API's messages that name its HTTP calls, as a WebSocket client reads them
WS_MESSAGES = {"no_episode": "No episode has started on this connection; send a reset first.",
               "episode_over": "The episode is over; send a reset to start another."}


class ResetData(BaseModel):
    """``reset``'s data (and HTTP ``/reset``'s body): OpenEnv's ``seed`` and ``episode_id``, our ``task_id`` and
    ``options``. Other keys are ignored, as OpenEnv's server drops the kwargs an env's ``reset`` does not take."""

    model_config = ConfigDict(extra="ignore")
    seed: Optional[StrictInt] = Field(None, ge=0)
    episode_id: Optional[StrictStr] = Field(None, max_length=255)
    task_id: Optional[StrictStr] = Field(None, min_length=1, max_length=1024)
    options: Optional[dict[str, Any]] = None


class StepData(BaseModel):
    """HTTP ``/step``'s body: OpenEnv's ``StepRequest`` with our action."""

    model_config = ConfigDict(extra="allow")
    action: TextAction
    timeout_s: Optional[float] = Field(None, gt=0)
    request_id: Optional[StrictStr] = Field(None, max_length=255)


# The messages a client sends, as strict as OpenEnv's WSResetMessage, WSStepMessage, WSStateMessage, WSCloseMessage
class _ResetMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["reset"]
    data: dict[str, Any] = Field(default_factory=dict)


class _StepMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["step"]
    data: dict[str, Any]


class _BareMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["state", "close"]


_MESSAGES = {"reset": _ResetMessage, "step": _StepMessage, "state": _BareMessage, "close": _BareMessage}


def _dumps(payload: Any) -> str:
    """JSON whatever an env puts in ``info`` (sets, paths, numpy scalars become strings)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)


def _json(payload: Any) -> Response:
    return Response(_dumps(payload), media_type="application/json")


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "data": {"message": message, "code": code, **extra}}


def _observation(result: dict[str, Any]) -> dict[str, Any]:
    """A reset or step answer of :class:`SessionManager` as OpenEnv's ``serialize_observation`` sends it."""
    obs = TextObservation(text=result["observation"]["text"], info=dict(result.get("info") or {}),
                          terminated=result["terminated"], truncated=result["truncated"], done=result["done"],
                          reward=result["reward"])
    return {"observation": obs.model_dump(exclude=set(WIRE_TOP_LEVEL)), "reward": obs.reward, "done": obs.done}


def _invalid(exc: ValidationError) -> dict[str, Any]:
    errors = exc.errors(include_url=False, include_context=False)
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ())) or "message"
    return _error(VALIDATION_ERROR, f"Invalid message: {where}: {first.get('msg', 'invalid')}.", errors=errors)


async def _answer(manager: SessionManager, sid: str, raw: str) -> tuple[Optional[dict[str, Any]], bool]:
    """The reply to one message, and whether the connection ends after it."""
    try:
        message = json.loads(raw)
    except ValueError as exc:
        return _error(INVALID_JSON, f"Invalid JSON: {exc}"), False
    kind = message.get("type", "") if isinstance(message, dict) else None
    if kind is None:
        return _error(VALIDATION_ERROR, 'Invalid message: a message is a JSON object {"type", "data"}.'), False
    if not isinstance(kind, str) or kind not in _MESSAGES:
        return _error(UNKNOWN_TYPE, f"Unknown message type: {kind}"), False
    try:
        parsed = _MESSAGES[kind].model_validate(message)
        if kind == "close":
            return None, True
        if kind == "state":
            return {"type": "state", "data": manager.get(sid, touch=True).state()}, False
        if kind == "reset":
            body = ResetData.model_validate(parsed.data)
            result = await manager.reset(sid, task_id=body.task_id, seed=body.seed, episode_id=body.episode_id,
                                         options=body.options)
        else:
            result = await manager.step(sid, TextAction.model_validate(parsed.data).text)
        return {"type": "observation", "data": _observation(result)}, False
    except ValidationError as exc:
        return _invalid(exc), False
    except EnvServerError as exc:
        code = SESSION_ERROR if exc.code in ("session_expired", "session_not_found") else EXECUTION_ERROR
        return _error(code, WS_MESSAGES.get(exc.code, exc.message), reason=exc.code), exc.code in SESSION_GONE
    except Exception as exc:  # noqa: BLE001 - a bug in an env: this message fails, as a 500 would over HTTP
        return _error(EXECUTION_ERROR, f"Internal error: {type(exc).__name__}: {exc}", reason="internal_error"), False


def _cross_origin(websocket: WebSocket) -> bool:
    """A browser page of another site (its ``Origin`` is not this host): refused, as no CORS protects a WebSocket.
    Programs (OpenEnv's client, websockets, httpx) send no Origin."""
    headers = dict(websocket.scope.get("headers") or [])
    origin = headers.get(b"origin")
    return origin is not None and urlsplit(origin.decode("latin-1")).netloc != headers.get(b"host", b"").decode("latin-1")


async def _converse(websocket: WebSocket, manager: SessionManager, sid: str, max_message_bytes: int) -> None:
    """Answer the connection's messages, one at a time, until it closes or sends ``close``."""
    while True:
        event = await websocket.receive()
        if event["type"] == "websocket.disconnect":
            return
        raw = event.get("text")
        if raw is None:
            raw = (event.get("bytes") or b"").decode("utf-8", "replace")
        if len(raw.encode("utf-8", "surrogatepass")) > max_message_bytes:
            reply, end = _error(VALIDATION_ERROR, f"Invalid message: larger than {max_message_bytes} bytes."), False
        else:
            reply, end = await _answer(manager, sid, raw)
        if reply is not None:
            await websocket.send_text(_dumps(reply))
        if end:
            return


async def _close(websocket: WebSocket, code: int) -> None:
    try:
        await websocket.close(code=code)
    except (RuntimeError, WebSocketDisconnect):
        pass  # the client already went away


async def _refuse(websocket: WebSocket, error: dict[str, Any], code: int) -> None:
    """Send ``error`` at once (as OpenEnv does), then close after the client's first message or 5 s: a client that
    sends before it reads (OpenEnv's client does) then reads this error, rather than finding the socket closed."""
    await websocket.send_text(_dumps(error))
    try:
        await asyncio.wait_for(websocket.receive(), 5.0)
    except (asyncio.TimeoutError, RuntimeError, WebSocketDisconnect):
        pass
    await _close(websocket, code)


def add_openenv_routes(app: FastAPI, manager: SessionManager, *, api_key: Optional[str] = None,
                       max_message_bytes: int = 65536) -> None:
    """OpenEnv's routes on ``app`` (see the module's table); ``api_key`` guards ``/ws`` too."""

    @app.websocket("/ws")
    async def openenv_ws(websocket: WebSocket) -> None:
        if _cross_origin(websocket):
            await websocket.close(code=1008)  # before accepting: the handshake gets HTTP 403
            return
        await websocket.accept()
        problem = api_key_problem(dict(websocket.scope.get("headers") or []), api_key) if api_key else None
        if problem is not None:
            return await _refuse(websocket, _error(SESSION_ERROR, problem, reason="invalid_api_key"), 1008)
        try:
            session = await manager.create()
        except EnvServerError as exc:
            code = CAPACITY_REACHED if exc.code == "capacity_reached" else SESSION_ERROR
            return await _refuse(websocket, _error(code, exc.message, reason=exc.code, max_sessions=manager.max_sessions,
                                                   active_sessions=manager.stats()["sessions"]), 1013)
        session.held, sid = True, session.id  # a quiet connection keeps its session; it ends when the connection does
        try:
            await _converse(websocket, manager, sid, max_message_bytes)
        except WebSocketDisconnect:
            pass  # the client went away while we answered
        finally:
            try:
                await manager.close(sid)
            except EnvServerError:
                pass  # closed after a step timeout
            await _close(websocket, 1000)

    _add_http_routes(app, manager)


def _add_http_routes(app: FastAPI, manager: SessionManager) -> None:
    @app.post("/reset")
    async def openenv_reset(body: ResetData = Body(default_factory=ResetData)) -> Response:
        session = await manager.create()
        try:
            result = await manager.reset(session.id, task_id=body.task_id, seed=body.seed, episode_id=body.episode_id,
                                         options=body.options)
        finally:
            try:
                await manager.close(session.id)
            except EnvServerError:
                pass
        return _json(_observation(result))

    @app.post("/step")
    async def openenv_step(body: StepData) -> Response:
        raise EnvServerError(409, "A fresh env has no episode to step (OpenEnv's HTTP /step builds one per call); "
                                  "play episodes over the WebSocket /ws, as OpenEnv's EnvClient does, or POST /sessions.",
                             "no_episode")

    @app.get("/state")
    async def openenv_state() -> Response:
        return _json(SessionState().model_dump())

    @app.post("/mcp")
    async def openenv_mcp(request: Request) -> Response:
        return _json(_rpc_answer(await request.body()))


def _rpc_answer(body: bytes) -> dict[str, Any]:
    """JSON-RPC 2.0 as OpenEnv's ``/mcp`` answers for an env without MCP tools."""
    def error(code: int, message: str, rid: Any = None) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message, "data": None}}

    try:
        request = json.loads(body)
    except ValueError:
        return error(RPC_PARSE_ERROR, "Parse error")
    rid = request.get("id") if isinstance(request, dict) else None
    rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    if not (isinstance(request, dict) and request.get("jsonrpc") == "2.0" and isinstance(request.get("method"), str)
            and isinstance(request.get("params", {}), dict)):
        return error(RPC_INVALID_REQUEST, 'Invalid request: a JSON-RPC 2.0 request has "jsonrpc": "2.0", a "method" '
                                          'and object "params".', rid)
    if request["method"] in ("tools/list", "tools/call"):
        return error(RPC_INTERNAL_ERROR, "Environment does not support MCP", rid)
    return error(RPC_METHOD_NOT_FOUND, f"Method not found: {request['method']}", rid)
