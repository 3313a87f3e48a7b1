"""Backend-neutral types for talking to a language model.

Every backend implements :class:`LLMClient`: an async ``agenerate`` taking chat messages and a
:class:`GenerationConfig` and returning a :class:`Generation` with the text and token usage.
Completion-style backends flatten the messages with :func:`messages_to_prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the backend did not compute again (reused prefix; OpenAI's cached_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens


@dataclass
class Generation:
    text: str
    model_id: str
    usage: Usage = field(default_factory=Usage)
    latency_ms: float = 0.0
    finish_reason: str | None = None
    retries: int = 0  # how many failed attempts preceded this answer
    min_margin: float | None = None  # local greedy decoding: smallest top-1/top-2 logit gap (near-tie detector)


@runtime_checkable
class LLMClient(Protocol):
    """What the agents need from a model. ``model_id`` is the exact id recorded in results."""

    model_id: str

    async def agenerate(self, messages: Sequence[Message], config: GenerationConfig) -> Generation: ...

    async def aclose(self) -> None: ...


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string. Chat APIs may ignore ``stop``; we never rely on them."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut], cut < len(text)


def messages_to_prompt(messages: Sequence[Message]) -> str:
    """Flatten chat messages for a plain completion model: contents joined, no role markers.

    Our prompts put the whole instruction in one user message and expect the model to continue it,
    so a completion model sees exactly the text a chat model would read.
    """
    parts = [m.content for m in messages if m.role != "assistant"]
    prompt = "\n\n".join(parts)
    tail = [m.content for m in messages if m.role == "assistant"]
    if tail:
        prompt += "\n" + "".join(tail)
    return prompt
