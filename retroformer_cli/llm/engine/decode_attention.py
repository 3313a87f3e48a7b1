"""Attention of decode rows over their sequences' key/value buffers in one C++ call per layer (``--weights hybrid``).

A decode pass of 8 sequences called PyTorch's scaled-dot-product attention 240 times (8 sequences x 30 layers),
about 66 us each after a ~300-token prompt, for a few microseconds of arithmetic: a third of the pass
(``python benchmarks/decode_profile.py --weights hybrid --forward lean --batch 8``). Here one call per layer
writes every decode row's new key and value into its sequence's buffer and attends all of them, in fp32.

Each output row is computed alone, in a fixed order (the dot products in 16 lanes reduced one way, the softmax
over the row's keys in order, the weighted values summed key by key), so a row's numbers depend only on its
own sequence, never on the batch or the thread count. They are not bit-identical to PyTorch's attention (another
summation order and exponential), which is why only decode rows of ``--weights hybrid`` take this path: their
keys and values never enter the prefix cache, and prompt rows keep PyTorch's attention. The source is compiled
into the same library as :mod:`.gguf_kernel` (:data:`SOURCE` is appended to its own).
"""

from __future__ import annotations

import ctypes
from typing import Any

# Appended to gguf_kernel's source: uses its RF_SIMD, parallel() and helpers.
SOURCE = r"""
#include <vector>
#ifndef ATTN_AHEAD
#define ATTN_AHEAD 64
#endif
#if RF_SIMD == 512
/* e^x: 2^n * p(r), r = x - n ln2, p the degree-6 Taylor polynomial of e^r on |r| <= ln2/2 (relative error ~2e-7);
   below -87 it gives 0 or a denormal, as expf does, and above 88.7 +inf (scalef saturates). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* A softmax's numerators in place: st[t] = e^(st[t] - mx) for t < n; returns their sum (16 lanes, then one
   fixed reduction) */
static inline float softmax_numerators(float* st, int64_t n, float mx) {
    float sum = 0.0f;
    int64_t t = 0;
#if RF_SIMD == 512
    const __m512 top = _mm512_set1_ps(mx);
    __m512 total = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(st + t), top));
        _mm512_storeu_ps(st + t, e);
        total = _mm512_add_ps(total, e);
    }
    if (t < n) {
        const __mmask16 m = (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, st + t), top));
        _mm512_mask_storeu_ps(st + t, m, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
        t = n;
    }
    sum = _mm512_reduce_add_ps(total);
#endif
    for (; t < n; t++) { st[t] = expf(st[t] - mx); sum += st[t]; }
    return sum;
}

/* sum_i a[i] * b[i] over d values: 16 lane sums, then added in one fixed order */
static inline float dot16(const float* a, const float* b, int d) {
#if RF_SIMD == 512
    if (d % 16 == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < d; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float lanes[16] = {0};
    for (int c = 0; c < d; c++) lanes[c & 15] = fmaf(a[c], b[c], lanes[c & 15]);
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += lanes[l];
    return s;
}

#if RF_SIMD == 512
/* NH query heads sharing one kv head over n keys of d = 16 * NV values, accumulators in registers: each key row
   is read once for all NH heads. Scores, softmax (max, then e^(s - max) summed in 16 lanes), then the weighted
   values summed key by key; every head's numbers are the same whatever NH it was grouped in. */
template <int NV, int NH>
static void heads16(const float* const* q, const float* K, const float* V, int64_t n, float scale,
                    float* const* sc, float* const* o) {
    const int d = 16 * NV;
    __m512 qv[NH][NV];
    for (int h = 0; h < NH; h++) for (int i = 0; i < NV; i++) qv[h][i] = _mm512_loadu_ps(q[h] + 16 * i);
    float mx[NH];
    for (int h = 0; h < NH; h++) mx[h] = -INFINITY;
    for (int64_t t = 0; t < n; t++) {
        __m512 kv[NV];
        /* the hardware prefetcher alone left this loop waiting on memory: fetch the keys ATTN_AHEAD rows ahead */
        for (int i = 0; i < NV; i++) _mm_prefetch((const char*)(K + (t + ATTN_AHEAD) * d + 16 * i), _MM_HINT_T0);
        for (int i = 0; i < NV; i++) kv[i] = _mm512_loadu_ps(K + t * d + 16 * i);
        for (int h = 0; h < NH; h++) {
            __m512 a = _mm512_mul_ps(qv[h][0], kv[0]);
            for (int i = 1; i < NV; i++) a = _mm512_fmadd_ps(qv[h][i], kv[i], a);
            const float s = _mm512_reduce_add_ps(a) * scale;
            sc[h][t] = s;
            mx[h] = s > mx[h] ? s : mx[h];
        }
    }
    float inv[NH];
    for (int h = 0; h < NH; h++) inv[h] = 1.0f / softmax_numerators(sc[h], n, mx[h]);
    __m512 acc[NH][NV];
    for (int h = 0; h < NH; h++) for (int i = 0; i < NV; i++) acc[h][i] = _mm512_setzero_ps();
    for (int64_t u = 0; u < n; u++) {
        __m512 vv[NV];
        for (int i = 0; i < NV; i++) _mm_prefetch((const char*)(V + (u + ATTN_AHEAD) * d + 16 * i), _MM_HINT_T0);
        for (int i = 0; i < NV; i++) vv[i] = _mm512_loadu_ps(V + u * d + 16 * i);
        for (int h = 0; h < NH; h++) {
            const __m512 w = _mm512_set1_ps(sc[h][u]);
            for (int i = 0; i < NV; i++) acc[h][i] = _mm512_fmadd_ps(w, vv[i], acc[h][i]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int i = 0; i < NV; i++) _mm512_storeu_ps(o[h] + 16 * i, _mm512_mul_ps(acc[h][i], _mm512_set1_ps(inv[h])));
}

/* the heads g * rep ... (g + 1) * rep - 1 of one row in groups of up to 4 (d = 16 * NV) */
template <int NV>
static void group16(const float* q, const float* K, const float* V, int64_t n, float scale, float* sc, int64_t stride,
                    float* o, int h0, int rep) {
    const int d = 16 * NV;
    for (int h = 0; h < rep; h += 4) {
        const int nh = rep - h < 4 ? rep - h : 4;
        const float* qs[4]; float* ss[4]; float* os[4];
        for (int i = 0; i < nh; i++) { qs[i] = q + (int64_t)(h0 + h + i) * d; ss[i] = sc + i * stride; os[i] = o + (int64_t)(h0 + h + i) * d; }
        switch (nh) {
            case 1: heads16<NV, 1>(qs, K, V, n, scale, ss, os); break;
            case 2: heads16<NV, 2>(qs, K, V, n, scale, ss, os); break;
            case 3: heads16<NV, 3>(qs, K, V, n, scale, ss, os); break;
            default: heads16<NV, 4>(qs, K, V, n, scale, ss, os); break;
        }
    }
}
#endif

struct AttnJob {
    const float *q, *k, *v;           /* row r's head h at q + r * q_stride + h * d (k, v: kv heads) */
    int64_t q_stride, k_stride, v_stride;
    float* out;                       /* [rows, heads, d] */
    const int64_t* row_seg;           /* the segment of each row */
    const int64_t* segs;              /* per segment: first row, rows, past */
    float* const* bufs;               /* per segment: this layer's buffer [2, kv_heads, cap, d] */
    const int64_t* caps;
    int heads, kv_heads, d;
    float scale;
    int64_t window;                   /* > 0: a row sees only its last `window` positions */
};

/* One row: for each kv head, its query heads' scores over the row's keys, softmax, weighted values. */
static void attend_row(const void* p, int64_t r) {
    const AttnJob& j = *(const AttnJob*)p;
    const int64_t s = j.row_seg[r], first = j.segs[3 * s], past = j.segs[3 * s + 2];
    const int64_t L = past + (r - first) + 1, lo = j.window > 0 && L > j.window ? L - j.window : 0, n = L - lo;
    const int d = j.d, rep = j.heads / j.kv_heads;
    const int64_t cap = j.caps[s];
    static thread_local std::vector<float> scores;
    const int64_t stride = (n + 15) / 16 * 16;
    if ((int64_t)scores.size() < 4 * stride) scores.resize(4 * stride + 1024);
    float* sc = scores.data();
    for (int g = 0; g < j.kv_heads; g++) {
        const float* K = j.bufs[s] + (int64_t)g * cap * d;
        const float* V = j.bufs[s] + ((int64_t)j.kv_heads + g) * cap * d;
#if RF_SIMD == 512
        if (d == 64 || d == 128) {
            const float* qr = j.q + r * j.q_stride;
            float* orow = j.out + r * j.heads * d;
            if (d == 64) group16<4>(qr, K + lo * d, V + lo * d, n, j.scale, sc, stride, orow, g * rep, rep);
            else group16<8>(qr, K + lo * d, V + lo * d, n, j.scale, sc, stride, orow, g * rep, rep);
            continue;
        }
#endif
        for (int h = g * rep; h < (g + 1) * rep; h++) {
            const float* q = j.q + r * j.q_stride + (int64_t)h * d;
            float* o = j.out + (r * j.heads + h) * d;
            float mx = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                sc[t] = dot16(q, K + (lo + t) * d, d) * j.scale;
                mx = sc[t] > mx ? sc[t] : mx;
            }
            const float sum = softmax_numerators(sc, n, mx);
            for (int c = 0; c < d; c++) o[c] = 0.0f;
            for (int64_t u = 0; u < n; u++) {
                const float w = sc[u];
                const float* vu = V + (lo + u) * d;
                for (int c = 0; c < d; c++) o[c] = fmaf(w, vu[c], o[c]);
            }
            const float inv = 1.0f / sum;
            for (int c = 0; c < d; c++) o[c] *= inv;
        }
    }
}

/* Write each row's new key and value into its segment's buffer (position past + its index in the segment), then
   attend every row; rows are shared with the helper threads. */
static void decode_attention(const AttnJob& job, int64_t rows, int threads) {
    const int d = job.d, kv_heads = job.kv_heads;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t s = job.row_seg[r], pos = job.segs[3 * s + 2] + (r - job.segs[3 * s]), cap = job.caps[s];
        for (int g = 0; g < kv_heads; g++) {
            memcpy(job.bufs[s] + ((int64_t)g * cap + pos) * d, job.k + r * job.k_stride + (int64_t)g * d,
                   d * sizeof(float));
            memcpy(job.bufs[s] + (((int64_t)kv_heads + g) * cap + pos) * d, job.v + r * job.v_stride + (int64_t)g * d,
                   d * sizeof(float));
        }
    }
    parallel(attend_row, &job, rows, threads);
}

extern "C" void rf_decode_attention(const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                                    const float* v, int64_t v_stride, float* out, int64_t rows,
                                    const int64_t* row_seg, const int64_t* segs, float* const* bufs,
                                    const int64_t* caps, int heads, int kv_heads, int d, float scale,
                                    int64_t window, int threads) {
    AttnJob job = {q, k, v, q_stride, k_stride, v_stride, out, row_seg, segs, bufs, caps, heads, kv_heads, d,
                   scale, window};
    decode_attention(job, rows, threads);
}
"""


