"""HotPotQA answer metrics with the semantics of the official ``hotpot_evaluate_v1.py``.

Our own code, written to agree with the official script on every input, quirks included:

* normalisation = lowercase -> drop ASCII punctuation -> replace the words a/an/the by a space
  -> collapse whitespace (in that order; the order matters for strings like ``"the-end"``);
* F1 is 0 when either normalised side is one of ``yes``/``no``/``noanswer`` and the two differ,
  even if they share tokens (``"no way"`` vs ``"no"`` scores 0, not 0.67);
* F1 is 0 when no token is shared, which also covers empty predictions or answers.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
# The official regex runs on a str pattern, so \b is Unicode-aware; keep it that way.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL = frozenset({"yes", "no", "noanswer"})


def normalize_answer(s: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (official order)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_precision_recall(prediction: str, gold: str) -> tuple[float, float, float]:
    """Token-level (F1, precision, recall) over the normalised strings."""
    pred_norm = normalize_answer(prediction)
    gold_norm = normalize_answer(gold)
    # yes/no/noanswer are categorical answers: partial overlap with them earns nothing.
    if pred_norm != gold_norm and (pred_norm in _SPECIAL or gold_norm in _SPECIAL):
        return 0.0, 0.0, 0.0
    pred_tokens = pred_norm.split()
    gold_tokens = gold_norm.split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0, 0.0, 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall), precision, recall


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 as in the official script (first element of its tuple)."""
    return f1_precision_recall(prediction, gold)[0]


__all__ = ["normalize_answer", "exact_match", "f1_score", "f1_precision_recall"]
