"""`retroformer sft`: supervised fine-tuning of the reflector on reflections that were followed by an
improvement, with TRL's ``SFTTrainer`` and a PEFT LoRA adapter; the loss is on the completion only.

Checkpoint ``<checkpoints>/sft/<name>/``: the LoRA adapter (``base_model_name_or_path`` = ``embedded`` on the
embedded base, else the base folder as given), tokenizer files and ``retroformer_checkpoint.json``; with
``merge`` also ``merged/`` (a full transformers model). Trainer checkpoints for ``--resume`` live in
``<checkpoints>/sft/.work-<name>/``.

>>> from retroformer_cli.stages import sft  # doctest: +SKIP
>>> sft.run(sft.SFTStageConfig(dataset="ratings", max_steps=10), Workspace.open("ws"))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retroformer_cli.config import setting
from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.stages.common.progress import NullProgress, Progress, trainer_callback
from retroformer_cli.stages.common.results import TrainResult
from retroformer_cli.stages.common.training import FinetuneSettings, LoraSettings
from retroformer_cli.workspace import Workspace


@dataclass
class SFTStageConfig(FinetuneSettings):
    """`retroformer sft`: LoRA SFT of the reflector on improving reflections (completion-only loss)."""

    role: str = setting(
        "reflector", "reflector (improving reflections, `datasets build`) | actor (step rows of `datasets actor`; use the "
        "checkpoint as --actor workspace:sft/NAME)")
    name: str = setting("default", "checkpoint name under <checkpoints>/sft/")
    learning_rate: float = setting(2e-4, "learning rate")
    max_length: int = setting(1024, "tokens per example; longer prompts lose their start")
    warmup_steps: int = 0
    eval: bool = setting(True, "evaluate on the validation split at the end")
    merge: bool = setting(False, "also write merged/ (base + adapter as one model)")
    lora: LoraSettings = field(default_factory=LoraSettings)


ROLES = ("reflector", "actor")


def load_sft_datasets(workspace: Workspace, name: str, role: str = "reflector", tokenizer: Any = None):
    """(train, validation or None) TRL prompt-completion datasets. The actor's rows are rendered with
    ``tokenizer``'s chat template exactly as the engine renders a prompt (see ``stages.actor_data``)."""
    from datasets import Dataset

    from retroformer_cli.stages.datasets import read_split

    out = []
    for split in ("train", "validation"):
        if role == "actor":
            from retroformer_cli.stages.actor_data import render_rows

            rows = render_rows(read_split(workspace, name, "actor", split), tokenizer)
        else:
            rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in read_split(workspace, name, "sft", split)]
        out.append(Dataset.from_list(rows) if rows else None)
    if out[0] is None:
        what = "actor step rows" if role == "actor" else "SFT training rows (no reflection followed by an improvement)"
        raise DataError(f"Dataset '{name}' has no {what}.",
                        hint="build it with `retroformer datasets actor`" if role == "actor" else
                        "collect more trials, or import rated logs with `retroformer datasets build`")
    return out[0], out[1]


def trl_config(cfg: SFTStageConfig, output_dir: Path, has_eval: bool):
    from trl import SFTConfig

    from retroformer_cli.stages.common import training as tc

    return SFTConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length, truncation_mode="keep_end", completion_only_loss=True,
        warmup_steps=cfg.warmup_steps, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, eval_strategy="no", seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, disable_tqdm=True, dataloader_num_workers=0,
        dataset_num_proc=None, packing=False,
        **tc.report_kwargs(cfg.report_to, "sft", cfg.name), **tc.precision_kwargs(),
    )


def load_base_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path))
    return model, tok


def run(cfg: SFTStageConfig, workspace: Workspace, *, resume: bool = False, progress: Progress | None = None,
        callbacks: list | None = None) -> TrainResult:
    """Train and write ``<checkpoints>/sft/<name>/``; ``progress`` gets the optimizer steps and logged losses."""
    from retroformer_cli.stages.common import training as tc
    from retroformer_cli.stages.common.checkpoints import resume_checkpoint

    tc.begin(cfg)
    if cfg.role not in ROLES:
        raise UsageError(f"Unknown role '{cfg.role}' (--role): choose reflector or actor.")
    if cfg.role == "actor":
        from retroformer_cli.stages.datasets import read_manifest

        if read_manifest(workspace, cfg.dataset).get("kind") != "actor":
            raise UsageError(f"Dataset '{cfg.dataset}' is not an actor dataset (--dataset with --role actor).",
                             hint="build one with `retroformer datasets actor`")
    base_label, base_path = tc.resolve_base(cfg.base, workspace)
    model, tok = load_base_causal_lm(base_path)
    train_ds, eval_ds = load_sft_datasets(workspace, cfg.dataset, cfg.role, tok)
    from trl import SFTTrainer

    out_dir = tc.work_dir(workspace, "sft", cfg.name)
    resume_from = resume_checkpoint(out_dir, "sft", cfg.name) if resume else None
    cbs = [*(callbacks or []), trainer_callback(progress or NullProgress(), f"sft {cfg.name}")]
    trainer = SFTTrainer(model=model, args=trl_config(cfg, out_dir, eval_ds is not None), train_dataset=train_ds,
                         eval_dataset=eval_ds, processing_class=tok, peft_config=tc.lora_config(cfg.lora, "CAUSAL_LM"),
                         callbacks=cbs)
    tc.drop_stdout_printer(trainer)
    metrics: dict[str, Any] = {**tc.train(trainer, resume_from), "train_rows": len(train_ds),
                               "validation_rows": len(eval_ds) if eval_ds else 0}
    if cfg.eval and eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

    def write_merged(tmp: Path) -> None:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(tmp / "merged"))
        tok.save_pretrained(str(tmp / "merged"))

    dest = tc.save_adapter(workspace, "sft", cfg, trainer, tok, base_label, metrics, resume_from,
                           also_write=write_merged if cfg.merge else None)
    return TrainResult("sft", cfg.name, dest, metrics)


def load_policy(path_or_spec: str | Path, cache_dir: str | Path):
    """(model, tokenizer) for continued training: an SFT adapter folder comes back as a trainable PeftModel on
    its base; ``embedded`` or a plain model folder comes back as the bare causal LM (add your own adapter)."""
    from retroformer_cli.llm import model_cache as mc

    mc.set_offline()
    from retroformer_cli.stages.common.training import quiet_transformers

    quiet_transformers()
    path = mc.resolve_local_model(str(path_or_spec), cache_dir)
    if not mc.is_adapter_dir(path):
        return load_base_causal_lm(path)
    from peft import PeftModel
    from transformers import AutoTokenizer

    _, base_path = mc.resolve_adapter_base(path, cache_dir)
    model, tok = load_base_causal_lm(base_path)
    if (path / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(path))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
    return model, tok
