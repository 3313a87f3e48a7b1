"""Choosing tokens: greedy rows with their top-1/top-2 margins, seeded sampling, prompt-lookup drafts, and how
much of a streamed text is safe to send before a stop string could still match.

Pure functions over one step's logits and a :class:`~.requests.Seq`; torch is imported inside them.
"""

from __future__ import annotations

from typing import Any

from retroformer_cli.llm.engine.requests import Seq


def greedy_rows(logits: Any, spans: list[tuple[int, int]]) -> tuple[dict[int, int], dict[int, float]]:
    """Best token and top-1/top-2 logit gap of the rows in ``spans`` ((first row, count) pairs)."""
    import torch

    rows = [r for first, count in spans for r in range(first, first + count)]
    if not rows:
        return {}, {}
    if rows == list(range(logits.shape[0])):
        picked = logits.float().clone()
    else:
        picked = logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=logits.device)).float()
    top, idx = picked.max(dim=-1)
    picked.scatter_(1, idx.unsqueeze(1), float("-inf"))
    second = picked.max(dim=-1).values
    return dict(zip(rows, idx.tolist())), dict(zip(rows, (top - second).tolist()))


def note_margin(seq: Seq, margin: float | None) -> None:
    """Keep the smallest greedy margin seen by ``seq``."""
    if margin is not None:
        seq.min_margin = margin if seq.min_margin is None else min(seq.min_margin, margin)


def sample_token(seq: Seq, logits: Any) -> int:
    """A token drawn from one row of logits with the request's temperature and top-p, from ``seq``'s generator."""
    import torch

    sp = seq.req.sampling
    probs = torch.softmax(logits.float() / sp.temperature, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sp.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=seq.rng).item())


def prompt_lookup_draft(seq: Seq, draft_tokens: int, room: int) -> list[int]:
    """Prompt-lookup drafting (greedy requests): if the last three tokens occurred earlier in the sequence,
    propose the tokens that followed them. The forward pass checks the draft; a confirmed prefix is kept, so
    the output is exactly greedy decoding's, in fewer passes when the model copies from its context (entity
    names, actions, object ids)."""
    k = min(draft_tokens, room, seq.req.sampling.max_tokens - len(seq.generated) - 1)
    if k <= 0 or not seq.req.sampling.greedy or seq.ngrams is None:
        return []
    tokens = seq.tokens
    index = seq.ngrams
    for end in range(seq.indexed, len(tokens) - 1):  # index trigrams ending before the last token
        if end >= 2:
            index[(tokens[end - 2], tokens[end - 1], tokens[end])] = end
    seq.indexed = max(seq.indexed, len(tokens) - 1)
    if len(tokens) < 3:
        return []
    at = index.get((tokens[-3], tokens[-2], tokens[-1]))
    if at is None:
        return []
    return tokens[at + 1: at + 1 + k]


def streamable(text: str, stop: tuple[str, ...]) -> str:
    """The part of ``text`` that can be streamed now: without the last ``len(longest stop) - 1`` characters
    (a stop string may still complete there) and without a trailing partial UTF-8 character."""
    hold = max((len(s) for s in stop), default=1) - 1
    return (text[: len(text) - hold] if hold else text).rstrip("\ufffd")
