"""Run the app with uvicorn: in the foreground (``retroformer serve``; Ctrl-C or SIGTERM drains in-flight
requests, a second Ctrl-C forces the exit) or in a background thread (:class:`ServerThread`, for tests and
benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import uvicorn


def _guarded_h11() -> type:
    """uvicorn's h11 protocol, plus a deadline for a connection's first request: uvicorn starts its keep-alive
    timer only after a response, so a client that connects and sends nothing (or its headers a byte at a time)
    would hold the socket forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        first_request_timeout_s = 10.0

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._first_request_timer = self.loop.call_later(self.first_request_timeout_s, self._no_request)

        def _no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and self._first_request_timer is not None:
                self._first_request_timer.cancel()
                self._first_request_timer = None

        def handle_websocket_upgrade(self, event: Any) -> None:
            # the request came (an upgrade sets no cycle): the timer would otherwise close the WebSocket
            if self._first_request_timer is not None:
                self._first_request_timer.cancel()
                self._first_request_timer = None
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._first_request_timer is not None:
                self._first_request_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11


class _Server(uvicorn.Server):
    """uvicorn server that calls ``on_ready`` once the lifespan (model load) ran and the socket is bound."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()


def _config(app: Any, host: str, port: int, log_level: str, *, shutdown_grace_s: float | None = 30.0,
            idle_timeout_s: float = 10.0, max_connections: int | None = 512) -> uvicorn.Config:
    """uvicorn settings: on shutdown open requests get ``shutdown_grace_s`` to finish (None: forever), then
    they are cancelled; a connection must send its first request within ``idle_timeout_s`` and an idle
    keep-alive connection is closed after 5 s; beyond ``max_connections`` open connections new ones get 503."""
    protocol = _guarded_h11()
    protocol.first_request_timeout_s = idle_timeout_s
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False,
                          timeout_graceful_shutdown=shutdown_grace_s, timeout_keep_alive=5, http=protocol,
                          limit_concurrency=max_connections)


def base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


class _Stopped(Exception):
    pass


def serve_foreground(app: Any, host: str, port: int, on_ready: Callable[[str], None], log_level: str = "warning",
                     **limits: Any) -> None:
    """Blocking; returns after a graceful shutdown (Ctrl-C or SIGTERM: in-flight requests get the grace period)."""
    import signal

    server = _Server(_config(app, host, port, log_level, **limits), on_ready=lambda: on_ready(base_url(host, port)))

    def stopped(*_: Any) -> None:  # uvicorn re-raises the signal it caught once it has shut down
        raise _Stopped()

    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise OSError(f"the server could not start on {host}:{port} (is the port in use?)")


class ServerThread:
    """Serve ``app`` from a background thread on ``host`` and a free port (or ``port``); a context manager.

    >>> with ServerThread(create_app(engine)) as srv:  # doctest: +SKIP
    ...     print(srv.base_url)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout_s: float = 120.0, **limits: Any):
        self.app, self.host, self.log_level, self.start_timeout_s = app, host, log_level, start_timeout_s
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on connections accepted from such a socket; without it
        # every keep-alive answer waits ~40 ms (Nagle's algorithm against the client's delayed ACK)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = self._sock.getsockname()[1]
        self.base_url = base_url(host, self.port)
        self.server = _Server(_config(app, host, self.port, log_level, **limits))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> "ServerThread":
        def run() -> None:
            try:
                self.server.run(sockets=[self._sock])
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error = exc

        self._thread = threading.Thread(target=run, name="retroformer-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {self._error!r}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: stop accepting, finish open requests, drain the engine, join the thread."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
