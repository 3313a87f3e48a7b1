"""WebShop at scale: chunk-cached analysis, CSR index and its memory-mapped cache, lazy catalog, synthetic catalog."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from retroformer_cli.envs.webshop import store as store_mod
from retroformer_cli.envs.webshop.analyzer import LuceneEnglishAnalyzer, byte4_to_int, int_to_byte4
from retroformer_cli.envs.webshop.catalog import load_documents, product_contents
from retroformer_cli.envs.webshop.env import SAMPLE_DATA, WebShopEnv
from retroformer_cli.envs.webshop.goals import build_goals
from retroformer_cli.envs.webshop.search import BM25Index, index_path, load_or_build
from retroformer_cli.envs.webshop.store import LazyCatalog, load_catalog
from retroformer_cli.envs.webshop.synth import generate
from retroformer_cli.errors import DataError

from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DOCS = SAMPLE_DATA / "documents.jsonl"
TRICKY = [
    "The Women's Running-Shoes, 3.5 inch; size:large\tsize:10 10,000 ★★ logically",
    "emoji 👍🏽 and 👨\u200d👩\u200d👧 family, ❤\ufe0f, flags 🇺🇸🇬🇧 x\u00a0y\u2003z",
    "日本語のテキスト カタカナ mixed_with_underscores __ a.b.c 1.2.3 it's O'Neil's ’s",
    "x" * 300 + " caf\u00e9 na\u0308ive 'quoted' \"double\" end.",
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 400-product synthetic catalog resampled from the sample catalog (half of them goal products)."""
    return generate(SAMPLE_DOCS, tmp_path_factory.mktemp("synth") / "cat", 400, seed=3, goal_fraction=0.5)


def brute_force(docs: list[tuple[str, str]], query: str, k: int = 50) -> list[tuple[str, float]]:
    """Lucene's BM25 written out per document (float32 terms, summed in double), ties by id."""
    a = LuceneEnglishAnalyzer()
    tfs = [Counter(a.analyze(t)) for _, t in docs]
    n = len(docs)
    avgdl = np.float32(sum(sum(c.values()) for c in tfs) / n)
    f32, one = np.float32, np.float32(1)
    out = []
    for (doc_id, _), tf in zip(docs, tfs):
        inv = one / (f32(0.9) * ((one - f32(0.4)) + f32(0.4) * f32(byte4_to_int(int_to_byte4(sum(tf.values()))))
                                  / avgdl))
        total, hit = 0.0, False
        for term, boost in Counter(a.analyze(query)).items():
            df = sum(term in c for c in tfs)
            if tf.get(term):
                w = f32(boost) * f32(math.log(1 + (n - df + 0.5) / (df + 0.5)))
                total += float(w - w / (one + f32(tf[term]) * inv))
                hit = True
        if hit:
            out.append((doc_id, float(np.float32(total))))
    out.sort(key=lambda x: (-x[1], x[0].encode()))
    return out[:k]


# --- analysis --------------------------------------------------------------------------------------
def test_chunk_cached_analysis_equals_one_pass():
    a = LuceneEnglishAnalyzer()
    texts = TRICKY + [t for _, t in load_documents(SAMPLE_DOCS).documents()]
    for text in texts + texts:  # the second round comes from the cache
        assert a.analyze(text) == a.analyze_uncached(text)
    assert a.analyze(TRICKY[0]) == ["women", "run", "shoe", "3.5", "inch", "size:larg", "size", "10", "10,000", "★",
                                    "★", "logic"]


@pytest.mark.shared_data
def test_chunk_cached_analysis_on_the_1k_catalog():
    data = shared_data("webshop")
    a = LuceneEnglishAnalyzer()
    docs = list(load_documents(data / "documents_1k.jsonl").documents())
    queries = [json.loads(line)["query"] for line in (data / "lucene_bm25_reference_top50.jsonl").open()]
    assert all(a.analyze(t) == a.analyze_uncached(t) for t in [t for _, t in docs] + queries)


