"""Gold hints for the diagnostic oracle reflectors on WebShop (``EnvSpec.oracle``).

``hint`` turns the goal's search query, attributes, options and price bound into a search plan and names
neither the target product's ASIN nor its title; ``leak`` names the product (title and ASIN) and its options
and says to buy it.

>>> goal = {"asin": "B0TEST", "name": "Acme Trail Shoe X1", "query": "running shoes",
...         "attributes": ["lightweight", "rubber sole"], "goal_options": {"color": "black", "size": "9"},
...         "price_upper": 40.0}
>>> print(hints_for(goal)[0])
I did not buy a product that meets every requirement. Next time I will search[running shoes lightweight rubber sole], open a result that is lightweight and rubber sole, select color: black and size: 9 on its page, check that its price is lower than 40.00 dollars, and click[Buy Now].
"""

from __future__ import annotations

from typing import Any, Mapping

NO_PRICE_BOUND = 1000000  # goals.price_bound's value when the instruction states no price


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _options(goal: Mapping[str, Any]) -> list[str]:
    opts = goal.get("goal_options") or {}
    if isinstance(opts, Mapping):  # synthetic goals: {name: value}
        return [f"{k}: {v}" for k, v in opts.items()]
    return [str(o) for o in opts]  # human goals: a list of option values


def hints_for(goal: Mapping[str, Any]) -> tuple[str, str]:
    """``(hint, leak)`` for one goal (a dict of :mod:`retroformer_cli.envs.webshop.goals`)."""
    attrs = [str(a) for a in goal.get("attributes") or []]
    options = _options(goal)
    asin, title = str(goal.get("asin") or ""), str(goal.get("name") or "")
    query = " ".join([str(goal.get("query") or ""), *attrs]).strip() or "the product the instruction describes"
    price = goal.get("price_upper")
    bounded = isinstance(price, (int, float)) and price < NO_PRICE_BOUND
    steps = [f"search[{query}]"]
    if attrs:
        steps.append(f"open a result that is {_and(attrs)}")
    if options:
        steps.append(f"select {_and(options)} on its page")
    if bounded:
        steps.append(f"check that its price is lower than {price:.2f} dollars")
    hint = ("I did not buy a product that meets every requirement. Next time I will " + ", ".join(steps)
            + ", and click[Buy Now].")
    low = hint.lower()
    if (asin and asin.lower() in low) or (title and title.lower() in low):  # the plan must not name the product
        hint = hint.replace(f"search[{query}]", f"search[{' '.join(attrs) or 'the instruction'}]")
    leak_steps = [f"search[{title}]", f"click[{asin}] in the results"]
    if options:
        leak_steps.append(f"select {_and(options)}")
    leak = (f"The product to buy is \"{title}\" (ASIN {asin}). Next time I will " + ", ".join(leak_steps)
            + ", and click[Buy Now].")
    return hint, leak


def oracle_hints(env: Any, task_id: str) -> tuple[str, str]:
    """``EnvSpec.oracle`` of WebShop: the hints for goal ``task_id`` (``fixed_N``) of a WebShopEnv."""
    return hints_for(env.get_goal(task_id)[1])
