"""`retroformer env serve` settings: one dataclass, help in field metadata (the CLI derives its flags from it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from retroformer_cli.config import EnvSelection, setting
from retroformer_cli.errors import UsageError


@dataclass
class EnvServerConfig(EnvSelection):
    """An HTTP server stepping one environment for clients in other processes (and languages)."""

    # where it listens, and its sessions
    host: str = setting("127.0.0.1", "interface to bind (0.0.0.0 exposes the server to the network)")
    port: int = setting(8001, "TCP port")
    max_sessions: int = setting(64, "open sessions at most; creating one more gets HTTP 503")
    session_ttl_s: float = setting(300.0, "a session idle this many seconds is closed (its id then gets 404 session_expired)")
    # who steps the envs
    workers: int | None = setting(None, "threads stepping in-process envs (WebShop, HotPotQA); for ALFWorld, idle engine processes kept for the next sessions [default: min(8, max_sessions)]")
    processes: int = setting(0, "step in-process envs (WebShop, HotPotQA) in this many worker processes, each loading the env once, instead of threads sharing one GIL; 0: threads")
    step_timeout_s: float = setting(120.0, "a reset or step taking longer gets HTTP 504 and its session is closed")
    # HTTP limits against slow or abusive clients
    max_body_bytes: int = setting(65536, "largest request body (HTTP 413 above)")
    body_timeout_s: float = setting(10.0, "a request body must arrive within this many seconds (HTTP 408 after)")
    idle_timeout_s: float = setting(10.0, "a connection must send its first request within this many seconds (closed after)")
    max_connections: int = setting(512, "open connections before new ones get HTTP 503")

    def thread_count(self) -> int:
        return self.workers if self.workers is not None else min(8, self.max_sessions)

    def validate(self) -> "EnvServerConfig":
        for name, value in (("--max-sessions", self.max_sessions), ("--max-body-bytes", self.max_body_bytes),
                            ("--max-connections", self.max_connections), ("--workers", self.thread_count())):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}.")
        for name, seconds in (("--session-ttl-s", self.session_ttl_s), ("--step-timeout-s", self.step_timeout_s),
                              ("--body-timeout-s", self.body_timeout_s), ("--idle-timeout-s", self.idle_timeout_s)):
            if not seconds > 0:
                raise UsageError(f"{name} must be positive, got {seconds}.")
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 0:
            raise UsageError(f"--processes must be 0 (threads) or a positive integer, got {self.processes!r}.")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be between 0 and 65535, got {self.port}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}.")
        if self.data is not None and not os.path.exists(self.data):
            raise UsageError(f"The data path '{self.data}' does not exist (--data).")
        return self