# --- index -------------------------------------------------------------------------------------------
def test_index_matches_brute_force_on_both_scoring_paths(synth):
    docs = list(load_documents(synth / "documents.jsonl").documents())
    idx = BM25Index.build(docs)
    queries = ["hdmi cable braided", "wool socks wool", "women shoes size 8", "nothing-matches-this", "cotton"]
    dense, sample = BM25Index.DENSE_RATIO, BM25Index.SAMPLE
    try:
        # the sparse path; the dense path with a strided sample (every 4th doc); the dense path without it
        for ratio, BM25Index.SAMPLE in ((0, sample), (10**9, 100), (10**9, sample)):
            BM25Index.DENSE_RATIO = ratio
            for q in queries:
                for k in (3, 20, 400):  # 400 = every doc: the "fewer hits than k" branch
                    assert idx.search(q, k) == brute_force(docs, q, k), (ratio, q, k)
    finally:
        BM25Index.DENSE_RATIO, BM25Index.SAMPLE = dense, sample
    assert idx.search("hdmi cable")[0][1] > 0 and idx.search("the and of") == []


def test_index_cache_is_memory_mapped_and_checked(tmp_path, synth):
    docs = list(load_documents(synth / "documents.jsonl").documents())
    idx, how = load_or_build("k", docs, cache_dir=tmp_path)
    again, how2 = load_or_build("k", cache_dir=tmp_path, docs_factory=lambda: pytest.fail("rebuilt"))
    assert (how, how2) == ("built+cached", "cache")
    assert isinstance(again.post_docs, np.memmap) and isinstance(again.post_tfn, np.memmap)
    for q in ("merino wool socks", "hdmi cable 6ft", "garden hose"):
        assert again.search(q) == idx.search(q)
    folder = index_path(tmp_path, "k")
    header = json.loads((folder / "header.json").read_text())
    (folder / "header.json").write_text(json.dumps({**header, "format": -1}))
    assert BM25Index.load(folder) is None
    (folder / "header.json").write_text(json.dumps({**header, "n_postings": header["n_postings"] + 1}))
    assert BM25Index.load(folder) is None
    (folder / "header.json").unlink()
    assert load_or_build("k", docs, cache_dir=tmp_path)[1] == "built+cached"


# --- lazy catalog -------------------------------------------------------------------------------------
def test_lazy_catalog_equals_eager(tmp_path, synth):
    path = synth / "documents.jsonl"
    eager = load_documents(path)
    lazy = load_catalog(path, cache_dir=tmp_path, lazy=True)
    again = load_catalog(path, cache_dir=tmp_path, lazy=True)  # from the cached scan
    assert isinstance(lazy, LazyCatalog) and list((tmp_path / "catalogs").iterdir())
    assert list(lazy.documents()) == list(again.documents()) == list(eager.documents())
    assert list(again.products) == eager.products and len(again) == len(eager) == 400
    assert all(again.prices[a] == eager.prices[a] for a in eager.by_asin) and "NOPE" not in again.by_asin
    ins = json.loads((synth / "items_ins_v2.json").read_text())
    for kind in ("synthetic", "human"):
        want = build_goals(eager.products, eager.prices, kind, ins)
        got = build_goals(list(again.goal_candidates(ins, kind)), again.prices, kind, ins)
        assert got == want and (kind == "human" or len(got) > 50)
    assert len(load_catalog(path, num_products=7, lazy=True)) == 7
    assert not isinstance(load_catalog(SAMPLE_DOCS), LazyCatalog)  # small files still load whole


