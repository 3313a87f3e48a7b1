"""Rating data: G(k+1) - G(k) on hand-built trajectories, the split by task, the derived sets and the importers
(on fixtures of our own under tests/fixtures/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retroformer_cli.errors import DataError, UsageError
from retroformer_cli.records import Reflection, Trial
from retroformer_cli.stages import datasets as D
from retroformer_cli.stages import importers
from retroformer_cli.store import JsonlWriter

FIX = Path(__file__).parent / "fixtures"
PREFILL = {"role": "assistant", "content": "Reflection:"}


def trial(task: str, k: int, score: float, reflection: str | None = None, f1: float | None = None, run: str = "r1",
          env: str = "hotpotqa") -> Trial:
    refl = None
    if reflection is not None:
        refl = Reflection(text=reflection, model_id="fake", prompt=[
            {"role": "system", "content": "Reflect."}, {"role": "user", "content": f"Previous trial:\n{task} trial {k}"},
            PREFILL])
    return Trial(run_id=run, env_id=env, task_id=task, trial=k, instruction=task, steps=[], success=score >= 1.0,
                 score=score, terminated=True, truncated=False, memory=[], reflection=refl, actor_model_id="fake",
                 reflector_model_id="fake", actor_prompt=[], info={"f1": f1} if f1 is not None else {})


def hand_built() -> list[Trial]:
    return [
        trial("solved-first", 1, 1.0, f1=1.0),  # solved at trial 1: no reflection, no row
        trial("never", 1, 0.0, "Plan A.", f1=0.0), trial("never", 2, 0.0, "Plan B.", f1=0.5),
        trial("never", 3, 0.0, "Plan C.", f1=0.2),  # last trial: a reflection without a successor is not rated
        trial("late", 1, 0.0, "Reflection: Search the author first.", f1=0.2), trial("late", 2, 1.0, f1=1.0),
        trial("webshop-like", 1, 0.75, "Pick the cheaper one.", env="webshop"),
        trial("webshop-like", 2, 0.5, "Check the size.", env="webshop"), trial("webshop-like", 3, 1.0, env="webshop"),
    ]


def test_rating_rule_on_hand_built_trajectories():
    rows, skipped = D.rate_trials(hand_built(), "run:r1")
    got = {(r["task_id"], r["trial"]): r for r in rows}
    assert set(got) == {("never", 1), ("never", 2), ("late", 1), ("webshop-like", 1), ("webshop-like", 2)}
    assert skipped["no_successor"] == 1  # never, trial 3
    assert got[("never", 1)]["rating"] == 0.0 and got[("never", 1)]["rating_f1"] == pytest.approx(0.5)
    assert got[("never", 2)]["rating_f1"] == pytest.approx(-0.3)
    late = got[("late", 1)]
    assert late["rating"] == 1.0 and late["rating_f1"] == pytest.approx(0.8)
    assert late["reflection"] == "Search the author first."  # a leading "Reflection:" is not part of the text
    assert late["prompt"][-1] == PREFILL  # ratings keep the prompt exactly as the reflector saw it
    assert got[("webshop-like", 1)]["rating"] == pytest.approx(-0.25)
    assert got[("webshop-like", 2)]["rating"] == pytest.approx(0.5)
    assert got[("webshop-like", 1)]["rating_f1"] is None


def validation(task_id: str, fraction: float = 0.15) -> bool:
    return D.split_of(task_id, fraction, salt=D.SPLIT_SALT, names=D.SPLIT_NAMES) == "validation"


def test_split_is_by_task_deterministic_and_proportional():
    ids = [f"task-{i}" for i in range(5000)]
    val = {t for t in ids if validation(t)}
    assert 0.13 < len(val) / len(ids) < 0.17  # 0.15 +- 4 standard deviations
    assert [i for i in range(20) if f"task-{i}" in val] == [2, 7, 11, 14, 18]  # pinned: the rule must not drift
    assert {t for t in ids if validation(t, 0.05)} < val  # a smaller fraction holds out a subset
    assert not any(validation(t, 0.0) for t in ids)
    # the salt makes validation independent of collect's eval split (else validation tasks are never collected)
    evals = [t for t in ids if D.split_of(t) == "eval"]
    assert 0.11 < sum(t in val for t in evals) / len(evals) < 0.19


def test_built_dataset_keeps_each_task_on_one_side(workspace):
    res = D.build(D.DatasetConfig(import_tsv=[str(FIX / "ratings.tsv")], val_fraction=0.4,
                                  import_reflexion=[str(FIX / "reflexion_hotpotqa.txt"), str(FIX / "reflexion_alfworld")]),
                  workspace)
    rows = [json.loads(line) for line in (res.path / "ratings.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "validation"}
    assert all(r["split"] == ("validation" if validation(r["task_id"], 0.4) else "train") for r in rows)


def write_run(ws, name: str, trials: list[Trial]) -> None:
    ws.write_manifest(name, {"run": name, "env": "hotpotqa", "status": "completed"})
    with JsonlWriter(ws.trials_path(name)) as w:
        for t in trials:
            w.append(t.to_json())


def test_build_from_runs_writes_every_set(workspace):
    from datasets import load_dataset

    write_run(workspace, "r1", hand_built())
    res = D.build(D.DatasetConfig(runs=["r1"], val_fraction=0.5), workspace)
    d = res.path
    assert d == workspace.datasets_dir / "ratings"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["sources"][0]["run"] == "r1" and manifest["counts"]["ratings"] == 5
    ratings = D.read_split(workspace, "ratings", "ratings")
    by_task = {}
    for r in ratings:
        assert set(r) >= {"task_id", "run", "env", "trial", "prompt", "reflection", "rating", "rating_f1", "split", "source"}
        by_task.setdefault(r["task_id"], set()).add(r["split"])
        assert r["source"] == "run:r1"
    assert all(len(s) == 1 for s in by_task.values())  # never split within a task
    sft = D.read_split(workspace, "ratings", "sft", "train") + D.read_split(workspace, "ratings", "sft", "validation")
    assert {r["completion"][0]["content"] for r in sft} == {"Search the author first.", "Check the size."}
    for r in sft:
        assert r["prompt"][-1]["role"] == "user"  # the prefill rule: trailing assistant prefill dropped
    pairs = D.read_split(workspace, "ratings", "pairs", "train") + D.read_split(workspace, "ratings", "pairs", "validation")
    assert pairs and all(p["chosen_rating"] > p["rejected_rating"] for p in pairs)
    assert all(p["task_id"] == p["rejected_task_id"] for p in pairs)  # pair_scope=task
    prompts = D.read_split(workspace, "ratings", "prompts", "train") + D.read_split(workspace, "ratings", "prompts", "validation")
    assert len(prompts) == 5 and all(set(p) >= {"prompt", "task_id", "run", "trial", "env"} for p in prompts)
    for f in d.glob("*.jsonl"):  # every file loads with `datasets`
        if f.stat().st_size:
            load_dataset("json", data_files=str(f), split="train")


def test_pair_scope_env_pairs_across_tasks(workspace):
    write_run(workspace, "r1", hand_built())
    D.build(D.DatasetConfig(runs=["r1"], pair_scope="env", val_fraction=0.0), workspace)
    pairs = D.read_split(workspace, "ratings", "pairs", "train")
    assert any(p["task_id"] != p["rejected_task_id"] for p in pairs)
    assert all(p["rejected_prompt"][-1]["role"] == "user" for p in pairs)


def test_build_errors(workspace):
    with pytest.raises(UsageError, match="Nothing to build"):
        D.build(D.DatasetConfig(), workspace)
    write_run(workspace, "empty", [trial("a", 1, 1.0)])
    with pytest.raises(DataError, match="No rated reflections"):
        D.build(D.DatasetConfig(runs=["empty"]), workspace)
    with pytest.raises(UsageError, match="not found"):
        D.read_split(workspace, "nope", "sft", "train")


def test_import_tsv_both_column_names():
    rows = importers.import_tsv(FIX / "ratings.tsv")
    assert [r["rating"] for r in rows] == [1.0, 0.0, -1.0]
    assert rows[0]["task_id"] == rows[1]["task_id"] != rows[2]["task_id"]  # same query = one task
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["source"] == "tsv:ratings.tsv"
    assert [r["rating"] for r in importers.import_tsv(FIX / "ratings_labels.tsv")] == [0.5, -0.5]


def test_import_tsv_rejects_wrong_columns(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("q\tr\n1\t2\n")
    with pytest.raises(DataError, match="query, response and rating"):
        importers.import_tsv(bad)


def test_import_reflexion_hotpotqa_text_log():
    rows, info = importers.import_reflexion(FIX / "reflexion_hotpotqa.txt")
    assert info["format"] == "hotpotqa-text-log"
    got = {r["reflection"]: r for r in rows}
    assert set(got) == {"I guessed without searching. I should search the capital of Veldor first, then its river.",
                        "I searched a partial name. I should search the full title Marrow Park."}
    river = got["I guessed without searching. I should search the capital of Veldor first, then its river."]
    assert river["rating"] == 1.0 and river["rating_f1"] == 1.0 and river["trial"] == 1
    assert river["prompt"][-1] == PREFILL  # our reflection prompt, rebuilt around the logged trajectory
    user = river["prompt"][1]["content"]
    assert "Question: Which river runs through the capital of Veldor?" in user and "Finish[Tessa river]" in user
    assert user.rstrip().endswith("Answer is INCORRECT") and "Correct answer" not in user
    halted = got["I searched a partial name. I should search the full title Marrow Park."]
    assert halted["rating"] == 0.0 and "Ran out of steps" in halted["prompt"][1]["content"]


def test_import_reflexion_trials_jsonl():
    rows, info = importers.import_reflexion(FIX / "reflexion_hotpotqa_trials.jsonl")
    assert info["format"] == "hotpotqa-trials-jsonl"
    assert [(r["task_id"], r["trial"], r["rating"]) for r in sorted(rows, key=lambda r: r["trial"])] == [
        ("veldor-river", 1, 0.0), ("veldor-river", 2, 1.0)]
    second = [r for r in rows if r["trial"] == 2][0]
    assert second["rating_f1"] == pytest.approx(1 - 2 / 3)  # "Orrin river" vs "Orrin": F1 2/3 -> 1
    assert "You have attempted" not in second["prompt"][1]["content"]  # the reflector never saw the memory


def test_import_reflexion_alfworld_results():
    rows, info = importers.import_reflexion(FIX / "reflexion_alfworld")
    assert info == {"format": "alfworld-env-results", "files": 3}
    got = {(r["task_id"], r["trial"]): r for r in rows}
    assert set(got) == {("env_1", 1), ("env_1", 2), ("env_2", 1)}
    assert got[("env_1", 1)]["rating"] == 0.0 and got[("env_1", 2)]["rating"] == 1.0 and got[("env_2", 1)]["rating"] == 1.0
    assert got[("env_1", 2)]["reflection"].startswith("I found the mug")
    assert "I looked for the mug" in got[("env_1", 2)]["prompt"][1]["content"]  # earlier reflections in the prompt
    assert all(r["env"] == "alfworld" for r in rows)


def test_import_reflexion_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        importers.import_reflexion(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(DataError, match="BEGIN TRIAL"):
        importers.import_reflexion(tmp_path / "x.txt")


def test_cli_datasets_build(tmp_path):
    from retroformer_cli.cli import app

    runner = CliRunner()
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["-w", str(ws), "--json", "datasets", "build", "--import-tsv", str(FIX / "ratings.tsv"),
                              "--import-reflexion", str(FIX / "reflexion_hotpotqa.txt"),
                              "--import-reflexion", str(FIX / "reflexion_alfworld"), "--name", "mixed",
                              "--pair-scope", "env"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip().splitlines()[-1])
    assert data["name"] == "mixed" and data["counts"]["ratings"] == 3 + 2 + 3
    res = runner.invoke(app, ["-w", str(ws), "datasets", "build"])
    assert res.exit_code == 2 and "Nothing to build" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["-w", str(ws), "datasets", "build", "--run", "missing"])
    assert res.exit_code == 2 and "not found" in res.output


@pytest.mark.shared_data
def test_shared_reflexion_logs_text_and_jsonl_agree():
    from conftest import shared_data

    root = shared_data("hotpotqa") / "reflexion_logs"
    if not (root / "trials.jsonl").is_file():
        pytest.skip("no Reflexion logs in ../shared/data/hotpotqa")
    a, _ = importers.import_reflexion(root / "trials.jsonl")
    b, _ = importers.import_reflexion(root / "original")
    assert len(a) == len(b) > 100
    assert {(r["trial"], r["reflection"], r["rating"]) for r in a} == {(r["trial"], r["reflection"], r["rating"]) for r in b}


def test_sft_on_rating_f1_keeps_reflections_whose_f1_improved(workspace):
    write_run(workspace, "r1", hand_built())
    D.build(D.DatasetConfig(runs=["r1"], val_fraction=0.0, name="f1", sft_on="rating_f1"), workspace)
    sft = D.read_split(workspace, "f1", "sft", "train")
    # "Plan A." (EM 0 -> 0, F1 0 -> 0.5) improves only by F1; "Plan B." (F1 0.5 -> 0.2) does not
    assert "Plan A." in {r["completion"][0]["content"] for r in sft}
    assert "Plan B." not in {r["completion"][0]["content"] for r in sft}
    D.build(D.DatasetConfig(runs=["r1"], val_fraction=0.0, name="em"), workspace)
    assert "Plan A." not in {r["completion"][0]["content"] for r in D.read_split(workspace, "em", "sft", "train")}
    with pytest.raises(UsageError, match="sft_on"):
        D.build(D.DatasetConfig(runs=["r1"], name="bad", sft_on="bogus"), workspace)
