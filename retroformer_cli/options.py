"""Typer options derived from the config dataclasses: a flag's type, help text and default come from one place,
the config field (``field(metadata={"help": ...})``), as TRL's ``TrlParser`` derives its flags from dataclasses.

A command names the fields it exposes as :class:`Flag` groups and :func:`config_options` adds one Typer option per
flag; the command then receives what the user actually typed as dotted config overrides
(``{"actor.model": "openai:x", "lora.r": 8}``) for ``config.build_config``: defaults < ``--config`` YAML < flags.
There is no name map to keep in step: the flag knows its field.

Imports nothing heavy; the stage config classes are imported by the command modules, which the root loads lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional, Sequence

import typer


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line option for one config field (``path``, dotted for nested configs: ``actor.model``)."""

    path: str
    aliases: tuple[str, ...] = ()  # more names for the option: "-e", "--lr"
    name: str | None = None  # the long flag when not "--" + the path with dashes ("lora.r" -> "--lora-r")
    also: tuple[str, ...] = ()  # more fields set to the same value (one engine serves actor and reflector)
    label: str | None = None  # help prefix for a nested field: "actor" -> "Actor: ..."
    help_from: str | None = None  # the field whose help describes this flag best (default: ``path``)
    cli_type: Any = None  # the option's type when not the field's (Path for a path kept as str, str for a list)
    parse: Callable[[Any], Any] | None = None  # option value -> config value (may raise UsageError)
    metavar: str | None = None  # what --help shows for the value (default: the type; "<str>..." when repeatable)

    @property
    def long(self) -> str:
        return self.name or "--" + self.path.replace(".", "-").replace("_", "-")

    @property
    def param(self) -> str:
        return self.long.lstrip("-").replace("-", "_")


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def resolve_field(cls: type, path: str) -> tuple[dataclasses.Field, Any, Any]:
    """The dataclass field at ``path``, its resolved type and its default (read from ``cls()``, so nested
    defaults such as the reflector's own ``max_tokens`` are the real ones)."""
    owner, value, found = cls, cls(), None
    for part in path.split("."):
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        if part not in fields:
            raise TypeError(f"{cls.__name__} has no config field '{path}'")
        found, hint, value = fields[part], _hints(owner)[part], getattr(value, part)
        owner = type(value)
    return found, hint, value


def _option_type(hint: Any) -> Any:
    """``int | None`` -> int, ``list[str]`` -> List[str] (a repeatable option); other types as they are."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            hint = args[0]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        return List[item]  # noqa: UP006 (Typer reads typing.List on every supported Python)
    if hint is dict or typing.get_origin(hint) is dict:
        raise TypeError("a dict field needs Flag(cli_type=..., parse=...)")
    return hint


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _sentence(text: str) -> str:
    """Capitalise a help text unless it starts with a value list (``all | train | eval``) or a flag."""
    if "|" in text.split(":", 1)[0] or not text[:1].isalpha():
        return text
    return text[0].upper() + text[1:]


def help_text(flag: Flag, f: dataclasses.Field, default: Any, owner: str, repeatable: bool = False) -> str:
    """The field's metadata help as an option help: a sentence, the default appended unless it names one."""
    text = str(f.metadata.get("help") or "").strip().rstrip(".")
    if not text:
        raise TypeError(f"{owner}.{flag.help_from or flag.path} has no metadata help; its option would have none")
    text = f"{flag.label[0].upper()}{flag.label[1:]}: {text}" if flag.label else _sentence(text)
    if repeatable and "repeat" not in text:
        text += " (repeatable)"
    if default not in (None, [], {}, "") and "default" not in text.lower():
        text += f" [default: {_show(default)}]"
    return text + "."


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _parameter(cls: type, flag: Flag) -> inspect.Parameter:
    f, hint, default = resolve_field(cls, flag.path)
    for extra in flag.also:
        resolve_field(cls, extra)
    if flag.help_from:
        f = resolve_field(cls, flag.help_from)[0]
    kind = flag.cli_type or _option_type(hint)
    decls = (f"{flag.long}/--no-{flag.long[2:]}",) if kind is bool else (flag.long, *flag.aliases)
    repeatable = typing.get_origin(kind) is list
    metavar = flag.metavar
    if metavar is None and repeatable:  # Typer would show "<list[str]>"
        metavar = f"<{getattr(typing.get_args(kind)[0], '__name__', 'str').lower()}>..."
    option = typer.Option(*decls, help=help_text(flag, f, default, cls.__name__, repeatable), show_default=False,
                          metavar=metavar)
    return inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def config_options(cls: type, *groups: Sequence[Flag]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one Typer option per flag of ``groups`` (fields of ``cls``) to the decorated command, which takes an
    ``overrides`` parameter instead: ``{field path: value}`` for the flags the user gave. The options appear in
    ``--help`` where ``overrides`` stands in the command's signature."""
    flags = [flag for group in groups for flag in group]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        if "overrides" not in sig.parameters:
            raise TypeError(f"{fn.__name__} needs an 'overrides' parameter to receive its config flags")
        derived = [_parameter(cls, flag) for flag in flags]
        params: list[inspect.Parameter] = []
        for p in sig.parameters.values():  # Typer passes every parameter by keyword
            params += derived if p.name == "overrides" else [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)]
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise TypeError(f"{fn.__name__}: two options share a parameter name in {names}")

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given: dict[str, Any] = {}
            for flag in flags:
                value = kwargs.pop(flag.param, None)
                if value is None or (isinstance(value, (list, tuple)) and not value):
                    continue
                value = flag.parse(value) if flag.parse else _plain(value)
                for path in (flag.path, *flag.also):
                    given[path] = value
            return fn(*args, overrides=given, **kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.config_flags = (cls, tuple(flags))  # type: ignore[attr-defined]
        return command

    return decorate
