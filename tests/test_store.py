"""Tests of torchkvq.store.KVStore: what it holds, what it reconstructs, how attention reads it.

(a) round trip: tokens appended (prefill chunks and single decode tokens) and quantized in
    blocks come back from ``dequantized()`` within the quantizer's bound (keys per channel over
    each block's tokens, values per token in groups of channels: half a step plus what rounding
    scale and zero to their dtype costs); hypothesis over shapes, group sizes, widths 1-8 per
    block (mixed), outliers, store dtypes and pinned positions;
(b) byte accounting: ``nbytes()`` is the sum of every tensor attribute of the store (found by
    walking ``vars()``, not through the store's own list) and the breakdown sums to it;
(c) growth: 2000 single-token appends reallocate each tensor O(log T) times, ``reserve`` makes
    that zero; every token is quantized exactly once and written codes never change;
(d) pin / unpin, mark_padding (padding never attended to, never in key statistics);
(e) ``attend`` equals SDPA over ``dequantized()`` with the padding/causal mask (L=1 and L>1, GQA);
(f) bad input raises a clear error and leaves the store exactly as it was.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import torchkvq
from torchkvq import reference as ref
from torchkvq.store import KVStore, Outliers

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def rnd(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def kv_data(B, H, T, D, seed, outliers=False):
    """Keys with a few outlier channels (as real keys have) and values; optionally a few huge
    isolated entries per token that only outlier handling can keep exact."""
    k = rnd((B, H, T, D), seed)
    v = rnd((B, H, T, D), seed + 1)
    chan = torch.Generator().manual_seed(seed + 2)
    boost = torch.ones(D)
    boost[torch.randperm(D, generator=chan)[:3]] = 8.0
    k = k * boost + 0.5
    if outliers:
        g = torch.Generator().manual_seed(seed + 3)
        for x in (k, v):
            idx = torch.randint(0, D, (B, H, T, 1), generator=g)
            x.scatter_(-1, idx, 60.0 * torch.sign(torch.randn(B, H, T, 1, generator=g)))
    return k, v


def held_tensors(store) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the store, found independently of ``KVStore._tensors``."""
    return {n: t for n, t in vars(store).items() if isinstance(t, torch.Tensor)}


def tensor_bytes(store) -> int:
    return sum(t.numel() * t.element_size() for t in held_tensors(store).values())


def snapshot(store) -> dict:
    return {
        "n_tokens": store.n_tokens,
        "n_quantized": store.n_quantized,
        "block_bits": store.block_bits,
        "fp_positions": store.fp_positions,
        "pinned": store.pinned,
        "nbytes": store.nbytes(),
        "breakdown": store.nbytes_breakdown(),
        "tensors": {n: t.clone() for n, t in held_tensors(store).items()},
    }


def assert_unchanged(store, snap):
    now = snapshot(store)
    for key in ("n_tokens", "n_quantized", "block_bits", "fp_positions", "pinned", "nbytes", "breakdown"):
        assert now[key] == snap[key], key
    assert now["tensors"].keys() == snap["tensors"].keys()
    for name, t in snap["tensors"].items():
        u = now["tensors"][name]
        assert u.shape == t.shape and u.dtype == t.dtype, name
        assert torch.equal(u, t), name


