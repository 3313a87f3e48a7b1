"""The environment server's FastAPI app: OpenEnv's reset/step/state shapes, with sessions in the path, and
OpenEnv's own protocol beside it (WebSocket ``/ws``, ``/reset``, ``/step``, ``/state``, ``/mcp``: see
:mod:`retroformer_cli.envserver.openenv_proto`).

=======  ===============================  ==========================================================
GET      /health                          ``{"status": "healthy", "env", "sessions", ...}`` (no key)
GET      /metadata                        env name, description, versions
GET      /schema                          JSON schemas of action, observation and state (openenv_types.py)
GET      /openapi.json                    the OpenAPI description (``info.version`` 1.0.0: OpenEnv's HTTP 1.x)
GET      /tasks?offset=0&limit=100        the env's task ids
POST     /sessions                        ``{"session_id"}`` (503 capacity_reached when full)
POST     /sessions/{id}/reset             ``{"task_id"?, "seed"?, "episode_id"?, "options"?}``
POST     /sessions/{id}/step              ``{"action": {"text": "search[red shoes]"}}`` (or a string)
GET      /sessions/{id}/state             ``{"episode_id", "step_count", "task_id", "done", ...}``
DELETE   /sessions/{id}                   close (also ``POST /sessions/{id}/close``)
=======  ===============================  ==========================================================

reset and step answer ``{"observation": {"text"}, "reward", "done", "terminated", "truncated", "info"}``.
Every error is JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for anything a client
can cause; an action the env does not understand is an observation saying so (200), never an error.
The API key, body size, body deadline, content type and UTF-8 are checked before any handler
(:class:`retroformer_cli.httpserver.guard.GuardMiddleware`, shared with ``retroformer serve``).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from retroformer_cli import __version__
from retroformer_cli.envserver.openenv_proto import add_openenv_routes
from retroformer_cli.envserver.openenv_types import SessionState, TextAction, TextObservation
from retroformer_cli.envserver.sessions import EnvServerError, SessionManager
from retroformer_cli.httpserver.errors import error_body, validation_message
from retroformer_cli.httpserver.guard import GuardMiddleware

PROTOCOL_VERSION = "1"


class ResetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: Optional[StrictStr] = Field(None, min_length=1, max_length=1024)
    seed: Optional[StrictInt] = Field(None, ge=0)
    episode_id: Optional[StrictStr] = Field(None, max_length=255)
    options: Optional[dict[str, Any]] = None


class StepBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Union[StrictStr, TextAction]
    request_id: Optional[StrictStr] = Field(None, max_length=255)


def _schemas() -> dict[str, Any]:
    """OpenEnv's ``/schema``: the action a step takes (``action`` in our step body, ``data`` of a ``/ws`` step), the
    observation and the state."""
    return {"action": TextAction.model_json_schema(), "observation": TextObservation.model_json_schema(),
            "state": SessionState.model_json_schema()}


class _Response(JSONResponse):
    """JSON whatever an env puts in ``info`` (sets, paths, numpy scalars become strings)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return _Response(payload, status_code=status, headers=headers)


def create_app(manager: SessionManager, *, api_key: str | None = None, max_body_bytes: int = 65536,
               body_timeout_s: float = 10.0) -> FastAPI:
    """The app over ``manager``; its lifespan starts the idle-session sweeper and closes every session at exit."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            await manager.shutdown()

    # OpenEnv's `validate --url` reads info.version from /openapi.json: 1.x is its openenv-http/1.x profile
    app = FastAPI(title="retroformer env serve", version=f"{PROTOCOL_VERSION}.0.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.manager = manager
    app.add_middleware(GuardMiddleware, api_key=api_key, max_request_bytes=max_body_bytes,
                       body_timeout_s=body_timeout_s)
    _add_error_handlers(app)
    _add_routes(app, manager)
    add_openenv_routes(app, manager, api_key=api_key, max_message_bytes=max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EnvServerError)
    async def _ours(_req: Request, exc: EnvServerError) -> JSONResponse:
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return _json(error_body(exc.message, kind, exc.param, exc.code), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        code = "invalid_json" if "not valid JSON" in message else "invalid_request"
        return _json(error_body(message, param=param, code=code), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"There is no {req.url.path} here (see the protocol: GET /schema, POST /sessions).",
                   405: f"{req.method} is not allowed on {req.url.path}."}.get(exc.status_code, f"{exc.detail}.")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _json(error_body(message, kind, None, code), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_req: Request, exc: Exception) -> JSONResponse:
        return _json(error_body(f"Internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                "internal_error"), 500)


def _add_routes(app: FastAPI, manager: SessionManager) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        return _json({"status": "healthy", **manager.stats()})

    @app.get("/metadata")
    async def metadata() -> JSONResponse:
        doc = (getattr(manager.base, "__doc__", None) or "").strip().split("\n")[0]
        return _json({"name": manager.env_name, "description": doc, "version": __version__,
                      "protocol": "retroformer-env", "protocol_version": PROTOCOL_VERSION,
                      "max_steps": getattr(manager.base, "max_steps", None), "tasks": len(manager._task_ids)})

    @app.get("/schema")
    async def schema() -> JSONResponse:
        return _json(_schemas())

    @app.get("/tasks")
    async def tasks(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=10000)) -> JSONResponse:
        return _json(manager.tasks(offset, limit))

    @app.post("/sessions")
    async def create_session() -> JSONResponse:
        session = await manager.create()
        return _json({"session_id": session.id, "env": manager.env_name, "session_ttl_s": manager.ttl_s}, 201)

    @app.post("/sessions/{sid}/reset")
    async def reset(sid: str, body: ResetBody) -> JSONResponse:
        return _json(await manager.reset(sid, task_id=body.task_id, seed=body.seed, episode_id=body.episode_id,
                                         options=body.options))

    @app.post("/sessions/{sid}/step")
    async def step(sid: str, body: StepBody) -> JSONResponse:
        text = body.action if isinstance(body.action, str) else body.action.text
        result = await manager.step(sid, text)
        if body.request_id is not None:
            result["request_id"] = body.request_id
        return _json(result)

    @app.get("/sessions/{sid}/state")
    async def state(sid: str) -> JSONResponse:
        return _json(manager.get(sid, touch=True).state())

    @app.delete("/sessions/{sid}")
    @app.post("/sessions/{sid}/close")
    async def close(sid: str) -> JSONResponse:
        await manager.close(sid)
        return _json({"closed": True, "session_id": sid})
