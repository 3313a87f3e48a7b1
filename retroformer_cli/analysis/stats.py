"""Uncertainty for success rates and paired comparisons of two runs on the same tasks (no SciPy needed).

- :func:`wilson` — the Wilson score interval of a proportion (good coverage at small n and near 0 or 1,
  unlike the normal approximation).
- :func:`paired` — two runs on the same tasks at one trial: the difference in success rate, the tasks won and
  lost, the exact McNemar p-value (a two-sided binomial test on the discordant tasks) and the Bonett-Price
  adjusted Wald interval for a difference of paired proportions (Bonett & Price, 2012), which keeps its
  coverage when there are few discordant pairs.

>>> lo, hi = wilson(51, 100)
>>> round(lo, 4), round(hi, 4)
(0.4135, 0.6058)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(won: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: P(a split of the discordant tasks at least this uneven) under a fair coin."""
    m = won + lost
    if m == 0:
        return 1.0
    k = min(won, lost)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


@dataclass
class Paired:
    trial: int
    tasks: int  # tasks both runs have
    rate_a: float
    rate_b: float
    difference: float  # rate_a - rate_b
    ci_low: float  # Bonett-Price 95% interval of the difference
    ci_high: float
    won: int  # solved by A, not by B
    lost: int  # solved by B, not by A
    both: int
    neither: int
    p_value: float  # exact McNemar

    def to_json(self) -> dict:
        return asdict(self)


def paired(a: Sequence[bool], b: Sequence[bool], trial: int = 0, z: float = Z95) -> Paired:
    """Compare outcomes ``a`` and ``b`` of the same tasks (same order)."""
    if len(a) != len(b):
        raise ValueError("paired outcomes must cover the same tasks")
    n = len(a)
    won = sum(1 for x, y in zip(a, b) if x and not y)
    lost = sum(1 for x, y in zip(a, b) if y and not x)
    both = sum(1 for x, y in zip(a, b) if x and y)
    neither = n - won - lost - both
    if n == 0:
        return Paired(trial, 0, 0.0, 0.0, 0.0, -1.0, 1.0, 0, 0, 0, 0, 1.0)
    p12, p21 = (won + 1) / (n + 2), (lost + 1) / (n + 2)
    d_adj = p12 - p21
    se = math.sqrt(max(0.0, (p12 + p21 - d_adj * d_adj) / (n + 2)))
    return Paired(trial=trial, tasks=n, rate_a=(won + both) / n, rate_b=(lost + both) / n,
                  difference=(won - lost) / n, ci_low=max(-1.0, d_adj - z * se), ci_high=min(1.0, d_adj + z * se),
                  won=won, lost=lost, both=both, neither=neither, p_value=mcnemar_exact_p(won, lost))
