"""The two ALFWorld command/observation wordings and the conversions between them.

``alfworld``: the current ALFWorld games (json_2.1.3 grammar, alfworld >= 0.4): ``move X to Y``,
"You arrive at desk 2. On the desk 2, ...", "You move the mug 1 to the desk 2.", a ``help`` command.

``react``: what ReAct, Reflexion and Retroformer prompts show (json_2.1.1 grammar after ReAct's
``process_ob``): ``put X in/on Y``, the "You arrive at loc N. " prefix removed, "You put the mug 1
in/on the desk 2.", the welcome line dropped, no ``help``.

Game files may use either grammar (``native``); commands in either wording are mapped to the game's own
command when that command is admissible, and observations are rewritten into the wording shown.
"""

from __future__ import annotations

import re
from typing import Iterable

WORDINGS = ("alfworld", "react")

_PLACE = re.compile(r"^(?:put|move|place)\s+(.+?)\s+(?:in/on|in / on|into|inside|onto|in|on|to)\s+(.+)$")
_ARRIVE = re.compile(r"^You arrive at ([^.]*)\.\s*")
_MOVED = re.compile(r"^You move the (.+?) to the (.+?)\.$")
_PUT = re.compile(r"^You put the (.+?) in/on the (.+?)\.$")
_GOTO = re.compile(r"^go to (.+)$")
WELCOME = "-= Welcome to TextWorld, ALFRED! =-"


def normalize_command(text: str) -> str:
    """Lower-case, one line, single spaces; drops a leading '>' and quotes and a trailing period."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    c = lines[0] if lines else ""
    c = c.strip().lstrip(">").strip().strip("`\"'").strip()
    if c.endswith(".") and not c.endswith(".."):
        c = c[:-1]
    return " ".join(c.lower().split())


def to_native(command: str, admissible: Iterable[str] | set[str]) -> str:
    """The game's own command for ``command`` (either wording), or ``command`` normalized when none fits."""
    adm = admissible if isinstance(admissible, (set, frozenset, dict)) else set(admissible)
    c = normalize_command(command)
    if c in adm:
        return c
    m = _PLACE.match(c)
    if m:
        obj, rec = m.group(1), m.group(2)
        for cand in (f"move {obj} to {rec}", f"put {obj} in/on {rec}", f"put {obj} in {rec}",
                     f"put {obj} into {rec}"):
            if cand in adm:
                return cand
    return c


def command_in(command: str, wording: str) -> str:
    """An admissible command in the game's wording, rewritten into ``wording``."""
    m = _PLACE.match(command)
    if m is None:
        return command
    if wording == "react" and command.startswith("move ") and " to " in command:
        return f"put {m.group(1)} in/on {m.group(2)}"
    if wording == "alfworld" and command.startswith("put ") and " in/on " in command:
        return f"move {m.group(1)} to {m.group(2)}"
    return command


def commands_in(commands: Iterable[str], wording: str) -> list[str]:
    out = [command_in(c, wording) for c in commands]
    if wording == "react":
        out = [c for c in out if c != "help"]
    return out


def first_observation(raw: str, wording: str) -> str:
    """The intro without the welcome line: ReAct joins the paragraphs with one newline."""
    paras = [p for p in raw.strip().split("\n\n") if p.strip() and p.strip() != WELCOME]
    return ("\n" if wording == "react" else "\n\n").join(p.strip() for p in paras)


def observation_in(raw: str, wording: str, native_command: str = "") -> str:
    """Rewrite one step's feedback into ``wording``; ``native_command`` gives the go-to target."""
    obs = raw.strip()
    if wording == "react":
        obs = _ARRIVE.sub("", obs, count=1)  # ReAct's process_ob (it strips "You arrive at loc N. ")
        m = _MOVED.match(obs)
        if m:
            obs = f"You put the {m.group(1)} in/on the {m.group(2)}."
        return obs
    m = _ARRIVE.match(obs)
    if m and m.group(1).startswith("loc "):  # a json_2.1.1 game shown in the current wording
        g = _GOTO.match(native_command)
        if g:
            obs = f"You arrive at {g.group(1)}. " + obs[m.end():]
    m = _PUT.match(obs)
    if m:
        obs = f"You move the {m.group(1)} to the {m.group(2)}."
    return obs
