"""A synthetic WebShop catalog of any size, resampled from a real one (to measure the env at WebShop's full scale).

WebShop's full catalog holds about 1.18M products; only the 1,000-product one is at hand. ``generate`` writes N
products in the same ``documents.jsonl`` format (``{"id", "contents", "product"}``, the product dict with every
field ``load_products`` gives it) plus an ``items_ins_v2.json`` goal file, so ``WebShopEnv(data=folder)`` loads
the result unchanged. Product ``i`` copies a template drawn from the source catalog and resamples it:

* ``asin`` = ``SYN`` + 7 digits (upper case, as WebShop's clicks upper-case what they name);
* the words of the title, description and bullet points: each replaced, with probability ``word_p``, by a word
  drawn from the words of the template's category (so term statistics stay WebShop-like, not uniform);
* ``Attributes``: each replaced, with probability ``attr_p``, by an attribute of the same category;
* option values: each replaced, with probability ``attr_p``, by a value seen under the same option name;
* the price scaled by a log-normal factor (a range keeps its order); ``contents`` rebuilt from the new fields.

A fraction ``goal_fraction`` of the products are *goal products*: they keep the template's attributes and
options, and, when the template has an ``instruction`` in the source goal file, the goal file gives them that
instruction (synthetic goals) and the template's human ``instructions`` (human goals). Everything is drawn from
one ``numpy`` generator seeded by ``seed``: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from retroformer_cli.envs.webshop.catalog import load_documents, product_contents
from retroformer_cli.errors import DataError

DONE_MARKER = "synth.json"


class _Templates:
    """The source catalog's products, split into words, with per-category pools to resample from."""

    def __init__(self, products: list[dict[str, Any]], instructions: dict[str, Any]):
        self.products = products
        self.instructions = instructions
        words: dict[str, list[str]] = defaultdict(list)
        attrs: dict[str, set[str]] = defaultdict(set)
        values: dict[str, set[str]] = defaultdict(set)
        for p in products:
            cat = p["category"]
            for text in [p["Title"], p["Description"], *(b for b in p["BulletPoints"] if isinstance(b, str))]:
                words[cat].extend(text.split())
            attrs[cat].update(a for a in p["Attributes"] if isinstance(a, str))
            for name, vals in (p.get("options") or {}).items():
                values[name].update(vals)
        self.words = {c: np.array(w, dtype=object) for c, w in words.items()}
        self.attrs = {c: np.array(sorted(a), dtype=object) for c, a in attrs.items()}
        self.values = {n: np.array(sorted(v), dtype=object) for n, v in values.items()}


def _resample(rng: np.random.Generator, items: list, pool: np.ndarray, p: float) -> list:
    """``items`` with each one replaced, with probability p, by a uniform draw from ``pool``."""
    if not items or len(pool) == 0:
        return list(items)
    pos = np.flatnonzero(rng.random(len(items)) < p)
    out = list(items)
    for j, w in zip(pos.tolist(), pool[rng.integers(len(pool), size=len(pos))].tolist()):
        out[j] = w
    return out


def _words(rng: np.random.Generator, text: str, pool: np.ndarray, p: float) -> str:
    return " ".join(_resample(rng, text.split(), pool, p)) if text else text


def _price(rng: np.random.Generator, pricing: list[float]) -> tuple[list[float], str]:
    if pricing == [100.0]:  # WebShop's "no price" default stays as it is
        return [100.0], "$100.0"
    factor = float(np.exp(rng.normal(0.0, 0.3)))
    values = sorted(round(max(0.01, v * factor), 2) for v in pricing)
    return values, f"${values[0]}" if len(values) == 1 else f"${values[0]} to ${values[1]}"


