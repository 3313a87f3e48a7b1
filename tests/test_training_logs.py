"""`--report-to` and the per-step ``metrics.jsonl`` of the sft, reward and ppo checkpoints.

Validation runs without a model. The training tests use the tiny random Llama of conftest (``tiny``) for 2 steps,
as tests/test_train.py and tests/test_ppo.py do.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from retroformer_cli.errors import UsageError
from retroformer_cli.stages.common import training as tc

FIX = Path(__file__).parent / "fixtures"
INTEGRATION_MODULES = {"tensorboard", "tensorboardX", "wandb", "trackio", "mlflow"}


def _without_integrations(monkeypatch):
    """As if no tracking package were installed, whatever this machine has."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name in INTEGRATION_MODULES else real(name, *a, **kw))


# --- validation, no model --------------------------------------------------------------------------------
def test_report_to_parsing():
    assert tc.report_to_list("none") == [] and tc.report_to_list("") == [] and tc.report_to_list(None) == []
    with pytest.raises(UsageError, match="Unknown --report-to 'bogus'") as err:
        tc.report_to_list("none,bogus")
    assert "none, tensorboard, wandb, trackio, mlflow" in str(err.value) and "\n" not in str(err.value)
    assert tc.report_kwargs("none", "sft", "x") == {"report_to": [], "run_name": "sft-x"}


def test_missing_package_is_named(monkeypatch):
    _without_integrations(monkeypatch)
    for name, pip_name in (("tensorboard", "tensorboard"), ("wandb", "wandb"), ("trackio", "trackio"),
                           ("mlflow", "mlflow")):
        with pytest.raises(UsageError, match=f"--report-to {name} needs the '{pip_name}' package") as err:
            tc.report_to_list(f" {name.upper()} ")
        assert f"pip install {pip_name}" in str(err.value) and "\n" not in str(err.value)


def test_stages_check_report_to_before_loading_anything(workspace, monkeypatch):
    """An empty workspace: without the check first, each stage would fail on its missing dataset instead."""
    from retroformer_cli.stages import reward, sft
    from retroformer_cli.stages.ppo import PPOStageConfig, run_ppo

    with pytest.raises(UsageError, match="--report-to 'tensorbored'"):
        sft.run(sft.SFTStageConfig(report_to="tensorbored"), workspace)
    with pytest.raises(UsageError, match="--report-to 'x'"):
        reward.run(reward.RewardStageConfig(report_to="x"), workspace)
    with pytest.raises(UsageError, match="--report-to 'y'"):
        run_ppo(PPOStageConfig(report_to="y"), workspace)
    _without_integrations(monkeypatch)
    with pytest.raises(UsageError, match="pip install wandb"):
        sft.run(sft.SFTStageConfig(report_to="wandb"), workspace)
    with pytest.raises(UsageError, match="pip install mlflow"):
        run_ppo(PPOStageConfig(report_to="mlflow"), workspace)


def test_cli_flag_and_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from retroformer_cli.cli import app

    runner = CliRunner()
    for cmd in ("sft", "reward", "ppo"):
        assert "--report-to" in runner.invoke(app, [cmd, "--help"]).output
        r = runner.invoke(app, ["-w", str(tmp_path / "ws"), cmd, "--report-to", "nope"])
        errors = [line for line in r.output.splitlines() if "Error" in line]
        assert r.exit_code == 2 and len(errors) == 1 and "--report-to 'nope'" in errors[0], r.output


def test_step_metrics_from_a_log_history(tmp_path):
    history = [{"loss": 2.0, "learning_rate": 1e-4, "epoch": 0.5, "step": 1},
               {"loss": float("nan"), "grad_norm": 0.3, "step": 2, "note": "text", "flag": True},
               {"eval_loss": 1.5, "step": 2},
               {"train_runtime": 3.0, "train_loss": 1.9, "step": 2}]
    assert tc.write_metrics_jsonl(tmp_path, history) == 2
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "epoch": 0.5},
                    {"step": 2, "loss": None, "grad_norm": 0.3, "eval_loss": 1.5}]


# --- training: metrics.jsonl in the checkpoints ------------------------------------------------------------
def _read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def sft_ws(workspace):
    pytest.importorskip("trl")
    from retroformer_cli.stages import datasets as D

    D.build(D.DatasetConfig(import_tsv=[str(FIX / "ratings.tsv")],
                            import_reflexion=[str(FIX / "reflexion_hotpotqa.txt")], pair_scope="env",
                            val_fraction=0.4), workspace)
    return workspace


def _sft_cfg(tiny, **kw):
    from retroformer_cli.stages import sft

    return sft.SFTStageConfig(**{"base": str(tiny["base"]), "batch_size": 2, "max_length": 256, "threads": 1,
                                 "save_steps": 100, "max_steps": 2, **kw})


