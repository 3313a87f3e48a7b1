"""HotPotQA (distractor setting) as a text environment with a local docstore.

The agent acts with ReAct's three actions, ``Search[entity]``, ``Lookup[keyword]`` and
``Finish[answer]``. Search runs over the paragraphs of every loaded question instead of live
Wikipedia, with observations shaped like the ReAct/Reflexion Wikipedia tool. An episode is scored by
the official HotPotQA exact match (reward and ``score``), with F1 reported alongside.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from retroformer_cli.envs.hotpotqa_metrics import exact_match, f1_score
from retroformer_cli.envs.spec import EnvSpec
from retroformer_cli.envs.base import check_can_step, data_or_sample
from retroformer_cli.errors import DataError, UsageError, require

SPEC = EnvSpec(
    name="hotpotqa", id="HotPotQA-v0", entry_point="retroformer_cli.envs.hotpotqa:HotPotQAEnv",
    prompts="retroformer_cli.agents.prompts.hotpotqa:PROMPTS", max_steps=6,
    action_names=("search", "lookup", "finish"), options=("split",), spawn=True,
    oracle="retroformer_cli.envs.hotpotqa_oracle:oracle_hints",
    description="HotPotQA distractor questions, Wikipedia-style search (ReAct protocol)",
)

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data" / "hotpotqa"
VALID_ACTIONS = "Valid actions are Search[entity], Lookup[keyword], Finish[answer]."
_NO_PAGE = "No page is loaded yet. Use Search[entity] first, then Lookup[keyword] on that page."


@dataclass
class HotPotQAQuestion:
    """One HotPotQA record; ``context`` is a list of (title, sentences)."""

    id: str
    question: str
    answer: str
    type: str = ""
    level: str = ""
    supporting_facts: list[tuple[str, int]] = field(default_factory=list)
    context: list[tuple[str, list[str]]] = field(default_factory=list)


def _record_to_question(rec: Any, where: str) -> HotPotQAQuestion:
    """Validate one decoded record; ``where`` names file and line for the error message."""
    if not isinstance(rec, dict):
        raise DataError(f"{where} is not a JSON object with a HotPotQA record.")
    qid = rec.get("id", rec.get("_id"))  # our files say "id", the official file "_id"
    missing = [k for k in ("question", "answer", "context") if rec.get(k) is None]
    if qid is None:
        missing.insert(0, "id")
    if missing:
        raise DataError(f"{where} lacks the field(s) {', '.join(missing)} of a HotPotQA record.")
    try:
        context = [(str(title), [str(s) for s in sents]) for title, sents in rec["context"]]
        facts = [(str(title), int(idx)) for title, idx in rec.get("supporting_facts") or []]
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where} has a malformed context or supporting_facts field ({exc}).") from None
    return HotPotQAQuestion(
        id=str(qid),
        question=str(rec["question"]),
        answer=str(rec["answer"]),
        type=str(rec.get("type", "")),
        level=str(rec.get("level", "")),
        supporting_facts=facts,
        context=context,
    )


def _iter_records(path: Path) -> Iterator[tuple[Any, str]]:
    """Yield (decoded record, location) pairs; JSON lists for '[...]' files, JSONL otherwise."""
    try:
        fh = path.open(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"Cannot read HotPotQA data file {path} ({exc.strerror}).") from None
    with fh:
        first = fh.read(1)
        while first and first.isspace():
            first = fh.read(1)
        fh.seek(0)
        if first == "[":  # official layout: one JSON list (cannot be streamed with the stdlib)
            try:
                records = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"HotPotQA data file {path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
            for i, rec in enumerate(records, 1):
                yield rec, f"Record {i} of {path}"
            return
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"Line {lineno} of {path} is not valid JSON ({exc.msg}).") from None
            yield rec, f"Line {lineno} of {path}"


def _looks_like_question_file(path: Path) -> bool:
    """Directory mode only: skip JSON(L) files that hold something else (e.g. metric vectors)."""
    try:
        for rec, _ in _iter_records(path):
            return isinstance(rec, dict) and "question" in rec and "context" in rec
    except DataError:
        return True  # let the real load report the broken line
    return False


def load_questions(path: str | Path) -> list[HotPotQAQuestion]:
    """Load questions from a JSONL file, a JSON-list file, or a directory of such files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"HotPotQA data path {path} does not exist.")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
        files = [p for p in files if _looks_like_question_file(p)]
        if not files:
            raise DataError(f"HotPotQA data directory {path} holds no .jsonl/.json question files.")
    else:
        files = [path]
    questions: list[HotPotQAQuestion] = []
    seen: set[str] = set()
    for f in files:
        for rec, where in _iter_records(f):
            q = _record_to_question(rec, where)
            if q.id in seen:
                raise DataError(f"{where} repeats the question id {q.id}.")
            seen.add(q.id)
            questions.append(q)
    return questions


