"""Dataclass configs: defaults < YAML ``--config`` < explicit CLI flags; then ``.env``/environment
variables fill what is still unset (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL, DATA_DIR, CKPT_DIR,
the names the original Retroformer scripts read).

Configs import nothing heavy; trainers and clients are built from them inside the stages.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from retroformer_cli.errors import ConfigError

ENV_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "DATA_DIR", "CKPT_DIR")



def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its help text (``--help``, YAML docs): ``setting(8001, "TCP port")``, or
    ``setting(help=..., factory=list)`` for a mutable default."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})

@dataclass
class ModelConfig:
    """One model endpoint, for the actor or the reflector."""

    model: str = setting("embedded", "embedded | none | openai:NAME | hf:PATH | PATH | workspace:STAGE/NAME")
    base_url: str | None = setting(None, "OpenAI-compatible base URL (env OPENAI_BASE_URL); URL1,URL2,... uses several replicas in turn")
    api_key: str | None = setting(None, "API key (env OPENAI_API_KEY); never written to disk")
    api: str = setting("chat", "chat | completions")
    # sampling, for every backend
    max_tokens: int = setting(96, "max new tokens per call (an actor step, a reflection)")
    temperature: float = setting(0.0, "sampling temperature (0: greedy)")
    top_p: float = setting(1.0, "nucleus sampling: keep the most likely tokens up to this mass")
    # endpoints (openai:)
    concurrency: int | None = setting(None, "requests in flight to an endpoint [default: collect's --concurrency]")
    timeout_s: float = setting(60.0, "seconds before a request to an endpoint times out")
    max_retries: int = setting(6, "retries of a failed request (backing off) before giving up")
    # local models (the engine)
    threads: int | None = setting(None, "torch threads for a local model (default: 1 on up to 2 cores, else cores - 1, at most 8)")
    max_batch_size: int = setting(8, "local models: sequences decoding together")
    device: str = setting("auto", "local models: auto (CUDA when present, else cpu) | cpu | cuda | cuda:N; the run manifest records the device and dtype used")
    dtype: str = setting("auto", "local models: auto (float32 on CPU, bf16/fp16 on GPU) | float32 | bfloat16 | float16")
    prefix_reuse: bool = setting(True, "local models: reuse the computed keys/values of a known prompt prefix")
    prefix_cache_mb: int = setting(512, "local models: memory bound of the prefix cache (LRU beyond it)")
    weights: str = setting("auto", "embedded model on CPU: fp32 (dequantized once) | gguf (computed from the shipped Q4_1/Q8_0 blocks by a C++ kernel built at first use) | hybrid (both resident: prompt rows on fp32, decode rows on the GGUF blocks) | auto (hybrid for the embedded model on CPU in float32, else fp32)")
    # what a token costs, for eval's estimate
    price_in_per_m: float | None = setting(None, "USD per million prompt tokens (eval's cost estimate)")
    price_out_per_m: float | None = setting(None, "USD per million completion tokens (eval's cost estimate)")


@dataclass
class EnvSelection:
    """Which env to build and how (what ``envs.make_for`` reads), for collect, eval and `env serve` alike."""

    env: str = setting("hotpotqa", "environment: hotpotqa | webshop | alfworld, or an installed plugin env")
    data: str | None = setting(None, "data file or folder in the env's real format; default: sample data (collect, eval: env DATA_DIR)")
    max_steps: int | None = setting(None, "per-episode step limit (env default when unset)")
    env_options: dict[str, Any] = setting(help="extra env argument KEY=VALUE, repeatable (YAML: a mapping), e.g. wording=react for ALFWorld", factory=dict)


@dataclass
class CollectConfig(EnvSelection):
    """`retroformer collect`: run the actor (and reflector) over tasks for several trials."""

    # which tasks, how many trials, what the actor sees
    split: str = setting("all", "all | train | eval (deterministic by task id)")
    tasks: int | None = setting(None, "first N tasks of the split")
    task_ids: list[str] | None = setting(None, "task ids to run: comma-separated, or @FILE with one id per line")
    trials: int = setting(3, "trials per task")
    memory_size: int = setting(3, "how many of the latest reflections go into the prompt")
    few_shot: bool = setting(True, "show the actor the prompt's few-shot examples; a fine-tuned actor (sft --role actor) needs none")
    # how the run is played
    concurrency: int = setting(8, "tasks run at once")
    workers: int | None = setting(None, "environment instances / worker processes (default: concurrency)")
    env_step_timeout_s: float = setting(120.0, "an env reset or step that takes longer is a hung env: an ALFWorld worker is replaced, an in-process env's instance retired; 0: no bound (in-process envs then step on the event loop)")
    env_retries: int = setting(2, "an episode whose env fails (crash, hang, exception) is replayed from reset this many times, then recorded as an env error")
    # the run and its models
    run: str | None = setting(None, "run name (default: ENV-TIMESTAMP)")
    seed: int = setting(0, "seed recorded in the manifest and passed to env.reset")
    actor: ModelConfig = setting(help="actor model: embedded | openai:NAME | hf:PATH | PATH | workspace:STAGE/NAME", factory=ModelConfig)
    reflector: ModelConfig = setting(
        help="reflector model (writes a reflection after a failed trial): none (ReAct) | embedded | openai:NAME | "
        "hf:PATH | PATH | workspace:STAGE/NAME", factory=lambda: ModelConfig(max_tokens=128))


def to_dict(cfg: Any, *, redact: bool = True) -> dict[str, Any]:
    """Config as plain data for manifests; secrets removed."""
    data = dataclasses.asdict(cfg)

    def scrub(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: ("***" if (k == "api_key" and v and redact) else scrub(v)) for k, v in d.items()}
        return d

    return scrub(data)


def _coerce(value: Any, ftype: Any, key: str) -> Any:
    """Coerce YAML/CLI values to the field's annotated type (annotations are strings here)."""
    t = str(ftype)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"Config key '{key}' cannot be null.")
    try:
        if t.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return [str(v).strip() for v in value]
        if t.startswith("int"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("dict"):
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
        if t.startswith("bool"):
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"Config key '{key}' expects {t}, got {value!r}.") from None
    return value


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], *, source: str = "config") -> Any:
    """Apply a nested or dotted mapping onto a dataclass, failing on unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            from retroformer_cli.errors import did_you_mean

            raise ConfigError(f"Unknown key '{key}' in {source}: {did_you_mean(head, list(fields))}.")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            if rest:
                apply_overrides(current, {rest: value}, source=source)
            elif isinstance(value, Mapping):
                apply_overrides(current, value, source=f"{source} [{head}]")
            else:
                raise ConfigError(f"Config key '{key}' in {source} must be a mapping of {head} settings.")
        else:
            setattr(cfg, head, _coerce(value, fields[head].type, key))
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file '{p}' does not exist (--config).")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"Config file '{p}' is not valid YAML{where}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{p}' must hold a mapping of settings, not {type(data).__name__}.")
    return data


def load_dotenv_file(path: str | Path = ".env") -> None:
    """Load ``.env`` from the current directory without overriding the real environment."""
    p = Path(path)
    if p.is_file():
        from dotenv import load_dotenv

        load_dotenv(p, override=False)


def fill_from_env(cfg: CollectConfig, environ: Mapping[str, str] | None = None) -> CollectConfig:
    """Fill unset values from the original Retroformer environment variables."""
    env = os.environ if environ is None else environ
    for m in (cfg.actor, cfg.reflector):
        if m.base_url is None and env.get("OPENAI_BASE_URL"):
            m.base_url = env["OPENAI_BASE_URL"]
        if m.api_key is None and env.get("OPENAI_API_KEY"):
            m.api_key = env["OPENAI_API_KEY"]
        if m.model in ("openai", "openai:") and env.get("OPENAI_MODEL"):
            m.model = "openai:" + env["OPENAI_MODEL"]
    if cfg.data is None and env.get("DATA_DIR"):
        root = Path(env["DATA_DIR"])
        cfg.data = str(root / cfg.env) if (root / cfg.env).exists() else str(root)
    return cfg


def build_config(cls: type, yaml_path: str | Path | None, overrides: Mapping[str, Any] | None = None,
                 base: Mapping[str, Any] | None = None) -> Any:
    """defaults < base (e.g. a resumed run's stored config) < YAML < overrides (explicit flags)."""
    cfg = cls()
    if base:
        apply_overrides(cfg, base, source="stored run config")
    if yaml_path:
        apply_overrides(cfg, load_yaml(yaml_path), source=f"config file '{yaml_path}'")
    if overrides:
        apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}, source="command-line flags")
    return cfg
