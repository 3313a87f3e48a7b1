"""One rule for the text of a reflection, shared by datasets, importers, the reward model and the PPO rewards."""

from __future__ import annotations

from typing import Sequence

PREFILL = "Reflection:"


def clean_reflection(text: str | None, stop: Sequence[str] | None = None) -> str:
    """The bare reflection: cut at the first of ``stop`` (default: the reflector's stop strings, as the collect
    loop cuts its replies; ``()`` keeps the text whole), surrounding space and a leading ``Reflection:`` removed.

    >>> clean_reflection(" Reflection: I should search.\\n\\nQuestion: x")
    'I should search.'
    >>> clean_reflection("Reflection: a\\n\\nb", stop=())
    'a\\n\\nb'
    """
    from retroformer_cli.llm.base import apply_stop

    if stop is None:
        from retroformer_cli.agents.reflexion import REFLECTION_STOP

        stop = REFLECTION_STOP
    text, _ = apply_stop(text or "", stop)
    text = text.strip()
    if text.lower().startswith(PREFILL.lower()):
        text = text[len(PREFILL):].strip()
    return text
