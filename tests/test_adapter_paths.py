"""LoRA adapters load under a safe engine name, whatever their folder's path holds (dots, spaces, non-ASCII).

peft and torch refuse adapter (module) names with a ".", and adapters used to be loaded under their folder path:
``collect --reflector workspace:sft/default`` failed in any workspace below a dotted folder such as
``~/.cache/retroformer``. The slow test runs sft and then collect with that adapter as the reflector, in a
workspace under ``.cache/exp v1.2``, on a tiny random Llama (conftest ``tiny``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from retroformer_cli.llm.engine.adapters import BASE_ADAPTER, adapter_name_for, safe_adapter_name

FIX = Path(__file__).parent / "fixtures"
SAFE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@pytest.mark.parametrize("path", [
    "/home/u/.cache/retroformer/ws/checkpoints/sft/default",
    "/data/exp v1.2/ws/checkpoints/ppo/r1.final",
    "/données/expérience ü/模型/lora-α.v2",
    "/", "relative/a b/c.d",
])
def test_adapter_name_is_a_safe_identifier(path):
    name = adapter_name_for(path)
    assert SAFE.match(name) and name != BASE_ADAPTER and "." not in name and name.isascii()
    assert name == adapter_name_for(path)  # same path, same name


def test_adapter_name_keeps_the_basename_and_tells_folders_apart(tmp_path):
    a, b = tmp_path / "run.1" / "default", tmp_path / "run 2" / "default"
    for p in (a, b):
        p.mkdir(parents=True)
    assert adapter_name_for(a) != adapter_name_for(b)
    assert adapter_name_for(a).startswith("lora_default_")
    # the same folder named two ways (relative, through "..", with a trailing slash) is one adapter
    assert adapter_name_for(a) == adapter_name_for(f"{a.parent}/../{a.parent.name}/default/")
    assert adapter_name_for(a) == adapter_name_for(str(a))


def test_served_names_are_made_safe_and_stay_apart():
    names = {safe_adapter_name(n) for n in ("reflector-v1.2", "reflector_v1_2", "org/model", "__base__", "é")}
    assert len(names) == 5 and all(SAFE.match(n) and n != BASE_ADAPTER for n in names)


@pytest.mark.slow
def test_sft_adapter_in_a_dotted_workspace_is_a_collect_reflector(tmp_path, tiny):
    pytest.importorskip("trl", reason="training needs the train extra (trl)")
    from retroformer_cli.config import CollectConfig, ModelConfig
    from retroformer_cli.stages import collect, sft
    from retroformer_cli.stages import datasets as D
    from retroformer_cli.stages.collect import load_trials
    from retroformer_cli.workspace import Workspace

    ws = Workspace.open(tmp_path / ".cache" / "exp v1.2" / "ws")
    D.build(D.DatasetConfig(import_tsv=[str(FIX / "ratings.tsv")],
                            import_reflexion=[str(FIX / "reflexion_hotpotqa.txt")], val_fraction=0.4), ws)
    res = sft.run(sft.SFTStageConfig(base=str(tiny["base"]), batch_size=2, max_length=256, threads=1, save_steps=100,
                                     max_steps=1), ws, progress=False)
    folder = res.path
    assert folder == ws.checkpoint_dir("sft", "default") and "." in str(folder) and " " in str(folder)

    model = dict(max_tokens=8, threads=1, max_batch_size=2)
    cfg = CollectConfig(env="hotpotqa", tasks=1, trials=2, max_steps=2, run="dotted",
                        actor=ModelConfig(model=str(tiny["base"]), **model),
                        reflector=ModelConfig(model="workspace:sft/default", **model))
    out = collect.run(cfg, ws)
    assert out.status == "completed"
    trials = load_trials(ws, "dotted")
    assert [t.trial for t in trials] == [1, 2]  # a random tiny model never answers right
    assert trials[0].reflection is not None and trials[1].memory == [trials[0].reflection.text]
    assert trials[0].reflector_model_id.endswith(str(Path("checkpoints") / "sft" / "default"))
    refl = ws.read_manifest("dotted")["models"]["reflector"]
    assert Path(refl["adapter"]).resolve() == folder.resolve() == Path(refl["path"]).resolve()
    assert refl["adapter_name"] == adapter_name_for(folder)


def test_serve_loads_adapters_with_dotted_names_and_paths(tmp_path, tiny):
    import asyncio
    import shutil

    from retroformer_cli.llm.engine.types import Sampling
    from retroformer_cli.serve.backend import TransformersBackend

    folder = tmp_path / ".cache" / "exp v1.2" / "lora.a"
    shutil.copytree(tiny["a"], folder)

    async def go():
        engine = TransformersBackend(str(tiny["base"]), served_name="base", cache_dir=tmp_path / "cache", threads=1,
                                    max_batch_size=2, max_tokens_limit=8, adapters={"reflector-v1.2": str(folder)})
        await engine.start()
        try:
            await engine.load_adapter("org/model.v2", str(folder))
            ids = engine.encode_prompt("Hello")
            for name in ("reflector-v1.2", "org/model.v2"):
                result = await engine.generate(name, ids, Sampling(max_tokens=3))
                assert result.model == name and result.choices[0].completion_tokens >= 1
            assert engine.model_names() == ["base", "reflector-v1.2", "org/model.v2"]
            await engine.unload_adapter("org/model.v2")
            assert "reflector-v1.2" in engine.stats()["adapters"] and len(engine.engine.adapters) == 1
        finally:
            await engine.shutdown()

    asyncio.run(go())
