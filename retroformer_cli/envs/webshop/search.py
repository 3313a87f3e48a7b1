"""Search with Lucene parity: WebShop's pyserini index re-implemented in-process.

WebShop ranks products with pyserini's ``LuceneSearcher`` (Lucene 9 BM25, k1 = 0.9, b = 0.4) over the
``contents`` field, analysed by ``DefaultEnglishAnalyzer``. This module reproduces that ranking:

* **Analyzer**: Lucene's English chain (``analyzer.py``).
* **Scoring** in float32 as Lucene computes it: document length through the one-byte norm
  (``SmallFloat.intToByte4``/``byte4ToInt``), ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``,
  per-term ``w - w / (1 + f * cache[norm])`` with ``w = count_in_query * idf`` (pyserini's
  bag-of-words query boosts a repeated term by its count), clause scores summed in double, cast to float.
* **Ties** broken like Anserini's searcher: by the document id string, ascending.

On ``lucene_bm25_reference_top50.jsonl`` this gives the reference's top-50 ASINs in order for every query.

**Scale** (a million products): postings are CSR arrays (term -> a slice of doc numbers and of
``f * cache[norm]``, precomputed in float32 at build), built from compact per-document term counts with one stable
sort; a query concatenates its terms' slices and sums them with one ``np.bincount`` (in term order, as the
per-term loop did), then keeps the top k by ``np.partition``. The index is saved as a folder of ``.npy`` arrays plus
a JSON header and term list, and loaded memory-mapped, so a second start reads only what a search touches.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from retroformer_cli.envs.webshop.analyzer import (LENGTH_TABLE, STOP_WORDS, LuceneEnglishAnalyzer, byte4_to_int,
                                                    int_to_byte4)

ANALYZER_VERSION = "lucene-english-1"
INDEX_FORMAT = 2  # the on-disk layout below
K1 = 0.9
B = 0.4
SEARCH_RETURN_N = 50  # WebShop's engine.SEARCH_RETURN_N
PRODUCT_WINDOW = 10  # results per page

class _ChunkIds(dict):
    """White-space chunk -> the term numbers of its terms (numbers given in first-seen order)."""

    def __init__(self, analyzer: LuceneEnglishAnalyzer, term_of: dict[str, int]):
        super().__init__()
        self.analyzer, self.term_of = analyzer, term_of

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        term_of = self.term_of
        ids = tuple(term_of.setdefault(t, len(term_of)) for t in self.analyzer.analyze_uncached(chunk))
        if len(self) >= 1 << 21:  # bounded like the analyzer's own cache
            self.clear()
        self[chunk] = ids
        return ids


def _norm_inverse(norms: np.ndarray, sum_total_term_freq: int, k1: float, b: float) -> np.ndarray:
    """BM25Similarity.scorer's cache, per document: 1 / (k1 * (1 - b + b * dl / avgdl)) in float32."""
    f32 = np.float32
    n = len(norms)
    avgdl = f32(sum_total_term_freq / n) if n else f32(1)
    if avgdl == 0:
        avgdl = f32(1)
    one = f32(1)
    cache = one / (f32(k1) * ((one - f32(b)) + f32(b) * LENGTH_TABLE / avgdl))
    return cache[norms]


