"""The workspace: one directory shared by every stage.

```
<workspace>/
  runs/<run>/manifest.json     resolved config, versions, model ids, times, status, token usage
  runs/<run>/trials.jsonl      one Trial per line, append-only
  checkpoints/<stage>/<name>/  trained models (CKPT_DIR overrides the checkpoints root)
  datasets/                    rating, SFT, preference and prompt sets
  reports/                     eval tables (JSON) and plots (PNG)
  cache/models/                dequantized embedded model and other converted weights
  cache/indexes/               search indexes
```
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retroformer_cli.errors import UsageError
from retroformer_cli.store import write_json_atomic

DEFAULT_WORKSPACE = "retroformer-workspace"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # names of runs, datasets and checkpoints


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """The git revision of the installed source tree, if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class Workspace:
    root: Path

    @classmethod
    def open(cls, path: str | Path | None = None) -> "Workspace":
        root = Path(path or os.environ.get("RETROFORMER_WORKSPACE") or DEFAULT_WORKSPACE)
        if root.exists() and not root.is_dir():
            raise UsageError(f"Workspace '{root}' exists and is not a directory (--workspace).")
        return cls(root)

    # --- canonical paths -------------------------------------------------------------------------
    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_dir(self, run: str) -> Path:
        if not NAME_RE.match(run):
            raise UsageError(f"Run name '{run}' is not allowed (--run): use letters, digits, '.', '_' or '-'.")
        return self.runs_dir / run

    def trials_path(self, run: str) -> Path:
        return self.run_dir(run) / "trials.jsonl"

    def manifest_path(self, run: str) -> Path:
        return self.run_dir(run) / "manifest.json"

    @property
    def checkpoints_dir(self) -> Path:
        env = os.environ.get("CKPT_DIR")
        return Path(env) if env else self.root / "checkpoints"

    def checkpoint_dir(self, stage: str, name: str) -> Path:
        return self.checkpoints_dir / stage / name

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    # --- runs ------------------------------------------------------------------------------------
    def new_run_name(self, env: str) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        name = f"{env}-{stamp}"
        i = 2
        while (self.runs_dir / name).exists():
            name = f"{env}-{stamp}-{i}"
            i += 1
        return name

    def read_manifest(self, run: str) -> dict[str, Any]:
        p = self.manifest_path(run)
        if not p.is_file():
            known = ", ".join(self.list_run_names()) or "none"
            raise UsageError(f"Run '{run}' not found in workspace '{self.root}' (known runs: {known}).")
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise UsageError(f"Run manifest '{p}' is not valid JSON.") from None

    def write_manifest(self, run: str, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path(run), manifest)

    def list_run_names(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir()
                      if not p.name.startswith(".") and (p / "manifest.json").is_file())

    def list_runs(self) -> list[dict[str, Any]]:
        """Summary of every run: name, env, status, trials written, times."""
        rows = []
        for name in self.list_run_names():
            m = self.read_manifest(name)
            tp = self.trials_path(name)
            n = 0
            if tp.is_file():
                with tp.open("rb") as f:
                    n = sum(1 for line in f if line.endswith(b"\n") and line.strip())
            rows.append({
                "run": name, "env": m.get("env"), "status": m.get("status"), "trials_written": n,
                "actor": ((m.get("models") or {}).get("actor") or {}).get("model_id"),
                "reflector": ((m.get("models") or {}).get("reflector") or {}).get("model_id"),
                "started_at": m.get("started_at"), "finished_at": m.get("finished_at"),
                "imported_from": (m.get("imported") or {}).get("format"),
                "diagnostic": m.get("diagnostic"),  # an oracle reflector: not a method, never training data
            })
        return rows
