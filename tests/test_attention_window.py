"""kvq::quant_attention's position frame and score options: ``q_offset`` (the position of the
first quantized token, > 0 once a sliding-window store freed blocks), ``window`` (a query at q
sees ``q - W < p <= q``) and ``softcap`` (Gemma 2: scores ``c * tanh(s / c)``).

(a) reference sweeps with the FlashAttention-style bound of test_attention.py (kernel vs the
    float32 reference vs a float64 truth that applies window and cap on its own),
(b) hypothesis: a windowed fp-only store equals SDPA with transformers' sliding mask; moving
    every position by a constant changes nothing; freeing the blocks a window no longer sees
    (and raising q_offset) changes nothing - the invariant the sliding-window store relies on,
(c) opcheck and torch.compile, (d) bad arguments, with identical kernel and fake messages.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from store_factory import ARG_NAMES, assert_same, make_attention_args
from test_attention import FLOATS, WIDTHS, _cycle, check

quant_attention = torch.ops.kvq.quant_attention

# ---------------------------------------------------------------------------------------------
# (a) reference sweeps
# ---------------------------------------------------------------------------------------------

# (q_offset, window, softcap): offsets 0 / small / past many freed blocks; windows from 1 (a
# query sees only itself) to wider than the store; caps that bite (1) and that barely do (20)
FRAMES = [
    (0, None, 1.0), (5, 1, None), (37, 7, None), (1000, 33, 20.0), (64, 100, None),
    (3, 40, 1.0), (0, 2, 20.0), (200, 65, None),
]
SWEEP = list(itertools.product(range(len(FRAMES)), [1, 3, 17], [False, True]))


@pytest.mark.parametrize(
    "i", range(len(SWEEP)),
    ids=[f"off{FRAMES[f][0]}-W{FRAMES[f][1]}-cap{FRAMES[f][2]}-L{l}-{'excl' if e else 'noexcl'}"
         for f, l, e in SWEEP])
def test_matches_reference_with_window_offset_softcap(i):
    f, L, excl = SWEEP[i]
    q_offset, window, softcap = FRAMES[f]
    kw, vw = _cycle(WIDTHS, i)
    a = make_attention_args(
        B=2, Hq=_cycle([4, 6, 8], i), Hkv=2, L=L, D=_cycle([64, 128, 256], i // 2), k_widths=kw,
        v_widths=vw, group_size=_cycle([8, 32, 16], i), v_group_size=32, F=_cycle([5, 9, 40], i),
        n_empty=_cycle([1, 0, 2], i), q_exclude=excl, n_k_outliers=_cycle([0, 2], i),
        n_v_outliers=_cycle([1, 0, 2], i), scale_dtype=_cycle([torch.float16, torch.float32], i),
        fp_dtype=_cycle(FLOATS, i // 3), q_dtype=_cycle(FLOATS, i), causal=True,
        return_stats=i % 3 != 2, scale=_cycle([None, 1.0], i // 5), seed=3000 + i,
        q_offset=q_offset, window=window, softcap=softcap)
    check(a)


@pytest.mark.parametrize("softcap", [0.5, 5.0, 50.0])
def test_softcap_without_causal(softcap):
    a = make_attention_args(B=2, Hq=4, Hkv=2, L=3, D=64, k_widths=(4, 2), F=7, causal=False,
                            return_stats=True, scale=1.0, seed=7, softcap=softcap)
    check(a)


def test_window_one_sees_only_itself():
    """W = 1: each query's output is its own token's value."""
    a = make_attention_args(B=1, Hq=2, Hkv=1, L=3, D=64, k_widths=(2,), F=6, n_empty=0,
                            causal=True, seed=5, q_offset=11, window=1)
    out, lse, _ = quant_attention(*a.args())
    fp_pos, v_fp = a["fp_pos"][0], a["v_fp"][0, 0]
    end = int(fp_pos.max()) + 1
    for l in range(3):
        slot = int((fp_pos == end - 3 + l).nonzero())
        torch.testing.assert_close(out[0, :, l], v_fp[slot].expand(2, -1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) hypothesis properties
# ---------------------------------------------------------------------------------------------


@st.composite
def windowed_fp_case(draw):
    """An fp-only store holding positions start..start+n-1 (random slots), a window, L <= n."""
    B, Hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    F = draw(st.integers(1, 40))
    n = draw(st.integers(1, F))
    L = draw(st.integers(1, min(n, 6)))
    start = draw(st.integers(0, 500))
    window = draw(st.integers(1, n + 3))
    softcap = draw(st.sampled_from([None, 2.0, 30.0]))
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    fp_pos = torch.full((B, F), -1, dtype=torch.int64)
    for b in range(B):
        fp_pos[b, torch.randperm(F, generator=gen)[:n]] = start + torch.arange(n)
    a = make_attention_args(B=B, Hq=Hkv * g, Hkv=Hkv, L=L, D=32, k_widths=(), group_size=8,
                            v_group_size=8, F=F, q_dtype=dtype, fp_dtype=dtype, causal=True,
                            seed=seed, window=window, softcap=softcap)
    return a.replace(fp_pos=fp_pos)


SDPA_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


@given(windowed_fp_case())
def test_property_window_equals_sliding_sdpa(a):
    """transformers' sliding mask: kv_idx > q_idx - sliding_window, on top of causal."""
    query, k, v, fp_pos = a["query"], a["k_fp"], a["v_fp"], a["fp_pos"]
    B, Hq, L, D = query.shape
    Hkv, W, cap = k.shape[1], a["window"], a["softcap"]
    qpos = (fp_pos.amax(1) + 1)[:, None] - L + torch.arange(L)  # [B, L]
    kp = fp_pos[:, None, None, :]
    mask = (kp >= 0) & (kp <= qpos[:, None, :, None]) & (kp > qpos[:, None, :, None] - W)
    s = torch.einsum("bhld,bhtd->bhlt", query.float(), k.float().repeat_interleave(Hq // Hkv, 1))
    s = s * a["scale"]
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~mask, float("-inf"))
    want = s.softmax(-1) @ v.float().repeat_interleave(Hq // Hkv, 1)
    out, lse, _ = quant_attention(*a.args())
    rtol, atol = SDPA_TOL[query.dtype]
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(lse, s.logsumexp(-1), rtol=1e-5, atol=1e-5)
    if cap is None:  # and the same as SDPA itself
        sdpa = F_.scaled_dot_product_attention(query.float(), k.float(), v.float(), attn_mask=mask,
                                               scale=a["scale"], enable_gqa=Hq != Hkv)
        torch.testing.assert_close(out.float(), sdpa, rtol=rtol, atol=atol)


@st.composite
def store_frame_case(draw):
    NB = draw(st.integers(1, 4))
    kw = [draw(st.sampled_from([0, 2, 3, 4, 8])) for _ in range(NB)]
    vw = [0 if w == 0 else draw(st.integers(1, 8)) for w in kw]
    G = draw(st.sampled_from([8, 16]))
    return make_attention_args(
        B=draw(st.integers(1, 2)), Hq=4, Hkv=draw(st.sampled_from([1, 2])),
        L=draw(st.sampled_from([1, 2, 5])), D=32, k_widths=kw, v_widths=vw, group_size=G,
        v_group_size=32, F=draw(st.integers(1, 12)), n_empty=draw(st.integers(0, 2)),
        q_exclude=draw(st.booleans()), n_k_outliers=draw(st.integers(0, 2)),
        n_v_outliers=draw(st.integers(0, 1)), causal=True, return_stats=True,
        seed=draw(st.integers(0, 2**31 - 1)), q_offset=draw(st.integers(0, 300)),
        window=draw(st.one_of(st.none(), st.integers(1, NB * G + 12))),
        softcap=draw(st.sampled_from([None, 3.0])))


@given(store_frame_case(), st.integers(1, 1000))
def test_property_shifting_every_position_changes_nothing(a, shift):
    b = a.replace(q_offset=a["q_offset"] + shift,
                  fp_pos=torch.where(a["fp_pos"] >= 0, a["fp_pos"] + shift, -1))
    for x, y in zip(quant_attention(*a.args()), quant_attention(*b.args())):
        assert_same(x, y)


def _drop_blocks(a, k: int):
    """The argument set with its first k blocks freed as the store frees them: the other blocks
    move to the front of every block tensor and q_offset grows by k blocks."""
    G, D = a["group_size"], a["query"].shape[-1]
    kb, vb = a["k_bits"].tolist(), a["v_bits"].tolist()
    k_gone, v_gone = sum(G * D * w // 8 for w in kb[:k]), sum(G * D * w // 8 for w in vb[:k])
    ch = dict(k_codes=a["k_codes"][:, :, k_gone:], v_codes=a["v_codes"][:, :, v_gone:],
              k_bits=a["k_bits"][k:], v_bits=a["v_bits"][k:], k_scale=a["k_scale"][:, :, k:],
              k_zero=a["k_zero"][:, :, k:], v_scale=a["v_scale"][:, :, k * G:],
              v_zero=a["v_zero"][:, :, k * G:], q_offset=a["q_offset"] + k * G)
    if a["q_exclude"] is not None:
        ch["q_exclude"] = a["q_exclude"][:, k * G:]
    for name in ("k_outlier_index", "k_outlier_value", "v_outlier_index", "v_outlier_value"):
        if a[name] is not None:
            ch[name] = a[name][:, :, k * G:]
    return a.replace(**ch)


@settings(deadline=None)
@given(store_frame_case())
def test_property_freeing_blocks_out_of_the_window_changes_nothing(a):
    """Blocks no query sees any more (entirely before every query's window) can be freed:
    out and lse stay the same, and the stats of the remaining tokens too."""
    G, L, NB = a["group_size"], a["query"].shape[2], a["k_bits"].numel()
    window = a["window"] or 1
    a = a.replace(window=window)
    out, lse, stats = quant_attention(*a.args())
    # Each row's frame: one past its newest held position; its oldest query (end - L) sees
    # positions > end - L - window. Blocks ending before every row's cut can go.
    used = (a["k_bits"] > 0).repeat_interleave(G)[None].expand(a["fp_pos"].shape[0], -1)
    if a["q_exclude"] is not None:
        used = used & ~a["q_exclude"]
    q_pos = torch.where(used, a["q_offset"] + torch.arange(NB * G)[None], -1)
    end = torch.cat([q_pos, a["fp_pos"]], 1).amax(1) + 1
    cut = int(end.min()) - L - window + 1
    k = max(0, min(NB, (cut - a["q_offset"]) // G))
    if k == 0:
        return
    b = _drop_blocks(a, k)
    out2, lse2, stats2 = quant_attention(*b.args())
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats2, stats[:, :, k * G:], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (c) opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

OPCHECK = [
    dict(k_widths=(2, 4), F=5, causal=True, q_offset=9, window=20, return_stats=True),
    dict(k_widths=(3, 0, 8), F=7, L=3, causal=True, q_offset=0, window=1, softcap=2.0,
         q_exclude=True, n_k_outliers=1, n_v_outliers=1),
    dict(k_widths=(4,), F=3, L=2, causal=False, softcap=30.0, return_stats=True),
]


@pytest.mark.parametrize("i", range(len(OPCHECK)))
def test_opcheck(i):
    a = make_attention_args(D=64, group_size=32, seed=40 + i, **OPCHECK[i])
    torch.library.opcheck(quant_attention.default, a.args())


@pytest.mark.parametrize("i", range(2))
def test_compile_aot_eager(i):
    a = make_attention_args(D=64, group_size=32, seed=50 + i, **OPCHECK[i])
    names = [n for n, v in a.kw.items() if isinstance(v, torch.Tensor)]

    def fn(*tensors):
        kw = dict(a.kw)
        kw.update(zip(names, tensors))
        return torch.ops.kvq.quant_attention(*(kw[n] for n in ARG_NAMES))

    tensors = [a.kw[n] for n in names]
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*tensors)
    for x, y in zip(got, fn(*tensors)):
        assert_same(x, y)


# ---------------------------------------------------------------------------------------------
# (d) bad arguments: the kernel and the fake say the same
# ---------------------------------------------------------------------------------------------

OP = "kvq::quant_attention: "
BAD = {
    "q_offset_negative": (dict(q_offset=-1), OP + r"q_offset \(the position of quantized token 0\) must be >= 0, got -1"),
    "window_zero": (dict(window=0, causal=True), OP + r"window must be >= 1 \(the positions a query sees, its own included\), got 0"),
    "window_not_causal": (dict(window=4, causal=False), OP + r"window needs causal=True \(it is measured back from each query's position\)"),
    "softcap_zero": (dict(softcap=0.0), OP + r"softcap must be a positive finite number \(or None for no capping\)"),
    "softcap_negative": (dict(softcap=-3.0), OP + r"softcap must be a positive finite number"),
    "softcap_inf": (dict(softcap=float("inf")), OP + r"softcap must be a positive finite number"),
    "softcap_nan": (dict(softcap=float("nan")), OP + r"softcap must be a positive finite number"),
}


def _bad_args(case):
    a = make_attention_args(B=2, Hq=4, Hkv=2, D=64, k_widths=(2, 4), F=5, seed=0)
    return a.replace(**BAD[case][0]).args()


@pytest.mark.parametrize("case", list(BAD))
def test_rejects_with_the_fakes_message(case):
    args = _bad_args(case)
    with pytest.raises(RuntimeError, match="^" + BAD[case][1]) as kernel:
        quant_attention(*args)
    with pytest.raises(RuntimeError, match="^" + BAD[case][1]) as fake:
        with FakeTensorMode() as mode:
            quant_attention(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args])
    assert str(kernel.value).splitlines()[0] == str(fake.value).splitlines()[0]
