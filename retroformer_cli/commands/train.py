"""`retroformer datasets build`, `retroformer sft`, `retroformer reward` (+ `reward score`); `ppo` below.

Thin commands: parse, build the stage config (defaults < --config YAML < flags), call the stage, render.
Nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from retroformer_cli.cli import app, handle_errors, state
from retroformer_cli.errors import UsageError

datasets_app = typer.Typer(help="Build rating, SFT, preference and RL prompt sets from runs and imported logs.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(datasets_app, name="datasets")


def _ws():
    from retroformer_cli.workspace import Workspace

    return Workspace.open(state.workspace)


def _overrides(mapping: dict[str, str], values: dict[str, Any]) -> dict[str, Any]:
    return {mapping[k]: v for k, v in values.items() if k in mapping and v is not None}


@datasets_app.command("build", epilog="Examples:\n\n  retroformer datasets build --run demo\n\n"
                                      "  retroformer datasets build --import-reflexion ../shared/data/hotpotqa/reflexion_logs/trials.jsonl --name reflexion\n\n"
                                      "  retroformer datasets build --import-tsv ratings.tsv --import-reflexion alfworld_logs/ --pair-scope env")
@handle_errors
def datasets_build(
    runs: Optional[List[str]] = typer.Option(None, "--run", "-r", help="Run of this workspace; repeat for several."),
    import_tsv: Optional[List[Path]] = typer.Option(None, "--import-tsv", help="Retroformer rating TSV (query, response, rating|labels); repeatable."),
    import_reflexion: Optional[List[Path]] = typer.Option(None, "--import-reflexion", help="Reflexion HotPotQA .txt log / folder / trials.jsonl, or ALFWorld env_results folder; repeatable."),
    name: Optional[str] = typer.Option(None, "--name", help="Dataset name under datasets/ [default: ratings]."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of TASKS held out for validation [default: 0.15]."),
    pair_scope: Optional[str] = typer.Option(None, "--pair-scope", help="task | env: which reflections may form a pair [default: task]."),
    max_pairs_per_task: Optional[int] = typer.Option(None, "--max-pairs-per-task", help="Cap on pairs per chosen task [default: 32]."),
    pair_on: Optional[str] = typer.Option(None, "--pair-on", help="rating | rating_f1: what orders a pair [default: rating]."),
) -> None:
    """Rate every reflection by G(k+1) - G(k) and write ratings, sft, pairs and prompts sets."""
    from retroformer_cli import console
    from retroformer_cli.config import build_config
    from retroformer_cli.stages import datasets

    ov = _overrides({"name": "name", "val_fraction": "val_fraction", "pair_scope": "pair_scope",
                     "max_pairs_per_task": "max_pairs_per_task", "pair_on": "pair_on"}, locals())
    if runs:
        ov["runs"] = list(runs)
    if import_tsv:
        ov["import_tsv"] = [str(p) for p in import_tsv]
    if import_reflexion:
        ov["import_reflexion"] = [str(p) for p in import_reflexion]
    cfg = build_config(datasets.DatasetConfig, state.config, ov)
    res = datasets.build(cfg, _ws())
    if state.json:
        console.print_json(res.to_json())
    c = res.counts
    console.stderr.print(f"[green]done[/]: dataset {res.name}: {c['ratings']} rated reflection(s) from {c['tasks']} task(s) "
                         f"({c['positive']} improved, {c['zero']} unchanged, {c['negative']} worse); sft "
                         f"{c['sft.train']}/{c['sft.validation']}, pairs {c['pairs.train']}/{c['pairs.validation']}, "
                         f"prompts {c['prompts.train']}/{c['prompts.validation']} (train/validation) in {res.path}")


# Options shared by sft and reward.
DatasetOpt = typer.Option(None, "--dataset", "-d", help="Dataset name under datasets/ [default: ratings].")
BaseOpt = typer.Option(None, "--base", help="Base model: embedded | a local transformers folder [default: embedded].")
NameOpt = typer.Option(None, "--name", help="Checkpoint name [default: default].")
MaxStepsOpt = typer.Option(None, "--max-steps", help="Optimizer steps (-1: whole epochs).")
EpochsOpt = typer.Option(None, "--epochs", help="Epochs when --max-steps is -1 [default: 1].")
LrOpt = typer.Option(None, "--lr", help="Learning rate.")
BatchOpt = typer.Option(None, "--batch-size", help="Per-device batch size [default: 4].")
AccumOpt = typer.Option(None, "--grad-accum", help="Gradient accumulation steps [default: 1].")
MaxLenOpt = typer.Option(None, "--max-length", help="Tokens per example; longer prompts lose their start [default: 1024].")
SaveStepsOpt = typer.Option(None, "--save-steps", help="Trainer checkpoint every N steps, for --resume [default: 50].")
LoraROpt = typer.Option(None, "--lora-r", help="LoRA rank.")
LoraAlphaOpt = typer.Option(None, "--lora-alpha", help="LoRA alpha.")
LoraDropOpt = typer.Option(None, "--lora-dropout", help="LoRA dropout.")
LoraTargetsOpt = typer.Option(None, "--lora-targets", help="Comma-separated module names [default: q_proj,v_proj].")
ThreadsOpt = typer.Option(None, "--threads", help="torch threads [default: min(2, cores)]; use 1 on a shared machine.")
SeedOpt = typer.Option(None, "--seed", help="Seed.")
ResumeOpt = typer.Option(False, "--resume", help="Continue from the last trainer checkpoint of --name.")

_TRAIN_KEYS = {"dataset": "dataset", "base": "base", "name": "name", "max_steps": "max_steps", "epochs": "epochs",
               "lr": "learning_rate", "batch_size": "batch_size", "grad_accum": "grad_accum",
               "max_length": "max_length", "save_steps": "save_steps", "lora_r": "lora.r", "lora_alpha": "lora.alpha",
               "lora_dropout": "lora.dropout", "lora_targets": "lora.target_modules", "threads": "threads",
               "seed": "seed"}


def _report(res: Any, keys: tuple[str, ...]) -> None:
    from retroformer_cli import console

    if state.json:
        console.print_json(res.to_json())
    shown = ", ".join(f"{k} {res.metrics[k]:.4g}" if isinstance(res.metrics.get(k), float) else f"{k} {res.metrics.get(k)}"
                      for k in keys if k in res.metrics)
    console.stderr.print(f"[green]done[/]: {res.stage} checkpoint {res.name} at {res.path} ({shown})")


@app.command("sft", epilog="Examples:\n\n  retroformer sft --dataset ratings --max-steps 20 --threads 1\n\n"
                           "  retroformer sft --base path/to/hf-model --name big --merge\n\n"
                           "  retroformer sft --name big --resume")
@handle_errors
def sft_cmd(
    dataset: Optional[str] = DatasetOpt, base: Optional[str] = BaseOpt, name: Optional[str] = NameOpt,
    max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt, lr: Optional[float] = LrOpt,
    batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt, max_length: Optional[int] = MaxLenOpt,
    save_steps: Optional[int] = SaveStepsOpt, lora_r: Optional[int] = LoraROpt, lora_alpha: Optional[int] = LoraAlphaOpt,
    lora_dropout: Optional[float] = LoraDropOpt, lora_targets: Optional[str] = LoraTargetsOpt,
    threads: Optional[int] = ThreadsOpt, seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help="Also write merged/ (base + adapter)."),
) -> None:
    """Supervised fine-tuning of the reflector (LoRA) on reflections followed by an improvement."""
    from retroformer_cli import console
    from retroformer_cli.config import build_config
    from retroformer_cli.stages import sft

    ov = _overrides({**_TRAIN_KEYS, "merge": "merge"}, locals())
    cfg = build_config(sft.SFTStageConfig, state.config, ov)
    console.stderr.print(f"[bold]sft[/] dataset={cfg.dataset} base={cfg.base} name={cfg.name} max_steps={cfg.max_steps}")
    _report(sft.run(cfg, _ws(), resume=resume), ("global_step", "train_loss", "eval_loss"))


reward_app = typer.Typer(help="Train a reward model for reflections, or score one (`reward score`).",
                         invoke_without_command=True, rich_markup_mode=None)
app.add_typer(reward_app, name="reward")


@reward_app.callback(epilog="Examples:\n\n  retroformer reward --dataset ratings --max-steps 50 --threads 1\n\n"
                            "  retroformer reward score --checkpoint default --prompt-file prompt.json --reflection 'I ...'")
@handle_errors
def reward_cmd(
    ctx: typer.Context,
    dataset: Optional[str] = DatasetOpt, base: Optional[str] = BaseOpt, name: Optional[str] = NameOpt,
    max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt, lr: Optional[float] = LrOpt,
    batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt, max_length: Optional[int] = MaxLenOpt,
    save_steps: Optional[int] = SaveStepsOpt, lora_r: Optional[int] = LoraROpt, lora_alpha: Optional[int] = LoraAlphaOpt,
    lora_dropout: Optional[float] = LoraDropOpt, lora_targets: Optional[str] = LoraTargetsOpt,
    threads: Optional[int] = ThreadsOpt, seed: Optional[int] = SeedOpt, resume: bool = ResumeOpt,
) -> None:
    """Train a reward model (sequence classification + LoRA) on the preference pairs; report validation
    pairwise accuracy and the correlation of its score with the true rating."""
    if ctx.invoked_subcommand is not None:
        return
    from retroformer_cli import console
    from retroformer_cli.config import build_config
    from retroformer_cli.stages import reward

    ov = _overrides(_TRAIN_KEYS, {k: v for k, v in locals().items() if k != "ctx"})
    cfg = build_config(reward.RewardStageConfig, state.config, ov)
    console.stderr.print(f"[bold]reward[/] dataset={cfg.dataset} base={cfg.base} name={cfg.name} max_steps={cfg.max_steps}")
    _report(reward.run(cfg, _ws(), resume=resume),
            ("global_step", "train_loss", "pairwise_accuracy", "validation_pairs", "pearson", "spearman"))


def _read_prompt(prompt_file: Optional[Path], prompt: Optional[str]) -> list[dict[str, str]]:
    import json

    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UsageError(f"Prompt file '{prompt_file}' does not exist (--prompt-file).")
        text = prompt_file.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return [{"role": "user", "content": text}]
        if isinstance(data, dict) and "prompt" in data:
            data = data["prompt"]
        if not (isinstance(data, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in data)):
            raise UsageError(f"Prompt file '{prompt_file}' must hold chat messages [{{role, content}}, ...] or plain text.")
        return data
    if prompt is not None:
        return [{"role": "user", "content": prompt}]
    raise UsageError("Pass the reflector's prompt with --prompt-file FILE (JSON messages or text) or --prompt TEXT.")


@reward_app.command("score", epilog="Example:\n\n  retroformer reward score --checkpoint default --prompt 'Previous trial: ...' "
                                    "--reflection 'I searched the wrong entity ...'")
@handle_errors
def reward_score(
    checkpoint: str = typer.Option("default", "--checkpoint", help="Reward checkpoint name (or folder)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="JSON chat messages (or a ratings row), or plain text."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt as one user message."),
    reflection: List[str] = typer.Option(..., "--reflection", help="Reflection text to score; repeat to compare several."),
) -> None:
    """Score reflections with a trained reward model (higher = more likely to improve the next trial)."""
    from retroformer_cli import console
    from retroformer_cli.stages import reward

    ws = _ws()
    path = reward.resolve_checkpoint(ws, "reward", checkpoint)
    msgs = _read_prompt(prompt_file, prompt)
    scores = reward.load_scorer(path, ws.cache_dir)([msgs] * len(reflection), list(reflection))
    if state.json:
        console.print_json({"checkpoint": str(path), "scores": scores})
        return
    for r, s in zip(reflection, scores):
        console.stdout.print(f"{s:+.4f}  {r[:100]}", markup=False)


# --- ppo ---
# `retroformer ppo`: GRPO fine-tuning of the reflector (retroformer_cli/stages/ppo.py). Nothing heavy at import.
import os as _ppo_os
from pathlib import Path as _PPOPath
from typing import Any as _PPOAny
from typing import Optional as _PPOOptional

import typer as _ppo_typer

from retroformer_cli.cli import app as _ppo_app
from retroformer_cli.cli import handle_errors as _ppo_handle_errors
from retroformer_cli.cli import state as _ppo_state


class _PPORichProgress:
    """Rich progress on stderr for ppo: steps, reward, KL, loss; one plain line per log when not a TTY."""

    def __init__(self, label: str):
        from retroformer_cli.console import stderr

        self.console, self.label, self._progress, self._task = stderr, label, None, None

    def start(self, total_steps: int, done_steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if done_steps:
            self.console.print(f"[dim]resuming at step {done_steps}/{total_steps}[/]")
        self._progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=self.console, disable=not self.console.is_terminal)
        self._task = self._progress.add_task(self.label, total=total_steps, completed=done_steps, info="")
        self._progress.start()

    def step(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, metrics: dict) -> None:
        keys = ("reward", "reward_std", "kl", "loss", "online/episodes")
        info = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float)))
        if not info:
            return
        if self._progress is not None:
            self._progress.update(self._task, info=info)
        if not self.console.is_terminal:
            self.console.print(f"{self.label}: step {step} {info}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@_ppo_app.command("ppo", epilog=(
    "Examples:\n\n"
    "  retroformer ppo --reward-model default --max-steps 20   (offline: the reward model's score)\n\n"
    "  retroformer ppo --mode online --actor embedded --name online   (the replayed G(k+1) - G(k))\n\n"
    "  retroformer ppo --name online --mode online --resume\n\n"
    "  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m retroformer_cli ppo --config configs/ppo.yaml\n\n"
    "  retroformer collect --reflector workspace:ppo/default --run retroformer"))
@_ppo_handle_errors
def ppo(
    dataset: _PPOOptional[str] = _ppo_typer.Option(None, "--dataset", help="Dataset with RL prompts (retroformer datasets build) [default: ratings]."),
    sft: _PPOOptional[str] = _ppo_typer.Option(None, "--sft", help="SFT checkpoint NAME or folder to start from; 'none' for a fresh LoRA [default: sft/default if present]."),
    base: _PPOOptional[str] = _ppo_typer.Option(None, "--base", help="Base model without an SFT checkpoint: embedded | a model folder [default: embedded]."),
    reward_model: _PPOOptional[str] = _ppo_typer.Option(None, "--reward-model", help="Offline mode: reward checkpoint NAME or folder [default: reward/default]."),
    mode: _PPOOptional[str] = _ppo_typer.Option(None, "--mode", help="offline (reward model score) | online (replayed return difference) [default: offline]."),
    actor: _PPOOptional[str] = _ppo_typer.Option(None, "--actor", help="Online mode: actor model spec [default: each run's actor]."),
    name: _PPOOptional[str] = _ppo_typer.Option(None, "--name", help="Checkpoint name under checkpoints/ppo/ [default: default]."),
    max_steps: _PPOOptional[int] = _ppo_typer.Option(None, "--max-steps", help="Optimizer steps [default: 20]."),
    num_generations: _PPOOptional[int] = _ppo_typer.Option(None, "--num-generations", "-G", help="Reflections sampled per prompt (the GRPO group) [default: 4]."),
    prompts_per_step: _PPOOptional[int] = _ppo_typer.Option(None, "--prompts-per-step", help="Prompts per device per step [default: 2]."),
    beta: _PPOOptional[float] = _ppo_typer.Option(None, "--beta", help="KL penalty to the reference [default: 0.04]."),
    learning_rate: _PPOOptional[float] = _ppo_typer.Option(None, "--learning-rate", "--lr", help="Learning rate [default: 1e-5]."),
    max_completion_length: _PPOOptional[int] = _ppo_typer.Option(None, "--max-completion-length", help="Max tokens per sampled reflection [default: 64]."),
    max_prompt_tokens: _PPOOptional[int] = _ppo_typer.Option(None, "--max-prompt-tokens", help="Skip longer prompts [default: 2048]."),
    save_steps: _PPOOptional[int] = _ppo_typer.Option(None, "--save-steps", help="Trainer checkpoint every N steps, for --resume [default: 10]."),
    online_concurrency: _PPOOptional[int] = _ppo_typer.Option(None, "--online-concurrency", help="Online mode: episodes replayed at once [default: 8]."),
    threads: _PPOOptional[int] = _ppo_typer.Option(None, "--threads", help="torch threads on CPU [default: min(2, cores)]."),
    seed: _PPOOptional[int] = _ppo_typer.Option(None, "--seed", help="Training seed [default: 0]."),
    resume: bool = _ppo_typer.Option(False, "--resume", help="Continue from the newest trainer checkpoint of --name."),
    config: _PPOOptional[_PPOPath] = _ppo_typer.Option(None, "--config", "-c", help="YAML config (see configs/ppo.yaml)."),
) -> None:
    """Fine-tune the reflector with GRPO (clipped PPO surrogate, group-relative advantages, KL to the reference)."""
    from retroformer_cli import console
    from retroformer_cli.cli import _workspace
    from retroformer_cli.config import build_config
    from retroformer_cli.stages.ppo import PPOStageConfig, run_ppo

    flags: dict[str, _PPOAny] = {k: v for k, v in dict(locals()).items()
                                 if k not in ("resume", "config", "console", "build_config", "PPOStageConfig",
                                              "run_ppo", "_workspace") and v is not None}
    cfg = build_config(PPOStageConfig, config or _ppo_state.config, flags)
    ws = _workspace()
    main = _ppo_os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process talks
    if main:
        console.stderr.print(f"[bold]ppo[/] mode={cfg.mode} dataset={cfg.dataset} name={cfg.name} steps={cfg.max_steps} "
                             f"G={cfg.num_generations} beta={cfg.beta} workspace={ws.root}")
    result = run_ppo(cfg, ws, _PPORichProgress(f"ppo {cfg.name}") if main else None, resume=resume)
    if not main:
        return
    if _ppo_state.json:
        console.print_json(result.to_json())
    m = result.metrics
    console.stderr.print(f"[green]done[/]: ppo '{result.name}' ({result.mode}) {result.steps} step(s), reward "
                         f"{m.get('reward_first')} -> {m.get('reward_last')}; checkpoint {result.path}\n"
                         f"[dim]use it: retroformer collect --reflector workspace:ppo/{result.name}[/]")