class BM25Index:
    """An inverted index over (doc id, text) pairs that scores like Lucene's BM25Similarity.

    ``doc_ids``: a numpy bytes array (utf-8 ids); ``terms`` sorted, term ``t`` owning postings
    ``offsets[t]:offsets[t + 1]`` of ``post_docs`` (int32 doc numbers, ascending) and ``post_tfn`` (float32
    ``f * cache[norm]``); ``id_rank``: each doc's place in id order (Anserini's tie break).
    """

    DENSE_RATIO = 8  # a query whose postings number over n_docs / DENSE_RATIO sums into a corpus-sized array
    SAMPLE = 1 << 16  # docs sampled for a lower bound of the k-th score (dense path)

    def __init__(self, doc_ids: np.ndarray, terms: list[str], offsets: np.ndarray, post_docs: np.ndarray,
                 post_tfn: np.ndarray, norms: np.ndarray, id_rank: np.ndarray, sum_total_term_freq: int,
                 analyzer: LuceneEnglishAnalyzer | None = None, k1: float = K1, b: float = B):
        self.doc_ids, self.terms, self.offsets = doc_ids, terms, offsets
        self.post_docs, self.post_tfn, self.norms, self.id_rank = post_docs, post_tfn, norms, id_rank
        self.term_index = {t: i for i, t in enumerate(terms)}
        self.analyzer = analyzer or LuceneEnglishAnalyzer()
        self.k1, self.b = k1, b
        self.n_docs = len(doc_ids)
        self.sum_total_term_freq = int(sum_total_term_freq)
        self.avgdl = self.sum_total_term_freq / self.n_docs if self.n_docs else 1.0

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, docs: Iterable[tuple[str, str]], analyzer: LuceneEnglishAnalyzer | None = None,
              k1: float = K1, b: float = B) -> "BM25Index":
        """Index (doc id, text) pairs, streamed: per document only its term counts are kept (int32 arrays)."""
        analyzer = analyzer or LuceneEnglishAnalyzer()
        term_of: dict[str, int] = {}
        chunk_ids = _ChunkIds(analyzer, term_of).__getitem__
        doc_ids: list[bytes] = []
        tids, tfs, uniq, lengths = array("i"), array("i"), array("i"), array("q")
        chain = itertools.chain.from_iterable
        for doc_id, text in docs:
            doc_ids.append(doc_id.encode("utf-8"))
            counts = collections.Counter(chain(map(chunk_ids, text.split())))
            tids.extend(counts.keys())
            tfs.extend(counts.values())
            uniq.append(len(counts))
            lengths.append(sum(counts.values()))  # BM25Similarity.computeNorm: the token count
        return cls._from_counts(doc_ids, term_of, tids, tfs, uniq, lengths, analyzer, k1, b)

    @classmethod
    def _from_counts(cls, doc_ids: list[bytes], term_of: dict[str, int], tids: array, tfs: array, uniq: array,
                     lengths: array, analyzer: LuceneEnglishAnalyzer, k1: float, b: float) -> "BM25Index":
        n = len(doc_ids)
        terms = sorted(term_of)
        new_id = np.empty(len(terms), dtype=np.int32)
        new_id[np.fromiter((term_of[t] for t in terms), dtype=np.int64, count=len(terms))] = np.arange(len(terms))
        tid = new_id[np.frombuffer(tids, dtype=np.int32)] if len(tids) else np.empty(0, np.int32)
        del tids
        order = np.argsort(tid, kind="stable")  # postings of a term stay in doc order
        offsets = np.zeros(len(terms) + 1, dtype=np.int64)
        np.cumsum(np.bincount(tid, minlength=len(terms)), out=offsets[1:])
        del tid
        post_docs = np.repeat(np.arange(n, dtype=np.int32), np.frombuffer(uniq, dtype=np.int32))[order]
        lens = np.frombuffer(lengths, dtype=np.int64)
        distinct, inverse = np.unique(lens, return_inverse=True)
        norms = np.array([int_to_byte4(int(x)) for x in distinct], dtype=np.uint8)[inverse].reshape(n)
        total = int(lens.sum())
        tf = np.frombuffer(tfs, dtype=np.int32)[order].astype(np.float32)
        del order
        post_tfn = tf * _norm_inverse(norms, total, k1, b)[post_docs]
        ids = np.array(doc_ids, dtype=bytes) if doc_ids else np.empty(0, dtype="S1")
        id_rank = np.empty(n, dtype=np.int32)
        id_rank[np.argsort(ids, kind="stable")] = np.arange(n, dtype=np.int32)
        return cls(ids, terms, offsets, post_docs, post_tfn, norms, id_rank, total, analyzer, k1, b)

    # --- persistence ---------------------------------------------------------------------------
    _ARRAYS = ("doc_ids", "offsets", "post_docs", "post_tfn", "norms", "id_rank")

    def save(self, path: Path) -> None:
        """Write the index as a folder (header.json, terms.json, one .npy per array), atomically replaced."""
        header = {"format": INDEX_FORMAT, "analyzer_version": ANALYZER_VERSION, "k1": self.k1, "b": self.b,
                  "n_docs": self.n_docs, "n_terms": len(self.terms), "n_postings": int(len(self.post_docs)),
                  "sum_total_term_freq": self.sum_total_term_freq}
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in self._ARRAYS}
        save_arrays(Path(path), arrays, header, {"terms.json": json.dumps(self.terms, ensure_ascii=False)})

    @classmethod
    def load(cls, path: Path) -> "BM25Index | None":
        """The saved index, memory-mapped; None when missing, unreadable, partial or of another version."""
        path = Path(path)
        try:
            header = json.loads((path / "header.json").read_text(encoding="utf-8"))
            if header.get("format") != INDEX_FORMAT or header.get("analyzer_version") != ANALYZER_VERSION:
                return None
            terms = json.loads((path / "terms.json").read_text(encoding="utf-8"))
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in cls._ARRAYS}
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if (len(terms) != header["n_terms"] or len(arrays["doc_ids"]) != header["n_docs"]
                or len(arrays["post_docs"]) != header["n_postings"]):
            return None
        return cls(terms=terms, sum_total_term_freq=header["sum_total_term_freq"], k1=header["k1"], b=header["b"],
                   **arrays)

    # --- querying ------------------------------------------------------------------------------
    def doc_id(self, j: int) -> str:
        return bytes(self.doc_ids[j]).decode("utf-8")

    def _accumulate(self, query: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Per query term, its postings and their float32 scores, concatenated in query-term order."""
        counts = collections.Counter(self.analyzer.analyze(query))
        f32, one, n = np.float32, np.float32(1), self.n_docs
        docs, vals = [], []
        for term, boost in counts.items():
            t = self.term_index.get(term)
            if t is None:
                continue
            s, e = int(self.offsets[t]), int(self.offsets[t + 1])
            df = e - s
            weight = f32(boost) * f32(math.log(1 + (n - df + 0.5) / (df + 0.5)))
            docs.append(self.post_docs[s:e])
            vals.append(weight - weight / (one + self.post_tfn[s:e]))
        if not docs:
            return None
        return (docs[0], vals[0]) if len(docs) == 1 else (np.concatenate(docs), np.concatenate(vals))

    def _dense_candidates(self, docs: np.ndarray, vals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sum into a corpus-sized array; keep the docs that can be in the top k.

        The k-th best score of an evenly strided sample (about ``SAMPLE`` docs) is at most the corpus's k-th best,
        so every doc at or above it (less a float32 rounding margin, for ties) is a candidate: a short list, found
        with one comparison pass. Without k positive scores in the sample, every doc above 0 is a candidate."""
        acc = np.bincount(docs, weights=vals, minlength=self.n_docs)
        step = self.n_docs // self.SAMPLE
        if step > 1:
            sample = acc[::step]
            positive = sample[sample > 0]
            if len(positive) >= k:
                floor = np.partition(positive, len(positive) - k)[len(positive) - k] * (1 - 1e-6)
                cand = np.flatnonzero(acc >= floor)
                return cand, acc[cand].astype(np.float32)
        cand = np.flatnonzero(acc)
        if len(cand) < k:  # fewer than k docs score above 0: every hit, even one whose float32 score is 0.0
            hit = np.zeros(self.n_docs, dtype=bool)
            hit[docs] = True
            cand = np.flatnonzero(hit)
        return cand, acc[cand].astype(np.float32)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[tuple[str, float]]:
        """Top-k (doc id, score), best first, as pyserini's LuceneSearcher.search(query, k)."""
        if self.n_docs == 0 or k <= 0:
            return []
        got = self._accumulate(query)
        if got is None:
            return []
        docs, vals = got
        if len(docs) * self.DENSE_RATIO < self.n_docs:  # few postings: sum per distinct doc without a corpus-sized array
            cand, inverse = np.unique(docs, return_inverse=True)
            acc = np.bincount(inverse, weights=vals, minlength=len(cand))  # float64, each doc's terms in order
            scores = acc.astype(np.float32)
        else:
            cand, scores = self._dense_candidates(docs, vals, k)
        if len(cand) > k:  # keep everything tied with the k-th score, then order exactly
            kth = np.partition(scores, len(cand) - k)[len(cand) - k]
            keep = scores >= kth
            cand, scores = cand[keep], scores[keep]
        order = np.lexsort((self.id_rank[cand], -scores))[:k]
        return [(self.doc_id(cand[i]), float(scores[i])) for i in order]


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], header: dict, texts: dict[str, str] | None = None) -> None:
    """Write ``<name>.npy`` per array, the text files and ``header.json`` (last) into a temporary folder, then
    move it to ``folder`` (replacing an older one): a reader sees a whole folder or none."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".", suffix=".tmp"))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "header.json").write_text(json.dumps(header), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def index_path(cache_dir: str | Path, docs_key: str) -> Path:
    return Path(cache_dir) / "indexes" / f"webshop-bm25-{fingerprint(docs_key, ANALYZER_VERSION, INDEX_FORMAT, K1, B)}"


def load_or_build(docs_key: str, docs: "Iterable[tuple[str, str]] | None" = None, cache_dir: str | Path | None = None,
                  docs_factory: "Callable[[], Iterable[tuple[str, str]]] | None" = None) -> tuple[BM25Index, str]:
    """The index for a catalog: read from <cache_dir>/indexes/ when cached, else built (and cached).

    Returns (index, how) where how is "cache", "built" or "built+cached".
    """
    path = None
    if cache_dir is not None:
        path = index_path(cache_dir, docs_key)
        idx = BM25Index.load(path) if path.is_dir() else None
        if idx is not None:
            return idx, "cache"
    if docs is None:
        docs = docs_factory()
    idx = BM25Index.build(docs)
    if path is not None:
        try:
            idx.save(path)
            return idx, "built+cached"
        except OSError:
            pass  # a read-only workspace only costs the rebuild next time
    return idx, "built"


__all__ = [
    "ANALYZER_VERSION", "BM25Index", "LuceneEnglishAnalyzer", "PRODUCT_WINDOW", "SEARCH_RETURN_N", "STOP_WORDS",
    "byte4_to_int", "int_to_byte4", "load_or_build",
]
