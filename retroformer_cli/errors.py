"""One error tree. Every error a user can cause is a RetroformerError subclass whose message is a
full sentence naming the option or file involved; the CLI turns it into one red line + exit code."""

from __future__ import annotations


class RetroformerError(Exception):
    """Base class. ``exit_code`` 2 = usage/config, 1 = runtime."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(RetroformerError):
    """A bad flag, an unknown name, an invalid value."""

    exit_code = 2


class ConfigError(UsageError):
    """A malformed or inconsistent configuration file."""


class DataError(RetroformerError):
    """A missing data file or a record that does not parse."""

    exit_code = 2


class BackendError(RetroformerError):
    """An LLM backend failed for good (unreachable endpoint, retries exhausted, model not loadable)."""


class ContextTooLong(BackendError):
    """The prompt (plus the tokens asked for) does not fit the model's context: raised by every backend (the
    local engine, an OpenAI-compatible endpoint's "maximum context length" 400). Retrying the same prompt cannot
    help; the agents end the episode as truncated instead. The token counts are set when the backend knows them.
    """

    def __init__(self, message: str, hint: str | None = None, *, prompt_tokens: int | None = None,
                 context_length: int | None = None, max_tokens: int | None = None):
        super().__init__(message, hint)
        self.prompt_tokens, self.context_length, self.max_tokens = prompt_tokens, context_length, max_tokens


def did_you_mean(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    listing = ", ".join(sorted(choices))
    if close:
        return f"did you mean '{close[0]}'? Known: {listing}"
    return f"known: {listing}"
