"""Prompt building shared by every environment: ReAct actor prompts and reflection prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

PROMPT_VERSION = "v1"  # bump when prompt text changes; recorded in run manifests


@dataclass(frozen=True)
class PromptSet:
    actor_instruction: str
    actor_examples: str
    reflect_instruction: str
    reflect_examples: str
    action_format: str

    def reflections_block(self, memory: Sequence[str]) -> str:
        if not memory:
            return ""
        lines = "\n".join(f"- {m.strip()}" for m in memory)
        return ("You have attempted this task before and failed. The reflections below describe what went "
                "wrong and a plan to avoid it; use them to do better this time.\nReflections:\n" + lines + "\n\n")

    def actor_prompt(self, first_observation: str, memory: Sequence[str], scratchpad: str, step: int) -> str:
        return (
            f"{self.actor_instruction}\n\nHere are some examples:\n{self.actor_examples}\n(END OF EXAMPLES)\n\n"
            f"{self.reflections_block(memory)}{first_observation.strip()}\n{scratchpad}Thought {step}:"
        )

    def reflection_prompt(self, first_observation: str, scratchpad: str, outcome: str) -> str:
        return (
            f"{self.reflect_instruction}\n\nHere is an example:\n{self.reflect_examples}\n(END OF EXAMPLES)\n\n"
            f"Previous trial:\n{first_observation.strip()}\n{scratchpad}{outcome}\n\nReflection:"
        )


def get_prompts(env_id: str) -> PromptSet:
    from retroformer_cli.envs import canonical_name

    import importlib

    # one module per environment: retroformer_cli/agents/prompts/<env>.py defining PROMPTS
    return importlib.import_module(f"retroformer_cli.agents.prompts.{canonical_name(env_id)}").PROMPTS
