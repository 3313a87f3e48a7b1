"""`retroformer ppo`: policy-gradient fine-tuning of the retrospective model (the reflector).

TRL 1.16 has no ``PPOTrainer``; we use its maintained ``GRPOTrainer``: PPO's clipped surrogate objective
with group-relative advantages (``num_generations`` reflections per failed trajectory, each scored, the
advantage is the reward minus the group mean) and a KL penalty ``beta`` to the reference model. The
policy is a LoRA adapter: started from the SFT checkpoint (the reference is then a frozen copy of the SFT
adapter) or from a fresh adapter on the base (the reference is the base, adapter disabled).

Rewards (``mode``):

* ``offline`` — the reward model's score of the generated reflection (the paper's setting);
* ``online`` — the true return difference G(k+1) − G(k), by replaying the actor's next trial with the
  candidate reflection in its memory (see :mod:`retroformer_cli.stages.ppo_rewards`); ``reward_metric``
  chooses the episode value: ``score`` (the env's return), ``success`` (1/0) or ``f1`` (HotPotQA's answer F1,
  a denser signal than exact match).

Every final checkpoint holds ``metrics.jsonl`` (one JSON object per logged step: loss, reward, reward_std, kl,
frac_reward_zero_std, online/* ...); ``report_to`` also sends the logs to transformers' integrations.

Python API::

    from retroformer_cli.stages.ppo import PPOStageConfig, run_ppo
    from retroformer_cli.workspace import Workspace
    result = run_ppo(PPOStageConfig(reward_model="default", max_steps=2), Workspace.open("ws"))

The checkpoint lands in ``<checkpoints>/ppo/<name>/`` (adapter + tokenizer + ``retroformer_checkpoint.json``,
written atomically) and works as a reflector: ``retroformer collect --reflector workspace:ppo/<name>``.
Trainer checkpoints (and the online replay cache) go to ``<checkpoints>/ppo/.work-<name>/``; ``resume=True``
continues from the newest ``checkpoint-N`` there, and ``state.json`` there says whether the training is running
or was interrupted (Ctrl-C or SIGTERM), failed or completed. Under ``accelerate launch`` every process samples and
scores its share of the completions; only the main process writes the final checkpoint.
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from retroformer_cli import __version__
from retroformer_cli.config import setting, to_dict
from retroformer_cli.errors import DataError, RetroformerError, UsageError
from retroformer_cli.stages.common.checkpoints import latest_trainer_checkpoint, resume_checkpoint, resolve_checkpoint
from retroformer_cli.stages.common.names import check_name
from retroformer_cli.stages.common.progress import NullProgress, Progress, metrics_info, trainer_callback
from retroformer_cli.stages.common.results import PPOResult
from retroformer_cli.stages.ppo_rewards import METRICS as REWARD_METRICS
from retroformer_cli.stages.common.training import LoraSettings, TrainerSettings, report_to_list
from retroformer_cli.workspace import Workspace, git_revision

MODES = ("offline", "online")


@dataclass
class PPOStageConfig(TrainerSettings):
    """`retroformer ppo` settings (defaults < ``--config ppo.yaml`` < flags)."""

    # what is trained, from what, against which reward
    dataset: str = setting("ratings", "dataset folder under <workspace>/datasets/ (prompts.*.jsonl)")
    sft: str | None = setting(None, "SFT checkpoint: NAME under checkpoints/sft/ or a folder; 'none': base + fresh LoRA; unset: sft/default if present")
    base: str = setting("embedded", "base model without --sft: embedded | a local model folder")
    reward_model: str | None = setting(None, "offline mode: reward checkpoint NAME under checkpoints/reward/ or a folder; unset: reward/default")
    mode: str = setting("offline", "offline (reward model score) | online (replayed G(k+1) - G(k))")
    reward_metric: str = setting("score", "online mode: the episode value whose change from trial k to the replayed trial k+1 is the reward: score | success | f1 (f1: HotPotQA's answer F1)")
    actor: str | None = setting(None, "online mode: actor model spec; default: each run's actor")
    name: str = setting("default", "checkpoint name under checkpoints/ppo/")
    # GRPO
    max_steps: int = setting(20, "optimizer steps")
    num_generations: int = setting(4, "reflections sampled per prompt (the GRPO group)")
    prompts_per_step: int = setting(2, "prompts per device per optimizer step")
    gradient_accumulation_steps: int = setting(1, "gradient accumulation steps")
    learning_rate: float = setting(1e-5, "learning rate")
    beta: float = setting(0.04, "KL penalty to the reference (SFT policy or base)")
    epsilon: float = setting(0.2, "PPO clip range")
    loss_type: str = setting("dapo", "GRPO loss aggregation: dapo | grpo | dr_grpo | bnpo ...")
    scale_rewards: str = setting("group", "group | batch | none")
    # sampling the reflections
    temperature: float = setting(1.0, "sampling temperature of the reflections")
    top_p: float = setting(1.0, "nucleus sampling of the reflections")
    max_completion_length: int = setting(64, "max tokens of a sampled reflection")
    max_prompt_tokens: int = setting(2048, "prompts longer than this are skipped (TRL no longer truncates)")
    # the trainer
    save_steps: int = setting(10, "trainer checkpoint every N steps (for --resume)")
    save_total_limit: int = setting(2, "trainer checkpoints kept")
    logging_steps: int = setting(1, "log metrics every N steps")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N: where the online actor's local model runs; cpu also trains the policy on the CPU (on a GPU the trainer uses the devices accelerate gives it); the checkpoint manifest records the devices and dtypes used")
    gradient_checkpointing: bool = setting(False, "trade compute for memory (large models)")
    online_concurrency: int = setting(8, "online mode: episodes replayed at once")
    ray: str | None = setting(None, "online mode: replay on a Ray cluster: local (start one here), auto (join this machine's) or HOST:PORT (needs the 'ray' extra; docs/cluster.md)")
    online_memory_size: int | None = setting(None, "online mode: reflections in memory [default: the run's]")
    lora: LoraSettings = setting(help="a fresh adapter (no SFT checkpoint)", factory=LoraSettings)


class PPOInterrupted(RetroformerError):
    exit_code = 130

    def __init__(self, name: str, last_checkpoint: str | None):
        saved = f"the last trainer checkpoint is {Path(last_checkpoint).name}" if last_checkpoint else "no trainer checkpoint was saved yet"
        super().__init__(f"Interrupted: ppo '{name}' stopped; {saved}.",
                         hint=f"continue with: retroformer ppo --name {name} --resume (same options)")


# ---------------------------------------------------------------------------------------------- helpers
def resolve_inputs(cfg: PPOStageConfig, workspace: Workspace, need_reward: bool = True) -> tuple[Path | None, Path | None]:
    """(SFT adapter folder or None, reward checkpoint folder or None), applying the defaults: an unset
    ``sft`` uses ``sft/default`` when it exists (else the base + a fresh adapter); an unset ``reward_model``
    uses ``reward/default`` in offline mode."""
    sft = None
    if cfg.sft is None:
        if (workspace.checkpoint_dir("sft", "default") / "adapter_config.json").is_file():
            sft = workspace.checkpoint_dir("sft", "default")
    elif cfg.sft.lower() != "none":
        sft = resolve_checkpoint(workspace, "sft", cfg.sft, "--sft")
    reward = None
    if cfg.mode == "offline" and need_reward:
        if cfg.reward_model is None:
            if not workspace.checkpoint_dir("reward", "default").is_dir():
                raise UsageError("Offline mode needs a reward model (--reward-model NAME): there is no reward/default "
                                 f"checkpoint in {workspace.checkpoints_dir}.",
                                 hint="train one with `retroformer reward`, or use --mode online")
            reward = workspace.checkpoint_dir("reward", "default")
        else:
            reward = resolve_checkpoint(workspace, "reward", cfg.reward_model, "--reward-model")
    return sft, reward


def _load_rows(workspace: Workspace, dataset: str, split: str) -> list[dict[str, Any]]:
    """RL prompt rows of a dataset built by `retroformer datasets build` (prefill already stripped there)."""
    from retroformer_cli.stages.datasets import read_split

    return list(read_split(workspace, dataset, "prompts", split))


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text exactly as the local backend renders it for the reflector (a prefilled assistant
    turn such as ``Reflection:`` is continued, not closed)."""
    if getattr(tokenizer, "chat_template", None):
        if messages and messages[-1]["role"] == "assistant":
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from retroformer_cli.llm.base import Message, messages_to_prompt

    return messages_to_prompt([Message(m["role"], m["content"]) for m in messages])


