"""Sliding-window stores (``KVStore(window=W)``): hold only what the layer can still see.

(a) bytes: after 10 x W tokens the store holds at most what W tokens plus one block and the fp
    window cost - the same as after 5 x W (steady state) - and its fp16 baseline is the W - 1
    tokens transformers' sliding-window cache holds;
(b) attention: equal to the kernel over a store that keeps everything, given the same window;
    equal to SDPA over the dequantized store with the sliding mask when tokens leave the window
    before they are ever quantized; freed blocks of mixed widths (with outliers and pins) move
    down the pools intact;
(c) pins and sinks: pins leave with their tokens (KIVI sinks, LogQuant's log set); KIVI's sinks
    are each row's first real tokens in a left-padded batch;
(d) bad use: a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchkvq import ops
from torchkvq.policies import KIVI, LogQuant
from torchkvq.static import StaticDecoder
from torchkvq.store import KVStore, Outliers

B, H, HQ, D = 2, 2, 4, 64


def rnd(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tokens(n, seed):
    """Keys (with channel offsets, as real keys have) and values [B, H, n, D]."""
    return rnd((B, H, n, D), seed) + 0.5 * rnd((1, H, 1, D), 7), rnd((B, H, n, D), seed + 1)


def full_store_attention(full: KVStore, query, window):
    """The kernel over a store that keeps everything, told the window."""
    return ops.quant_attention(
        query, full.k_codes, full.k_scale, full.k_zero, full.k_bits, full.v_codes, full.v_scale,
        full.v_zero, full.v_bits, full.k_fp, full.v_fp, full.fp_pos, full.q_exclude,
        full.k_outlier_index, full.k_outlier_value, full.v_outlier_index, full.v_outlier_value,
        full.group_size, full.value_group_size, D**-0.5, True, False, full.q_offset, window)


def sdpa_with_window(store: KVStore, query):
    """float32 SDPA of the newest L positions over ``store.dequantized()``, sliding mask."""
    k, v, pos = store.dequantized()
    L = query.shape[2]
    qpos = store.n_tokens - L + torch.arange(L)
    mask = (pos[None, :] <= qpos[:, None]) & (pos[None, :] > qpos[:, None] - store.window)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, enable_gqa=True)


# ------------------------------------------------------------------------------------------
# (a) bytes
# ------------------------------------------------------------------------------------------


def window_bound(store: KVStore, W: int, fp_tokens: int, kbits: int, vbits: int) -> int:
    """Bytes of W tokens plus one block, quantized at (kbits, vbits), and of `fp_tokens`
    full-precision slots grown by at most 25% (the slot tensors grow geometrically)."""
    G, vg = store.group_size, store.value_group_size
    sb = torch.empty(0, dtype=store.scale_dtype).element_size()
    eb = torch.empty(0, dtype=store.dtype).element_size()
    blocks = math.ceil(W / G) + 1
    per_block = (B * H * G * D * (kbits + vbits) // 8  # codes
                 + 2 * B * H * sb * (D + G * D // vg)  # key scales/zeros, value scales/zeros
                 + 2 * 4 + B * G)  # widths, exclusion flags
    slots = max(16, int(1.25 * fp_tokens))
    return blocks * per_block + slots * (2 * B * H * D * eb + 8 * B)


@pytest.mark.parametrize("chunk", [1, 3])
def test_bytes_after_10w_tokens_stay_within_the_window(chunk):
    W, G, R = 96, 32, 32
    policy = KIVI(key_bits=2, value_bits=2, group_size=G, residual=R, window_dtype=torch.float16)
    store = policy.make_store(B, H, D, torch.float32, "cpu", window=W)
    full = policy.make_store(B, H, D, torch.float32, "cpu")
    seen = {}
    for step in range(10 * W // chunk):
        k, v = tokens(chunk, step)
        for s in (store, full):
            s.append(k, v)
            policy.after_append(s, None)
        store.evict(store.n_tokens)  # what the attention function does after each step
        if store.n_tokens in (5 * W, 10 * W - 10 * W % chunk):
            seen[store.n_tokens] = store.nbytes()
    n = store.n_tokens
    assert store.n_quantized > n - W  # blocks really were quantized and freed
    assert store.q_offset > 0 and len(store.block_bits) <= math.ceil(W / G) + 1
    assert min(store.fp_positions) >= n - W + 1
    bound = window_bound(store, W, R + G + chunk, 2, 2)
    assert store.nbytes() <= bound, (store.nbytes(), bound, store.nbytes_breakdown())
    assert list(seen.values())[0] == list(seen.values())[1]  # steady state: no growth
    assert store.fp16_nbytes() == 2 * 2 * B * H * D * (W - 1)  # transformers holds W - 1 tokens
    assert store.nbytes() < store.fp16_nbytes()  # and 2-bit KIVI holds less
    assert full.nbytes() > 2 * store.nbytes()  # the full store kept all 10 W


# ------------------------------------------------------------------------------------------
# (b) attention
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W, chunks", [(80, [1]), (80, [1, 5, 2, 17]), (65, [3])])
def test_attends_like_the_full_store_told_the_window(W, chunks):
    """W >= residual + group_size + 1: every block is quantized before it leaves the window,
    so both stores quantize the same blocks; only the windowed one frees them."""
    policy = KIVI(key_bits=4, value_bits=4, group_size=32, residual=32)
    store = policy.make_store(B, H, D, torch.float32, "cpu", window=W)
    full = policy.make_store(B, H, D, torch.float32, "cpu")
    step = 0
    while store.n_tokens < 5 * W:
        L = chunks[step % len(chunks)]
        k, v = tokens(L, 100 + step)
        q = rnd((B, HQ, L, D), 200 + step)
        for s in (store, full):
            s.append(k, v)
            policy.after_append(s, None)
        out, lse, _ = store.attend(q)
        want, want_lse, _ = full_store_attention(full, q, W)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-6)
        store.evict(store.n_tokens)
        step += 1
    assert store.q_offset > 0 and len(store.block_bits) < len(full.block_bits) // 3


@pytest.mark.parametrize("W, residual", [(20, 32), (50, 40), (41, 8)])
def test_tokens_leaving_before_they_are_quantized_are_dropped(W, residual):
    """A window no wider than residual + group_size: tokens leave unquantized (n_quantized jumps
    to the window); attention still equals SDPA with the sliding mask."""
    G = 16
    policy = KIVI(key_bits=8, value_bits=8, group_size=G, residual=residual)
    store = policy.make_store(B, H, D, torch.float32, "cpu", window=W)
    for step in range(60):
        L = 1 if step % 4 else 3
        k, v = tokens(L, 300 + step)
        store.append(k, v)
        policy.after_append(store, None)
        q = rnd((B, HQ, L, D), 400 + step)
        out, _, _ = store.attend(q)
        torch.testing.assert_close(out, sdpa_with_window(store, q), rtol=1e-4, atol=1e-5)
        assert store.n_quantized >= store.window_start - G + 1
        assert len(store.fp_positions) <= max(residual + G, W) + L
    if W <= residual:
        assert not store.block_bits  # everything the layer sees is in the fp window


def test_freed_blocks_of_mixed_widths_move_down_intact():
    """Per-block widths, outliers and pinned tokens: after each eviction the held blocks
    reconstruct exactly as before it, and attention equals SDPA with the sliding mask."""
    W, G = 40, 8
    store = KVStore(B, H, D, group_size=G, window=W, key_outliers=Outliers(1, 1),
                    value_outliers=Outliers(0, 1))
    widths = [(2, 4), (8, 3), (4, 4), (1, 8), (3, 2), (6, 5)]
    for step in range(40):
        k, v = tokens(3, 500 + step)
        store.append(k, v)
        ready = (store.n_tokens - 12 - store.n_quantized) // G
        if ready > 0:
            pin = store.n_quantized + 2  # a token of the next block kept in full precision
            store.pin([pin])
            store.quantize_blocks([widths[(store.n_quantized // G + i) % len(widths)] for i in range(ready)])
        before_k, before_v, before_pos = store.dequantized()
        q = rnd((B, HQ, 3, D), 600 + step)
        torch.testing.assert_close(store.attend(q)[0], sdpa_with_window(store, q), rtol=1e-4, atol=1e-5)
        store.evict(store.n_tokens)
        after_k, after_v, after_pos = store.dequantized()
        # every position the window still sees reconstructs exactly as before the eviction
        p = torch.arange(store.window_start, store.n_tokens)
        ia, ib = p - int(after_pos[0]), p - int(before_pos[0])
        assert torch.equal(after_k[:, :, ia], before_k[:, :, ib])
        assert torch.equal(after_v[:, :, ia], before_v[:, :, ib])
    assert store.q_offset > 0 and len(store.block_bits) <= math.ceil(W / G) + 1
    assert store.pinned and min(store.pinned) >= store.window_start


# ------------------------------------------------------------------------------------------
# (c) pins and sinks
# ------------------------------------------------------------------------------------------


def test_sinks_and_log_pins_leave_with_the_window():
    W = 64
    for policy in (KIVI(key_bits=4, value_bits=4, group_size=16, residual=16, sinks=4),
                   LogQuant(window=8, bits=4, group_size=16)):
        store = policy.make_store(B, H, D, torch.float32, "cpu", window=W)
        state = policy.new_state()
        k, v = tokens(40, 1)
        store.append(k, v)
        policy.after_append(store, state)
        assert store.pinned  # sinks / the log set, while inside the window
        for step in range(3 * W):
            k, v = tokens(1, 700 + step)
            store.append(k, v)
            policy.after_append(store, state)
            store.evict(store.n_tokens)
            assert all(store.window_start <= p < store.n_tokens for p in store.pinned)
            assert set(store.pinned) <= set(store.fp_positions)
        if isinstance(policy, KIVI):
            assert not store.pinned  # the sinks left the window for good


def test_sinks_are_each_rows_first_real_tokens():
    """Left padding of 5 in row 1: its sinks are positions 5, 6 (row 0's are 0, 1); the union
    is pinned, the quantized copies are excluded and the pinned tokens stay exact."""
    policy = KIVI(key_bits=2, value_bits=2, group_size=8, residual=8, sinks=2)
    store = policy.make_store(B, H, D, torch.float32, "cpu")
    k, v = tokens(40, 2)
    valid = torch.ones(B, 40, dtype=torch.bool)
    valid[1, :5] = False
    store.append(k, v)
    store.mark_padding(valid)
    policy.after_append(store, None)
    assert store.n_quantized == 32 and store.pinned == {0, 1, 5, 6}
    assert bool(store.q_exclude[:, [0, 1, 5, 6]].all())
    keys, values, _ = store.dequantized()
    assert torch.equal(keys[1, :, 5:7], k[1, :, 5:7]) and torch.equal(values[1, :, 5:7], v[1, :, 5:7])
    assert torch.equal(keys[0, :, 0:2], k[0, :, 0:2])
    # the same positions when the padding comes with append(valid=...)
    other = policy.make_store(B, H, D, torch.float32, "cpu")
    other.append(k, v, valid=valid)
    policy.after_append(other, None)
    assert other.pinned == {0, 1, 5, 6}


# ------------------------------------------------------------------------------------------
# (d) bad use
# ------------------------------------------------------------------------------------------


def test_bad_use_raises():
    with pytest.raises(ValueError, match="window must be >= 1"):
        KVStore(B, H, D, window=0)
    store = KVStore(B, H, D, group_size=8, window=16)
    k, v = tokens(30, 3)
    store.append(k, v)
    store.evict(25)
    with pytest.raises(ValueError, match="dropped what queries before position 25 would see"):
        store.attend(rnd((B, HQ, 6, D), 4))
    assert store.attend(rnd((B, HQ, 5, D), 4))[0].shape == (B, HQ, 5, D)
    with pytest.raises(ValueError, match="attends causally"):
        store.attend(rnd((B, HQ, 1, D), 4), causal=False)
    with pytest.raises(ValueError, match=r"first_query must be in \[0, 30\]"):
        store.evict(31)
    store.reserve(64, 32)
    with pytest.raises(ValueError, match="sliding-window store"):
        StaticDecoder(store, KIVI())
