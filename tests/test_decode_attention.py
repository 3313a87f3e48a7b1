"""The decode rows' attention kernel (``--weights hybrid``) against the engine's PyTorch attention: the same
outputs up to fp32 rounding, the same key/value writes, and each row's numbers independent of its batch and of
the thread count, in the AVX-512, AVX2 and plain C++ builds."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from retroformer_cli.llm.engine import gguf_kernel  # noqa: E402
from retroformer_cli.llm.engine.attention import Segment, attend_segments, causal_mask  # noqa: E402
from retroformer_cli.llm.engine.decode_attention import DecodeSegments  # noqa: E402


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def lib(request, tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if request.param == "avx2" and " avx2" not in open("/proc/cpuinfo").read():
        pytest.skip("this CPU has no AVX2")
    built = gguf_kernel.load(tmp_path_factory.mktemp("kernel-cache"), request.param)
    assert built is not None
    return built


def sequences(pasts, counts, kv_heads, d, layers=2, seed=0):
    """Key/value buffers with ``pasts`` positions filled, and segments of ``counts`` new rows each."""
    gen = torch.Generator().manual_seed(seed)
    segments, row = [], 0
    for past, count in zip(pasts, counts):
        kv = torch.randn(layers, 2, kv_heads, past + count + 5, d, generator=gen)
        segments.append(Segment(kv, row, count, past, causal_mask(count, past, None, torch.device("cpu"))))
        row += count
    return segments, row


def reference(segments, layer, q, k, v, scale, window=None):
    """The engine's PyTorch attention on copies of the buffers: (outputs, buffers after)."""
    copies = [Segment(s.kv.clone(), s.start, s.count, s.past, s.mask) for s in segments]
    out = attend_segments(layer, q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), copies, scale, window)
    return out.squeeze(1), [s.kv for s in copies]


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 32), (10, 2, 128), (6, 3, 48)])
def test_kernel_attends_like_pytorch_and_writes_the_same_keys_and_values(lib, heads, kv_heads, d):
    """Decoding rows (one per sequence) and draft rows (several, causal among themselves), short and long
    pasts, an empty past; 1, 3, 5 query heads per key/value head; head sizes on and off the vector paths."""
    segments, rows = sequences([5, 300, 17, 0, 1000], [1, 1, 3, 1, 2], kv_heads, d)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows, n, d, generator=gen) for n in (heads, kv_heads, kv_heads))
    expected, buffers = reference(segments, 1, q, k, v, d ** -0.5)
    got = DecodeSegments.build(segments, rows).attend(lib, 1, q, k, v, d ** -0.5, None, 1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
    assert all(torch.equal(s.kv, b) for s, b in zip(segments, buffers))


def test_sliding_window(lib):
    """A row sees only its last ``window`` positions, counted from its own (drafts included)."""
    segments, rows = sequences([40, 7], [1, 2], 2, 64)
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(rows, 4, 64, generator=gen), torch.randn(rows, 2, 64, generator=gen), \
        torch.randn(rows, 2, 64, generator=gen)
    expected, _ = reference(segments, 0, q, k, v, 0.125, window=8)
    got = DecodeSegments.build(segments, rows).attend(lib, 0, q, k, v, 0.125, 8, 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)


def test_a_rows_numbers_do_not_depend_on_its_batch_or_the_threads(lib):
    segments, rows = sequences([33, 500, 2, 90], [1, 1, 4, 1], 3, 64)
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(rows, 9, 64, generator=gen), torch.randn(rows, 3, 64, generator=gen), \
        torch.randn(rows, 3, 64, generator=gen)
    kept = [s.kv.clone() for s in segments]
    together = DecodeSegments.build(segments, rows).attend(lib, 1, q, k, v, 0.125, None, 1)
    for s, buf in zip(segments, kept):
        s.kv.copy_(buf)
    threaded = DecodeSegments.build(segments, rows).attend(lib, 1, q, k, v, 0.125, None, 2)
    assert torch.equal(together, threaded)
    for s, buf in zip(segments, kept):  # each sequence alone, its rows first in a pass of its own
        s.kv.copy_(buf)
        alone = Segment(s.kv, 0, s.count, s.past)
        rows_of = slice(s.start, s.start + s.count)
        got = DecodeSegments.build([alone], s.count).attend(lib, 1, q[rows_of], k[rows_of], v[rows_of], 0.125, None, 1)
        assert torch.equal(got, together[rows_of])


def test_only_contiguous_fp32_cpu_buffers_take_the_kernel():
    segments, rows = sequences([4, 4], [1, 1], 2, 16)
    assert DecodeSegments.build(segments, rows) is not None
    assert DecodeSegments.build(segments, 1) is not None and DecodeSegments.build(segments, 1).rows == 1
    half = [Segment(segments[0].kv.half(), 0, 1, 4), segments[1]]
    assert DecodeSegments.build(half, rows) is None
    strided = [Segment(segments[0].kv[:, :, :, :6], 0, 1, 4), segments[1]]
    assert DecodeSegments.build(strided, rows) is None
    padded = [segments[0], Segment(None, 1, 1, 0)]
    assert DecodeSegments.build(padded, rows) is None
