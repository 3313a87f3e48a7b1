"""`retroformer env serve`: our environments over HTTP, so that trainers in other processes and languages can
step them, and :class:`~retroformer_cli.envserver.client.EnvClient`, a small Python client.

- :mod:`.config`: :class:`EnvServerConfig` (the CLI's flags).
- :mod:`.sessions`: bounded sessions with idle expiry; in-process envs step in threads, ALFWorld in a pool of
  engine processes.
- :mod:`.app`: the FastAPI app (OpenEnv-shaped reset/step/state, sessions in the path, JSON errors).
- :mod:`.client`: the httpx client; a remote session has the Gymnasium ``reset``/``step`` shape.

Nothing here imports FastAPI, uvicorn or httpx at module level.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from retroformer_cli.envserver.config import EnvServerConfig

__all__ = ["EnvServerConfig", "build_app", "build_env", "serve", "server_thread"]


def build_env(cfg: EnvServerConfig, cache_dir: str | Path | None = None) -> Any:
    """The env every session spawns from, made as ``retroformer collect`` makes it (same options, same data)."""
    from retroformer_cli.envs import canonical_name, make_for
    from retroformer_cli.errors import UsageError

    name = canonical_name(cfg.env)
    cfg = dataclasses.replace(cfg, env=name)
    if cfg.processes:
        from retroformer_cli.envserver.procpool import ProcessPoolEnv

        return ProcessPoolEnv(cfg, cfg.processes, cache_dir)
    env = make_for(cfg, Path(cache_dir) if cache_dir is not None else None)
    if not hasattr(env, "spawn"):
        raise UsageError(f"The {name} environment cannot be served: it has no spawn() for one env per session.")
    return env


def build_app(cfg: EnvServerConfig, env: Any, api_key: str | None = None) -> Any:
    """The FastAPI app serving ``env`` (from :func:`build_env`) with ``cfg``'s limits."""
    from retroformer_cli.envserver.app import create_app
    from retroformer_cli.envserver.sessions import SessionManager

    from retroformer_cli.envserver.procpool import ProcessPoolEnv

    manager = SessionManager(env, max_sessions=cfg.max_sessions, ttl_s=cfg.session_ttl_s,
                             workers=cfg.thread_count(), step_timeout_s=cfg.step_timeout_s,
                             close_base=isinstance(env, ProcessPoolEnv))
    return create_app(manager, api_key=api_key, max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s)


def _limits(cfg: EnvServerConfig) -> dict[str, Any]:
    return {"idle_timeout_s": cfg.idle_timeout_s, "max_connections": cfg.max_connections, "shutdown_grace_s": 10.0}


def server_thread(cfg: EnvServerConfig, env: Any | None = None, api_key: str | None = None,
                  cache_dir: str | Path | None = None) -> Any:
    """A started server in a background thread on ``cfg.host`` and ``cfg.port`` (0: a free port); ``.url`` is
    its address, ``.stop()`` ends it. For tests, benchmarks and trainers that host the env themselves."""
    from retroformer_cli.httpserver.runner import ServerThread

    cfg.validate()
    app = build_app(cfg, env if env is not None else build_env(cfg, cache_dir), api_key)
    srv = ServerThread(app, host=cfg.host, port=cfg.port, **_limits(cfg))
    srv.url = srv.base_url.removesuffix("/v1")
    srv.manager = app.state.manager
    return srv.start()


def serve(cfg: EnvServerConfig, api_key: str | None = None, cache_dir: str | Path | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM (open requests get 10 s to finish)."""
    from retroformer_cli.httpserver.runner import serve_foreground

    cfg.validate()
    _check_port(cfg.host, cfg.port)  # before loading the env, and without uvicorn's log line and exit
    app = build_app(cfg, build_env(cfg, cache_dir), api_key)
    try:
        serve_foreground(app, cfg.host, cfg.port, lambda url: on_ready and on_ready(url.removesuffix("/v1")),
                         **_limits(cfg))
    except SystemExit:  # uvicorn exits when it cannot bind (the port was taken since the check)
        raise OSError("the port is in use") from None


def _check_port(host: str, port: int) -> None:
    import socket

    from retroformer_cli.errors import UsageError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UsageError(f"Cannot serve on {host}:{port}: {exc.strerror or exc} (--host/--port).") from None
