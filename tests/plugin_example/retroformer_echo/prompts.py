"""The echo env's prompt set (a plugin's own prompt module, named by its EnvSpec)."""

from retroformer_cli.agents.prompts.base import PromptSet

PROMPTS = PromptSet(
    actor_instruction="ECHO-PLUGIN-PROMPT. Repeat the word you are shown with Say[word].",
    actor_examples=("Instruction: say the word 'pear'.\nThought 1: I say it.\nAction 1: Say[pear]\n"
                    "Observation 1: Correct."),
    reflect_instruction="ECHO-PLUGIN-REFLECT. Say what went wrong in one sentence.",
    reflect_examples="Previous trial: I said the wrong word.\nReflection: I must copy the word exactly.",
    action_format="Say[word]",
)
