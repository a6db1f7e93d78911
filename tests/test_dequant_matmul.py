"""Tests of kvq::dequant_matmul (CPU kernel, fake, reference).

(a) reference sweep (axis x transpose_b x bits 1-8 x group size x dtype x outliers) with a
    FlashAttention-style bound: the kernel's error against a float64 ground truth is at most
    2x the error of the same-precision reference (plus a tiny atol),
(b) hypothesis: fused == dequantize-then-matmul, (c) opcheck, (d) torch.compile,
(e) bad inputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torchkvq
from torchkvq import reference as ref

from conftest import random_tensor
from store_factory import assert_flash_close, assert_same

dequant_matmul = torch.ops.kvq.dequant_matmul
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_case(*, lead, N, K, M, bits, group_size, axis, transpose_b, dtype, n_out=0,
              scale_dtype=torch.float16, seed=0):
    """(args, B_hat f64) for ``a @ B_hat^T`` (transpose_b) or ``a @ B_hat`` with B [*lead, N, K]
    quantized along `axis` (-2: groups along N, -1: groups along K)."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(*lead, N, K, generator=gen) + 0.5 * torch.randn(*lead, 1, K, generator=gen)
    codes, scale, zero = torch.ops.kvq.quantize(b, bits, group_size, axis, scale_dtype)
    a = torch.randn(*lead, M, K if transpose_b else N, generator=gen).to(dtype)
    oi = ov = None
    if n_out:
        oi = torch.rand(*lead, N, K, generator=gen).argsort(-1)[..., :n_out].to(torch.int16)
        ov = (4 * torch.randn(*lead, N, n_out, generator=gen)).to(dtype)
    args = (a, codes, scale, zero, bits, group_size, axis, transpose_b, oi, ov)
    return args, b_hat_f64(args)


def b_hat_f64(args) -> torch.Tensor:
    """The dequantized operand (+ outliers) in float64, from the codes."""
    a, codes, scale, zero, bits, group_size, axis, transpose_b, oi, ov = args
    ax = axis % codes.dim()
    q = ref.unpack_codes(codes.movedim(ax, -1), bits).double()
    q = q.reshape(*q.shape[:-1], -1, group_size)
    s = scale.movedim(ax, -1).double()[..., None]
    z = zero.movedim(ax, -1).double()[..., None]
    b = (q * s + z).flatten(-2).movedim(-1, ax)
    if oi is not None:
        b = b.scatter_add(-1, oi.long(), ov.double())
    return b


def truth_f64(args, b):
    a, transpose_b = args[0], args[7]
    return a.double() @ (b.transpose(-1, -2) if transpose_b else b)


def check(args, b):
    got = dequant_matmul(*args)
    want = ref.dequant_matmul(*args)
    a = args[0]
    assert got.dtype == a.dtype and got.shape == want.shape
    assert_flash_close(got, want, truth_f64(args, b), "out")
    return got


# ---------------------------------------------------------------------------------------------
# (a) reference sweep
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("transpose_b", [True, False], ids=["a@Bt", "a@B"])
@pytest.mark.parametrize("axis", [-2, -1], ids=["rows", "cols"])
def test_matches_reference(axis, transpose_b, bits, group_size, dtype, outliers):
    seed = bits * 1000 + group_size * 10 + FLOATS.index(dtype) * 3 + outliers + 2 * (axis == -1)
    if axis == -2:  # groups along N: N a multiple of G, K odd
        N, K = 2 * group_size, 37
    else:  # groups along K: N odd
        N, K = 7, 2 * group_size
    args, b = make_case(lead=[2, 3], N=N, K=K, M=5, bits=bits, group_size=group_size,
                        axis=axis, transpose_b=transpose_b, dtype=dtype,
                        n_out=3 if outliers else 0,
                        scale_dtype=(torch.float16, torch.float32)[seed % 2], seed=seed)
    check(args, b)


