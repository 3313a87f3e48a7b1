"""Gold hints for the diagnostic oracle reflectors on ALFWorld (``EnvSpec.oracle``), from the expert walkthrough
stored in each game file (``ALFWorldEnv.walkthrough``).

``hint`` names the places (receptacles) the walkthrough visits, in order, without its other actions; ``leak``
gives the walkthrough's actions.

>>> hint, leak = hints_for(["go to countertop 3", "take bowl 1 from countertop 3", "go to sinkbasin 1",
...                         "clean bowl 1 with sinkbasin 1", "go to cabinet 4", "move bowl 1 to cabinet 4"])
>>> hint
'I did not complete the task. Next time I will go to countertop 3, then sinkbasin 1, then cabinet 4, in that order, and at each place do the step the task needs there.'
"""

from __future__ import annotations

import re
from typing import Any, Sequence

_GOTO = re.compile(r"^go to (.+)$", re.IGNORECASE)
_GENERIC = ("I did not complete the task. Next time I will first find the object the task names, checking every "
            "place where it could be, and then carry it to the place the task names.")


def places(walkthrough: Sequence[str]) -> list[str]:
    """The receptacles the walkthrough goes to, in order (a repeated visit in a row counted once)."""
    out: list[str] = []
    for command in walkthrough:
        m = _GOTO.match(command.strip())
        if m and (not out or out[-1] != m.group(1).strip()):
            out.append(m.group(1).strip())
    return out


def hints_for(walkthrough: Sequence[str]) -> tuple[str, str]:
    """``(hint, leak)`` from one game's walkthrough commands."""
    visited = places(walkthrough)
    hint = (f"I did not complete the task. Next time I will go to {', then '.join(visited)}, in that order, and at "
            "each place do the step the task needs there.") if visited else _GENERIC
    actions = [c.strip() for c in walkthrough if c.strip()]
    leak = ("I did not complete the task. Next time I will do exactly these actions, in order: "
            + "; ".join(actions) + ".") if actions else _GENERIC
    return hint, leak


def oracle_hints(env: Any, task_id: str) -> tuple[str, str]:
    """``EnvSpec.oracle`` of ALFWorld: the hints for game ``task_id`` (the walkthrough in the env's wording)."""
    return hints_for(env.walkthrough(task_id))
