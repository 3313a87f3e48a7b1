"""A big WebShop ``documents.jsonl`` (a million products, gigabytes) without holding its products in memory.

One scan of the file records each product's byte span, line number and ASIN (the first copy of an ASIN wins, as
in WebShop) and whether it carries human ``instructions``; the scan is saved as ``.npy`` arrays in
``<cache_dir>/catalogs/``, keyed by the file's path, size and modification time, so a second start only maps
them. A product is parsed from its span when it is first asked for (an LRU keeps the recent ones); the search
index streams ``contents`` out of the file, decoding only that string of each line.

``load_catalog`` picks: files up to ``EAGER_MAX_BYTES`` load whole (``catalog.load_documents``), bigger ones lazily.
A malformed product in a lazily read file is reported (``DataError`` naming its line) when it is first read.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
from json.decoder import scanstring
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from retroformer_cli.envs.webshop.catalog import (PRODUCT_FIELDS, Catalog, file_key, load_documents,
                                                  product_contents, product_price)
from retroformer_cli.envs.webshop.search import fingerprint, save_arrays
from retroformer_cli.errors import DataError

EAGER_MAX_BYTES = 32 << 20  # about 6,000 products
LRU_PRODUCTS = 4096
SCAN_FORMAT = 1
_ID = re.compile(rb'\{"id": "([^"\\]*)"')
_CONTENTS_AT = ', "contents": "'


class DocumentStore:
    """Byte spans of the products of one documents.jsonl file; products parsed on demand."""

    _ARRAYS = ("asins", "starts", "ends", "lines", "human")

    def __init__(self, path: Path, asins: np.ndarray, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray,
                 human: np.ndarray):
        self.path = Path(path)
        self.asins_bytes, self.starts, self.ends, self.lines, self.human = asins, starts, ends, lines, human
        self.asins: list[str] = np.char.decode(np.asarray(asins), "utf-8").tolist() if len(asins) else []
        self.row_of = {a: i for i, a in enumerate(self.asins)}
        self._lru: collections.OrderedDict[int, dict[str, Any]] = collections.OrderedDict()
        self._fd: int | None = None
        self._lock = threading.Lock()  # envs spawned for concurrent episodes share the store

    def __len__(self) -> int:
        return len(self.asins)

    # --- scanning and its cache ------------------------------------------------------------------
    @classmethod
    def scan(cls, path: Path, num_products: int | None = None) -> "DocumentStore":
        """Read the file once for spans, ids and line numbers (the id taken from the line's start when it is
        written as ``json.dumps`` writes it, else from a full parse)."""
        seen: set[str] = set()
        asins: list[bytes] = []
        starts, ends, lines, human = [], [], [], []
        pos = 0
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise DataError(f"Cannot read WebShop documents file {path} ({exc.strerror}).") from None
        with fh:
            for lineno, line in enumerate(fh, 1):
                start, pos = pos, pos + len(line)
                if num_products is not None and len(asins) >= num_products:
                    break
                m = _ID.match(line)
                if m is not None:
                    asin = m.group(1).decode("utf-8")
                elif not line.strip():
                    continue
                else:
                    asin = str(_parse_line(line, path, lineno)["id"])
                if asin in seen:  # WebShop keeps the first copy of an ASIN
                    continue
                seen.add(asin)
                asins.append(asin.encode("utf-8"))
                starts.append(start)
                ends.append(pos)
                lines.append(lineno)
                human.append(b'"instructions": ' in line)
        if not asins:
            raise DataError(f"WebShop documents file {path} holds no products.")
        return cls(path, np.array(asins, dtype=bytes), np.array(starts, dtype=np.int64),
                   np.array(ends, dtype=np.int64), np.array(lines, dtype=np.int64), np.array(human, dtype=bool))

    def save(self, folder: Path) -> None:
        arrays = dict(zip(self._ARRAYS, (self.asins_bytes, self.starts, self.ends, self.lines, self.human)))
        save_arrays(folder, arrays, {"format": SCAN_FORMAT, "n": len(self)})

    @classmethod
    def load(cls, folder: Path, path: Path) -> "DocumentStore | None":
        try:
            header = json.loads((folder / "header.json").read_text(encoding="utf-8"))
            arrays = [np.load(folder / f"{name}.npy") for name in cls._ARRAYS]
        except (OSError, ValueError):
            return None
        if header.get("format") != SCAN_FORMAT or any(len(a) != header.get("n") for a in arrays):
            return None
        return cls(path, *arrays)

    # --- reading -----------------------------------------------------------------------------------
    def _read(self, row: int) -> bytes:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            fd = self._fd
        start, end = int(self.starts[row]), int(self.ends[row])
        return os.pread(fd, end - start, start)

    def product(self, row: int) -> dict[str, Any]:
        with self._lock:
            got = self._lru.get(row)
            if got is not None:
                self._lru.move_to_end(row)
                return got
        lineno = int(self.lines[row])
        rec = _parse_line(self._read(row), self.path, lineno)
        product = rec["product"]
        missing = [k for k in PRODUCT_FIELDS if k not in product]
        if missing:
            raise DataError(f"Line {lineno} of {self.path}: the product lacks {', '.join(missing)} "
                            "(expected a product processed by WebShop's load_products).")
        with self._lock:
            self._lru[row] = product
            if len(self._lru) > LRU_PRODUCTS:
                self._lru.popitem(last=False)
        return product

    def documents(self) -> Iterator[tuple[str, str]]:
        """(asin, contents) of every product in order, streamed from the file."""
        rows = iter(zip(self.asins, self.starts.tolist()))
        nxt = next(rows, None)
        pos = 0
        with self.path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if nxt is None:
                    return
                start, pos = pos, pos + len(line)
                if start != nxt[1]:
                    continue  # a blank line or a repeated ASIN
                yield nxt[0], _contents(line, self.path, lineno)
                nxt = next(rows, None)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _parse_line(line: bytes, path: Path, lineno: int) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"Line {lineno} of {path} is not valid JSON ({getattr(exc, 'msg', exc)}).") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("product"), dict) or "id" not in rec:
        raise DataError(f"Line {lineno} of {path} is not a WebShop document ({{'id', 'contents', 'product'}}).")
    return rec


def _contents(line: bytes, path: Path, lineno: int) -> str:
    """The ``contents`` string of a line; only that string is decoded when the line starts as json.dumps writes."""
    text = line.decode("utf-8")
    if text.startswith('{"id": "'):
        end_id = text.find('"', 8)
        if end_id > 0 and "\\" not in text[8:end_id] and text.startswith(_CONTENTS_AT, end_id + 1):
            try:
                return scanstring(text, end_id + 1 + len(_CONTENTS_AT))[0]
            except ValueError:
                pass
    rec = _parse_line(line, path, lineno)
    return rec["contents"] if isinstance(rec.get("contents"), str) else product_contents(rec["product"])


class _ByAsin(Mapping):
    def __init__(self, store: DocumentStore):
        self._store = store

    def __getitem__(self, asin: str) -> dict[str, Any]:
        return self._store.product(self._store.row_of[asin])

    def __contains__(self, asin: object) -> bool:
        return asin in self._store.row_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._store.asins)

    def __len__(self) -> int:
        return len(self._store)


class _Prices(_ByAsin):
    def __getitem__(self, asin: str) -> float:  # type: ignore[override]
        return product_price(super().__getitem__(asin))


class _Products(collections.abc.Sequence):
    def __init__(self, store: DocumentStore):
        self._store = store

    def __len__(self) -> int:
        return len(self._store)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._store.product(j) for j in range(*i.indices(len(self._store)))]
        if i < 0:
            i += len(self._store)
        if not 0 <= i < len(self._store):
            raise IndexError(i)
        return self._store.product(i)


class LazyCatalog(Catalog):
    """A ``Catalog`` over a ``DocumentStore``: ``products``, ``by_asin`` and ``prices`` read on demand."""

    def __init__(self, store: DocumentStore, key: str):
        self.store = store
        super().__init__(_Products(store), source=str(store.path), key=key)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        self.by_asin = _ByAsin(self.store)  # type: ignore[assignment]
        self.prices = _Prices(self.store)  # type: ignore[assignment]

    def documents(self) -> Iterator[tuple[str, str]]:
        return self.store.documents()

    def goal_candidates(self, instructions: Mapping[str, Any] | None, kind: str) -> Iterable[dict[str, Any]]:
        """Only the products that can yield goals, in catalog order (the rest are never parsed)."""
        store = self.store
        if kind == "human":
            return (store.product(int(r)) for r in np.flatnonzero(store.human))
        ins = instructions or {}
        rows = sorted(store.row_of[a] for a, e in ins.items()
                      if a in store.row_of and isinstance(e, Mapping) and e.get("instruction") is not None)
        return (store.product(r) for r in rows)


def load_catalog(path: str | Path, num_products: int | None = None, cache_dir: str | Path | None = None,
                 lazy: bool | None = None) -> Catalog:
    """A documents.jsonl catalog: whole when small (or ``lazy=False``), else lazily (scan cached in cache_dir)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"Cannot read WebShop documents file {path} ({exc.strerror}).") from None
    if not (lazy if lazy is not None else size > EAGER_MAX_BYTES):
        return load_documents(path, num_products)
    key = f"documents|{file_key(path)}|{num_products}"
    folder = Path(cache_dir) / "catalogs" / f"webshop-docs-{fingerprint(key, SCAN_FORMAT)}" if cache_dir else None
    store = DocumentStore.load(folder, path) if folder is not None and folder.is_dir() else None
    if store is None:
        store = DocumentStore.scan(path, num_products)
        if folder is not None:
            try:
                store.save(folder)
            except OSError:
                pass  # a read-only workspace only costs the scan next time
    return LazyCatalog(store, key)


__all__ = ["DocumentStore", "EAGER_MAX_BYTES", "LazyCatalog", "load_catalog"]
