"""LogQuant: the selection rule against a transcription of the reference code, and the store it drives."""

import pytest
import torch

from torchkvq.policies import LogQuant
from torchkvq.policies.logquant import LogIndex


def reference_rule(window, prefill, decode_steps):
    """LogQuant's reference code, transcribed: prefill selection, then one index per step."""
    W = window
    local, log = list(range(prefill)), []
    tmp = log + local
    while len(tmp) >= 3 * W:
        log = tmp[0 : 2 * W : 2]
        local = tmp[2 * W :]
        tmp = log + local
    if prefill < 3 * W and prefill > W:
        log = tmp[:W]
        local = tmp[W:]
    seen = prefill
    for _ in range(decode_steps):
        seen += 1
        local.append(seen - 1)
        if len(local) > 2 * W:
            log = (log + local[0:W])[0::2] if len(log) > 0 else local[:W]
            local = local[W:]
    return log, local


@pytest.mark.parametrize("window", [1, 4, 7, 16])
@pytest.mark.parametrize("prefill_in_windows", [0.5, 1, 1.5, 2, 2.5, 3, 3.5, 7.25, 20])
def test_selection_matches_the_reference_rule(window, prefill_in_windows):
    prefill = max(2, int(window * prefill_in_windows))
    index = LogIndex(window)
    index.prefill(prefill)
    assert (index.log, index.local) == reference_rule(window, prefill, 0)
    for step in range(1, 5 * window + 3):
        index.push(prefill + step - 1)
        assert (index.log, index.local) == reference_rule(window, prefill, step)


@pytest.mark.parametrize("window", [3, 8])
def test_selection_bounds_and_sink(window):
    index = LogIndex(window)
    index.prefill(10 * window)
    for p in range(10 * window, 40 * window):
        index.push(p)
        assert len(index.log) <= window
        assert window <= len(index.local) <= 2 * window
        assert 0 in index.log  # the attention sink is never dropped
        # the log set thins out with distance: gaps never shrink going back in time
        gaps = [b - a for a, b in zip(index.log, index.log[1:])]
        assert gaps == sorted(gaps, reverse=True) or len(gaps) < 2


def _run(policy, prompt, steps, B=1, H=2, D=64, seed=0):
    torch.manual_seed(seed)
    store = policy.make_store(B, H, D, torch.float32, "cpu")
    state = policy.new_state()
    store.append(torch.randn(B, H, prompt, D), torch.randn(B, H, prompt, D))
    policy.after_append(store, state)
    for _ in range(steps):
        store.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
        policy.after_append(store, state)
    return store, state


@pytest.mark.parametrize("prompt, steps", [(5, 100), (40, 0), (200, 77)])
def test_store_keeps_exactly_the_selection_in_full_precision(prompt, steps):
    policy = LogQuant(window=8, bits=2, group_size=8)
    store, index = _run(policy, prompt, steps)
    selected = index.selected
    fp = set(store.fp_positions)
    assert selected <= fp
    # what else is in full precision is only the tail that does not fill a block yet
    pending = fp - selected
    assert all(store.n_quantized <= p < index.local[0] for p in pending) and len(pending) < 8
    assert store.pinned == frozenset(index.log)
    # every older token is quantized once, and the quantized copy of a pinned token is excluded
    assert store.n_quantized == (index.local[0] // 8) * 8
    excluded = store.q_exclude[0, : store.n_quantized].nonzero().flatten().tolist()
    assert set(excluded) == {p for p in index.log if p < store.n_quantized}
    assert all(bits == (2, 2) for bits in store.block_bits)
    breakdown = store.nbytes_breakdown()
    assert sum(breakdown.values()) == store.nbytes()
    assert breakdown["pinned"] > 0 or not index.log


def test_attention_sees_pinned_tokens_in_full_precision():
    policy = LogQuant(window=8, bits=2, group_size=8)
    store, index = _run(policy, 120, 30)
    keys, values, _ = store.dequantized()
    q = torch.randn(1, 4, 1, 64)
    out, _, _ = store.attend(q)
    ref = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and dequantized() reads pinned positions from their full-precision copy
    kf = store.fp_tokens(sorted(index.log))[0]
    torch.testing.assert_close(keys[:, :, sorted(index.log)], kf)


@pytest.mark.parametrize("prompt, steps", [(5, 100), (200, 77)])
def test_sinks_are_pinned_for_good_beside_the_selection(prompt, steps):
    policy = LogQuant(window=8, bits=2, group_size=8, sinks=3)
    store, index = _run(policy, prompt, steps)
    assert store.pinned == frozenset(index.log) | {0, 1, 2}
    assert {0, 1, 2} <= set(store.fp_positions)
    excluded = store.q_exclude[0, : store.n_quantized].nonzero().flatten().tolist()
    assert set(excluded) == (set(index.log) | {0, 1, 2}) & set(range(store.n_quantized))


def test_sinks_follow_each_rows_left_padding():
    policy = LogQuant(window=8, bits=2, group_size=8, sinks=2)
    store, state = policy.make_store(2, 2, 64, torch.float32, "cpu"), policy.new_state()
    valid = torch.ones(2, 60, dtype=torch.bool)
    valid[1, :5] = False  # row 1's real tokens start at position 5
    store.append(torch.randn(2, 2, 60, 64), torch.randn(2, 2, 60, 64), valid=valid)
    policy.after_append(store, state)
    for _ in range(40):
        store.append(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
        policy.after_append(store, state)
    # the rule keeps position 0 (padding for row 1); the sinks add each row's first real tokens
    assert store.pinned == frozenset(state.log) | {0, 1, 5, 6}


def test_bad_configuration():
    with pytest.raises(ValueError, match="window"):
        LogQuant(window=0).validate()
    with pytest.raises(ValueError, match="bits"):
        LogQuant(bits=9).validate()
    with pytest.raises(ValueError, match=r"LogQuant: sinks must be >= 0"):
        LogQuant(sinks=-1).validate()


def test_registered_configurations():
    from torchkvq.policies import get_policy

    for name, window, sinks in (("logquant-2", 48, 0), ("logquant-2-w28", 28, 0), ("logquant-2-w28-s4", 28, 4),
                                ("logquant-2-s4", 48, 4)):
        p = get_policy(name)
        p.validate()
        assert isinstance(p, LogQuant)
        assert (p.window, p.bits, p.sinks, p.window_dtype) == (window, 2, sinks, torch.float16)
