"""WebShop: pages, actions, goals, search and the official reward (sample catalog; shared data when present)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retroformer_cli.envs import make
from retroformer_cli.envs.webshop.catalog import iter_json_array, load_documents
from retroformer_cli.envs.webshop.env import SAMPLE_DATA, WebShopEnv, parse_action
from retroformer_cli.envs.webshop.goals import build_goals, split_indices, synthetic_goals
from retroformer_cli.envs.webshop.reward import get_reward, normalize_color
from retroformer_cli.envs.webshop.search import LuceneEnglishAnalyzer, byte4_to_int, int_to_byte4
from retroformer_cli.errors import DataError, UsageError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "webshop"
REPO = Path(__file__).resolve().parents[1]


def _spacy_ready() -> bool:
    try:
        from retroformer_cli.envs.webshop.reward import _nlp

        _nlp()
        return True
    except Exception:
        return False


needs_spacy = pytest.mark.skipif(not _spacy_ready(), reason="spaCy + en_core_web_sm not installed (pip install '.[webshop]')")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/webshop is absent")


def simple_nouns(text: str) -> list[str]:
    """A stand-in for spaCy's noun tagging in hand-worked cases: every lower-cased word."""
    return text.lower().replace(",", " ").split()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return WebShopEnv(cache_dir=tmp_path_factory.mktemp("cache"))


def goal_for(env: WebShopEnv, asin: str, **options: str) -> str:
    for i, g in enumerate(env.goals):
        if g["asin"] == asin and all(g["goal_options"].get(k) == v for k, v in options.items()):
            return f"fixed_{i}"
    raise AssertionError("no such goal")


# --- pages and actions -------------------------------------------------------------------------------
@needs_spacy
def test_page_flow_to_a_full_score_purchase(env):
    tid = goal_for(env, "B0SAMPLE03", size="6ft", color="blue braided")
    obs, info = env.reset(options={"task_id": tid})
    assert obs.startswith("WebShop [SEP] Instruction: [SEP] Find me high speed hdmi cables")
    assert obs.endswith("[SEP] Search") and info["available_actions"] == {"has_search_bar": True, "clickables": ["search"]}
    obs, r, term, trunc, info = env.step("search[HDMI cable gold plated]")
    assert "Back to Search [SEP] Page 1 (Total results: " in obs and "B0SAMPLE03" in obs
    assert info["page"] == "results" and "b0sample03" in info["available_actions"]["clickables"]
    obs, *_, info = env.step("click[B0SAMPLE03]")
    assert "[SEP] size [SEP] 3ft [SEP] 6ft [SEP] 10ft [SEP] color [SEP] grey braided [SEP] blue braided [SEP]" in obs
    assert obs.endswith("Price: $12.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now")
    assert info["available_actions"]["clickables"][:6] == ["back to search", "< prev", "description", "features",
                                                          "reviews", "buy now"]
    env.step("click[6ft]")
    env.step("Action 5: click[Blue Braided]")
    obs, *_ = env.step("click[Features]")
    assert obs.endswith("< Prev [SEP] HIGH SPEED | 48Gbps [SEP] GOLD PLATED | corrosion-resistant connectors")
    obs, *_ = env.step("click[< Prev]")
    assert obs.endswith("Buy Now")
    obs, reward, term, trunc, info = env.step("click[Buy Now]")
    assert term and not trunc and reward == 1.0
    assert info["success"] and info["score"] == 1.0 and info["r_option"] == 1.0 and info["r_price"] is True
    assert info["purchased"] == {"asin": "B0SAMPLE03", "options": {"size": "6ft", "color": "blue braided"},
                                 "price": 12.99}
    assert '[SEP] options [SEP] {"size": "6ft", "color": "blue braided"} [SEP]' in obs
    assert obs.endswith("Your score (min 0.0, max 1.0) [SEP] 1.0 [SEP] Reward Details [SEP] None")
    with pytest.raises(RuntimeError):
        env.step("click[back to search]")


def test_navigation_pages_and_back(env):
    tid = goal_for(env, "B0SAMPLE01")
    env.reset(options={"task_id": tid})
    obs, *_, info = env.step("search[wireless]")
    total = int(obs.split("(Total results: ")[1].split(")")[0])
    assert 0 < total <= 20 and "< Prev" not in obs
    obs, *_, info = env.step("search[for with and]")  # not on the search page any more
    assert obs.startswith("Invalid action") and not info["valid"] and info["page"] == "results"
    env.step("click[back to search]")
    obs, *_, info = env.step("search[for with and]")  # only stop words: Lucene finds nothing
    assert "Page 1 (Total results: 0)" in obs and info["available_actions"]["clickables"] == ["back to search"]
    env.step("click[back to search]")
    obs, *_, info = env.step("search[earbuds]")
    first = [c for c in info["available_actions"]["clickables"] if c.startswith("b0")][0]
    env.step(f"click[{first}]")
    obs, *_, info = env.step("click[< prev]")
    assert info["page"] == "results" and "Page 1" in obs


