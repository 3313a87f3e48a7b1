"""The WebShop product catalog: WebShop's processed ``documents.jsonl`` or its original raw files.

Two layouts are read:

* **documents** (``documents_1k.jsonl``, our ``sample_data/webshop/documents.jsonl``): one JSON object per
  line, ``{"id": ASIN, "contents": STR, "product": DICT}``, exactly what WebShop's
  ``search_engine/convert_product_file_format.py`` writes for pyserini. The product dicts are already
  processed by WebShop's ``load_products`` and are used as they are.
* **raw** (a ``DATA_DIR`` holding WebShop's ``items_shuffle[_1000].json``, ``items_ins_v2[_1000].json`` and,
  optionally, ``items_human_ins.json`` and ``reviews.json``): products are streamed one by one out of the
  (multi-GB) JSON list and processed the way ``load_products`` does; ``contents`` is then built the way
  ``convert_product_file_format.py`` builds it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable, Iterator

from retroformer_cli.errors import DataError

# keys WebShop's engine.clean_product_keys drops
DROPPED_KEYS = (
    "product_information", "brand", "brand_url", "list_price", "availability_quantity", "availability_status",
    "total_reviews", "total_answered_questions", "seller_id", "seller_name", "fulfilled_by_amazon",
    "fast_track_message", "aplus_present", "small_description_old",
)
PRODUCT_FIELDS = ("asin", "Title", "Description", "BulletPoints", "Price", "pricing", "options", "Attributes",
                  "query", "product_category", "category", "name")


def product_contents(product: dict[str, Any]) -> str:
    """The text the search engine indexes (``convert_product_file_format.py``)."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product.get("options", {}).items())
    bullets = product.get("BulletPoints") or [""]
    return " ".join([product["Title"], product["Description"], bullets[0], option_text]).lower()


def product_price(product: dict[str, Any]) -> float:
    """The price paid, as WebShop's ``generate_product_prices``; a price range gets a uniform draw, seeded by
    the ASIN here so that it is the same in every run (WebShop draws it afresh at each server start)."""
    pricing = product.get("pricing") or []
    if not pricing:
        return 100.0
    if len(pricing) == 1:
        return float(pricing[0])
    return random.Random(f"webshop-price:{product['asin']}").uniform(float(pricing[0]), float(pricing[1]))


@dataclass
class Catalog:
    """Products in catalog order (the order WebShop builds goals in and Lucene numbers documents in)."""

    products: list[dict[str, Any]]
    source: str
    key: str  # identifies the catalog's content for the index cache
    contents: list[str] | None = None  # the indexed text when the file gave it; else derived
    by_asin: dict[str, dict[str, Any]] = field(init=False)
    prices: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.by_asin = {p["asin"]: p for p in self.products}
        self.prices = {p["asin"]: product_price(p) for p in self.products}

    def __len__(self) -> int:
        return len(self.products)

    def goal_candidates(self, instructions: Any = None, kind: str = "synthetic") -> Iterable[dict[str, Any]]:
        """The products goals are built from, in catalog order (all of them here; a lazy catalog narrows it)."""
        return self.products

    def documents(self) -> Iterator[tuple[str, str]]:
        """(asin, contents) pairs for the search index."""
        if self.contents is not None:
            yield from zip((p["asin"] for p in self.products), self.contents)
        else:
            for p in self.products:
                yield p["asin"], product_contents(p)


def file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def load_documents(path: str | Path, num_products: int | None = None) -> Catalog:
    """Read a documents.jsonl file as it is (``num_products``: only the first N, like WebShop's subsets)."""
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"Cannot read WebShop documents file {path} ({exc.strerror}).") from None
    products: list[dict[str, Any]] = []
    contents: list[str] = []
    seen: set[str] = set()
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if num_products is not None and len(products) >= num_products:
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"Line {lineno} of {path} is not valid JSON ({exc.msg}).") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("product"), dict) or "id" not in rec:
                raise DataError(f"Line {lineno} of {path} is not a WebShop document ({{'id', 'contents', 'product'}}).")
            product = rec["product"]
            missing = [k for k in PRODUCT_FIELDS if k not in product]
            if missing:
                raise DataError(f"Line {lineno} of {path}: the product lacks {', '.join(missing)} "
                                "(expected a product processed by WebShop's load_products).")
            if rec["id"] in seen:  # WebShop keeps the first copy of an ASIN
                continue
            seen.add(rec["id"])
            products.append(product)
            contents.append(rec["contents"] if isinstance(rec.get("contents"), str) else product_contents(product))
    if not products:
        raise DataError(f"WebShop documents file {path} holds no products.")
    return Catalog(products, source=str(path), key=f"documents|{file_key(path)}|{num_products}", contents=contents)


