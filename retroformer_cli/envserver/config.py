"""`retroformer env serve` settings: one dataclass, help in field metadata (the CLI derives its flags from it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from retroformer_cli.errors import UsageError


@dataclass
class EnvServerConfig:
    """An HTTP server stepping one environment for clients in other processes (and languages)."""

    env: str = field(default="hotpotqa", metadata={"help": "environment: hotpotqa | webshop | alfworld, or an installed plugin env"})
    data: str | None = field(default=None, metadata={"help": "data file or folder in the env's real format; default: sample data"})
    max_steps: int | None = field(default=None, metadata={"help": "per-episode step limit (env default when unset)"})
    env_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra env argument KEY=VALUE, repeatable (YAML: a mapping), e.g. wording=react for ALFWorld"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind (0.0.0.0 exposes the server to the network)"})
    port: int = field(default=8001, metadata={"help": "TCP port"})
    max_sessions: int = field(default=64, metadata={"help": "open sessions at most; creating one more gets HTTP 503"})
    session_ttl_s: float = field(default=300.0, metadata={"help": "a session idle this many seconds is closed (its id then gets 404 session_expired)"})
    workers: int | None = field(default=None, metadata={"help": "threads stepping in-process envs (WebShop, HotPotQA); for ALFWorld, idle engine processes kept for the next sessions [default: min(8, max_sessions)]"})
    processes: int = field(default=0, metadata={"help": "step in-process envs (WebShop, HotPotQA) in this many worker processes, each loading the env once, instead of threads sharing one GIL; 0: threads"})
    step_timeout_s: float = field(default=120.0, metadata={"help": "a reset or step taking longer gets HTTP 504 and its session is closed"})
    max_body_bytes: int = field(default=65536, metadata={"help": "largest request body (HTTP 413 above)"})
    body_timeout_s: float = field(default=10.0, metadata={"help": "a request body must arrive within this many seconds (HTTP 408 after)"})
    idle_timeout_s: float = field(default=10.0, metadata={"help": "a connection must send its first request within this many seconds (closed after)"})
    max_connections: int = field(default=512, metadata={"help": "open connections before new ones get HTTP 503"})

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
