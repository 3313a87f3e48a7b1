#!/usr/bin/env python3
"""Recipe: does training help? Tune the actor, train the reflector on the return difference, and compare it with
the frozen reflector on held-out tasks, with paired 95% intervals, a learning curve and one HTML report.

    python recipes/learning.py --config configs/learning.yaml --workspace retroformer-workspace
    python recipes/learning.py --config configs/learning.yaml --set ppo_steps=30 --set name=learning-30

Every stage is skipped when its output exists, so the same command resumes a stopped experiment (change
``name`` for a fresh one). Every key is a field of ``retroformer_cli.stages.learning.LearningConfig``. Progress
goes to stderr; the summary is printed as JSON on stdout (last line) and written to
``<workspace>/reports/<name>/summary.json`` beside ``learning.html``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import retroformer_cli  # noqa: F401
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retroformer_cli.config import build_config, load_yaml
from retroformer_cli.errors import RetroformerError
from retroformer_cli.stages.learning import LearningConfig, run
from retroformer_cli.workspace import Workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML file of LearningConfig fields (e.g. configs/learning.yaml)")
    parser.add_argument("--workspace", type=Path, default=Path("retroformer-workspace"), help="workspace folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field (YAML value syntax), repeatable")
    args = parser.parse_args(argv)
    try:
        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"error: --set {item!r} must be KEY=VALUE")
            import yaml

            overrides[key.strip()] = yaml.safe_load(value)
        if args.config:
            load_yaml(args.config)  # one clear error for a missing or malformed file
        cfg = build_config(LearningConfig, args.config, overrides)
        from retroformer_cli import console

        summary = run(cfg, Workspace.open(args.workspace), progress=console.RichProgress())
    except RetroformerError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