def synth_product(rng: np.random.Generator, t: _Templates, i: int, word_p: float, attr_p: float,
                  goal: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Product ``i`` and its goal-file entry (None when it has no instruction)."""
    src = t.products[int(rng.integers(len(t.products)))]
    cat = src["category"]
    p = dict(src)
    p["asin"] = f"SYN{i:07d}"
    p["Title"] = p["name"] = _words(rng, src["Title"], t.words[cat], word_p)
    p["Description"] = p["full_description"] = _words(rng, src["Description"], t.words[cat], word_p)
    p["BulletPoints"] = [_words(rng, b, t.words[cat], word_p) if isinstance(b, str) else b
                         for b in src["BulletPoints"]]
    p["small_description"] = p["BulletPoints"]
    p["pricing"], p["Price"] = _price(rng, list(src["pricing"]))
    p.pop("instructions", None)
    entry = None
    template_ins = t.instructions.get(src["asin"])
    if goal:
        if isinstance(template_ins, dict) and template_ins.get("instruction"):
            entry = {"attributes": list(p["Attributes"]), "instruction": template_ins["instruction"],
                     "instruction_attributes": list(template_ins.get("instruction_attributes") or [])}
        if "instructions" in src:
            p["instructions"] = src["instructions"]
        return p, entry
    p["Attributes"] = list(dict.fromkeys(_resample(rng, list(src["Attributes"]), t.attrs.get(cat, np.array([])),
                                                   attr_p)))
    options, to_image = {}, {}
    for name, vals in (src.get("options") or {}).items():
        new = list(dict.fromkeys(_resample(rng, list(vals), t.values[name], attr_p)))
        options[name] = new
        for old, v in zip(vals, new):
            to_image[v] = (src.get("option_to_image") or {}).get(old)
    p["options"], p["option_to_image"] = options, to_image
    return p, entry


def iter_products(source: Path, n: int, seed: int = 0, word_p: float = 0.3, attr_p: float = 0.3,
                  goal_fraction: float = 0.01, goal_file: Path | None = None,
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(product, goal-file entry or None) for products 0..n-1, deterministic for the same arguments."""
    catalog = load_documents(source)
    if goal_file is None:
        found = sorted(source.parent.glob("items_ins_v2*.json"))
        goal_file = found[0] if len(found) == 1 else None
    instructions = json.loads(goal_file.read_text(encoding="utf-8")) if goal_file else {}
    templates = _Templates(list(catalog.products), instructions)
    rng = np.random.default_rng(seed)
    for i in range(n):
        goal = bool(rng.random() < goal_fraction)
        yield synth_product(rng, templates, i, word_p, attr_p, goal)


def generate(source: str | Path, out_dir: str | Path, n: int, seed: int = 0, word_p: float = 0.3,
             attr_p: float = 0.3, goal_fraction: float = 0.01) -> Path:
    """Write ``documents.jsonl`` and ``items_ins_v2.json`` of ``n`` products into ``out_dir`` (kept when a finished
    one with the same settings is there already). Returns ``out_dir``."""
    source, out = Path(source), Path(out_dir)
    if not source.is_file():
        raise DataError(f"The WebShop source catalog {source} does not exist (a documents*.jsonl file).")
    if n < 1:
        raise DataError(f"A synthetic WebShop catalog needs at least one product, got n={n}.")
    settings = {"source": source.name, "source_bytes": source.stat().st_size, "n": n, "seed": seed,
                "word_p": word_p, "attr_p": attr_p, "goal_fraction": goal_fraction, "version": 1}
    marker = out / DONE_MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    goals: dict[str, Any] = {}
    tmp = out / "documents.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        for product, entry in iter_products(source, n, seed, word_p, attr_p, goal_fraction):
            fh.write(json.dumps({"id": product["asin"], "contents": product_contents(product), "product": product}))
            fh.write("\n")
            if entry is not None:
                goals[product["asin"]] = entry
    os.replace(tmp, out / "documents.jsonl")
    (out / "items_ins_v2.json").write_text(json.dumps(goals), encoding="utf-8")
    marker.write_text(json.dumps(settings), encoding="utf-8")
    return out


__all__ = ["generate", "iter_products", "synth_product"]