def group_bound(g: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Per-group round-trip bound, groups along the last axis of float64 `g` ([..., 1])."""
    qmax = (1 << bits) - 1
    mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s_true = (mx - mn) / qmax
    s = s_true.to(scale_dtype).double()
    z = mn.to(scale_dtype).double()
    bound = s / 2 + (z - mn).abs() + qmax * (s - s_true).abs()
    return bound + 8 * torch.finfo(torch.float32).eps * (mn.abs() + mx.abs() + qmax * s) + 1e-12


def dense_and_mask(x: torch.Tensor, o: Outliers):
    """What the quantizer sees (outliers clipped away) and where the outliers are."""
    if o.count == 0:
        return x, torch.zeros_like(x, dtype=torch.bool)
    dense, index, _ = ref.outlier_split(x.float(), o.low, o.high)  # exact: x holds store-dtype values
    dense = dense.double()
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index.long(), True)
    return dense, mask


def expected_bounds(store, keys, values, valid=None):
    """Error bounds of the quantized copies of positions ``[0, n_quantized)``.

    `keys`/`values` are the appended tokens as the store holds them (cast to its dtype) as
    float64; `valid` ``[B, T]`` excludes padding from the key statistics."""
    G, D, vg = store.group_size, store.head_dim, store.value_group_size
    sdt = store.scale_dtype
    eps = torch.finfo(store.dtype).eps
    kb_all, vb_all = [], []
    for b, (kb, vb) in enumerate(store.block_bits):
        sl = slice(b * G, (b + 1) * G)
        k, v = keys[:, :, sl], values[:, :, sl]
        kd, kmask = dense_and_mask(k, store.key_outliers)
        vd, vmask = dense_and_mask(v, store.value_outliers)
        kt = kd.transpose(-1, -2)  # [B, H, D, G]: per channel over the block's tokens
        if valid is not None:
            real = valid[:, None, None, sl].expand_as(kt)
            lo = torch.where(real, kt, math.inf).amin(-1, keepdim=True)
            # padding does not count: the bound comes from the real tokens only
            kt = torch.where(real, kt, lo.where(lo.isfinite(), torch.zeros_like(lo)))
        kbound = group_bound(kt, kb, sdt).expand_as(kt).transpose(-1, -2)
        B, H = v.shape[:2]
        vbound = group_bound(vd.reshape(B, H, G, D // vg, vg), vb, sdt)
        vbound = vbound.expand(B, H, G, D // vg, vg).reshape(B, H, G, D)
        # outliers are kept as exact corrections (rounded to the store's dtype)
        kout = 2 * eps * (k.abs() + kd.abs().amax(-1, keepdim=True) + kbound) + 1e-6
        vout = 2 * eps * (v.abs() + vd.abs().amax(-1, keepdim=True) + vbound) + 1e-6
        kb_all.append(torch.where(kmask, kout, kbound))
        vb_all.append(torch.where(vmask, vout, vbound))
    if not kb_all:
        z = keys[:, :, :0]
        return z, z
    return torch.cat(kb_all, 2), torch.cat(vb_all, 2)


def quantized_copies(store):
    """(keys, values) float32 reconstructed from the quantized blocks only (pinned tokens too)."""
    s = copy.deepcopy(store)
    s.unpin(s.pinned)
    k, v, _ = s.dequantized()
    q = s.n_quantized
    return k[:, :, :q], v[:, :, :q]


def sdpa_over_store(store, query, valid=None, scale=None, causal=True):
    """float32 SDPA over ``store.dequantized()`` with the padding/causal mask (GQA by enable_gqa)."""
    k, v, pos = store.dequantized()
    B, Hq, L, D = query.shape
    T = k.shape[2]
    mask = torch.ones(B, L, T, dtype=torch.bool)
    if valid is not None:
        mask &= valid[:, None, :]
    if causal:
        qpos = T - L + torch.arange(L)
        mask &= pos[None, None, :] <= qpos[None, :, None]
    out = F.scaled_dot_product_attention(
        query.float(), k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )
    # a query that sees nothing gives 0 (SDPA gives NaN)
    return out.nan_to_num(0.0)


def sdpa_manual_repeat(store, query, causal=True):
    k, v, pos = store.dequantized()
    rep = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    L, T = query.shape[2], k.shape[2]
    s = query.float() @ k.transpose(-1, -2) * store.head_dim**-0.5
    if causal:
        qpos = T - L + torch.arange(L)
        s = s.masked_fill(pos[None, :] > qpos[:, None], -math.inf)
    return s.softmax(-1) @ v


def kivi_step(store, bits, residual):
    ready = (store.n_tokens - residual - store.n_quantized) // store.group_size
    if ready > 0:
        store.quantize_blocks([bits] * ready)


# ------------------------------------------------------------------------------------------
# (a) round trip
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_round_trip_within_bound(dtype, mode):
    B, H, T, D, G = 2, 3, 150, 64, 32
    k, v = kv_data(B, H, T, D, seed=1)
    s = KVStore(B, H, D, dtype=dtype, group_size=G)
    if mode == "prefill":
        s.append(k, v)
        s.quantize_blocks([(2, 2), (4, 8), (3, 5), (8, 1)])
    else:
        for t in range(T):
            s.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
            kivi_step(s, (4, 2), residual=20)
    assert s.n_tokens == T and s.n_quantized == 128
    kc, vc = k.to(dtype).double(), v.to(dtype).double()
    kk, vv, pos = s.dequantized()
    assert kk.dtype == torch.float32 and torch.equal(pos, torch.arange(T))
    q = s.n_quantized
    kbound, vbound = expected_bounds(s, kc, vc)
    kerr = (kk[:, :, :q].double() - kc[:, :, :q]).abs()
    verr = (vv[:, :, :q].double() - vc[:, :, :q]).abs()
    assert bool((kerr <= kbound).all()), f"key excess {(kerr - kbound).max():.3g}"
    assert bool((verr <= vbound).all()), f"value excess {(verr - vbound).max():.3g}"
    assert bool(kerr.gt(0).any())  # it really is quantized
    # the window is held exactly (in the store's dtype)
    assert torch.equal(kk[:, :, q:].double(), kc[:, :, q:])
    assert torch.equal(vv[:, :, q:].double(), vc[:, :, q:])


@st.composite
def store_cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([64, 128]))
    G = draw(st.sampled_from([8, 16, 32, 64]))
    vg = draw(st.sampled_from([None, 8, 16, 32, 64, D]))
    dtype = draw(st.sampled_from(FLOATS))
    sdt = draw(st.sampled_from([torch.float16, torch.float32]))
    outl = draw(st.booleans())
    ko = Outliers(draw(st.integers(0, 2)), draw(st.integers(0, 2))) if outl else Outliers()
    vo = Outliers(draw(st.integers(0, 2)), draw(st.integers(0, 2))) if outl else Outliers()
    prefill = draw(st.integers(1, 3 * G))
    n_decode = draw(st.integers(0, G + 8))
    T = prefill + n_decode
    seed = draw(st.integers(0, 2**20))
    # per step (after the prefill and after each decode token): how many ready blocks to
    # quantize and at which widths, and whether to pin a window token
    plan = draw(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 8), st.integers(1, 8),
                                   st.booleans(), st.integers(0, 10**6)),
                         min_size=n_decode + 1, max_size=n_decode + 1))
    return dict(B=B, H=H, D=D, G=G, vg=vg, dtype=dtype, sdt=sdt, ko=ko, vo=vo, outl=outl,
                prefill=prefill, T=T, seed=seed, plan=plan)


@given(case=store_cases())
def test_property_round_trip(case):
    B, H, D, G, T = case["B"], case["H"], case["D"], case["G"], case["T"]
    s = KVStore(B, H, D, dtype=case["dtype"], group_size=G, value_group_size=case["vg"],
                scale_dtype=case["sdt"], key_outliers=case["ko"], value_outliers=case["vo"])
    k, v = kv_data(B, H, T, D, case["seed"], outliers=case["outl"])
    chunks = [(0, case["prefill"])] + [(t, t + 1) for t in range(case["prefill"], T)]
    pinned: set[int] = set()
    for (a, b), (nblocks, kb, vb, pin, which) in zip(chunks, case["plan"]):
        s.append(k[:, :, a:b], v[:, :, a:b])
        window = [p for p in s.fp_positions if p >= s.n_quantized]
        if pin and window:
            p = window[which % len(window)]
            s.pin([p])
            pinned.add(p)
        ready = (s.n_tokens - s.n_quantized) // G
        n = min(nblocks, ready)
        # mixed widths within one call: alternate (kb, vb) and (vb, kb)
        s.quantize_blocks([(kb, vb) if i % 2 == 0 else (vb, kb) for i in range(n)])
        assert s.nbytes() == tensor_bytes(s)
        assert sum(s.nbytes_breakdown().values()) == s.nbytes()
        assert s.n_quantized % G == 0
    assert s.n_tokens == T and s.pinned == frozenset(pinned)
    q = s.n_quantized
    assert set(s.fp_positions) == set(range(q, T)) | pinned
    kc, vc = k.to(case["dtype"]).double(), v.to(case["dtype"]).double()
    kk, vv, _ = s.dequantized()
    # full-precision positions (window and pinned) come back exactly
    fp = sorted(set(range(q, T)) | pinned)
    assert torch.equal(kk[:, :, fp].double(), kc[:, :, fp])
    assert torch.equal(vv[:, :, fp].double(), vc[:, :, fp])
    # quantized copies (pinned tokens have one too) are within the bound
    kq, vq = quantized_copies(s)
    kbound, vbound = expected_bounds(s, kc, vc)
    kerr = (kq.double() - kc[:, :, :q]).abs()
    verr = (vq.double() - vc[:, :, :q]).abs()
    assert bool((kerr <= kbound).all()), f"key excess {(kerr - kbound).max():.3g}"
    assert bool((verr <= vbound).all()), f"value excess {(verr - vbound).max():.3g}"
    unpinned_q = [p for p in range(q) if p not in pinned]
    assert torch.equal(kk[:, :, unpinned_q], kq[:, :, unpinned_q])
    # attention over everything equals SDPA over the reconstruction (decode query, GQA 2:1)
    query = rnd((B, 2 * H, 1, D), case["seed"] + 7)
    out, lse, _ = s.attend(query)
    torch.testing.assert_close(out, sdpa_over_store(s, query), rtol=2e-4, atol=2e-5)


def test_outliers_are_kept_exactly():
    """With outlier capacity, isolated huge entries come back (almost) exactly; without it they
    stretch their group's range and cost far more."""
    B, H, T, D, G = 1, 2, 64, 64, 32
    k, v = kv_data(B, H, T, D, seed=3, outliers=True)
    errs = {}
    for count in (0, 1):
        o = Outliers(low=count, high=count)
        s = KVStore(B, H, D, group_size=G, key_outliers=o, value_outliers=o)
        s.append(k, v)
        s.quantize_blocks([(2, 2), (2, 2)])
        kk, vv, _ = s.dequantized()
        errs[count] = ((vv - v).abs().max().item(), (kk - k).abs().max().item())
        big = v.abs() > 50
        if count:
            torch.testing.assert_close(vv[big], v[big], rtol=1e-6, atol=1e-5)
            kbig = k.abs() > 50
            torch.testing.assert_close(kk[kbig], k[kbig], rtol=1e-6, atol=1e-5)
    assert errs[1][0] < errs[0][0] / 4 and errs[1][1] < errs[0][1] / 2, errs


# ------------------------------------------------------------------------------------------
# (b) byte accounting
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outl", [False, True], ids=["plain", "outliers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nbytes_is_the_sum_of_every_tensor(dtype, outl):
    o = Outliers(1, 2) if outl else Outliers()
    B, H, D, G = 2, 2, 64, 16
    s = KVStore(B, H, D, dtype=dtype, group_size=G, key_outliers=o, value_outliers=o)
    names = set(held_tensors(s))
    assert {"k_codes", "v_codes", "k_scale", "k_zero", "v_scale", "v_zero", "k_fp", "v_fp"} <= names
    assert ("k_outlier_index" in names) == outl
    assert s.nbytes() == tensor_bytes(s)
    k, v = kv_data(B, H, 100, D, seed=5, outliers=outl)
    s.append(k[:, :, :70], v[:, :, :70])
    s.pin([2, 40])
    s.quantize_blocks([(2, 4), (3, 3), (8, 2)])
    for t in range(70, 100):
        s.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        kivi_step(s, (4, 4), residual=10)
        assert s.nbytes() == tensor_bytes(s)
    br = s.nbytes_breakdown()
    assert sum(br.values()) == s.nbytes() == tensor_bytes(s)
    assert all(x >= 0 for x in br.values()), br
    assert set(br) == {"codes", "scales", "outliers", "fp_window", "pinned", "bookkeeping", "reserved"}
    # the parts in use, from first principles
    eb = torch.empty(0, dtype=dtype).element_size()
    blocks = s.block_bits
    q = s.n_quantized
    assert br["codes"] == B * H * sum(G * D * (kb + vb) // 8 for kb, vb in blocks)
    assert br["scales"] == 2 * 2 * B * H * (len(blocks) * D + q * (D // s.value_group_size))
    assert br["outliers"] == (B * H * q * 6 * (2 + eb) if outl else 0)
    n_pinned = len([p for p in s.fp_positions if p in s.pinned])
    assert n_pinned == 2
    assert br["pinned"] == 2 * B * H * D * eb * n_pinned
    assert br["fp_window"] == 2 * B * H * D * eb * (len(s.fp_positions) - n_pinned)
    assert s.fp16_nbytes() == 2 * 2 * B * H * D * 100


# ------------------------------------------------------------------------------------------
# (c) growth and quantize-once
# ------------------------------------------------------------------------------------------


def test_growth_reallocates_o_log_t_times():
    T, G, R = 2000, 8, 16
    s = KVStore(1, 2, 64, group_size=G)
    changes = {n: 0 for n in held_tensors(s)}
    ptrs = {n: t.data_ptr() for n, t in held_tensors(s).items()}
    k, v = kv_data(1, 2, T, 64, seed=11)
    for t in range(T):
        s.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        kivi_step(s, (2, 2), residual=R)
        for n, tt in held_tensors(s).items():
            if tt.data_ptr() != ptrs[n]:
                changes[n] += 1
                ptrs[n] = tt.data_ptr()
    assert s.n_quantized == ((T - R) // G) * G
    limit = 3 * math.ceil(math.log2(T))  # 33; copying once per block would be 248
    assert max(changes.values()) <= limit, changes
    # capacity held in reserve stays bounded (geometric growth by 1.25, window slack)
    br = s.nbytes_breakdown()
    assert br["reserved"] <= 0.5 * (s.nbytes() - br["reserved"]), br


def test_reserve_makes_appends_allocation_free():
    T, G, R = 300, 16, 32
    s = KVStore(1, 2, 64, group_size=G)
    s.reserve(T, R + G + 1, max_bits=4)
    ptrs = {n: t.data_ptr() for n, t in held_tensors(s).items()}
    k, v = kv_data(1, 2, T, 64, seed=12)
    for t in range(T):
        s.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        kivi_step(s, (4, 2), residual=R)
    assert s.n_quantized > 0
    moved = [n for n, t in held_tensors(s).items() if t.data_ptr() != ptrs[n]]
    assert not moved, moved


def test_every_token_quantized_once(monkeypatch):
    """Codes, scales and zeros once written never change, and ops.quantize sees every token
    exactly once (per keys and per values)."""
    calls = {"k": 0, "v": 0}
    real = torchkvq.ops.quantize

    def counting(x, bits, group_size, axis, scale_dtype=None):
        calls["k" if axis == 2 else "v"] += x.shape[2]
        return real(x, bits, group_size, axis, scale_dtype)

    monkeypatch.setattr(torchkvq.ops, "quantize", counting)
    B, H, D, G, R = 1, 2, 64, 16, 24
    s = KVStore(B, H, D, group_size=G)
    k, v = kv_data(B, H, 400, D, seed=13)
    s.append(k[:, :, :100], v[:, :, :100])
    kivi_step(s, (2, 3), R)
    widths = [(2, 3), (4, 4), (8, 1), (1, 8)]

    def written():
        kbytes = sum(G * D * kb // 8 for kb, _ in s.block_bits)
        vbytes = sum(G * D * vb // 8 for _, vb in s.block_bits)
        nb, q = len(s.block_bits), s.n_quantized
        return (s.k_codes[:, :, :kbytes].clone(), s.v_codes[:, :, :vbytes].clone(),
                s.k_scale[:, :, :nb].clone(), s.k_zero[:, :, :nb].clone(),
                s.v_scale[:, :, :q].clone(), s.v_zero[:, :, :q].clone(), s.dequantized()[0][:, :, :q])

    before = written()
    history = [before]
    for t in range(100, 400):
        s.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        kivi_step(s, widths[t % 4], R)
        if t % 50 == 0:
            history.append(written())
    after = written()
    for old in history:
        for a, b in zip(old, after):
            n = a.shape[2]
            assert torch.equal(b[:, :, :n], a), "already-written quantized data changed"
    assert calls["k"] == calls["v"] == s.n_quantized == ((400 - R) // G) * G


# ------------------------------------------------------------------------------------------
# (d) pin / unpin, padding
# ------------------------------------------------------------------------------------------


def test_pin_and_unpin():
    B, H, D, G = 1, 2, 64, 16
    k, v = kv_data(B, H, 60, D, seed=21)
    k[:, :, 3] *= 4  # make token 3 matter in attention
    s = KVStore(B, H, D, group_size=G)
    s.append(k[:, :, :40], v[:, :, :40])
    s.pin([3, 20, 36])
    s.quantize_blocks([(2, 2), (2, 2)])  # positions 0..31
    assert s.fp_positions == [3, 20] + list(range(32, 40))
    assert bool(s.q_exclude[:, 3]) and bool(s.q_exclude[:, 20]) and not bool(s.q_exclude[:, 4])
    kk, vv, _ = s.dequantized()
    assert torch.equal(kk[:, :, 3], k[:, :, 3]) and torch.equal(vv[:, :, 20], v[:, :, 20])
    assert s.nbytes_breakdown()["pinned"] == 3 * 2 * B * H * D * 4
    query = rnd((B, 4, 1, D), 22) + k[:, :1, 3:4]  # a query that looks at token 3
    out_pinned = s.attend(query)[0]
    torch.testing.assert_close(out_pinned, sdpa_over_store(s, query), rtol=1e-4, atol=1e-5)
    # ... which is SDPA over the exact fp value of the pinned tokens
    kq, vq = quantized_copies(s)
    assert not torch.equal(kq[:, :, 3], k[:, :, 3])  # the quantized copy differs

    s.unpin([3])
    assert s.pinned == {20, 36} and 3 not in s.fp_positions and not bool(s.q_exclude[:, 3])
    kk2, vv2, _ = s.dequantized()
    assert torch.equal(kk2[:, :, 3], kq[:, :, 3]) and torch.equal(vv2[:, :, 3], vq[:, :, 3])
    assert torch.equal(kk2[:, :, 20], k[:, :, 20])
    out_unpinned = s.attend(query)[0]
    torch.testing.assert_close(out_unpinned, sdpa_over_store(s, query), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_unpinned, out_pinned, atol=1e-4)

    # unpinning a token still in the window keeps it there; it is quantized with its block
    s.unpin([36, 999])  # unknown positions are ignored
    assert s.pinned == {20} and 36 in s.fp_positions
    s.append(k[:, :, 40:60], v[:, :, 40:60])
    s.quantize_blocks([(4, 4)])  # positions 32..47
    assert 36 not in s.fp_positions and s.fp_positions == [20] + list(range(48, 60))
    torch.testing.assert_close(s.attend(query)[0], sdpa_over_store(s, query), rtol=1e-4, atol=1e-5)


def test_mark_padding_excluded_from_attention_and_key_statistics():
    B, H, D, G, T = 2, 2, 64, 32, 72
    k, v = kv_data(B, H, T, D, seed=31)
    npad = 10
    k[0, :, :npad] = rnd((H, npad, D), 32, scale=1e3)  # huge padding keys (left padding, row 0)
    v[0, :, :npad] = rnd((H, npad, D), 33, scale=1e3)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :npad] = False
    s = KVStore(B, H, D, group_size=G)
    s.append(k[:, :, :64], v[:, :, :64])
    s.mark_padding(valid[:, :64])
    s.append(k[:, :, 64:], v[:, :, 64:])
    s.quantize_blocks([(4, 4), (4, 4)])
    assert bool(s.q_exclude[0, :npad].all()) and not bool(s.q_exclude[0, npad:64].any())
    assert not bool(s.q_exclude[1].any())
    kk, vv, _ = s.dequantized()
    kbound, vbound = expected_bounds(s, k.double(), v.double(), valid=valid)
    kerr = (kk[:, :, :64].double() - k[:, :, :64].double()).abs()
    real = valid[:, None, :64, None].expand_as(kerr)
    assert bool((kerr <= kbound)[real].all()), f"key excess {(kerr - kbound)[real].max():.3g}"
    # 4 bits over real keys (range <= ~45): <= ~1.5; a range stretched by padding: ~200
    assert kerr[real].max() < 2.0
    verr = (vv[:, :, :64].double() - v[:, :, :64].double()).abs()
    assert bool((verr <= vbound)[real].all())

    for L in (1, 5):
        query = rnd((B, 4, L, D), 34 + L)
        out, lse, stats = s.attend(query, return_stats=True)
        torch.testing.assert_close(out, sdpa_over_store(s, query, valid=valid), rtol=1e-4, atol=1e-5)
        assert torch.equal(stats[0, :, :npad], torch.zeros(H, npad))
        assert bool((stats[1, :, :npad] > 0).all())


def test_padding_in_window_via_append_valid():
    B, H, D = 2, 1, 64
    k, v = kv_data(B, H, 20, D, seed=41)
    valid = torch.ones(B, 20, dtype=torch.bool)
    valid[1, :7] = False
    s = KVStore(B, H, D, group_size=8)
    s.append(k, v, valid=valid)
    assert s.fp_pos[1, :7].eq(-1).all() and s.fp_pos[0, :7].eq(torch.arange(7)).all()
    query = rnd((B, 2, 3, D), 42)
    torch.testing.assert_close(s.attend(query)[0], sdpa_over_store(s, query, valid=valid),
                               rtol=1e-4, atol=1e-5)
    s.quantize_blocks([(8, 8)])  # the padding moves into a block and stays excluded
    assert bool(s.q_exclude[1, :7].all()) and not bool(s.q_exclude[0].any())
    torch.testing.assert_close(s.attend(query)[0], sdpa_over_store(s, query, valid=valid),
                               rtol=1e-4, atol=1e-5)


def test_block_that_is_all_padding():
    B, H, D, G = 2, 1, 64, 16
    k, v = kv_data(B, H, 40, D, seed=43)
    k[0, :, :20] = 5e3
    valid = torch.ones(B, 40, dtype=torch.bool)
    valid[0, :20] = False
    s = KVStore(B, H, D, group_size=G)
    s.append(k, v, valid=valid)
    s.quantize_blocks([(2, 2), (2, 2)])
    kk, _, _ = s.dequantized()
    assert bool(kk.isfinite().all())
    kbound, _ = expected_bounds(s, k.double(), v.double(), valid=valid)
    kerr = (kk[:, :, :32].double() - k[:, :, :32].double()).abs()
    real = valid[:, None, :32, None].expand_as(kerr)
    assert bool((kerr <= kbound)[real].all())
    assert kerr[0, :, 20:32].max() < 10  # 2 bits over real keys; with the padding: ~800
    query = rnd((B, 1, 1, D), 44)
    torch.testing.assert_close(s.attend(query)[0], sdpa_over_store(s, query, valid=valid),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# (e) attend == SDPA over dequantized()
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 7, 40])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_equals_sdpa(L, causal, dtype):
    B, Hkv, Hq, D, G = 2, 2, 6, 128, 16
    k, v = kv_data(B, Hkv, 90, D, seed=51)
    s = KVStore(B, Hkv, D, dtype=dtype, group_size=G)
    s.append(k[:, :, :50], v[:, :, :50])
    s.pin([1])
    s.quantize_blocks([(2, 4), (8, 8)])
    s.append(k[:, :, 50:], v[:, :, 50:])
    s.quantize_blocks([(3, 3)])
    query = rnd((B, Hq, L, D), 52)
    out, lse, _ = s.attend(query, causal=causal)
    want = sdpa_over_store(s, query, causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=2e-5)
    if causal:
        torch.testing.assert_close(out, sdpa_manual_repeat(s, query), rtol=1e-4, atol=2e-5)
    # a custom softmax scale
    out2 = s.attend(query, scale=0.3, causal=causal)[0]
    torch.testing.assert_close(out2, sdpa_over_store(s, query, scale=0.3, causal=causal),
                               rtol=1e-4, atol=2e-5)


def test_attend_fp_only_and_after_everything_quantized():
    B, H, D, G = 1, 2, 64, 8
    k, v = kv_data(B, H, 32, D, seed=61)
    s = KVStore(B, H, D, group_size=G)
    s.append(k, v)
    query = rnd((B, 2, 4, D), 62)
    exact = F.scaled_dot_product_attention(query, k, v, is_causal=False,
                                           attn_mask=torch.ones(4, 32, dtype=torch.bool).tril(28))
    torch.testing.assert_close(s.attend(query)[0], exact, rtol=1e-5, atol=1e-6)
    s.quantize_blocks([(8, 8)] * 4)
    assert s.fp_positions == [] and s.n_quantized == 32
    torch.testing.assert_close(s.attend(query)[0], sdpa_over_store(s, query), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# (f) bad input: clear error, store unchanged
# ------------------------------------------------------------------------------------------


def _filled_store():
    B, H, D = 2, 2, 64
    s = KVStore(B, H, D, group_size=16)
    k, v = kv_data(B, H, 40, D, seed=71)
    s.append(k, v)
    s.pin([2, 30])
    s.quantize_blocks([(2, 4)])
    return s


def _kv(n=1, B=2, H=2, D=64, dtype=torch.float32):
    return torch.randn(B, H, n, D, dtype=dtype), torch.randn(B, H, n, D, dtype=dtype)


def _nan(n=3, where="k", val=float("nan")):
    k, v = _kv(n)
    (k if where == "k" else v)[1, 0, n - 1, 5] = val
    return k, v


BAD = {
    "rank3": (lambda s: s.append(torch.randn(2, 2, 64), torch.randn(2, 2, 64)), ValueError, r"must be \[batch=2"),
    "rank5": (lambda s: s.append(*[torch.randn(2, 2, 1, 1, 64)] * 2), ValueError, r"must be \[batch=2"),
    "batch": (lambda s: s.append(*_kv(B=3)), ValueError, r"batch=2, kv_heads=2, tokens, head_dim=64\], got \[3"),
    "heads": (lambda s: s.append(*_kv(H=4)), ValueError, "kv_heads=2"),
    "head_dim": (lambda s: s.append(*_kv(D=32)), ValueError, "head_dim=64"),
    "value_shape": (lambda s: s.append(_kv()[0], torch.randn(2, 2, 1, 32)), ValueError, "value must be"),
    "int_dtype": (lambda s: s.append(torch.ones(2, 2, 1, 64, dtype=torch.int32), torch.ones(2, 2, 1, 64)),
                  TypeError, "float32, float16 or bfloat16"),
    "float64": (lambda s: s.append(*_kv(dtype=torch.float64)), TypeError, "float32, float16 or bfloat16"),
    "not_tensor": (lambda s: s.append([[0.0]], _kv()[1]), TypeError, "must be a torch.Tensor"),
    "device": (lambda s: s.append(*[torch.empty(2, 2, 1, 64, device="meta")] * 2), ValueError,
               "is on meta but the store is on cpu"),
    "empty": (lambda s: s.append(*_kv(0)), ValueError, "holds no tokens"),
    "token_mismatch": (lambda s: s.append(_kv(3)[0], _kv(2)[1]), ValueError, "same number of tokens, got 3 and 2"),
    "nan_key": (lambda s: s.append(*_nan()), ValueError, "NaN or Inf"),
    "inf_value": (lambda s: s.append(*_nan(where="v", val=float("inf"))), ValueError, "NaN or Inf"),
    "ninf_key": (lambda s: s.append(*_nan(val=-float("inf"))), ValueError, "NaN or Inf"),
    "valid_dtype": (lambda s: s.append(*_kv(2), valid=torch.ones(2, 2)), ValueError, "valid must be bool"),
    "valid_shape": (lambda s: s.append(*_kv(2), valid=torch.ones(2, 3, dtype=torch.bool)), ValueError, "valid must be bool"),
    "quantize_beyond": (lambda s: s.quantize_blocks([(2, 2)] * 2), ValueError, "only 40 are held"),
    "bits0": (lambda s: s.quantize_blocks([(0, 2)]), ValueError, r"bits must be in \[1, 8\], got \(0, 2\)"),
    "bits9": (lambda s: s.quantize_blocks([(4, 4), (2, 9)]), ValueError, r"bits must be in \[1, 8\], got \(2, 9\)"),
    "pin_quantized": (lambda s: s.pin([5, 33]), ValueError, r"positions \[5\] are no longer held"),
    "pin_future": (lambda s: s.pin([40]), ValueError, r"positions \[40\]"),
    "pad_quantized": (lambda s: s.mark_padding(torch.ones(2, 30, dtype=torch.bool)), ValueError, "already quantized"),
    "pad_too_many": (lambda s: s.mark_padding(torch.ones(2, 41, dtype=torch.bool)), ValueError, "0 < n <= 40"),
    "pad_dtype": (lambda s: s.mark_padding(torch.ones(2, 4)), ValueError, "valid must be bool"),
    "pad_batch": (lambda s: s.mark_padding(torch.ones(3, 4, dtype=torch.bool)), ValueError, "valid must be bool"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_and_leaves_store_unchanged(name):
    fn, exc, match = BAD[name]
    s = _filled_store()
    snap = snapshot(s)
    with pytest.raises(exc, match=match):
        fn(s)
    assert_unchanged(s, snap)
    # and the store still works
    s.append(*_kv(1))
    assert s.n_tokens == 41


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(kv_heads=0), "kv_heads must be >= 1"),
    (dict(head_dim=0), "head_dim must be >= 1"),
    (dict(group_size=12), "group_size must be a positive multiple of 8, got 12"),
    (dict(group_size=0), "group_size must be a positive multiple of 8"),
    (dict(value_group_size=12), "value_group_size must be a multiple of 8 dividing head_dim 64"),
    (dict(value_group_size=48), "value_group_size"),
    (dict(value_group_size=128), "value_group_size"),
    (dict(dtype=torch.float64), "dtype must be float32, float16 or bfloat16"),
    (dict(dtype=torch.int8), "dtype must be"),
    (dict(scale_dtype=torch.bfloat16), "scale_dtype must be float16 or float32"),
    (dict(key_outliers=Outliers(-1, 0)), "key_outliers"),
    (dict(value_outliers=Outliers(32, 32)), "value_outliers"),
])
def test_constructor_errors(kwargs, match):
    args = dict(batch_size=1, kv_heads=1, head_dim=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KVStore(args.pop("batch_size"), args.pop("kv_heads"), args.pop("head_dim"), **args)


def test_default_value_group_size():
    assert KVStore(1, 1, 64, group_size=128).value_group_size == 64
    assert KVStore(1, 1, 128, group_size=32).value_group_size == 32
    s = KVStore(1, 1, 64, group_size=8, value_group_size=64)
    assert s.v_scale.shape[-1] == 1


def test_empty_quantize_blocks_is_a_no_op():
    s = _filled_store()
    snap = snapshot(s)
    s.quantize_blocks([])
    assert_unchanged(s, snap)


def test_append_rejects_values_that_overflow_the_store_dtype():
    s = KVStore(1, 1, 64, group_size=32, dtype=torch.float16)
    k = torch.randn(1, 1, 4, 64)
    k[0, 0, 1, 5] = 1e5  # finite in fp32, inf in fp16
    snap = snapshot(s)
    with pytest.raises(ValueError, match="NaN or Inf|overflow|range"):
        s.append(k, torch.randn(1, 1, 4, 64))
    assert_unchanged(s, snap)
