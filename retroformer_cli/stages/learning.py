"""Does training help? One reproducible experiment: a tuned actor, a reflector trained on the return difference,
measured against the frozen reflector on held-out tasks.

Stages, each skipped when its output is already in the workspace (so a stopped experiment resumes):

1. ``datasets actor`` + ``sft --role actor``: the actor learns (LoRA, FireAct-style) from successful trajectories of
   train-split tasks, without few-shot examples in its prompt. This is what makes headroom: an actor that follows
   a reflection.
2. ``collect`` on the train split with the frozen reflector (the base model), the tuned actor.
3. ``datasets build`` on that run, ``sft`` of the reflector on its improving reflections (when there are any),
   then ``ppo --mode online`` with the dense reward (``reward_metric``, HotPotQA: ΔF1).
4. ``collect`` on the eval split (tasks no stage trained on), one run per arm: ``none``, ``frozen``, ``sft``,
   ``ppo`` and the diagnostics ``oracle`` and ``oracle-leak``, all with the tuned actor; and ``none`` / ``oracle`` /
   ``oracle-leak`` with the base actor, for the headroom the tuning made.
5. Paired comparisons against ``frozen`` (mean metric and success at every trial), the learning curve of PPO
   (reward, KL, share of GRPO groups with zero reward variance) and one HTML report, plus a verdict that names
   the lever that failed when trained − frozen is not above 0.

Python API: ``run(LearningConfig(...), Workspace.open("ws"))``; the recipe ``recipes/learning.py`` and
``benchmarks/learning.py`` call it.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from retroformer_cli.config import setting
from retroformer_cli.errors import UsageError
from retroformer_cli.workspace import Workspace, now_iso

ARMS = ("none", "frozen", "rule", "sft", "ppo", "oracle", "oracle-leak")
BASE_ARMS = ("none", "oracle", "oracle-leak")
METRICS = ("score", "f1")


@dataclass
class LearningConfig:
    """The experiment's settings (``configs/learning.yaml``); sizes here fit about 90 minutes on a 2-core CPU."""

    env: str = setting("hotpotqa", "environment")
    data: str | None = setting(None, "the env's data (as for collect)")
    name: str = setting("learning", "prefix of every run, dataset and checkpoint it writes")
    reuse: str | None = setting(
        None, "an earlier experiment's name: reuse its tuned actor, training run, ratings and the arms that do not "
        "depend on the trained reflector (a lever that only changes the reflector's training)")
    seed: int = setting(0, "seed of every stage")
    threads: int | None = setting(None, "torch threads of every stage")
    concurrency: int = setting(8, "episodes at once (collect and online replays)")
    isolate: bool = setting(True, "run each stage that loads a model in its own process")
    # 1. the actor
    actor_base: str = setting("embedded", "the actor's base model")
    actor_sft_steps: int = setting(80, "actor SFT steps (0: use the base actor with few-shot prompts)")
    actor_sft_batch_size: int = setting(4, "actor SFT batch size")
    actor_sft_learning_rate: float = setting(2e-4, "actor SFT learning rate")
    actor_import_reflexion: list[str] = setting(help="Reflexion HotPotQA logs whose successful trajectories join the actor's SFT data", factory=list)
    actor_expert: bool = setting(True, "the env's expert trajectories join the actor's SFT data")
    actor_expert_reflection_share: float = setting(0.5, "share of expert trajectories shown with the oracle hint as a reflection")
    actor_max_tokens: int = setting(64, "max new tokens per actor step")
    actor_lora_r: int = setting(16, "LoRA rank of the actor (a new prompt format needs more than r=2)")
    actor_lora_targets: list[str] = setting(help="modules that get the actor's adapter", factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # 2. training episodes
    train_tasks: int | None = setting(48, "train-split tasks collected with the frozen reflector")
    train_trials: int = setting(2, "trials per train task")
    # 3. the reflector
    reflector_base: str = setting("embedded", "the reflector's base (frozen arm and training)")
    reflector_sft_steps: int = setting(10, "reflector SFT steps on improving reflections (0: skip)")
    warm_start: str = setting(
        "none", "none: the reflector's SFT data are the frozen reflector's improving reflections | rule: the model-free "
        "rule reflector also plays the train split, and its reflections whose F1 improved are the SFT data")
    ppo_steps: int = setting(12, "GRPO steps with the online reward")
    num_generations: int = setting(4, "reflections per prompt (the GRPO group)")
    prompts_per_step: int = setting(2, "prompts per GRPO step")
    reward_metric: str = setting("f1", "online reward: score | success | f1")
    ppo_learning_rate: float = setting(5e-5, "GRPO learning rate")
    beta: float = setting(0.04, "KL penalty")
    temperature: float = setting(1.0, "sampling temperature of the reflections in GRPO")
    max_completion_length: int = setting(64, "max tokens of a sampled reflection")
    ppo_max_prompt_tokens: int = setting(1024, "reflection prompts longer than this are left out of GRPO (CPU attention memory grows with its square)")
    gradient_checkpointing: bool = setting(True, "GRPO recomputes activations (less memory)")
    # 4. evaluation
    eval_tasks: int | None = setting(None, "eval-split tasks (all when unset)")
    eval_trials: int = setting(2, "trials per eval task")
    arms: list[str] = setting(help="reflectors evaluated with the tuned actor", factory=lambda: list(ARMS))
    base_arms: list[str] = setting(help="reflectors evaluated with the base actor (headroom before tuning); empty to skip", factory=lambda: list(BASE_ARMS))
    metric: str = setting("f1", "the compared metric at the last trial: score | f1")
    bootstrap: int = setting(10000, "bootstrap resamples of the paired interval")


# ------------------------------------------------------------------------------------------------ statistics
def paired_mean_difference(a: Sequence[float], b: Sequence[float], resamples: int = 10000,
                           seed: int = 0) -> dict[str, float]:
    """Mean of a − b over paired tasks with a percentile bootstrap 95% interval (tasks resampled, seeded).

    >>> paired_mean_difference([1, 1, 1, 0], [0, 0, 1, 0], resamples=2000)["difference"]
    0.5
    """
    if len(a) != len(b):
        raise ValueError("paired values must cover the same tasks")
    n = len(a)
    if n == 0:
        return {"tasks": 0, "difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    d = [float(x) - float(y) for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo, hi = means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))]
    return {"tasks": n, "difference": sum(d) / n, "ci_low": lo, "ci_high": hi,
            "won": sum(x > 0 for x in d), "lost": sum(x < 0 for x in d)}


def value_at(trials_by_k: dict[int, Any], k: int, metric: str) -> float:
    """A task's metric at trial k: its latest trial up to k (a task solved earlier keeps that trial)."""
    done = [j for j in trials_by_k if j <= k]
    if not done:
        return 0.0
    t = trials_by_k[max(done)]
    if metric == "f1":
        return float(t.info.get("f1", 0.0) or 0.0)
    return float(t.score)


def solved_by(trials_by_k: dict[int, Any], k: int) -> bool:
    return any(t.success for j, t in trials_by_k.items() if j <= k)


# ------------------------------------------------------------------------------------------------ the stages
def _child_main(fn: Any, args: tuple, kwargs: dict, rich: bool) -> Any:
    from retroformer_cli.stages.common.training import quiet_transformers

    quiet_transformers()  # a fresh process: no load bars or deprecation notices on stderr
    if "progress" in kwargs:
        from retroformer_cli.stages.common.progress import NullProgress

        if rich:
            from retroformer_cli import console

            kwargs["progress"] = console.RichProgress()
        else:
            kwargs["progress"] = NullProgress()
    return fn(*args, **kwargs)


def _in_child(fn: Any, args: tuple, kwargs: dict, progress: Any) -> Any:
    """``fn(*args, **kwargs)`` in a spawned process (its result and exceptions come back pickled)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rich = type(progress).__name__ == "RichProgress"
    kwargs = {k: (None if k == "progress" else v) for k, v in kwargs.items()}
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child_main, fn, args, kwargs, rich).result()


class _Stages:
    def __init__(self, cfg: LearningConfig, workspace: Workspace, progress: Any):
        self.cfg, self.ws, self.progress = cfg, workspace, progress
        self.timings: dict[str, float] = {}

    def say(self, msg: str) -> None:
        print(f"[learning {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def timed(self, label: str, fn: Any, *args: Any, isolate: bool = False, **kwargs: Any) -> Any:
        """Run one stage; ``isolate`` runs it in a fresh process (stages that load models: memory a trainer held
        goes back to the system when the stage ends, instead of piling up over the experiment)."""
        t0 = time.perf_counter()
        self.say(f"{label} ...")
        out = _in_child(fn, args, kwargs, self.progress) if isolate and self.cfg.isolate else fn(*args, **kwargs)
        self.timings[label] = round(time.perf_counter() - t0, 1) + self.timings.get(label, 0.0)
        self.say(f"{label} done in {self.timings[label]:.0f} s")
        return out

    # names: this experiment's own outputs, and those shared with the one it reuses
    def n(self, suffix: str) -> str:
        return f"{self.cfg.name}-{suffix}"

    def shared(self, suffix: str) -> str:
        return f"{self.cfg.reuse or self.cfg.name}-{suffix}"

    def eval_run(self, arm: str) -> str:
        return self.n(f"eval-{arm}") if arm in ("sft", "ppo") else self.shared(f"eval-{arm}")

    @property
    def tuned(self) -> bool:
        return self.cfg.actor_sft_steps > 0

    @property
    def actor_spec(self) -> str:
        return f"workspace:sft/{self.shared('actor')}" if self.tuned else self.cfg.actor_base

    def reflector_spec(self, arm: str) -> str:
        return {"none": "none", "frozen": self.cfg.reflector_base, "sft": f"workspace:sft/{self.n('reflector')}", "rule": "rule",
                "ppo": f"workspace:ppo/{self.n('ppo')}", "oracle": "oracle", "oracle-leak": "oracle-leak"}[arm]

    def done(self, stage: str, name: str) -> bool:
        return (self.ws.checkpoint_dir(stage, name) / "retroformer_checkpoint.json").is_file()

    # 1
    def actor(self) -> None:
        if not self.tuned or self.done("sft", self.shared("actor")):
            return
        from retroformer_cli.stages import actor_data, sft
        from retroformer_cli.stages.common.training import LoraSettings

        c = self.cfg
        if not (self.ws.datasets_dir / self.shared("actor") / "manifest.json").is_file():
            self.timed("actor data", actor_data.build, actor_data.ActorDataConfig(
                env=c.env, data=c.data, name=self.shared("actor"), import_reflexion=list(c.actor_import_reflexion),
                expert=c.actor_expert, expert_reflection_share=c.actor_expert_reflection_share, seed=c.seed), self.ws)
        self.timed("actor sft", sft.run, sft.SFTStageConfig(
            dataset=self.shared("actor"), role="actor", base=c.actor_base, name=self.shared("actor"), max_steps=c.actor_sft_steps,
            batch_size=c.actor_sft_batch_size, learning_rate=c.actor_sft_learning_rate, max_length=2048,
            threads=c.threads, seed=c.seed, eval=False, save_steps=max(10, c.actor_sft_steps),
            lora=LoraSettings(r=c.actor_lora_r, alpha=2 * c.actor_lora_r, target_modules=list(c.actor_lora_targets))),
            self.ws, resume=self.ws.checkpoints_dir.joinpath("sft", f".work-{self.shared('actor')}").is_dir(),
            progress=self.progress, isolate=True)

    # 2 and 4
    def collect(self, run: str, reflector: str, split: str, tasks: int | None, trials: int, tuned: bool) -> None:
        import fcntl

        self.ws.runs_dir.mkdir(parents=True, exist_ok=True)
        with open(self.ws.runs_dir / f".{run}.lock", "w") as lock:  # experiments sharing a run take turns
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._collect(run, reflector, split, tasks, trials, tuned)

    def _collect(self, run: str, reflector: str, split: str, tasks: int | None, trials: int, tuned: bool) -> None:
        from retroformer_cli.config import CollectConfig, ModelConfig
        from retroformer_cli.stages import collect

        c = self.cfg
        exists = self.ws.manifest_path(run).exists()
        if exists and self.ws.read_manifest(run).get("status") == "completed":
            return
        cfg = CollectConfig(env=c.env, data=c.data, split=split, tasks=tasks, trials=trials, run=run, seed=c.seed,
                            concurrency=c.concurrency, few_shot=not tuned,
                            actor=ModelConfig(model=self.actor_spec if tuned else c.actor_base,
                                              max_tokens=c.actor_max_tokens, threads=c.threads),
                            reflector=ModelConfig(model=reflector, max_tokens=128, threads=c.threads))
        self.timed(f"collect {run}", collect.run, cfg, self.ws, resume=exists, progress=self.progress, isolate=True)

    # 3
    def reflector(self) -> dict[str, Any]:
        from retroformer_cli.stages import datasets, ppo, sft

        c = self.cfg
        info: dict[str, Any] = {}
        ratings = self.shared("ratings")
        if not (self.ws.datasets_dir / ratings / "manifest.json").is_file():
            self.timed("ratings", datasets.build, datasets.DatasetConfig(name=ratings, runs=[self.shared("train-frozen")]),
                       self.ws)
        sft_data = ratings
        if c.warm_start == "rule":  # improving reflections of the model-free rule reflector on train tasks
            self.collect(self.shared("train-rule"), "rule", "train", c.train_tasks, c.train_trials, self.tuned)
            sft_data = self.shared("ratings-rule")
            if not (self.ws.datasets_dir / sft_data / "manifest.json").is_file():
                self.timed("ratings (rule)", datasets.build, datasets.DatasetConfig(
                    name=sft_data, runs=[self.shared("train-rule")], sft_on="rating_f1", val_fraction=0.0), self.ws)
        counts = datasets.read_manifest(self.ws, ratings).get("counts", {})
        info["ratings"] = {k: counts.get(k) for k in ("ratings", "positive", "zero", "negative", "sft.train",
                                                       "prompts.train")}
        sft_counts = datasets.read_manifest(self.ws, sft_data).get("counts", {})
        info["sft_data"] = {"dataset": sft_data, "rows": sft_counts.get("sft.train")}
        sft_ok = c.reflector_sft_steps > 0 and (sft_counts.get("sft.train") or 0) > 0
        if sft_ok and not self.done("sft", self.n("reflector")):
            self.timed("reflector sft", sft.run, sft.SFTStageConfig(
                dataset=sft_data, base=c.reflector_base, name=self.n("reflector"), max_steps=c.reflector_sft_steps,
                threads=c.threads, seed=c.seed, eval=False), self.ws, progress=self.progress, isolate=True)
        info["reflector_sft"] = sft_ok
        if not self.done("ppo", self.n("ppo")):
            work = self.ws.checkpoints_dir / "ppo" / f".work-{self.n('ppo')}"
            self.timed("ppo", ppo.run_ppo, ppo.PPOStageConfig(
                dataset=ratings, sft=self.n("reflector") if sft_ok else "none", base=c.reflector_base, mode="online",
                actor=self.actor_spec, name=self.n("ppo"), max_steps=c.ppo_steps, num_generations=c.num_generations,
                prompts_per_step=c.prompts_per_step, learning_rate=c.ppo_learning_rate, beta=c.beta,
                temperature=c.temperature, max_completion_length=c.max_completion_length,
                reward_metric=c.reward_metric, threads=c.threads, seed=c.seed, online_concurrency=c.concurrency,
                max_prompt_tokens=c.ppo_max_prompt_tokens, gradient_checkpointing=c.gradient_checkpointing,
                save_steps=max(2, c.ppo_steps // 3)),
                self.ws, progress=self.progress, resume=work.is_dir() and any(work.glob("checkpoint-*")), isolate=True)
        return info


def _check(cfg: LearningConfig) -> None:
    for arm in [*cfg.arms, *cfg.base_arms]:
        if arm not in ARMS:
            raise UsageError(f"Unknown arm '{arm}': choose from {', '.join(ARMS)} (arms / base_arms).")
    if "frozen" not in cfg.arms:
        raise UsageError("The arms must include 'frozen': every comparison is against it (arms).")
    if cfg.warm_start not in ("none", "rule"):
        raise UsageError(f"Unknown warm_start '{cfg.warm_start}': choose none or rule (warm_start).")
    if cfg.metric not in METRICS:
        raise UsageError(f"Unknown metric '{cfg.metric}' (metric): choose score or f1.")
    if cfg.eval_trials < 2 or cfg.train_trials < 2:
        raise UsageError("eval_trials and train_trials must be at least 2: a reflection acts from trial 2 on.")


def run(cfg: LearningConfig, workspace: Workspace, progress: Any = None) -> dict[str, Any]:
    """Run (or resume) the experiment; returns the summary (also written to ``reports/<name>/summary.json``)."""
    from retroformer_cli.stages.common.progress import NullProgress

    _check(cfg)
    progress = progress or NullProgress()
    st = _Stages(cfg, workspace, progress)
    t0 = time.perf_counter()
    st.actor()
    st.collect(st.shared("train-frozen"), cfg.reflector_base, "train", cfg.train_tasks, cfg.train_trials, st.tuned)
    reflector_info = st.reflector()
    arms = [a for a in cfg.arms if a != "sft" or reflector_info["reflector_sft"]]
    for arm in arms:
        st.collect(st.eval_run(arm), st.reflector_spec(arm), "eval", cfg.eval_tasks, cfg.eval_trials, st.tuned)
    base_arms = list(cfg.base_arms) if st.tuned else []
    for arm in base_arms:
        st.collect(st.shared(f"base-{arm}"), st.reflector_spec(arm), "eval", cfg.eval_tasks, cfg.eval_trials, False)
    summary = summarize(cfg, workspace, st, arms, base_arms, reflector_info)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)  # this invocation (a resumed one skips finished stages)
    previous = workspace.root / "reports" / cfg.name / "summary.json"
    earlier = json.loads(previous.read_text(encoding="utf-8")).get("timings_s", {}) if previous.is_file() else {}
    summary["timings_s"] = {**earlier, **st.timings}  # every stage's time, whichever invocation ran it
    summary["stages_s"] = round(sum(summary["timings_s"].values()), 1)
    from retroformer_cli.analysis.learning_report import write_report

    out = write_report(cfg, workspace, summary)
    summary["report"] = str(out)
    (out.parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------------------------ analysis
def _arm_values(workspace: Workspace, run: str) -> tuple[list[str], dict[str, Any]]:
    """(task ids, trials by task and trial number) of one run."""
    from retroformer_cli.stages.evaluate import outcomes

    _, by_task = outcomes(workspace, run)
    return sorted(by_task), by_task


def summarize(cfg: LearningConfig, workspace: Workspace, st: _Stages, arms: list[str], base_arms: list[str],
              reflector_info: dict[str, Any]) -> dict[str, Any]:
    from retroformer_cli.stages.evaluate import report_run
    from retroformer_cli.analysis.stats import paired

    k = cfg.eval_trials
    per_arm: dict[str, dict[str, Any]] = {}
    runs = {a: st.eval_run(a) for a in arms} | {f"base-{a}": st.shared(f"base-{a}") for a in base_arms}
    data = {label: _arm_values(workspace, run) for label, run in runs.items()}
    for label, run in runs.items():
        rep = report_run(workspace, run)
        ids, by_task = data[label]
        per_arm[label] = {
            "run": run, "tasks": len(ids), "success_per_trial": rep.success_per_trial,
            "score_per_trial": rep.score_per_trial, "f1_per_trial": rep.f1_per_trial,
            f"mean_{cfg.metric}_last": sum(value_at(by_task[t], k, cfg.metric) for t in ids) / max(1, len(ids)),
            "sensitivity": rep.sensitivity, "diagnostic": rep.diagnostic}
    frozen_ids, frozen = data["frozen"]
    comparisons: dict[str, Any] = {}
    for label in runs:
        if label == "frozen" or label.startswith("base-"):
            continue
        ids, by_task = data[label]
        common = [t for t in frozen_ids if t in by_task]
        comparisons[label] = {
            "mean_" + cfg.metric: paired_mean_difference([value_at(by_task[t], k, cfg.metric) for t in common],
                                                         [value_at(frozen[t], k, cfg.metric) for t in common],
                                                         cfg.bootstrap, cfg.seed),
            "success_per_trial": [paired([solved_by(by_task[t], j) for t in common],
                                         [solved_by(frozen[t], j) for t in common], trial=j).to_json()
                                  for j in range(1, k + 1)]}
    key = f"mean_{cfg.metric}_last"

    def headroom(prefix: str) -> float | None:
        a, b = per_arm.get(f"{prefix}oracle"), per_arm.get(f"{prefix}none")
        return round(a[key] - b[key], 4) if a and b else None

    curve = learning_curve(workspace.checkpoint_dir("ppo", st.n("ppo")))
    trained = "ppo" if "ppo" in comparisons else next((a for a in ("sft",) if a in comparisons), None)
    main = comparisons.get(trained, {}).get("mean_" + cfg.metric, {}) if trained else {}
    summary = {
        "env": cfg.env, "created_at": now_iso(), "metric": cfg.metric, "reward_metric": cfg.reward_metric,
        "train_tasks": _tasks(workspace, st.shared("train-frozen")), "eval_tasks": per_arm["frozen"]["tasks"],
        "eval_trials": k, "steps": len([r for r in curve if "reward" in r]), "actor": st.actor_spec,
        "trained_minus_frozen": main.get("difference"), "ci_low": main.get("ci_low"), "ci_high": main.get("ci_high"),
        "oracle_headroom": {"tuned": headroom(""), "base": headroom("base-")},
        "sensitivity": {a: (per_arm[a]["sensitivity"] or {}).get("changed_share") for a in per_arm},
        "arms": per_arm, "comparisons": comparisons, "reflector_data": reflector_info, "curve": curve,
        "config": {k_: v for k_, v in cfg.__dict__.items()},
    }
    summary["verdict"] = verdict(summary)
    return summary


def _tasks(workspace: Workspace, run: str) -> int:
    return len(workspace.read_manifest(run).get("task_ids") or [])


def learning_curve(checkpoint: Path) -> list[dict[str, Any]]:
    """PPO's per-step metrics (``metrics.jsonl`` of the checkpoint): step, reward, kl, frac_reward_zero_std."""
    path = checkpoint / "metrics.jsonl"
    if not path.is_file():
        return []
    keep = ("step", "reward", "reward_std", "kl", "frac_reward_zero_std", "loss", "online/metric_delta_mean")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: r.get(k) for k in keep if k in r} for r in rows]


