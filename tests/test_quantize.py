"""Tests of kvq::quantize / kvq::dequantize (CPU kernel, fakes, reference).

(a) bit-exact equality with torchkvq.reference on parametrized sweeps,
(b) hypothesis properties (round-trip bound, packing, constant groups, code range, strides),
(c) the NaN / Inf / overflow policy,
(d) torch.library.opcheck,
(e) torch.compile(fullgraph=True),
(f) argument validation messages (kernel and fake).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torchkvq
from torchkvq import reference as ref

from conftest import random_tensor

quantize = torch.ops.kvq.quantize
dequantize = torch.ops.kvq.dequantize

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
SCALES = [torch.float16, torch.float32]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality (NaN matches NaN, -0.0 does not match +0.0)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.dtype in _INT_VIEW:
        an, en = actual.isnan(), expected.isnan()
        assert torch.equal(an, en), "NaN positions differ"
        iv = _INT_VIEW[actual.dtype]
        a = actual.contiguous().view(iv).masked_fill(an, 0)
        e = expected.contiguous().view(iv).masked_fill(en, 0)
        bad = (a != e).nonzero()
        assert bad.numel() == 0, (
            f"{bad.shape[0]} of {a.numel()} elements differ, first at {bad[0].tolist()}: "
            f"{actual[tuple(bad[0])].item()!r} vs {expected[tuple(bad[0])].item()!r}"
        )
    else:
        assert torch.equal(actual, expected), (actual != expected).nonzero()[:5].tolist()


def assert_same_outputs(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_same(a, e)


def grouped(t: torch.Tensor, axis: int, per_group: int) -> torch.Tensor:
    """Move `axis` last and split it into (groups, per_group)."""
    t = t.movedim(axis, -1)
    return t.reshape(*t.shape[:-1], t.shape[-1] // per_group, per_group)


def unpacked_codes(codes: torch.Tensor, bits: int, axis: int, group_size: int) -> torch.Tensor:
    """Kernel codes as one uint8 per element, shaped (..., groups, group_size)."""
    return grouped(ref.unpack_codes(codes.movedim(axis, -1), bits), -1, group_size)


# ---------------------------------------------------------------------------------------------
# (a) reference equality
# ---------------------------------------------------------------------------------------------


def kv_shape(axis: int, group_size: int) -> list[int]:
    """Rank-4 [batch, heads, tokens, head_dim] with odd sizes off the grouped axis and an odd
    number of groups on it; head_dim 37 = 2*16+5 exercises the vector body and its tail."""
    if axis == 2:  # per-channel (keys): groups along tokens
        return [2, 3, 3 * group_size, 37]
    return [1, 3, 7, 3 * group_size]  # per-token (values): groups along channels


def check_against_reference(x, bits, group_size, axis, scale_dtype, out_dtype=None):
    out_dtype = out_dtype or x.dtype
    got = quantize(x, bits, group_size, axis, scale_dtype)
    want = ref.quantize(x, bits, group_size, axis, scale_dtype)
    codes, scale, zero = got
    ax = axis % x.dim()
    assert codes.dtype == torch.uint8 and codes.is_contiguous()
    assert codes.shape[ax] == x.shape[ax] * bits // 8
    assert scale.shape[ax] == zero.shape[ax] == x.shape[ax] // group_size
    assert scale.dtype == zero.dtype == (scale_dtype or torch.float16)
    assert_same_outputs(got, want)
    x_hat = dequantize(codes, scale, zero, bits, group_size, axis, out_dtype)
    assert_same(x_hat, ref.dequantize(*want, bits, group_size, axis, out_dtype))
    assert x_hat.shape == x.shape
    return got, x_hat


@pytest.mark.parametrize("scale_dtype", SCALES, ids=dt_id)
@pytest.mark.parametrize("axis", [2, -1], ids=["per_channel", "per_token"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize("group_size", [8, 32, 64, 128])
@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_reference(bits, group_size, dtype, axis, scale_dtype):
    seed = (bits * 131 + group_size) * 17 + FLOATS.index(dtype) * 3 + (axis == 2)
    # A non-zero offset makes the fp16 rounding of zero (the group minimum) matter.
    offset = [0.0, 2.5, -7.0][seed % 3]
    x = random_tensor(kv_shape(axis, group_size), dtype, seed, scale=1.5, offset=offset)
    check_against_reference(x, bits, group_size, axis, scale_dtype)


@pytest.mark.parametrize("axis", [2, -1], ids=["per_channel", "per_token"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_reference_on_rounding_ties(bits, dtype, axis):
    """Every group holds 0 and 2^b-1 (so scale == 1, zero == 0) and values on a half-integer
    grid: half the elements sit exactly on a rounding tie (round half to even)."""
    qmax = (1 << bits) - 1
    shape = kv_shape(axis, 16)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randint(0, 2 * qmax + 1, shape, generator=gen).float() / 2
    g = grouped(x, axis, 16)  # a view: pin the extremes of every group
    g[..., 0] = 0.0
    g[..., 1] = qmax
    x = x.to(dtype)
    (codes, scale, zero), _ = check_against_reference(x, bits, 16, axis, torch.float16)
    assert bool((scale == 1).all()) and bool((zero == 0).all())
    # Independent of the reference: ties round to the even code.
    want = torch.round(grouped(x.float(), axis, 16)).to(torch.uint8)
    assert torch.equal(unpacked_codes(codes, bits, axis % 4, 16), want)


@pytest.mark.parametrize(
    "shape, axis, group_size",
    [
        ([64], 0, 32),
        ([64], -1, 8),
        ([40, 3], 0, 8),
        ([3, 48, 5], 1, 16),
        ([2, 3, 5, 7, 32], 4, 32),
        ([2, 16, 3, 5, 7], 1, 16),
        ([24, 2, 3, 5], 0, 24),
    ],
)
@pytest.mark.parametrize("bits", [1, 3, 4, 6])
def test_matches_reference_other_ranks_and_axes(shape, axis, group_size, bits):
    x = random_tensor(shape, torch.float32, sum(shape) + bits, offset=1.0)
    check_against_reference(x, bits, group_size, axis, torch.float16)
    check_against_reference(x, bits, group_size, axis % len(shape) - len(shape), torch.float32)


@pytest.mark.parametrize("scale_dtype", SCALES, ids=dt_id)
@pytest.mark.parametrize("in_dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize("out_dtype", FLOATS, ids=dt_id)
def test_dequantize_to_any_dtype(in_dtype, out_dtype, scale_dtype):
    x = random_tensor([2, 3, 64, 32], in_dtype, 5, scale=4.0)
    for axis, bits in ((2, 2), (-1, 5)):
        check_against_reference(x, bits, 32, axis, scale_dtype, out_dtype)


def test_default_scale_dtype_is_float16_and_wrappers_match():
    x = random_tensor([1, 2, 64, 16], torch.bfloat16, 9)
    default = quantize(x, 4, 32, 2)
    assert default[1].dtype == torch.float16
    assert_same_outputs(default, quantize(x, 4, 32, 2, torch.float16))
    assert_same_outputs(torchkvq.ops.quantize(x, 4, 32, 2), default)
    assert_same(
        torchkvq.ops.dequantize(*default, 4, 32, 2, torch.bfloat16),
        dequantize(*default, 4, 32, 2, torch.bfloat16),
    )
    assert torchkvq.ops.dequantize(*default, 4, 32, 2).dtype == torch.float32


def test_results_do_not_depend_on_thread_count():
    x = random_tensor([2, 4, 512, 128], torch.float16, 11)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [quantize(x, 3, 32, ax) for ax in (2, -1)]
        one_hat = [dequantize(*q, 3, 32, ax, torch.float32) for q, ax in zip(one, (2, -1))]
    finally:
        torch.set_num_threads(n)
    many = [quantize(x, 3, 32, ax) for ax in (2, -1)]
    for a, b in zip(one, many):
        assert_same_outputs(a, b)
    for a, q, ax in zip(one_hat, many, (2, -1)):
        assert_same(a, dequantize(*q, 3, 32, ax, torch.float32))


# ---------------------------------------------------------------------------------------------
# (b) hypothesis properties
# ---------------------------------------------------------------------------------------------

BOUND = 3e4  # keeps every group's range inside float16 (tested separately in (c))


@st.composite
def quant_cases(draw, scale_dtypes=tuple(SCALES)):
    """(x, bits, group_size, axis, scale_dtype) with finite x of any rank 1-4."""
    bits = draw(st.integers(1, 8))
    group_size = draw(st.sampled_from([8, 16, 32, 64]))
    rank = draw(st.integers(1, 4))
    ax = draw(st.integers(0, rank - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[ax] = group_size * draw(st.integers(1, 3))
    numel = math.prod(shape)
    dtype = draw(st.sampled_from(FLOATS))
    if numel <= 192 and draw(st.booleans()):
        vals = draw(
            st.lists(
                st.floats(-BOUND, BOUND, width=32, allow_subnormal=True),
                min_size=numel,
                max_size=numel,
            )
        )
        x = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    else:
        seed = draw(st.integers(0, 2**31 - 1))
        mag = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0, 3e3]))
        offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1000.0, -1e4]))
        x = random_tensor(shape, torch.float32, seed, scale=mag, offset=offset)
    x = x.clamp(-BOUND, BOUND).to(dtype)
    axis = ax - rank if draw(st.booleans()) else ax
    return x, bits, group_size, axis, draw(st.sampled_from(scale_dtypes))


@given(case=quant_cases())
def test_round_trip_error_bound(case):
    """|x - x_hat| <= s/2 + |z - min| + (2^b-1)|s - (max-min)/(2^b-1)| per group, where s, z
    are the stored scale and zero: half a step plus what rounding s and z to their dtype costs."""
    x, bits, group_size, axis, scale_dtype = case
    codes, scale, zero = quantize(x, bits, group_size, axis, scale_dtype)
    assert_same_outputs((codes, scale, zero), ref.quantize(x, bits, group_size, axis, scale_dtype))
    assert bool(scale.isfinite().all()) and bool(zero.isfinite().all())
    x_hat = dequantize(codes, scale, zero, bits, group_size, axis, torch.float32)

    qmax = (1 << bits) - 1
    g = grouped(x.double(), axis, group_size)
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = grouped(scale.double(), axis, 1)
    z = grouped(zero.double(), axis, 1)
    bound = s / 2 + (z - mn).abs() + qmax * (s - (mx - mn) / qmax).abs()
    slack = 8 * torch.finfo(torch.float32).eps * (mn.abs() + mx.abs() + qmax * s) + 1e-30
    err = (grouped(x_hat.double(), axis, group_size) - g).abs()
    excess = err - (bound + slack)
    assert bool((excess <= 0).all()), f"max excess {excess.max().item():.3g}"


@given(
    bits=st.integers(1, 8),
    lead=st.lists(st.integers(1, 3), max_size=2),
    n_eights=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, lead, n_eights, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, [*lead, 8 * n_eights], generator=gen, dtype=torch.uint8)
    packed = ref.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == torch.Size([*lead, bits * n_eights])
    assert torch.equal(ref.unpack_codes(packed, bits), codes)
    # The documented layout, bit by bit: element j holds stream bits [j*b, (j+1)*b), and
    # stream bit k is bit k % 8 of byte k // 8 (LSB first).
    flat_codes, flat_packed = codes.reshape(-1, codes.shape[-1]), packed.reshape(-1, packed.shape[-1])
    for row_c, row_p in zip(flat_codes.tolist(), flat_packed.tolist()):
        stream = [(c >> i) & 1 for c in row_c for i in range(bits)]
        want = [sum(stream[8 * k + i] << i for i in range(8)) for k in range(len(row_p))]
        assert row_p == want
    # Every byte pattern is a valid stream: unpack then pack gives it back.
    raw = torch.randint(0, 256, [*lead, bits * n_eights], generator=gen, dtype=torch.uint8)
    assert torch.equal(ref.pack_codes(ref.unpack_codes(raw, bits), bits), raw)


@st.composite
def constant_group_cases(draw):
    bits = draw(st.integers(1, 8))
    group_size = draw(st.sampled_from([8, 16, 32]))
    axis = draw(st.sampled_from([2, -1]))
    n_groups = draw(st.integers(1, 3))
    other = draw(st.integers(1, 3))
    scale_dtype = draw(st.sampled_from(SCALES))
    # Constants representable in the scale dtype: fp16 x with fp16 scales, any x with fp32.
    dtype = torch.float16 if scale_dtype == torch.float16 else draw(st.sampled_from(FLOATS))
    width = 16 if dtype == torch.float16 else 32
    limit = torch.finfo(torch.bfloat16).max if dtype == torch.bfloat16 else None  # no bf16 Inf
    consts = draw(
        st.lists(
            st.floats(-limit if limit else None, limit, allow_nan=False, allow_infinity=False, width=width),
            min_size=n_groups * other,
            max_size=n_groups * other,
        )
    )
    c = torch.tensor(consts, dtype=torch.float32).to(dtype).reshape(1, 1, other, n_groups, 1)
    x = c.expand(1, 1, other, n_groups, group_size).reshape(1, 1, other, n_groups * group_size)
    if axis == 2:
        x = x.transpose(2, 3)
    return x.contiguous(), bits, group_size, axis, scale_dtype


@given(case=constant_group_cases())
def test_constant_groups_are_exact(case):
    x, bits, group_size, axis, scale_dtype = case
    codes, scale, zero = quantize(x, bits, group_size, axis, scale_dtype)
    assert bool((scale == 0).all())
    assert not bool(codes.any())
    # Exact in value (a -0.0 constant comes back as +0.0: 0 * 0 + -0.0 == +0.0).
    x_hat = dequantize(codes, scale, zero, bits, group_size, axis, x.dtype)
    assert x_hat.dtype == x.dtype and torch.equal(x_hat, x)
    assert torch.equal(dequantize(codes, scale, zero, bits, group_size, axis, torch.float32), x.float())


@given(case=quant_cases(scale_dtypes=(torch.float32,)))
def test_codes_in_range_and_span_it(case):
    """Unpacked codes lie in [0, 2^b-1]; with an exact (fp32) scale the minimum of a group
    encodes as 0 and its maximum as 2^b-1."""
    x, bits, group_size, axis, scale_dtype = case
    qmax = (1 << bits) - 1
    codes, scale, zero = quantize(x, bits, group_size, axis, scale_dtype)
    q = unpacked_codes(codes, bits, axis % x.dim(), group_size)
    assert int(q.max()) <= qmax
    g = grouped(x.float(), axis, group_size)
    rng = g.amax(-1) - g.amin(-1)
    ok = rng > 1e-30  # constant groups are all code 0, tested elsewhere
    q_min = q.gather(-1, g.argmin(-1, keepdim=True)).squeeze(-1)
    q_max = q.gather(-1, g.argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((q_min[ok] == 0).all())
    assert bool((q_max[ok] == qmax).all())
    assert bool((q[~ok] == 0).all())


def _strided_view(draw, dtype):
    """A non-contiguous view built from a contiguous base by transposes, step slices,
    offset narrows and stride-0 expands."""
    base = [draw(st.sampled_from([1, 2, 3, 16, 32, 48])) for _ in range(4)]
    x = random_tensor(base, dtype, draw(st.integers(0, 2**31 - 1)), scale=3.0)
    for op in draw(st.lists(st.sampled_from(["T", "step", "narrow", "expand"]), min_size=1, max_size=3)):
        d = draw(st.integers(0, 3))
        if op == "T":
            x = x.transpose(d, draw(st.integers(0, 3)))
        elif op == "step" and x.shape[d] >= 2:
            x = x[(slice(None),) * d + (slice(None, None, 2),)]
        elif op == "narrow" and x.shape[d] > 8:
            start = draw(st.sampled_from([1, 8]))
            x = x.narrow(d, start, x.shape[d] - start)
        elif op == "expand" and x.shape[d] == 1:
            x = x.expand(*x.shape[:d], 16, *x.shape[d + 1 :])
    return x


@given(data=st.data())
def test_arbitrary_strides_match_contiguous(data):
    dtype = data.draw(st.sampled_from(FLOATS))
    x = _strided_view(data.draw, dtype)
    axes = [d for d in range(4) if x.shape[d] % 8 == 0]
    assume(axes and not x.is_contiguous())
    axis = data.draw(st.sampled_from(axes))
    group_size = data.draw(st.sampled_from([g for g in (8, 16) if x.shape[axis] % g == 0]))
    bits = data.draw(st.integers(1, 8))
    scale_dtype = data.draw(st.sampled_from(SCALES))
    got = quantize(x, bits, group_size, axis, scale_dtype)
    assert_same_outputs(got, quantize(x.contiguous(), bits, group_size, axis, scale_dtype))
    assert_same_outputs(got, ref.quantize(x, bits, group_size, axis, scale_dtype))

    # Non-contiguous codes/scale/zero: every other element of a twice-as-long buffer.
    def spaced(t):
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]

    want = dequantize(*got, bits, group_size, axis, dtype)
    nc = [spaced(t) for t in got]
    assert_same(dequantize(*nc, bits, group_size, axis, dtype), want)
    assert_same(dequantize(*[t.transpose(0, 1).contiguous().transpose(0, 1) for t in got],
                           bits, group_size, axis, dtype), want)


# ---------------------------------------------------------------------------------------------
# (c) NaN / Inf / overflow policy
# ---------------------------------------------------------------------------------------------


def check_bad_group(x, bad_index, bits, group_size, axis, scale_dtype, clean_value=0.0):
    """x[bad_index] poisons its group; every other group must equal that of x with a clean
    value there."""
    clean = x.clone()
    clean[bad_index] = clean_value
    codes, scale, zero = quantize(x, bits, group_size, axis, scale_dtype)
    assert_same_outputs((codes, scale, zero), ref.quantize(x, bits, group_size, axis, scale_dtype))
    c_codes, c_scale, c_zero = quantize(clean, bits, group_size, axis, scale_dtype)
    ax = axis % x.dim()
    # Which group holds the bad element: mark it and follow it through the grouping.
    marker = torch.zeros(x.shape, dtype=torch.bool)
    marker[bad_index] = True
    is_bad = grouped(marker, ax, group_size).any(-1)
    assert int(is_bad.sum()) == 1

    s, z, cs, cz = (grouped(t, ax, 1).squeeze(-1) for t in (scale, zero, c_scale, c_zero))
    assert bool(s[is_bad].isnan().all()) and bool(z[is_bad].isnan().all())
    assert_same(s[~is_bad], cs[~is_bad])
    assert_same(z[~is_bad], cz[~is_bad])
    gc, cgc = grouped(codes, ax, group_size * bits // 8), grouped(c_codes, ax, group_size * bits // 8)
    assert not bool(gc[is_bad].any()), "codes of a NaN group are all zero"
    assert torch.equal(gc[~is_bad], cgc[~is_bad])

    for out_dtype in FLOATS:
        x_hat = grouped(dequantize(codes, scale, zero, bits, group_size, axis, out_dtype), ax, group_size)
        clean_hat = grouped(dequantize(c_codes, c_scale, c_zero, bits, group_size, axis, out_dtype), ax, group_size)
        assert bool(x_hat[is_bad].isnan().all())
        assert_same(x_hat[~is_bad], clean_hat[~is_bad])
        assert not bool(x_hat[~is_bad].isnan().any())


@pytest.mark.parametrize("scale_dtype", SCALES, ids=dt_id)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("axis", [2, -1], ids=["per_channel", "per_token"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
def test_nan_inf_poison_only_their_group(dtype, axis, bad, scale_dtype):
    x = random_tensor([2, 3, 64, 40] if axis == 2 else [2, 3, 5, 64], dtype, 3)
    idx = (1, 2, 37, 3) if axis == 2 else (1, 2, 3, 37)
    x[idx] = bad
    check_bad_group(x, idx, 4, 16, axis, scale_dtype)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dt_id)
def test_range_overflowing_float16_becomes_nan(dtype, bits):
    x = random_tensor([1, 2, 64, 8], dtype, 4)
    # The group [32, 48) of column 5 holds -1e5 .. 1e5: neither its zero (-1e5) nor, for
    # small bit widths, its scale fits float16.
    x[0, 1, 33, 5] = -1e5
    x[0, 1, 40, 5] = 1e5
    check_bad_group(x, (0, 1, 33, 5), bits, 16, 2, torch.float16)
    # The same data with float32 scales is an ordinary group.
    codes, scale, zero = quantize(x, bits, 16, 2, torch.float32)
    assert bool(scale.isfinite().all()) and bool(zero.isfinite().all())
    assert zero[0, 1, 2, 5].item() == x[0, 1, 33, 5].item()  # -1e5 as float32/bfloat16
    x_hat = dequantize(codes, scale, zero, bits, 16, 2, torch.float32)
    step = scale[0, 1, 2, 5].item()
    err = (x_hat - x.float())[0, 1, 32:48, 5].abs().max().item()
    assert err <= step / 2 * (1 + 1e-5)
    assert_same_outputs((codes, scale, zero), ref.quantize(x, bits, 16, 2, torch.float32))


def test_scale_alone_overflowing_float16_becomes_nan():
    """Zero 0 fits float16, but a 1-bit scale of 1e5 does not; at 8 bits (scale 392) it does."""
    x = random_tensor([4, 32], torch.float32, 6)
    x[1, 3], x[1, 4] = 0.0, 1e5
    x[1, 5:] = x[1, 5:].abs()  # keep the group minimum at exactly 0
    x[1, :3] = x[1, :3].abs()
    check_bad_group(x, (1, 4), 1, 32, -1, torch.float16, clean_value=0.5)
    codes, scale, zero = quantize(x, 8, 32, -1, torch.float16)
    assert scale[1, 0].item() == pytest.approx(1e5 / 255, rel=1e-3) and zero[1, 0].item() == 0.0


@pytest.mark.parametrize(
    "minimum, becomes_nan",
    [(-65504.0, False), (-65519.0, False), (-65520.0, True)],
    ids=["fp16_max", "rounds_to_max", "rounds_to_inf"],
)
def test_zero_at_the_float16_edge(minimum, becomes_nan):
    """float16 rounds magnitudes below 65520 to 65504 and from 65520 on to infinity."""
    x = random_tensor([2, 16], torch.float32, 8)
    x[0, 7] = minimum
    codes, scale, zero = quantize(x, 8, 16, 1, torch.float16)
    assert_same_outputs((codes, scale, zero), ref.quantize(x, 8, 16, 1, torch.float16))
    assert bool(zero[0, 0].isnan()) == becomes_nan
    assert bool(zero[1, 0].isfinite())
    x_hat = dequantize(codes, scale, zero, 8, 16, 1, torch.float32)
    assert bool(x_hat[0].isnan().all()) == becomes_nan
    if not becomes_nan:
        assert zero[0, 0].item() == -65504.0


# ---------------------------------------------------------------------------------------------
# (d) opcheck
# ---------------------------------------------------------------------------------------------

OPCHECK_CONFIGS = [
    # dtype, bits, group_size, axis, scale_dtype, shape
    (torch.float16, 2, 32, 2, None, [1, 2, 64, 24]),
    (torch.bfloat16, 3, 64, -1, torch.float32, [2, 2, 5, 128]),
    (torch.float32, 8, 8, 2, torch.float16, [1, 3, 24, 7]),
    (torch.float32, 5, 16, -1, torch.float32, [3, 48]),
]


@pytest.mark.parametrize("dtype, bits, group_size, axis, scale_dtype, shape", OPCHECK_CONFIGS)
def test_opcheck(dtype, bits, group_size, axis, scale_dtype, shape):
    x = random_tensor(shape, dtype, bits)
    torch.library.opcheck(quantize.default, (x, bits, group_size, axis, scale_dtype))
    codes, scale, zero = quantize(x, bits, group_size, axis, scale_dtype)
    for out_dtype in (dtype, torch.float32):
        torch.library.opcheck(
            dequantize.default, (codes, scale, zero, bits, group_size, axis, out_dtype)
        )


# ---------------------------------------------------------------------------------------------
# (e) torch.compile
# ---------------------------------------------------------------------------------------------


def _round_trip_fn(bits, group_size, axis, scale_dtype, out_dtype):
    def fn(x):
        codes, scale, zero = torch.ops.kvq.quantize(x, bits, group_size, axis, scale_dtype)
        x_hat = torch.ops.kvq.dequantize(codes, scale, zero, bits, group_size, axis, out_dtype)
        return x_hat, codes, scale, zero

    return fn


COMPILE_CONFIGS = [
    # dtype, bits, group_size, axis, scale_dtype, shape
    (torch.float16, 2, 32, 2, None, [1, 2, 64, 24]),
    (torch.bfloat16, 4, 64, -1, torch.float32, [1, 2, 7, 128]),
    (torch.float32, 3, 16, 2, torch.float16, [2, 1, 48, 5]),
    (torch.float32, 8, 8, -1, torch.float32, [3, 40]),
]


@pytest.mark.parametrize("dtype, bits, group_size, axis, scale_dtype, shape", COMPILE_CONFIGS)
def test_compile_aot_eager(dtype, bits, group_size, axis, scale_dtype, shape):
    torch._dynamo.reset()
    fn = _round_trip_fn(bits, group_size, axis, scale_dtype, dtype)
    x = random_tensor(shape, dtype, 21)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_same_outputs(compiled(x), fn(x))


def test_compile_aot_eager_dynamic_shapes():
    torch._dynamo.reset()
    fn = _round_trip_fn(4, 32, 2, None, torch.float16)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (64, 96, 160):
        x = random_tensor([1, 2, tokens, 16], torch.float16, tokens)
        assert_same_outputs(compiled(x), fn(x))


def test_compile_inductor():
    torch._dynamo.reset()

    def fn(k, v):  # KIVI: keys per channel, values per token, with some fp math around
        k_hat = _round_trip_fn(2, 32, 2, None, torch.float32)(k * 0.5)[0]
        v_hat = _round_trip_fn(4, 32, -1, torch.float32, torch.float32)(v)[0]
        return k_hat.sum(-1), v_hat + 1

    k = random_tensor([1, 2, 64, 32], torch.float32, 1)
    v = random_tensor([1, 2, 64, 32], torch.float32, 2)
    got = torch.compile(fn, fullgraph=True, backend="inductor")(k, v)
    want = fn(k, v)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-5)
    assert_same(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# (f) argument validation
# ---------------------------------------------------------------------------------------------

X = [2, 3, 64, 16]  # shape of the input the error cases start from
QUANTIZE_ERRORS = {
    # id: (args after x (or a function of x), expected message)
    "bits_0": (lambda x: (x, 0, 32, 2), "kvq::quantize: bits must be in [1, 8], got 0"),
    "bits_9": (lambda x: (x, 9, 32, 2), "kvq::quantize: bits must be in [1, 8], got 9"),
    "group_12": (
        lambda x: (x, 4, 12, 2),
        "kvq::quantize: group_size must be a positive multiple of 8 (so each group fills whole "
        "bytes), got 12",
    ),
    "group_0": (
        lambda x: (x, 4, 0, 2),
        "kvq::quantize: group_size must be a positive multiple of 8 (so each group fills whole "
        "bytes), got 0",
    ),
    "group_not_dividing": (
        lambda x: (x, 4, 48, 2),
        "kvq::quantize: group_size 48 must divide x.size(2) = 64; pad that axis or choose a "
        "group size that divides it",
    ),
    "axis_4": (lambda x: (x, 4, 32, 4), "kvq::quantize: axis must be in [-4, 3] for x of rank 4, got 4"),
    "axis_-5": (lambda x: (x, 4, 32, -5), "kvq::quantize: axis must be in [-4, 3] for x of rank 4, got -5"),
    "empty": (lambda x: (x[:, :, :, :0], 4, 32, 2), "kvq::quantize: x must not be empty, got shape [2, 3, 64, 0]"),
    "zero_dim": (lambda x: (x[0, 0, 0, 0], 4, 8, 0), "kvq::quantize: x must have at least one dimension"),
}
# Dtype names print differently in C++ ("Double") and Python ("torch.float64"): match the rest.
QUANTIZE_DTYPE_ERRORS = {
    "int_input": (lambda x: (x.to(torch.int32), 4, 32, 2), "kvq::quantize: x must be float32, float16 or bfloat16, got "),
    "float64_input": (lambda x: (x.double(), 4, 32, 2), "kvq::quantize: x must be float32, float16 or bfloat16, got "),
    "bfloat16_scales": (
        lambda x: (x, 4, 32, 2, torch.bfloat16),
        "kvq::quantize: scale_dtype must be float16 or float32, got ",
    ),
}


def _qargs():
    x = random_tensor(X, torch.float32, 0)
    return (x, *quantize(x, 4, 32, 2))


DEQUANTIZE_ERRORS = {
    # codes are [2, 3, 32, 16] (4-bit, group 32 along axis 2), scale/zero [2, 3, 2, 16] fp16
    "group_12": (
        lambda c, s, z: (c, s, z, 4, 12, 2, torch.float32),
        "kvq::dequantize: group_size must be a positive multiple of 8 (so each group fills "
        "whole bytes), got 12",
    ),
    "bits_9": (lambda c, s, z: (c, s, z, 9, 32, 2, torch.float32), "kvq::dequantize: bits must be in [1, 8], got 9"),
    "axis_4": (
        lambda c, s, z: (c, s, z, 4, 32, 4, torch.float32),
        "kvq::dequantize: axis must be in [-4, 3] for codes of rank 4, got 4",
    ),
    "wrong_scale_shape": (
        lambda c, s, z: (c, s[:, :, :1], z[:, :, :1], 4, 32, 2, torch.float32),
        "kvq::dequantize: scale must have shape [2, 3, 2, 16] (codes' shape with 2 groups along "
        "axis 2), got [2, 3, 1, 16]",
    ),
    "wrong_zero_shape": (
        lambda c, s, z: (c, s, z[..., :8], 4, 32, 2, torch.float32),
        "kvq::dequantize: zero must have the shape of scale [2, 3, 2, 16], got [2, 3, 2, 8]",
    ),
    "codes_not_whole_groups": (
        lambda c, s, z: (c[:, :, :24], s, z, 4, 32, 2, torch.float32),
        "kvq::dequantize: codes.size(2) = 24 bytes is not a whole number of groups of 32 4-bit codes",
    ),
    "empty_codes": (
        lambda c, s, z: (c[:0], s[:0], z[:0], 4, 32, 2, torch.float32),
        "kvq::dequantize: codes must not be empty, got shape [0, 3, 32, 16]",
    ),
}
DEQUANTIZE_DTYPE_ERRORS = {
    "int8_codes": (lambda c, s, z: (c.to(torch.int8), s, z, 4, 32, 2, torch.float32), "kvq::dequantize: codes must be uint8, got "),
    "scale_zero_dtype_mismatch": (
        lambda c, s, z: (c, s, z.float(), 4, 32, 2, torch.float32),
        "kvq::dequantize: zero must have the dtype of scale (",
    ),
    "bfloat16_scale": (
        lambda c, s, z: (c, s.bfloat16(), z.bfloat16(), 4, 32, 2, torch.float32),
        "kvq::dequantize: scale must be float16 or float32, got ",
    ),
    "float64_output": (lambda c, s, z: (c, s, z, 4, 32, 2, torch.float64), "kvq::dequantize: dtype must be float32, float16 or bfloat16, got "),
    "int_output": (lambda c, s, z: (c, s, z, 4, 32, 2, torch.int32), "kvq::dequantize: dtype must be float32, float16 or bfloat16, got "),
}


def _exact(msg: str) -> str:
    return "^" + re.escape(msg) + "$"


@pytest.mark.parametrize("case", list(QUANTIZE_ERRORS), ids=str)
def test_quantize_rejects(case):
    make_args, msg = QUANTIZE_ERRORS[case]
    args = make_args(random_tensor(X, torch.float32, 0))
    with pytest.raises(RuntimeError, match=_exact(msg)):
        quantize(*args)
    with pytest.raises(RuntimeError, match=_exact(msg)):
        ref.quantize(*args)


@pytest.mark.parametrize("case", list(QUANTIZE_DTYPE_ERRORS), ids=str)
def test_quantize_rejects_dtype(case):
    make_args, msg = QUANTIZE_DTYPE_ERRORS[case]
    args = make_args(random_tensor(X, torch.float32, 0))
    with pytest.raises(RuntimeError, match="^" + re.escape(msg) + r".+$"):
        quantize(*args)


@pytest.mark.parametrize("case", list(DEQUANTIZE_ERRORS), ids=str)
def test_dequantize_rejects(case):
    make_args, msg = DEQUANTIZE_ERRORS[case]
    args = make_args(*_qargs()[1:])
    with pytest.raises(RuntimeError, match=_exact(msg)):
        dequantize(*args)
    with pytest.raises(RuntimeError, match=_exact(msg)):
        ref.dequantize(*args)


@pytest.mark.parametrize("case", list(DEQUANTIZE_DTYPE_ERRORS), ids=str)
def test_dequantize_rejects_dtype(case):
    make_args, msg = DEQUANTIZE_DTYPE_ERRORS[case]
    args = make_args(*_qargs()[1:])
    with pytest.raises(RuntimeError, match="^" + re.escape(msg) + r".+$"):
        dequantize(*args)


def _fake_call(op, args):
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        op(*fake)


@pytest.mark.parametrize("case", ["bits_9", "group_12", "group_not_dividing", "axis_-5", "empty", "zero_dim"])
def test_quantize_fake_raises_the_kernel_message(case):
    make_args, msg = QUANTIZE_ERRORS[case]
    with pytest.raises(RuntimeError, match=_exact(msg)):
        _fake_call(quantize, make_args(random_tensor(X, torch.float32, 0)))


@pytest.mark.parametrize("case", ["wrong_scale_shape", "wrong_zero_shape", "codes_not_whole_groups"])
def test_dequantize_fake_raises_the_kernel_message(case):
    make_args, msg = DEQUANTIZE_ERRORS[case]
    with pytest.raises(RuntimeError, match=_exact(msg)):
        _fake_call(dequantize, make_args(*_qargs()[1:]))


def test_compiled_call_raises_the_kernel_message():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.ops.kvq.quantize(x, 4, 48, 2), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=re.escape(QUANTIZE_ERRORS["group_not_dividing"][1])):
        fn(random_tensor(X, torch.float32, 0))


@pytest.mark.parametrize("case", ["float64_input", "bfloat16_scales"])
def test_quantize_fake_dtype_message_matches_kernel(case):
    make_args, _ = QUANTIZE_DTYPE_ERRORS[case]
    args = make_args(random_tensor(X, torch.float32, 0))
    with pytest.raises(RuntimeError) as kernel:
        quantize(*args)
    with pytest.raises(RuntimeError) as fake:
        _fake_call(quantize, args)
    assert str(kernel.value).splitlines()[0] == str(fake.value).splitlines()[0]
