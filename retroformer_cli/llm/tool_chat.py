"""A tool-calling chat template for ChatML-token models (the embedded SmolLM2) and its response parser.

The embedded model's own template renders ``message['content']`` only: it drops an assistant's ``tool_calls``
and so cannot drive tools (TRL's ``supports_tool_calling`` says False). This template keeps the same
``<|im_start|>role\\n ... <|im_end|>\\n`` turns and adds: the tool schemas in the system turn, an assistant's
calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, and ``tool`` turns for the results.
Every message renders on its own, so the template is prefix-preserving, as TRL's multi-turn loop needs.
``TOOL_RESPONSE_TEMPLATE`` is the matching transformers ``response_template`` that turns generated text back
into ``{"role": "assistant", "content": ..., "tool_calls": [...]}``.
"""

from __future__ import annotations

from typing import Any

from retroformer_cli.errors import UsageError

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

TOOL_CHAT_TEMPLATE = (
    "{%- set first_is_system = messages|length > 0 and messages[0]['role'] == 'system' -%}"
    "{%- if tools or first_is_system -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if first_is_system -%}{{- messages[0]['content'] -}}{%- endif -%}"
    "{%- if tools -%}"
    "{%- if first_is_system -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{{- 'You may call these tools (JSON schemas):\\n' -}}"
    "{%- for tool in tools -%}"
    "{{- (tool['function'] if tool['function'] is defined else tool) | tojson -}}{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- set example = tools[0]['function'] if tools[0]['function'] is defined else tools[0] -%}"
    "{%- set argument = (example['parameters']['properties'] | list | first) if example['parameters'] is defined "
    "and example['parameters']['properties'] else 'argument' -%}"
    "{{- 'To call a tool, answer with one line such as <tool_call>{\"name\": \"' + example['name'] + '\", "
    "\"arguments\": {\"' + argument + '\": \"...\"}}</tool_call> and stop. The result comes back in a tool "
    "turn; call tools until the task is done.' -}}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and first_is_system) -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{- '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' -}}"
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}{%- else -%}{{- fn['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TOOL_RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": TURN_START + "assistant\n",
    "fields": {
        "tool_calls": {
            "open": CALL_OPEN,
            "close_pattern": r"</tool_call>\s*",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}

CHAT_TEMPLATE_MODES = ("auto", "model", "tools")


def install(tokenizer: Any, mode: str = "auto") -> str:
    """Make ``tokenizer`` drive tools in TRL; returns which template it uses (``model`` or ``tools``).

    ``auto``: the model's own template when TRL can render and parse its tool calls, else ours. ``model``: the
    model's own (UsageError when it cannot). ``tools``: ours (needs the ChatML tokens in the vocabulary)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise UsageError(f"Unknown chat template mode '{mode}' (--chat-template): choose auto, model or tools.")
    from trl.chat_template_utils import add_response_schema, supports_tool_calling

    ours = tokenizer.chat_template == TOOL_CHAT_TEMPLATE  # e.g. a checkpoint of this recipe
    if mode != "tools" and not ours and tokenizer.chat_template and supports_tool_calling(tokenizer):
        if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
            return "model"
        try:
            add_response_schema(tokenizer)
            return "model"
        except ValueError:
            if mode == "model":
                raise UsageError("TRL cannot parse this model's tool calls (no response template for its chat "
                                 "template) (--chat-template model): use --chat-template tools.") from None
    elif mode == "model" and not ours:
        raise UsageError("This model's chat template cannot render tool calls (--chat-template model): use "
                         "--chat-template tools.")
    missing = [t for t in (TURN_START, TURN_END) if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise UsageError(f"The tool chat template needs the tokens {' and '.join(missing)} in the model's "
                         "vocabulary (ChatML models such as SmolLM2 or Qwen have them) (--chat-template tools).")
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    if tokenizer.eos_token != TURN_END:  # generation must stop at the end of the turn
        tokenizer.eos_token = TURN_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = TURN_END
    return "tools"


__all__ = ["CHAT_TEMPLATE_MODES", "TOOL_CHAT_TEMPLATE", "TOOL_RESPONSE_TEMPLATE", "install"]
