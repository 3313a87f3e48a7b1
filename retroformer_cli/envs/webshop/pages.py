"""WebShop's pages as text: the ``[SEP]`` observations of WebShop's text mode and the clickables.

Each page renders the way ``WebAgentTextEnv(observation_mode='text')`` shows it (visible texts of the HTML
page joined by `` [SEP] ``) and lists the clickable texts of ``get_available_actions()`` (lower-cased
buttons and product links, option values as they are). ``observation_mode='reflexion'`` renders the
shorter view that Reflexion's/Retroformer's WebShop runner builds from the same page (three products per
results page, a chosen option shown as ``[[value]]``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

SEP = " [SEP] "
BACK_TO_SEARCH = "Back to Search"
NEXT_PAGE = "Next >"
PREV_PAGE = "< Prev"
BUY_NOW = "Buy Now"
SUB_PAGES = ("Description", "Features", "Reviews")
PRODUCT_WINDOW = 10
REFLEXION_PRODUCTS_SHOWN = 3


def _join(parts: Sequence[str]) -> str:
    return SEP.join(p for p in (s.strip() for s in parts) if p)


def search_page(instruction: str, mode: str = "text") -> tuple[str, list[str]]:
    if mode == "reflexion":
        return f"\nWebShop \nInstruction:  \n{instruction} \n[Search] ", ["search"]
    return _join(["WebShop", "Instruction:", instruction, "Search"]), ["search"]


def results_page(instruction: str, page: int, total: int, products: Sequence[Mapping[str, Any]],
                 mode: str = "text") -> tuple[str, list[str]]:
    has_prev, has_next = page > 1, page * PRODUCT_WINDOW < total
    clickables = ["back to search"] + (["< prev"] if has_prev else []) + (["next >"] if has_next else [])
    clickables += [p["asin"].lower() for p in products]
    if mode == "reflexion":
        text = f"\n[{BACK_TO_SEARCH}] \nPage {page} (Total results: {total}) "
        text += (f"\n[{PREV_PAGE}] " if has_prev else "") + (f"\n[{NEXT_PAGE}] " if has_next else "")
        for p in products[:REFLEXION_PRODUCTS_SHOWN]:
            text += f"\n[{p['asin']}] \n{p['Title'].strip()} \n{p['Price']} "
        return text, clickables
    parts = ["Instruction:", instruction, BACK_TO_SEARCH, f"Page {page} (Total results: {total})"]
    parts += ([PREV_PAGE] if has_prev else []) + ([NEXT_PAGE] if has_next else [])
    for p in products:
        parts += [p["asin"], p["Title"], p["Price"]]
    return _join(parts), clickables


def option_clickables(product: Mapping[str, Any]) -> dict[str, str]:
    """Option value -> option name. As in WebShop, a value offered under two names maps to the later one."""
    out: dict[str, str] = {}
    for name, values in (product.get("options") or {}).items():
        for v in values:
            out[v] = name
    return out


def item_page(instruction: str, product: Mapping[str, Any], chosen: Mapping[str, str],
              mode: str = "text") -> tuple[str, list[str]]:
    options = product.get("options") or {}
    clickables = ["back to search", "< prev", "description", "features", "reviews", "buy now"]
    clickables += list(option_clickables(product))
    if mode == "reflexion":
        text = f"\n[{BACK_TO_SEARCH}] \n[{PREV_PAGE}] "
        picked = set(chosen.values())
        for name, values in options.items():
            text += f"\n{name} " + "".join(f"[[{v}]]" if v in picked else f"[{v}]" for v in values)
        text += (f"\n{product['Title'].strip()} \nPrice: {product['Price']} \nRating: {product.get('Rating', 'N.A.')} "
                 "\n[Description] \n[Features] \n[Reviews] \n[Buy Now] ")
        return text, clickables
    parts = ["Instruction:", instruction, BACK_TO_SEARCH, PREV_PAGE]
    for name, values in options.items():
        parts += [name, *values]
    parts += [product["Title"], f"Price: {product['Price']}", f"Rating: {product.get('Rating', 'N.A.')}",
              *SUB_PAGES, BUY_NOW]
    return _join(parts), clickables


def _sub_page_texts(product: Mapping[str, Any], sub_page: str) -> list[str]:
    if sub_page == "Description":
        return [product.get("Description") or ""]
    if sub_page == "Features":
        return list(product.get("BulletPoints") or [])
    texts: list[str] = []
    for r in product.get("Reviews") or []:
        texts += [f"\"{r.get('title', '')}\"", str(r.get("score", "")), str(r.get("body", ""))]
    return texts


def sub_page(instruction: str, product: Mapping[str, Any], name: str, mode: str = "text") -> tuple[str, list[str]]:
    clickables = ["back to search", "< prev"]
    texts = _sub_page_texts(product, name)
    if mode == "reflexion":
        text = f"\n[{BACK_TO_SEARCH}] \n[{PREV_PAGE}] "
        lead = "\n " if name == "Features" else "\n"
        text += "".join(f"{lead}{t} " for t in texts if t.strip())
        return text, clickables
    return _join(["Instruction:", instruction, BACK_TO_SEARCH, PREV_PAGE, *texts]), clickables


def done_page(asin: str, options: Mapping[str, str], reward: float, mode: str = "text") -> tuple[str, list[str]]:
    if mode == "reflexion":
        return f"Your score (min 0.0, max 1.0): {reward}", []
    parts = ["Thank you for shopping with us!", "Your code:", "None", "(Paste it in your MTurk interface.)",
             "Purchased", "asin", asin, "options", json.dumps(dict(options)), "attrs", "None", "category", "None",
             "query", "None", "product category", "None", "Target", "asin", "options", "attrs", "price upper",
             "instuction text", "category", "product category", "query", "Goal", "None", "Reward",
             "Your score (min 0.0, max 1.0)", str(reward), "Reward Details", "None"]
    return _join(parts), []


__all__ = ["SEP", "done_page", "item_page", "option_clickables", "results_page", "search_page", "sub_page"]