def test_lazy_catalog_skips_repeats_and_reports_bad_lines(tmp_path):
    lines = SAMPLE_DOCS.read_text().splitlines()
    broken = json.loads(lines[2])
    del broken["product"]["Title"]
    path = tmp_path / "documents.jsonl"
    path.write_text("\n".join([lines[0], "", lines[1], lines[0], json.dumps(broken)]) + "\n")
    cat = load_catalog(path, lazy=True)
    assert len(cat) == 3
    first = json.loads(lines[0])
    assert list(cat.documents())[:2] == [(first["id"], first["contents"]),
                                        (json.loads(lines[1])["id"], json.loads(lines[1])["contents"])]
    with pytest.raises(DataError, match=r"Line 5 of .*lacks Title"):
        cat.products[2]
    path.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match="Line 2 of .* not valid JSON"):
        load_catalog(path, lazy=True)


def test_env_on_a_lazy_catalog(tmp_path, synth, monkeypatch):
    monkeypatch.setattr(store_mod, "EAGER_MAX_BYTES", 0)
    env = WebShopEnv(data=synth, cache_dir=tmp_path)
    assert isinstance(env.catalog, LazyCatalog) and env._world.index_source == "built+cached"
    goal = env.goals[0]
    product = env.catalog.by_asin[goal["asin"]]
    env.reset(options={"task_id": "fixed_0"})
    obs, _, _, _, info = env.step(f"search[{product['Title']}]")
    assert goal["asin"].lower() in info["available_actions"]["clickables"]
    twin = WebShopEnv(data=synth, cache_dir=tmp_path)
    assert twin._world.index_source == "cache" and twin.goals == env.goals


# --- synthetic catalog ---------------------------------------------------------------------------------
def test_synthetic_catalog_is_deterministic_and_shaped_like_webshop(tmp_path, synth):
    again = generate(SAMPLE_DOCS, tmp_path / "again", 400, seed=3, goal_fraction=0.5)
    other = generate(SAMPLE_DOCS, tmp_path / "other", 400, seed=4, goal_fraction=0.5)
    text = (synth / "documents.jsonl").read_bytes()
    assert (again / "documents.jsonl").read_bytes() == text != (other / "documents.jsonl").read_bytes()
    src = load_documents(SAMPLE_DOCS).products[0]
    rows = [json.loads(line) for line in text.splitlines()]
    assert len({r["id"] for r in rows}) == 400 and rows[7]["id"] == "SYN0000007"
    for r in rows:
        assert set(r["product"]) - {"instructions"} == set(src) - {"instructions"}
        assert r["contents"] == product_contents(r["product"]) and r["id"] == r["product"]["asin"]
    titles = {r["product"]["Title"] for r in rows}
    assert len(titles) > 300  # words were resampled, not copied
    goals = json.loads((synth / "items_ins_v2.json").read_text())
    assert set(goals) <= {r["id"] for r in rows} and all(e["instruction_attributes"] for e in goals.values())
    with pytest.raises(DataError, match="does not exist"):
        generate(tmp_path / "missing.jsonl", tmp_path / "x", 10)


def test_scale_benchmark_runs_small(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "webshop_scale.py"), "--sizes", "150,300",
                          "--workspace", str(tmp_path / "ws"), "--source", str(SAMPLE_DOCS), "--timeout", "300"],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for n in ("150", "300"):
        leg = res["sizes"][n]
        assert leg["docs"] == int(n) and leg["build_index"] == "built+cached" and leg["start_index"] == "cache"
        assert leg["search_p50_ms"] > 0 and leg["build_rss_mb"] > 0 and leg["start_s"] >= 0


def test_scale_benchmark_leaves_its_warm_up_queries_out_of_the_timings():
    import importlib.util

    spec = importlib.util.spec_from_file_location("webshop_scale_bench", REPO / "benchmarks" / "webshop_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Index:
        def __init__(self):
            self.seen: list[str] = []

        def search(self, q):
            self.seen.append(q)

    index, queries = Index(), [f"q{i}" for i in range(50)]
    assert bench.search_latency(index, queries, warmup=20)[2] == 30  # timed: the 30 after the warm-up
    assert index.seen == queries, "each query runs once: no warm-up query is timed again"
    few = Index()
    assert bench.search_latency(few, queries[:10], warmup=20)[2] == 5 and few.seen == queries[:10]
