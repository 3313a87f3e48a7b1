"""`retroformer env serve`: an HTTP server stepping one of our environments for trainers in other processes and
languages (sessions, idle expiry, API key, JSON errors). Its options are the fields of ``EnvServerConfig``;
FastAPI and uvicorn load inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from retroformer_cli.commands._common import build, command_app, handle_errors, workspace
from retroformer_cli.envserver.config import EnvServerConfig
from retroformer_cli.errors import UsageError, require
from retroformer_cli.options import Flag, config_options


def _env_options(items: list[str]) -> dict:
    from retroformer_cli.commands.collect import parse_env_options

    return parse_env_options(items)


SERVE_FLAGS = (
    Flag("env", ("-e",)), Flag("data", cli_type=Path), Flag("max_steps"),
    Flag("env_options", name="--env-option", cli_type=List[str], parse=_env_options, metavar="KEY=VALUE"), Flag("host"), Flag("port"),
    Flag("max_sessions"), Flag("session_ttl_s"), Flag("workers"), Flag("processes"), Flag("step_timeout_s"), Flag("max_body_bytes"),
    Flag("body_timeout_s"), Flag("idle_timeout_s"), Flag("max_connections"),
)

app = command_app(no_args_is_help=True)


@app.callback()
def env() -> None:
    """Environments over HTTP: `retroformer env serve`."""


@app.command("serve", epilog="Examples:\n\n  retroformer env serve --env webshop --data ../shared/data/webshop\n\n"
                             "  retroformer env serve --env alfworld --env-option wording=react --api-key secret\n\n"
                             "  curl -s -X POST http://127.0.0.1:8001/sessions -H 'Content-Type: application/json' -d '{}'")
@handle_errors
@config_options(EnvServerConfig, SERVE_FLAGS)
def serve(
    overrides: dict,
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RETROFORMER_ENV_API_KEY",
                                          help="Require this key (Authorization: Bearer KEY or X-API-Key: KEY)."),
) -> None:
    """Serve an environment over HTTP: create a session, then reset, step, state and close it."""
    from retroformer_cli import console
    from retroformer_cli.commands.serve import _is_loopback

    cfg = build(EnvServerConfig, overrides).validate()
    if cfg.port == 0:
        raise UsageError("--port must be between 1 and 65535, got 0.")
    require(("fastapi", "uvicorn"), "retroformer env serve")
    if not _is_loopback(cfg.host) and not api_key:
        console.warning(f"serving on {cfg.host} without --api-key: anyone who can reach this port can step the "
                        "environment.")
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