def verdict(s: dict[str, Any]) -> dict[str, Any]:
    """Whether trained − frozen is above 0 with its interval, and else which lever failed, in order."""
    levers: list[str] = []
    tuned, base = s["oracle_headroom"]["tuned"], s["oracle_headroom"]["base"]
    if tuned is not None and tuned < 0.05:  # a search plan from the gold data moves the metric by less than 0.05
        levers.append(f"headroom: even the oracle's plan barely helps the actor (oracle − none = {tuned:+.3f})")
    sens = s["sensitivity"].get("frozen")
    if sens is not None and sens < 0.2:
        levers.append(f"sensitivity: only {sens:.0%} of trials after a frozen reflection act differently")
    curve = [r for r in s["curve"] if "reward" in r]
    zero = [r["frac_reward_zero_std"] for r in curve if r.get("frac_reward_zero_std") is not None]
    if zero and sum(zero) / len(zero) > 0.5:
        levers.append(f"reward variance: {sum(zero) / len(zero):.0%} of GRPO groups had the same reward for every "
                      "reflection (no signal)")
    kls = [r["kl"] for r in curve if r.get("kl") is not None]
    if kls and max(kls) < 1e-3:
        levers.append(f"KL: the policy barely moved from the reference (max KL {max(kls):.2g})")
    if s["steps"] < 50:
        levers.append(f"steps: {s['steps']} GRPO steps")
    helped = s["ci_low"] is not None and s["ci_low"] > 0
    return {"target_met": bool(helped), "levers": [] if helped else levers,
            "headroom_base": base, "headroom_tuned": tuned}
