"""Every decoder layer of the decode rows in one C++ call (``--weights hybrid``): RMSNorm, the stacked q/k/v
projection, rotary embedding, attention (:mod:`.decode_attention`), the output projection and residual, RMSNorm,
the stacked gate/up projection, SiLU-and-multiply, the down projection and residual, for all 30 layers.

A decode pass through the lean forward pass ran about 25 PyTorch operators per layer around the kernel calls
(norms, rotation, activation, slicing, residuals), a few microseconds each: with the GGUF kernel, as long as the
matrix products of a one-sequence step (``python benchmarks/decode_profile.py --weights hybrid --batch 1``).
Here they are loops over the rows in C++. Each row is computed alone in a fixed order (the RMSNorm's squares in
16 lanes reduced one way, SiLU with our own exponential, each element's path fixed by its position), with the kernel's matrix products, which do not depend on
the batch either: a row's numbers are the same alone or in any batch, with any thread count. They are not
bit-identical to PyTorch's operators, which is fine for decode rows of ``--weights hybrid`` (their keys and
values never enter the prefix cache; prompt rows keep the PyTorch path).
"""

from __future__ import annotations

import ctypes
from typing import Any

# Appended to gguf_kernel's source after decode_attention's: uses rf_matmul, AttnJob and decode_attention().
SOURCE = r"""
struct RfLayer {                 /* one decoder layer: GGUF blocks in the kernel's layout, RMSNorm weights */
    const uint8_t *qkv, *o, *gate_up, *down;
    int64_t qkv_kind, o_kind, gate_up_kind, down_kind;
    const float *norm1, *norm2;
};

/* e^x in fp32 for x in [-87, 88] (clamped): 2^n * p(r) with r = x - n ln2 and exp16's degree-6 polynomial */
static inline float exp_any(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = nearbyintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = 1.0f / 720;
    p = fmaf(p, r, 1.0f / 120); p = fmaf(p, r, 1.0f / 24); p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f); p = fmaf(p, r, 1.0f); p = fmaf(p, r, 1.0f);
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n; memcpy(&two_n, &bits, 4);
    return p * two_n;
}

/* out[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u: exp16 in the vector loop, exp_any (the same polynomial; it
   clamps where exp16 saturates, |g| > 87) in the scalar tail and the builds without AVX-512 */
static void silu_mul(const float* g, const float* u, int64_t n, float* out) {
    int64_t i = 0;
#if RF_SIMD == 512
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 gv = _mm512_loadu_ps(g + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) out[i] = g[i] / (1.0f + exp_any(-g[i])) * u[i];
}

static void rms_norm_rows(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out) {
    for (int64_t t = 0; t < rows; t++) {
        const float* xt = x + t * n;
        float lanes[16] = {0};
        for (int64_t i = 0; i < n; i++) lanes[i & 15] = fmaf(xt[i], xt[i], lanes[i & 15]);
        float s = 0.0f;
        for (int l = 0; l < 16; l++) s += lanes[l];
        const float inv = 1.0f / sqrtf(s / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[t * n + i] = w[i] * (xt[i] * inv);
    }
}

/* x * cos + rotate_half(x) * sin for `heads` heads of d values (Llama's layout: halves, not pairs) */
static void rotate_heads(float* x, int heads, int d, const float* cos, const float* sin) {
    const int half = d / 2;
    float tmp[512];
    for (int h = 0; h < heads; h++) {
        float* v = x + (int64_t)h * d;
        for (int i = 0; i < d; i++) tmp[i] = v[i];
        for (int i = 0; i < half; i++) v[i] = tmp[i] * cos[i] + (-tmp[i + half]) * sin[i];
        for (int i = half; i < d; i++) v[i] = tmp[i] * cos[i] + tmp[i - half] * sin[i];
    }
}

/* All layers for `rows` decode rows: h [rows, H] holds the embeddings and ends with the last hidden states (before
   the final norm); cos/sin [rows, d]; the key/value buffers of segment s for layer l start at
   bases[s] + l * layer_floats[s]. */
extern "C" void rf_decode_layers(const RfLayer* layers, int64_t n_layers, float* h, int64_t rows, int64_t H,
                                 int64_t I, int heads, int kv_heads, int d, float eps, float scale, const float* cos,
                                 const float* sin, const int64_t* row_seg, const int64_t* segs, float* const* bases,
                                 const int64_t* layer_floats, const int64_t* caps, int64_t nseg, int threads) {
    const int64_t nq = (int64_t)heads * d, nk = (int64_t)kv_heads * d, nqkv = nq + 2 * nk;
    std::vector<float> xn(rows * H), qkv(rows * nqkv), att(rows * nq), o(rows * H), gu(rows * 2 * I), act(rows * I);
    std::vector<float*> bufs(nseg);
    for (int64_t l = 0; l < n_layers; l++) {
        const RfLayer& L = layers[l];
        rms_norm_rows(h, L.norm1, eps, rows, H, xn.data());
        rf_matmul(L.qkv, (int)L.qkv_kind, nqkv, H, xn.data(), rows, qkv.data(), threads);
        for (int64_t t = 0; t < rows; t++) {
            rotate_heads(qkv.data() + t * nqkv, heads, d, cos + t * d, sin + t * d);
            rotate_heads(qkv.data() + t * nqkv + nq, kv_heads, d, cos + t * d, sin + t * d);
        }
        for (int64_t s = 0; s < nseg; s++) bufs[s] = bases[s] + l * layer_floats[s];
        AttnJob job = {qkv.data(), qkv.data() + nq, qkv.data() + nq + nk, nqkv, nqkv, nqkv, att.data(), row_seg,
                       segs, bufs.data(), caps, heads, kv_heads, d, scale, 0};
        decode_attention(job, rows, threads);
        rf_matmul(L.o, (int)L.o_kind, H, nq, att.data(), rows, o.data(), threads);
        for (int64_t i = 0; i < rows * H; i++) h[i] += o[i];
        rms_norm_rows(h, L.norm2, eps, rows, H, xn.data());
        rf_matmul(L.gate_up, (int)L.gate_up_kind, 2 * I, H, xn.data(), rows, gu.data(), threads);
        for (int64_t t = 0; t < rows; t++) silu_mul(gu.data() + t * 2 * I, gu.data() + t * 2 * I + I, I, act.data() + t * I);
        rf_matmul(L.down, (int)L.down_kind, H, I, act.data(), rows, o.data(), threads);
        for (int64_t i = 0; i < rows * H; i++) h[i] += o[i];
    }
}
"""


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", ctypes.c_void_p), ("o", ctypes.c_void_p), ("gate_up", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("qkv_kind", ctypes.c_int64), ("o_kind", ctypes.c_int64),
                ("gate_up_kind", ctypes.c_int64), ("down_kind", ctypes.c_int64), ("norm1", ctypes.c_void_p),
                ("norm2", ctypes.c_void_p)]