@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize(
    "lead, N, K, M, group_size, axis, transpose_b",
    [
        ([], 64, 24, 1, 32, -2, True),  # rank 2, one query row (decode)
        ([1, 8], 128, 128, 1, 32, -2, True),  # KIVI keys: q·K̂ᵀ per head
        ([1, 8], 96, 128, 1, 32, -1, False),  # KIVI values: P·V̂ per head
        ([2], 33, 256, 9, 64, -1, True),  # X̂·W style: N not a multiple of the row tile
        ([2, 2, 2], 16, 8, 3, 8, -2, False),  # rank 5
        ([3], 256, 40, 2, 128, -2, False),  # long N accumulated over tiles
    ],
)
def test_shapes(lead, N, K, M, group_size, axis, transpose_b, dtype):
    for bits, n_out in ((2, 0), (3, 2), (8, 1)):
        args, b = make_case(lead=lead, N=N, K=K, M=M, bits=bits, group_size=group_size,
                            axis=axis, transpose_b=transpose_b, dtype=dtype, n_out=n_out,
                            seed=N + K + bits)
        check(args, b)


def test_outliers_are_added_not_replaced():
    """Zero codes (constant B) plus known outliers: the result is computable by hand."""
    codes = torch.zeros(1, 16, 4, dtype=torch.uint8)  # 16 rows x 8 cols at 4 bits along K
    scale = torch.ones(1, 16, 1, dtype=torch.float32)
    zero = torch.full((1, 16, 1), 0.5)
    oi = torch.tensor([[[3, 7]] * 16], dtype=torch.int16)
    ov = torch.tensor([[[2.0, -1.0]] * 16])
    a = torch.ones(1, 1, 16)
    out = dequant_matmul(a, codes, scale, zero, 4, 8, -1, False, oi, ov)  # sum over rows
    want = torch.full((1, 1, 8), 8.0)
    want[..., 3] += 32.0
    want[..., 7] -= 16.0
    assert_same(out, want)
    out_t = dequant_matmul(torch.ones(1, 2, 8), codes, scale, zero, 4, 8, -1, True, oi, ov)
    assert_same(out_t, torch.full((1, 2, 16), 4.0 + 2.0 - 1.0))


def test_non_contiguous_inputs():
    args, b = make_case(lead=[2, 3], N=64, K=40, M=4, bits=3, group_size=32, axis=-2,
                        transpose_b=True, dtype=torch.float32, n_out=2, seed=8)
    a, codes, scale, zero, *rest = args
    nc = lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    args2 = (nc(a), nc(codes), nc(scale), nc(zero), *rest[:4], nc(rest[4]), nc(rest[5]))
    assert not args2[0].is_contiguous() and not args2[1].is_contiguous()
    assert_same(dequant_matmul(*args2), dequant_matmul(*args))


def test_wrapper_matches_op():
    args, _ = make_case(lead=[2], N=32, K=16, M=3, bits=4, group_size=32, axis=-2,
                        transpose_b=True, dtype=torch.float16, n_out=1, seed=9)
    assert_same(torchkvq.ops.dequant_matmul(*args), dequant_matmul(*args))


# ---------------------------------------------------------------------------------------------
# (b) hypothesis: fused == dequantize-then-matmul
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


@given(
    bits=st.integers(1, 8),
    group_size=st.sampled_from([8, 16, 32, 64]),
    axis=st.sampled_from([-2, -1]),
    transpose_b=st.booleans(),
    dtype=st.sampled_from(FLOATS),
    scale_dtype=st.sampled_from([torch.float16, torch.float32]),
    lead=st.lists(st.integers(1, 3), max_size=2),
    groups=st.integers(1, 3),
    other=st.integers(1, 40),
    M=st.integers(1, 6),
    n_out=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fused_equals_dequantize_then_matmul(bits, group_size, axis, transpose_b, dtype,
                                                      scale_dtype, lead, groups, other, M, n_out,
                                                      seed):
    N, K = (groups * group_size, other) if axis == -2 else (other, groups * group_size)
    n_out = min(n_out, K)
    args, _ = make_case(lead=lead, N=N, K=K, M=M, bits=bits, group_size=group_size, axis=axis,
                        transpose_b=transpose_b, dtype=dtype, n_out=n_out,
                        scale_dtype=scale_dtype, seed=seed)
    a, codes, scale, zero, _, _, _, _, oi, ov = args
    b = torch.ops.kvq.dequantize(codes, scale, zero, bits, group_size, axis, torch.float32)
    if oi is not None:
        b = b.scatter_add(-1, oi.long(), ov.float())
    want = a.float() @ (b.transpose(-1, -2) if transpose_b else b)
    got = dequant_matmul(*args)
    assert got.dtype == dtype
    rtol, atol = TOL[dtype]
    scale_ = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * scale_)


