"""Gold hints for the diagnostic oracle reflectors on HotPotQA (``EnvSpec.oracle``).

``hint`` names the supporting-fact pages to search, in order, and never contains the gold answer: a page whose
title contains the answer is named by its place instead ("the second page the question points to"), and every
candidate text is checked with the env's answer normalisation before it is returned. ``leak`` states the answer.

>>> q = HotPotQAQuestion("q1", "Who directed the film?", "Tim Burton",
...                      supporting_facts=[("Ed Wood (film)", 0), ("Tim Burton", 1)])
>>> hint, leak = hints_for(q)
>>> hint
'I did not find the pages that hold the answer. Next time I will Search[Ed Wood (film)] first, then search for the second page the question points to, and answer from what they say.'
>>> leak
'The answer is Tim Burton. Next time I will answer Finish[Tim Burton].'
"""

from __future__ import annotations

import string
from typing import Any

from retroformer_cli.envs.hotpotqa import HotPotQAQuestion
from retroformer_cli.envs.hotpotqa_metrics import normalize_answer

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
_TO_SPACE = str.maketrans({c: " " for c in string.punctuation})
_OPENING = "I did not find the pages that hold the answer."


def _forms(text: str) -> list[list[str]]:
    """The text's words as the env normalises an answer, with punctuation dropped and with it read as spaces."""
    return [normalize_answer(text).split(), normalize_answer(text.translate(_TO_SPACE)).split()]


def contains_answer(text: str, answer: str) -> bool:
    """True when the normalised answer occurs in the normalised text as a run of whole words."""
    for gold in _forms(answer):
        if not gold:
            continue
        n = len(gold)
        for words in _forms(text):
            if any(words[i:i + n] == gold for i in range(len(words) - n + 1)):
                return True
    return False


def _titles(q: HotPotQAQuestion) -> list[str]:
    return list(dict.fromkeys(title for title, _ in q.supporting_facts if title.strip()))


def _plan(steps: list[str]) -> str:
    lead = f"{steps[0]} first" if steps[0].startswith("Search[") else f"first {steps[0]}"
    if len(steps) == 1:
        return f"{_OPENING} Next time I will {lead} and answer from what it says."
    return f"{_OPENING} Next time I will {lead}, then " + ", then ".join(steps[1:]) + ", and answer from what they say."


def _by_place(i: int) -> str:
    place = _ORDINALS[i] if i < len(_ORDINALS) else f"number {i + 1}"
    return f"search for the {place} page the question points to"


def hints_for(q: HotPotQAQuestion) -> tuple[str, str]:
    """``(hint, leak)`` for one question; ``hint`` is empty only if no wording at all avoids the answer."""
    titles = _titles(q)
    candidates = []
    if titles:
        candidates.append(_plan([_by_place(i) if contains_answer(t, q.answer) else f"Search[{t}]"
                                 for i, t in enumerate(titles)]))
        candidates.append(_plan([_by_place(i) for i in range(len(titles))]))
    candidates.append(f"{_OPENING} Next time I will search for each entity the question names and answer from "
                      "what their pages say.")
    hint = next((c for c in candidates if not contains_answer(c, q.answer)), "")
    leak = f"The answer is {q.answer}. Next time I will answer Finish[{q.answer}]."
    return hint, leak


def oracle_hints(env: Any, task_id: str) -> tuple[str, str]:
    """``EnvSpec.oracle`` of HotPotQA: the hints for question ``task_id`` of a :class:`HotPotQAEnv`."""
    return hints_for(env.get_question(task_id))
