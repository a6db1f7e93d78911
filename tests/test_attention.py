"""Tests of kvq::quant_attention (CPU kernel, fake, reference).

(a) reference sweeps (bit mixes incl. unused blocks, group sizes, head_dim, GQA, odd L,
    causal, q_exclude, outliers, dtypes, F=0 / NB=0, stats) with a FlashAttention-style bound:
    the kernel's error against a float64 ground truth is at most 2x the error of the reference
    (float32 compute, outputs in the tested dtype) plus a tiny atol,
(b) hypothesis: an all-full-precision store equals scaled_dot_product_attention; the output is
    a convex combination of the values,
(c) memory: a decode step over 8k tokens at 2 bits allocates nothing proportional to T x D,
(d) opcheck, (e) torch.compile (aot_eager and inductor), (f) bad inputs.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F_
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torchkvq
from torchkvq import reference as ref

from store_factory import (
    ARG_NAMES,
    assert_flash_close,
    assert_same,
    attention_f64,
    held_tokens_f64,
    make_attention_args,
    nan_cases,
)

quant_attention = torch.ops.kvq.quant_attention
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check(a, factor: float = 2.0):
    """Kernel vs reference vs float64 truth for one argument set; returns the kernel outputs."""
    got = quant_attention(*a.args())
    want = ref.quant_attention(*a.args())
    truth = attention_f64(a)
    out, lse, stats = got
    B, Hq, L, D = a["query"].shape
    Hkv = a["k_fp"].shape[1]
    assert out.dtype == a["query"].dtype and out.shape == (B, Hq, L, D)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, L)
    assert stats.dtype == torch.float32
    if a["return_stats"]:
        assert stats.shape == (B, Hkv, a.tokens_held)
        assert_flash_close(stats, want[2], truth[2], "stats", factor)
    else:
        assert stats.numel() == 0
    assert_flash_close(out, want[0], truth[0], "out", factor)
    assert_flash_close(lse, want[1], truth[1], "lse", factor)
    return got


# ---------------------------------------------------------------------------------------------
# (a) reference sweeps
# ---------------------------------------------------------------------------------------------

# (key widths, value widths); 0 = unused block, at the same places in both
WIDTHS = [
    ((2, 0, 4), (2, 0, 3)),
    ((1, 8, 0, 3), (5, 2, 0, 8)),
    ((0, 2), (0, 2)),
    ((4, 4, 4), (4, 4, 4)),
    ((8,), (1,)),
    ((3, 6, 7, 0, 5), (6, 7, 1, 0, 2)),
]
GQA = [(2, 2), (6, 2), (8, 2), (8, 1)]  # (Hq, Hkv): ratios 1, 3, 4, 8


def _cycle(values, i):
    return values[i % len(values)]


MAIN = list(itertools.product(FLOATS, [64, 128, 256], GQA))


@pytest.mark.parametrize("i", range(len(MAIN)),
                         ids=[f"{dt_id(q)}-D{d}-{h}x{k}" for q, d, (h, k) in MAIN])
def test_matches_reference_dtypes_dims_gqa(i):
    q_dtype, D, (Hq, Hkv) = MAIN[i]
    kw, vw = _cycle(WIDTHS, i)
    a = make_attention_args(
        B=2, Hq=Hq, Hkv=Hkv, L=_cycle([1, 3, 17], i), D=D, k_widths=kw, v_widths=vw,
        group_size=_cycle([8, 32, 64], i // 3), v_group_size=_cycle([32, 64], i // 2),
        F=_cycle([5, 9, 40], i // 5), n_empty=_cycle([1, 0, 3], i),
        q_exclude=bool(i % 2), n_k_outliers=_cycle([0, 2, 1], i), n_v_outliers=_cycle([1, 0], i),
        scale_dtype=_cycle([torch.float16, torch.float32], i // 4),
        fp_dtype=_cycle(FLOATS, i // 2), q_dtype=q_dtype, causal=bool(i // 2 % 2),
        return_stats=i % 3 != 1, seed=i)
    check(a)


SECOND = list(itertools.product([1, 3, 17], [False, True], [8, 32, 64], [False, True],
                                [False, True]))


@pytest.mark.parametrize(
    "i", range(len(SECOND)),
    ids=[f"L{l}-{'causal' if c else 'full'}-G{g}-{'excl' if e else 'noexcl'}-{'out' if o else 'noout'}"
         for l, c, g, e, o in SECOND])
def test_matches_reference_lengths_masks_outliers(i):
    L, causal, G, excl, outl = SECOND[i]
    kw, vw = _cycle(WIDTHS, i)
    a = make_attention_args(
        B=2, Hq=4, Hkv=_cycle([1, 2], i), L=L, D=64, k_widths=kw, v_widths=vw, group_size=G,
        v_group_size=_cycle([32, 64], i), F=_cycle([3, 9, 33], i), n_empty=_cycle([0, 1, 2], i),
        q_exclude=excl, n_k_outliers=3 if outl else 0, n_v_outliers=2 if outl else 0,
        scale_dtype=_cycle([torch.float32, torch.float16], i),
        fp_dtype=_cycle(FLOATS, i // 3), q_dtype=_cycle(FLOATS, i), causal=causal,
        return_stats=True, seed=1000 + i)
    check(a)


EDGE_CASES = ["F0", "NB0", "NB0_F0", "all_unused_blocks", "all_fp_empty", "all_excluded",
              "unused_and_empty", "pool_slack"]
def _edge_params():
    for case, causal, q_dtype in itertools.product(EDGE_CASES, [False, True], FLOATS):
        yield pytest.param(case, causal, q_dtype,
                           id=f"{case}-{'causal' if causal else 'full'}-{dt_id(q_dtype)}")


@pytest.mark.parametrize("case, causal, q_dtype", list(_edge_params()))
def test_edge_cases(case, causal, q_dtype):
    kw = dict(B=2, Hq=4, Hkv=2, L=3, D=64, k_widths=(2, 4), group_size=32, v_group_size=32, F=5,
              n_empty=1, q_dtype=q_dtype, causal=causal, return_stats=True,
              seed=len(case) + causal)
    kw.update({
        "F0": dict(F=0, n_empty=0),
        "NB0": dict(k_widths=()),
        "NB0_F0": dict(k_widths=(), F=0, n_empty=0),
        "all_unused_blocks": dict(k_widths=(0, 0, 0)),
        "all_fp_empty": dict(n_empty=5),
        "all_excluded": dict(q_exclude=True),
        "unused_and_empty": dict(k_widths=(0, 0), n_empty=5),
        "pool_slack": dict(pool_slack=100, n_k_outliers=1),
    }[case])
    a = make_attention_args(**kw)
    if case == "all_excluded":
        a = a.replace(q_exclude=torch.ones_like(a["q_exclude"]))
    out, lse, stats = check(a)
    if case in ("NB0_F0", "unused_and_empty"):  # nothing held: output 0, lse -inf
        assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
        assert bool((stats == 0).all())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_store_kernel_only(causal):
    """No tokens at all (NB=0, F=0): out 0, lse -inf, empty stats; checked without the
    reference (which fails on this input with causal=True, see test_edge_cases)."""
    a = make_attention_args(B=2, Hq=4, Hkv=2, L=3, D=64, k_widths=(), F=0, n_empty=0,
                            causal=causal, return_stats=True, q_dtype=torch.float16)
    out, lse, stats = quant_attention(*a.args())
    assert out.shape == (2, 4, 3, 64) and out.dtype == torch.float16 and bool((out == 0).all())
    assert lse.shape == (2, 4, 3) and bool(torch.isneginf(lse).all())
    assert stats.shape == (2, 2, 0)


def test_query_that_sees_nothing():
    """Causal, L=17, the only held tokens are late: the first queries see nothing (out 0,
    lse -inf, no contribution to stats), the others do."""
    a = make_attention_args(B=1, Hq=2, Hkv=1, L=17, D=64, k_widths=(0, 2), group_size=32, F=0,
                            n_empty=0, causal=True, return_stats=True, seed=3)
    # quantized tokens 32..63 are held: end = 64, queries at positions 47..63 all see some;
    # exclude tokens 32..50 so the queries at 47..50 see nothing.
    excl = torch.zeros(1, 64, dtype=torch.bool)
    excl[0, 32:51] = True
    a = a.replace(q_exclude=excl)
    out, lse, _ = check(a)
    assert bool(torch.isneginf(lse[..., :4]).all()) and bool((out[..., :4, :] == 0).all())
    assert bool(torch.isfinite(lse[..., 4:]).all())


@pytest.mark.parametrize("threads", [1, 4], ids=["1-thread", "4-threads"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_nan_and_inf_propagate_like_sdpa(causal, threads):
    """A row with a NaN or +inf score among the tokens it sees (a NaN/Inf in its query or in a
    key) comes out NaN, out and lse, like SDPA - not 0 as a row that sees nothing, not finite
    garbage; every other row is what it would be without the poison. Poisoned rows give the
    stats nothing. With 4 threads each (batch, kv head) is split and merged by log-sum-exp."""
    a, want = nan_cases(causal)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, lse, stats = quant_attention(*a.args())
    finally:
        torch.set_num_threads(n)
    r_out, r_lse, r_stats = ref.quant_attention(*a.args())
    for got, name in ((out, "out"), (r_out, "reference out")):
        assert torch.equal(got.isnan().all(-1), want), name
        assert not bool(got[~want].isnan().any()), name
    for got, name in ((lse, "lse"), (r_lse, "reference lse")):
        assert torch.equal(got.isnan(), want) and bool(got[~want].isfinite().all()), name
    assert bool(stats.isfinite().all()) and bool(r_stats.isfinite().all())
    torch.testing.assert_close(out[~want], r_out[~want], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse[~want], r_lse[~want], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats, r_stats, atol=1e-4, rtol=1e-4)


def test_unused_blocks_are_never_read():
    """Unused blocks have NaN scales (store_factory); codes that would be theirs are garbage."""
    a = make_attention_args(B=1, Hq=2, Hkv=1, L=2, D=64, k_widths=(0, 3, 0), group_size=32,
                            F=4, return_stats=True, seed=4, pool_slack=64)
    out, lse, stats = check(a)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    assert bool((stats[..., :32] == 0).all()) and bool((stats[..., 64:96] == 0).all())


def test_stats_are_probabilities():
    a = make_attention_args(B=2, Hq=8, Hkv=2, L=3, D=64, k_widths=(2, 4, 0), group_size=32, F=9,
                            q_exclude=True, causal=True, return_stats=True, seed=5)
    _, lse, stats = check(a)
    assert bool((stats >= 0).all()) and bool((stats <= 1 + 1e-6).all())
    _, _, valid, _ = held_tokens_f64(a)
    assert bool((stats[~valid[:, None, :].expand_as(stats)] == 0).all())


def test_non_contiguous_inputs():
    a = make_attention_args(B=2, Hq=4, Hkv=2, L=3, D=64, k_widths=(2, 4), group_size=32, F=6,
                            q_exclude=True, n_k_outliers=2, n_v_outliers=2, causal=True,
                            return_stats=True, seed=6)

    def nc(t):  # same values, transposed storage
        if t is None or t.dim() < 2:
            return t
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    b = a.replace(**{k: nc(v) for k, v in a.kw.items() if isinstance(v, torch.Tensor)})
    assert not b["query"].is_contiguous()
    for x, y in zip(quant_attention(*b.args()), quant_attention(*a.args())):
        assert_same(x, y)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("Hq, Hkv", [(8, 1), (9, 3)], ids=["one-kv-head", "three-kv-heads"])
def test_results_do_not_depend_on_thread_count(Hq, Hkv, threads):
    """Work items are (batch, kv head, token range), as many as the threads share evenly (3 kv
    heads on 2 threads: 4 ranges each); each thread count splits differently."""
    a = make_attention_args(B=1, Hq=Hq, Hkv=Hkv, L=1, D=128, k_widths=(2,) * 12, group_size=32,
                            F=40, causal=True, return_stats=True, seed=7)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        many = quant_attention(*a.args())
        torch.set_num_threads(1)
        one = quant_attention(*a.args())
    finally:
        torch.set_num_threads(n)
    truth = attention_f64(a)
    for x, y, t, name in zip(many, one, truth, ("out", "lse", "stats")):
        assert_flash_close(x, y, t, name)
        assert_flash_close(y, x, t, name)


def test_wrapper_matches_op():
    a = make_attention_args(seed=8, return_stats=True, q_exclude=True, n_k_outliers=1)
    for x, y in zip(torchkvq.ops.quant_attention(*a.args()), quant_attention(*a.args())):
        assert_same(x, y)


# ---------------------------------------------------------------------------------------------
# (b) hypothesis properties
# ---------------------------------------------------------------------------------------------

SDPA_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


@st.composite
def fp_only_case(draw):
    """A store with no quantized blocks: F fp slots holding positions 0..n-1 in a random order,
    the other slots empty; L <= n so that every query sees something."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 3, 4]))
    D = draw(st.sampled_from([8, 16, 64, 72]))
    F = draw(st.integers(1, 40))
    n = draw(st.integers(1, F))
    L = draw(st.integers(1, min(n, 6)))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    fp_pos = torch.full((B, F), -1, dtype=torch.int64)
    for b in range(B):
        fp_pos[b, torch.randperm(F, generator=gen)[:n]] = torch.arange(n)
    a = make_attention_args(B=B, Hq=Hkv * g, Hkv=Hkv, L=L, D=D, k_widths=(), group_size=8,
                            v_group_size=8, F=F, q_dtype=dtype, fp_dtype=dtype, causal=causal,
                            return_stats=True, seed=seed)
    return a.replace(fp_pos=fp_pos)