def test_results_pagination():
    env = WebShopEnv(data=SAMPLE_DATA)
    env.reset(options={"task_id": env.task_ids()[0]})
    env._world._results["many"] = [p["asin"] for p in env.catalog.products]  # 20 results: two pages
    obs, *_, info = env.step("search[many]")
    assert "Page 1 (Total results: 20) [SEP] Next > [SEP]" in obs
    obs, *_, info = env.step("click[next >]")
    assert "Page 2 (Total results: 20) [SEP] < Prev [SEP] B0SAMPLE11" in obs and "next >" not in info["available_actions"]["clickables"]
    obs, *_ = env.step("click[< prev]")
    assert "Page 1 (Total results: 20)" in obs


def test_invalid_actions_change_nothing(env):
    obs0, _ = env.reset(options={"task_id": env.task_ids()[1]})
    for bad in ("buy it now", "click[buy now]", "jump[high]", "", "search[]", "click[B0SAMPLE03]"):
        obs, reward, term, trunc, info = env.step(bad)
        assert obs.startswith("Invalid action") and reward == 0.0 and not term and not info["valid"]
        assert info["page"] == "search"
    obs, *_ = env.step("think[I should search first]")
    assert obs == "OK."


def test_step_limit_truncates_with_zero_score():
    env = WebShopEnv(max_steps=3)
    env.reset(options={"task_id": "fixed_0"})
    env.step("search[socks]")
    env.step("click[back to search]")
    obs, reward, term, trunc, info = env.step("search[socks]")
    assert trunc and not term and reward == 0.0 and info["success"] is False and info["score"] == 0.0
    assert info["purchased"] is None and info["goal"]["asin"]


def test_bad_arguments():
    with pytest.raises(UsageError):
        WebShopEnv(max_steps=0)
    with pytest.raises(UsageError):
        WebShopEnv(observation_mode="html")
    with pytest.raises(DataError):
        WebShopEnv(data="/nonexistent/webshop")
    env = WebShopEnv()
    with pytest.raises(UsageError):
        env.reset(options={"task_id": "fixed_99999"})
    with pytest.raises(UsageError):
        env.reset()


def test_parse_action_and_registry():
    assert parse_action("click[Buy Now]") == ("click", "Buy Now")
    assert parse_action("Action 2: Search[ red  shoes ]\nObservation") == ("search", "red  shoes")
    assert parse_action("search[open bracket") == ("search", "open bracket")
    assert parse_action("nothing here") is None
    env = make("WebShop-v0", data=None, max_steps=15)
    assert isinstance(env, WebShopEnv) and env.action_names == ("search", "click")
    twin = env.spawn()
    assert twin.index is env.index and twin.task_ids() == env.task_ids()


def test_reflexion_observation_mode():
    env = WebShopEnv(observation_mode="reflexion")
    tid = goal_for(env, "B0SAMPLE03", size="6ft", color="blue braided")
    obs, _ = env.reset(options={"task_id": tid})
    assert obs.startswith("\nWebShop \nInstruction:  \n") and obs.endswith("\n[Search] ")
    env.step("search[hdmi cable]")
    obs, *_ = env.step("click[b0sample03]")
    obs, *_ = env.step("click[6ft]")
    assert "\nsize [3ft][[6ft]][10ft]\ncolor [grey braided][blue braided]\n" in obs


# --- reward (hand-worked) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample():
    return load_documents(SAMPLE_DATA / "documents.jsonl")


HDMI_GOAL = {"asin": "B0SAMPLE03", "query": "hdmi cables", "category": "electronics",
             "name": "Quillon 8K HDMI Cable 6ft, High Speed Braided Cord with Gold Plated Connectors",
             "product_category": "Electronics › Accessories & Supplies › Audio & Video Accessories › Cables & "
                                 "Interconnects › Video Cables › HDMI Cables",
             "attributes": ["high speed", "gold plated"], "goal_options": {"size": "6ft", "color": "blue braided"},
             "price_upper": 20.0}


def _reward(sample, asin, price, options):
    return get_reward(sample.by_asin[asin], HDMI_GOAL, price=price, options=options, nouns=simple_nouns)


def test_reward_full_match(sample):
    r = _reward(sample, "B0SAMPLE03", 12.99, {"size": "6ft", "color": "blue braided"})
    # (2 attributes + 2 options + price) / (2 + 2 + 1), type reward 1 (same query)
    assert r.reward == 1.0 and r.r_att == 1.0 and r.r_option == 1.0 and r.r_price is True and r.r_type == 1.0


