"""CUDA kernels of kvq::outlier_split and kvq::dequant_matmul against the CPU kernels.

* outlier_split must match the CPU kernel bit for bit ((value, index) order, NaN last, -0.0 equal
  to +0.0, every output bit including the sign of zeros).
* dequant_matmul accumulates in float32 in another order than the CPU kernel, so it is held to a
  FlashAttention-style bound instead: its error against a float64 ground truth (the same
  dequantized operand, with the outliers, multiplied in float64) is at most twice the CPU
  kernel's error plus a small tolerance (one rounding of the output dtype at the result's scale).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import torchkvq
from torchkvq import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torchkvq.cuda_available(), reason="needs a CUDA device and torchkvq built with CUDA"
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

outlier_split = torch.ops.kvq.outlier_split
dequant_matmul = torch.ops.kvq.dequant_matmul


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _assert_bitwise(got_cuda: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got_cuda.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape)
    if got.dtype in _INT_VIEW:
        iv = _INT_VIEW[got.dtype]
        got, want = got.contiguous().view(iv), want.contiguous().view(iv)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}"


# ---- outlier_split ---------------------------------------------------------------------------


def _vectors(rows: int, K: int, kind: str, dtype: torch.dtype, seed) -> torch.Tensor:
    g = _gen("split", seed)
    if kind == "randn":
        x = torch.randn(rows, K, generator=g) * 3
    elif kind == "ties":  # many equal values: the index decides
        x = torch.randint(-3, 4, (rows, K), generator=g).float()
    elif kind == "special":  # NaN, +-Inf, +-0.0, constant rows
        x = torch.randn(rows, K, generator=g)
        x[0, 3 % K] = float("nan")
        x[0, 5 % K] = float("nan")
        x[1, 2 % K] = float("inf")
        x[1, 7 % K] = float("-inf")
        x[2] = 0.0
        x[2, 1::2] = -0.0
        x[3, 0] = -0.0
        x[3, 1] = 0.0
        x[4] = float("nan")
        x[5] = 1.5
    else:
        raise ValueError(kind)
    return x.to(dtype)


@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [9, 64, 128, 256, 257, 1000])
@pytest.mark.parametrize("n_low,n_high", [(0, 1), (1, 0), (2, 2), (0, 4), (3, 1), (1, 7)])
def test_outlier_split_matches_cpu_bitwise(n_low, n_high, K, dtype, kind):
    if n_low + n_high >= K:
        pytest.skip("needs n_low + n_high < K")
    x = _vectors(7, K, kind, dtype, (n_low, n_high, K, str(dtype), kind))
    want = outlier_split(x, n_low, n_high)
    got = outlier_split(x.cuda(), n_low, n_high)
    for name, g_, w_ in zip(("dense", "index", "value"), got, want):
        assert g_.device.type == "cuda"
        _assert_bitwise(g_, w_, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outlier_split_layouts_and_reconstruction(dtype):
    """Leading dims, a non-contiguous input, the largest n, and the exact reconstruction."""
    g = _gen("layout", str(dtype))
    base = (torch.randn(2, 3, 96, 40, generator=g) * 2).to(dtype)
    x = base.transpose(-1, -2)  # [2, 3, 40, 96], not contiguous
    for n_low, n_high in [(2, 3), (0, 95), (95, 0), (40, 55)]:
        want = outlier_split(x, n_low, n_high)
        dense, index, value = outlier_split(x.cuda(), n_low, n_high)
        for name, g_, w_ in zip(("dense", "index", "value"), (dense, index, value), want):
            _assert_bitwise(g_, w_, f"{name} {n_low},{n_high}")
        back = dense.scatter(-1, index.long(), value)
        _assert_bitwise(back, x.contiguous(), "reconstruction")


def test_outlier_split_many_rows():
    """More vectors than the grid has warps (grid-stride loop)."""
    x = torch.randn(70000, 16, generator=_gen("rows")).half()
    want = outlier_split(x, 1, 2)
    got = outlier_split(x.cuda(), 1, 2)
    for name, g_, w_ in zip(("dense", "index", "value"), got, want):
        _assert_bitwise(g_, w_, name)


def test_outlier_split_opcheck():
    x = torch.randn(3, 5, 64, generator=_gen("opcheck")).cuda()
    torch.library.opcheck(outlier_split.default, (x, 2, 3))
    torch.library.opcheck(outlier_split.default, (x.half(), 0, 1))


def test_outlier_split_errors_name_the_op():
    x = torch.randn(4, 8).cuda()
    msg = r"kvq::outlier_split: n_low \+ n_high = 8 must be smaller"
    with pytest.raises(RuntimeError, match=msg):
        outlier_split(x, 4, 4)


# ---- dequant_matmul --------------------------------------------------------------------------


def _matmul_case(bits, group, axis, transpose_b, dtype, scale_dtype, M, lead, N, K, n_out, seed):
    g = _gen("mm", seed)
    b = torch.randn(*lead, N, K, generator=g) + 0.3 * torch.randn(*lead, 1, K, generator=g)
    codes, scale, zero = torch.ops.kvq.quantize(b, bits, group, axis, scale_dtype)
    a = torch.randn(*lead, M, K if transpose_b else N, generator=g).to(dtype)
    oi = ov = None
    if n_out:
        oi = torch.randint(0, K, (*lead, N, n_out), generator=g, dtype=torch.int16)
        oi[..., 0] = oi[..., -1]  # a duplicate: both add up, like scatter_add
        ov = (3 * torch.randn(*lead, N, n_out, generator=g)).to(dtype)
    return a, codes, scale, zero, oi, ov


def _check_matmul(a, codes, scale, zero, bits, group, axis, transpose_b, oi, ov):
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    want = dequant_matmul(a, codes, scale, zero, bits, group, axis, transpose_b, oi, ov)
    got = dequant_matmul(cuda(a), cuda(codes), cuda(scale), cuda(zero), bits, group, axis,
                         transpose_b, cuda(oi), cuda(ov))
    assert got.device.type == "cuda" and got.dtype == a.dtype and got.shape == want.shape
    b = ref.dequantize(codes, scale, zero, bits, group, axis, torch.float32)
    if oi is not None:
        b = b.scatter_add(-1, oi.long(), ov.float())
    b = b.double().transpose(-1, -2) if transpose_b else b.double()
    truth = a.double() @ b
    err_cuda = (got.cpu().double() - truth).abs().max().item()
    err_cpu = (want.double() - truth).abs().max().item()
    mag = (a.double().abs() @ b.abs()).max().item()
    tol = 2 * err_cpu + _EPS[a.dtype] * truth.abs().max().item() + 1e-6 * mag
    assert err_cuda <= tol, f"CUDA error {err_cuda} > {tol} (CPU error {err_cpu})"


MATMUL_CASES = [
    # bits, group, axis, transpose_b, M, lead, N, K, n_out
    (4, 32, -2, True, 1, (2, 3), 256, 128, 0),    # q . K^T over per-channel keys (decode)
    (2, 32, -2, True, 8, (2,), 96, 64, 3),        # ... a GQA group of queries, outliers
    (3, 16, -1, False, 1, (2, 3), 160, 128, 2),   # P . V over per-token values (decode)
    (8, 32, -1, False, 20, (1,), 64, 96, 1),      # ... more rows (M > 16: the 64-row tiles)
    (5, 8, -1, True, 70, (1,), 50, 24, 2),        # X_hat . W^T (groups along K), odd sizes
    (1, 16, -2, False, 17, (2,), 48, 70, 4),      # groups along N, K not a multiple of 8
    (7, 24, -2, True, 2, (), 48, 33, 0),          # rank 2, odd K
    (6, 32, -1, False, 1, (1,), 4096, 64, 2),     # long reduction: split over the reduction
    (4, 64, -1, True, 1, (1,), 300, 4096, 0),     # long rows
]


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MATMUL_CASES,
                         ids=[f"b{c[0]}g{c[1]}ax{c[2]}{'T' if c[3] else 'N'}M{c[4]}" for c in MATMUL_CASES])
def test_dequant_matmul_within_bound(case, dtype, scale_dtype):
    bits, group, axis, tb, M, lead, N, K, n_out = case
    seed = (case, str(dtype), str(scale_dtype))
    a, codes, scale, zero, oi, ov = _matmul_case(bits, group, axis, tb, dtype, scale_dtype, M,
                                                 lead, N, K, n_out, seed)
    _check_matmul(a, codes, scale, zero, bits, group, axis, tb, oi, ov)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("axis", [-1, -2])
def test_dequant_matmul_every_width(bits, axis):
    a, codes, scale, zero, oi, ov = _matmul_case(bits, 16, axis, axis == -2, torch.float32,
                                                 torch.float16, 3, (2,), 64, 48, 2,
                                                 ("w", bits, axis))
    _check_matmul(a, codes, scale, zero, bits, 16, axis, axis == -2, oi, ov)


def test_dequant_matmul_noncontiguous_inputs():
    a, codes, scale, zero, oi, ov = _matmul_case(4, 32, -2, True, torch.float16, torch.float16, 4,
                                                 (2,), 64, 64, 2, "nc")
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not a_nc.is_contiguous()
    _check_matmul(a_nc, codes, scale, zero, 4, 32, -2, True, oi, ov)


def test_dequant_matmul_empty_rows():
    a, codes, scale, zero, _, _ = _matmul_case(4, 32, -2, True, torch.float32, torch.float16, 1,
                                               (2,), 64, 64, 0, "empty")
    out = dequant_matmul(a[:, :0].cuda(), codes.cuda(), scale.cuda(), zero.cuda(), 4, 32, -2, True)
    assert out.shape == (2, 0, 64)


@pytest.mark.parametrize("axis,transpose_b", [(-2, True), (-1, False)])
def test_dequant_matmul_opcheck(axis, transpose_b):
    a, codes, scale, zero, oi, ov = _matmul_case(3, 16, axis, transpose_b, torch.float32,
                                                 torch.float16, 2, (2,), 32, 48, 2, ("op", axis))
    args = tuple(t.cuda() for t in (a, codes, scale, zero))
    torch.library.opcheck(dequant_matmul.default, (*args, 3, 16, axis, transpose_b))
    torch.library.opcheck(dequant_matmul.default,
                          (*args, 3, 16, axis, transpose_b, oi.cuda(), ov.cuda()))


def test_dequant_matmul_compiles():
    a, codes, scale, zero, oi, ov = _matmul_case(4, 32, -1, False, torch.float16, torch.float16, 2,
                                                 (2,), 64, 64, 1, "compile")
    args = [t.cuda() for t in (a, codes, scale, zero, oi, ov)]

    def fn(a, c, s, z, i, v):
        return dequant_matmul(a * 2, c, s, z, 4, 32, -1, False, i, v) + 1

    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)


def test_dequant_matmul_device_mismatch_is_an_error():
    a, codes, scale, zero, _, _ = _matmul_case(4, 32, -2, True, torch.float32, torch.float16, 1,
                                               (2,), 64, 64, 0, "dev")
    msg = r"kvq::dequant_matmul: codes is on cpu but a is on cuda"
    with pytest.raises(RuntimeError, match=msg):
        dequant_matmul(a.cuda(), codes, scale, zero, 4, 32, -2, True)


def test_dequant_matmul_matches_dequantize_then_matmul_on_kv_shapes():
    """The fused op against the unfused CUDA path on a decode-shaped problem (both on the GPU)."""
    g = _gen("fused")
    keys = torch.randn(1, 8, 1024, 128, generator=g).cuda().half()
    codes, scale, zero = torch.ops.kvq.quantize(keys, 2, 32, -2)
    q = torch.randn(1, 8, 4, 128, generator=g).cuda().half()
    fused = dequant_matmul(q, codes, scale, zero, 2, 32, -2, True)
    k_hat = torch.ops.kvq.dequantize(codes, scale, zero, 2, 32, -2, torch.float32)
    unfused = q.float() @ k_hat.transpose(-1, -2)
    torch.testing.assert_close(fused.float(), unfused, rtol=2e-3, atol=2e-3 * math.sqrt(128))
