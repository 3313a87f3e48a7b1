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

from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.stages.common.names import check_name
from retroformer_cli.stages.common.progress import NullProgress, Progress, trainer_callback
from retroformer_cli.stages.common.results import TrainResult
from retroformer_cli.stages.train_common import LoraSettings
from retroformer_cli.workspace import Workspace


@dataclass
class SFTStageConfig:
    """`retroformer sft`: LoRA SFT of the reflector on improving reflections (completion-only loss)."""

    dataset: str = field(default="ratings", metadata={"help": "dataset under <workspace>/datasets/"})
    role: str = field(default="reflector", metadata={
        "help": "reflector (improving reflections, `datasets build`) | actor (step rows of `datasets actor`; use the "
                "checkpoint as --actor workspace:sft/NAME)"})
    base: str = field(default="embedded", metadata={"help": "base model: embedded | a local transformers model folder"})
    name: str = field(default="default", metadata={"help": "checkpoint name under <checkpoints>/sft/"})
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps (-1: use epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1"})
    learning_rate: float = field(default=2e-4, metadata={"help": "learning rate"})
    batch_size: int = field(default=4, metadata={"help": "per-device batch size"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_length: int = field(default=1024, metadata={"help": "tokens per example; longer prompts lose their start"})
    warmup_steps: int = 0
    save_steps: int = field(default=50, metadata={"help": "trainer checkpoint every N steps (for --resume)"})
    logging_steps: int = 1
    eval: bool = field(default=True, metadata={"help": "evaluate on the validation split at the end"})
    gradient_checkpointing: bool = False
    merge: bool = field(default=False, metadata={"help": "also write merged/ (base + adapter as one model)"})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default min(2, cores)); use 1 on a shared machine"})
    seed: int = field(default=0, metadata={"help": "training seed"})
    report_to: str = field(default="none", metadata={"help": "training logs to: none | tensorboard | wandb | trackio | mlflow (comma-separated; transformers' integrations)"})
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

    from retroformer_cli.stages import train_common as tc

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
    from retroformer_cli.config import to_dict
    from retroformer_cli.llm.model_cache import set_offline
    from retroformer_cli.stages import train_common as tc
    from retroformer_cli.stages.common.checkpoints import resume_checkpoint

    set_offline()
    check_name(cfg.name)
    tc.report_to_list(cfg.report_to)  # a bad --report-to fails before the model loads
    tc.set_threads(cfg.threads)
    tc.quiet_transformers(cfg.seed)
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
    out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics: dict[str, Any] = {"global_step": trainer.state.global_step, "train_loss": out.training_loss,
                               "train_runtime_s": out.metrics.get("train_runtime"),
                               "train_rows": len(train_ds), "validation_rows": len(eval_ds) if eval_ds else 0,
                               **tc.loss_history(trainer.state.log_history)}
    if cfg.eval and eval_ds is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    peft_model = trainer.model

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        tc.fix_adapter_base(tmp, base_label)
        tok.save_pretrained(str(tmp))
        tc.write_metrics_jsonl(tmp, trainer.state.log_history)
        if cfg.merge:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(str(tmp / "merged"))
            tok.save_pretrained(str(tmp / "merged"))

    dest = workspace.checkpoint_dir("sft", cfg.name)
    manifest = tc.checkpoint_manifest("sft", base_label, cfg.dataset, to_dict(cfg), metrics,
                                      resumed_from=resume_from.name if resume_from else None)
    tc.save_checkpoint(dest, write, manifest)
    return TrainResult("sft", cfg.name, dest, metrics)


def load_policy(path_or_spec: str | Path, cache_dir: str | Path):
    """(model, tokenizer) for continued training: an SFT adapter folder comes back as a trainable PeftModel on
    its base; ``embedded`` or a plain model folder comes back as the bare causal LM (add your own adapter)."""
    from retroformer_cli.llm import model_cache as mc

    mc.set_offline()
    from retroformer_cli.stages.train_common import quiet_transformers

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
