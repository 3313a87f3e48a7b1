"""Backend registry: how a model spec (``--actor``/``--reflector``) becomes an LLM client.

A :class:`BackendSpec` is one way to read a model spec. Specs written ``SCHEME:REST`` go to the backend that
declares that ``scheme``; any other text is offered to the scheme-less backends in ``order`` and the first whose
``resolve`` returns a target wins. ``resolve`` and ``client`` are ``"module:function"`` strings, imported only
when used, so registering a backend imports nothing:

* ``resolve(text, cfg, workspace, option) -> target | None``: ``text`` is REST for a scheme, else the whole spec;
  None means "not mine" (scheme-less backends only); raise :class:`UsageError` for a spec that is yours but wrong.
* ``client(target, cfg, workspace, option) -> LLMClient | None``.

Built-ins are listed in :data:`BUILTIN`; third-party packages add theirs through the ``retroformer.backends``
entry point group (:mod:`retroformer_cli.plugins`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retroformer_cli.errors import UsageError
from retroformer_cli.plugins import BACKEND_GROUP, Registry, load_ref

if TYPE_CHECKING:
    from retroformer_cli.config import ModelConfig
    from retroformer_cli.llm.base import LLMClient
    from retroformer_cli.workspace import Workspace

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_HERE = "retroformer_cli.llm.registry"


@dataclass(frozen=True)
class BackendSpec:
    """One way to read a model spec, and the client family it builds."""

    name: str = field(metadata={"help": "registry name, e.g. 'openai' or 'workspace'"})
    backend: str = field(metadata={"help": "client family reported by resolve_backend: 'hf' (in process), 'openai', "
                                           "'none' or a plugin's own"})
    resolve: str = field(metadata={"help": "'module:function' (text, cfg, workspace, option) -> target or None"})
    client: str = field(metadata={"help": "'module:function' (target, cfg, workspace, option) -> LLMClient or None"})
    scheme: str | None = field(default=None, metadata={"help": "prefix this backend owns: 'openai' for 'openai:NAME'"})
    order: int = field(default=100, metadata={"help": "scheme-less backends are tried in this order (lowest first)"})
    in_process: bool = field(default=False, metadata={
        "help": "weights load in this process: actor and reflector with the same target share one copy"})
    usage: str = field(default="", metadata={"help": "the spec as a user writes it, for help and errors"})

    def __post_init__(self) -> None:
        problems = [f"{label} {ref!r} must be a 'module:function' string"
                    for label, ref in (("resolve", self.resolve), ("client", self.client))
                    if not isinstance(ref, str) or not _REF.match(ref)]
        if not self.name or not re.match(r"^[a-z][\w-]*$", self.name):
            problems.append(f"name {self.name!r} must be lower case")
        if self.scheme is not None and not re.match(r"^[a-z][\w-]+$", self.scheme):
            problems.append(f"scheme {self.scheme!r} must be lower case, two characters or more")
        if problems:
            raise ValueError(f"Invalid BackendSpec {self.name!r}: " + "; ".join(problems) + ".")


BUILTIN: tuple[BackendSpec, ...] = (
    BackendSpec("none", "none", f"{_HERE}:resolve_none", f"{_HERE}:no_client", order=0, usage="none"),
    BackendSpec("rule", "rule", f"{_HERE}:resolve_rule", f"{_HERE}:rule_client", order=6,
                usage="rule (reflector only: plans searches from the failed trial, no model)"),
    BackendSpec("oracle", "oracle", f"{_HERE}:resolve_oracle", f"{_HERE}:oracle_client", order=5,
                usage="oracle | oracle-leak (reflector only, diagnostics)"),
    BackendSpec("embedded", "hf", f"{_HERE}:resolve_embedded", f"{_HERE}:hf_client", order=10, in_process=True,
                usage="embedded"),
    BackendSpec("openai", "openai", f"{_HERE}:resolve_openai", f"{_HERE}:openai_client", scheme="openai",
                usage="openai:NAME"),
    BackendSpec("workspace", "hf", f"{_HERE}:resolve_workspace", f"{_HERE}:hf_client", scheme="workspace",
                in_process=True, usage="workspace:STAGE/NAME"),
    BackendSpec("hf", "hf", f"{_HERE}:resolve_hf", f"{_HERE}:hf_client", scheme="hf", in_process=True,
                usage="hf:PATH"),
    BackendSpec("folder", "hf", f"{_HERE}:resolve_folder", f"{_HERE}:hf_client", order=50, in_process=True,
                usage="PATH"),
    BackendSpec("endpoint", "openai", f"{_HERE}:resolve_endpoint", f"{_HERE}:openai_client", order=90,
                usage="NAME with a base URL"),
)

REGISTRY = Registry(BACKEND_GROUP, BackendSpec, lambda: list(BUILTIN),
                    lambda spec: (spec.name, *((f"{spec.scheme}:",) if spec.scheme else ())))


def register(spec: BackendSpec, replace: bool = False) -> None:
    """Add a backend at run time (plugins use the ``retroformer.backends`` entry point group instead)."""
    REGISTRY.register(spec, replace=replace)


def backends() -> list[BackendSpec]:
    return sorted(REGISTRY.specs().values(), key=lambda s: (s.scheme is not None, s.order, s.name))


def find(text: str, cfg: "ModelConfig", workspace: "Workspace", option: str) -> tuple[BackendSpec, Any]:
    """The backend for a model spec and its resolved target; a UsageError when none takes it."""
    scheme, sep, rest = text.partition(":")
    spec = REGISTRY.lookup(f"{scheme.lower()}:") if sep else None
    if spec is not None:
        return spec, load_ref(spec.resolve, f"resolver of the {spec.name} backend")(rest, cfg, workspace, option)
    for spec in backends():
        if spec.scheme is None:
            target = load_ref(spec.resolve, f"resolver of the {spec.name} backend")(text, cfg, workspace, option)
            if target is not None:
                return spec, target
    note = ""
    if REGISTRY.broken:
        note = " Backend plugins that failed to load: " + ", ".join(
            f"{k} ({v})" for k, v in sorted(REGISTRY.broken.items())) + "."
    raise UsageError(
        f"Model '{text}' ({option}) is neither 'embedded', 'none', a local folder nor an endpoint model.{note}",
        hint=f"for an OpenAI-compatible endpoint use {option} openai:{text} (and {option}-base-url or OPENAI_BASE_URL)",
    )


def build(spec: BackendSpec, target: Any, cfg: "ModelConfig", workspace: "Workspace",
          option: str) -> "LLMClient | None":
    return load_ref(spec.client, f"client factory of the {spec.name} backend")(target, cfg, workspace, option)


# ---- the built-in resolvers and client factories ------------------------------------------------------------
def resolve_none(text: str, cfg: Any, workspace: Any, option: str) -> str | None:
    return "" if text.lower() in ("none", "") else None


def resolve_oracle(text: str, cfg: Any, workspace: Any, option: str) -> str | None:
    """``oracle`` / ``oracle-leak``: the diagnostic reflectors (:mod:`retroformer_cli.agents.oracle`)."""
    from retroformer_cli.agents.oracle import ORACLE_SPECS

    name = text.lower()
    if name not in ORACLE_SPECS:
        return None
    if option != "--reflector":
        raise UsageError(f"'{text}' ({option}) is a diagnostic reflector that writes from the gold data; "
                         "it can only be the reflector (--reflector).")
    return name


def resolve_rule(text: str, cfg: Any, workspace: Any, option: str) -> str | None:
    """``rule``: the model-free reflector of :mod:`retroformer_cli.agents.rule_reflector`."""
    if text.lower() != "rule":
        return None
    if option != "--reflector":
        raise UsageError(f"'{text}' ({option}) is a model-free reflector; it can only be the reflector (--reflector).")
    return "rule"


def rule_client(target: str, cfg: Any, workspace: Any, option: str) -> "LLMClient":
    from retroformer_cli.agents.rule_reflector import RuleReflector

    return RuleReflector()  # type: ignore[return-value]


def oracle_client(target: str, cfg: Any, workspace: Any, option: str) -> "LLMClient":
    from retroformer_cli.agents.oracle import OracleReflector

    return OracleReflector(leak=target == "oracle-leak")  # type: ignore[return-value]


def resolve_embedded(text: str, cfg: Any, workspace: Any, option: str) -> str | None:
    return "embedded" if text == "embedded" else None


def resolve_openai(text: str, cfg: Any, workspace: Any, option: str) -> str:
    if not text:
        raise UsageError(f"{option} openai: needs a model name (openai:NAME) or OPENAI_MODEL in the environment.")
    return text


def resolve_workspace(text: str, cfg: Any, workspace: "Workspace", option: str) -> str:
    rel = text.strip("/")
    path = workspace.checkpoints_dir / rel
    if not path.is_dir():
        raise UsageError(f"Checkpoint '{rel}' not found under '{workspace.checkpoints_dir}' ({option}).")
    return str(path)


def resolve_hf(text: str, cfg: Any, workspace: Any, option: str) -> str:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UsageError(f"Local model folder '{path}' does not exist ({option}).")
    return str(path)


def resolve_folder(text: str, cfg: Any, workspace: Any, option: str) -> str | None:
    return str(Path(text).expanduser()) if Path(text).expanduser().is_dir() else None


def resolve_endpoint(text: str, cfg: "ModelConfig", workspace: Any, option: str) -> str | None:
    return text if cfg.base_url else None


def no_client(target: Any, cfg: Any, workspace: Any, option: str) -> None:
    return None


def openai_client(target: str, cfg: "ModelConfig", workspace: Any, option: str) -> "LLMClient":
    from retroformer_cli.llm.openai_compat import OpenAICompatClient
    from retroformer_cli.llm.round_robin import RoundRobinClient, split_urls

    urls = split_urls(cfg.base_url) or [None]
    clients = [OpenAICompatClient(
        model=target, base_url=url, api_key=cfg.api_key, api=cfg.api,
        max_concurrency=cfg.concurrency or 16, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
        option_name=option,
    ) for url in urls]
    return clients[0] if len(clients) == 1 else RoundRobinClient(clients)  # URL1,URL2,...: used in turn


def hf_client(target: str, cfg: "ModelConfig", workspace: "Workspace", option: str) -> "LLMClient":
    from retroformer_cli.llm.engine.model import check_device
    from retroformer_cli.llm.hf_local import HFLocalClient

    check_device(cfg.device)  # now, not when the model first loads (mid-run)
    return HFLocalClient(model=target, cache_dir=workspace.cache_dir, device=cfg.device, threads=cfg.threads,
                         max_batch_size=cfg.max_batch_size, dtype=cfg.dtype, prefix_reuse=cfg.prefix_reuse,
                         prefix_cache_mb=cfg.prefix_cache_mb, weights=cfg.weights)
