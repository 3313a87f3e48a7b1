"""What the training stages share: base-model resolution, threads, LoRA settings, atomic checkpoint folders and
their manifest, ``--report-to`` and the per-step ``metrics.jsonl``, quiet transformers. Progress, names, results
and checkpoint lookup are in the sibling modules. Nothing heavy at import time."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from retroformer_cli import __version__
from retroformer_cli.config import setting
from retroformer_cli.errors import UsageError
from retroformer_cli.workspace import Workspace, now_iso

CHECKPOINT_MANIFEST = "retroformer_checkpoint.json"


@dataclass
class LoraSettings:
    r: int = setting(2, "LoRA rank")
    alpha: int = setting(16, "LoRA alpha")
    dropout: float = setting(0.05, "LoRA dropout")
    target_modules: list[str] = setting(help="module names that get an adapter, comma-separated", factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainerSettings:
    """What every trainer stage (sft, reward, ppo) takes besides its own settings."""

    threads: int | None = setting(None, "torch threads (default min(2, cores)); use 1 on a shared machine")
    seed: int = setting(0, "training seed")
    report_to: str = setting("none", "training logs to: none | tensorboard | wandb | trackio | mlflow (comma-separated; transformers' integrations)")


@dataclass
class FinetuneSettings(TrainerSettings):
    """What the two supervised stages (sft on reflections, reward on preference pairs) share."""

    dataset: str = setting("ratings", "dataset under <workspace>/datasets/")
    base: str = setting("embedded", "base model: embedded | a local transformers model folder")
    max_steps: int = setting(-1, "stop after N optimizer steps (-1: use epochs)")
    epochs: float = setting(1.0, "epochs when max_steps is -1")
    batch_size: int = setting(4, "per-device batch size")
    grad_accum: int = setting(1, "gradient accumulation steps")
    save_steps: int = setting(50, "trainer checkpoint every N steps (for --resume)")
    logging_steps: int = 1
    gradient_checkpointing: bool = False


def set_threads(threads: int | None) -> int:
    import torch

    n = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def resolve_base(spec: str, workspace: Workspace) -> tuple[str, Path]:
    """(label written as the adapter's base_model_name_or_path, local folder of the base model).

    ``embedded`` stays ``embedded`` (the local backend resolves it); a folder is recorded as given."""
    from retroformer_cli.llm.model_cache import EMBEDDED, is_adapter_dir, resolve_local_model

    path = resolve_local_model(spec, workspace.cache_dir)
    if is_adapter_dir(path):
        raise UsageError(f"--base '{spec}' is a LoRA adapter; pass a full model folder or 'embedded'.")
    return (EMBEDDED if spec == EMBEDDED else str(spec)), path


def lora_config(s: LoraSettings, task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                      task_type=task_type, bias="none")


def work_dir(workspace: Workspace, stage: str, name: str) -> Path:
    """The trainer's output_dir (intermediate checkpoint-N folders for --resume), beside the final one."""
    return workspace.checkpoint_dir(stage, f".work-{name}")


def save_checkpoint(dest: Path, write: Callable[[Path], None], manifest: dict[str, Any]) -> None:
    """Write a checkpoint folder atomically (model files from ``write`` plus the manifest)."""
    from retroformer_cli.store import write_dir_atomic

    def fill(tmp: Path) -> None:
        write(tmp)
        (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n",
                                               encoding="utf-8")

    write_dir_atomic(dest, fill)


def fix_adapter_base(folder: Path, base_label: str) -> None:
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_label
    p.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def checkpoint_manifest(stage: str, base: str, dataset: str, config: dict[str, Any], metrics: dict[str, Any],
                        **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "base": base, "dataset": dataset, "config": config, "metrics": metrics,
            "created_at": now_iso(), "retroformer_version": __version__, **extra}


def read_checkpoint_manifest(folder: Path) -> dict[str, Any]:
    p = Path(folder) / CHECKPOINT_MANIFEST
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [h["loss"] for h in log_history if "loss" in h]
    evals = [h["eval_loss"] for h in log_history if "eval_loss" in h]
    return {"train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "eval_loss": evals[-1] if evals else None}


def precision_kwargs() -> dict[str, Any]:
    """bf16 on a GPU that has it, fp32 on CPU (TRL's configs default to bf16, which CPUs reject)."""
    import torch

    cuda = torch.cuda.is_available()
    return {"bf16": bool(cuda and torch.cuda.is_bf16_supported()), "use_cpu": not cuda}


# --report-to: transformers' integrations we offer, and the package each needs (module to find, pip name).
REPORT_TO: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
    "mlflow": (("mlflow",), "mlflow"),
}
METRICS_FILE = "metrics.jsonl"


def report_to_list(value: str | list[str] | None) -> list[str]:
    """``--report-to`` as the list transformers takes (``[]`` for none); unknown names and integrations whose
    package is missing raise a one-line :class:`UsageError` (call it before the model loads)."""
    import importlib.util

    items = value if isinstance(value, (list, tuple)) else str(value or "none").split(",")
    names = [n for n in (str(x).strip().lower() for x in items) if n and n != "none"]
    if not names:
        return []
    allowed = ("none", *REPORT_TO)
    bad = [n for n in names if n not in REPORT_TO]
    if bad:
        raise UsageError(f"Unknown --report-to '{bad[0]}': choose from {', '.join(allowed)} (comma-separated).")
    for n in names:
        modules, pip_name = REPORT_TO[n]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise UsageError(f"--report-to {n} needs the '{pip_name}' package: pip install {pip_name}")
    return list(dict.fromkeys(names))


def report_kwargs(report_to: str | list[str] | None, stage: str, name: str) -> dict[str, Any]:
    """``report_to`` and ``run_name`` for a transformers/TRL config. transformers 5 has no ``logging_dir``: its
    TensorBoard callback writes under ``<output_dir>/runs/``, i.e. the trainer's work folder in the workspace."""
    return {"report_to": report_to_list(report_to), "run_name": f"{stage}-{name}"}


def step_metrics(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``{"step": N, ...scalars...}`` row per logged trainer step, from ``trainer.state.log_history``: rows of
    the same step (a training log and an evaluation) are merged; the end-of-training summary (``train_runtime``
    ...) is left out (the checkpoint manifest has it); non-finite numbers become null."""
    import math

    rows: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "train_runtime" in entry or "step" not in entry:
            continue
        step = int(entry["step"])
        row = rows.setdefault(step, {"step": step})
        for k, v in entry.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            row[k] = v if math.isfinite(v) else None
    return [rows[s] for s in sorted(rows)]


def write_metrics_jsonl(folder: Path, log_history: list[dict[str, Any]]) -> int:
    """Write ``metrics.jsonl`` (see :func:`step_metrics`) into a checkpoint folder; returns the number of lines."""
    rows = step_metrics(log_history)
    with open(Path(folder) / METRICS_FILE, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    return len(rows)


def quiet_transformers(seed: int | None = None) -> None:
    """Our progress replaces transformers' load reports and bars; stdout stays free for --json."""
    from transformers import logging as tlog
    from transformers import set_seed

    tlog.set_verbosity_error()
    import warnings

    # transformers 5 / TRL 1.16 deprecation notices about arguments we pass on purpose (keep_end truncation keeps
    # the reflection when a trajectory is too long) are noise for users.
    warnings.filterwarnings("ignore", message=".*deprecated.*", category=FutureWarning)
    tlog.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if seed is not None:
        set_seed(seed)


def drop_stdout_printer(trainer: Any) -> None:
    """With tqdm off, transformers adds a PrinterCallback that prints every log dict to stdout."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)


def begin(cfg: Any) -> None:
    """What every trainer stage does before it loads a model: offline hub, a valid ``--name``, a valid
    ``--report-to`` (so a typo fails before the model loads), torch threads, quiet and seeded transformers."""
    from retroformer_cli.llm.model_cache import set_offline
    from retroformer_cli.stages.common.names import check_name

    set_offline()
    check_name(cfg.name)
    report_to_list(cfg.report_to)
    set_threads(cfg.threads)
    quiet_transformers(cfg.seed)


@contextmanager
def stop_on_signals(trainer: Any) -> Iterator[None]:
    """While training, SIGTERM stops like Ctrl-C (a ``KeyboardInterrupt`` in the main thread, which also ends a
    wait on a reward function), but never in the middle of a trainer checkpoint: a signal then takes effect as soon
    as the checkpoint is complete, so the newest one stays resumable. Outside the main thread nothing changes."""
    import signal
    import threading

    from transformers import TrainerCallback

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {"saving": False, "pending": False}

    def on_signal(signum: int, frame: Any) -> None:
        if held["saving"]:
            held["pending"] = True
            return
        raise KeyboardInterrupt

    class HoldDuringSave(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001 - after the default flow decided
            if held["pending"]:
                raise KeyboardInterrupt
            held["saving"] = bool(control.should_save)

        def on_save(self, args, state, control, **kw):  # noqa: ANN001
            held["saving"] = False
            if held["pending"]:
                raise KeyboardInterrupt

    hold = HoldDuringSave()
    trainer.add_callback(hold)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.remove_callback(hold)


def train(trainer: Any, resume_from: Path | None) -> dict[str, Any]:
    """Run ``trainer`` (from ``resume_from`` when given) and return the metrics every stage reports."""
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return {"global_step": trainer.state.global_step, "train_loss": out.training_loss,
            "train_runtime_s": out.metrics.get("train_runtime"), **loss_history(trainer.state.log_history)}


def save_adapter(workspace: Workspace, stage: str, cfg: Any, trainer: Any, tok: Any, base_label: str,
                 metrics: dict[str, Any], resume_from: Path | None,
                 also_write: Callable[[Path], None] | None = None, **manifest_extra: Any) -> Path:
    """Write the trained adapter, its tokenizer, ``metrics.jsonl`` and the manifest to
    ``<checkpoints>/<stage>/<name>/`` atomically; ``also_write(tmp)`` adds files to the same folder."""
    from retroformer_cli.config import to_dict

    peft_model = trainer.model

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        fix_adapter_base(tmp, base_label)
        tok.save_pretrained(str(tmp))
        write_metrics_jsonl(tmp, trainer.state.log_history)
        if also_write is not None:
            also_write(tmp)

    dest = workspace.checkpoint_dir(stage, cfg.name)
    manifest = checkpoint_manifest(stage, base_label, cfg.dataset, to_dict(cfg), metrics,
                                   resumed_from=resume_from.name if resume_from else None, **manifest_extra)
    save_checkpoint(dest, write, manifest)
    return dest
