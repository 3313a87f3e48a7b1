"""A small C++ kernel multiplying fp32 activations by GGUF Q4_1 / Q8_0 weight blocks, built at first use.

``y[t, n] = sum_k w[n, k] * x[t, k]`` where ``w`` is decoded from the blocks exactly as GGUF defines it
(Q4_1: 32 values per block, ``w = d * q + m``, ``d`` and ``m`` fp16, ``q`` 4-bit; Q8_0: ``w = d * q``, ``q``
int8). Both products are exact in fp32 (an 11-bit mantissa times a 4- or 8-bit integer), so each decoded weight is
bit-identical to the ``gguf`` package's dequantization; activations and sums stay fp32.

Each output ``y[t, n]`` is summed in one fixed order (two vector accumulators over the row's chunks of 16
values with AVX-512, 8 with AVX2 or in plain C++, then one fixed horizontal reduction), whatever the number of
rows ``T``, the tiling or the thread count, so a sequence decodes to the same numbers alone or in any batch.
AVX-512 or AVX2/FMA/F16C when the compiler targets them (``-march=native``), else plain C++ (``load(isa=...)``
builds a fallback on purpose). Q4_1 is read in :func:`pack`'s layout; with AVX-512 a block's weights are looked
up in its 16 exact values ``d * i + m``; the bytes a few tiles ahead are prefetched. With ``threads`` > 1, row
tiles are shared with helper threads through one counter, without a barrier.

The source is compiled once per machine (``c++``/``g++``/``$CXX``) into the given cache folder, keyed by a hash
of the source, the compiler, the CPU flags and the instruction set asked for, and loaded with ctypes (the call releases the GIL). No compiler:
:func:`load` returns None and the caller keeps the fp32 path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from retroformer_cli.llm.engine import decode_attention, decode_layers

log = logging.getLogger("retroformer.engine")

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#ifndef RF_ISA  /* RF_ISA forces a fallback (256: AVX2, 0: plain C++) so that it can be built and tested anywhere */
#if defined(__AVX512F__) && defined(__F16C__)
#define RF_ISA 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RF_ISA 256
#else
#define RF_ISA 0
#endif
#endif
#if RF_ISA
#include <immintrin.h>
#endif
#define RF_SIMD RF_ISA

static inline float half_to_float(const uint8_t* p) {
    uint16_t h; memcpy(&h, p, 2);
#if RF_SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) { bits = sign; }
        else { int e = -1; do { man <<= 1; e++; } while (!(man & 0x400)); man &= 0x3ff;
               bits = sign | (uint32_t)(112 - e) << 23 | man << 13; }
    } else if (exp == 31) { bits = sign | 0x7f800000u | man << 13; }
    else { bits = sign | (exp + 112) << 23 | man << 13; }
    float f; memcpy(&f, &bits, 4); return f;
#endif
}

/* kind 0: Q4_1, repacked per row (rf_pack_q4_1): the row's nb blocks of 16 nibble bytes (value j<16 the low
   nibble of byte j, j>=16 the high nibble of byte j-16), then its nb fp16 scales d, then its nb fp16 minimums m;
   w = d * q + m.  kind 1: Q8_0 as GGUF stores it (34-byte blocks: fp16 d, 32 int8 q); w = d * q. */
static inline int block_bytes(int kind) { return kind == 0 ? 20 : 34; }

/* The scales of blocks [b0, b0 + n) of one row as fp32 (SB blocks at a time, so they are read from L1). */
#define SB 64
#ifndef RF_AHEAD
#define RF_AHEAD 8192
#endif
static inline void scales(int kind, const uint8_t* row, int64_t nb, int64_t b0, int64_t n, float* d, float* m) {
    if (kind == 0) {
        const uint8_t* ds = row + nb * 16 + b0 * 2;
        const uint8_t* ms = row + nb * 18 + b0 * 2;
        int64_t i = 0;
#if RF_SIMD
        for (; i + 8 <= n; i += 8) {
            _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ds + 2 * i))));
            _mm256_storeu_ps(m + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ms + 2 * i))));
        }
#endif
        for (; i < n; i++) { d[i] = half_to_float(ds + 2 * i); m[i] = half_to_float(ms + 2 * i); }
    } else {
        for (int64_t i = 0; i < n; i++) { d[i] = half_to_float(row + (b0 + i) * 34); m[i] = 0.0f; }
    }
}

#if RF_SIMD == 512
typedef __m512 vec;
#define VW 16
#define GMAX 8  /* rows of x per pass: 8 ran prompts faster than 12 here, and 14 spills registers */
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vset(float f) { return _mm512_set1_ps(f); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a, vec b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }
/* The 32 weights of block b of a row, exactly: Q4_1 looks its nibbles up in the block's 16 values d * i + m
   (vpermps reads the low 4 bits of each index), Q8_0 multiplies. */
template <int KIND>
static inline void block(const uint8_t* row, int64_t b, float d, float m, vec* w) {
    if (KIND == 0) {
        const vec table = _mm512_fmadd_ps(_mm512_set1_ps(d),
            _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_ps(m));
        __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + b * 16)));
        w[0] = _mm512_permutexvar_ps(q, table);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
    } else {
        const uint8_t* blk = row + b * 34 + 2;
        vec dv = _mm512_set1_ps(d);
        w[0] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)blk))));
        w[1] = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(blk + 16)))));
    }
}
#elif RF_SIMD == 256
typedef __m256 vec;
#define VW 8
#define GMAX 4
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vset(float f) { return _mm256_set1_ps(f); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a, vec b) {
    __m256 s = _mm256_add_ps(a, b);
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}
template <int KIND>
static inline void block(const uint8_t* row, int64_t b, float d, float m, vec* w) {
    vec dv = _mm256_set1_ps(d);
    if (KIND == 0) {
        vec mv = _mm256_set1_ps(m);
        __m128i qs = _mm_loadu_si128((const __m128i*)(row + b * 16));
        __m128i lo = _mm_and_si128(qs, _mm_set1_epi8(0x0f)), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), _mm_set1_epi8(0x0f));
        w[0] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), mv);
        w[1] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), mv);
        w[2] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), mv);
        w[3] = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), mv);
    } else {
        const uint8_t* blk = row + b * 34 + 2;
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 8 * j)))));
    }
}
#endif

#if RF_SIMD
/* R weight rows times G activation rows. Lane l of accumulator (i & 1) of a pair sums the products of chunk i
   (VW values) of every block in order, then the two accumulators are added and reduced in one fixed order:
   every (row, activation) pair is summed the same way whatever R, G, T or the thread count. */
template <int KIND, int R, int G>
static void tile(const uint8_t* w, int64_t row_bytes, int64_t nb, const float* x, int64_t K, float* y, int64_t N) {
    vec acc[R][G][2];
    float d[R][SB], m[R][SB];
    for (int r = 0; r < R; r++) for (int g = 0; g < G; g++) acc[r][g][0] = acc[r][g][1] = vzero();
    for (int64_t b0 = 0; b0 < nb; b0 += SB) {
        const int64_t n = nb - b0 < SB ? nb - b0 : SB;
        for (int r = 0; r < R; r++) scales(KIND, w + r * row_bytes, nb, b0, n, d[r], m[r]);
        for (int64_t i = 0; i < n; i++) {
            const int64_t b = b0 + i;
            /* the hardware prefetcher alone reaches half the memory bandwidth: fetch the bytes a few tiles ahead */
            const uint8_t* ahead = w + RF_AHEAD + b * R * block_bytes(KIND);
            _mm_prefetch((const char*)ahead, _MM_HINT_T0);
            _mm_prefetch((const char*)ahead + 64, _MM_HINT_T0);
            for (int r = 0; r < R; r++) {
                vec wv[32 / VW];
                block<KIND>(w + r * row_bytes, b, d[r][i], m[r][i], wv);
                for (int j = 0; j < 32 / VW; j++)
                    for (int g = 0; g < G; g++)
                        acc[r][g][j & 1] = vfma(wv[j], vload(x + g * K + b * 32 + VW * j), acc[r][g][j & 1]);
            }
        }
    }
    for (int r = 0; r < R; r++) for (int g = 0; g < G; g++) y[g * N + r] = vsum(acc[r][g][0], acc[r][g][1]);
}
#else
template <int KIND, int R, int G>
static void tile(const uint8_t* w, int64_t row_bytes, int64_t nb, const float* x, int64_t K, float* y, int64_t N) {
    for (int r = 0; r < R; r++) for (int g = 0; g < G; g++) {
        const uint8_t* row = w + r * row_bytes;
        float acc[2][8] = {{0}};
        for (int64_t b = 0; b < nb; b++) {
            float d, m;
            scales(KIND, row, nb, b, 1, &d, &m);
            for (int i = 0; i < 32; i++) {
                float wi = KIND == 0 ? fmaf(d, (float)(i < 16 ? row[b * 16 + i] & 0x0f : row[b * 16 + i - 16] >> 4), m)
                                     : d * (float)(int8_t)row[b * 34 + 2 + i];
                acc[(i >> 3) & 1][i & 7] = fmaf(wi, x[g * K + b * 32 + i], acc[(i >> 3) & 1][i & 7]);
            }
        }
        float s[8];
        for (int l = 0; l < 8; l++) s[l] = acc[0][l] + acc[1][l];
        float v[4] = {s[0] + s[4], s[1] + s[5], s[2] + s[6], s[3] + s[7]};
        y[g * N + r] = (v[0] + v[2]) + (v[1] + v[3]);
    }
}
#define GMAX 4
#endif

template <int KIND, int R, int G>
static void rows(const uint8_t* w, int64_t row_bytes, int64_t nb, const float* x, int64_t K, float* y, int64_t N,
                 int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + R <= n1; n += R) tile<KIND, R, G>(w + n * row_bytes, row_bytes, nb, x, K, y + n, N);
    for (; n < n1; n++) tile<KIND, 1, G>(w + n * row_bytes, row_bytes, nb, x, K, y + n, N);
}

extern "C" int rf_simd(void) { return RF_SIMD; }

/* Threads without a barrier: the caller and its helpers take row tiles from one counter, and the caller waits
   only for tiles a helper has taken. On a shared machine a helper that is not scheduled simply takes none (an
   OpenMP team waits for every thread at the end of each call: milliseconds per call on a busy core). Each tile's
   outputs are computed by one thread with the same code, so results do not depend on the thread count. */
typedef void (*tile_fn)(const void* job, int64_t i);
/* never destroyed: a condition variable's destructor at exit would wait for the helpers blocked on it */
static std::mutex& pool_mu = *new std::mutex;
static std::mutex& run_mu = *new std::mutex;
static std::condition_variable& pool_cv = *new std::condition_variable;
static int pool_helpers = 0, pool_wanted = 0;  /* helpers started; helpers the current job still asks for */
static uint32_t pool_gen = 0;                  /* the current job's number (a helper joins each job once) */
static tile_fn pool_fn;
static const void* pool_job;
static int64_t pool_tiles;
static std::atomic<uint64_t> pool_next(0);      /* (job number << 32) | next tile */
static std::atomic<int64_t> pool_done(0);

static int64_t grab(uint32_t gen, int64_t tiles) {
    uint64_t c = pool_next.load();
    for (;;) {
        if ((uint32_t)(c >> 32) != gen || (int64_t)(c & 0xffffffffu) >= tiles) return -1;
        if (pool_next.compare_exchange_weak(c, c + 1)) return (int64_t)(c & 0xffffffffu);
    }
}

static void helper() {
    uint32_t seen = 0;
    for (;;) {
        uint32_t gen; tile_fn fn; const void* job; int64_t tiles;
        {
            std::unique_lock<std::mutex> lock(pool_mu);
            pool_cv.wait(lock, [&] { return pool_gen != seen && pool_wanted > 0; });
            seen = gen = pool_gen; pool_wanted--; fn = pool_fn; job = pool_job; tiles = pool_tiles;
        }
        for (int64_t i; (i = grab(gen, tiles)) >= 0;) { fn(job, i); pool_done.fetch_add(1); }
    }
}

static void parallel(tile_fn fn, const void* job, int64_t tiles, int threads) {
    if (threads <= 1 || tiles < 2) { for (int64_t i = 0; i < tiles; i++) fn(job, i); return; }
    std::lock_guard<std::mutex> run(run_mu);  /* one job at a time */
    uint32_t gen;
    {
        std::lock_guard<std::mutex> lock(pool_mu);
        for (; pool_helpers < threads - 1; pool_helpers++) std::thread(helper).detach();
        gen = ++pool_gen ? pool_gen : ++pool_gen;
        pool_fn = fn; pool_job = job; pool_tiles = tiles; pool_wanted = threads - 1;
        pool_done.store(0);
        pool_next.store((uint64_t)gen << 32);
    }
    pool_cv.notify_all();
    for (int64_t i; (i = grab(gen, tiles)) >= 0;) { fn(job, i); pool_done.fetch_add(1); }
    while (pool_done.load() < tiles) std::this_thread::yield();
}

struct Job { const uint8_t* w; int64_t N, K, T, nb, row_bytes; const float* x; float* y; };
#define TILE_ROWS 16

template <int KIND>
static void row_tile(const void* p, int64_t i) {
    const Job& j = *(const Job*)p;
    const uint8_t* w = j.w; const float* x = j.x; float* y = j.y;
    const int64_t N = j.N, K = j.K, T = j.T, nb = j.nb, row_bytes = j.row_bytes;
    int64_t n0 = i * TILE_ROWS, n1 = n0 + TILE_ROWS < N ? n0 + TILE_ROWS : N;
    for (int64_t t = 0; t < T; t += GMAX) {
        const float* xt = x + t * K;
        float* yt = y + t * N;
        switch (T - t < GMAX ? T - t : GMAX) {
            case 1: rows<KIND, 4, 1>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
            case 2: rows<KIND, 4, 2>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
            case 3: rows<KIND, 2, 3>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
#if GMAX > 4
            case 4: rows<KIND, 2, 4>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
            case 5: rows<KIND, 2, 5>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
            case 6: rows<KIND, 2, 6>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
            case 7: rows<KIND, 1, 7>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
#endif
            default: rows<KIND, 1, GMAX>(w, row_bytes, nb, xt, K, yt, N, n0, n1); break;
        }
    }
}

/* y[T, N] = x[T, K] @ w[N, K]^T, w as N rows of K/32 blocks of the given kind (Q4_1 repacked) */
extern "C" void rf_matmul(const uint8_t* w, int kind, int64_t N, int64_t K, const float* x, int64_t T, float* y,
                          int threads) {
    const int64_t nb = K / 32;
    Job job = {w, N, K, T, nb, nb * block_bytes(kind), x, y};
    parallel(kind == 0 ? row_tile<0> : row_tile<1>, &job, (N + TILE_ROWS - 1) / TILE_ROWS, threads);
}
""" + decode_attention.SOURCE + decode_layers.SOURCE

