"""One deterministic split of tasks by id, used by `collect --split` (train / eval) and `datasets build`
(train / validation).

The rule: ``h = int(sha256(salt + task_id)[:8], 16)`` and the task's place in [0, 1) is
``((h % 5) + (h // 5) / 858993460) / 5``; a task is held out iff its place is below ``fraction``. The residue
``h % 5`` picks the fifth and the quotient the place inside it, so with no salt and ``fraction=0.2`` a task is
held out exactly when ``h % 5 == 0``: collect's eval split, unchanged since the first release. Any other fraction
holds out about that share of tasks; a smaller fraction holds out a subset of a larger one's tasks. The result
depends only on the id (not on machine, process, run or file order).
"""

from __future__ import annotations

import hashlib

EVAL_FRACTION = 0.2  # collect: 1 task in 5 is in the eval split
_FIFTHS = 5
_QUOTIENTS = -(-(2**32) // _FIFTHS)  # ceil(2**32 / 5) = 858993460: h // 5 is always below it


def place(task_id: str, salt: str = "") -> float:
    """The task's place in [0, 1) under ``salt`` (uniform over ids)."""
    h = int(hashlib.sha256((salt + str(task_id)).encode("utf-8")).hexdigest()[:8], 16)
    return ((h % _FIFTHS) + (h // _FIFTHS) / _QUOTIENTS) / _FIFTHS


def split_of(task_id: str, fraction: float = EVAL_FRACTION, *, salt: str = "",
             names: tuple[str, str] = ("eval", "train")) -> str:
    """``names[0]`` (held out) when the task's place is below ``fraction``, else ``names[1]``."""
    return names[0] if place(task_id, salt) < fraction else names[1]


def describe(fraction: float, salt: str, held_out: str) -> str:
    """The rule in words, for manifests."""
    return (f"{held_out} iff place(sha256('{salt}' + task_id)) < {fraction}, with h = int(sha256[:8], 16) and "
            f"place = ((h % 5) + (h // 5) / 858993460) / 5")
