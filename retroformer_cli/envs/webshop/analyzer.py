"""Lucene's English analyzer and one-byte length norm, re-implemented in pure Python.

Lucene's ``StandardTokenizer`` -> ``EnglishPossessiveFilter`` -> ``LowerCaseFilter`` -> ``StopFilter`` (Lucene's 33
English stop words) -> ``PorterStemFilter``, as pyserini's ``DefaultEnglishAnalyzer`` runs it. The tokenizer follows
the Unicode UAX#29 word rules the way Lucene's JFlex grammar applies them (letters, digits and ``_`` join;
``. ' ’ :`` inside letters and ``. , ;`` inside digits do not split; each Extended_Pictographic symbol is a token;
ideographs and hiragana one per token); Unicode word-break classes come from the ``regex`` package,
Extended_Pictographic from the table below (``regex``'s own is incomplete). Stemming is NLTK's
``PorterStemmer(mode=MARTIN_EXTENSIONS)``, which equals Lucene's ``PorterStemmer`` (Martin Porter's C version:
words of <= 2 letters kept, ``logi``/``bli`` departures); Snowball's "porter" does not.

Speed: no UAX#29 rule joins characters across white space, so :meth:`LuceneEnglishAnalyzer.term_ids` analyses each
distinct white-space-separated chunk once and caches its terms; a catalog of a million products repeats the same
chunks, so indexing costs a dictionary look-up per chunk instead of a regex pass per character.
"""

from __future__ import annotations

import numpy as np
import regex

MAX_TOKEN_LENGTH = 255  # StandardTokenizer's default; longer tokens are split
CHUNK_CACHE_MAX = 1 << 21  # distinct white-space chunks kept analysed (about 300 MB at most)

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
        self._chunks: dict[str, tuple[str, ...]] = {}  # white-space chunk -> its terms

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
        """The terms Lucene indexes for ``text``: each white-space chunk analysed once, then cached."""
        terms: list[str] = []
        chunks = self._chunks
        for chunk in text.split():
            got = chunks.get(chunk)
            if got is None:
                if len(chunks) >= CHUNK_CACHE_MAX:
                    chunks.clear()
                got = chunks[chunk] = tuple(self.analyze_uncached(chunk))
            terms.extend(got)
        return terms

    def analyze_uncached(self, text: str) -> list[str]:
        """The analyzer chain run over the whole text at once (what :meth:`analyze` must equal)."""
        terms = []
        for tok in self.tokenize(text):
            if len(tok) >= 2 and tok[-2] in "'\u2019\uff07" and tok[-1] in "sS":  # EnglishPossessiveFilter
                tok = tok[:-2]
            tok = tok.lower()
            if not tok or tok in STOP_WORDS:
                continue
            terms.append(self.stem(tok))
        return terms


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
