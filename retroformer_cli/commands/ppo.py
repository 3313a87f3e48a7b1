"""`retroformer ppo`: GRPO fine-tuning of the reflector (``stages/ppo.py``). Options are the fields of
``stages.ppo.PPOStageConfig``; a YAML file comes with the global ``--config`` (also accepted after ``ppo``, so
``retroformer ppo --config configs/ppo.yaml`` works). Nothing heavy at import."""

from __future__ import annotations

import os

from retroformer_cli.commands._common import TRAIN_FLAGS, ResumeOpt, build, command_app, handle_errors, state, workspace
from retroformer_cli.options import Flag, config_options
from retroformer_cli.stages.ppo import PPOStageConfig

PPO_FLAGS = (
    Flag("sft"), Flag("reward_model"), Flag("mode"), Flag("reward_metric"), Flag("actor"),
    Flag("num_generations", ("-G",)), Flag("prompts_per_step"), Flag("beta"), Flag("max_completion_length"),
    Flag("max_prompt_tokens"), Flag("online_concurrency"), Flag("device"),
)

app = command_app()


@app.command("ppo", epilog=(
    "Examples:\n\n"
    "  retroformer ppo --reward-model default --max-steps 20   (offline: the reward model's score)\n\n"
    "  retroformer ppo --mode online --actor embedded --name online   (the replayed G(k+1) - G(k))\n\n"
    "  retroformer ppo --mode online --reward-metric f1 --name online-f1   (HotPotQA: the answer F1 difference)\n\n"
    "  retroformer ppo --name online --mode online --resume\n\n"
    "  accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m retroformer_cli ppo --config configs/ppo.yaml\n\n"
    "  retroformer collect --reflector workspace:ppo/default --run retroformer"))
@handle_errors
@config_options(PPOStageConfig, TRAIN_FLAGS, PPO_FLAGS)
def ppo(overrides: dict, resume: ResumeOpt = False) -> None:
    """Fine-tune the reflector with GRPO (clipped PPO surrogate, group-relative advantages, KL to the reference)."""
    from retroformer_cli import console
    from retroformer_cli.stages.ppo import run_ppo

    cfg = build(PPOStageConfig, overrides)
    ws = workspace()
    main = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process talks
    if main:
        metric = f" metric={cfg.reward_metric}" if cfg.mode == "online" else ""
        console.stderr.print(f"[bold]ppo[/] mode={cfg.mode}{metric} dataset={cfg.dataset} name={cfg.name} steps={cfg.max_steps} "
                             f"G={cfg.num_generations} beta={cfg.beta} workspace={ws.root}")
    result = run_ppo(cfg, ws, console.RichProgress() if main else None, resume=resume)
    if not main:
        return
    if state.json:
        console.print_json(result.to_json())
    m = result.metrics
    console.stderr.print(f"[green]done[/]: ppo '{result.name}' ({result.mode}) {result.steps} step(s), reward "
                         f"{m.get('reward_first')} -> {m.get('reward_last')}; checkpoint {result.path}\n"
                         f"[dim]use it: retroformer collect --reflector workspace:ppo/{result.name}[/]")