# ---------------------------------------------------------------------------------------------
# (c) opcheck, (d) torch.compile
# ---------------------------------------------------------------------------------------------

OPCHECK = [
    # lead, N, K, M, bits, group_size, axis, transpose_b, dtype, n_out, scale_dtype
    ([2], 64, 24, 1, 2, 32, -2, True, torch.float32, 0, torch.float16),
    ([1, 2], 5, 64, 3, 4, 32, -1, False, torch.float16, 2, torch.float32),
    ([], 16, 8, 2, 8, 8, -2, False, torch.bfloat16, 1, torch.float16),
    ([2], 7, 64, 4, 3, 64, -1, True, torch.float32, 3, torch.float32),
]


@pytest.mark.parametrize("lead, N, K, M, bits, group_size, axis, transpose_b, dtype, n_out, sdt", OPCHECK)
def test_opcheck(lead, N, K, M, bits, group_size, axis, transpose_b, dtype, n_out, sdt):
    args, _ = make_case(lead=lead, N=N, K=K, M=M, bits=bits, group_size=group_size, axis=axis,
                        transpose_b=transpose_b, dtype=dtype, n_out=n_out, scale_dtype=sdt, seed=3)
    torch.library.opcheck(dequant_matmul.default, args)


def test_compile_aot_eager():
    torch._dynamo.reset()

    def fn(q, k, v):  # KIVI-style attention over per-channel keys / per-token values
        kc, ks, kz = torch.ops.kvq.quantize(k, 2, 32, -2, None)
        vc, vs, vz = torch.ops.kvq.quantize(v, 4, 32, -1, None)
        s = torch.ops.kvq.dequant_matmul(q, kc, ks, kz, 2, 32, -2, True, None, None)
        p = torch.softmax(s * q.shape[-1] ** -0.5, -1)
        return torch.ops.kvq.dequant_matmul(p, vc, vs, vz, 4, 32, -1, False, None, None), s

    q = random_tensor([1, 2, 3, 64], torch.float32, 1)
    k = random_tensor([1, 2, 96, 64], torch.float32, 2)
    v = random_tensor([1, 2, 96, 64], torch.float32, 3)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    for g, w in zip(got, fn(q, k, v)):
        assert_same(g, w)


def test_compile_aot_eager_with_outliers():
    torch._dynamo.reset()

    def fn(a, x):  # outliers split off x, x's dense part quantized, product with outliers
        dense, idx, val = torch.ops.kvq.outlier_split(x, 1, 1)
        c, s, z = torch.ops.kvq.quantize(dense, 3, 32, -1, torch.float32)
        return torch.ops.kvq.dequant_matmul(a, c, s, z, 3, 32, -1, True, idx, val)

    a = random_tensor([2, 4, 64], torch.float16, 4)
    x = random_tensor([2, 24, 64], torch.float16, 5)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(a, x)
    assert_same(got, fn(a, x))


# ---------------------------------------------------------------------------------------------
# (e) bad inputs: the kernel and the fake raise the same message
# ---------------------------------------------------------------------------------------------


def _base():
    args, _ = make_case(lead=[2], N=64, K=24, M=3, bits=4, group_size=32, axis=-2,
                        transpose_b=True, dtype=torch.float32, n_out=2, seed=1)
    return list(args)


def _with(**changes):
    names = ["a", "codes", "scale", "zero", "bits", "group_size", "axis", "transpose_b",
             "outlier_index", "outlier_value"]

    def make():
        args = _base()
        for k, f in changes.items():
            i = names.index(k)
            args[i] = f(args[i], args)
        return args

    return make


