"""WebShop as an in-process text environment (no Flask server, no Java).

    env = WebShopEnv()                       # our small sample catalog
    env = WebShopEnv(data="path/to/webshop") # documents_1k.jsonl + items_ins_v2_1000*.json, or DATA_DIR raw files
    obs, info = env.reset(options={"task_id": "fixed_0"})
    obs, reward, terminated, truncated, info = env.step("search[hdmi cable]")

Actions are WebShop's ``search[keywords]`` and ``click[button]`` (any case; ``think[...]`` is answered with
"OK." as in Reflexion). An action that is invalid or not available on the page leaves the state as it was
and says so. The episode ends at ``click[Buy Now]`` (reward = WebShop's ``get_reward``) or, with reward 0,
at the step limit (15 by default, the Reflexion protocol). ``info["available_actions"]`` holds WebShop's
``get_available_actions()``; at the end ``info`` has ``success`` (reward == 1), ``score`` and the reward parts.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from retroformer_cli.envs.webshop import pages
from retroformer_cli.envs.webshop.catalog import Catalog, find_raw_files, load_json, load_raw
from retroformer_cli.envs.webshop.goals import (GOAL_KINDS, build_goals, parse_task_id, split_indices, task_id)
from retroformer_cli.envs.webshop.reward import SPACY_MODELS, get_reward
from retroformer_cli.envs.webshop.search import SEARCH_RETURN_N, load_or_build
from retroformer_cli.envs.webshop.store import load_catalog
from retroformer_cli.envs.base import check_can_step, data_or_sample
from retroformer_cli.errors import DataError, UsageError, require

SAMPLE_DATA = Path(__file__).resolve().parents[3] / "sample_data" / "webshop"
OBSERVATION_MODES = ("text", "reflexion")
_ACTION = re.compile(r"^\s*(?:action\s*\d*\s*:\s*)?([a-z_]+)\s*\[(.*)\]\s*$", re.IGNORECASE | re.DOTALL)
_OPEN_ACTION = re.compile(r"^\s*(?:action\s*\d*\s*:\s*)?([a-z_]+)\s*\[(.*)$", re.IGNORECASE | re.DOTALL)


def parse_action(text: str) -> tuple[str, str] | None:
    """``'click[Buy Now]'`` -> ``('click', 'Buy Now')``; tolerant of case, spaces, an ``Action 3:`` label and a
    missing closing bracket. Only the first non-empty line counts."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return None
    m = _ACTION.match(lines[0]) or _OPEN_ACTION.match(lines[0])
    if m is None:
        return None
    return m.group(1).lower(), m.group(2).strip()


class _World:
    """What every env over the same data shares: catalog, search index, goals."""

    def __init__(self, catalog: Catalog, goals: list[dict[str, Any]], index, index_source: str, data_path: Path,
                 load_seconds: float):
        self.catalog, self.goals, self.index = catalog, goals, index
        self.index_source, self.data_path, self.load_seconds = index_source, data_path, load_seconds
        self._results: dict[str, list[str]] = {}

    def search(self, keywords: str) -> list[str]:
        hit = self._results.get(keywords)
        if hit is None:
            hit = [a for a, _ in self.index.search(keywords, SEARCH_RETURN_N) if a in self.catalog.by_asin]
            if len(self._results) > 4096:
                self._results.clear()
            self._results[keywords] = hit
        return hit


def _single(pattern: str, where: Path, what: str) -> Path | None:
    found = sorted(where.glob(pattern)) if where.is_dir() else []
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(f"{where} holds several WebShop {what} files ({names}); pass the one to use "
                        f"({'goal_file' if 'ins' in pattern else 'data'}=...).")
    return found[0] if found else None


def _load_world(data: str | Path | None, goals: str, goal_file: str | Path | None, num_products: int | None,
                cache_dir: str | Path | None, seed: int) -> _World:
    t0 = time.perf_counter()
    path = data_or_sample(data, SAMPLE_DATA, "WebShop")
    if not path.exists():
        raise DataError(f"WebShop data path {path} does not exist.")
    instructions = None
    human_ins = None
    if path.is_file() or _single("documents*.jsonl", path, "documents") is not None:
        doc_file = path if path.is_file() else _single("documents*.jsonl", path, "documents")
        catalog = load_catalog(doc_file, num_products, cache_dir)  # big files: products read on demand
        folder = doc_file.parent
        gfile = Path(goal_file) if goal_file else _single("items_ins_v2*.json", folder, "goal (items_ins_v2)")
        if gfile is not None:
            instructions = load_json(gfile, "goal (items_ins_v2)")
    else:
        files = find_raw_files(path)
        if files["products"] is None:
            raise DataError(f"{path} holds neither a WebShop documents*.jsonl nor items_shuffle*.json.")
        gfile = Path(goal_file) if goal_file else files["attributes"]
        if gfile is None:
            raise DataError(f"{path} holds no WebShop items_ins_v2.json / items_ins_v2_1000.json.")
        instructions = load_json(gfile, "goal (items_ins_v2)")
        catalog = load_raw(path, num_products, attributes=instructions)  # attaches human instructions too
    if goals == "synthetic" and instructions is None:
        raise DataError(f"No WebShop goal file (items_ins_v2*.json) next to {path}; pass goal_file=... "
                        "or goals='human'.")
    goal_list = build_goals(list(catalog.goal_candidates(instructions, goals)), catalog.prices, goals, instructions,
                            human_ins, seed)
    if not goal_list:
        raise DataError(f"WebShop data {path} yields no {goals} goals.")
    index, how = load_or_build(catalog.key, cache_dir=cache_dir, docs_factory=catalog.documents)
    return _World(catalog, goal_list, index, how, path, time.perf_counter() - t0)