def _title_key(text: str) -> str:
    """Case-insensitive, whitespace-normalised key; surrounding quotes are dropped."""
    key = " ".join(text.split()).lower()
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "\"'":
        key = " ".join(key[1:-1].split())
    return key


_PAREN = re.compile(r"\s*\([^()]*\)\s*$")
_TOKEN = re.compile(r"[a-z0-9]+")


def _strip_disambiguation(key: str) -> str:
    """'ed wood (film)' -> 'ed wood'."""
    return _PAREN.sub("", key).strip()


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Page:
    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.sentences).strip()


@dataclass(frozen=True)
class SearchResult:
    """``page`` is None when nothing was found; ``observation`` is what the agent sees."""

    observation: str
    page: Page | None
    match: str  # "exact", "near" or "none"


class Docstore:
    """Paragraphs by title, searched like the ReAct/Reflexion Wikipedia tool."""

    def __init__(self, pages: Iterable[tuple[str, Sequence[str]]], close_cutoff: float = 0.9):
        self._pages: dict[str, Page] = {}
        for title, sentences in pages:
            key = _title_key(title)
            if key and key not in self._pages:  # first paragraph under a title wins
                self._pages[key] = Page(title, tuple(sentences))
        self._keys = sorted(self._pages)
        self._by_base: dict[str, list[str]] = {}
        for key in self._keys:
            self._by_base.setdefault(_strip_disambiguation(key), []).append(key)
        self._close_cutoff = close_cutoff
        self._bm25: Any = None  # built on the first miss: exact hits never pay for it

    @classmethod
    def from_questions(cls, questions: Iterable[HotPotQAQuestion]) -> "Docstore":
        return cls(pair for q in questions for pair in q.context)

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, title: str) -> bool:
        return _title_key(title) in self._pages

    @property
    def titles(self) -> list[str]:
        return [self._pages[k].title for k in self._keys]

    def get(self, title: str) -> Page | None:
        return self._pages.get(_title_key(title))

    def _near(self, key: str) -> str | None:
        """A unique near-hit key, or None when there is none or several tie."""
        base_hits = self._by_base.get(key, [])
        if not base_hits and key != _strip_disambiguation(key):
            # query carries a disambiguation the store lacks: 'ed wood (director)' -> 'ed wood'
            stripped = _strip_disambiguation(key)
            base_hits = [stripped] if stripped in self._pages else []
        if base_hits:
            return base_hits[0] if len(base_hits) == 1 else None
        best: list[str] = []
        best_ratio = self._close_cutoff
        sm = difflib.SequenceMatcher(b=key)
        for cand in self._keys:
            sm.set_seq1(cand)
            # cheap upper bounds first, as difflib.get_close_matches does
            if sm.real_quick_ratio() < best_ratio or sm.quick_ratio() < best_ratio:
                continue
            ratio = sm.ratio()
            if ratio > best_ratio:
                best, best_ratio = [cand], ratio
            elif ratio == best_ratio:
                best.append(cand)
        return best[0] if len(best) == 1 else None

    def similar(self, query: str, k: int = 5) -> list[str]:
        """Top-k titles by BM25 over title + text; ties broken by title."""
        if self._bm25 is None:
            from rank_bm25 import BM25Okapi

            # Title tokens are counted twice: Wikipedia's search, which this imitates, favours titles.
            corpus = [_tokens(p.title) * 2 + _tokens(p.text) for p in (self._pages[key] for key in self._keys)]
            self._bm25 = BM25Okapi(corpus) if corpus else False
        query_tokens = _tokens(query)
        if not self._bm25 or not query_tokens:
            return []
        scores = self._bm25.get_scores(query_tokens)
        ranked = sorted(
            ((float(s), self._pages[key].title) for s, key in zip(scores, self._keys) if s > 0),
            key=lambda st: (-st[0], st[1]),
        )
        return [title for _, title in ranked[:k]]

    def search(self, query: str) -> SearchResult:
        """Exact title, else a unique near title, else ``Could not find [q]. Similar: [...]``."""
        key = _title_key(query)
        page = self._pages.get(key)
        if page is not None:
            return SearchResult(page.text, page, "exact")
        near = self._near(key) if key else None
        if near is not None:
            page = self._pages[near]
            return SearchResult(page.text, page, "near")
        return SearchResult(f"Could not find [{query}]. Similar: {self.similar(query)}", None, "none")


