"""`retroformer ppo`: GRPO fine-tuning of the reflector (``stages/ppo.py``). Options are the fields of
``stages.ppo.PPOStageConfig``; a YAML file comes with the global ``--config`` (also accepted after ``ppo``, so
``retroformer ppo --config configs/ppo.yaml`` works). Nothing heavy at import."""

from __future__ import annotations

import os

from retroformer_cli.commands.context import TRAIN_FLAGS, ResumeOpt, build, command_app, config_command, done, examples, workspace
from retroformer_cli.options import Flag
from retroformer_cli.stages.ppo import PPOStageConfig

PPO_FLAGS = (
    Flag("sft"), Flag("reward_model"), Flag("mode"), Flag("reward_metric"), Flag("actor"),
    Flag("num_generations", ("-G",)), Flag("prompts_per_step"), Flag("beta"), Flag("max_completion_length"),
    Flag("max_prompt_tokens"), Flag("online_concurrency"), Flag("device"), Flag("ray", metavar="ADDRESS"),
)

app = command_app()


@config_command(app.command("ppo", epilog=examples(
    "retroformer ppo --reward-model default --max-steps 20   (offline: the reward model's score)",
    "retroformer ppo --mode online --actor embedded --name online   (the replayed G(k+1) - G(k))",
    "retroformer ppo --mode online --reward-metric f1 --name online-f1   (HotPotQA: the answer F1 difference)",
    "retroformer ppo --name online --mode online --resume",
    "retroformer ppo --mode online --actor openai:gpt-4o-mini --ray auto   (the replays on a Ray cluster)",
    "accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m retroformer_cli ppo --config configs/ppo.yaml",
    "retroformer collect --reflector workspace:ppo/default --run retroformer")),
                PPOStageConfig, TRAIN_FLAGS, PPO_FLAGS)
def ppo(overrides: dict, resume: ResumeOpt = False) -> None:
    """Fine-tune the reflector with GRPO (clipped PPO surrogate, group-relative advantages, KL to the reference)."""
    from retroformer_cli import console
    from retroformer_cli.stages.ppo import run_ppo

    cfg = build(PPOStageConfig, overrides)
    ws = workspace()
    main = os.environ.get("RANK", "0") == "0"  # under accelerate launch, one process talks
    if main:
        metric = f" metric={cfg.reward_metric}" if cfg.mode == "online" else ""
        console.log(("ppo", "bold"), f" mode={cfg.mode}{metric} dataset={cfg.dataset} name={cfg.name} "
                                     f"steps={cfg.max_steps} G={cfg.num_generations} beta={cfg.beta} workspace={ws.root}")
    result = run_ppo(cfg, ws, console.RichProgress() if main else None, resume=resume)
    if not main:
        return
    m = result.metrics
    done(result, f"ppo '{result.name}' ({result.mode}) {result.steps} step(s), reward {m.get('reward_first')} -> "
                 f"{m.get('reward_last')}; checkpoint {result.path}",
         use=f"retroformer collect --reflector workspace:ppo/{result.name}")
