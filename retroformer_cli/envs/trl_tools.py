"""Our text envs as TRL ``GRPOTrainer(environment_factory=...)`` environments: the *actor* learns on them.

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from retroformer_cli.envs.trl_tools import HotPotQATools
    from retroformer_cli.stages import actor_grpo
    from retroformer_cli.llm import tool_chat
    tool_chat.install(tokenizer)  # the model's own tool template when TRL can use it, else ours (ChatML)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=GRPOConfig(...),
                          train_dataset=Dataset.from_list(actor_grpo.rows(HotPotQATools, task_ids)),
                          environment_factory=HotPotQATools.factory(data="sample_data/hotpotqa"))

TRL 1.16's contract (``trl/trainer/grpo_trainer.py``), which these classes follow:

* ``factory()`` takes no argument and returns one environment; TRL calls it once per concurrent rollout and
  pools the instances, reusing them through ``reset``. Each instance here owns its own episode state; the data
  (docstore, catalog, game list) is loaded once per factory and shared through the env's ``spawn()``.
* Every public method of the class other than ``reset`` and ``get_reward`` is a tool. Its JSON schema comes
  from the type hints and the Google-style docstring (``transformers.utils.get_json_schema``), so each tool
  documents its arguments under ``Args:``. Helpers stay private (``_name``) so they never become tools.
* ``reset(**row)`` receives the dataset row's columns as keywords (``prompt``, ``task_id``, ...) and returns
  text that TRL appends to the row's last user message: here the env's first observation.
* ``get_reward()`` takes no argument; TRL calls it once per finished rollout. Here it is the episode return:
  HotPotQA's exact match on ``finish`` (or F1 with ``reward="f1"``), WebShop's reward on ``click[Buy Now]``,
  ALFWorld's won flag.

A bad tool call (missing or unknown argument, a non-text value, an action the page does not offer, a call after
the episode ended) comes back as observation text, never as an exception.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
from typing import Any, Callable, ClassVar

from retroformer_cli.errors import RetroformerError, UsageError

EPISODE_OVER = "The episode is over; no further actions are taken."


def _tool(fn: Callable[..., str]) -> Callable[..., str]:
    """Keep ``fn``'s signature and docstring for TRL's schema, but answer a malformed call with text."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters if p != "self"]
    usage = f"{fn.__name__}({', '.join(f'{p}=...' for p in params)})"

    @functools.wraps(fn)
    def call(self: "EnvTools", *args: Any, **kwargs: Any) -> str:
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            return f"Invalid call: {exc}. Call {usage}."
        values = [v if isinstance(v, str) else ("" if v is None else str(v)) for v in list(bound.arguments.values())[1:]]
        return fn(self, *values)

    return call