def test_sft_checkpoint_has_metrics_jsonl(sft_ws, tiny):
    from retroformer_cli.stages import sft

    res = sft.run(_sft_cfg(tiny), sft_ws)
    rows = _read_metrics(res.path)
    assert [r["step"] for r in rows] == [1, 2]  # logging_steps 1: one line per optimizer step
    assert all({"loss", "learning_rate", "grad_norm"} <= set(r) for r in rows)
    assert "eval_loss" in rows[-1]  # the final evaluation joins the last step's line
    assert all(isinstance(v, (int, float)) or v is None for r in rows for v in r.values())


def test_reward_checkpoint_has_metrics_jsonl(sft_ws, tiny):
    from retroformer_cli.stages import reward

    cfg = reward.RewardStageConfig(base=str(tiny["base"]), batch_size=2, max_length=256, threads=1, save_steps=100,
                                   max_steps=2, eval=False)
    rows = _read_metrics(reward.run(cfg, sft_ws).path)
    assert [r["step"] for r in rows] == [1, 2] and all({"loss", "learning_rate", "accuracy"} <= set(r) for r in rows)


def test_sft_report_to_tensorboard_writes_events_in_the_workspace(sft_ws, tiny):
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("--report-to tensorboard needs the tensorboard package (not a project dependency)")
    from retroformer_cli.stages import sft

    res = sft.run(_sft_cfg(tiny, name="tb", report_to="tensorboard", max_steps=1), sft_ws)
    events = list(tc.work_dir(sft_ws, "sft", "tb").glob("runs/*/events.out.tfevents.*"))
    assert events and all(sft_ws.root in e.parents for e in events)
    assert [r["step"] for r in _read_metrics(res.path)] == [1]


_GOLD: dict[str, str] = {}


def _gold(question: str) -> str:
    if not _GOLD:
        from retroformer_cli.envs.hotpotqa import HotPotQAEnv

        env = HotPotQAEnv()
        _GOLD.update({env.get_question(t).question.strip(): env.get_question(t).answer for t in env.task_ids()})
    return _GOLD[question]


def parity_f1_actor(messages, config):
    """Finish with the gold answer padded by 2 filler words (newest reflection of even length) or by 8 (odd, or
    no reflection): F1 0.5 or 0.2 on a one-word answer, exact match 0 either way."""
    task = messages[1].content
    gold = _gold(task.split("Question:")[1].split("\n")[0].strip())
    latest = task.split("Reflections:\n", 1)[1].split("\n\n", 1)[0].splitlines()[-1] if "Reflections:\n" in task else ""
    fill = 2 if latest and len(latest) % 2 == 0 else 8
    return f"Thought: I answer.\nAction: Finish[{gold}{' qx' * fill}]"


def test_ppo_checkpoint_has_metrics_jsonl(workspace, tiny):
    pytest.importorskip("trl")
    from retroformer_cli.config import CollectConfig
    from retroformer_cli.envs.hotpotqa import HotPotQAEnv
    from retroformer_cli.testing.fake_llm import FakeLLM
    from retroformer_cli.stages import collect
    from retroformer_cli.stages.datasets import DatasetConfig, build
    from retroformer_cli.stages.common.training import CHECKPOINT_MANIFEST as MANIFEST
    from retroformer_cli.stages.ppo import PPOStageConfig, run_ppo

    env = HotPotQAEnv()
    ids = [t for t in env.task_ids() if len(env.get_question(t).answer.split()) == 1
           and env.get_question(t).answer.lower() not in ("yes", "no")][:2]
    actor = FakeLLM(parity_f1_actor, model_id="parity-f1")
    collect.run(CollectConfig(trials=2, task_ids=ids, run="r1"), workspace, actor=actor,
                reflector=FakeLLM(["I answered with too many words."], model_id="fake-reflector"))
    build(DatasetConfig(name="ratings", runs=["r1"]), workspace)
    cfg = PPOStageConfig(base=str(tiny["base"]), mode="online", reward_metric="f1", name="logs", max_steps=2,
                         num_generations=2, prompts_per_step=1, max_completion_length=8, save_steps=10, threads=1,
                         max_prompt_tokens=4000)
    res = run_ppo(cfg, workspace, actor_client=actor)
    rows = _read_metrics(res.path)
    assert [r["step"] for r in rows] == [1, 2]
    expected = {"loss", "learning_rate", "reward", "reward_std", "kl", "frac_reward_zero_std", "online/episodes",
                "online/success", "online/metric_delta_mean"}
    assert all(expected <= set(r) for r in rows), rows
    # F1 rewards: each candidate's replay scores F1 0.5 or 0.2 against trial k's 0.2
    assert all(r["online/metric_delta_mean"] in (pytest.approx(0.0), pytest.approx(0.15), pytest.approx(0.3))
               for r in rows)
    assert all(0.0 <= r["frac_reward_zero_std"] <= 1.0 for r in rows)
    manifest = json.loads((res.path / MANIFEST).read_text())
    assert manifest["reward"]["metric"] == "f1" and manifest["config"]["reward_metric"] == "f1"
    cache = tc.work_dir(workspace, "ppo", "logs") / "online_cache.0.jsonl"
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert lines and all(x["metric"] == "f1" and x["f1"] in (pytest.approx(0.5), pytest.approx(0.2)) for x in lines)
