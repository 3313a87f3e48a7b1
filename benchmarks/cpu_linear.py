"""Linear layers of the embedded model's shapes on CPU: PyTorch's ``F.linear`` vs oneDNN with weights packed once.

    python benchmarks/cpu_linear.py [--threads 1] [--rows 1 2 4 8 16]

Times one pass over the 210 decoder weight matrices of SmolLM2-135M (30 layers x q, k, v, o, gate, up, down;
fp32, random values) for 1-16 input rows, reports the median milliseconds, the weight bytes read per second, and
whether oneDNN's results for the first rows are bit-identical whatever the number of rows (batch invariance).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    weights = [torch.randn(n, k) for _ in range(30) for (n, k) in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    def median_ms(fn, reps: int = 7) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    out: dict = {"benchmark": "cpu_linear", "threads": args.threads, "weight_mb": round(nbytes / 1e6, 1), "rows": {}}
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        plain = median_ms(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights])
        dnn = median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                                 for w, p in zip(weights, packed)])
        out["rows"][m] = {"torch_ms": round(plain, 1), "onednn_packed_ms": round(dnn, 1),
                          "torch_gb_per_s": round(nbytes / plain / 1e6, 1), "onednn_gb_per_s": round(nbytes / dnn / 1e6, 1)}
    x = torch.randn(max(args.rows), 576)
    ref = torch.ops.mkldnn._linear_pointwise(x, packed[4], None, "none", [], "")
    out["onednn_batch_invariant"] = all(
        torch.equal(torch.ops.mkldnn._linear_pointwise(x[:m], packed[4], None, "none", [], ""), ref[:m]) for m in args.rows)
    ref_t = torch.nn.functional.linear(x, weights[4])
    out["torch_batch_invariant"] = all(torch.equal(torch.nn.functional.linear(x[:m], weights[4]), ref_t[:m])
                                       for m in args.rows)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