_ACTION = re.compile(r"^(?:action\s*\d*\s*:\s*)?(search|lookup|finish)\s*([\[(])(.*)$", re.IGNORECASE | re.DOTALL)
_CLOSER = {"[": "]", "(": ")"}


def parse_action(text: str) -> tuple[str, str] | None:
    """``'Search[Ed Wood]'`` -> ``('search', 'Ed Wood')``; None when the text is no action.

    Tolerates any case, spaces, an ``Action 1:`` prefix, parentheses instead of brackets and a
    missing closing bracket. Only the first non-empty line counts.
    """
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return None
    m = _ACTION.match(lines[0].strip())
    if m is None:
        return None
    kind, opener, rest = m.group(1).lower(), m.group(2), m.group(3)
    closer, depth, end = _CLOSER[opener], 0, len(rest)
    for i, ch in enumerate(rest):  # balanced scan so 'Finish[Ed Wood (film)]' keeps its parens
        if ch == opener:
            depth += 1
        elif ch == closer:
            if depth == 0:
                end = i
                break
            depth -= 1
    return kind, rest[:end].strip()


class HotPotQAEnv:
    """HotPotQA distractor questions; reward = EM at ``Finish``, 0 otherwise."""

    env_id = SPEC.name
    action_names = SPEC.action_names

    def __init__(self, data: str | Path | None = None, max_steps: int = 6, split: str | None = None):
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise UsageError(f"The HotPotQA step limit (max_steps) must be a positive integer, got {max_steps!r}.")
        require(("rank_bm25",), "HotPotQA's Search")  # up front, not at the first Search[...]
        self.max_steps = max_steps
        self.data_path = self._resolve(data, split)
        self.questions = load_questions(self.data_path)
        if not self.questions:
            raise DataError(f"HotPotQA data {self.data_path} holds no questions.")
        self._by_id = {q.id: q for q in self.questions}
        self.docstore = Docstore.from_questions(self.questions)
        self._q: HotPotQAQuestion | None = None
        self._done = True

    @staticmethod
    def _resolve(data: str | Path | None, split: str | None) -> Path:
        path = data_or_sample(data, SAMPLE_DATA, "HotPotQA")
        if split is None:
            return path
        if not path.is_dir():
            raise UsageError(f"The HotPotQA split '{split}' needs a data directory, but {path} is not one.")
        for suffix in (".jsonl", ".json"):
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        raise DataError(f"HotPotQA split '{split}' not found: {path} has no {split}.jsonl or {split}.json.")

    def task_ids(self) -> list[str]:
        return [q.id for q in self.questions]

    def spawn(self) -> "HotPotQAEnv":
        """A fresh env over the same questions and docstore (one per concurrent episode, built in O(1))."""
        twin = object.__new__(type(self))  # subclasses spawn their own kind
        episode_state = ("_steps", "_page", "_lookup_key", "_lookup_hits", "_lookup_idx")
        twin.__dict__.update({k: v for k, v in self.__dict__.items() if k not in episode_state})
        twin._q, twin._done = None, True
        return twin

    def get_question(self, task_id: str) -> HotPotQAQuestion:
        try:
            return self._by_id[task_id]
        except KeyError:
            raise UsageError(
                f"Unknown HotPotQA task id '{task_id}': it is not among the {len(self.questions)} "
                f"questions of {self.data_path}."
            ) from None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Start an episode on ``options['task_id']``; ``seed`` is unused (the env is deterministic)."""
        if not options or "task_id" not in options:
            raise UsageError("HotPotQAEnv.reset() needs options={'task_id': ...} naming one question id.")
        self._q = self.get_question(str(options["task_id"]))
        self._steps = 0
        self._done = False
        self._page: Page | None = None
        self._lookup_key: str | None = None
        self._lookup_hits: list[str] = []
        self._lookup_idx = 0
        return "Question: " + self._q.question.strip(), self._base_info(None)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        check_can_step(self._q is not None, self._done)
        self._steps += 1
        parsed = parse_action(action)
        if parsed is not None and parsed[0] != "finish" and not parsed[1]:
            parsed = None  # Search[] / Lookup[] have nothing to act on
        if parsed is None:
            shown = " ".join(str(action).split())
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            obs, kind = f"Invalid action: {shown!r}. {VALID_ACTIONS}", "invalid"
        else:
            kind, arg = parsed
            if kind == "finish":
                return self._finish(arg)
            obs = self._search(arg) if kind == "search" else self._lookup(arg)
        info = self._base_info(kind)
        if self._steps >= self.max_steps:
            self._done = True
            info.update(self._end_info(None, em=0.0, f1=0.0))
            return obs, 0.0, False, True, info
        return obs, 0.0, False, False, info

    def close(self) -> None:
        self._q = None
        self._done = True

    def _search(self, query: str) -> str:
        result = self.docstore.search(query)
        self._page = result.page  # a failed search leaves no page, as in Reflexion's docstore tool
        self._lookup_key, self._lookup_hits, self._lookup_idx = None, [], 0
        return result.observation

    def _lookup(self, keyword: str) -> str:
        if self._page is None:
            return _NO_PAGE
        key = keyword.lower()
        if key != self._lookup_key:  # a new keyword restarts the walk
            self._lookup_key = key
            self._lookup_hits = [s.strip() for s in self._page.sentences if key in s.lower() and s.strip()]
            self._lookup_idx = 0
        if self._lookup_idx >= len(self._lookup_hits):
            return "No more results."
        self._lookup_idx += 1
        return f"(Result {self._lookup_idx} / {len(self._lookup_hits)}) {self._lookup_hits[self._lookup_idx - 1]}"

    def _finish(self, prediction: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        assert self._q is not None
        em = exact_match(prediction, self._q.answer)
        self._done = True
        info = self._base_info("finish")
        info.update(self._end_info(prediction, em=em, f1=f1_score(prediction, self._q.answer)))
        obs = "Answer is CORRECT" if em else "Answer is INCORRECT"  # Reflexion's wording
        return obs, em, True, False, info

    def _base_info(self, action_type: str | None) -> dict[str, Any]:
        assert self._q is not None
        return {"task_id": self._q.id, "instruction": self._q.question.strip(), "step": self._steps,
                "action_type": action_type}

    def _end_info(self, prediction: str | None, *, em: float, f1: float) -> dict[str, Any]:
        # the gold answer is revealed only here, once the episode is over
        assert self._q is not None
        return {"success": em == 1.0, "score": em, "em": em, "f1": f1, "prediction": prediction,
                "answer": self._q.answer}


__all__ = [
    "Docstore", "HotPotQAEnv", "HotPotQAQuestion", "Page", "SearchResult", "load_questions", "parse_action", "VALID_ACTIONS",
]
