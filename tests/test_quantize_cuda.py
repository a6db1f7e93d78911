"""CUDA kernels of kvq::quantize / kvq::dequantize: bit-identical to the CPU kernels.

The CPU kernel is the spec here (it is itself tested against ``torchkvq.reference``); the
reference is not run on CUDA because torch's CUDA division by a scalar multiplies by the
reciprocal, which is not bit-exact. NaN compares equal to NaN; +0.0 and -0.0 compare equal.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import torchkvq

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torchkvq.cuda_available(), reason="needs a CUDA device and torchkvq built with CUDA"
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE_DTYPES = [torch.float16, torch.float32]
GROUPS = [8, 32, 128]

# (name, shape for a given group size, axis): per-token groups (inner == 1) and per-channel
# groups (inner > 1), with odd outer/inner sizes and an odd number of groups.
AXES = [
    ("token", lambda g: (3, 5, 3 * g), -1),
    ("channel", lambda g: (2, 3, 3 * g, 37), -2),
    ("axis0", lambda g: (3 * g, 5, 3), 0),
]

quantize = torch.ops.kvq.quantize
dequantize = torch.ops.kvq.dequantize


def _seed(*parts) -> int:
    """A seed that is stable across processes (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _values(shape, seed: int) -> torch.Tensor:
    """Random float32 values with per-element spread, generated on the CPU."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(shape, generator=g).add_(0.05).mul_(4.0)
    return torch.randn(shape, generator=g) * spread + 0.5


def _make(shape, dtype, layout: str, seed: int):
    """The same values as a CPU tensor and a CUDA tensor with the given memory layout."""
    if layout == "contiguous":
        base, view = _values(shape, seed), lambda t: t
    elif layout == "strided":  # every other element of the last dim
        base = _values((*shape[:-1], 2 * shape[-1]), seed)
        view = lambda t: t[..., ::2]  # noqa: E731
    elif layout == "transposed":
        base = _values((*shape[:-2], shape[-1], shape[-2]), seed)
        view = lambda t: t.transpose(-1, -2)  # noqa: E731
    elif layout == "offset":  # contiguous, but the data pointer is not 16-byte aligned
        base = _values((math.prod(shape) + 1,), seed)
        view = lambda t: t[1:].view(shape)  # noqa: E731
    else:
        raise ValueError(layout)
    base = base.to(dtype)
    x_cpu, x_cuda = view(base), view(base.cuda())
    assert x_cuda.shape == shape
    return x_cpu, x_cuda


def _assert_same(got_cuda: torch.Tensor, want_cpu: torch.Tensor, what: str = ""):
    assert got_cuda.device.type == "cuda", what
    got = got_cuda.cpu()
    assert got.dtype == want_cpu.dtype, what
    assert got.shape == want_cpu.shape, what
    torch.testing.assert_close(got, want_cpu, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _check_roundtrip(x_cpu, x_cuda, bits, group, axis, scale_dtype):
    """CUDA quantize == CPU quantize, and CUDA dequantize == CPU dequantize for every dtype."""
    got = quantize(x_cuda, bits, group, axis, scale_dtype)
    want = quantize(x_cpu, bits, group, axis, scale_dtype)
    for name, a, b in zip(("codes", "scale", "zero"), got, want):
        _assert_same(a, b, name)
    for dtype in DTYPES:
        y = dequantize(*got, bits, group, axis, dtype)
        y_ref = dequantize(*want, bits, group, axis, dtype)
        _assert_same(y, y_ref, f"dequantize to {dtype}")
    return got, want


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_case", AXES, ids=[a[0] for a in AXES])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_sweep_matches_cpu(bits, group, axis_case, dtype, scale_dtype):
    name, shape_of, axis = axis_case
    shape = shape_of(group)
    x_cpu, x_cuda = _make(shape, dtype, "contiguous", _seed(bits, group, name, dtype, scale_dtype))
    _check_roundtrip(x_cpu, x_cuda, bits, group, axis, scale_dtype)


@pytest.mark.parametrize("layout", ["strided", "transposed", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_case", AXES[:2], ids=[a[0] for a in AXES[:2]])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_layouts_match_cpu(bits, axis_case, dtype, layout):
    name, shape_of, axis = axis_case
    shape = shape_of(32)
    x_cpu, x_cuda = _make(shape, dtype, layout, _seed(bits, name, dtype, layout))
    if layout == "offset":
        assert x_cuda.is_contiguous() and x_cuda.data_ptr() % 16 != 0
    else:
        assert not x_cuda.is_contiguous()
    _check_roundtrip(x_cpu, x_cuda, bits, 32, axis, torch.float16)


@pytest.mark.parametrize("axis_case", AXES[:2], ids=[a[0] for a in AXES[:2]])
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("bits", [2, 4])
def test_kv_cache_shape_matches_cpu(bits, group, axis_case):
    """A realistic [batch, kv_heads, tokens, head_dim] cache, per-token and per-channel."""
    name, _, axis = axis_case
    shape = (2, 8, 512, 128)
    x_cpu, x_cuda = _make(shape, torch.float16, "contiguous", _seed("kv", bits, group, name))
    _check_roundtrip(x_cpu, x_cuda, bits, group, axis, torch.float16)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("axis_case", AXES, ids=[a[0] for a in AXES])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_round_half_even_ties(bits, axis_case, scale_dtype):
    """Scale is exactly 1 and every value a multiple of 1/2: half the codes are exact ties."""
    name, shape_of, axis = axis_case
    group = 32
    qmax = (1 << bits) - 1
    shape = shape_of(group)
    g = torch.Generator().manual_seed(_seed("ties", bits, name))
    x = torch.randint(0, 2 * qmax + 1, shape, generator=g).float() / 2
    grouped = x.movedim(axis, -1).unflatten(-1, (-1, group))  # a view: writes land in x
    grouped[..., 0] = 0.0
    grouped[..., 1] = float(qmax)
    (codes, scale, _), _ = _check_roundtrip(x, x.cuda(), bits, group, axis, scale_dtype)
    assert bool((scale.cpu().float() == 1.0).all())


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_case", AXES, ids=[a[0] for a in AXES])
@pytest.mark.parametrize("bits", [1, 4, 7])
def test_nonfinite_groups(bits, axis_case, dtype, scale_dtype):
    """Groups with NaN/+Inf/-Inf get NaN scale and zero and all-zero codes; others are unharmed."""
    name, shape_of, axis = axis_case
    group = 32
    shape = shape_of(group)
    x = _values(shape, _seed("nan", bits, name, dtype)).to(dtype)
    grouped = x.movedim(axis, -1).unflatten(-1, (-1, group))  # [*lead, 3 groups, group]
    first = (0,) * (grouped.dim() - 2)
    grouped[..., 0, 3] = float("nan")  # group 0 of every row
    grouped[..., 1, group - 1] = float("inf")  # group 1 of every row
    grouped[first + (2, 0)] = float("-inf")  # group 2 of the first row only
    (codes, scale, zero), _ = _check_roundtrip(x, x.cuda(), bits, group, axis, scale_dtype)
    for params in (scale, zero):
        p = params.cpu().float().movedim(axis, -1)
        assert bool(p[..., :2].isnan().all())
        assert bool(p[first + (2,)].isnan())
        assert int(p[..., 2].isnan().sum()) == 1
    q = torchkvq.reference.unpack_codes(codes.cpu().movedim(axis, -1), bits)
    q = q.unflatten(-1, (-1, group))
    assert int(q[..., :2, :].count_nonzero()) == 0
    assert int(q[first + (2,)].count_nonzero()) == 0


@pytest.mark.parametrize("axis_case", AXES, ids=[a[0] for a in AXES])
@pytest.mark.parametrize("bits", [1, 8])
def test_unrepresentable_range_is_nan_group(bits, axis_case):
    """A range or minimum that overflows float16 gives a NaN group, on CUDA as on the CPU."""
    name, shape_of, axis = axis_case
    group = 8
    shape = shape_of(group)
    x = _values(shape, _seed("range", bits, name))
    grouped = x.movedim(axis, -1).unflatten(-1, (-1, group))
    grouped[..., 0, 0] = -60000.0  # range 120000 / qmax: float16 overflows for bits == 1
    grouped[..., 0, 1] = 60000.0
    grouped[..., 1, 0] = -70000.0  # minimum itself overflows float16
    for scale_dtype in SCALE_DTYPES:
        _check_roundtrip(x, x.cuda(), bits, group, axis, scale_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_case", AXES, ids=[a[0] for a in AXES])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_constant_groups_are_exact(bits, axis_case, dtype):
    name, shape_of, axis = axis_case
    group = 32
    shape = shape_of(group)
    x = _values(shape, _seed("const", bits, name)).to(dtype)
    grouped = x.movedim(axis, -1).unflatten(-1, (-1, group))
    grouped[..., 0, :] = 3.25
    grouped[..., 1, :] = 0.0
    grouped[..., 2, :] = -0.125
    (codes, scale, zero), _ = _check_roundtrip(x, x.cuda(), bits, group, axis, torch.float16)
    s = scale.cpu().float().movedim(axis, -1)
    assert bool((s == 0).all())
    assert int(codes.count_nonzero()) == 0
    y = dequantize(codes, scale, zero, bits, group, axis, dtype)
    torch.testing.assert_close(y.cpu(), x, rtol=0, atol=0)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_case", AXES, ids=[a[0] for a in AXES])
@pytest.mark.parametrize("group", [8, 32])
@pytest.mark.parametrize("bits", range(1, 9))
def test_dequantize_arbitrary_codes_matches_cpu(bits, group, axis_case, dtype, scale_dtype):
    """Every byte pattern, with scales/zeros not produced by quantize (NaN ones included)."""
    name, shape_of, axis = axis_case
    full = shape_of(group)
    ax = axis % len(full)
    n = full[ax]
    g = torch.Generator().manual_seed(_seed("deq", bits, group, name, dtype, scale_dtype))
    codes_shape = list(full)
    codes_shape[ax] = n * bits // 8
    params_shape = list(full)
    params_shape[ax] = n // group
    codes = torch.randint(0, 256, codes_shape, generator=g, dtype=torch.uint8)
    scale = (torch.rand(params_shape, generator=g) * 0.3).to(scale_dtype)
    zero = (torch.randn(params_shape, generator=g) * 2).to(scale_dtype)
    scale.view(-1)[::7] = float("nan")
    want = dequantize(codes, scale, zero, bits, group, axis, dtype)
    got = dequantize(codes.cuda(), scale.cuda(), zero.cuda(), bits, group, axis, dtype)
    _assert_same(got, want)


def test_default_scale_dtype_is_float16():
    x_cpu, x_cuda = _make((4, 64), torch.float32, "contiguous", 1)
    codes, scale, zero = quantize(x_cuda, 4, 32, -1)
    assert scale.dtype == zero.dtype == torch.float16
    for a, b in zip((codes, scale, zero), quantize(x_cpu, 4, 32, -1)):
        _assert_same(a, b)


def test_runs_on_current_stream():
    x_cpu, x_cuda = _make((2, 8, 256, 64), torch.float16, "contiguous", 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = quantize(x_cuda, 4, 32, -2, torch.float16)
        y = dequantize(*got, 4, 32, -2, torch.float32)
    stream.synchronize()
    want = quantize(x_cpu, 4, 32, -2, torch.float16)
    for a, b in zip(got, want):
        _assert_same(a, b)
    _assert_same(y, dequantize(*want, 4, 32, -2, torch.float32))


@pytest.mark.parametrize("axis", [-1, -2])
def test_opcheck_quantize(axis):
    x = _values((2, 3, 64, 96), 3).cuda().half()
    torch.library.opcheck(quantize.default, (x, 3, 32, axis, torch.float32))
    torch.library.opcheck(quantize.default, (x, 4, 32, axis))


@pytest.mark.parametrize("axis", [-1, -2])
def test_opcheck_dequantize(axis):
    x = _values((2, 3, 64, 96), 4).cuda()
    codes, scale, zero = quantize(x, 5, 32, axis, torch.float16)
    torch.library.opcheck(dequantize.default, (codes, scale, zero, 5, 32, axis, torch.bfloat16))


def test_compiles_under_torch_compile():
    x = _values((2, 4, 64, 32), 5).cuda().half()

    def roundtrip(t):
        c, s, z = quantize(t, 4, 32, -2, torch.float16)
        return dequantize(c, s, z, 4, 32, -2, torch.float16)

    got = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)(x)
    _assert_same(got, roundtrip(x.cpu()))


def test_device_mismatch_is_an_error():
    x = _values((4, 64), 6).cuda()
    codes, scale, zero = quantize(x, 4, 32, -1)
    with pytest.raises(RuntimeError, match=r"kvq::dequantize: scale is on cpu but codes is on cuda:0"):
        dequantize(codes, scale.cpu(), zero, 4, 32, -1, torch.float32)
    with pytest.raises(RuntimeError, match=r"kvq::dequantize: scale is on cuda:0 but codes is on cpu"):
        dequantize(codes.cpu(), scale, zero, 4, 32, -1, torch.float32)


def test_argument_errors_name_the_op():
    x = _values((4, 64), 7).cuda()
    with pytest.raises(RuntimeError, match=r"kvq::quantize: bits must be in \[1, 8\], got 9"):
        quantize(x, 9, 32, -1)
    with pytest.raises(RuntimeError, match=r"kvq::quantize: group_size 48 must divide"):
        quantize(x, 4, 48, -1)
