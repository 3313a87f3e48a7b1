"""Check our HotPotQA EM/F1 against reference values computed by the official script.

Usage: python benchmarks/hotpotqa_metric_agreement.py ../shared/data/hotpotqa/metric_vectors.dev.jsonl

Each input line is {"prediction", "answer", "em", "f1"}. The last line printed is one JSON object
{"n", "em_agreement", "f1_agreement"} with agreement as fractions (F1 agrees within 1e-9).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from retroformer_cli.envs.hotpotqa_metrics import exact_match, f1_score
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from retroformer_cli.envs.hotpotqa_metrics import exact_match, f1_score

F1_TOLERANCE = 1e-9


def agreement(path: Path, show: int = 5) -> dict[str, float | int]:
    """Score every line; print up to ``show`` disagreements to stderr."""
    n = em_ok = f1_ok = 0
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            em = exact_match(rec["prediction"], rec["answer"])
            f1 = f1_score(rec["prediction"], rec["answer"])
            n += 1
            good_em = em == float(rec["em"])
            good_f1 = abs(f1 - float(rec["f1"])) <= F1_TOLERANCE
            em_ok += good_em
            f1_ok += good_f1
            if not (good_em and good_f1) and show > 0:
                show -= 1
                print(f"line {lineno}: ours em={em} f1={f1}, reference em={rec['em']} f1={rec['f1']}", file=sys.stderr)
    return {"n": n, "em_agreement": em_ok / n if n else 0.0, "f1_agreement": f1_ok / n if n else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="JSONL of {prediction, answer, em, f1} reference lines")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        parser.error(f"metric vector file {args.file} does not exist")
    result = agreement(args.file)
    print(json.dumps(result))
    return 0 if result["n"] and result["em_agreement"] == 1.0 and result["f1_agreement"] == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
