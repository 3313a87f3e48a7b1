"""ALFWorld as a Gymnasium-shaped text environment over the real TextWorld engine.

Each env instance owns one engine worker process (``spawn`` start method), started on the first
reset; ``reset``/``step`` wait for it, ``areset``/``astep`` await it without blocking the event loop,
so the episodes of a collect run play in parallel processes while their LLM calls stay concurrent.
``close()`` ends the worker.

Success is ``info["won"]`` only; the step limit (50 by default) ends an episode with ``truncated``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
from typing import Any

from retroformer_cli.envs.base import check_can_step
from retroformer_cli.envs.alfworld.worker import GamePlayer, missing_dependency, worker_main
from retroformer_cli.envs.alfworld.games import Game, discover_games
from retroformer_cli.envs.alfworld.wording import (WORDINGS, commands_in, first_observation, normalize_command,
                                                   observation_in, to_native)
from retroformer_cli.errors import DataError, MissingExtra, RetroformerError, UsageError
from retroformer_cli.spawning import main_module_hidden

NOTHING = "Nothing happens."


class TextWorldError(RetroformerError):
    """The ALFWorld engine (or its worker process) failed."""


class ALFWorldEnv:
    """ALFWorld text games; reward 1 on the winning step, ``info["success"] = info["won"]``.

    ``data``: an ALFWORLD_DATA-style folder (default: env ``ALFWORLD_DATA``); ``split``: a split folder
    name, ``"all"`` or None (``valid_unseen`` when present, else all games); ``wording``: ``"alfworld"``
    (``move X to Y``, "You arrive at desk 2.") or ``"react"`` (``put X in/on Y``, the ReAct/Reflexion text)
    for what the actor sees; commands in either wording are accepted. ``process=False`` runs the engine
    in the calling process (debugging; ``areset``/``astep`` then block the loop).
    """

    env_id = "alfworld"
    action_names: tuple[str, ...] = ()  # free-text commands, not Name[arg]

    def __init__(self, data: str | os.PathLike | None = None, max_steps: int = 50, split: str | None = None,
                 wording: str = "alfworld", process: bool = True, cache_games: int = 4,
                 include_unsupported: bool = False):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise UsageError(f"The ALFWorld step limit (max_steps) must be a positive integer, got {max_steps!r}.")
        if wording not in WORDINGS:
            raise UsageError(f"Unknown ALFWorld wording '{wording}': choose one of {', '.join(WORDINGS)}.")
        missing = missing_dependency()
        if missing is not None:
            raise MissingExtra(missing, "The ALFWorld environment")
        self.max_steps = max_steps
        self.wording = wording
        self.process = bool(process)
        self.cache_games = int(cache_games)
        self.root, self.games = discover_games(data, split, include_unsupported)
        self._by_id: dict[str, Game] = {g.task_id: g for g in self.games}
        self._conn: Any = None
        self._proc: Any = None
        self._player: GamePlayer | None = None
        self._busy = False
        self._game: Game | None = None
        self._done = True

    # ---- tasks -------------------------------------------------------------------------------
    def task_ids(self) -> list[str]:
        return [g.task_id for g in self.games]

    def get_game(self, task_id: str) -> Game:
        key = str(task_id).replace("\\", "/").strip("/")
        if key.endswith("/game.tw-pddl"):
            key = key[: -len("/game.tw-pddl")]
        try:
            return self._by_id[key]
        except KeyError:
            raise UsageError(f"Unknown ALFWorld task id '{task_id}': it is not among the {len(self.games)} "
                             f"games of {self.root}.") from None

    def task_type(self, task_id: str) -> str:
        return self.get_game(task_id).task_type

    def walkthrough(self, task_id: str) -> list[str]:
        """The expert walkthrough stored in the game file, in this env's wording."""
        path = self.get_game(task_id).path
        try:
            with path.open(encoding="utf-8") as fh:
                steps = json.load(fh).get("walkthrough") or []
        except (OSError, ValueError) as exc:
            raise DataError(f"Cannot read the ALFWorld game file {path} ({exc}).") from None
        return commands_in([str(s) for s in steps], self.wording)

    def spawn(self) -> "ALFWorldEnv":
        """A twin over the same games with its own (lazily started) engine worker."""
        twin = object.__new__(type(self))  # subclasses spawn their own kind
        keep = ("max_steps", "wording", "process", "cache_games", "root", "games", "_by_id")
        twin.__dict__.update({k: self.__dict__[k] for k in keep})
        twin._conn = twin._proc = twin._player = None
        twin._busy, twin._game, twin._done = False, None, True
        return twin

    # ---- the engine worker -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine now (import + worker process) instead of on the first reset."""
        self._call("ping", None)

    def _ensure_player(self) -> None:
        if not self.process:
            if self._player is None:
                self._player = GamePlayer(self.cache_games)
            return
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop_worker()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child, self.cache_games), daemon=True, name="alfworld-engine")
        with main_module_hidden():
            proc.start()
        child.close()
        self._conn, self._proc = parent, proc

    def _stop_worker(self, wait: float = 2.0) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            try:
                if proc is not None and proc.is_alive() and not self._busy:
                    conn.send(("close", None))
                    if conn.poll(wait):
                        conn.recv()
            except (OSError, EOFError, ValueError):
                pass
            conn.close()
        if proc is not None:
            if self._busy:  # mid-request (cancelled): its reply is useless, do not wait for it
                proc.terminate()
            proc.join(wait)
            if proc.is_alive():
                proc.terminate()
                proc.join(wait)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._busy = False

    def _reply(self, op: str, reply: Any) -> Any:
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        where = f" on game {self._game.task_id}" if self._game is not None else ""
        if op == "reset":
            raise DataError(f"The ALFWorld engine could not load{where} ({kind}: {message}).")
        raise TextWorldError(f"The ALFWorld engine failed{where} ({kind}: {message}).")

    def _dead(self, op: str) -> TextWorldError:
        code = self._proc.exitcode if self._proc is not None else None
        self._stop_worker(wait=0.5)
        return TextWorldError(f"The ALFWorld engine worker process exited unexpectedly (exit code {code}) during {op}.")

    def _call(self, op: str, arg: Any) -> Any:
        if not self.process:
            self._ensure_player()
            assert self._player is not None
            try:
                return self._player.reset(arg) if op == "reset" else (
                    self._player.step(arg) if op == "step" else os.getpid())
            except RetroformerError:
                raise
            except Exception as exc:
                return self._reply(op, ("error", type(exc).__name__, str(exc)))
        self._ensure_player()
        try:
            self._conn.send((op, arg))
            reply = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            raise self._dead(op) from None
        return self._reply(op, reply)

    async def _acall(self, op: str, arg: Any) -> Any:
        if not self.process:
            return self._call(op, arg)
        if self._busy:
            raise RuntimeError("this ALFWorld env is already serving a request; use one env per episode (spawn())")
        self._ensure_player()
        conn = self._conn
        loop = asyncio.get_running_loop()
        self._busy = True
        try:
            conn.send((op, arg))
            ready = loop.create_future()
            try:
                loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
            except (NotImplementedError, RuntimeError):  # e.g. Windows' proactor loop: wait in a thread
                reply = await asyncio.to_thread(conn.recv)
            else:
                try:
                    await ready
                finally:
                    loop.remove_reader(conn.fileno())
                reply = conn.recv()
        except asyncio.CancelledError:
            self._busy = False
            self._stop_worker(wait=0.5)  # its late reply would desynchronise the pipe: start afresh next time
            raise
        except (EOFError, OSError, BrokenPipeError):
            self._busy = False
            raise self._dead(op) from None
        self._busy = False
        return self._reply(op, reply)

    def close(self) -> None:
        self._stop_worker()
        if self._player is not None:
            self._player.close()
            self._player = None
        self._game, self._done = None, True

    def __enter__(self) -> "ALFWorldEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._proc is not None:
                self._stop_worker(wait=0.2)
        except Exception:
            pass

    # ---- episodes ----------------------------------------------------------------------------
    def _begin_reset(self, options: dict[str, Any] | None) -> Game:
        if not options or "task_id" not in options:
            raise UsageError("ALFWorldEnv.reset() needs options={'task_id': ...} naming one game.")
        self._game = self.get_game(str(options["task_id"]))
        self._done = True
        return self._game

    def _end_reset(self, game: Game, reply: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        raw = reply["feedback"]
        goal = next((p.strip() for p in raw.split("\n\n") if p.strip().startswith("Your task is to:")), "")
        self._goal = goal
        self._adm = list(reply["admissible"])
        self._adm_set = set(self._adm)
        self._won = bool(reply["won"])
        self._steps = 0
        self._done = False
        return first_observation(raw, self.wording), self._info("reset")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start ``options['task_id']``; ``seed`` is unused (the games are deterministic)."""
        game = self._begin_reset(options)
        return self._end_reset(game, self._call("reset", str(game.path)))

    async def areset(self, *, seed: int | None = None,
                     options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        game = self._begin_reset(options)
        return self._end_reset(game, await self._acall("reset", str(game.path)))

    def _begin_step(self, action: str) -> tuple[str | None, str]:
        check_can_step(self._game is not None, self._done)
        self._steps += 1
        text = normalize_command(action)
        if text == "think" or text.startswith("think:"):
            return None, "think"  # ReAct's think action: answered "OK." without touching the game
        native = to_native(action, self._adm_set)
        if native not in self._adm_set:
            # Not admissible: the engine would answer "Nothing happens." and change nothing (PddlEnv.step).
            return None, "invalid"
        return native, "command"

    def _end_step(self, native: str | None, kind: str,
                  reply: dict[str, Any] | None) -> tuple[str, float, bool, bool, dict[str, Any]]:
        terminated = False
        reward = 0.0
        if reply is None:
            obs = "OK." if kind == "think" else NOTHING
        else:
            obs = observation_in(reply["feedback"], self.wording, native or "")
            self._adm = list(reply["admissible"])
            self._adm_set = set(self._adm)
            if reply["won"] and not self._won:
                reward = 1.0
            self._won = bool(reply["won"])
            terminated = bool(reply["done"]) or self._won
        truncated = not terminated and self._steps >= self.max_steps
        info = self._info(kind)
        info["command"] = native
        if terminated or truncated:
            self._done = True
            del info["available_actions"]
            info.update(success=self._won, score=1.0 if self._won else 0.0, steps=self._steps)
        return obs, reward, terminated, truncated, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        native, kind = self._begin_step(action)
        reply = self._call("step", native) if native is not None else None
        return self._end_step(native, kind, reply)

    async def astep(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        native, kind = self._begin_step(action)
        reply = await self._acall("step", native) if native is not None else None
        return self._end_step(native, kind, reply)

    def _info(self, kind: str) -> dict[str, Any]:
        assert self._game is not None
        return {"task_id": self._game.task_id, "instruction": self._goal, "task_type": self._game.task_type,
                "split": self._game.split, "step": self._steps, "won": self._won, "action_type": kind,
                "available_actions": commands_in(self._adm, self.wording)}


__all__ = ["ALFWorldEnv", "TextWorldError", "NOTHING"]
