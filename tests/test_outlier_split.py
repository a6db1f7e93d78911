"""Tests of kvq::outlier_split (CPU kernel, fake, reference).

(a) bit-exact equality with torchkvq.reference (dtypes, n_low/n_high incl. 0, ties, lengths
    8..300, non-contiguous inputs, NaN/Inf), (b) hypothesis properties (exact reconstruction,
    dense range excludes the outliers), (c) opcheck, (d) torch.compile, (e) bad inputs.
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
from store_factory import assert_same

outlier_split = torch.ops.kvq.outlier_split
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check(x: torch.Tensor, n_low: int, n_high: int):
    got = outlier_split(x, n_low, n_high)
    want = ref.outlier_split(x, n_low, n_high)
    dense, index, value = got
    n = n_low + n_high
    assert dense.is_contiguous()
    assert index.dtype == torch.int16 and index.shape == (*x.shape[:-1], n)
    assert value.dtype == x.dtype and value.shape == (*x.shape[:-1], n)
    for a, e in zip(got, want):
        assert_same(a, e)
    return got


# ---------------------------------------------------------------------------------------------
# (a) reference equality
# ---------------------------------------------------------------------------------------------

LENGTHS = [8, 9, 37, 64, 127, 300]
COUNTS = [(0, 0), (0, 1), (1, 0), (2, 3), (5, 1), (0, 6), (4, 3)]


@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"lo{c[0]}_hi{c[1]}")
@pytest.mark.parametrize("K", LENGTHS)
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
def test_matches_reference(dtype, K, counts):
    n_low, n_high = counts
    x = random_tensor([3, 5, K], dtype, K * 7 + n_low, scale=2.0, offset=0.3)
    check(x, n_low, n_high)


@pytest.mark.parametrize("K", [8, 9, 64, 300])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
def test_extreme_counts(dtype, K):
    """n_low + n_high = K - 1: a single value stays dense."""
    x = random_tensor([4, K], dtype, K)
    for n_low in (0, 1, K // 2, K - 1):
        check(x, n_low, K - 1 - n_low)


@pytest.mark.parametrize("counts", [(0, 1), (1, 1), (3, 2), (0, 5), (6, 0)])
@pytest.mark.parametrize("K", [8, 33, 300])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
def test_ties_follow_value_then_index(dtype, K, counts):
    """Few distinct values: every outlier choice and every bound is a tie, broken by index
    (low outliers: smaller index first; high outliers: larger index first)."""
    gen = torch.Generator().manual_seed(K)
    x = torch.randint(-2, 3, (6, K), generator=gen).to(dtype) * 0.5
    x[0] = 1.0  # a constant vector
    x[1, :] = 0.0
    x[1, 0] = x[1, -1] = -0.0  # signed zeros compare equal
    dense, index, value = check(x, *counts)
    # independent check on the constant row: the lowest indices, then the highest ones
    n_low, n_high = counts
    want = list(range(n_low)) + list(range(K - 1, K - 1 - n_high, -1))
    assert index[0].tolist() == want


@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
def test_non_contiguous_inputs(dtype):
    base = random_tensor([6, 40, 50], dtype, 3)
    views = [
        base.transpose(0, 2),  # [50, 40, 6]: last axis strided
        base[:, ::3, 1:45:2],  # sliced with steps
        base.permute(1, 0, 2)[:, :, 5:],  # batch dims permuted, storage offset
        base[2, 7],  # 1-D view
        base[:, 0:1, :].expand(6, 4, 50),  # zero stride
    ]
    for v in views:
        assert not v.is_contiguous() or v.dim() == 1
        for counts in ((0, 0), (1, 2), (3, 0)):
            if sum(counts) < v.shape[-1]:
                got = check(v, *counts)
                for a, e in zip(got, outlier_split(v.contiguous(), *counts)):
                    assert_same(a, e)


@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
def test_nan_and_inf_sort_like_torch_sort(dtype):
    x = random_tensor([5, 16], dtype, 9)
    x[0, 3] = float("nan")
    x[1, [2, 9]] = float("nan")
    x[2, 4] = float("inf")
    x[2, 5] = float("-inf")
    x[3, :] = float("nan")
    x[4, [0, 15]] = float("inf")
    for counts in ((0, 1), (1, 1), (2, 3), (0, 0), (3, 0)):
        check(x, *counts)


def test_docstring_example():
    dense, idx, val = outlier_split(torch.tensor([[0.1, 9.0, -0.2, 0.3]]), 0, 1)
    assert_same(dense, torch.tensor([[0.1, 0.3, -0.2, 0.3]]))
    assert idx.tolist() == [[1]] and idx.dtype == torch.int16
    assert_same(val, torch.tensor([[9.0]]))
    for a, e in zip(torchkvq.ops.outlier_split(torch.tensor([[0.1, 9.0, -0.2, 0.3]]), 0, 1),
                    (dense, idx, val)):
        assert_same(a, e)


def test_many_rows_parallel():
    """Enough rows to be split across threads; each row must match."""
    x = random_tensor([257, 3, 24], torch.float16, 4)
    check(x, 2, 2)


# ---------------------------------------------------------------------------------------------
# (b) hypothesis properties
# ---------------------------------------------------------------------------------------------


@st.composite
def split_case(draw):
    dtype = draw(st.sampled_from(FLOATS))
    K = draw(st.integers(2, 300))
    rows = draw(st.integers(1, 4))
    n_low = draw(st.integers(0, min(K - 1, 12)))
    n_high = draw(st.integers(0, min(K - 1 - n_low, 12)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):  # heavy ties
        x = torch.randint(-3, 4, (rows, K), generator=gen).float()
    else:
        x = torch.randn(rows, K, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    return x.to(dtype), n_low, n_high


@given(split_case())
def test_property_reconstructs_exactly(case):
    x, n_low, n_high = case
    dense, index, value = outlier_split(x, n_low, n_high)
    assert_same(dense.scatter(-1, index.long(), value), x)
    assert_same(value, x.gather(-1, index.long()))
    # n_low + n_high distinct positions per vector
    if n_low + n_high:
        s = index.long().sort(-1).values
        assert bool((s[..., 1:] != s[..., :-1]).all())


@given(split_case())
def test_property_dense_range_excludes_outliers(case):
    x, n_low, n_high = case
    K = x.shape[-1]
    dense, index, value = outlier_split(x, n_low, n_high)
    srt = x.float().sort(-1).values
    lo, hi = srt[..., n_low], srt[..., K - n_high - 1]  # (n_low+1)-th smallest / largest
    assert torch.equal(dense.float().amin(-1), lo)
    assert torch.equal(dense.float().amax(-1), hi)
    v = value.float()
    assert bool((v[..., :n_low] <= lo[..., None]).all())
    assert bool((v[..., n_low:] >= hi[..., None]).all())
    # low ones from the smallest up, high ones from the largest down
    assert bool((v[..., 1:n_low] >= v[..., : max(n_low - 1, 0)]).all())
    assert bool((v[..., n_low + 1 :] <= v[..., n_low:-1]).all())
    # values not set aside are untouched
    kept = torch.ones_like(x, dtype=torch.bool).scatter(-1, index.long(), False)
    assert torch.equal(dense[kept], x[kept])


# ---------------------------------------------------------------------------------------------
# (c) opcheck, (d) torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, shape, n_low, n_high",
    [
        (torch.float32, [3, 17], 1, 2),
        (torch.float16, [2, 2, 64], 0, 4),
        (torch.bfloat16, [40], 3, 0),
        (torch.float32, [2, 5, 8], 0, 0),
    ],
)
def test_opcheck(dtype, shape, n_low, n_high):
    torch.library.opcheck(outlier_split.default, (random_tensor(shape, dtype, 1), n_low, n_high))


def test_opcheck_non_contiguous():
    x = random_tensor([16, 6], torch.float32, 2).t()
    torch.library.opcheck(outlier_split.default, (x, 2, 1))


def test_compile_aot_eager():
    torch._dynamo.reset()

    def fn(x):  # split, quantize the dense part, put the outliers back after dequantization
        dense, index, value = torch.ops.kvq.outlier_split(x * 2, 1, 2)
        codes, s, z = torch.ops.kvq.quantize(dense, 4, 32, -1)
        x_hat = torch.ops.kvq.dequantize(codes, s, z, 4, 32, -1, torch.float32)
        return x_hat.scatter(-1, index.long(), value), dense, index, value

    x = random_tensor([2, 3, 64], torch.float32, 5)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    for a, e in zip(got, fn(x)):
        assert_same(a, e)


def test_compile_fake_shapes_of_non_contiguous_input():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.ops.kvq.outlier_split(x, 2, 0), fullgraph=True,
                       backend="aot_eager")
    x = random_tensor([24, 5], torch.bfloat16, 6).t()
    for a, e in zip(fn(x), outlier_split(x, 2, 0)):
        assert_same(a, e)


# ---------------------------------------------------------------------------------------------
# (e) bad inputs: the kernel and the fake raise the same message
# ---------------------------------------------------------------------------------------------

OP = "kvq::outlier_split: "
BAD = {
    "float64": (lambda: (torch.randn(4, 8, dtype=torch.float64), 1, 1),
                OP + "x must be float32, float16 or bfloat16, got "),
    "int32": (lambda: (torch.ones(4, 8, dtype=torch.int32), 1, 1),
              OP + "x must be float32, float16 or bfloat16, got "),
    "scalar": (lambda: (torch.tensor(1.0), 0, 0), OP + "x must have at least one dimension"),
    "empty": (lambda: (torch.randn(0, 8), 1, 1), OP + r"x must not be empty, got shape \[0, 8\]"),
    "negative": (lambda: (torch.randn(4, 8), -1, 1), OP + "n_low and n_high must be >= 0, got -1 and 1"),
    "too_many": (lambda: (torch.randn(4, 8), 5, 3),
                 OP + r"n_low \+ n_high = 8 must be smaller than x.size\(-1\) = 8 so that some "
                 "values stay dense"),
    "too_many_high": (lambda: (torch.randn(4, 8), 0, 9),
                      OP + r"n_low \+ n_high = 9 must be smaller than x.size\(-1\) = 8"),
    "too_long": (lambda: (torch.randn(1, 32768), 1, 1),
                 OP + r"x.size\(-1\) must fit int16 indices, got 32768"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rejects(case):
    make, msg = BAD[case]
    args = make()
    with pytest.raises(RuntimeError, match="^" + msg):
        outlier_split(*args)
    with pytest.raises(RuntimeError, match="^" + msg):
        with FakeTensorMode() as mode:
            outlier_split(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
