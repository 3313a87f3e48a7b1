"""Request bodies of the OpenAI-compatible API (pydantic), and one-sentence messages for invalid ones.

Unknown fields are refused with 400 as OpenAI's API does ("Unrecognized request argument supplied"), except
the parameters in :data:`IGNORED_FIELDS`, which clients send routinely.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_N = 16
MAX_STOP = 16

# OpenAI parameters this server accepts and ignores (clients send them routinely); any other unknown field is
# refused with 400, as OpenAI's API does ("Unrecognized request argument supplied").
IGNORED_FIELDS = frozenset({
    "user", "metadata", "store", "service_tier", "presence_penalty", "frequency_penalty", "logit_bias",
    "top_logprobs", "response_format", "parallel_tool_calls", "prediction", "modalities", "audio",
    "reasoning_effort", "best_of", "top_k", "min_p", "repetition_penalty", "ignore_eos",
})


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked in _refuse_unknown

    @model_validator(mode="after")
    def _refuse_unknown(self) -> "SamplingParams":
        unknown = sorted(set(self.model_extra or {}) - IGNORED_FIELDS)
        if unknown:
            raise ValueError(f"Unrecognized request argument supplied: {', '.join(unknown)}")
        return self

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None
    logprobs: Optional[Any] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart], None] = None


class ChatRequest(SamplingParams):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(SamplingParams):
    prompt: Union[StrictStr, list[StrictStr]]
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None


class LoadAdapterRequest(BaseModel):
    lora_name: StrictStr = Field(..., min_length=1)
    lora_path: StrictStr = Field(..., min_length=1)


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: StrictStr = Field(..., min_length=1)
