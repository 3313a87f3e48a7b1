"""Step time and peak memory of `retroformer sft` / `retroformer reward` versus the same TRL trainer called directly
on the same data and model (target: ours <= 1.10x direct).

Each variant runs in its own process (so its peak RSS is its own), in the order ours, direct, direct, ours, ours,
direct (``--repeats``), to spread machine noise; per run the median step time of steps 2..N (step 1 is warm-up), and
across runs the median, is compared. Both sides get the same hyperparameters (TRL's RewardConfig would otherwise
turn gradient checkpointing on, which our stage leaves off: slower steps, less memory).

- sft: ``retroformer_cli.stages.sft.run`` (rich progress on) vs ``trl.SFTTrainer`` with the same SFTConfig, LoRA
  config, model folder and the same conversational prompt-completion rows.
- reward: ``retroformer_cli.stages.reward.run`` (without the final validation pass, which is extra work the direct
  trainer does not do) vs ``trl.RewardTrainer`` on the same tokenized pairs (chosen_ids / rejected_ids).

Usage::

    python benchmarks/train_overhead.py                      # embedded model, data from ../shared/data if present
    python benchmarks/train_overhead.py --base tiny --steps 6 # a tiny random Llama (plumbing only)

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_LOGS = REPO.parent / "shared" / "data" / "hotpotqa" / "reflexion_logs" / "trials.jsonl"
FIX = REPO / "tests" / "fixtures"
sys.path.insert(0, str(REPO))  # this checkout, not whatever retroformer_cli is installed
ORDER = ("ours", "direct", "direct", "ours", "ours", "direct", "direct", "ours")


def timer_callback(times: list[float]):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    return StepTimer()


def variant(kind: str, who: str, ws_dir: str, base: str, steps: int, batch: int, max_length: int) -> dict:
    from retroformer_cli.stages import reward, sft
    from retroformer_cli.stages.common import training as tc
    from retroformer_cli.workspace import Workspace

    ws = Workspace.open(ws_dir)
    times: list[float] = []
    t0 = time.perf_counter()
    common = dict(base=base, max_steps=steps, batch_size=batch, max_length=max_length, threads=1, save_steps=10_000,
                  name=f"bench-{who}")
    if kind == "sft":
        cfg = sft.SFTStageConfig(eval=False, **common)
        if who == "ours":
            sft.run(cfg, ws, callbacks=[timer_callback(times)])
        else:
            from trl import SFTTrainer

            tc.set_threads(1)
            tc.quiet_transformers(cfg.seed)
            train_ds, _ = sft.load_sft_datasets(ws, cfg.dataset)
            _, base_path = tc.resolve_base(base, ws)
            model, tok = sft.load_base_causal_lm(base_path)
            trainer = SFTTrainer(model=model, args=sft.trl_config(cfg, Path(ws_dir) / "direct-sft", False),
                                 train_dataset=train_ds, processing_class=tok,
                                 peft_config=tc.lora_config(cfg.lora, "CAUSAL_LM"), callbacks=[timer_callback(times)])
            tc.drop_stdout_printer(trainer)
            trainer.train()
    else:
        cfg = reward.RewardStageConfig(eval=False, **common)
        if who == "ours":
            reward.run(cfg, ws, callbacks=[timer_callback(times)])
        else:
            from transformers import AutoTokenizer
            from trl import RewardConfig, RewardTrainer

            from retroformer_cli.stages.datasets import read_split

            tc.set_threads(1)
            tc.quiet_transformers(cfg.seed)
            _, base_path = tc.resolve_base(base, ws)
            tok = AutoTokenizer.from_pretrained(str(base_path))
            ds = reward.pair_dataset(read_split(ws, cfg.dataset, "pairs", "train"), tok, max_length)
            args = RewardConfig(output_dir=str(Path(ws_dir) / "direct-reward"), max_steps=steps,
                                per_device_train_batch_size=batch, learning_rate=cfg.learning_rate, max_length=None,
                                logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, report_to="none",
                                disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0,
                                gradient_checkpointing=cfg.gradient_checkpointing, **tc.precision_kwargs())
            trainer = RewardTrainer(model=reward.load_seq_cls(base_path, tok), args=args, train_dataset=ds,
                                    processing_class=tok, peft_config=tc.lora_config(cfg.lora, "SEQ_CLS"),
                                    callbacks=[timer_callback(times)])
            tc.drop_stdout_printer(trainer)
            trainer.train()
    deltas = [b - a for a, b in zip(times, times[1:])]
    return {"kind": kind, "who": who, "steps": len(times), "median_step_s": statistics.median(deltas) if deltas else None,
            "total_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="embedded", help="embedded | tiny | a model folder")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--kinds", default="sft,reward")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (alternating order)")
    ap.add_argument("--_variant", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._variant:
        kind, who, ws = a._variant
        print(json.dumps(variant(kind, who, ws, a.base, a.steps, a.batch_size, a.max_length)))
        return

    from retroformer_cli.stages import datasets as D
    from retroformer_cli.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="rf-bench-"))
    ws = Workspace.open(tmp / "ws")
    cache = Path(os.environ.get("RETROFORMER_BENCH_CACHE", Path.home() / ".cache" / "retroformer"))
    (ws.root / "cache").mkdir(parents=True)
    (ws.root / "cache" / "models").symlink_to(cache / "models", target_is_directory=True)
    (cache / "models").mkdir(parents=True, exist_ok=True)
    src = [str(SHARED_LOGS)] if SHARED_LOGS.is_file() else [str(FIX / "reflexion_hotpotqa.txt"), str(FIX / "reflexion_alfworld")]
    D.build(D.DatasetConfig(import_reflexion=src, pair_scope="env", max_pairs_per_task=4), ws)
    base = a.base
    if base == "tiny":
        base = str(make_tiny(tmp / "tiny"))
    results = []
    for kind in a.kinds.split(","):
        for who in ORDER[: 2 * a.repeats]:
            cmd = [sys.executable, __file__, "--base", base, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                   "--max-length", str(a.max_length), "--_variant", kind, who, str(ws.root)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                sys.exit(f"{kind}/{who} failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    summary: dict = {"base": a.base, "steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
                     "data": "reflexion-hotpotqa-logs" if SHARED_LOGS.is_file() else "fixtures"}
    for kind in a.kinds.split(","):
        ours = [r for r in results if r["kind"] == kind and r["who"] == "ours"]
        direct = [r for r in results if r["kind"] == kind and r["who"] == "direct"]
        o = statistics.median([r["median_step_s"] for r in ours])
        d = statistics.median([r["median_step_s"] for r in direct])
        summary[kind] = {"ours_step_s": round(o, 4), "direct_step_s": round(d, 4), "ratio": round(o / d, 3),
                         "ours_peak_rss_mb": round(max(r["peak_rss_mb"] for r in ours)),
                         "direct_peak_rss_mb": round(max(r["peak_rss_mb"] for r in direct))}
    print(json.dumps(summary))


def make_tiny(path: Path) -> Path:
    import torch
    import transformers

    from retroformer_cli.llm import model_cache

    model_cache.set_offline()
    gguf = model_cache.embedded_gguf_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


if __name__ == "__main__":
    main()
