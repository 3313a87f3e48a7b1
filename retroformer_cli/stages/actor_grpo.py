"""Train the *actor* on our envs with TRL's GRPOTrainer and tool calls (``environment_factory``).

Beside Retroformer's reflector training (sft/reward/ppo), this recipe trains the acting policy itself: each
rollout is one episode in which the model calls the env's tools (HotPotQA ``search``/``lookup``/``finish``,
WebShop ``search``/``click``, ALFWorld ``act``), and the group-relative advantage comes from the episode
return (:mod:`retroformer_cli.envs.trl_tools`). Python API::

    from retroformer_cli.stages.actor_grpo import ActorGRPOConfig, run
    from retroformer_cli.workspace import Workspace
    result = run(ActorGRPOConfig(env="hotpotqa", max_steps=2), Workspace.open("ws"))

Script: ``python recipes/grpo_actor.py --help``. The LoRA adapter lands in ``checkpoints/actor-grpo/<name>``.

GRPO learns only from differences between the episodes of a group: a model that never emits a tool call (the
embedded 135M model, zero-shot) scores 0 in every episode, so its advantages and loss are 0. Such a model needs a
warm start (SFT on successful tool-call episodes) or a larger, tool-tuned model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroformer_cli.config import CollectConfig, setting, to_dict
from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.stages.common.progress import NullProgress, Progress, trainer_callback
from retroformer_cli.stages.common.results import ActorGRPOResult
from retroformer_cli.stages.common.training import LoraSettings
from retroformer_cli.workspace import Workspace, git_revision

STAGE = "actor-grpo"


@dataclass
class ActorGRPOConfig:
    """Settings of the actor GRPO recipe."""

    env: str = setting("hotpotqa", "environment: hotpotqa | webshop | alfworld, or an installed plugin env")
    data: str | None = setting(None, "env data file or folder; default: the env's sample data (ALFWorld: $ALFWORLD_DATA)")
    env_options: dict[str, Any] = setting(help="extra env constructor arguments", factory=dict)
    max_env_steps: int | None = setting(None, "per-episode step limit (env default when unset)")
    split: str = setting("train", "all | train | eval (deterministic by task id)")
    tasks: int | None = setting(None, "first N tasks of the split")
    task_ids: list[str] | None = setting(None, "exactly these tasks")
    model: str = setting("embedded", "embedded | a local transformers model folder")
    chat_template: str = setting("auto", "auto | model | tools (ours, for ChatML models without tool support)")
    reward: str = setting("em", "HotPotQA only: em | f1")
    name: str = setting("default", "checkpoint name under checkpoints/actor-grpo/")
    max_steps: int = setting(10, "optimizer steps")
    num_generations: int = setting(4, "episodes per task in a GRPO group")
    prompts_per_step: int = setting(1, "tasks per device per optimizer step")
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    beta: float = setting(0.0, "KL penalty to the base (adapter disabled)")
    epsilon: float = setting(0.2, "PPO clip range")
    loss_type: str = setting("dapo", "GRPO loss aggregation: dapo | grpo | dr_grpo | bnpo ...")
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = setting(512, "tokens of one episode: model turns plus tool results")
    max_tool_calls: int | None = setting(None, "tool-calling turns per episode [default: the env step limit]")
    logging_steps: int = 1
    seed: int = 0
    threads: int | None = setting(None, "torch threads on CPU [default: min(2, cores)]")
    gradient_checkpointing: bool = setting(False, "trade compute for memory (large models)")
    lora: LoraSettings = setting(help="the trained adapter", factory=LoraSettings)


def _validate(cfg: ActorGRPOConfig) -> None:
    from retroformer_cli.stages.common.names import check_name
    from retroformer_cli.llm.tool_chat import CHAT_TEMPLATE_MODES

    check_name(cfg.name)
    for key in ("max_steps", "num_generations", "prompts_per_step", "gradient_accumulation_steps",
                "max_completion_length", "logging_steps"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}.")
    if cfg.num_generations < 2:
        raise UsageError("--num-generations must be at least 2: GRPO compares the episodes of one task.")
    if cfg.max_tool_calls is not None and cfg.max_tool_calls < 1:
        raise UsageError(f"--max-tool-calls must be a positive integer, got {cfg.max_tool_calls!r}.")
    if cfg.chat_template not in CHAT_TEMPLATE_MODES:
        raise UsageError(f"Unknown chat template mode '{cfg.chat_template}' (--chat-template): "
                         f"choose {', '.join(CHAT_TEMPLATE_MODES)}.")


def build_env_and_tasks(cfg: ActorGRPOConfig, workspace: Workspace | None = None) -> tuple[Any, list[str]]:
    """The env (data loaded once, shared by every adapter) and the task ids to train on."""
    from retroformer_cli.envs import canonical_name, make_for
    from retroformer_cli.stages.collect import select_tasks

    ccfg = CollectConfig(env=canonical_name(cfg.env), data=cfg.data, split=cfg.split, tasks=cfg.tasks,
                         task_ids=cfg.task_ids, max_steps=cfg.max_env_steps, env_options=dict(cfg.env_options))
    if ccfg.env == "alfworld":
        ccfg.env_options.setdefault("process", False)  # TRL calls tools one at a time: no worker per instance
    env = make_for(ccfg, workspace.cache_dir if workspace is not None else None)
    return env, select_tasks([str(t) for t in env.task_ids()], ccfg)


def rows(adapter: Any, task_ids: list[str], system: str | None = None) -> list[dict[str, Any]]:
    """Dataset rows for GRPOTrainer: a conversational ``prompt`` with the env's instructions (TRL appends the
    first observation that ``reset`` returns) and the ``task_id`` that ``reset`` receives."""
    head = [{"role": "system", "content": system}] if system else []
    return [{"prompt": [*head, {"role": "user", "content": adapter.instructions + "\n\n"}], "task_id": t}
            for t in task_ids]


def load_model(cfg: ActorGRPOConfig, workspace: Workspace) -> tuple[Any, Any, str]:
    """(model, tokenizer, base label) of ``cfg.model`` (``embedded`` is converted once into the workspace cache)."""
    from retroformer_cli.llm.model_cache import set_offline
    from retroformer_cli.stages import sft as sft_stage
    from retroformer_cli.stages.common import training as tc

    set_offline()
    label, path = tc.resolve_base(cfg.model, workspace)
    model, tok = sft_stage.load_base_causal_lm(path)
    return model, tok, label


def grpo_args(cfg: ActorGRPOConfig, output_dir: Path, max_tool_calls: int) -> Any:
    from trl import GRPOConfig

    from retroformer_cli.stages.common import training as tc

    return GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, max_tool_calling_iterations=max_tool_calls,
        learning_rate=cfg.learning_rate, beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type,
        temperature=cfg.temperature, top_p=cfg.top_p, logging_steps=cfg.logging_steps, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
        remove_unused_columns=False, log_completions=False, **tc.precision_kwargs(),
    )


def _metrics(trainer: Any, out: Any, history: list[dict[str, Any]], n_rows: int) -> dict[str, Any]:
    steps = [h for h in history if "reward" in h]
    last = steps[-1] if steps else {}
    return {
        "global_step": trainer.state.global_step, "train_runtime_s": out.metrics.get("train_runtime"),
        "train_loss": out.metrics.get("train_loss"), "loss_last": last.get("loss"),
        "reward_first": steps[0].get("reward") if steps else None, "reward_last": last.get("reward"),
        "tool_calls_per_episode_last": last.get("tools/call_frequency"),
        "tool_failures_last": last.get("tools/failure_frequency"), "train_rows": n_rows,
    }


class _History:
    """Collects the trainer's log dicts (a TrainerCallback built lazily: transformers stays unimported)."""

    @staticmethod
    def callback(history: list[dict[str, Any]]) -> Any:
        from transformers import TrainerCallback

        class Keep(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
                if logs:
                    history.append({"step": state.global_step, **logs})

        return Keep()


def run(cfg: ActorGRPOConfig, workspace: Workspace, *, model: Any = None, tokenizer: Any = None,
        environment_factory: Any = None, callbacks: list | None = None,
        progress: Progress | None = None) -> ActorGRPOResult:
    """Train a LoRA adapter on the actor with GRPO over tool-calling episodes; ``model``/``tokenizer`` replace
    loading ``cfg.model`` and ``environment_factory`` the adapter's own factory (tests)."""
    from retroformer_cli.envs.trl_tools import adapter_for
    from retroformer_cli.llm import tool_chat
    from retroformer_cli.stages.common import training as tc

    _validate(cfg)
    adapter = adapter_for(cfg.env)
    options = {"reward": cfg.reward} if adapter.env_name == "hotpotqa" else {}
    if options:
        adapter.check_options(**options)
    elif cfg.reward != "em":
        raise UsageError(f"--reward applies to HotPotQA only; the {adapter.env_name} reward is the env's own.")
    env, task_ids = build_env_and_tasks(cfg, workspace)
    factory = environment_factory or adapter.factory(env, **options)
    max_tool_calls = cfg.max_tool_calls or int(getattr(env, "max_steps", 0) or 0) or None
    tc.set_threads(cfg.threads)
    tc.quiet_transformers(cfg.seed)
    base = "given"
    if model is None:
        model, tokenizer, base = load_model(cfg, workspace)
    elif tokenizer is None:
        raise UsageError("run(model=...) needs the tokenizer too.")
    template = tool_chat.install(tokenizer, cfg.chat_template)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return _train(cfg, workspace, model, tokenizer, factory, rows(adapter, task_ids), max_tool_calls,
                  dict(base=base, chat_template=template, callbacks=callbacks or [], progress=progress))


def _train(cfg: ActorGRPOConfig, workspace: Workspace, model: Any, tokenizer: Any, factory: Any,
           data: list[dict[str, Any]], max_tool_calls: int | None, extra: dict[str, Any]) -> ActorGRPOResult:
    import os
    import shutil
    import warnings

    from datasets import Dataset
    from trl import GRPOTrainer

    from retroformer_cli.stages.common import training as tc

    if not data:
        raise DataError("No tasks to train on: check --split, --tasks and --task-ids.")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is marked experimental in TRL 1.16
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    work = tc.work_dir(workspace, STAGE, cfg.name)
    shutil.rmtree(work, ignore_errors=True)
    history: list[dict[str, Any]] = []
    cbs = [_History.callback(history), *extra["callbacks"],
           trainer_callback(extra["progress"] or NullProgress(), f"actor-grpo {cfg.env}")]
    trainer = GRPOTrainer(model=model, args=grpo_args(cfg, work, max_tool_calls or 10**6),
                          train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                          peft_config=tc.lora_config(cfg.lora, "CAUSAL_LM"), environment_factory=factory,
                          callbacks=cbs)
    tc.drop_stdout_printer(trainer)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = round(time.perf_counter() - t0, 2)
    metrics = _metrics(trainer, out, history, len(data))
    final = workspace.checkpoint_dir(STAGE, cfg.name)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)

    def write(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp))
        tc.fix_adapter_base(tmp, extra["base"])
        tokenizer.save_pretrained(str(tmp))

    manifest = tc.checkpoint_manifest(STAGE, extra["base"], f"{cfg.env}:{cfg.split}", to_dict(cfg), metrics,
                                      trainer="trl.GRPOTrainer(environment_factory)", env=cfg.env,
                                      chat_template=extra["chat_template"], tasks=[r["task_id"] for r in data],
                                      log_history=history, seconds=seconds, git_revision=git_revision())
    tc.save_checkpoint(final, write, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return ActorGRPOResult(name=cfg.name, path=final, env=cfg.env, steps=trainer.state.global_step, seconds=seconds,
                           chat_template=extra["chat_template"], tasks=len(data), metrics=metrics,
                           log_history=history)


__all__ = ["ActorGRPOConfig", "ActorGRPOResult", "STAGE", "build_env_and_tasks", "load_model", "rows", "run"]
