"""Gymnasium bridge: every env of our registry as ``retroformer/<EnvSpec.id>`` (e.g. ``retroformer/WebShop-v0``).

Importing this module registers them (derived from :func:`retroformer_cli.envs.specs`, never listed twice)::

    import gymnasium
    import retroformer_cli.envs.gym  # noqa: F401  (or the id "retroformer_cli.envs.gym:retroformer/WebShop-v0")
    env = gymnasium.make("retroformer/WebShop-v0", data="sample_data/webshop")
    obs, info = env.reset(seed=0)                 # a task drawn with the seed, or options={"task_id": ...}
    obs, reward, terminated, truncated, info = env.step("search[red shoes]")

Observations and actions are :class:`UnicodeText`, a :class:`gymnasium.spaces.Text` whose ``contains`` accepts any
Unicode text within its length bounds (pages and product titles hold arbitrary characters) while ``sample()``
draws from printable ASCII. Gymnasium 1.x no longer loads plugins from the ``gymnasium.envs`` entry point group,
hence registration on import.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium
from gymnasium import spaces

from retroformer_cli.errors import UsageError

NAMESPACE = "retroformer"
MAX_OBSERVATION_CHARS = 1 << 20
MAX_ACTION_CHARS = 1 << 10


class UnicodeText(spaces.Text):
    """Free-form text: any Unicode characters, ``min_length`` to ``max_length`` of them. Sampling draws from
    ``charset`` (printable ASCII unless given) exactly as :class:`~gymnasium.spaces.Text` does."""

    def __init__(self, max_length: int, *, min_length: int = 0, charset: str | None = None, seed: Any = None):
        super().__init__(max_length, min_length=min_length, seed=seed,
                         charset=charset if charset is not None else string.printable.strip() + " ")

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


class TextGymEnv(gymnasium.Env):
    """A registered text env as a :class:`gymnasium.Env`. ``env``: its name; other keywords go to its factory
    (``data``, ``max_steps``, its spec's ``options``, ``cache_dir``). ``reset`` without ``options["task_id"]``
    draws a task with the env's seeded ``np_random``; ``render_mode="ansi"`` renders the latest observation."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # text renders have no frame rate; 1 is nominal

    def __init__(self, env: str, render_mode: str | None = None, **kwargs: Any):
        from retroformer_cli.envs import get_spec, make

        if render_mode not in (None, "ansi"):
            raise UsageError(f"render_mode must be None or 'ansi', got {render_mode!r}.")
        self.env_spec = get_spec(env)
        self.text_env = make(self.env_spec.name, **kwargs)  # checks the options against the spec
        self.render_mode = render_mode
        self.observation_space = UnicodeText(MAX_OBSERVATION_CHARS)
        self.action_space = UnicodeText(MAX_ACTION_CHARS, min_length=1)
        self._task_ids = list(self.text_env.task_ids())
        if not self._task_ids:
            raise UsageError(f"The {self.env_spec.name} environment has no tasks in its data.")
        self._last = ""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        if "task_id" not in options:
            options["task_id"] = self._task_ids[int(self.np_random.integers(len(self._task_ids)))]
        obs, info = self.text_env.reset(seed=seed, options=options)
        self._last = obs
        return obs, dict(info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.text_env.step(action)
        self._last = obs
        return obs, float(reward), bool(terminated), bool(truncated), dict(info)

    def render(self) -> str | None:
        return self._last if self.render_mode == "ansi" else None

    def close(self) -> None:
        self.text_env.close()


def register_envs(namespace: str = NAMESPACE) -> list[str]:
    """Register every env of our registry with Gymnasium (idempotent); return their Gymnasium ids."""
    from retroformer_cli.envs import specs

    ids = []
    for spec in specs():
        gym_id = f"{namespace}/{spec.id}"
        if gym_id not in gymnasium.registry:
            gymnasium.register(id=gym_id, entry_point=f"{__name__}:TextGymEnv", kwargs={"env": spec.name},
                               nondeterministic=False)
        ids.append(gym_id)
    return ids


register_envs()
