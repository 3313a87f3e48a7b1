"""The ``parrot:NAME`` backend: copies the word from the prompt, except that it mishears 'banana' until a
reflection is in its prompt. A real plugin would call its model here."""

from __future__ import annotations

import re
from typing import Any, Sequence

from retroformer_cli.errors import UsageError
from retroformer_cli.llm.base import Generation, GenerationConfig, Message, Usage, apply_stop


def resolve(text: str, cfg: Any, workspace: Any, option: str) -> str:
    if not text:
        raise UsageError(f"{option} parrot: needs a name (parrot:NAME).")
    return text


def make_client(target: str, cfg: Any, workspace: Any, option: str) -> "ParrotClient":
    return ParrotClient(target)


class ParrotClient:
    def __init__(self, name: str):
        self.model_id = f"parrot:{name}"

    def describe(self) -> dict[str, Any]:
        return {"backend": "parrot", "model_id": self.model_id}

    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation:
        if messages[-1].content == "Reflection:":
            text = "I said the wrong word; next time I copy it letter by letter."
        else:
            word = re.search(r"say the word '([^']*)'", messages[1].content).group(1)
            if word == "banana" and "Reflections:" not in messages[1].content:
                word = "bandana"
            text = f" I copy the word.\nAction 1: Say[{word}]"
        text, _ = apply_stop(text, config.stop)
        usage = Usage(prompt_tokens=sum(len(m.content.split()) for m in messages), completion_tokens=len(text.split()))
        return Generation(text=text, model_id=self.model_id, usage=usage, latency_ms=0.0, finish_reason="stop",
                          retries=0)

    async def aclose(self) -> None:
        pass
