"""WebShop goals, built the way WebShop's ``engine/goal.py`` builds them.

* **Synthetic goals** (``get_synthetic_goals``): for every product whose ``items_ins_v2`` entry has an
  ``instruction``, one goal per combination of its option values (option names sorted):
  ``instruction_text = f"{instruction}{' with ' + 'name: value, and ...'}{', and price lower than X.00 dollars'}"``,
  ``attributes = instruction_attributes``, ``goal_options = {name: value}``.
* **Human goals** (``get_human_goals``): the products' ``instructions`` (from ``items_human_ins.json``), those
  with no ``instruction_attributes`` skipped; ``instruction_text = instruction.strip('.') + price text``,
  ``goal_options`` the list of ``instruction_options``.
* The price bound: of the first four multiples of 10 above the product's price, the larger of two drawn at
  random (none when fewer than two exist, i.e. at or above $980). WebShop draws these from an unseeded
  generator; here the draw is seeded by the ASIN, so the goals are the same in every run.
* The goal list is shuffled as WebShop's SimServer does (``random.seed(233); random.shuffle(goals)``), so
  goal ``i`` here is WebShop's goal ``i`` (its session ``fixed_i``) for the same products and goal file.
* Splits follow WebShop's baselines: ``test`` = goals 0-499, ``dev`` = 500-1499, ``train`` = the rest.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any, Iterable, Mapping

from retroformer_cli.errors import UsageError

PRICE_RANGE = [10.0 * i for i in range(1, 100)]
SHUFFLE_SEED = 233
SPLITS = {"test": (0, 500), "dev": (500, 1500), "train": (1500, None)}
GOAL_KINDS = ("synthetic", "human")


def price_bound(price: float, rng: random.Random) -> tuple[float, str]:
    candidates = [p for p in PRICE_RANGE if p > price][:4]
    if len(candidates) >= 2:
        _, upper = sorted(rng.sample(candidates, 2))
        return upper, f", and price lower than {upper:.2f} dollars"
    return 1000000, ""


def _rng(seed: int, asin: str) -> random.Random:
    return random.Random(f"webshop-goal:{seed}:{asin}")


def synthetic_goals(products: Iterable[Mapping[str, Any]], instructions: Mapping[str, Any],
                    prices: Mapping[str, float], seed: int = 0) -> list[dict[str, Any]]:
    """``instructions``: the items_ins_v2 mapping ASIN -> {attributes, instruction, instruction_attributes}."""
    goals: list[dict[str, Any]] = []
    attr_counts: dict[str, int] = defaultdict(int)
    for product in products:
        asin = product["asin"]
        entry = instructions.get(asin)
        if not isinstance(entry, Mapping) or entry.get("instruction") is None:
            continue
        attributes = list(entry.get("instruction_attributes") or [])
        if not attributes:
            continue  # WebShop asserts they exist
        price_upper, price_text = price_bound(prices[asin], _rng(seed, asin))
        options = product.get("options") or {}
        names = sorted(options)
        for combo in itertools.product(*(options[n] for n in names)):
            goal_options = dict(zip(names, combo))
            option_text = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
            option_text = " with " + option_text if option_text else ""
            goals.append({
                "asin": asin, "category": product["category"], "query": product["query"],
                "name": product["Title"], "product_category": product["product_category"],
                "instruction_text": f"{entry['instruction']}{option_text}{price_text}",
                "attributes": attributes, "price_upper": price_upper, "goal_options": goal_options,
            })
            for a in attributes:
                attr_counts[a] += 1
    for goal in goals:
        goal["weight"] = sum(1.0 / attr_counts[a] for a in goal["attributes"]) / len(goal["attributes"])
    return goals


def human_goals(products: Iterable[Mapping[str, Any]], prices: Mapping[str, float],
                human_instructions: Mapping[str, Any] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Goals from the products' ``instructions`` (or from ``human_instructions``: items_human_ins.json)."""
    goals: list[dict[str, Any]] = []
    for item in products:
        asin = item["asin"]
        entries = item.get("instructions")
        if entries is None and human_instructions is not None:
            entries = human_instructions.get(asin)
        if not entries:
            continue
        rng = _rng(seed, asin)
        for entry in entries:
            attributes = list(entry.get("instruction_attributes") or [])
            if not attributes:
                continue
            price_upper, price_text = price_bound(prices[asin], rng)
            goals.append({
                "asin": asin, "category": item["category"], "query": item["query"], "name": item["name"],
                "product_category": item["product_category"],
                "instruction_text": entry["instruction"].strip(".") + price_text,
                "attributes": attributes, "price_upper": price_upper,
                "goal_options": list(entry.get("instruction_options") or []), "weight": 1,
            })
    return goals


def shuffle_goals(goals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """WebShop's fixed goal order: ``random.seed(233); random.shuffle(goals)``."""
    goals = list(goals)
    random.Random(SHUFFLE_SEED).shuffle(goals)
    return goals


def build_goals(products: list[Mapping[str, Any]], prices: Mapping[str, float], kind: str = "synthetic",
                instructions: Mapping[str, Any] | None = None, human_instructions: Mapping[str, Any] | None = None,
                seed: int = 0) -> list[dict[str, Any]]:
    if kind == "synthetic":
        goals = synthetic_goals(products, instructions or {}, prices, seed)
    elif kind == "human":
        goals = human_goals(products, prices, human_instructions, seed)
    else:
        raise UsageError(f"Unknown WebShop goal kind '{kind}': choose one of {', '.join(GOAL_KINDS)}.")
    return shuffle_goals(goals)


def split_indices(n_goals: int, split: str | None) -> range:
    """Goal indices of a split (WebShop's convention); None or 'all' = every goal."""
    if split in (None, "all"):
        return range(n_goals)
    if split not in SPLITS:
        raise UsageError(f"Unknown WebShop split '{split}': choose one of all, {', '.join(SPLITS)}.")
    lo, hi = SPLITS[split]
    return range(min(lo, n_goals), n_goals if hi is None else min(hi, n_goals))


def task_id(index: int) -> str:
    return f"fixed_{index}"


def parse_task_id(text: str) -> int | None:
    text = str(text).strip()
    if text.startswith("fixed_"):
        text = text[len("fixed_"):]
    return int(text) if text.isdigit() else None


__all__ = ["GOAL_KINDS", "PRICE_RANGE", "SPLITS", "build_goals", "human_goals", "parse_task_id", "price_bound",
           "shuffle_goals", "split_indices", "synthetic_goals", "task_id"]