def build_train_dataset(rows: list[dict[str, Any]], tokenizer: Any, max_prompt_tokens: int) -> tuple[Any, int]:
    """A ``datasets.Dataset`` with a text ``prompt`` (rendered), the chat ``chat`` for the reward model, and
    ``task_id``/``run``/``trial``/``env`` for the online reward. Returns (dataset, skipped long prompts)."""
    from datasets import Dataset

    cols: dict[str, list] = {"prompt": [], "chat": [], "task_id": [], "run": [], "trial": [], "env": []}
    skipped = 0
    for i, r in enumerate(rows):
        chat = r.get("prompt")
        if not isinstance(chat, list) or not chat:
            raise DataError(f"Prompt row {i + 1} has no chat 'prompt' (a list of messages).")
        text = render_prompt(tokenizer, chat)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            skipped += 1
            continue
        cols["prompt"].append(text)
        cols["chat"].append([{"role": m["role"], "content": m["content"]} for m in chat])
        # imported rows (rating TSV, Reflexion logs) have no run or trial: keep them typed, not "None"
        cols["task_id"].append(str(r.get("task_id") or ""))
        cols["run"].append(str(r.get("run") or ""))
        cols["trial"].append(int(r.get("trial") or 0))
        cols["env"].append(str(r.get("env") or ""))
    return Dataset.from_dict(cols), skipped


