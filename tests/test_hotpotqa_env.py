"""HotPotQA metrics, action parsing, docstore search and env semantics on the bundled sample data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retroformer_cli.envs import make
from retroformer_cli.envs.base import TextEnv
from retroformer_cli.envs.hotpotqa import (
    SAMPLE_DATA,
    VALID_ACTIONS,
    Docstore,
    HotPotQAEnv,
    load_questions,
    parse_action,
)
from retroformer_cli.envs.hotpotqa_metrics import exact_match, f1_score, normalize_answer
from retroformer_cli.errors import DataError, UsageError

# Sample question ids (sample_data/hotpotqa/questions.jsonl).
Q_FOUNDER = "5f1a03c2e7b94d0a8c61f201"  # bridge, answer "1889"
Q_NATIONALITY = "5f1a03c2e7b94d0a8c61f202"  # comparison, answer "yes"
Q_SEA = "5f1a03c2e7b94d0a8c61f203"  # bridge, answer "the Sorrel Sea"
Q_LAKES = "5f1a03c2e7b94d0a8c61f205"  # comparison, answer "no"
Q_HOTEL = "5f1a03c2e7b94d0a8c61f207"  # bridge, question with a leading space


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("  The  Quick, brown-fox!! ", "quick brownfox"),  # punctuation removed, not split on
        ("the-end", "theend"),  # punctuation goes before articles, so no article is left
        ("An apple a day", "apple day"),
        ("Theatre", "theatre"),  # articles only as whole words
        ("Café – Noir", "café – noir"),  # non-ASCII punctuation is kept, as in the official script
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    ("pred", "gold", "em"),
    [
        ("The Sorrel Sea", "sorrel sea", 1.0),
        ("sorrel sea.", "the Sorrel Sea", 1.0),
        ("Sorrel", "the Sorrel Sea", 0.0),
        ("", "", 1.0),
        ("Yes", "yes", 1.0),
    ],
)
def test_exact_match(pred: str, gold: str, em: float) -> None:
    assert exact_match(pred, gold) == em


@pytest.mark.parametrize(
    ("pred", "gold", "f1"),
    [
        ("Marrowgate", "Marrowgate", 1.0),
        # 1 shared token of 3 predicted, 1 gold: P = 1/3, R = 1 -> F1 = 0.5
        ("Kit Amberley Marrowgate", "Marrowgate", 0.5),
        # token counts are clipped: "cat cat" vs "cat dog" shares one "cat": P = R = 1/2
        ("the cat cat", "cat dog", 0.5),
        ("an apple", "Apple!", 1.0),
        # yes/no quirk: a differing pred or gold in {yes, no, noanswer} scores 0 despite overlap
        ("no way", "no", 0.0),
        ("no", "no way", 0.0),
        ("yes", "no", 0.0),
        ("noanswer", "no answer", 0.0),
        ("Yes.", "yes", 1.0),
        # no common token, including empty sides (empty vs empty: EM 1 but F1 0 in the official script)
        ("Lisket", "Draskow", 0.0),
        ("", "Draskow", 0.0),
        ("", "", 0.0),
        # en dash survives normalisation as its own token: "– b" vs "b": P = 1/2, R = 1
        ("A – B", "a b", 2 / 3),
    ],
)
def test_f1_score(pred: str, gold: str, f1: float) -> None:
    assert f1_score(pred, gold) == pytest.approx(f1, abs=1e-12)


# ----------------------------------------------------------------------------- parse_action


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Search[Ed Wood]", ("search", "Ed Wood")),
        ("  search [ Ed Wood ]  ", ("search", "Ed Wood")),
        ("LOOKUP[born]", ("lookup", "born")),
        ("Finish(yes)", ("finish", "yes")),
        ("Search[Ed Wood", ("search", "Ed Wood")),
        ("Action 2: Finish[Hotel Siebenstern]", ("finish", "Hotel Siebenstern")),
        ("Finish[Ed Wood (film)]", ("finish", "Ed Wood (film)")),
        ("Search(Ed Wood (film))", ("search", "Ed Wood (film)")),
        ("Search[Ed Wood]\nObservation 1: something", ("search", "Ed Wood")),
        ("Finish[]", ("finish", "")),
    ],
)
def test_parse_action_accepts(text: str, parsed: tuple[str, str]) -> None:
    assert parse_action(text) == parsed


@pytest.mark.parametrize("text", ["", "   ", "Think[x]", "Search Ed Wood", "the answer is yes", "search", "Searching[x]"])
def test_parse_action_rejects(text: str) -> None:
    assert parse_action(text) is None


# ----------------------------------------------------------------------------- docstore


@pytest.fixture(scope="module")
def env() -> HotPotQAEnv:
    return HotPotQAEnv()


def test_sample_data_shape() -> None:
    questions = load_questions(SAMPLE_DATA / "questions.jsonl")
    assert 6 <= len(questions) <= 12
    assert {q.type for q in questions} == {"bridge", "comparison"}
    assert {"yes", "no"} <= {q.answer for q in questions}
    for q in questions:
        assert len(q.id) == 24 and int(q.id, 16) >= 0
        assert 4 <= len(q.context) <= 5
        paragraphs = dict(q.context)
        for title, idx in q.supporting_facts:
            assert idx < len(paragraphs[title])
        for _, sentences in q.context:
            assert not sentences[0].startswith(" ") and all(s.startswith(" ") for s in sentences[1:])


def test_docstore_union_and_dedupe(env: HotPotQAEnv) -> None:
    # "Mirela Sand (singer)" is in two questions' contexts but stored once
    all_titles = [t for q in env.questions for t, _ in q.context]
    assert all_titles.count("Mirela Sand (singer)") == 2
    assert len(env.docstore) == len(set(all_titles))
    assert "draskow  TOWN hall" in env.docstore


def test_search_exact(env: HotPotQAEnv) -> None:
    result = env.docstore.search("  lisket ")
    assert result.match == "exact" and result.page is not None and result.page.title == "Lisket"
    assert result.observation.startswith("Lisket is a market town in southern Velantia")


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("Corvel Point", "Corvel Point (lighthouse)"),  # disambiguation dropped, unique
        ("Marrowgate", "Marrowgate (band)"),  # "Marrowgate Street" does not count as a base match
        ("Osric Penhallow (engineer)", "Osric Penhallow"),  # query's own disambiguation dropped
        ("Quelmoor Institute of Technology", "Quellmoor Institute of Technology"),  # close match
        ('"Kit Amberley"', "Kit Amberley"),  # quoted query
    ],
)
def test_search_near(env: HotPotQAEnv, query: str, title: str) -> None:
    result = env.docstore.search(query)
    assert result.match in ("exact", "near") and result.page is not None and result.page.title == title


def test_search_tie_gives_similar_list(env: HotPotQAEnv) -> None:
    result = env.docstore.search("Mirela Sand")  # novelist and singer tie
    assert result.page is None
    assert result.observation.startswith("Could not find [Mirela Sand]. Similar: [")
    similar = env.docstore.similar("Mirela Sand")
    assert set(similar[:2]) == {"Mirela Sand (novelist)", "Mirela Sand (singer)"}
    assert result.observation == f"Could not find [Mirela Sand]. Similar: {similar}"


def test_similar_is_bm25_top5_and_deterministic(env: HotPotQAEnv) -> None:
    similar = env.docstore.similar("museum of flight glider")
    # the three paragraphs mentioning the museum and the glider come first
    assert len(similar) == 5 and set(similar[:3]) == {"Osric Penhallow", "Lisket", "Penhallow Glider"}
    assert similar == Docstore.from_questions(env.questions).similar("museum of flight glider")
    assert env.docstore.search("zzzz qqqq").observation == "Could not find [zzzz qqqq]. Similar: []"


def test_docstore_ties_broken_by_title() -> None:
    store = Docstore([("B page", [" same words"]), ("A page", [" same words"]), ("C other", [" nothing"])])
    assert store.similar("same words") == ["A page", "B page"]


# ----------------------------------------------------------------------------- env


def test_registry_and_contract(env: HotPotQAEnv) -> None:
    made = make("HotPotQA-v0", max_steps=3)
    assert isinstance(made, HotPotQAEnv) and isinstance(made, TextEnv)
    assert made.env_id == "hotpotqa" and made.max_steps == 3
    ids = [json.loads(line)["id"] for line in (SAMPLE_DATA / "questions.jsonl").read_text().splitlines()]
    assert env.task_ids() == ids


def test_reset_observation_and_no_leak(env: HotPotQAEnv) -> None:
    obs, info = env.reset(options={"task_id": Q_HOTEL})
    assert obs == "Question: The architect of Draskow Town Hall also designed which hotel in Quellmoor?"
    assert info["task_id"] == Q_HOTEL and info["instruction"] == obs.removeprefix("Question: ")
    assert info["step"] == 0 and "answer" not in info


def test_reset_errors(env: HotPotQAEnv) -> None:
    with pytest.raises(UsageError):
        env.reset()
    with pytest.raises(UsageError, match="nope"):
        env.reset(options={"task_id": "nope"})


def test_search_and_lookup_walk(env: HotPotQAEnv) -> None:
    env.reset(options={"task_id": Q_HOTEL})
    obs, reward, term, trunc, info = env.step("Lookup[Draskow]")
    assert "Search[" in obs and (reward, term, trunc) == (0.0, False, False) and info["action_type"] == "lookup"
    obs, *_ = env.step("Search[Annelie Roost]")
    assert obs.startswith("Annelie Roost (1861 \u2013 1934) was a Velantian architect.")
    obs, *_ = env.step("Lookup[draskow]")
    assert obs == "(Result 1 / 2) Her best-known works are Draskow Town Hall and the Hotel Siebenstern in Quellmoor."
    obs, *_ = env.step("Lookup[Draskow]")
    assert obs == "(Result 2 / 2) A street in Draskow is named after her."
    obs, _, _, _, info = env.step("Lookup[Draskow]")
    assert obs == "No more results." and info["step"] == 5


def test_new_search_or_keyword_restarts_lookup() -> None:
    env = HotPotQAEnv(max_steps=20)
    env.reset(options={"task_id": Q_HOTEL})
    env.step("Search[Annelie Roost]")
    assert env.step("Lookup[Draskow]")[0].startswith("(Result 1 / 2)")
    assert env.step("Lookup[architect]")[0].startswith("(Result 1 / 2) Annelie Roost")
    assert env.step("Lookup[Draskow]")[0].startswith("(Result 1 / 2)")
    assert env.step("Lookup[submarine]")[0] == "No more results."
    env.step("Search[Mirela Sand]")  # failed search: no page any more
    assert "Search[" in env.step("Lookup[novel]")[0]


def test_invalid_action_counts_as_step(env: HotPotQAEnv) -> None:
    env.reset(options={"task_id": Q_FOUNDER})
    for i, bad in enumerate(["I think it is 1889", "Search[]", "Jump[Lisket]"], 1):
        obs, reward, term, trunc, info = env.step(bad)
        assert obs.startswith("Invalid action: ") and obs.endswith(VALID_ACTIONS)
        assert (reward, term, trunc) == (0.0, False, False)
        assert info["step"] == i and info["action_type"] == "invalid"


def test_finish_correct(env: HotPotQAEnv) -> None:
    env.reset(options={"task_id": Q_SEA})
    env.step("Search[Corvel Point]")
    obs, reward, term, trunc, info = env.step("finish [ Sorrel Sea ]")
    assert (reward, term, trunc) == (1.0, True, False)
    assert info["success"] is True and info["score"] == info["em"] == 1.0 and info["f1"] == 1.0
    assert info["prediction"] == "Sorrel Sea" and info["answer"] == "the Sorrel Sea"
    assert info["step"] == 2 and info["action_type"] == "finish" and obs == "Answer is CORRECT"


def test_finish_incorrect_yes_no(env: HotPotQAEnv) -> None:
    env.reset(options={"task_id": Q_LAKES})
    obs, reward, term, trunc, info = env.step("Finish[no, they are not]")
    # shares "no" with the gold answer but the yes/no quirk zeroes F1
    assert (reward, term, trunc) == (0.0, True, False) and obs == "Answer is INCORRECT"
    assert info["success"] is False and info["score"] == 0.0 and info["f1"] == 0.0 and info["answer"] == "no"
    env.reset(options={"task_id": Q_NATIONALITY})
    assert env.step("Finish[Yes]")[1] == 1.0


def test_step_limit_truncates() -> None:
    env = HotPotQAEnv(max_steps=2)
    env.reset(options={"task_id": Q_FOUNDER})
    assert env.step("Search[Harrowind Aeronautics]")[3] is False
    obs, reward, term, trunc, info = env.step("Search[Osric Penhallow]")
    assert obs.startswith("Osric Penhallow (14 March 1889") and (reward, term, trunc) == (0.0, False, True)
    assert info["success"] is False and info["score"] == 0.0 and info["f1"] == 0.0
    assert info["prediction"] is None and info["answer"] == "1889" and info["step"] == 2
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("Finish[1889]")
    env.reset(options={"task_id": Q_FOUNDER})  # reset starts over
    env.step("Search[Osric Penhallow]")
    assert env.step("Finish[1889]")[1:4] == (1.0, True, False)  # Finish on the last step still counts


def test_step_after_finish_and_before_reset_raise() -> None:
    env = HotPotQAEnv()
    with pytest.raises(RuntimeError):
        env.step("Search[Lisket]")
    env.reset(options={"task_id": Q_FOUNDER})
    env.step("Finish[1889]")
    with pytest.raises(RuntimeError, match=r"episode is over; call reset\(\)"):
        env.step("Search[Lisket]")


def test_bad_max_steps() -> None:
    with pytest.raises(UsageError, match="max_steps"):
        HotPotQAEnv(max_steps=0)


# ----------------------------------------------------------------------------- loading


def _record(qid: str, key: str = "id") -> dict:
    return {key: qid, "question": f"Q {qid}?", "answer": "a", "type": "bridge", "level": "hard",
            "supporting_facts": [["T" + qid, 0]], "context": [["T" + qid, ["Text " + qid + "."]]]}


def test_load_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_questions(tmp_path / "absent.jsonl")
    with pytest.raises(DataError):
        HotPotQAEnv(tmp_path / "absent.jsonl")


def test_load_bad_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps(_record("a1")) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"Line 3 of .*q\.jsonl"):
        load_questions(f)
    f.write_text(json.dumps({"id": "x", "question": "Q?"}) + "\n")
    with pytest.raises(DataError, match=r"Line 1 of .*lacks the field\(s\) answer, context"):
        load_questions(f)


def test_load_official_json_list_with_underscore_id(tmp_path: Path) -> None:
    f = tmp_path / "hotpot_dev_distractor_v1.json"
    f.write_text(json.dumps([_record("b1", "_id"), _record("b2", "_id")], indent=1))
    questions = load_questions(f)
    assert [q.id for q in questions] == ["b1", "b2"]
    assert questions[0].context == [("Tb1", ["Text b1."])] and questions[0].supporting_facts == [("Tb1", 0)]


def test_load_directory_sorted_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps(_record("b1")) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([_record("a1", "_id")]))
    (tmp_path / "README.md").write_text("# not data\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"prediction": "x", "answer": "y", "em": 0.0, "f1": 0}) + "\n")
    assert [q.id for q in load_questions(tmp_path)] == ["a1", "b1"]
    env = HotPotQAEnv(tmp_path, split="b")
    assert env.task_ids() == ["b1"]
    with pytest.raises(DataError, match="split 'test'"):
        HotPotQAEnv(tmp_path, split="test")
    (tmp_path / "c.jsonl").write_text(json.dumps(_record("a1")) + "\n")
    with pytest.raises(DataError, match="repeats the question id a1"):
        load_questions(tmp_path)


def test_load_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .jsonl/.json question files"):
        load_questions(tmp_path)
