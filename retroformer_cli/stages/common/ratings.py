"""How reflections and rating rows are written, shared by `datasets build`, the log importers and the trainers.

- The reflector's prompt ends in an assistant prefill ``Reflection:``; training sets drop it from the prompt
  (:func:`strip_prefill`) and the completion is the bare reflection (:func:`completion`: the one
  ``clean_reflection`` of ``stages.common.reflections``, with no stop strings, so the text stays whole).
- :func:`rows_from_sequences` turns imported per-task trial sequences into rating rows: the reflection written
  after trial k is rated G(k+1) - G(k).

A leaf module: it imports nothing from the stages, only its siblings in ``stages.common``.
"""

from __future__ import annotations

from typing import Any, Sequence

from retroformer_cli.stages.common.reflections import clean_reflection


def strip_prefill(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The prompt without a trailing assistant prefill (e.g. ``Reflection:``); other messages unchanged."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs


def completion(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": clean_reflection(text, stop=())}]


def rows_from_sequences(seqs: dict[str, list[dict[str, Any]]], *, run: str, env: str, source: str,
                        prompt_fn) -> list[dict[str, Any]]:
    """Rating rows from per-task trial sequences of imported logs.

    Each sequence item: ``trial``, ``score``, optional ``f1``, ``reflection_after`` (text or None) and whatever
    ``prompt_fn(task_id, item)`` needs to build the reflector prompt.
    """
    rows = []
    for task_id, items in seqs.items():
        items = sorted(items, key=lambda x: x["trial"])
        for cur, nxt in zip(items, items[1:]):
            text = clean_reflection(cur.get("reflection_after"), stop=())
            if not text or nxt["trial"] != cur["trial"] + 1:
                continue
            f1a, f1b = cur.get("f1"), nxt.get("f1")
            rows.append({
                "task_id": task_id, "run": run, "env": env, "trial": cur["trial"], "prompt": prompt_fn(task_id, cur),
                "reflection": text, "rating": float(nxt["score"]) - float(cur["score"]),
                "rating_f1": (f1b - f1a) if f1a is not None and f1b is not None else None, "source": source,
            })
    return rows
