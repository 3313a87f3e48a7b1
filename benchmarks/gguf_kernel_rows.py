"""The GGUF kernel's speed by rows per call, on the embedded model's matrix shapes, against this core's FMA ceilings.

    python benchmarks/gguf_kernel_rows.py [--rows 1 8] [--workspace DIR] [--no-peak]

For each number of activation rows T (1: one decoding sequence; 8: eight), times one-thread ``rf_matmul`` calls
on random Q4_1/Q8_0 blocks of the shapes one decode pass of SmolLM2-135M runs (stacked q/k/v, o, stacked gate/up,
down; the Q8_0 output layer), in thread CPU time (best of 5 rounds), and prints GFLOP/s per shape and the
milliseconds of linear layers per pass. Unless ``--no-peak``, it also compiles two small loops with the same
compiler and ``-march=native`` and prints this core's AVX-512 FMA throughput with the operands in registers and
with one memory load per FMA (the kernel's inner-loop shape). Progress on stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = [("qkv", "q4_1", 960, 576, 30), ("o", "q4_1", 576, 576, 30), ("gate_up", "q4_1", 3072, 576, 30),
          ("down", "q4_1", 576, 1536, 30), ("lm_head", "q8_0", 49152, 576, 1)]  # name, kind, out, in, per pass

PEAK = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
__attribute__((noinline)) void regs(long iters, float* out) {
    __m512 acc[16]; for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps(i);
    __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(1e-7f);
    for (long it = 0; it < iters; it++) {
        for (int i = 0; i < 16; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
        __asm__ volatile("" : "+v"(a), "+v"(b));
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}
__attribute__((noinline)) void loads(const float* x, long iters, float* out) {
    __m512 acc[16]; for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
    __m512 w0 = _mm512_set1_ps(1.0001f), w1 = _mm512_set1_ps(0.9999f);
    for (long it = 0; it < iters; it++) {
        const float* xb = x + (it & 7) * 256;
        for (int g = 0; g < 8; g++) {
            acc[2 * g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb + g * 32), acc[2 * g]);
            acc[2 * g + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + g * 32 + 16), acc[2 * g + 1]);
        }
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(out + 16 * i, acc[i]);
}
int main() {
    float* x = (float*)aligned_alloc(64, 2048 * 4); for (int i = 0; i < 2048; i++) x[i] = 1e-6f * i;
    float out[256]; long iters = 30000000; double best[2] = {0, 0};
    for (int rep = 0; rep < 3; rep++) {
        auto t0 = std::chrono::steady_clock::now(); regs(iters, out);
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (iters * 16.0 * 32 / s / 1e9 > best[0]) best[0] = iters * 16.0 * 32 / s / 1e9;
        t0 = std::chrono::steady_clock::now(); loads(x, iters, out);
        s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (iters * 16.0 * 32 / s / 1e9 > best[1]) best[1] = iters * 16.0 * 32 / s / 1e9;
    }
    printf("{\"fma_registers_gflops\": %.1f, \"fma_one_load_each_gflops\": %.1f, \"check\": %g}\n", best[0], best[1], out[3]);
}
"""


def kernel_rows(lib, rows: int) -> dict:
    import numpy as np
    import torch

    from retroformer_cli.llm.engine import gguf_kernel

    rng = np.random.default_rng(0)
    out, per_pass = {}, 0.0
    for name, kind, n, k, count in SHAPES:
        block = 20 if kind == "q4_1" else 34
        data = rng.integers(0, 256, size=(n, k // 32, block), dtype=np.uint8)
        data[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)  # finite scales
        if kind == "q4_1":
            data[:, :, 2:4] = np.frombuffer(np.float16(-0.1).tobytes(), dtype=np.uint8)
        w = gguf_kernel.pack(data.reshape(n, -1), kind)
        x = torch.randn(rows, k)
        for _ in range(3):
            gguf_kernel.matmul(lib, w, kind, x, 1)
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(20):
                gguf_kernel.matmul(lib, w, kind, x, 1)
            best = min(best, (time.thread_time() - t0) / 20)
        out[name] = {"us": round(best * 1e6, 1), "gflops": round(2 * n * k * rows / best / 1e9, 1)}
        per_pass += best * count
    return {"shapes": out, "linear_ms_per_pass": round(per_pass * 1e3, 2)}


def peak() -> dict:
    import os
    import shutil

    cxx = next((shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++", "clang++") if c and shutil.which(c)), None)
    if cxx is None:
        return {"error": "no C++ compiler"}
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(PEAK)
        built = subprocess.run([cxx, "-O3", "-march=native", str(src), "-o", str(exe)], capture_output=True, text=True)
        if built.returncode != 0:
            return {"error": "no AVX-512 build: " + (built.stderr.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--no-peak", action="store_true")
    args = ap.parse_args()
    from retroformer_cli.llm.engine import gguf_kernel

    lib = gguf_kernel.load(Path(args.workspace) / "cache")
    if lib is None:
        sys.exit("the GGUF kernel could not be built here (no C++ compiler)")
    result: dict = {"benchmark": "gguf_kernel_rows", "isa": {512: "avx512", 256: "avx2"}.get(lib.rf_simd(), "scalar"),
                    "by_rows": {}}
    for rows in args.rows:
        result["by_rows"][str(rows)] = kernel_rows(lib, rows)
        print(f"{rows} row(s): {result['by_rows'][str(rows)]}", file=sys.stderr, flush=True)
    if not args.no_peak:
        result["peak"] = peak()
        print(f"peak: {result['peak']}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