KINDS = {"q4_1": 0, "q8_0": 1}
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine if hasattr(os, "uname") else ""


ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c", "-DRF_ISA=256"],
             "scalar": ["-DRF_ISA=0"]}


def _build(cxx: str, target: Path, isa: str) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically), trying fewer flags when the compiler refuses some."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "gguf_kernel.cpp"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        errors = []
        arch = ISA_FLAGS[isa]
        for flags in ([*arch, "-pthread"], arch, [] if isa == "native" else None):
            if flags is None:
                break
            cmd = [cxx, "-O3", "-std=c++14", "-shared", "-fPIC", *flags, str(src), "-o", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(out, target)
                return
            errors.append(proc.stderr.strip().splitlines()[-1:] or ["?"])
        raise OSError(f"{cxx} could not build the GGUF kernel: {errors[-1][0]}")


def load(cache_dir: str | os.PathLike[str], isa: str = "native") -> Any:
    """The kernel library (``rf_matmul``, ``rf_simd``, ``rf_decode_attention``), built into ``cache_dir/kernels`` at first use; None when
    this machine has no C++ compiler or the build fails (one warning line says so). ``isa`` ``"avx2"`` or
    ``"scalar"`` builds that fallback instead of the best this CPU runs (the tests exercise all three)."""
    cxx = _compiler()
    if cxx is None:
        log.warning("no C++ compiler found (c++, g++, clang++ or $CXX): the GGUF weights kernel cannot be built, "
                    "so the model runs on fp32 weights dequantized from the GGUF")
        return None
    key = hashlib.sha256(f"{SOURCE}|{cxx}|{_cpu_flags()}|{isa}".encode()).hexdigest()[:16]
    target = Path(cache_dir) / "kernels" / f"gguf_kernel-{key}.so"
    with _lock:
        if str(target) in _loaded:
            return _loaded[str(target)]
        try:
            if not target.exists():
                log.info("building the GGUF weights kernel (once per machine) into %s", target.parent)
                _build(cxx, target, isa)
            lib = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("the GGUF weights kernel could not be built (%s): the model runs on fp32 weights "
                        "dequantized from the GGUF", exc)
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.rf_matmul.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, i64, ptr, ctypes.c_int]
        lib.rf_matmul.restype = None
        lib.rf_simd.restype = ctypes.c_int
        decode_attention.declare(lib)
        decode_layers.declare(lib)
        _loaded[str(target)] = lib
        return lib