class EnvTools:
    """One env episode behind tool methods. Subclasses add the tools; this class has none of its own."""

    env_name: ClassVar[str] = ""
    #: What the actor is told before the env's first observation (the dataset's user message).
    instructions: ClassVar[str] = ""
    _options: ClassVar[tuple[str, ...]] = ()  # factory keywords that configure the adapter, not the env
    _env_defaults: ClassVar[dict[str, Any]] = {}  # env keywords the adapter sets unless the caller does

    def __init__(self, env: Any, next_task: Callable[[], str] | None = None):
        self._env = env
        self._next_task = next_task
        self._reset_state()

    def _reset_state(self) -> None:
        self._task: str | None = None
        self._done = True
        self._return = 0.0
        self._final: dict[str, Any] = {}
        self._trace: list[tuple[str, str]] = []  # (action, observation) of the current episode

    @classmethod
    def factory(cls, env: Any = None, *, group_size: int = 1, **kwargs: Any) -> Callable[[], "EnvTools"]:
        """A no-argument callable for ``environment_factory``.

        ``env``: a built env to share (each instance runs on ``env.spawn()``); else one is made on the first call
        with ``make(name, **kwargs)``. Keywords named in ``_options`` (HotPotQA's ``reward``) go to the adapter
        instead. Rows without ``task_id`` (TRL without a ``train_dataset``) take the env's tasks in turn, each
        for ``group_size`` consecutive resets: pass GRPO's ``num_generations`` so that the episodes of one group
        play the same task (TRL resets a batch in order, a group's rollouts next to each other; one process)."""
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise UsageError(f"group_size must be a positive integer (GRPO's num_generations), got {group_size!r}.")
        options = {k: kwargs.pop(k) for k in cls._options if k in kwargs}
        cls.check_options(**options)
        env_kwargs = {**cls._env_defaults, **kwargs}
        lock = threading.Lock()
        shared: dict[str, Any] = {"env": env}
        counter = itertools.count()

        def base() -> Any:
            with lock:
                if shared["env"] is None:
                    from retroformer_cli.envs import make

                    shared["env"] = make(cls.env_name, **env_kwargs)
                return shared["env"]

        def next_task() -> str:
            ids = list(base().task_ids())
            if not ids:
                raise UsageError(f"The {cls.env_name} data holds no tasks to train on.")
            return str(ids[(next(counter) // group_size) % len(ids)])

        def make_one() -> "EnvTools":
            return cls(base().spawn(), next_task, **options)

        return make_one

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Raise UsageError for a bad adapter option (before TRL builds anything)."""

    # --- TRL hooks ------------------------------------------------------------------------------
    def reset(self, task_id: str | None = None, **row: Any) -> str:
        """Start an episode on the row's ``task_id`` (or the next task) and return its first observation, after
        the instructions when the row's prompt has none (TRL's placeholder row without a ``train_dataset``)."""
        self._reset_state()
        if task_id is None:
            if self._next_task is None:
                raise UsageError(f"{type(self).__name__}.reset() needs a task_id (the dataset has no task_id column).")
            task_id = self._next_task()
        self._task = str(task_id)
        obs, _ = self._env.reset(options={"task_id": self._task})
        self._done = False
        prompt = row.get("prompt")
        said = prompt[-1].get("content") if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) else prompt
        return obs if said else f"{self.instructions}\n\n{obs}"

    def get_reward(self) -> float:
        """The episode return (0.0 when the actor never ended the episode)."""
        return float(self._return)

    # --- shared by the tools ----------------------------------------------------------------------
    def _act(self, action: str) -> str:
        """One env step for a tool call; the observation text (with a note when the episode ends)."""
        if self._task is None:
            return "No episode has started yet."
        if self._done:
            return EPISODE_OVER
        try:
            obs, reward, terminated, truncated, info = self._env.step(action)
        except RetroformerError as exc:  # e.g. the ALFWorld engine died: end the episode, say why
            self._done = True
            obs = f"The environment failed ({exc}). {EPISODE_OVER}"
            self._trace.append((action, obs))
            return obs
        self._return += float(reward)
        if terminated or truncated:
            self._done = True
            self._final = dict(info)
            self._on_end(info)
            if truncated:
                obs = f"{obs}\nThe step limit is reached. {EPISODE_OVER}"
        self._trace.append((action, obs))
        return obs

    def _on_end(self, info: dict[str, Any]) -> None:
        """Subclasses may turn the final ``info`` into another return (HotPotQA's F1)."""


class HotPotQATools(EnvTools):
    """HotPotQA with ReAct's three actions as tools; reward = exact match (or F1) of ``finish``."""

    env_name = "hotpotqa"
    instructions = ("Answer the question. Use the search tool to read a page about an entity, lookup to find a "
                    "keyword on that page, and finish with a short answer once you know it.")

    _options = ("reward",)

    def __init__(self, env: Any, next_task: Callable[[], str] | None = None, reward: str = "em"):
        self.check_options(reward=reward)
        self._reward_kind = reward
        super().__init__(env, next_task)

    @classmethod
    def check_options(cls, reward: str = "em") -> None:
        if reward not in ("em", "f1"):
            raise UsageError(f"Unknown HotPotQA reward '{reward}': choose em or f1.")

    def _on_end(self, info: dict[str, Any]) -> None:
        if self._reward_kind == "f1":
            self._return = float(info.get("f1") or 0.0)

    @_tool
    def search(self, entity: str) -> str:
        """Search the document store for an entity and read the start of its page.

        Args:
            entity: The entity or page title to search for, e.g. "Ed Wood".

        Returns:
            The page text, or similar page titles when no page matches.
        """
        return self._act(f"Search[{entity}]")

    @_tool
    def lookup(self, keyword: str) -> str:
        """Find the next sentence containing a keyword on the page opened by the last search.

        Args:
            keyword: The word or phrase to look for on the current page.

        Returns:
            The next matching sentence, or a note that there are no more results.
        """
        return self._act(f"Lookup[{keyword}]")

    @_tool
    def finish(self, answer: str) -> str:
        """Give the final answer and end the episode.

        Args:
            answer: The short answer to the question (a name, a date, yes or no, ...).

        Returns:
            Whether the answer is correct.
        """
        return self._act(f"Finish[{answer}]")


class WebShopTools(EnvTools):
    """WebShop's ``search[...]`` and ``click[...]`` as tools; reward = WebShop's reward on Buy Now."""

    env_name = "webshop"
    instructions = ("Buy the product that best matches the instruction. Use the search tool on the search page, "
                    "click a product id to open it, click its options, then click 'Buy Now'.")

    @_tool
    def search(self, keywords: str) -> str:
        """Type keywords into the shop's search box (only on the search page; click 'Back to Search' elsewhere).

        Args:
            keywords: The search query, e.g. "wireless earbuds under 50 dollars".

        Returns:
            The page of search results.
        """
        return self._act(f"search[{keywords}]")

    @_tool
    def click(self, button: str) -> str:
        """Click a button or link shown on the current page.

        Args:
            button: Its text as shown: a product id, an option value, "Buy Now", "Back to Search", "Next >",
                "< Prev", "Description", "Features" or "Reviews".

        Returns:
            The new page.
        """
        return self._act(f"click[{button}]")


class ALFWorldTools(EnvTools):
    """ALFWorld's household commands through one tool; reward 1 when the game is won."""

    env_name = "alfworld"
    # TRL calls tools one after another: an in-process engine per instance, not one worker process each
    _env_defaults = {"process": False}
    instructions = ("Complete the household task by sending text commands such as 'go to desk 1', "
                    "'take mug 1 from desk 1', 'open fridge 1', 'heat mug 1 with microwave 1', 'look' or 'inventory'.")

    @_tool
    def act(self, command: str) -> str:
        """Send one text command to the household game.

        Args:
            command: The command, e.g. "go to countertop 1", "take apple 1 from countertop 1", "look".

        Returns:
            What happens ("Nothing happens." when the command is not possible here).
        """
        if command.strip().lower().startswith("think"):
            return "Invalid call: thinking is not an action; write your thoughts outside the tool call."
        return self._act(command)


ADAPTERS: dict[str, type[EnvTools]] = {c.env_name: c for c in (HotPotQATools, WebShopTools, ALFWorldTools)}


def adapter_for(env: str) -> type[EnvTools]:
    """The adapter class of an env name or alias (``hotpotqa``, ``WebShop-v0``, ...)."""
    from retroformer_cli.envs import canonical_name

    name = canonical_name(env)
    if name not in ADAPTERS:
        raise UsageError(f"The {name} environment has no TRL tool adapter: choose one of {', '.join(ADAPTERS)}.")
    return ADAPTERS[name]


def tool_names(cls: type[EnvTools]) -> list[str]:
    """The tools TRL will expose for ``cls`` (the same rule as GRPOTrainer: public functions, not the hooks)."""
    return [n for n, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
            if n not in ("reset", "get_reward") and not n.startswith("_")]


__all__ = ["ADAPTERS", "ALFWorldTools", "EPISODE_OVER", "EnvTools", "HotPotQATools", "WebShopTools", "adapter_for",
           "tool_names"]
