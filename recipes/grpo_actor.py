#!/usr/bin/env python3
"""Recipe: train the actor on an env with TRL's GRPOTrainer and tool calls (``environment_factory``).

    python recipes/grpo_actor.py --env hotpotqa --max-steps 10 --workspace retroformer-workspace
    python recipes/grpo_actor.py --env webshop --data path/to/webshop --model path/to/model --reward em
    python recipes/grpo_actor.py --env alfworld --data path/to/alfworld --env-option wording=react

Each rollout is one episode: the model calls the env's tools (HotPotQA search/lookup/finish, WebShop
search/click, ALFWorld act) and the reward is the episode return. The LoRA adapter is written to
``<workspace>/checkpoints/actor-grpo/<name>``; the result is printed as JSON on stdout. Every option is a field
of ``retroformer_cli.stages.actor_grpo.ActorGRPOConfig``; see ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

try:
    import retroformer_cli  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retroformer_cli.errors import RetroformerError, UsageError
from retroformer_cli.stages.actor_grpo import ActorGRPOConfig, run
from retroformer_cli.workspace import Workspace

_SCALARS = {"int": int, "float": float, "str": str}


def _scalar_type(annotation: str) -> tuple[type | None, bool]:
    """('int | None') -> (int, True); lists, dicts and dataclasses -> (None, ...)."""
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    names = [p for p in parts if p != "None"]
    return (_SCALARS.get(names[0]) if len(names) == 1 else None), optional


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_Help)
    ap.add_argument("--workspace", default=None, help="workspace folder [default: $RETROFORMER_WORKSPACE or ./retroformer-workspace]")
    for f in dataclasses.fields(ActorGRPOConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind, _ = _scalar_type(annotation)
        if annotation == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif kind is not None:
            ap.add_argument(flag, type=kind, default=f.default, help=help_text)
    ap.add_argument("--task-ids", default=None, help="comma-separated task ids (exactly these tasks)")
    ap.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra env constructor argument (repeatable); VALUE is JSON when it parses, else text")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank [default: 2]")
    return ap


def config_from(args: argparse.Namespace) -> ActorGRPOConfig:
    cfg = ActorGRPOConfig()
    for f in dataclasses.fields(cfg):
        if f.name in vars(args) and f.name not in ("task_ids",):
            setattr(cfg, f.name, getattr(args, f.name))
    if args.task_ids:
        cfg.task_ids = [t.strip() for t in args.task_ids.split(",") if t.strip()]
    for item in args.env_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--env-option '{item}' is not KEY=VALUE.")
        try:
            cfg.env_options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            cfg.env_options[key.strip()] = value
    if args.lora_r is not None:
        cfg.lora.r = args.lora_r
    return cfg


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result = run(config_from(args), Workspace.open(args.workspace))
    except RetroformerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"Hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    out = result.to_json()
    out.pop("log_history", None)  # it is in the checkpoint's manifest
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