def iter_json_array(path: Path, chunk_size: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON list one at a time, holding only one chunk in memory."""
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as fh:
        buf = ""
        started = False
        while True:
            if not started:
                chunk = fh.read(chunk_size)
                if not chunk:
                    raise DataError(f"{path} is empty; expected a JSON list.")
                buf = chunk.lstrip("\ufeff \t\r\n")
                if not buf:
                    continue
                if buf[0] != "[":
                    raise DataError(f"{path} is not a JSON list.")
                buf, started = buf[1:], True
            pos = 0
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) and buf[pos] == "]":
                    return
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # element continues in the next chunk
                yield obj
                pos = end
            buf = buf[pos:]
            chunk = fh.read(chunk_size)
            if not chunk:
                if buf.strip():
                    raise DataError(f"{path} ends inside a JSON value (truncated file?).")
                raise DataError(f"{path} ends without closing its JSON list.")
            buf += chunk


def _parse_pricing(raw: Any) -> tuple[list[float], str]:
    if not raw:
        return [100.0], "$100.0"
    try:
        values = [float(Decimal(re.sub(r"[^\d.]", "", part))) for part in str(raw).split("$")[1:]]
    except InvalidOperation:
        values = []
    if not values:
        return [100.0], "$100.0"
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def process_raw_product(p: dict[str, Any], attributes: dict[str, Any], human_ins: dict[str, Any] | None,
                        reviews: dict[str, tuple[list, Any]] | None) -> dict[str, Any]:
    """One raw items_shuffle product -> the dict WebShop's ``load_products`` makes of it."""
    for key in DROPPED_KEYS:
        p.pop(key, None)
    asin = p["asin"]
    p["Title"] = p["name"]
    p["Description"] = p["full_description"]
    revs, rating = (reviews or {}).get(asin, ([], "N.A."))
    p["Reviews"] = [dict(r) for r in revs]
    p["Rating"] = rating
    for r in p["Reviews"]:
        if "score" not in r:
            r["score"] = r.pop("stars", None)
        r["body"] = r.pop("review") if "review" in r else ""
    sd = p.get("small_description")
    p["BulletPoints"] = sd if isinstance(sd, list) else [sd]
    p["pricing"], p["Price"] = _parse_pricing(p.get("pricing"))
    options: dict[str, list[str]] = {}
    option_to_image: dict[str, Any] = {}
    for name, contents in (p.get("customization_options") or {}).items():
        if contents is None:
            continue
        values = []
        for content in contents:
            value = content["value"].strip().replace("/", " | ").lower()
            values.append(value)
            option_to_image[value] = content.get("image")
        options[name.lower()] = values
    p["options"] = options
    p["option_to_image"] = option_to_image
    entry = attributes.get(asin)
    p["Attributes"] = entry["attributes"] if isinstance(entry, dict) and "attributes" in entry else ["DUMMY_ATTR"]
    if human_ins is not None and asin in human_ins:
        p["instructions"] = human_ins[asin]
    images = p.get("images") or [None]
    p["MainImage"] = images[0]
    p["query"] = str(p.get("query", "")).lower().strip()
    return p


def find_raw_files(data_dir: Path) -> dict[str, Path | None]:
    """WebShop's data/ layout: the full files when present, else the 1000-product ones."""
    def pick(*names: str) -> Path | None:
        for n in names:
            if (data_dir / n).is_file():
                return data_dir / n
        return None

    return {
        "products": pick("items_shuffle.json", "items_shuffle_1000.json"),
        "attributes": pick("items_ins_v2.json", "items_ins_v2_1000.json"),
        "human": pick("items_human_ins.json"),
        "reviews": pick("reviews.json"),
    }


def load_json(path: Path, what: str) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as exc:
        raise DataError(f"Cannot read the WebShop {what} file {path} ({exc.strerror}).") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"The WebShop {what} file {path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None


def load_raw(data_dir: str | Path, num_products: int | None = None,
             attributes: dict[str, Any] | None = None) -> Catalog:
    """Process WebShop's original files like ``load_products`` (products streamed, not loaded whole)."""
    data_dir = Path(data_dir)
    files = find_raw_files(data_dir)
    if files["products"] is None:
        raise DataError(f"{data_dir} holds no WebShop items_shuffle.json / items_shuffle_1000.json.")
    if attributes is None:
        if files["attributes"] is None:
            raise DataError(f"{data_dir} holds no WebShop items_ins_v2.json / items_ins_v2_1000.json.")
        attributes = load_json(files["attributes"], "attributes")
    human = load_json(files["human"], "human instructions") if files["human"] else None
    reviews = None
    if files["reviews"]:
        reviews = {r["asin"]: (r.get("reviews") or [], r.get("average_rating", "N.A."))
                   for r in load_json(files["reviews"], "reviews")}
    products: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, raw in enumerate(iter_json_array(files["products"])):
        if num_products is not None and i >= num_products:  # WebShop slices before filtering
            break
        asin = str(raw.get("asin"))
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        products.append(process_raw_product(raw, attributes, human, reviews))
    if not products:
        raise DataError(f"{files['products']} holds no products.")
    key = "raw|" + "|".join(file_key(p) for p in files.values() if p is not None) + f"|{num_products}"
    return Catalog(products, source=str(files["products"]), key=key)


__all__ = ["Catalog", "find_raw_files", "iter_json_array", "load_documents", "load_raw", "product_contents",
           "product_price"]