@given(fp_only_case())
def test_property_fp_only_equals_sdpa(a):
    query, k, v, fp_pos = a["query"], a["k_fp"], a["v_fp"], a["fp_pos"]
    B, Hq, L, D = query.shape
    Hkv = k.shape[1]
    valid = fp_pos >= 0
    mask = valid[:, None, None, :].expand(B, 1, L, fp_pos.shape[1])
    if a["causal"]:  # the queries are the last L positions held (bottom-right aligned)
        end = fp_pos.amax(1) + 1
        qpos = end[:, None] - L + torch.arange(L)
        mask = mask & (fp_pos[:, None, None, :] <= qpos[:, None, :, None])
    want = F_.scaled_dot_product_attention(query.float(), k.float(), v.float(), attn_mask=mask,
                                           scale=a["scale"], enable_gqa=Hq != Hkv)
    out, lse, stats = quant_attention(*a.args())
    rtol, atol = SDPA_TOL[query.dtype]
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    s = torch.einsum("bhld,bhtd->bhlt", query.float(),
                     k.float().repeat_interleave(Hq // Hkv, 1)) * a["scale"]
    want_lse = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@st.composite
def store_case(draw):
    NB = draw(st.integers(0, 4))
    kw = [draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8])) for _ in range(NB)]
    vw = [0 if w == 0 else draw(st.integers(1, 8)) for w in kw]
    return make_attention_args(
        B=draw(st.integers(1, 2)), Hq=4, Hkv=draw(st.sampled_from([1, 2, 4])),
        L=draw(st.sampled_from([1, 2, 5])), D=draw(st.sampled_from([32, 64])),
        k_widths=kw, v_widths=vw, group_size=draw(st.sampled_from([8, 16, 32])),
        v_group_size=32, F=draw(st.integers(0, 12)), n_empty=draw(st.integers(0, 3)),
        q_exclude=draw(st.booleans()), n_k_outliers=draw(st.integers(0, 2)),
        n_v_outliers=draw(st.integers(0, 2)),
        scale_dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        fp_dtype=draw(st.sampled_from(FLOATS)), q_dtype=draw(st.sampled_from(FLOATS)),
        causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.01, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)))


