"""`retroformer ppo`: GRPO fine-tuning of the reflector (``stages/ppo.py``). Options are the fields of
``stages.ppo.PPOStageConfig``; a YAML file comes with the global ``--config`` (also accepted after ``ppo``, so
``retroformer ppo --config configs/ppo.yaml`` works). Nothing heavy at import."""

from __future__ import annotations

import os

from retroformer_cli.commands._common import TRAIN_FLAGS, ResumeOpt, build, command_app, handle_errors, state, workspace
from retroformer_cli.options import Flag, config_options
from retroformer_cli.stages.ppo import PPOStageConfig

PPO_FLAGS = (
    Flag("sft"), Flag("reward_model"), Flag("mode"), Flag("actor"), Flag("num_generations", ("-G",)),
    Flag("prompts_per_step"), Flag("beta"), Flag("max_completion_length"), Flag("max_prompt_tokens"),
    Flag("online_concurrency"),
)

app = command_app()


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


@app.command("ppo", epilog=(
    "Examples:\n\n"
    "  retroformer ppo --reward-model default --max-steps 20   (offline: the reward model's score)\n\n"
    "  retroformer ppo --mode online --actor embedded --name online   (the replayed G(k+1) - G(k))\n\n"
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
        console.stderr.print(f"[bold]ppo[/] mode={cfg.mode} dataset={cfg.dataset} name={cfg.name} steps={cfg.max_steps} "
                             f"G={cfg.num_generations} beta={cfg.beta} workspace={ws.root}")
    result = run_ppo(cfg, ws, _PPORichProgress(f"ppo {cfg.name}") if main else None, resume=resume)
    if not main:
        return
    if state.json:
        console.print_json(result.to_json())
    m = result.metrics
    console.stderr.print(f"[green]done[/]: ppo '{result.name}' ({result.mode}) {result.steps} step(s), reward "
                         f"{m.get('reward_first')} -> {m.get('reward_last')}; checkpoint {result.path}\n"
                         f"[dim]use it: retroformer collect --reflector workspace:ppo/{result.name}[/]")