def declare(lib: Any) -> None:
    """Give ``rf_decode_attention`` its ctypes signature."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.rf_decode_attention.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr,
                                        c_int, c_int, c_int, ctypes.c_float, i64, c_int]
    lib.rf_decode_attention.restype = None


class DecodeSegments:
    """The decode segments of one forward pass (those whose rows come first, ``rows`` rows in all), laid out once
    for the per-layer calls: each row's segment, each segment's (first row, rows, past), and the address and
    capacity of each sequence's buffer. None from :meth:`build` when a buffer is not a contiguous fp32 CPU tensor
    (then PyTorch's attention is used)."""

    def __init__(self, segments: list[Any], rows: int):
        import torch

        self.rows = rows
        self.segments = segments
        self.row_seg = torch.tensor([i for i, s in enumerate(segments) for _ in range(s.count)], dtype=torch.int64)
        self.info = torch.tensor([[s.start, s.count, s.past] for s in segments], dtype=torch.int64)
        self.caps = torch.tensor([s.kv.shape[3] for s in segments], dtype=torch.int64)
        self.layer_bytes = [s.kv.stride(0) * s.kv.element_size() for s in segments]
        self.bases = [s.kv.data_ptr() for s in segments]
        self.pointers = (ctypes.c_void_p * len(segments))()

    @classmethod
    def build(cls, segments: list[Any], rows: int) -> "DecodeSegments | None":
        import torch

        chosen = [s for s in segments if s.start < rows]
        if sum(s.count for s in chosen) != rows or any(
                s.kv is None or s.kv.dtype != torch.float32 or s.kv.device.type != "cpu" or not s.kv.is_contiguous()
                for s in chosen):
            return None
        return cls(chosen, rows)

    def attend(self, lib: Any, layer: int, q: Any, k: Any, v: Any, scale: float, window: int | None,
               threads: int) -> Any:
        """``q [rows, heads, d]``, ``k``/``v`` ``[rows, kv_heads, d]`` (rows may be strided, heads contiguous):
        the attention output ``[rows, heads, d]``, the new keys and values written into the buffers."""
        import torch

        rows, heads, d = q.shape
        for tensor in (q, k, v):
            if tensor.stride(2) != 1 or tensor.stride(1) != d or tensor.dtype != torch.float32:
                raise ValueError("decode attention needs fp32 rows with contiguous heads")
        for i, (base, step) in enumerate(zip(self.bases, self.layer_bytes)):
            self.pointers[i] = base + layer * step
        out = torch.empty(rows, heads, d, dtype=torch.float32)
        lib.rf_decode_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                                out.data_ptr(), rows, self.row_seg.data_ptr(), self.info.data_ptr(),
                                self.pointers, self.caps.data_ptr(), heads, k.shape[1], d, scale, window or 0,
                                threads)
        return out
