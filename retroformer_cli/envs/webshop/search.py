"""Search with Lucene parity: WebShop's pyserini index re-implemented in-process.

WebShop ranks products with pyserini's ``LuceneSearcher`` (Lucene 9 BM25, k1 = 0.9, b = 0.4) over the
``contents`` field, analysed by ``DefaultEnglishAnalyzer``. This module reproduces that ranking:

* **Analyzer** (Lucene's ``StandardTokenizer`` -> ``EnglishPossessiveFilter`` -> ``LowerCaseFilter`` ->
  ``StopFilter`` (Lucene's 33 English stop words) -> ``PorterStemFilter``). The tokenizer follows the
  Unicode UAX#29 word rules the way Lucene's JFlex grammar applies them (letters, digits and ``_`` join;
  ``. ' ’ :`` inside letters and ``. , ;`` inside digits do not split; each Extended_Pictographic
  symbol is a token; ideographs and hiragana one per token); Unicode word-break classes come from the
  ``regex`` package, Extended_Pictographic from the table below (``regex``'s own is incomplete).
  Stemming is NLTK's ``PorterStemmer(mode=MARTIN_EXTENSIONS)``, which equals Lucene's
  ``PorterStemmer`` (Martin Porter's C version: words of <= 2 letters kept, ``logi``/``bli``
  departures); Snowball's "porter" does not.
* **Scoring** in float32 as Lucene computes it: document length through the one-byte norm
  (``SmallFloat.intToByte4``/``byte4ToInt``), ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``,
  per-term ``w - w / (1 + f * cache[norm])`` with ``w = count_in_query * idf`` (pyserini's
  bag-of-words query boosts a repeated term by its count), clause scores summed in double, cast to float.
* **Ties** broken like Anserini's searcher: by the document id string, ascending.

On ``lucene_bm25_reference_top50.jsonl`` this gives the reference's top-50 ASINs in order for every query.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import regex

ANALYZER_VERSION = "lucene-english-1"
K1 = 0.9
B = 0.4
SEARCH_RETURN_N = 50  # WebShop's engine.SEARCH_RETURN_N
PRODUCT_WINDOW = 10  # results per page
MAX_TOKEN_LENGTH = 255  # StandardTokenizer's default; longer tokens are split

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with".split()
)

# Unicode Extended_Pictographic (emoji-data.txt), as code point ranges.
EXTENDED_PICTOGRAPHIC = (
    (0xA9, 0xA9), (0xAE, 0xAE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
    (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328), (0x2388, 0x2388),
    (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
    (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x2605), (0x2607, 0x2612),
    (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712), (0x2714, 0x2714), (0x2716, 0x2716),
    (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728), (0x2733, 0x2734), (0x2744, 0x2744),
    (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755), (0x2757, 0x2757),
    (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0), (0x27BF, 0x27BF),
    (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
    (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1F0FF),
    (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171), (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E),
    (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5), (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F),
    (0x1F232, 0x1F23A), (0x1F23C, 0x1F23F), (0x1F249, 0x1F3FA), (0x1F400, 0x1F53D), (0x1F546, 0x1F64F),
    (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F), (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F), (0x1F848, 0x1F84F),
    (0x1F85A, 0x1F85F), (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8FF), (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945),
    (0x1F947, 0x1FAFF), (0x1FC00, 0x1FFFD),
)


def _build_token_pattern() -> "regex.Pattern[str]":
    ep = "".join(f"\\U{a:08X}" if a == b else f"\\U{a:08X}-\\U{b:08X}" for a, b in EXTENDED_PICTOGRAPHIC)
    letter = r"\p{WB=ALetter}\p{WB=Hebrew_Letter}"
    numeric = r"\p{WB=Numeric}"
    joiners = rf"{letter}{numeric}\p{{WB=Katakana}}\p{{WB=ExtendNumLet}}"
    ext = r"[\p{WB=Extend}\p{WB=Format}\p{WB=ZWJ}]*"  # WB4: attached to the previous character
    ext_no_zwj = r"[\p{WB=Extend}\p{WB=Format}]*"
    mid_letter = r"[\p{WB=MidLetter}\p{WB=MidNumLet}\p{WB=Single_Quote}]"  # WB6/7
    mid_num = r"[\p{WB=MidNum}\p{WB=MidNumLet}\p{WB=Single_Quote}]"  # WB11/12
    word = (
        rf"[{joiners}]{ext}"
        rf"(?:[{joiners}]{ext}|(?<=[{letter}]{ext}){mid_letter}(?=[{letter}])|(?<=[{numeric}]{ext}){mid_num}(?=[{numeric}]))*"
    )
    emoji = rf"[{ep}]{ext_no_zwj}(?:\u200d[{ep}]{ext_no_zwj})*\u200d?|[\U0001F1E6-\U0001F1FF]{{1,2}}"
    ideographic = rf"[\p{{Ideographic}}\p{{Script=Hiragana}}]{ext}"
    return regex.compile(rf"{emoji}|{ideographic}|{word}", regex.V1)


class LuceneEnglishAnalyzer:
    """Lucene's EnglishAnalyzer chain (pyserini's DefaultEnglishAnalyzer with Porter stemming)."""

    def __init__(self, stems: dict[str, str] | None = None):
        self._token = _build_token_pattern()
        self._only_connector = regex.compile(
            r"^[\p{WB=ExtendNumLet}\p{WB=Extend}\p{WB=Format}\p{WB=ZWJ}]+$", regex.V1)
        self._stems: dict[str, str] = dict(stems or {})
        self._stemmer = None

    def tokenize(self, text: str) -> list[str]:
        """StandardTokenizer: the raw tokens, case kept."""
        out = []
        for tok in self._token.findall(text):
            if self._only_connector.match(tok):  # '___' alone is no token
                continue
            if len(tok) > MAX_TOKEN_LENGTH:
                out.extend(tok[i:i + MAX_TOKEN_LENGTH] for i in range(0, len(tok), MAX_TOKEN_LENGTH))
            else:
                out.append(tok)
        return out

    def stem(self, word: str) -> str:
        s = self._stems.get(word)
        if s is None:
            if self._stemmer is None:  # nltk imports slowly: only when a word is not cached yet
                from nltk.stem.porter import PorterStemmer

                self._stemmer = PorterStemmer(mode=PorterStemmer.MARTIN_EXTENSIONS)
            s = self._stems[word] = self._stemmer.stem(word)
        return s

    def analyze(self, text: str) -> list[str]:
        terms = []
        for tok in self.tokenize(text):
            if len(tok) >= 2 and tok[-2] in "'\u2019\uff07" and tok[-1] in "sS":  # EnglishPossessiveFilter
                tok = tok[:-2]
            tok = tok.lower()
            if not tok or tok in STOP_WORDS:
                continue
            terms.append(self.stem(tok))
        return terms

    @property
    def stem_cache(self) -> dict[str, str]:
        return self._stems


# --- Lucene's SmallFloat one-byte length norm ------------------------------------------------------
_NUM_FREE_VALUES = 24  # 255 - longToInt4(Integer.MAX_VALUE)


def _long_to_int4(i: int) -> int:
    num_bits = i.bit_length()
    if num_bits < 4:
        return i
    shift = num_bits - 4
    return ((i >> shift) & 0x07) | ((shift + 1) << 3)


def _int4_to_long(i: int) -> int:
    bits, shift = i & 0x07, (i >> 3) - 1
    return bits if shift == -1 else (bits | 0x08) << shift


def int_to_byte4(i: int) -> int:
    """SmallFloat.intToByte4: exact below 24, then 4 significant bits."""
    if i < 0:
        raise ValueError("length must be >= 0")
    return i if i < _NUM_FREE_VALUES else _NUM_FREE_VALUES + _long_to_int4(i - _NUM_FREE_VALUES)


def byte4_to_int(b: int) -> int:
    return b if b < _NUM_FREE_VALUES else _NUM_FREE_VALUES + _int4_to_long(b - _NUM_FREE_VALUES)


LENGTH_TABLE = np.array([byte4_to_int(i) for i in range(256)], dtype=np.float32)


class BM25Index:
    """An inverted index over (doc id, text) pairs that scores like Lucene's BM25Similarity."""

    def __init__(self, doc_ids: Sequence[str], vocab: dict[str, tuple[int, int]], post_docs: np.ndarray,
                 post_tfs: np.ndarray, norms: np.ndarray, analyzer: LuceneEnglishAnalyzer,
                 k1: float = K1, b: float = B):
        self.doc_ids = list(doc_ids)
        self.vocab = vocab
        self.post_docs = post_docs
        self.post_tfs = post_tfs
        self.norms = norms  # uint8 per doc
        self.analyzer = analyzer
        self.k1, self.b = k1, b
        self.n_docs = len(self.doc_ids)
        self.sum_total_term_freq = int(post_tfs.sum(dtype=np.int64)) if len(post_tfs) else 0
        # Anserini breaks score ties by the id string: the rank of each doc in id order
        order = sorted(range(self.n_docs), key=lambda i: self.doc_ids[i].encode("utf-8"))
        self._id_rank = np.empty(self.n_docs, dtype=np.int64)
        self._id_rank[order] = np.arange(self.n_docs)
        self._prepare()

    def _prepare(self) -> None:
        f32 = np.float32
        avgdl = f32(self.sum_total_term_freq / self.n_docs) if self.n_docs else f32(1)
        if avgdl == 0:
            avgdl = f32(1)
        k1, b, one = f32(self.k1), f32(self.b), f32(1)
        cache = one / (k1 * ((one - b) + b * LENGTH_TABLE / avgdl))  # BM25Similarity.scorer's cache
        self._norm_inverse = cache[self.norms]
        self.avgdl = float(avgdl)

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, docs: Iterable[tuple[str, str]], analyzer: LuceneEnglishAnalyzer | None = None,
              k1: float = K1, b: float = B) -> "BM25Index":
        analyzer = analyzer or LuceneEnglishAnalyzer()
        doc_ids: list[str] = []
        postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        norms: list[int] = []
        for j, (doc_id, text) in enumerate(docs):
            doc_ids.append(doc_id)
            counts = collections.Counter(analyzer.analyze(text))
            norms.append(int_to_byte4(sum(counts.values())))  # BM25Similarity.computeNorm: the token count
            for term, tf in counts.items():
                postings[term].append((j, tf))
        vocab: dict[str, tuple[int, int]] = {}
        total = sum(len(v) for v in postings.values())
        post_docs = np.empty(total, dtype=np.int32)
        post_tfs = np.empty(total, dtype=np.float32)
        pos = 0
        for term in sorted(postings):
            plist = postings[term]
            n = len(plist)
            post_docs[pos:pos + n] = [d for d, _ in plist]
            post_tfs[pos:pos + n] = [f for _, f in plist]
            vocab[term] = (pos, pos + n)
            pos += n
        return cls(doc_ids, vocab, post_docs, post_tfs, np.array(norms, dtype=np.uint8), analyzer, k1, b)

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "analyzer_version": ANALYZER_VERSION, "k1": self.k1, "b": self.b, "doc_ids": self.doc_ids,
            "vocab": self.vocab, "post_docs": self.post_docs, "post_tfs": self.post_tfs, "norms": self.norms,
            "stems": self.analyzer.stem_cache,
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump(state, fh, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> "BM25Index | None":
        """The cached index, or None when it is missing, unreadable or from another analyzer version."""
        try:
            with path.open("rb") as fh:
                state = pickle.load(fh)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("analyzer_version") != ANALYZER_VERSION:
            return None
        analyzer = LuceneEnglishAnalyzer(stems=state["stems"])
        return cls(state["doc_ids"], state["vocab"], state["post_docs"], state["post_tfs"], state["norms"],
                   analyzer, state["k1"], state["b"])

    # --- querying ------------------------------------------------------------------------------
    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[tuple[str, float]]:
        """Top-k (doc id, score), best first, as pyserini's LuceneSearcher.search(query, k)."""
        counts = collections.Counter(self.analyzer.analyze(query))
        if not counts or self.n_docs == 0 or k <= 0:
            return []
        f32, one = np.float32, np.float32(1)
        acc = np.zeros(self.n_docs, dtype=np.float64)
        hit = np.zeros(self.n_docs, dtype=bool)
        n = self.n_docs
        for term, boost in counts.items():
            span = self.vocab.get(term)
            if span is None:
                continue
            docs = self.post_docs[span[0]:span[1]]
            tfs = self.post_tfs[span[0]:span[1]]
            df = len(docs)
            idf = f32(math.log(1 + (n - df + 0.5) / (df + 0.5)))
            weight = f32(boost) * idf
            acc[docs] += weight - weight / (one + tfs * self._norm_inverse[docs])
            hit[docs] = True
        cand = np.flatnonzero(hit)
        if len(cand) == 0:
            return []
        scores = acc[cand].astype(np.float32)
        if len(cand) > k:  # keep everything tied with the k-th score, then order exactly
            kth = np.partition(scores, len(cand) - k)[len(cand) - k]
            keep = scores >= kth
            cand, scores = cand[keep], scores[keep]
        order = np.lexsort((self._id_rank[cand], -scores))[:k]
        return [(self.doc_ids[cand[i]], float(scores[i])) for i in order]


def fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def load_or_build(docs_key: str, docs: "Iterable[tuple[str, str]] | None" = None, cache_dir: str | Path | None = None,
                  docs_factory=None) -> tuple[BM25Index, str]:
    """The index for a catalog: read from <cache_dir>/indexes/ when cached, else built (and cached).

    Returns (index, how) where how is "cache", "built" or "built+cached".
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "indexes" / f"webshop-bm25-{fingerprint(docs_key, ANALYZER_VERSION, K1, B)}.pkl"
        if path.is_file():
            idx = BM25Index.load(path)
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