class WebShopEnv:
    """WebShop's text environment, in-process, with Lucene-parity search and the official reward."""

    env_id = "webshop"
    action_names = ("search", "click")

    def __init__(self, data: str | Path | None = None, max_steps: int = 15, goals: str = "synthetic",
                 split: str | None = None, observation_mode: str = "text", goal_file: str | Path | None = None,
                 num_products: int | None = None, cache_dir: str | Path | None = None, seed: int = 0,
                 search_anywhere: bool = False):
        require(("nltk", "spacy", SPACY_MODELS, "thefuzz"), "WebShop")  # up front, not at the first search or buy
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise UsageError(f"The WebShop step limit (max_steps) must be a positive integer, got {max_steps!r}.")
        if observation_mode not in OBSERVATION_MODES:
            raise UsageError(f"Unknown WebShop observation_mode '{observation_mode}': "
                             f"choose one of {', '.join(OBSERVATION_MODES)}.")
        if goals not in GOAL_KINDS:
            raise UsageError(f"Unknown WebShop goals '{goals}': choose one of {', '.join(GOAL_KINDS)}.")
        self.max_steps = max_steps
        self.observation_mode = observation_mode
        self.search_anywhere = search_anywhere
        self._world = _load_world(data, goals, goal_file, num_products, cache_dir, seed)
        self._task_indices = list(split_indices(len(self._world.goals), split))
        self._goal: dict[str, Any] | None = None
        self._done = True

    # --- shared state ----------------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog:
        return self._world.catalog

    @property
    def goals(self) -> list[dict[str, Any]]:
        return self._world.goals

    @property
    def index(self):
        return self._world.index

    @property
    def data_path(self) -> Path:
        return self._world.data_path

    def spawn(self) -> "WebShopEnv":
        """A fresh env over the same catalog, index and goals (one per concurrent episode, O(1))."""
        twin = object.__new__(type(self))  # subclasses spawn their own kind
        twin.max_steps, twin.observation_mode = self.max_steps, self.observation_mode
        twin.search_anywhere, twin._world, twin._task_indices = self.search_anywhere, self._world, self._task_indices
        twin._goal, twin._done = None, True
        return twin

    def task_ids(self) -> list[str]:
        return [task_id(i) for i in self._task_indices]

    def get_goal(self, tid: str | int) -> tuple[int, dict[str, Any]]:
        idx = tid if isinstance(tid, int) else parse_task_id(str(tid))
        if idx is None or not 0 <= idx < len(self.goals):
            raise UsageError(f"Unknown WebShop task id '{tid}': use fixed_N with N from 0 to {len(self.goals) - 1} "
                             f"(goals of {self.data_path}).")
        return idx, self.goals[idx]

    # --- episode -----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode on ``options['task_id']`` (``fixed_N``, WebShop's goal N); ``seed`` is unused."""
        if not options or "task_id" not in options:
            raise UsageError("WebShopEnv.reset() needs options={'task_id': 'fixed_N'} naming one goal.")
        self._goal_index, self._goal = self.get_goal(options["task_id"])
        self._instruction = self._goal["instruction_text"]
        self._steps = 0
        self._done = False
        self._reset_session()
        obs = self._render()
        return obs, self._info(None, True)

    def _reset_session(self) -> None:
        self._page_type = "search"
        self._keywords: str | None = None
        self._page = 1
        self._results: list[str] = []
        self._asin: str | None = None
        self._options: dict[str, str] = {}
        self._sub_page: str | None = None
        self._purchase: dict[str, Any] | None = None

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        check_can_step(self._goal is not None, self._done)
        self._steps += 1
        reward, terminated = 0.0, False
        parsed = parse_action(action)
        kind = parsed[0] if parsed else None
        valid = True
        if parsed is None or kind not in ("search", "click", "think"):
            shown = " ".join(str(action).split())
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            obs, valid, kind = (f"Invalid action: {shown!r}. Valid actions are search[keywords] and "
                                f"click[button] with a button of this page: {self._clickables_text()}."), False, None
        elif kind == "think":
            obs = "OK."
        elif kind == "search":
            obs, valid = self._do_search(parsed[1])
        else:
            obs, valid, reward, terminated = self._do_click(parsed[1])
        info = self._info(kind, valid)
        if terminated:
            self._done = True
            info.update(self._end_info(reward))
            return obs, reward, True, False, info
        if self._steps >= self.max_steps:
            self._done = True
            info.update(self._end_info(0.0))
            return obs, 0.0, False, True, info
        return obs, 0.0, False, False, info

    def close(self) -> None:
        self._goal = None
        self._done = True

    # --- actions -----------------------------------------------------------------------------------
    def _do_search(self, keywords: str) -> tuple[str, bool]:
        keywords = keywords.lower().strip()
        if not keywords:
            return "Invalid action: search[] needs keywords, e.g. search[wireless earbuds].", False
        if self._page_type != "search" and not self.search_anywhere:
            return ("Invalid action: there is no search box on this page; click[Back to Search] first. "
                    f"Available: {self._clickables_text()}."), False
        self._keywords = keywords
        self._results = self._world.search(keywords)
        self._page, self._asin, self._options, self._page_type = 1, None, {}, "results"
        return self._render(), True

    def _do_click(self, button: str) -> tuple[str, bool, float, bool]:
        arg = button.lower().strip()
        clickables = self._clickables()
        if arg not in clickables or arg == "search":
            return (f"Invalid action: click[{button}] is not available on this page. "
                    f"Available: {self._clickables_text()}."), False, 0.0, False
        if arg == "buy now":
            reward = self._buy()
            return self._render(), True, reward, True
        if arg == "back to search":
            self._reset_session()
        elif arg == "next >" and self._page_type == "results":
            self._page += 1
        elif arg == "< prev" and self._page_type == "results":
            self._page -= 1
        elif arg == "< prev" and self._page_type == "item_sub":
            self._page_type = "item"
        elif arg == "< prev" and self._page_type == "item":
            self._page_type, self._asin, self._options = "results", None, {}
        elif arg in ("description", "features", "reviews"):
            self._page_type, self._sub_page = "item_sub", arg.capitalize()
        elif self._page_type == "results":
            self._page_type = "item"
            self._asin = next((a for a in self._results if a.lower() == arg), arg.upper())
        else:  # an option value on the item page
            assert self._asin is not None
            name = pages.option_clickables(self.catalog.by_asin[self._asin])[arg]
            self._options[name] = arg
        return self._render(), True, 0.0, False

    def _buy(self) -> float:
        assert self._asin is not None and self._goal is not None
        product = self.catalog.by_asin[self._asin]
        price = self.catalog.prices[self._asin]
        parts = get_reward(product, self._goal, price=price, options=self._options)
        self._purchase = {"asin": self._asin, "options": dict(self._options), "price": price, "parts": parts}
        self._page_type = "done"
        return float(parts.reward)

    # --- rendering ---------------------------------------------------------------------------------
    def _page_view(self) -> tuple[str, list[str]]:
        mode, instr = self.observation_mode, self._instruction
        if self._page_type == "search":
            return pages.search_page(instr, mode)
        if self._page_type == "results":
            window = self._results[(self._page - 1) * pages.PRODUCT_WINDOW:self._page * pages.PRODUCT_WINDOW]
            products = [self.catalog.by_asin[a] for a in window]
            return pages.results_page(instr, self._page, len(self._results), products, mode)
        if self._page_type == "item":
            return pages.item_page(instr, self.catalog.by_asin[self._asin], self._options, mode)
        if self._page_type == "item_sub":
            return pages.sub_page(instr, self.catalog.by_asin[self._asin], self._sub_page, mode)
        p = self._purchase or {}
        return pages.done_page(p.get("asin", ""), p.get("options", {}), p["parts"].reward if p else 0.0, mode)

    def _render(self) -> str:
        return self._page_view()[0]

    def _clickables(self) -> list[str]:
        return self._page_view()[1]

    def _clickables_text(self) -> str:
        items = self._clickables()
        return ", ".join(f"click[{c}]" for c in items) if items else "none"

    def available_actions(self) -> dict[str, Any]:
        """WebShop's ``get_available_actions()``."""
        return {"has_search_bar": self._page_type == "search", "clickables": self._clickables()}

    def _info(self, action_type: str | None, valid: bool) -> dict[str, Any]:
        return {"task_id": task_id(self._goal_index), "instruction": self._instruction, "step": self._steps,
                "action_type": action_type, "valid": valid, "page": self._page_type,
                "available_actions": self.available_actions()}

    def _end_info(self, reward: float) -> dict[str, Any]:
        goal = self._goal or {}
        info: dict[str, Any] = {"success": reward == 1.0, "score": reward, "purchased": None,
                                "goal": {k: goal.get(k) for k in ("asin", "attributes", "goal_options", "price_upper",
                                                                  "query", "category", "product_category")}}
        if self._purchase is not None:
            parts = self._purchase["parts"]
            info["purchased"] = {k: self._purchase[k] for k in ("asin", "options", "price")}
            info["reward_parts"] = parts.official_info()
            info.update({k: getattr(parts, k) for k in ("r_type", "r_att", "r_option", "r_price")})
        return info


__all__ = ["WebShopEnv", "parse_action", "SAMPLE_DATA"]
