"""Finding checkpoints: a stage's final checkpoint by name or folder, and the newest trainer checkpoint to resume."""

from __future__ import annotations

from pathlib import Path

from retroformer_cli.errors import UsageError
from retroformer_cli.workspace import Workspace


def resolve_checkpoint(workspace: Workspace, stage: str, spec: str, option: str = "--checkpoint") -> Path:
    """The checkpoint folder that ``spec`` names, for every stage and option, in this order:

    1. a NAME (the run-name rule) with a folder ``<checkpoints>/<stage>/<NAME>/``: that folder;
    2. else an existing folder path (``~`` expanded): that folder;
    3. else a :class:`UsageError` that lists the known names.

    The workspace name wins, so ``--sft default`` means ``checkpoints/sft/default`` even when the current
    directory has a ``default/`` folder; pass ``./default`` for that one.
    """
    from retroformer_cli.stages.common.names import is_name

    if is_name(spec):
        named = workspace.checkpoint_dir(stage, spec)
        if named.is_dir():
            return named
    folder = Path(spec).expanduser() if spec else None
    if folder is not None and folder.is_dir():
        return folder
    root = workspace.checkpoints_dir / stage
    known = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []
    raise UsageError(f"{stage} checkpoint '{spec}' not found in {root} ({option}); known: {', '.join(known) or 'none'}.",
                     hint=f"train one with `retroformer {stage}`, or pass a checkpoint folder")


def latest_trainer_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` under a trainer's output_dir (``trainer_state.json`` written, which
    the HF Trainer does last), or None."""
    trainer_dir = Path(trainer_dir)
    if not trainer_dir.is_dir():
        return None
    done = []
    for d in trainer_dir.iterdir():
        step = d.name[len("checkpoint-"):]
        if d.is_dir() and d.name.startswith("checkpoint-") and step.isdigit() and (d / "trainer_state.json").is_file():
            done.append((int(step), d))
    return max(done)[1] if done else None


def resume_checkpoint(trainer_dir: Path, stage: str, name: str) -> Path:
    """The newest complete trainer checkpoint to resume ``stage`` ``name`` from; a clear error when there is none."""
    found = latest_trainer_checkpoint(trainer_dir)
    if found is None:
        raise UsageError(f"Nothing to resume for {stage} '{name}': no trainer checkpoint in {trainer_dir} (--resume).",
                         hint="lower --save-steps, or start without --resume")
    return found