def test_reward_wrong_option(sample):
    r = _reward(sample, "B0SAMPLE03", 12.99, {"size": "3ft", "color": "blue braided"})
    assert r.num_option_matches == 1 and r.reward == pytest.approx(4 / 5)  # size is matched exactly: 3ft != 6ft
    r = _reward(sample, "B0SAMPLE03", 12.99, {})
    assert r.r_option == 0.0 and r.reward == pytest.approx(3 / 5)


def test_reward_over_price(sample):
    r = _reward(sample, "B0SAMPLE03", 25.0, {"size": "6ft", "color": "blue braided"})
    assert r.r_price is False and r.reward == pytest.approx(4 / 5)
    assert r.official_info()["w_price"] == pytest.approx(1 / 5)


def test_reward_wrong_type(sample):
    r = _reward(sample, "B0SAMPLE17", 12.49, {})  # green tea for an HDMI cable goal: no common title noun
    assert not r.query_match and not r.category_match and r.title_score == 0.0 and r.r_type == 0.0 and r.reward == 0.0
    frame = {"name": "Gold Plated Picture Frame", "Title": "Gold Plated Picture Frame", "query": "picture frames",
             "product_category": "Home & Kitchen › Home Décor Products › Picture Frames", "Attributes": [],
             "BulletPoints": [""], "Description": ""}
    r = get_reward(frame, HDMI_GOAL, price=10.0, options={}, nouns=simple_nouns)
    # no query or category match, 2 of the goal title's 13 words: title score 0.15 -> r_type 0.5
    assert r.title_score == pytest.approx(2 / 13) and r.r_type == 0.5
    assert r.num_attr_matches == 1 and r.reward == pytest.approx(0.5 * (1 + 0 + 1) / 5)  # 'gold plated' in title


def test_colour_normalisation_quirks():
    assert normalize_color("antique graywash") == "ash"  # first colour contained, as WebShop does
    assert normalize_color("blue braided") == "blue"
    assert normalize_color(("color", "navy")) == "navy" and normalize_color(("color", "navy blue")) == ("color", "navy blue")


# --- goals ---------------------------------------------------------------------------------------------
def test_goal_construction_on_sample(sample):
    ins = json.loads((SAMPLE_DATA / "items_ins_v2.json").read_text())
    raw = synthetic_goals(sample.products, ins, sample.prices)
    hdmi = [g for g in raw if g["asin"] == "B0SAMPLE03"]
    assert len(hdmi) == 6  # 3 sizes x 2 colours, option names sorted: color before size
    assert hdmi[0]["goal_options"] == {"color": "grey braided", "size": "3ft"}
    assert hdmi[0]["instruction_text"] == ("Find me high speed hdmi cables with gold plated connectors with color: "
                                           "grey braided, and size: 3ft, and price lower than "
                                           f"{hdmi[0]['price_upper']:.2f} dollars")
    assert hdmi[0]["price_upper"] in (30.0, 40.0, 50.0) and hdmi[0]["name"] == sample.by_asin["B0SAMPLE03"]["Title"]
    assert not [g for g in raw if g["asin"] in ("B0SAMPLE19", "B0SAMPLE20")]  # no instruction: no goal
    shuffled = build_goals(sample.products, sample.prices, "synthetic", ins)
    assert shuffled == build_goals(sample.products, sample.prices, "synthetic", ins)  # deterministic
    assert sorted(map(json.dumps, shuffled)) == sorted(map(json.dumps, raw))
    human = build_goals(sample.products, sample.prices, "human")
    assert len(human) == 1 and human[0]["goal_options"] == ["blue"]
    assert human[0]["instruction_text"].startswith("i need a soft toothbrush for sensitive gums in blue, and price")
    assert list(split_indices(2000, "test")) == list(range(500)) and split_indices(2000, "train") == range(1500, 2000)
    assert len(WebShopEnv(split="dev").task_ids()) == 0 and len(WebShopEnv(split="test").task_ids()) == len(raw)


# --- search --------------------------------------------------------------------------------------------
def test_analyzer_and_norms():
    a = LuceneEnglishAnalyzer()
    assert a.analyze("The Women's Running-Shoes, 3.5 inch; size:large size:10 10,000 ★★ logically") == [
        "women", "run", "shoe", "3.5", "inch", "size:larg", "size", "10", "10,000", "★", "★", "logic"]
    assert [int_to_byte4(i) for i in (0, 23, 24, 25, 40, 107)] == [0, 23, 24, 25, 40, 58]
    assert byte4_to_int(int_to_byte4(107)) == 104