def load_policy(cfg: PPOStageConfig, workspace: Workspace, sft: Path | None) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, peft_config or None, base label). From an SFT adapter: the adapter attached and
    trainable (TRL then keeps a frozen copy as the KL reference); else the base and a fresh LoRA config
    (the reference is the base, adapter disabled)."""
    from retroformer_cli.llm.model_cache import is_adapter_dir, read_adapter_base, set_offline
    from retroformer_cli.stages import sft as sft_stage
    from retroformer_cli.stages.common import training as tc

    set_offline()
    if sft is not None:
        if not is_adapter_dir(sft):
            raise UsageError(f"The SFT checkpoint '{sft}' is not a LoRA adapter folder (no adapter_config.json) (--sft).")
        model, tok = sft_stage.load_policy(str(sft), workspace.cache_dir)
        return model, tok, None, read_adapter_base(sft)
    label, path = tc.resolve_base(cfg.base, workspace)
    model, tok = sft_stage.load_base_causal_lm(path)
    return model, tok, tc.lora_config(cfg.lora, "CAUSAL_LM"), label


def grpo_args(cfg: PPOStageConfig, output_dir: Path, use_cpu: bool) -> Any:
    """The ``GRPOConfig`` our stage trains with (also used by the benchmark for the direct call)."""
    import torch
    from trl import GRPOConfig

    from retroformer_cli.stages.common import training as tc

    bf16 = (not use_cpu) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, learning_rate=cfg.learning_rate, beta=cfg.beta,
        epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        temperature=cfg.temperature, top_p=cfg.top_p, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, disable_tqdm=True,
        seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=use_cpu, bf16=bf16,
        remove_unused_columns=False, log_completions=False, **tc.report_kwargs(cfg.report_to, "ppo", cfg.name),
    )


def _validate(cfg: PPOStageConfig, workspace: Workspace) -> None:
    if cfg.mode not in MODES:
        raise UsageError(f"Unknown reward mode '{cfg.mode}' (--mode): choose offline or online.")
    if cfg.reward_metric not in REWARD_METRICS:
        raise UsageError(f"Unknown --reward-metric '{cfg.reward_metric}': choose {', '.join(REWARD_METRICS)}.")
    if cfg.ray is not None and cfg.mode != "online":
        raise UsageError("--ray runs the online replays on a cluster: it needs --mode online.")
    check_name(cfg.name)
    report_to_list(cfg.report_to)  # unknown or not installed: fails before the model loads
    for key in ("max_steps", "num_generations", "prompts_per_step", "gradient_accumulation_steps",
                "max_completion_length", "save_steps", "logging_steps", "online_concurrency"):
        if getattr(cfg, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(cfg, key)}.")
    if cfg.num_generations < 2:
        raise UsageError("--num-generations must be at least 2: GRPO's advantage compares reflections of one prompt.")
    if cfg.beta < 0:
        raise UsageError(f"--beta must not be negative, got {cfg.beta}.")
    from retroformer_cli.llm.engine.model import check_device

    check_device(cfg.device)  # `--device cuda` on a machine without one: one line now, not at the first replay


def _info(logs: dict[str, Any]) -> str:
    return metrics_info(logs, ("reward", "reward_std", "kl", "loss", "online/episodes"), exact=True)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"retroformer": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _training_rows(cfg: PPOStageConfig, workspace: Workspace) -> tuple[list[dict[str, Any]], int]:
    """(RL prompt rows, rows dropped in online mode because their run is not in this workspace)."""
    rows = _load_rows(workspace, cfg.dataset, "train")
    skipped_runs = 0
    if cfg.mode == "online":  # imported logs have no run to replay
        known = set(workspace.list_run_names())
        kept = [r for r in rows if r.get("run") in known]
        skipped_runs, rows = len(rows) - len(kept), kept
    if not rows:
        why = " from a run of this workspace (online mode replays runs)" if cfg.mode == "online" else ""
        raise DataError(f"Dataset '{cfg.dataset}' has no RL training prompts{why} (--dataset).",
                        hint="prompts are failed trials followed by another trial: collect with --trials 2 or more")
    return rows, skipped_runs


def _reward_function(cfg: PPOStageConfig, workspace: Workspace, work: Path, process_index: int, runs: list[str],
                     reward_path: Path | None, scorer: Callable | None, actor_client: Any) -> tuple[Any, Any]:
    """(the reward function TRL calls, the OnlineReward to close afterwards or None)."""
    from retroformer_cli.stages.ppo_rewards import OfflineReward, OnlineReward

    if cfg.mode == "offline":
        if scorer is None:
            from retroformer_cli.stages.reward import load_scorer

            scorer = load_scorer(str(reward_path), workspace.cache_dir)
        return OfflineReward(scorer), None
    work.mkdir(parents=True, exist_ok=True)
    online = OnlineReward(workspace, actor=actor_client if actor_client is not None else cfg.actor,
                          concurrency=cfg.online_concurrency, memory_size=cfg.online_memory_size, metric=cfg.reward_metric,
                          cache_path=work / f"online_cache.{process_index}.jsonl", threads=cfg.threads,
                          cache_glob=str(work / "online_cache.*.jsonl"), device=cfg.device, ray=cfg.ray)
    for r in runs:
        online.context(r)  # an unreadable run, a bad --actor or a --reward-metric the env lacks fails now, not mid-step
    return online, online


def _metrics(global_step: int, train_metrics: dict[str, Any], history: list[dict[str, Any]],
             **counts: int) -> dict[str, Any]:
    steps = [h for h in history if "reward" in h]
    last = steps[-1] if steps else {}
    return {
        "global_step": global_step, "train_runtime_s": train_metrics.get("train_runtime"),
        "train_loss": train_metrics.get("train_loss"), "reward_first": steps[0].get("reward") if steps else None,
        "reward_last": last.get("reward"), "reward_mean": (sum(h["reward"] for h in steps) / len(steps)) if steps else None,
        "kl_last": last.get("kl"), "loss_last": last.get("loss"), **counts,
    }


def _devices(cfg: PPOStageConfig, args: Any, online: Any) -> dict[str, Any]:
    """Where the policy trained and the online actor ran, with their dtypes (for the checkpoint manifest)."""
    out: dict[str, Any] = {"requested": cfg.device, "policy": "cpu" if args.use_cpu else "cuda",
                           "policy_dtype": "bfloat16 (mixed)" if args.bf16 else "float32"}
    if online is not None:
        out["online_actor"] = online.devices()
    return out


def _save(cfg: PPOStageConfig, trainer: Any, tokenizer: Any, result: PPOResult, *, base: str, sft: Path | None,
          reward: Path | None, runs: list[str], devices: dict[str, Any]) -> None:
    """Write the final checkpoint (the trained adapter, not TRL's frozen "ref" copy) and its manifest."""
    from retroformer_cli.stages.common import training as tc

    peft_model = trainer.accelerator.unwrap_model(trainer.model)

    def write(tmp: Path) -> None:
        import warnings

        with warnings.catch_warnings():  # peft cannot read a config of the base 'embedded' (a name, not a folder)
            warnings.filterwarnings("ignore", message=".*Could not find a config file.*", category=UserWarning)
            peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
        tc.fix_adapter_base(tmp, base)
        tokenizer.save_pretrained(str(tmp))
        tc.write_metrics_jsonl(tmp, trainer.state.log_history)

    manifest = tc.checkpoint_manifest(
        "ppo", base, cfg.dataset, to_dict(cfg), result.metrics, sft=str(sft) if sft else None,
        reward={"mode": cfg.mode, "reward_model": str(reward) if reward else None,
                "actor": cfg.actor if cfg.mode == "online" else None,
                "metric": cfg.reward_metric if cfg.mode == "online" else None},
        trainer="trl.GRPOTrainer", runs=runs, devices=devices, log_history=result.log_history,
        resumed_from=result.resumed_from,
        seconds=result.seconds, versions=_versions(), git_revision=git_revision())
    tc.save_checkpoint(result.path, write, manifest)


# ---------------------------------------------------------------------------------------------- the stage
def run_ppo(cfg: PPOStageConfig, workspace: Workspace, progress: Progress | None = None, *, resume: bool = False,
            scorer: Callable | None = None, actor_client: Any = None, callbacks: list | None = None) -> PPOResult:
    """Train the reflector with GRPO; ``scorer``/``actor_client`` replace the reward model / actor (tests)."""
    from retroformer_cli.stages.common import training as tc

    _validate(cfg, workspace)
    progress = progress or NullProgress()
    final = workspace.checkpoint_dir("ppo", cfg.name)
    work = tc.work_dir(workspace, "ppo", cfg.name)  # trainer checkpoints + online replay cache
    rows, skipped_runs = _training_rows(cfg, workspace)
    sft_path, reward_path = resolve_inputs(cfg, workspace, need_reward=scorer is None)
    resume_from = resume_checkpoint(work, "ppo", cfg.name) if resume else None

    import torch
    from accelerate import PartialState

    dist = PartialState()  # one process, or one of several under `accelerate launch`
    if not resume and dist.is_main_process and work.exists():
        shutil.rmtree(work)  # a fresh start never resumes from an older run's checkpoints
    dist.wait_for_everyone()

    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if use_cpu:
        tc.set_threads(cfg.threads)
    model, tokenizer, peft_config, base = load_policy(cfg, workspace, sft_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, skipped = build_train_dataset(rows, tokenizer, cfg.max_prompt_tokens)
    if len(dataset) == 0:
        raise DataError(f"All {len(rows)} prompts of '{cfg.dataset}' are longer than --max-prompt-tokens "
                        f"({cfg.max_prompt_tokens}).")

    reward_fn, online = _reward_function(cfg, workspace, work, dist.process_index, sorted(set(dataset["run"])),
                                         reward_path, scorer, actor_client)
    import warnings

    from transformers import PrinterCallback
    from trl import GRPOTrainer

    # transformers 5 renames gradient_checkpointing; TRL 1.16 still passes the old name
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    history: list[dict[str, Any]] = []
    report = trainer_callback(progress, f"ppo {cfg.name}", history=history, info=_info)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn], args=grpo_args(cfg, work, use_cpu),
                          train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
                          callbacks=[report, *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout, which is for --json data
    t0 = time.perf_counter()
    mark = _state_writer(work, cfg.name, resume_from, dist.is_main_process)
    mark("running")
    try:
        with tc.stop_on_signals(trainer):  # SIGTERM as Ctrl-C, never mid-checkpoint
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        if online is not None:
            online.cancel()  # the replays in flight on TRL's event loop
        lc = latest_trainer_checkpoint(work)
        mark("interrupted", lc)
        raise PPOInterrupted(cfg.name, str(lc) if lc else None) from None
    except BaseException:
        mark("failed", latest_trainer_checkpoint(work))
        raise
    finally:
        progress.finish(report.handle)
        if online is not None:
            online.close()
    seconds = round(time.perf_counter() - t0, 2)
    metrics = _metrics(trainer.state.global_step, out.metrics, history, train_rows=len(dataset),
                       skipped_long_prompts=skipped, skipped_unknown_runs=skipped_runs)
    if online is not None:
        metrics.update(online_episodes=online.episodes, online_cache_hits=online.hits)
    result = PPOResult(name=cfg.name, path=final, mode=cfg.mode, steps=trainer.state.global_step, seconds=seconds,
                       metrics=metrics, log_history=history, resumed_from=resume_from.name if resume_from else None,
                       rows=len(dataset), skipped_long_prompts=skipped)
    if trainer.is_world_process_zero():
        _save(cfg, trainer, tokenizer, result, base=base, sft=sft_path, reward=reward_path,
              runs=sorted(set(dataset["run"])), devices=_devices(cfg, trainer.args, online))
    trainer.accelerator.wait_for_everyone()
    mark("completed", latest_trainer_checkpoint(work))
    return result


def _state_writer(work: Path, name: str, resume_from: Path | None, main: bool) -> Callable[..., None]:
    """``mark(status, last_checkpoint=None)``: ``<work>/state.json`` says what became of this training (running,
    interrupted, failed, completed) and the newest complete trainer checkpoint (what ``--resume`` continues from)."""
    from retroformer_cli.store import write_json_atomic
    from retroformer_cli.workspace import now_iso

    started = now_iso()

    def mark(status: str, last_checkpoint: Path | None = None) -> None:
        if main:
            write_json_atomic(work / "state.json", {
                "stage": "ppo", "name": name, "status": status, "started_at": started, "updated_at": now_iso(),
                "resumed_from": resume_from.name if resume_from else None,
                "last_checkpoint": last_checkpoint.name if last_checkpoint else None})

    return mark
