"""The real ALFWorld game player (TextWorld's PDDL backend), in-process or in a worker process.

:class:`GamePlayer` plays one game at a time with ``textworld.start`` and alfworld's own wrappers
(``AlfredDemangler(shuffle=False)`` for the canonical "desk 2" names, ``AlfredInfos``), exactly what
``AlfredTWEnv`` builds, without its batching. Loaded games are kept in a small LRU so a second trial of
the same game skips the load (reset then rebuilds the start state from the game's PDDL problem), and
the first reset after a load uses the start state the load built instead of translating it twice.

:func:`worker_main` serves a GamePlayer over a pipe; the parent (:class:`~.env.ALFWorldEnv`) starts it with
the ``spawn`` method. Requests are ``(op, arg)`` tuples; replies ``("ok", payload)`` or
``("error", kind, message)``.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Any

from retroformer_cli.errors import install_command

INSTALL_HINT = install_command("alfworld")


def missing_dependency() -> str | None:
    """The first engine module that is not installed (found without importing it), or None."""
    import importlib.util

    for mod in ("alfworld", "textworld", "fast_downward"):
        try:
            if importlib.util.find_spec(mod) is None:
                return mod
        except (ImportError, ValueError):
            return mod
    return None


class GamePlayer:
    """One ALFWorld game at a time; ``reset(path)`` / ``step(command)`` return plain dicts."""

    def __init__(self, cache_games: int = 4):
        argv = list(sys.argv)
        try:
            import textworld
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        finally:
            sys.argv[:] = argv
        self._textworld = textworld
        self._wrappers = (AlfredDemangler, AlfredInfos)
        self._infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_games = max(0, int(cache_games))  # 0: load the game on every reset (as ALFWorld does)
        self._env: Any = None
        self._fresh: set[str] = set()  # loaded games whose start state was not used yet

    def _load(self, path: str) -> Any:
        env = self._cache.pop(path, None) if self._cache_games else None
        if env is None:
            demangler, infos = self._wrappers
            argv = list(sys.argv)  # the Fast Downward translator rewrites sys.argv while loading
            try:
                env = self._textworld.start(path, self._infos, wrappers=[demangler(shuffle=False), infos])
            finally:
                sys.argv[:] = argv
            while self._cache and len(self._cache) >= max(1, self._cache_games):
                gone, old = self._cache.popitem(last=False)
                self._fresh.discard(gone)
                old.close()
            self._fresh.add(path)
        self._cache[path] = env
        return env

    def _reset_fresh(self, env: Any) -> Any:
        """The first reset after a load. ``PddlEnv.load`` has just built the game's start state, and
        ``PddlEnv.reset`` would build the very same one again (Fast Downward's translation, the costliest
        part of a reset): hand it the one just built. Any other engine version: a plain reset."""
        inner = getattr(env, "unwrapped", env)
        try:
            from textworld.envs.pddl import logic as pddl_logic

            built, problem, logic = inner._pddl_state, inner._game_data["pddl_problem"], inner._logic
            original = pddl_logic.PddlState
        except (ImportError, AttributeError, KeyError, TypeError):
            return env.reset()

        def start_state(lib: Any, pddl_problem: Any, game_logic: Any) -> Any:
            if pddl_problem is problem and game_logic is logic:
                return built
            return original(lib, pddl_problem, game_logic)

        pddl_logic.PddlState = start_state
        try:
            return env.reset()
        finally:
            pddl_logic.PddlState = original

    def reset(self, path: str) -> dict[str, Any]:
        self._env = self._load(path)
        argv = list(sys.argv)
        try:
            if path in self._fresh:
                self._fresh.discard(path)
                state = self._reset_fresh(self._env)
            else:
                state = self._env.reset()
        finally:
            sys.argv[:] = argv
        return {"feedback": state.feedback, "admissible": list(state["admissible_commands"]),
                "won": bool(state["won"]), "done": False,
                "templates": list(state.get("command_templates") or ())}

    def step(self, command: str) -> dict[str, Any]:
        if self._env is None:
            raise RuntimeError("no game is loaded; reset first")
        state, _score, done = self._env.step(command)
        return {"feedback": state.feedback, "admissible": list(state["admissible_commands"]),
                "won": bool(state["won"]), "done": bool(done)}

    def close(self) -> None:
        for env in self._cache.values():
            env.close()
        self._cache.clear()
        self._env = None


def worker_main(conn: Any, cache_games: int = 4) -> None:
    """Serve a :class:`GamePlayer` over ``conn`` until ``("close", None)`` or the pipe closes."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    player = None
    try:
        while True:
            try:
                op, arg = conn.recv()
            except (EOFError, OSError):
                return
            if op == "close":
                conn.send(("ok", None))
                return
            try:
                if player is None:
                    player = GamePlayer(cache_games)
                if op == "reset":
                    reply = ("ok", player.reset(arg))
                elif op == "step":
                    reply = ("ok", player.step(arg))
                elif op == "ping":
                    reply = ("ok", os.getpid())
                else:
                    reply = ("error", "RuntimeError", f"unknown request {op!r}")
            except Exception as exc:  # reported to the parent, which raises it there
                reply = ("error", type(exc).__name__, str(exc) or repr(exc))
            try:
                conn.send(reply)
            except (OSError, EOFError):  # the parent went away (closed or killed us mid-request)
                return
    finally:
        if player is not None:
            player.close()
        conn.close()