OP = "kvq::dequant_matmul: "
# The codes/scale/zero rules are shared with kvq::dequantize, but the messages name the op called.
DQ = OP
BAD = {
    "a_float64": (_with(a=lambda a, _: a.double()), OP + "a must be float32, float16 or bfloat16, got "),
    "a_int": (_with(a=lambda a, _: a.int()), OP + "a must be float32, float16 or bfloat16, got "),
    "codes_rank1": (_with(codes=lambda c, _: c.flatten()), OP + "codes must have rank >= 2, got 1"),
    "axis_leading": (_with(axis=lambda a, _: 0),
                     OP + r"axis must be one of the last two dimensions \(-1: groups along "
                     r"columns, -2: groups along rows\), got 0"),
    "axis_leading_negative": (_with(axis=lambda a, _: -3),
                              OP + r"axis must be one of the last two dimensions .*got -3"),
    "axis_out_of_range": (_with(axis=lambda a, _: 3), OP + r"axis must be in \[-3, 2\]"),
    "codes_dtype": (_with(codes=lambda c, _: c.to(torch.int8)), DQ + "codes must be uint8, got "),
    "bits_9": (_with(bits=lambda b, _: 9), DQ + r"bits must be in \[1, 8\], got 9"),
    "scale_shape": (_with(scale=lambda s, _: s[:, :1]), DQ + r"scale must have shape \[2, 2, 24\]"),
    "zero_dtype": (_with(zero=lambda z, _: z.float()), DQ + "zero must have the dtype of scale"),
    "leading_dims": (_with(a=lambda a, _: torch.randn(3, 3, 24)),
                     OP + r"a must have the leading dimensions (\[2\] )?of the packed operand"),
    "a_rank": (_with(a=lambda a, _: torch.randn(3, 24)),
               OP + r"a must have the leading dimensions (\[2\] )?of the packed operand"),
    "inner_dim": (_with(a=lambda a, _: torch.randn(2, 3, 25)),
                  OP + r"a.size\(-1\) = 25 must equal the packed operand's columns \(24\) for "
                  "transpose_b=True"),
    "inner_dim_no_transpose": (_with(transpose_b=lambda t, _: False),
                               OP + r"a.size\(-1\) = 24 must equal the packed operand's rows "
                               r"\(64\) for transpose_b=False"),
    "index_without_value": (_with(outlier_value=lambda v, _: None),
                            OP + "outlier_index and outlier_value must be given together"),
    "value_without_index": (_with(outlier_index=lambda i, _: None),
                            OP + "outlier_index and outlier_value must be given together"),
    "index_dtype": (_with(outlier_index=lambda i, _: i.long()), OP + "outlier_index must be int16, got "),
    "value_dtype": (_with(outlier_value=lambda v, _: v.half()),
                    OP + "outlier_value must have a's dtype "),
    "index_shape": (_with(outlier_index=lambda i, _: i[:, :32], outlier_value=lambda v, _: v[:, :32]),
                    OP + r"outlier_index must have shape \[2, 64"),
    "value_shape": (_with(outlier_value=lambda v, _: v[..., :1]),
                    OP + r"outlier_value must have the shape of outlier_index \[2, 64, 2\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rejects(case):
    make, msg = BAD[case]
    with pytest.raises(RuntimeError, match="^" + msg):
        dequant_matmul(*make())


@pytest.mark.parametrize("case", list(BAD))
def test_fake_rejects(case):
    make, msg = BAD[case]
    args = make()
    with pytest.raises(RuntimeError, match="^" + msg):
        with FakeTensorMode() as mode:
            dequant_matmul(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


@pytest.mark.parametrize("case", list(BAD))
def test_fake_message_equals_kernel_message(case):
    args = BAD[case][0]()
    with pytest.raises(RuntimeError) as kernel:
        dequant_matmul(*args)
    with pytest.raises(RuntimeError) as fake:
        with FakeTensorMode() as mode:
            dequant_matmul(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert str(kernel.value).splitlines()[0] == str(fake.value).splitlines()[0]
