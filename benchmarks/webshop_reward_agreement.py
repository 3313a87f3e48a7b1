"""Check our WebShop reward against purchases scored by WebShop's own get_reward.

Usage: python benchmarks/webshop_reward_agreement.py ../shared/data/webshop/reward_vectors.dev.jsonl \
           [--catalog ../shared/data/webshop/documents_1k.jsonl]

Each line holds {"goal", "asin", "selected_options", "price", "reward", "info", ...}. --catalog defaults to the
documents*.jsonl beside the vectors. The last line printed is {"n", "agreement", "info_agreement"}: the fraction
of lines whose reward equals the official one within 1e-6, and whose whole verbose info dict (r_type, r_att,
r_option, r_price, weights, query/category match, title score) is equal too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

try:
    from retroformer_cli.envs.webshop.catalog import load_documents
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from retroformer_cli.envs.webshop.catalog import load_documents
from retroformer_cli.envs.webshop.reward import get_reward

TOLERANCE = 1e-6


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), abs_tol=TOLERANCE)
    return a == b


def agreement(vectors: Path, catalog_path: Path, show: int = 5) -> dict[str, float | int]:
    catalog = load_documents(catalog_path)
    n = ok = info_ok = 0
    with vectors.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            product = catalog.by_asin[rec["asin"]]
            parts = get_reward(product, rec["goal"], price=rec["price"], options=rec["selected_options"])
            n += 1
            good = abs(parts.reward - rec["reward"]) <= TOLERANCE
            ok += good
            info_ok += _same(parts.official_info(), rec["info"])
            if not good and show > 0:
                show -= 1
                print(f"differs ({rec.get('kind')}): ours {parts.reward} official {rec['reward']}\n"
                      f"  ours {parts.official_info()}\n  ref  {rec['info']}", file=sys.stderr)
    return {"n": n, "agreement": round(ok / n, 6) if n else 0.0, "info_agreement": round(info_ok / n, 6) if n else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("vectors", type=Path)
    ap.add_argument("--catalog", type=Path, default=None, help="documents.jsonl (default: beside the vectors)")
    args = ap.parse_args(argv)
    catalog = args.catalog
    if catalog is None:
        found = sorted(args.vectors.parent.glob("documents*.jsonl"))
        if len(found) != 1:
            raise SystemExit(f"pass --catalog: {args.vectors.parent} holds {len(found)} documents*.jsonl files")
        catalog = found[0]
    print(json.dumps(agreement(args.vectors, catalog)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