def test_index_cache_roundtrip(tmp_path, sample):
    from retroformer_cli.envs.webshop.search import load_or_build

    idx, how = load_or_build(sample.key, cache_dir=tmp_path, docs_factory=sample.documents)
    again, how2 = load_or_build(sample.key, cache_dir=tmp_path, docs_factory=sample.documents)
    assert (how, how2) == ("built+cached", "cache") and list((tmp_path / "indexes").iterdir())
    assert again.search("merino wool socks") == idx.search("merino wool socks")
    assert idx.search("merino wool socks")[0][0] == "B0SAMPLE16"


def test_streaming_json_list(tmp_path):
    p = tmp_path / "items.json"
    p.write_text(json.dumps([{"asin": f"A{i}", "text": "x, ] [" * 50} for i in range(300)]))
    assert [o["asin"] for o in iter_json_array(p, chunk_size=97)] == [f"A{i}" for i in range(300)]


# --- shared data ----------------------------------------------------------------------------------------
@needs_shared
def test_shared_catalog_and_dev_goals(tmp_path):
    env = WebShopEnv(data=SHARED, cache_dir=tmp_path)
    assert len(env.catalog) == 1000 and len(env.goals) == 5392
    cats = {}
    for p in env.catalog.products:
        cats[p["category"]] = cats.get(p["category"], 0) + 1
    assert cats == {"beauty": 238, "electronics": 229, "garden": 216, "fashion": 200, "grocery": 117}
    vectors = [json.loads(line) for line in (SHARED / "reward_vectors.dev.jsonl").open()]
    for v in vectors:  # goal N here is the goal N the official vectors were made with
        g = env.goals[v["goal_index"]]
        assert (g["asin"], g["goal_options"], g["attributes"]) == (v["goal"]["asin"], v["goal"]["goal_options"],
                                                                   v["goal"]["attributes"])
    assert len(WebShopEnv(data=SHARED, goals="human", cache_dir=tmp_path).goals) == 13


@needs_shared
def test_search_parity_floor():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "webshop_search_parity.py"),
                          str(SHARED / "lucene_bm25_reference_top50.jsonl")], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["queries"] == 590 and res["top10_exact"] >= 0.99 and res["top10_overlap"] >= 0.99


@needs_shared
def test_analyzer_matches_lucene_term_vectors():
    from collections import Counter

    catalog = load_documents(SHARED / "documents_1k.jsonl")
    a = LuceneEnglishAnalyzer()
    tv = {r["id"]: r["terms"] for r in map(json.loads, (SHARED / "lucene_term_vectors_1k.jsonl").open())}
    same = sum(Counter(a.analyze(text)) == tv[asin] for asin, text in catalog.documents())
    assert same >= 999


@needs_shared
@needs_spacy
def test_reward_agreement_floor():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from webshop_reward_agreement import agreement
    finally:
        sys.path.pop(0)
    res = agreement(SHARED / "reward_vectors.dev.jsonl", SHARED / "documents_1k.jsonl")
    assert res["n"] == 302 and res["agreement"] == 1.0 and res["info_agreement"] >= 0.99


# --- collect through the spine ---------------------------------------------------------------------------
@needs_spacy
def test_collect_with_fake_llm(workspace):
    from retroformer_cli.config import CollectConfig
    from retroformer_cli.testing.fake_llm import FakeLLM
    from retroformer_cli.stages import collect
    from retroformer_cli.stages.collect import load_trials

    env = WebShopEnv()
    by_instruction = {g["instruction_text"]: g for g in env.goals}

    def shopper(messages, config):
        if messages[-1].content == "Reflection:":
            return "I bought without choosing the options. Next time I will click every requested option first."
        task, head = messages[1].content, messages[-1].content  # user: reflections + task; assistant: trajectory
        instruction = task.split("Instruction: [SEP] ")[1].split(" [SEP] ")[0]
        goal = by_instruction[instruction]
        step = head.count("Action ") + (0 if head.rstrip().endswith(":") and "Action" in head.splitlines()[-1] else 1)
        plan = [f"search[{env.catalog.by_asin[goal['asin']]['Title']}]", f"click[{goal['asin']}]"]
        if "Reflections:" in task:
            plan += [f"click[{v}]" for v in goal["goal_options"].values()]
        plan.append("click[Buy Now]")
        return f"Thought: step {step} of my plan.\nAction: {plan[min(step, len(plan)) - 1]}"

    cfg = CollectConfig(env="webshop", trials=2, tasks=4, run="w1")
    res = collect.run(cfg, workspace, actor=FakeLLM(shopper), reflector=FakeLLM(shopper))
    assert res.status == "completed" and res.tasks == 4
    trials = load_trials(workspace, "w1")
    assert all(t.trial in (1, 2) for t in trials) and res.solved >= 1
    second = [t for t in trials if t.trial == 2]
    assert second and all(t.success for t in second) and all(t.memory for t in second)
