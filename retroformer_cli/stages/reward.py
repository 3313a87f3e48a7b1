"""`retroformer reward`: a reward model for reflections, a sequence-classification head (one score) on the base
with a LoRA adapter, trained with TRL's ``RewardTrainer`` on the preference pairs (Bradley-Terry loss).

Inputs are tokenized here, not by TRL: each side is ``chat_template(prompt + [assistant: reflection])`` with the
prefill rule of :mod:`retroformer_cli.stages.datasets` and, when longer than ``max_length``, its start cut off
(the score is read at the last token, so the reflection must survive; TRL would drop such rows). The chosen
and rejected sides may have different prompts (``rejected_prompt``: same task, another trial).

After training it reports, on the validation split: pairwise accuracy (chosen scored above rejected; ties
count half) against the 50% chance level, and the Pearson / Spearman correlation of the score with the true
rating G(k+1) - G(k) over the validation ratings.

Checkpoint ``<checkpoints>/reward/<name>/``: the LoRA adapter (with the score head) + tokenizer +
``retroformer_checkpoint.json``. :func:`load_scorer` turns it into a function for RL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from retroformer_cli.config import setting
from retroformer_cli.errors import BackendError, DataError, UsageError
from retroformer_cli.stages.common.reflections import clean_reflection
from retroformer_cli.stages.common.progress import NullProgress, Progress, trainer_callback
from retroformer_cli.stages.common.results import TrainResult
from retroformer_cli.stages.common.training import FinetuneSettings, LoraSettings
from retroformer_cli.workspace import Workspace

Scorer = Callable[[list[list[dict]], list[str]], list[float]]


@dataclass
class RewardStageConfig(FinetuneSettings):
    """`retroformer reward`: a LoRA reward model on the preference pairs."""

    name: str = setting("default", "checkpoint name under <checkpoints>/reward/")
    learning_rate: float = setting(1e-4, "learning rate")
    max_length: int = setting(1024, "tokens per side; longer texts lose their start")
    eval: bool = setting(True, "report validation accuracy and correlations at the end")
    eval_batch_size: int = 8
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))


def encode(tok: Any, prompt: Sequence[dict], reflection: str, max_length: int | None) -> list[int]:
    """Token ids of prompt + reflection, formatted by the chat template, start cut to ``max_length``."""
    from retroformer_cli.stages.common.ratings import completion, strip_prefill

    msgs = strip_prefill(prompt) + completion(reflection)
    text = tok.apply_chat_template(msgs, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if max_length and len(ids) > max_length:
        ids = ids[-max_length:]
    return ids


def pair_dataset(rows: list[dict[str, Any]], tok: Any, max_length: int):
    from datasets import Dataset

    data = [{"chosen_ids": encode(tok, r["prompt"], r["chosen"][0]["content"], max_length),
             "rejected_ids": encode(tok, r.get("rejected_prompt") or r["prompt"], r["rejected"][0]["content"], max_length)}
            for r in rows]
    return Dataset.from_list(data) if data else None


def load_seq_cls(path: Path, tok: Any):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    return model


def score_ids(model: Any, ids: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    import torch

    out: list[float] = []
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            chunk = ids[i: i + batch_size]
            n = max(len(x) for x in chunk)
            inp = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, x in enumerate(chunk):
                inp[j, : len(x)] = torch.tensor(x)
                mask[j, : len(x)] = 1
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits
            out += logits[:, 0].float().cpu().tolist()
    return out


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(a: list[float], b: list[float]) -> float | None:
    n = len(a)
    if n < 2:
        return None
    ma, mb = sum(a) / n, sum(b) / n
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(va * vb)


def spearman(a: list[float], b: list[float]) -> float | None:
    return pearson(_ranks(a), _ranks(b))


def evaluate(model: Any, tok: Any, pairs: list[dict[str, Any]], ratings: list[dict[str, Any]], max_length: int,
             batch_size: int = 8) -> dict[str, Any]:
    """Pairwise accuracy on ``pairs`` and correlation of scores with ratings on ``ratings``. Each distinct
    (prompt, reflection) is scored once: pairs reuse the same reflections many times."""
    import json

    from retroformer_cli.stages.common.ratings import strip_prefill

    keys: dict[str, int] = {}
    items: list[tuple[list, str]] = []

    def key(prompt: Sequence[dict], text: str) -> int:
        k = json.dumps([strip_prefill(prompt), clean_reflection(text, stop=())], sort_keys=True)
        if k not in keys:
            keys[k] = len(items)
            items.append((list(prompt), text))
        return keys[k]

    pair_keys = [(key(r["prompt"], r["chosen"][0]["content"]),
                  key(r.get("rejected_prompt") or r["prompt"], r["rejected"][0]["content"])) for r in pairs]
    rating_keys = [key(r["prompt"], r["reflection"]) for r in ratings]
    scores = score_ids(model, [encode(tok, p, t, max_length) for p, t in items], tok.pad_token_id, batch_size)
    res: dict[str, Any] = {"validation_pairs": len(pairs), "validation_ratings": len(ratings),
                           "validation_texts_scored": len(items)}
    if pairs:
        res["pairwise_accuracy"] = sum(1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
                                       for a, b in pair_keys) / len(pairs)
    if ratings:
        s = [scores[k] for k in rating_keys]
        true = [float(r["rating"]) for r in ratings]
        res["pearson"], res["spearman"] = pearson(s, true), spearman(s, true)
    return res


def run(cfg: RewardStageConfig, workspace: Workspace, *, resume: bool = False, progress: Progress | None = None,
        callbacks: list | None = None) -> TrainResult:
    """Train and write ``<checkpoints>/reward/<name>/``; ``progress`` gets the optimizer steps and logged losses."""
    from retroformer_cli.stages.common import training as tc
    from retroformer_cli.stages.common.checkpoints import resume_checkpoint
    from retroformer_cli.stages.datasets import read_split

    tc.begin(cfg)
    base_label, base_path = tc.resolve_base(cfg.base, workspace)
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(str(base_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train_rows = read_split(workspace, cfg.dataset, "pairs", "train")
    train_ds = pair_dataset(train_rows, tok, cfg.max_length)
    if train_ds is None:
        raise DataError(f"Dataset '{cfg.dataset}' has no training pairs (reflections of one task with different "
                        "ratings).", hint="rebuild with --pair-scope env, or collect more trials")
    out_dir = tc.work_dir(workspace, "reward", cfg.name)
    resume_from = resume_checkpoint(out_dir, "reward", cfg.name) if resume else None
    model = load_seq_cls(base_path, tok)
    args = RewardConfig(
        output_dir=str(out_dir), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum, max_length=None,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        eval_strategy="no", seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=True, dataloader_num_workers=0,
        **tc.report_kwargs(cfg.report_to, "reward", cfg.name), **tc.precision_kwargs(),
    )
    cbs = [*(callbacks or []), trainer_callback(progress or NullProgress(), f"reward {cfg.name}")]
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                            peft_config=tc.lora_config(cfg.lora, "SEQ_CLS"), callbacks=cbs)
    tc.drop_stdout_printer(trainer)
    metrics: dict[str, Any] = {**tc.train(trainer, resume_from), "train_pairs": len(train_ds)}
    acc = [h["accuracy"] for h in trainer.state.log_history if "accuracy" in h]
    metrics["train_accuracy_last"] = acc[-1] if acc else None
    if cfg.eval:
        metrics.update(evaluate(trainer.model, tok, read_split(workspace, cfg.dataset, "pairs", "validation"),
                                read_split(workspace, cfg.dataset, "ratings", "validation"), cfg.max_length,
                                cfg.eval_batch_size))
        metrics["chance_accuracy"] = 0.5
    dest = tc.save_adapter(workspace, "reward", cfg, trainer, tok, base_label, metrics, resume_from,
                           max_length=cfg.max_length)
    return TrainResult("reward", cfg.name, dest, metrics)


def load_reward_model(path: str | Path, cache_dir: str | Path):
    """(model, tokenizer, max_length) of a reward checkpoint folder, adapter merged, in eval mode."""
    from retroformer_cli.llm import model_cache as mc
    from retroformer_cli.stages.common.training import read_checkpoint_manifest

    mc.set_offline()
    from retroformer_cli.stages.common.training import quiet_transformers

    quiet_transformers()
    folder = Path(path)
    if not mc.is_adapter_dir(folder):
        raise UsageError(f"'{folder}' is not a reward checkpoint (no adapter_config.json); see `retroformer reward`.")
    _, base_path = mc.resolve_adapter_base(folder, cache_dir)
    from peft import PeftModel
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = PeftModel.from_pretrained(load_seq_cls(base_path, tok), str(folder)).merge_and_unload()
    except Exception as exc:  # transformers/peft raise many kinds
        raise BackendError(f"Cannot load the reward model {folder}: {exc}") from exc
    model.eval()
    max_length = read_checkpoint_manifest(folder).get("max_length") or 1024
    return model, tok, max_length


def load_scorer(path: str | Path, cache_dir: str | Path, batch_size: int = 8) -> Scorer:
    """``score(prompts, reflections) -> scores``: prompts are chat message lists (a trailing assistant prefill is
    dropped), reflections plain strings (a leading ``Reflection:`` is dropped)."""
    model, tok, max_length = load_reward_model(path, cache_dir)

    def score(prompts: list[list[dict]], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise UsageError(f"score() got {len(prompts)} prompts and {len(completions)} reflections.")
        ids = [encode(tok, p, c, max_length) for p, c in zip(prompts, completions)]
        return score_ids(model, ids, tok.pad_token_id, batch_size)

    return score
