"""Fuzzing every CPU op with nasty inputs (also the test run of scripts/sanitize.sh).

Hypothesis draws shapes (single tokens, single channel groups, odd batch/head counts), bit
widths 1-8, group sizes, dtypes, strides (transposed, sliced with a step, expanded along a
broadcast dimension) and values: normal, huge (an eighth of the dtype's largest number),
smallest normals, subnormals, constant rows, zeros, a few isolated spikes, and NaN/Inf where an
op accepts them. Each op is compared with its pure-PyTorch reference: bit for bit for
quantize, dequantize, outlier_split and write_tokens; within float32 rounding for the matmul and
attention kernels wherever the reference is finite. Under scripts/sanitize.sh the same tests
run against an ASan/UBSan build, where any out-of-bounds access or undefined behaviour aborts.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchkvq  # noqa: F401
from torchkvq import ops
from torchkvq import reference as ref
from torchkvq.store import KVStore, Outliers

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["normal", "huge", "tiny", "subnormal", "constant", "zeros", "spikes"]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same(a: torch.Tensor, e: torch.Tensor) -> None:
    """Bit-for-bit equality, NaN matching NaN."""
    assert a.dtype == e.dtype and a.shape == e.shape, (a.dtype, e.dtype, a.shape, e.shape)
    if a.dtype in _INT_VIEW:
        assert torch.equal(a.isnan(), e.isnan()), "NaN positions differ"
        a = a.contiguous().view(_INT_VIEW[a.dtype]).masked_fill(a.isnan(), 0)
        e = e.contiguous().view(_INT_VIEW[e.dtype]).masked_fill(e.isnan(), 0)
    assert torch.equal(a, e), (a != e).nonzero()[:5].tolist()


def values(shape, dtype: torch.dtype, mode: str, seed: int, poison: bool = False) -> torch.Tensor:
    """A float32 tensor of `shape` in one of the nasty `mode` s, representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    x = torch.randn(shape, generator=g)
    if mode == "huge":
        x = x.clamp(-4, 4) * (fi.max / 32)
    elif mode == "tiny":
        x = x * fi.tiny
    elif mode == "subnormal":
        x = x * (fi.tiny / 16)
    elif mode == "constant":
        x = torch.full(shape, float(x.flatten()[0]) if x.numel() else 1.0)
        if len(shape) >= 2:  # constant rows, different per row
            x = x + torch.arange(shape[-2]).reshape(-1, 1).float()
    elif mode == "zeros":
        x = torch.zeros(shape)
    elif mode == "spikes" and x.numel():
        idx = torch.randint(0, x.numel(), (max(1, x.numel() // 50),), generator=g)
        x.view(-1)[idx] = 1e4 * torch.sign(torch.randn(idx.shape, generator=g))
    if poison and x.numel():
        i = int(torch.randint(0, x.numel(), (1,), generator=g))
        x.view(-1)[i] = [math.nan, math.inf, -math.inf][seed % 3]
    return x.to(dtype)


def strided(x: torch.Tensor, layout: str, seed: int) -> torch.Tensor:
    """`x`'s values with other strides: 'contiguous', 'transposed' (memory order reversed),
    'sliced' (every other element of a larger buffer along the last axis) or 'expanded' (a
    broadcast leading dimension of stride 0, when the first dimension is 1)."""
    if layout == "transposed" and x.dim() >= 2:
        return x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    if layout == "sliced":
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big.fill_(float("nan") if x.is_floating_point() else 0)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] == 1:
        return x[:1].expand(x.shape)
    return x


LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]


@st.composite
def quantize_case(draw):
    rank = draw(st.integers(1, 4))
    axis = draw(st.integers(0, rank - 1))
    group = draw(st.sampled_from([8, 16, 32, 64, 128]))
    shape = [draw(st.integers(1, 3)) for _ in range(rank)]
    shape[axis] = group * draw(st.integers(1, 3))
    return dict(
        shape=shape, axis=axis - rank * draw(st.booleans()), group=group,
        bits=draw(st.integers(1, 8)), dtype=draw(st.sampled_from(FLOATS)),
        scale_dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        mode=draw(st.sampled_from(MODES)), poison=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**16)),
    )