def pack(blocks: Any, kind: str) -> Any:
    """GGUF blocks ``[N, K/32 * block bytes]`` (uint8 numpy) in the kernel's layout, a uint8 tensor of the same
    shape: Q4_1 rows become their nibbles, then their scales, then their minimums (the kernel reads 16 scales
    with one instruction and each block's nibbles aligned); Q8_0 stays as it is. Rows stay rows, so stacking
    packed matrices or slicing rows of one is exact."""
    import numpy as np
    import torch

    if kind == "q4_1":
        n = blocks.shape[0]
        b = blocks.reshape(n, -1, 20)
        blocks = np.concatenate([b[:, :, 4:].reshape(n, -1), b[:, :, 0:2].reshape(n, -1),
                                 b[:, :, 2:4].reshape(n, -1)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(blocks))


def matmul(lib: Any, blocks: Any, kind: str, x: Any, threads: int) -> Any:
    """``x [T, K]`` (fp32, contiguous) times the ``[N, K/32 * block bytes]`` uint8 ``blocks`` (:func:`pack`'s
    layout): ``[T, N]``."""
    import torch

    n = blocks.shape[0]
    k = blocks.shape[1] // BLOCK_BYTES[kind] * 32
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    lib.rf_matmul(blocks.data_ptr(), KINDS[kind], n, k, x.data_ptr(), x.shape[0], y.data_ptr(), threads)
    return y
