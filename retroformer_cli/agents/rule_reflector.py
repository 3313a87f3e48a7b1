"""A reflector without a model: it reads only the failed trial (never gold data) and plans searches the trial did
not make, in the words a tuned actor follows ("Next time I will Search[A] first, then Search[B]").

Candidates, in order: pages the environment suggested (``Similar: [...]`` in an observation) that were never
opened, then names in the question (runs of capitalised words, quoted titles) that were never searched. It is a
baseline arm (``--reflector rule``) and the warm start of the learning experiment: its reflections that were
followed by a better trial on train tasks become the reflector's SFT data, and RL takes it from there.

>>> text = ("Previous trial:\\nQuestion: Which band did the singer of Harbor Lights join?\\n"
...         "Thought 1: x\\nAction 1: Search[Harbor Lights]\\nObservation 1: Could not find [Harbor Lights]. "
...         "Similar: ['Harbor Lights (song)', 'Harbor Town'].\\nObservation: Answer is INCORRECT")
>>> rule_reflection(text)
'My searches did not lead to the answer. Next time I will Search[Harbor Lights (song)] first, then Search[Harbor Town], and answer from what they say.'
"""

from __future__ import annotations

import ast
import re
import time
from typing import Any, Sequence

from retroformer_cli.llm.base import Generation, GenerationConfig, Message, Usage

MODEL_ID = "rule"
_SIMILAR = re.compile(r"Similar: (\[.*?\])")
_SEARCHED = re.compile(r"Action \d+:\s*Search\[([^\]\n]*)\]", re.IGNORECASE)
_QUOTED = re.compile(r"[\"“]([^\"”]{2,60})[\"”]")
_NAME = re.compile(r"[A-Z0-9][\w'’.&-]*(?:\s+(?:of|the|and|de|du|la|von|van|in|for|on|at|to|a)?\s*[A-Z0-9][\w'’.&-]*)*")
_QUESTION_WORDS = {"which", "what", "who", "whom", "whose", "when", "where", "why", "how", "is", "are", "was", "were",
                   "did", "do", "does", "in", "the", "a", "an", "of", "this", "that", "these", "those"}


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def candidates(trial_text: str) -> list[str]:
    """Pages worth searching next time, from the failed trial's text alone."""
    searched = {_key(s) for s in _SEARCHED.findall(trial_text)}
    out: list[str] = []

    def add(name: str) -> None:
        name = name.strip(" .,;:?!'\"")
        if name and _key(name) not in searched and _key(name) not in {_key(o) for o in out} \
                and _key(name) not in _QUESTION_WORDS:
            out.append(name)

    for block in _SIMILAR.findall(trial_text):
        try:
            titles = ast.literal_eval(block)
        except (ValueError, SyntaxError):
            continue
        for title in titles if isinstance(titles, list) else []:
            add(str(title))
    question = next((line[len("Question:"):] for line in trial_text.splitlines() if line.startswith("Question:")), "")
    for quoted in _QUOTED.findall(question):
        add(quoted)
    for m in _NAME.finditer(question):
        words = m.group(0).split()
        while words and words[0].lower() in _QUESTION_WORDS:  # "Which Tim Burton film" -> "Tim Burton"
            words = words[1:]
        add(" ".join(words))
    return out


def rule_reflection(trial_text: str, k: int = 2) -> str:
    found = candidates(trial_text)[:k]
    if not found:
        return "My searches did not lead to the answer. Next time I will search the main name in the question " \
               "first and answer from its page."
    plan = f"Search[{found[0]}] first" + "".join(f", then Search[{c}]" for c in found[1:])
    return f"My searches did not lead to the answer. Next time I will {plan}, and answer from what they say."


class RuleReflector:
    """An :class:`~retroformer_cli.llm.base.LLMClient` whose reply to a reflection prompt is :func:`rule_reflection`
    of the trial in it (the user message that starts with ``Previous trial:``)."""

    model_id = MODEL_ID

    def describe(self) -> dict[str, Any]:
        return {"backend": "rule", "model_id": MODEL_ID,
                "description": "plans searches the failed trial did not make (suggested pages, names in the question)"}

    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        t0 = time.perf_counter()
        trial = next((m.content for m in messages if m.role == "user" and "Previous trial:" in m.content),
                     messages[-1].content if messages else "")
        return Generation(text=rule_reflection(trial), model_id=MODEL_ID, usage=Usage(),
                          latency_ms=(time.perf_counter() - t0) * 1000, finish_reason="stop")

    async def aclose(self) -> None:
        """Nothing to release."""