@given(quantize_case())
def test_quantize_dequantize_fuzz(c):
    x = strided(values(c["shape"], c["dtype"], c["mode"], c["seed"], c["poison"]), c["layout"], c["seed"])
    got = ops.quantize(x, c["bits"], c["group"], c["axis"], c["scale_dtype"])
    want = ref.quantize(x, c["bits"], c["group"], c["axis"], c["scale_dtype"])
    for a, e in zip(got, want):
        assert_same(a, e)
    codes, scale, zero = (strided(t, c["layout"], c["seed"]) for t in got)
    for dtype in FLOATS:
        assert_same(ops.dequantize(codes, scale, zero, c["bits"], c["group"], c["axis"], dtype),
                    ref.dequantize(codes, scale, zero, c["bits"], c["group"], c["axis"], dtype))


@given(st.integers(1, 3), st.integers(1, 40), st.data())
def test_outlier_split_fuzz(rows, k, data):
    n_low = data.draw(st.integers(0, k - 1))
    n_high = data.draw(st.integers(0, k - 1 - n_low))
    dtype = data.draw(st.sampled_from(FLOATS))
    mode, seed = data.draw(st.sampled_from(MODES)), data.draw(st.integers(0, 2**16))
    x = values([rows, 2, k], dtype, mode, seed, poison=data.draw(st.booleans()))
    x = strided(x, data.draw(st.sampled_from(LAYOUTS)), seed)
    got, want = ops.outlier_split(x, n_low, n_high), ref.outlier_split(x, n_low, n_high)
    for a, e in zip(got, want):
        assert_same(a, e)


def _close_where_finite(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor,
                        comparable: torch.Tensor | None = None) -> None:
    """|got - want| <= bound wherever the reference is finite; non-finite where it is not
    (NaN in the reference may come out as +-Inf or NaN, Inf as Inf or NaN). Entries outside
    `comparable` (sums that may overflow in one summation order and not in another) are skipped."""
    keep = torch.ones_like(want, dtype=torch.bool) if comparable is None else comparable.expand_as(want)
    fin = want.isfinite() & keep
    assert bool(got[fin].isfinite().all())
    err = (got.float() - want.float()).abs()
    assert bool((err[fin] <= bound.expand_as(err)[fin]).all()), float((err - bound)[fin].max())
    assert not bool(got[~want.isfinite() & keep].isfinite().any())


