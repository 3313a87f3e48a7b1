"""Check our WebShop search against rankings from the real Lucene (pyserini/Anserini) index.

Usage: python benchmarks/webshop_search_parity.py ../shared/data/webshop/lucene_bm25_reference_top50.jsonl \
           [--catalog ../shared/data/webshop/documents_1k.jsonl]

Each reference line is {"query", "hits": [[ASIN, score], ...]} (top 50, rank order). --catalog defaults to the
documents*.jsonl beside the reference file. The last line printed is one JSON object
{"queries", "top10_exact", "top10_overlap", "top50_exact"}: top10_exact is the fraction of queries whose top-10
ASINs equal the reference in order; top10_overlap the mean |ours ∩ ref| over the reference's top-10 size (10,
or fewer for a query with fewer hits); top50_exact the same as top10_exact for the whole top 50.
Works at any scale: e.g. against a pyserini index of the 1M-product synthetic catalog (benchmarks/webshop_scale.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from retroformer_cli.envs.webshop.store import load_catalog
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from retroformer_cli.envs.webshop.store import load_catalog
from retroformer_cli.envs.webshop.search import BM25Index


def default_catalog(reference: Path) -> Path:
    found = sorted(reference.parent.glob("documents*.jsonl"))
    if len(found) != 1:
        raise SystemExit(f"pass --catalog: {reference.parent} holds {len(found)} documents*.jsonl files")
    return found[0]


def parity(reference: Path, catalog_path: Path, show: int = 5) -> dict[str, float | int]:
    catalog = load_catalog(catalog_path)  # a big catalog is streamed, not held in memory
    index = BM25Index.build(catalog.documents())
    n = exact10 = exact50 = 0
    overlap = 0.0
    with reference.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            ref = [h[0] for h in rec["hits"]]
            ours = [a for a, _ in index.search(rec["query"], max(50, len(ref)))]
            n += 1
            ok10 = ours[:10] == ref[:10]
            exact10 += ok10
            exact50 += ours[:len(ref)] == ref and len(ours) >= len(ref)
            denom = min(10, len(ref))
            overlap += (len(set(ours[:10]) & set(ref[:10])) / denom) if denom else float(not ours)
            if not ok10 and show > 0:
                show -= 1
                print(f"differs: {rec['query']!r}\n  ours {ours[:10]}\n  ref  {ref[:10]}", file=sys.stderr)
    return {"queries": n, "top10_exact": round(exact10 / n, 4) if n else 0.0,
            "top10_overlap": round(overlap / n, 4) if n else 0.0, "top50_exact": round(exact50 / n, 4) if n else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("--catalog", type=Path, default=None, help="documents.jsonl (default: beside the reference)")
    args = ap.parse_args(argv)
    print(json.dumps(parity(args.reference, args.catalog or default_catalog(args.reference))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
