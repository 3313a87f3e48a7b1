"""What an environment declares about itself, read by ``collect``, the actor, ``eval`` and the Gymnasium bridge.

An :class:`EnvSpec` is a frozen dataclass of strings, numbers and flags: declaring one imports nothing but this
module. The env class (``entry_point``) and its prompt set (``prompts``) are ``"module:attribute"`` strings
loaded only when an env is made or a run starts. So is ``oracle``, the gold hints of the diagnostic oracle
reflectors (``--reflector oracle`` / ``oracle-leak``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_VERSIONED_ID = re.compile(r"^[A-Za-z][\w.-]*-v\d+$")


@dataclass(frozen=True)
class EnvSpec:
    """One environment: how to build it, which prompts drive it and what it can do."""

    name: str = field(metadata={"help": "short lower-case name used by --env, e.g. 'hotpotqa'"})
    id: str = field(metadata={"help": "versioned id, e.g. 'HotPotQA-v0' (also an --env alias and the Gymnasium "
                                      "id 'retroformer/<id>')"})
    entry_point: str = field(metadata={"help": "'module:factory' building the env; called with data=, max_steps= "
                                               "and the options below"})
    prompts: str = field(metadata={"help": "'module:attribute' of the env's PromptSet (actor and reflection prompts)"})
    max_steps: int = field(default=10, metadata={"help": "the env's default per-episode step limit"})
    protocol_split: str = field(default="eval", metadata={
        "help": "split `retroformer eval --env` collects on: 'eval' (our deterministic split) or 'all' when the data "
                "folder already is the papers' evaluation set"})
    action_names: tuple[str, ...] = field(default=(), metadata={
        "help": "Name[arg] actions the actor may emit (lower case); () for free-text commands"})
    options: tuple[str, ...] = field(default=(), metadata={
        "help": "extra constructor keywords a user may set with --env-option KEY=VALUE"})
    cache_dir: bool = field(default=False, metadata={
        "help": "the factory takes cache_dir= (indexes built once, kept in the workspace cache)"})
    spawn: bool = field(default=False, metadata={
        "help": "instances offer spawn(): a twin over the same loaded data, one per concurrent episode"})
    asynchronous: bool = field(default=False, metadata={
        "help": "instances offer areset()/astep() coroutines (slow engines that must not block the event loop)"})
    aliases: tuple[str, ...] = field(default=(), metadata={"help": "more names accepted by --env"})
    description: str = field(default="", metadata={"help": "one line for listings"})
    oracle: str | None = field(default=None, metadata={
        "help": "'module:function' (env, task_id) -> (hint, leak): what a perfect reflector could write after a "
                "failed trial, from the task's gold data: a plan that does not give the answer away, and one that "
                "states it (the diagnostic reflectors 'oracle' and 'oracle-leak'); None: the env has no oracle"})

    def __post_init__(self) -> None:
        problems = []
        if not self.name or self.name != self.name.lower() or not self.name.replace("_", "").isalnum():
            problems.append(f"name {self.name!r} must be lower-case letters, digits or '_'")
        if not _VERSIONED_ID.match(self.id or ""):
            problems.append(f"id {self.id!r} must look like 'Name-v0'")
        refs = (("entry_point", self.entry_point), ("prompts", self.prompts))
        for label, ref in refs + ((("oracle", self.oracle),) if self.oracle is not None else ()):
            if not isinstance(ref, str) or not _REF.match(ref):
                problems.append(f"{label} {ref!r} must be a 'module:attribute' string")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            problems.append(f"max_steps {self.max_steps!r} must be a positive integer")
        if self.protocol_split not in ("all", "train", "eval"):
            problems.append(f"protocol_split {self.protocol_split!r} must be all, train or eval")
        if problems:
            raise ValueError(f"Invalid EnvSpec {self.name!r}: " + "; ".join(problems) + ".")
        object.__setattr__(self, "action_names", tuple(a.lower() for a in self.action_names))

    @property
    def gym_id(self) -> str:
        """The id under which :mod:`retroformer_cli.envs.gym` registers this env with Gymnasium."""
        return f"retroformer/{self.id}"

    def names(self) -> tuple[str, ...]:
        """Every name ``--env`` accepts for this env (lower case)."""
        return tuple(dict.fromkeys(n.lower() for n in (self.name, self.id, *self.aliases)))

