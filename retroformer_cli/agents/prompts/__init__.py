"""Prompt sets (:class:`~retroformer_cli.agents.prompts.base.PromptSet`): actor and reflection prompts per env.

An env names its prompt set in its :class:`~retroformer_cli.envs.spec.EnvSpec` (``prompts="module:PROMPTS"``), so
a prompt module may live anywhere, a plugin's package included; :func:`get_prompts` resolves it through the spec.
"""

from retroformer_cli.agents.prompts.base import PROMPT_VERSION, PromptSet, get_prompts

__all__ = ["PROMPT_VERSION", "PromptSet", "get_prompts"]