@given(store_case())
def test_property_output_is_convex_combination(a):
    """Every output channel lies within the range of that channel over the values held."""
    out, lse, _ = quant_attention(*a.args())
    _, values, valid, _ = held_tokens_f64(a)  # [B, Hkv, T, D]
    B, Hq, L, D = out.shape
    if values.shape[2] == 0:  # nothing held
        assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
        return
    g = Hq // values.shape[1]
    v = values.masked_fill(~valid[:, None, :, None], float("nan"))
    hi = v.nan_to_num(float("-inf")).amax(2).repeat_interleave(g, 1)[:, :, None]  # [B, Hq, 1, D]
    lo = v.nan_to_num(float("inf")).amin(2).repeat_interleave(g, 1)[:, :, None]
    o = out.double()
    # rounding of the output to its dtype, plus float32 accumulation
    eps = 2 * torch.finfo(out.dtype).eps + 32 * torch.finfo(torch.float32).eps
    slack = eps * torch.maximum(hi.abs(), lo.abs()) + 1e-6
    seen = torch.isfinite(lse)[..., None]
    assert bool(((o <= hi + slack) | ~seen).all()) and bool(((o >= lo - slack) | ~seen).all())
    assert bool((o.abs() <= torch.maximum(hi.abs(), lo.abs()) + slack).all() | (~seen).all())
    assert bool((o[~seen.expand_as(o)] == 0).all())


