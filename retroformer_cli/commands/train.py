"""`retroformer sft` and `retroformer reward` (+ `reward score`): LoRA fine-tuning of the reflector and a reward
model for reflections. Options are the fields of the stage configs (``stages.sft.SFTStageConfig``,
``stages.reward.RewardStageConfig``): defaults < --config YAML < flags. Nothing heavy at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from retroformer_cli.commands.context import (TRAIN_FLAGS, ResumeOpt, build, command_app, config_command, done, examples,
                                              handle_errors, state, workspace)
from retroformer_cli.errors import UsageError
from retroformer_cli.options import Flag
from retroformer_cli.stages.reward import RewardStageConfig
from retroformer_cli.stages.sft import SFTStageConfig

# sft and reward train the same way (a LoRA adapter with TRL); ppo has its own sampling settings.
FINETUNE_FLAGS = (
    Flag("epochs"), Flag("batch_size"), Flag("grad_accum"), Flag("max_length"), Flag("lora.r"), Flag("lora.alpha"),
    Flag("lora.dropout"), Flag("lora.target_modules", name="--lora-targets", cli_type=str),
)

sft_app = command_app()
reward_app = command_app(help="Train a reward model for reflections, or score one (`reward score`).",
                         invoke_without_command=True)


def _train(stage: Any, cls: type, overrides: dict, resume: bool, keys: tuple[str, ...]) -> None:
    from retroformer_cli import console

    cfg = build(cls, overrides)
    console.log((stage.__name__.rsplit('.', 1)[-1], "bold"), f" dataset={cfg.dataset} base={cfg.base} "
                         f"name={cfg.name} max_steps={cfg.max_steps}")
    res = stage.run(cfg, workspace(), resume=resume, progress=console.RichProgress())
    shown = ", ".join(f"{k} {res.metrics[k]:.4g}" if isinstance(res.metrics.get(k), float) else f"{k} {res.metrics.get(k)}"
                      for k in keys if k in res.metrics)
    done(res, f"{res.stage} checkpoint {res.name} at {res.path} ({shown})")


@config_command(sft_app.command("sft", epilog=examples(
    "retroformer sft --dataset ratings --max-steps 20 --threads 1",
    "retroformer sft --base path/to/hf-model --name big --merge",
    "retroformer sft --name big --resume")),
                SFTStageConfig, TRAIN_FLAGS, FINETUNE_FLAGS, (Flag("merge"), Flag("role")))
def sft_cmd(overrides: dict, resume: ResumeOpt = False) -> None:
    """Supervised fine-tuning (LoRA) of the reflector on reflections followed by an improvement, or with
    --role actor of the actor on successful trajectories (`datasets actor`)."""
    from retroformer_cli.stages import sft

    _train(sft, SFTStageConfig, overrides, resume, ("global_step", "train_loss", "eval_loss"))


@config_command(reward_app.callback(epilog=examples(
    "retroformer reward --dataset ratings --max-steps 50 --threads 1",
    "retroformer reward score --checkpoint default --prompt-file prompt.json --reflection 'I ...'")),
                RewardStageConfig, TRAIN_FLAGS, FINETUNE_FLAGS)
def reward_cmd(overrides: dict, ctx: typer.Context, resume: ResumeOpt = False) -> None:
    """Train a reward model (sequence classification + LoRA) on the preference pairs; report validation
    pairwise accuracy and the correlation of its score with the true rating."""
    if ctx.invoked_subcommand is not None:
        return
    from retroformer_cli.stages import reward

    _train(reward, RewardStageConfig, overrides, resume,
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
    from retroformer_cli.stages.common.checkpoints import resolve_checkpoint

    ws = workspace()
    path = resolve_checkpoint(ws, "reward", checkpoint)
    msgs = _read_prompt(prompt_file, prompt)
    scores = reward.load_scorer(path, ws.cache_dir)([msgs] * len(reflection), list(reflection))
    if state.json:
        console.print_json({"checkpoint": str(path), "scores": scores})
        return
    for r, s in zip(reflection, scores):
        console.stdout.print(f"{s:+.4f}  {r[:100]}", markup=False)