@given(st.data())
def test_dequant_matmul_fuzz(data):
    transpose_b = data.draw(st.booleans())
    group = data.draw(st.sampled_from([8, 16, 32]))
    bits = data.draw(st.integers(1, 8))
    lead = [data.draw(st.integers(1, 2)) for _ in range(data.draw(st.integers(0, 2)))]
    N, K, M = (data.draw(st.integers(1, 3)) * 8 for _ in range(3))
    # keys packed per channel (groups along N, axis -2) or per token (groups along K, axis -1)
    axis = data.draw(st.sampled_from([-1, -2]))
    if axis == -2:
        N = group * data.draw(st.integers(1, 3))
    else:
        K = group * data.draw(st.integers(1, 3))
    dtype = data.draw(st.sampled_from(FLOATS))
    seed = data.draw(st.integers(0, 2**16))
    mode = data.draw(st.sampled_from(["normal", "tiny", "subnormal", "constant", "zeros", "spikes"]))
    b = values(lead + [N, K], torch.float32, mode, seed)
    codes, scale, zero = ops.quantize(b, bits, group, axis, torch.float32)
    a = values(lead + [M, K if transpose_b else N], dtype, data.draw(st.sampled_from(MODES)), seed + 1,
               poison=data.draw(st.booleans()))
    a = strided(a, data.draw(st.sampled_from(LAYOUTS)), seed)
    oi = ov = None
    if data.draw(st.booleans()) and K > 2:
        n_out = data.draw(st.integers(1, 2))
        oi = torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(seed + i))[:n_out]
                          for i in range(math.prod(lead + [N]))]).reshape(lead + [N, n_out]).to(torch.int16)
        ov = values(lead + [N, n_out], dtype, "spikes", seed + 2)
    got = ops.dequant_matmul(a, codes, scale, zero, bits, group, axis, transpose_b, oi, ov)
    want = ref.dequant_matmul(a, codes, scale, zero, bits, group, axis, transpose_b, oi, ov)
    # float32 accumulation in another order: bounded by the sum of |terms|, plus the output's
    # own rounding to a's dtype
    bd = ref.dequantize(codes, scale, zero, bits, group, axis, torch.float32)
    if oi is not None:
        bd = bd.scatter_add(-1, oi.long(), ov.float())
    bd = bd.abs().transpose(-1, -2) if transpose_b else bd.abs()
    mag = a.double().abs().nan_to_num(0, 0, 0) @ bd.double()
    eps = torch.finfo(dtype).eps
    bound = (mag * (4 * 2**-23 * (K + N)) + mag * eps + torch.finfo(dtype).tiny).float()
    # no partial sum can overflow float32 or the output dtype, and no NaN/Inf in the row of a
    safe = (mag < torch.finfo(dtype).max / 2) & (mag < torch.finfo(torch.float32).max / 2)
    _close_where_finite(got, want, bound, safe | ~a.isfinite().all(-1, keepdim=True))