# ---------------------------------------------------------------------------------------------
# (c) memory: a decode step reads the packed codes, it never materializes T x D floats
# ---------------------------------------------------------------------------------------------

MEM_T, MEM_D, MEM_G = 8192, 128, 32


def decode_store(T: int, Hkv: int = 2, Hq: int = 8, D: int = MEM_D, G: int = MEM_G, bits: int = 2):
    """A 2-bit store of T tokens built from random codes (valid by construction), plus 16 fp
    slots; built without any T x D float temporary."""
    gen = torch.Generator().manual_seed(T)
    NB = T // G
    nbytes = T * D * bits // 8
    return (
        torch.randn(1, Hq, 1, D, generator=gen),
        torch.randint(0, 256, (1, Hkv, nbytes), dtype=torch.uint8, generator=gen),
        (torch.rand(1, Hkv, NB, D, generator=gen) * 0.5).half(),
        (-torch.rand(1, Hkv, NB, D, generator=gen)).half(),
        torch.full((NB,), bits, dtype=torch.int32),
        torch.randint(0, 256, (1, Hkv, nbytes), dtype=torch.uint8, generator=gen),
        (torch.rand(1, Hkv, T, D // 32, generator=gen) * 0.5).half(),
        (-torch.rand(1, Hkv, T, D // 32, generator=gen)).half(),
        torch.full((NB,), bits, dtype=torch.int32),
        torch.randn(1, Hkv, 16, D, generator=gen),
        torch.randn(1, Hkv, 16, D, generator=gen),
        torch.arange(T, T + 16)[None].clone(),
        None, None, None, None, None, G, 32, D ** -0.5, True, False,
    )


def peak_allocated_in(fn) -> int:
    """Peak of the bytes allocated through the c10 allocator (any thread) while `fn` runs, as
    recorded by torch.profiler(profile_memory=True)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("kvq_test_measured"):
            fn()
    events = prof.profiler.kineto_results.events()
    (region,) = [e for e in events if e.name() == "kvq_test_measured"]
    t0, t1 = region.start_ns(), region.start_ns() + region.duration_ns()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and t0 <= e.start_ns() <= t1)
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_decode_allocates_nothing_proportional_to_history_profiler():
    args = decode_store(MEM_T)
    limit = MEM_T * MEM_D * 4 // 4
    peak = peak_allocated_in(lambda: quant_attention(*args))
    assert peak < limit, f"kvq::quant_attention allocated {peak} bytes (limit {limit})"
    # The measurement sees T x D temporaries: the reference dequantizes the whole history.
    assert peak_allocated_in(lambda: ref.quant_attention(*args)) > MEM_T * MEM_D * 4


_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch
    import torchkvq
    sys.path.insert(0, {tests!r})
    from test_attention import decode_store

    def growth(fn):  # peak resident set while fn runs, above the resident set before it
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS (Linux >= 4.0)
        before = _status("VmRSS")
        fn()
        return _status("VmHWM") - before

    def _status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    op = torch.ops.kvq.quant_attention
    op(*decode_store(256))  # start the thread pool on a small store
    args = decode_store({T})
    grew = growth(lambda: op(*args))
    # Control: a T x D float32 temporary, written like a dequantized history would be.
    control = growth(lambda: torch.empty({T} * {D}, dtype=torch.float32).fill_(1.0))
    print(grew, control)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_decode_peak_rss_is_not_proportional_to_history():
    """The profiler misses the kernel's own std::vector buffers; the peak resident set (VmHWM,
    reset just before the call) of a fresh process sees every allocation that is touched."""
    script = _RSS_SCRIPT.format(tests=os.path.dirname(__file__), T=MEM_T, D=MEM_D)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    grew, control = (int(x) for x in res.stdout.split()[-2:])
    limit = MEM_T * MEM_D * 4 // 4
    assert control > limit, f"the RSS measurement missed a T x D temporary ({control} bytes)"
    assert grew < limit, f"the decode step grew the peak RSS by {grew} bytes (limit {limit})"


# ---------------------------------------------------------------------------------------------
# (d) opcheck
# ---------------------------------------------------------------------------------------------

OPCHECK = [
    dict(q_dtype=torch.float32, return_stats=False),
    dict(q_dtype=torch.float16, fp_dtype=torch.bfloat16, q_exclude=True, n_k_outliers=2,
         n_v_outliers=1, causal=True, return_stats=True, L=3),
    dict(q_dtype=torch.bfloat16, scale_dtype=torch.float32, k_widths=(0, 3), n_v_outliers=2,
         return_stats=True, Hq=4, Hkv=2),
    dict(k_widths=(), F=4, causal=True, return_stats=True),
    dict(F=0, n_empty=0, q_exclude=True, k_widths=(2, 2, 8)),
]


@pytest.mark.parametrize("i", range(len(OPCHECK)))
def test_opcheck(i):
    a = make_attention_args(D=64, group_size=32, seed=i, **OPCHECK[i])
    torch.library.opcheck(quant_attention.default, a.args())


# ---------------------------------------------------------------------------------------------
# (e) torch.compile
# ---------------------------------------------------------------------------------------------


def _run_compiled(a, backend):
    names = [n for n, v in a.kw.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        kw = dict(a.kw)
        kw.update(zip(names, tensors))
        kw["query"] = kw["query"] * 2.0  # some fp math around the op
        out, lse, stats = torch.ops.kvq.quant_attention(*(kw[n] for n in ARG_NAMES))
        return out + 1.0, lse, stats

    tensors = [a.kw[n] for n in names]
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend=backend)(*tensors)
    return got, fn(*tensors)


@pytest.mark.parametrize("i", range(3))
def test_compile_aot_eager(i):
    a = make_attention_args(D=64, group_size=32, seed=10 + i, **OPCHECK[i + 1])
    got, want = _run_compiled(a, "aot_eager")
    for x, y in zip(got, want):
        assert_same(x, y)


def test_compile_aot_eager_without_optionals():
    a = make_attention_args(D=64, group_size=32, seed=13, **OPCHECK[0])
    got, want = _run_compiled(a, "aot_eager")
    for x, y in zip(got, want):
        assert_same(x, y)


def test_compile_inductor():
    a = make_attention_args(D=64, group_size=32, seed=14, **OPCHECK[1])
    got, want = _run_compiled(a, "inductor")
    for x, y in zip(got, want):
        assert_same(x, y)


# ---------------------------------------------------------------------------------------------
# (f) bad inputs
# ---------------------------------------------------------------------------------------------

OP = "kvq::quant_attention: "


def _bad(**changes):
    """A valid argument set (B=2, Hq=4, Hkv=2, L=1, D=64, 3 blocks of 32, F=5) with `changes`
    applied: each value a function of the current value (and the whole set)."""
    def make():
        a = make_attention_args(B=2, Hq=4, Hkv=2, L=1, D=64, k_widths=(2, 0, 4), group_size=32,
                                v_group_size=32, F=5, q_exclude=True, n_k_outliers=2,
                                n_v_outliers=2, seed=0)
        return a.replace(**{k: f(a[k], a) for k, f in changes.items()})
    return make


# case: (make args, message regex matched by the kernel and by the fake)
BAD = {
    "query_float64": (_bad(query=lambda q, a: q.double()), OP + "query must be float32, float16 or bfloat16, got "),
    "query_rank3": (_bad(query=lambda q, a: q[0]), OP + r"query must be \[batch, q_heads, q_len, head_dim\], got rank 3"),
    "query_empty": (_bad(query=lambda q, a: q[:, :, :0]), OP + r"query must not be empty, got shape \[2, 4, 0, 64\]"),
    "k_fp_rank3": (_bad(k_fp=lambda t, a: t[0]), OP + r"k_fp must be \[batch, kv_heads, fp_tokens, head_dim\], got rank 3"),
    "heads_not_multiple": (_bad(query=lambda q, a: q[:, :3]), OP + r"query heads \(3\) must be a multiple of kv heads \(2\)"),
    "group_size_12": (_bad(group_size=lambda g, a: 12), OP + "group_size must be a positive multiple of 8"),
    "v_group_not_dividing": (_bad(v_group_size=lambda g, a: 48),
                             OP + "v_group_size must be a positive multiple of 8 dividing head_dim 64, got 48"),
    "v_group_not_multiple_of_8": (_bad(v_group_size=lambda g, a: 4),
                                  OP + "v_group_size must be a positive multiple of 8 dividing head_dim 64, got 4"),
    "k_fp_float64": (_bad(k_fp=lambda t, a: t.double()), OP + "k_fp must be float32, float16 or bfloat16, got "),
    "k_fp_head_dim": (_bad(k_fp=lambda t, a: t[..., :32]),
                      OP + r"k_fp must have shape \[2, 2, 5, 64\] \(batch, kv heads, fp tokens, head_dim\), got \[2, 2, 5, 32\]"),
    "v_fp_dtype": (_bad(v_fp=lambda t, a: t.half()), OP + "v_fp must have k_fp's dtype "),
    "v_fp_shape": (_bad(v_fp=lambda t, a: t[:, :, :4]),
                   OP + r"v_fp must have shape \[2, 2, 5, 64\] \(the shape of k_fp\), got \[2, 2, 4, 64\]"),
    "fp_pos_int32": (_bad(fp_pos=lambda t, a: t.int()), OP + "fp_pos must be int64, got "),
    "fp_pos_shape": (_bad(fp_pos=lambda t, a: t[:, :4]),
                     OP + r"fp_pos must have shape \[2, 5\] \(one position per batch row and fp token, -1 for an empty slot\), got \[2, 4\]"),
    "k_bits_int64": (_bad(k_bits=lambda t, a: t.long()),
                     OP + r"k_bits must be a 1-D int32 tensor \(one width per block\), got Long of rank 1"),
    "v_bits_uint8": (_bad(v_bits=lambda t, a: t.to(torch.uint8)),
                     OP + r"v_bits must be a 1-D int32 tensor \(one width per block\), got Byte of rank 1"),
    "k_bits_2d": (_bad(k_bits=lambda t, a: t[None]), OP + r"k_bits must be a 1-D int32 tensor .*got Int of rank 2"),
    "v_bits_length": (_bad(v_bits=lambda t, a: torch.cat([t, t[:1]])),
                      OP + r"v_bits must have shape \[3\] \(one width per block, like k_bits\), got \[4\]"),
    "k_codes_int8": (_bad(k_codes=lambda t, a: t.to(torch.int8)), OP + r"k_codes must be uint8 \[batch, kv_heads, bytes\]"),
    "v_codes_batch": (_bad(v_codes=lambda t, a: t[:1]), OP + r"v_codes must be uint8 \[batch, kv_heads, bytes\] = \[2, 2, n\], got Byte \[1, 2, "),
    "k_scale_bfloat16": (_bad(k_scale=lambda t, a: t.bfloat16()), OP + "k_scale must be float16 or float32, got "),
    "v_zero_dtype": (_bad(v_zero=lambda t, a: t.float()),
                     OP + r"v_zero must have k_scale's dtype Half \(scales and zeros share one dtype\), got Float"),
    "k_scale_shape": (_bad(k_scale=lambda t, a: t[:, :, :2]),
                      OP + r"k_scale must have shape \[2, 2, 3, 64\] \(one per block and channel\), got \[2, 2, 2, 64\]"),
    "k_zero_shape": (_bad(k_zero=lambda t, a: t[..., :32]), OP + r"k_zero must have shape \[2, 2, 3, 64\] \(the shape of k_scale\)"),
    "v_scale_shape": (_bad(v_scale=lambda t, a: t[:, :, :64]),
                      OP + r"v_scale must have shape \[2, 2, 96, 2\] \(one per token and channel group\), got \[2, 2, 64, 2\]"),
    "v_zero_groups": (_bad(v_zero=lambda t, a: t[..., :1]), OP + r"v_zero must have shape \[2, 2, 96, 2\] \(the shape of v_scale\)"),
    "q_exclude_uint8": (_bad(q_exclude=lambda t, a: t.to(torch.uint8)), OP + "q_exclude must be bool, got "),
    "q_exclude_shape": (_bad(q_exclude=lambda t, a: t[:, :64]),
                        OP + r"q_exclude must have shape \[2, 96\] \(one flag per batch row and quantized token\), got \[2, 64\]"),
    "k_index_without_value": (_bad(k_outlier_value=lambda t, a: None),
                              OP + "k_outlier_index and k_outlier_value must be given together"),
    "v_value_without_index": (_bad(v_outlier_index=lambda t, a: None),
                              OP + "v_outlier_index and v_outlier_value must be given together"),
    "k_index_int32": (_bad(k_outlier_index=lambda t, a: t.int()), OP + "k_outlier_index must be int16, got "),
    "v_value_dtype": (_bad(v_outlier_value=lambda t, a: t.half()), OP + "v_outlier_value must have k_fp's dtype "),
    "k_index_shape": (_bad(k_outlier_index=lambda t, a: t[:, :, :64], k_outlier_value=lambda t, a: t[:, :, :64]),
                      OP + r"k_outlier_index must have shape \[2, 2, 96, '?n'?\]"),
    "v_value_shape": (_bad(v_outlier_value=lambda t, a: t[..., :1]),
                      OP + r"v_outlier_value must have the shape of v_outlier_index \[2, 2, 96, 2\], got \[2, 2, 96, 1\]"),
    "k_index_too_many": (_bad(k_outlier_index=lambda t, a: torch.zeros(2, 2, 96, 65, dtype=torch.int16),
                              k_outlier_value=lambda t, a: torch.zeros(2, 2, 96, 65)),
                         OP + r"k_outlier_index (holds more outliers than head_dim|must have shape .* with n <= head_dim)"),
}

# Rules that depend on the values of k_bits/v_bits: only the kernel can check them.
BAD_DATA = {
    "k_bits_9": (_bad(k_bits=lambda t, a: torch.tensor([2, 0, 9], dtype=torch.int32)),
                 OP + r"k_bits must hold widths in \[0, 8\] \(0 = unused block\), got 9 at block 2"),
    "v_bits_negative": (_bad(v_bits=lambda t, a: torch.tensor([-1, 0, 4], dtype=torch.int32)),
                        OP + r"v_bits must hold widths in \[0, 8\] \(0 = unused block\), got -1 at block 0"),
    "k_pool_too_small": (_bad(k_codes=lambda t, a: t[..., :-1]),
                         OP + "k_codes holds 1535 bytes per head but the block widths need 1536"),
    "v_pool_too_small": (_bad(v_bits=lambda t, a: torch.tensor([2, 0, 5], dtype=torch.int32)),
                         OP + "v_codes holds 1536 bytes per head but the block widths need 1792"),
    "k_zero_v_nonzero": (_bad(v_bits=lambda t, a: torch.tensor([2, 1, 3], dtype=torch.int32)),
                         OP + "block 1 has k_bits 0 but v_bits 1; a block is used by both or neither"),
    "k_nonzero_v_zero": (_bad(v_bits=lambda t, a: torch.tensor([0, 0, 6], dtype=torch.int32)),
                         OP + "block 0 has k_bits 2 but v_bits 0; a block is used by both or neither"),
}


@pytest.mark.parametrize("case", list(BAD) + list(BAD_DATA))
def test_rejects(case):
    make, msg = {**BAD, **BAD_DATA}[case]
    with pytest.raises(RuntimeError, match="^" + msg):
        quant_attention(*make().args())


def _fake_call(args):
    with FakeTensorMode() as mode:
        return quant_attention(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                 for t in args])


@pytest.mark.parametrize("case", list(BAD))
def test_fake_rejects(case):
    make, msg = BAD[case]
    with pytest.raises(RuntimeError, match="^" + msg):
        _fake_call(make().args())


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_fake_accepts_data_dependent_errors(case):
    """The fake never reads data, so it cannot see these; the kernel does (test_rejects)."""
    out, lse, stats = _fake_call(BAD_DATA[case][0]().args())
    assert out.shape == (2, 4, 1, 64) and lse.shape == (2, 4, 1)


def test_compiled_call_raises_the_kernel_message():
    make, msg = BAD_DATA["k_zero_v_nonzero"]
    a = make()
    torch._dynamo.reset()
    fn = torch.compile(lambda *t: torch.ops.kvq.quant_attention(*t), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(RuntimeError, match=re.escape(msg.removeprefix(OP))):
        fn(*a.args())


# DESIGN.md: the fakes check the same shapes with the kernel's messages, word for word (the
# regexes above would accept some rewordings).
@pytest.mark.parametrize("case", list(BAD))
def test_fake_message_equals_kernel_message(case):
    args = BAD[case][0]().args()
    with pytest.raises(RuntimeError) as kernel:
        quant_attention(*args)
    with pytest.raises(RuntimeError) as fake:
        _fake_call(args)
    assert str(kernel.value).splitlines()[0] == str(fake.value).splitlines()[0]
