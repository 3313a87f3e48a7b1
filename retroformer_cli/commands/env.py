"""`retroformer env serve`: an HTTP server stepping one of our environments for trainers in other processes and
languages (sessions, idle expiry, API key, JSON errors). Its options are the fields of ``EnvServerConfig``;
FastAPI and uvicorn load inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retroformer_cli.commands.context import build, config_command, examples, group_app, workspace
from retroformer_cli.envserver.config import EnvServerConfig
from retroformer_cli.errors import MissingExtra, UsageError, require
from retroformer_cli.options import Flag


def _env_options(items: list[str]) -> dict:
    from retroformer_cli.commands.collect import parse_env_options

    return parse_env_options(items)


SERVE_FLAGS = (
    Flag("env", ("-e",)), Flag("data", cli_type=Path), Flag("max_steps"),
    Flag("env_options", name="--env-option", cli_type=List[str], parse=_env_options, metavar="KEY=VALUE"), Flag("host"), Flag("port"),
    Flag("max_sessions"), Flag("session_ttl_s"), Flag("workers"), Flag("processes"), Flag("step_timeout_s"), Flag("max_body_bytes"),
    Flag("body_timeout_s"), Flag("idle_timeout_s"), Flag("max_connections"),
)

app = group_app("Environments over HTTP: `retroformer env serve`.")


@config_command(app.command("serve", epilog=examples(
    "retroformer env serve --env webshop --data ../shared/data/webshop",
    "retroformer env serve --env alfworld --env-option wording=react --api-key secret",
    "curl -s -X POST http://127.0.0.1:8001/sessions -H 'Content-Type: application/json' -d '{}'")),
                EnvServerConfig, SERVE_FLAGS)
def serve(
    overrides: dict,
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RETROFORMER_ENV_API_KEY",
                                          help="Require this key (Authorization: Bearer KEY or X-API-Key: KEY)."),
) -> None:
    """Serve an environment over HTTP: create a session, then reset, step, state and close it. OpenEnv clients
    connect to the same URL (WebSocket /ws, one session per connection)."""
    from retroformer_cli import console
    from retroformer_cli.httpserver.exposure import open_server_warning

    cfg = build(EnvServerConfig, overrides).validate()
    if cfg.port == 0:
        raise UsageError("--port must be between 1 and 65535, got 0.")
    require(("fastapi", "uvicorn"), "retroformer env serve")
    warning = open_server_warning(cfg.host, api_key, "step the environment")
    if warning:
        console.warning(warning)
    try:
        require((("websockets", "wsproto"),), "The WebSocket /ws (for OpenEnv clients)")
    except MissingExtra as exc:  # the session API works without: say what is missing, and serve
        console.warning(str(exc))
    from retroformer_cli.envserver import serve as serve_env

    console.log(("env serve", "bold"), f" loading {cfg.env} ...")

    def ready(url: str) -> None:
        console.log(("ready", "green"), f": {url}  env: {cfg.env}  sessions: up to {cfg.max_sessions}, closed "
                             f"after {cfg.session_ttl_s:g} s idle  auth: {'api key' if api_key else 'none'}  (Ctrl-C stops)")

    try:
        serve_env(cfg, api_key=api_key, cache_dir=workspace().cache_dir, on_ready=ready)
    except OSError as exc:
        raise UsageError(f"Cannot serve on {cfg.host}:{cfg.port}: {exc}.") from None
    console.log(("env serve: stopped", "dim"))