@st.composite
def store_case(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    D = draw(st.sampled_from([8, 16, 64]))
    G = draw(st.sampled_from([8, 16, 32]))
    vg = draw(st.sampled_from([v for v in (8, 16, 32, 64) if D % v == 0 and v <= D]))
    o = draw(st.integers(0, min(2, D // 2 - 1)))
    return dict(
        B=B, H=H, D=D, G=G, vg=vg, outliers=o, gqa=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(FLOATS)), scale_dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        chunks=draw(st.lists(st.integers(1, 2 * G + 1), min_size=1, max_size=4)),
        widths=draw(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=6)),
        mode=draw(st.sampled_from(["normal", "tiny", "subnormal", "constant", "zeros", "spikes"])),
        q_mode=draw(st.sampled_from(["normal", "tiny", "subnormal", "constant", "zeros", "spikes"])),
        pad=draw(st.booleans()), pin=draw(st.booleans()), L=draw(st.integers(1, 5)),
        layout=draw(st.sampled_from(LAYOUTS)), seed=draw(st.integers(0, 2**16)),
    )


@given(store_case())
def test_store_write_and_attention_fuzz(c):
    """Appends (kvq::write_tokens), quantization with mixed widths and outliers, padding and pins,
    then kvq::quant_attention over the store against the reference."""
    B, H, D, G = c["B"], c["H"], c["D"], c["G"]
    o = Outliers(c["outliers"], c["outliers"])
    s = KVStore(B, H, D, dtype=c["dtype"], group_size=G, value_group_size=c["vg"],
                scale_dtype=c["scale_dtype"], key_outliers=o, value_outliers=o)
    seed = c["seed"]
    for i, n in enumerate(c["chunks"]):
        k = strided(values([B, H, n, D], c["dtype"], c["mode"], seed + i), c["layout"], seed)
        v = strided(values([B, H, n, D], c["dtype"], c["mode"], seed + 100 + i), c["layout"], seed)
        valid = None
        if c["pad"] and i == 0 and B > 1:
            valid = torch.ones(B, n, dtype=torch.bool)
            valid[0, : n // 2] = False
        s.append(k, v, valid=valid)
    n = s.n_tokens
    if c["pin"] and n > 1:
        s.pin([0, n // 2])
    blocks = min(len(c["widths"]), n // G)
    s.quantize_blocks(c["widths"][:blocks])
    q = values([B, H * c["gqa"], min(c["L"], n), D], c["dtype"], c["q_mode"], seed + 7)
    q = strided(q, c["layout"], seed)
    args = (q, s.k_codes, s.k_scale, s.k_zero, s.k_bits, s.v_codes, s.v_scale, s.v_zero, s.v_bits,
            s.k_fp, s.v_fp, s.fp_pos, s.q_exclude, s.k_outlier_index, s.k_outlier_value,
            s.v_outlier_index, s.v_outlier_value, G, s.value_group_size, D**-0.5, True, True)
    out, lse, stats = ops.quant_attention(*args)
    r_out, r_lse, r_stats = ref.quant_attention(*args)
    assert out.shape == r_out.shape and lse.shape == r_lse.shape and stats.shape == r_stats.shape
    # Flash-style merging reorders float32 sums: scores are exact to float32 rounding of the
    # largest |q|.|k| (ds below); probabilities move by about ds, outputs by ds times the largest
    # value attended to, plus a few ulps of the output dtype.
    keys, vals, _ = s.dequantized()
    g = q.float().reshape(B, H, c["gqa"], q.shape[2], D).abs()
    ds = 1e-6 * float(torch.einsum("bhgld,bhtd->bhglt", g, keys.abs()).max()) * D**-0.5
    vmax = float(vals.abs().max())
    fi = torch.finfo(c["dtype"])
    # (+ two subnormal steps of the output dtype: the rounding of tiny outputs)
    tol = torch.tensor(vmax * (1e-4 + 2 * fi.eps + 4 * ds) + 2 * fi.tiny * fi.eps)
    _close_where_finite(out, r_out, tol)
    _close_where_finite(lse, r_lse, 1e-4 * (r_lse.abs().nan_to_num(0, 0, 0) + 1) + 4 * ds)
    _close_where_finite(stats, r_stats, torch.tensor(1e-4 + 4 * ds))


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.data())
def test_write_tokens_fuzz(B, H, n, data):
    D, F = 16, n + data.draw(st.integers(0, 4))
    dtype, kdtype = data.draw(st.sampled_from(FLOATS)), data.draw(st.sampled_from(FLOATS))
    seed = data.draw(st.integers(0, 2**16))
    layout = data.draw(st.sampled_from(LAYOUTS))
    k_fp = values([B, H, F, D], dtype, "normal", seed)
    state = [k_fp.clone(), k_fp.clone() + 1, torch.full((B, F), -1, dtype=torch.long)]
    key = strided(values([B, H, n, D], kdtype, data.draw(st.sampled_from(MODES)), seed + 1, True), layout, seed)
    value = strided(values([B, H, n, D], kdtype, data.draw(st.sampled_from(MODES)), seed + 2), layout, seed)
    slots = torch.randperm(F, generator=torch.Generator().manual_seed(seed))[:n]
    positions = strided(torch.arange(n).expand(B, n).contiguous(), layout, seed)
    got = [t.clone() for t in state]
    ops.write_tokens(*got, key, value, slots, positions)
    ref.write_tokens(*state, key, value, slots, positions)
    for a, e in zip(got, state):
        assert_same(a, e)


@pytest.mark.parametrize("shape", [[1, 1, 1, 8], [1, 1, 8, 1], [1, 8], [8]])
def test_single_token_and_single_channel(shape):
    """The smallest tensors each op accepts, along every axis a group can run."""
    x = values(shape, torch.float32, "normal", 1)
    for axis in range(len(shape)):
        if shape[axis] % 8 == 0:
            for bits in (1, 3, 8):
                got, want = ops.quantize(x, bits, 8, axis), ref.quantize(x, bits, 8, axis)
                for a, e in zip(got, want):
                    assert_same(a, e)
    if shape[-1] > 1:
        for a, e in zip(ops.outlier_split(x, 1, 0), ref.outlier_split(x, 1, 0)):
            assert_same(a, e)