def declare(lib: Any) -> None:
    """Give ``rf_decode_layers`` its ctypes signature."""
    i64, ptr, c_int, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.rf_decode_layers.argtypes = [ptr, i64, ptr, i64, i64, i64, c_int, c_int, c_int, f32, f32, ptr, ptr, ptr,
                                     ptr, ptr, ptr, ptr, i64, c_int]
    lib.rf_decode_layers.restype = None


class DecodeStack:
    """The decode rows' layers as one kernel call (:meth:`run`); :meth:`build` returns None when the model's layers
    are not all stacked GGUF blocks with one RMSNorm epsilon (then the per-operator path runs)."""

    def __init__(self, lib: Any, layers: list[tuple[Any, ...]], norms: list[tuple[Any, Any]], eps: float,
                 dims: tuple[int, int, int, int, int], scale: float, threads: int):
        self.lib, self.eps, self.scale, self.threads = lib, eps, scale, threads
        self.hidden, self.inter, self.heads, self.kv_heads, self.head_dim = dims
        self.keep = [m.blocks for layer in layers for m in layer] + [w for pair in norms for w in pair]
        self.table = (_Layer * len(layers))()
        for entry, (qkv, o, gate_up, down), (n1, n2) in zip(self.table, layers, norms):
            entry.qkv, entry.o, entry.gate_up, entry.down = (m.blocks.data_ptr() for m in (qkv, o, gate_up, down))
            entry.qkv_kind, entry.o_kind, entry.gate_up_kind, entry.down_kind = (
                m.code for m in (qkv, o, gate_up, down))
            entry.norm1, entry.norm2 = n1.data_ptr(), n2.data_ptr()

    @classmethod
    def build(cls, model: Any, decode: dict[str, Any]) -> "DecodeStack | None":
        import torch

        head = decode.get("lm_head")
        lib = getattr(head, "lib", None)
        if lib is None or not hasattr(lib, "rf_decode_layers"):
            return None
        cfg, inner = model.config, model.model
        layers, norms, eps = [], [], set()
        for i, layer in enumerate(inner.layers[: cfg.num_hidden_layers]):
            p = f"model.layers.{i}."
            qkv, o, gate, down = (decode.get(p + n) for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                              "mlp.gate_proj", "mlp.down_proj"))
            attn = layer.self_attn
            stacked = (len(getattr(qkv, "spans", None) or []) == 3 and len(getattr(gate, "spans", None) or []) == 2)
            if not stacked or o is None or down is None:
                return None
            layers.append((qkv, o, gate, down))
            pair = (layer.input_layernorm, layer.post_attention_layernorm)
            if any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in pair):
                return None
            norms.append((pair[0].weight.detach(), pair[1].weight.detach()))
            eps |= {pair[0].variance_epsilon, pair[1].variance_epsilon}
        head_dim = attn.head_dim
        dims = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim)
        if len(eps) != 1 or head_dim > 512 or head_dim % 2:
            return None
        return cls(lib, layers, norms, eps.pop(), dims, attn.scaling, head.threads)

    def run(self, h: Any, cos: Any, sin: Any, segments: Any) -> Any:
        """``h [rows, hidden]`` (the decode rows' embeddings, fp32) through every layer: the last hidden states,
        the rows' keys and values written into their buffers (``segments``: :class:`.DecodeSegments`)."""
        import torch

        h = h.contiguous().clone()
        cos, sin = cos.reshape(h.shape[0], -1).contiguous(), sin.reshape(h.shape[0], -1).contiguous()
        for t in (h, cos, sin):
            if t.dtype != torch.float32:
                raise ValueError("the decode layers run in fp32")
        floats = torch.tensor([b // 4 for b in segments.layer_bytes], dtype=torch.int64)
        bases = (ctypes.c_void_p * len(segments.bases))(*segments.bases)
        self.lib.rf_decode_layers(
            ctypes.addressof(self.table), len(self.table), h.data_ptr(), h.shape[0], self.hidden, self.inter,
            self.heads, self.kv_heads, self.head_dim, self.eps, self.scale, cos.data_ptr(), sin.data_ptr(),
            segments.row_seg.data_ptr(), segments.info.data_ptr(), bases, floats.data_ptr(),
            segments.caps.data_ptr(), len(segments.bases), self.threads)
        return h
