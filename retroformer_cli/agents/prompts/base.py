"""Prompt building shared by every environment: ReAct actor prompts and reflection prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from retroformer_cli.llm.base import Message

PROMPT_VERSION = "v2"  # bump when prompt text changes; recorded in run manifests


@dataclass(frozen=True)
class PromptSet:
    actor_instruction: str
    actor_examples: str
    reflect_instruction: str
    reflect_examples: str
    action_format: str
    few_shot: bool = True  # False: the actor's prompt has the instruction only (a fine-tuned actor, as in FireAct)

    def reflections_block(self, memory: Sequence[str]) -> str:
        if not memory:
            return ""
        lines = "\n".join(f"- {m.strip()}" for m in memory)
        return ("You have attempted this task before and failed. The reflections below describe what went "
                "wrong and a plan to avoid it; use them to do better this time.\nReflections:\n" + lines + "\n\n")

    def actor_messages(self, first_observation: str, memory: Sequence[str], scratchpad: str, step: int,
                       thought: str | None = None) -> list[Message]:
        """System: instruction + examples (a stable prefix); user: reflections + the task; assistant: the
        trajectory so far, ending in ``Thought N:`` (or ``Action N:`` once the thought is known) for the
        model to continue. Completion backends flatten this to one text; chat backends that cannot
        continue a prefilled answer reply with a fresh ``Thought N: ... Action N: ...``, which parses too."""
        head = f"{scratchpad}Thought {step}:"
        if thought is not None:
            head += f" {thought}\nAction {step}:"
        system = f"{self.actor_instruction}\n\nHere are some examples:\n\n{self.actor_examples}" if self.few_shot \
            else self.actor_instruction
        return [
            Message("system", system),
            Message("user", f"{self.reflections_block(memory)}{first_observation.strip()}"),
            Message("assistant", head),
        ]

    def reflection_messages(self, first_observation: str, scratchpad: str, outcome: str) -> list[Message]:
        return [
            Message("system", f"{self.reflect_instruction}\n\nHere is an example:\n\n{self.reflect_examples}"),
            Message("user", f"Previous trial:\n{first_observation.strip()}\n{scratchpad}{outcome}"),
            Message("assistant", "Reflection:"),
        ]


def get_prompts(env_id: str, few_shot: bool = True) -> PromptSet:
    """The env's prompt set, as its EnvSpec names it (``EnvSpec.prompts``, a ``"module:attribute"`` string);
    ``few_shot=False`` drops the actor's examples (collect's ``--no-few-shot``)."""
    from dataclasses import replace

    from retroformer_cli.envs import prompts_for

    prompts = prompts_for(env_id)
    return prompts if few_shot else replace(prompts, few_shot=False)
