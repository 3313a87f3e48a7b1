"""HotPotQA env and metrics against the real dev data in ../shared/data/hotpotqa (skipped if absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retroformer_cli.envs.hotpotqa import HotPotQAEnv, load_questions
from retroformer_cli.envs.hotpotqa_metrics import exact_match, f1_score

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpotqa"
DEV = SHARED / "dev.jsonl"
VECTORS = SHARED / "metric_vectors.dev.jsonl"

if not DEV.is_file():
    pytest.skip(f"shared HotPotQA data not found at {DEV}", allow_module_level=True)

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def env() -> HotPotQAEnv:
    return HotPotQAEnv(DEV, max_steps=1000)


def test_load_all_dev_questions(env: HotPotQAEnv) -> None:
    questions = load_questions(DEV)
    assert len(questions) == 140 == len(set(env.task_ids()))
    assert sum(q.type == "bridge" for q in questions) == 115
    assert all(len(q.id) == 24 and q.level == "hard" for q in questions)
    # loading the folder picks dev.jsonl and skips the metric vectors file
    assert [q.id for q in load_questions(SHARED)] == [q.id for q in questions]


def test_every_gold_paragraph_reachable_by_search(env: HotPotQAEnv) -> None:
    misses = []
    for q in env.questions:
        env.reset(options={"task_id": q.id})
        paragraphs = dict(q.context)
        for title in dict.fromkeys(t for t, _ in q.supporting_facts):
            obs, reward, term, trunc, _ = env.step(f"Search[{title}]")
            if obs != "".join(paragraphs[title]).strip() or term or trunc:
                misses.append((q.id, title))
    assert misses == []


def test_reset_never_leaks_answer(env: HotPotQAEnv) -> None:
    for q in env.questions[:20]:
        _, info = env.reset(options={"task_id": q.id})
        assert "answer" not in info


def test_metric_vectors_agree_100_percent() -> None:
    if not VECTORS.is_file():
        pytest.skip(f"{VECTORS} not found")
    rows = [json.loads(line) for line in VECTORS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 1120
    bad = [
        r for r in rows
        if exact_match(r["prediction"], r["answer"]) != r["em"] or abs(f1_score(r["prediction"], r["answer"]) - r["f1"]) > 1e-9
    ]
    assert bad == []
