"""The envs through Gymnasium: `gymnasium.make("retroformer/<Id>-v0")` and Gymnasium's own `check_env`, with no
check waived (WebShop and HotPotQA on the bundled sample data, ALFWorld on the shared games)."""

from __future__ import annotations

import warnings

import pytest

from conftest import REPO, shared_data
from retroformer_cli import envs

gymnasium = pytest.importorskip("gymnasium")
from gymnasium.utils.env_checker import check_env  # noqa: E402


def _checked(gym_id: str, **kwargs):
    """Make through Gymnasium (the module:id form imports our registration), run check_env, fail on any warning."""
    env = gymnasium.make(f"retroformer_cli.envs.gym:{gym_id}", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Gymnasium's checker reports soft failures as warnings
        check_env(env.unwrapped)
    return env


def test_every_registered_env_is_a_gymnasium_env_derived_from_our_registry():
    from retroformer_cli.envs.gym import register_envs

    ids = register_envs()
    assert ids == [f"retroformer/{s.id}" for s in envs.specs()]
    for spec in envs.specs():
        gym_spec = gymnasium.spec(spec.gym_id)
        assert gym_spec.kwargs == {"env": spec.name} and gym_spec.entry_point == "retroformer_cli.envs.gym:TextGymEnv"


def test_webshop_make_reset_step_and_check_env():
    env = _checked("retroformer/WebShop-v0", data=str(REPO / "sample_data" / "webshop"))
    obs, info = env.reset(seed=7)
    assert obs in env.observation_space and info["task_id"].startswith("fixed_")
    assert env.reset(seed=7)[1]["task_id"] == info["task_id"]  # the seed picks the task
    obs, reward, terminated, truncated, info = env.step("search[toothbrush]")
    assert "Back to Search" in obs and isinstance(reward, float) and not terminated and not truncated
    obs, _ = env.reset(options={"task_id": "fixed_0"})
    assert "Instruction" in obs and env.unwrapped.render() is None
    env.close()


def test_hotpotqa_make_and_check_env_with_options():
    env = _checked("retroformer/HotPotQA-v0", max_steps=2)
    task = env.unwrapped.text_env.task_ids()[0]
    obs, info = env.reset(options={"task_id": task})
    assert obs.startswith("Question:") and info["task_id"] == task
    env.step("Search[nothing at all]")
    *_, truncated, info = env.step("Lookup[x]")
    assert truncated and info["success"] is False  # the env's own step limit, not a Gymnasium wrapper's
    ansi = gymnasium.make("retroformer/HotPotQA-v0", render_mode="ansi")
    assert ansi.reset(seed=1)[0] == ansi.render()
    with pytest.raises(Exception, match="has no option .nonsense."):
        gymnasium.make("retroformer/HotPotQA-v0", nonsense=1)


def test_unicode_text_space_accepts_any_text_and_samples_printable():
    from retroformer_cli.envs.gym import UnicodeText

    space = UnicodeText(5, min_length=1, seed=0)
    assert "héllo" in space and "😀" in space and "" not in space and "toolong" not in space and 3 not in space
    assert all(c.isprintable() for c in space.sample())
    assert isinstance(space, gymnasium.spaces.Text)


@pytest.mark.shared_data
def test_alfworld_make_and_check_env():
    from retroformer_cli.envs.alfworld.worker import missing_dependency

    data = shared_data("alfworld")
    if missing_dependency() is not None:
        pytest.skip(f"alfworld is not installed ('{missing_dependency()}' missing)")
    env = _checked("retroformer/ALFWorld-v0", data=str(data))
    try:
        obs, info = env.reset(seed=3)
        assert obs in env.observation_space and "Your task is to" in obs
        obs, reward, terminated, truncated, info = env.step("look")
        assert isinstance(reward, float) and not terminated and not truncated
    finally:
        env.close()
