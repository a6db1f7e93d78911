"""QAQ: widths from its error budgets, the attention window, outliers, and the store it drives."""

import math

import pytest
import torch

from torchkvq.policies import DEFAULT_SINKS, QAQ
from torchkvq.policies.qaq import QAQState
from torchkvq.store import Outliers


def test_prediction_is_the_max_of_the_last_n_scores():
    st = QAQState(3, recent=torch.zeros(3, 0))
    history = [[0.9, 0.1], [0.2, 0.3], [0.1, 0.2], [0.05, 0.4]]
    for step, scores in enumerate(history):
        st.record([0, 1], torch.tensor(scores))
        lo = max(0, step - 2)
        expected = torch.tensor(history[lo : step + 1]).amax(0)
        torch.testing.assert_close(st.predicted([0, 1]), expected)


def _store_with_window(policy, T=96, D=64, H=2, seed=0):
    torch.manual_seed(seed)
    store = policy.make_store(1, H, D, torch.float32, "cpu")
    keys = torch.randn(1, H, T, D) * torch.linspace(0.5, 3, D)
    values = torch.randn(1, H, T, D)
    store.append(keys, values)
    return store, keys, values


def _expected_widths(policy, keys, values, attention, q2, T, o, vo=None):
    """QAQ's formulas, written out for one block (`o`: key outliers, `vo`: value outliers)."""
    vo = o if vo is None else vo

    def clip_range(x):
        s = x.sort(dim=-1).values
        return s[..., -1 - vo.high] - s[..., vo.low]

    v_err = math.sqrt(12 / T) * policy.value_error / attention.clamp_min(1e-6)
    v_need = torch.log2(clip_range(values).amax(dim=(0, 1)) / (2 * v_err) + 1).ceil()
    sigma = math.sqrt(math.log(T**3 / (T - 1) * policy.key_error**2 + 1) / q2)
    s = keys.sort(dim=-1).values
    D = keys.shape[-1]
    clipped = keys.clamp(s[..., o.low : o.low + 1], s[..., D - 1 - o.high : D - o.high])
    k_range = (clipped.amax(dim=2) - clipped.amin(dim=2)).amax()
    k_need = math.ceil(math.log2(k_range / (2 * math.sqrt(3) * sigma) + 1))
    clamp = lambda b: int(min(max(b, policy.min_bits), policy.max_bits))  # noqa: E731
    return clamp(k_need), clamp(int(v_need.max()))


@pytest.mark.parametrize("value_error, key_error", [(0.5, 0.5), (4.0, 1.0), (30.0, 8.0)])
@pytest.mark.parametrize("outliers, value_outliers", [(0.0, None), (0.05, None), (0.05, 0.0), (0.0, 0.1)])
def test_block_widths_follow_the_formulas(value_error, key_error, outliers, value_outliers):
    policy = QAQ(key_error=key_error, value_error=value_error, min_bits=1, max_bits=8,
                 residual=32, group_size=32, outlier_fraction=outliers,
                 value_outlier_fraction=value_outliers)
    store, keys, values = _store_with_window(policy)
    st = policy.new_state()
    attention = torch.rand(96) * 0.5
    st.record(list(range(96)), attention)
    st.query_sq_norms = torch.rand(200) * 4
    q2 = float(torch.quantile(st.query_sq_norms, policy.query_percentile))
    o, vo = store.key_outliers, store.value_outliers
    expected_count = {0.0: 0, 0.05: 4, 0.1: 6}  # per vector of 64: round(f * 32) each end, >= 1
    assert o.count == expected_count[outliers]
    assert vo.count == expected_count[outliers if value_outliers is None else value_outliers]
    got = policy._block_bits(store, st, 0)
    want = _expected_widths(policy, keys[:, :, :32], values[:, :, :32], attention[:32], q2, 96, o, vo)
    assert got == want


def test_more_attention_asks_for_more_value_bits():
    policy = QAQ(value_error=2.0, min_bits=1, max_bits=8, residual=32, group_size=32)
    store, _, _ = _store_with_window(policy)
    widths = []
    for a in (1e-4, 1e-2, 0.5):
        st = policy.new_state()
        st.record(list(range(96)), torch.full((96,), a))
        st.query_sq_norms = torch.ones(10)
        widths.append(policy._block_bits(store, st, 0)[1])
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_policy_quantizes_once_after_the_window_with_its_widths():
    policy = QAQ(value_error=2.0, residual=32, group_size=16, outlier_fraction=0.05)
    store = policy.make_store(1, 2, 64, torch.float32, "cpu")
    assert store.key_outliers == Outliers(2, 2) and store.value_outliers == Outliers(2, 2)
    st = policy.new_state()
    torch.manual_seed(1)
    keys, values = torch.randn(1, 2, 120, 64), torch.randn(1, 2, 120, 64)
    for t in range(120):
        store.append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        q = torch.randn(1, 4, 1, 64) * 0.125
        _, _, stats = store.attend(q, return_stats=True)
        policy.observe(store, st, stats, q)
        assert store.n_tokens - store.n_quantized >= min(policy.residual, store.n_tokens)
    assert store.n_quantized == ((120 - 32) // 16) * 16
    assert all(policy.min_bits <= b <= policy.max_bits for kv in store.block_bits for b in kv)
    # outliers come back exactly: the stored correction restores each set-aside value
    k_hat, v_hat, _ = store.dequantized()
    q = store.n_quantized
    idx = store.k_outlier_index[:, :, :q].long()
    torch.testing.assert_close(k_hat[:, :, :q].gather(-1, idx), keys[:, :, :q].gather(-1, idx), atol=1e-5, rtol=1e-5)
    idx = store.v_outlier_index[:, :, :q].long()
    torch.testing.assert_close(v_hat[:, :, :q].gather(-1, idx), values[:, :, :q].gather(-1, idx), atol=1e-5, rtol=1e-5)
    assert sum(store.nbytes_breakdown().values()) == store.nbytes()


def test_sinks_stay_in_full_precision_and_do_not_widen_their_block():
    policy = QAQ(value_error=2.0, min_bits=1, max_bits=8, residual=32, group_size=32, sinks=2,
                 outlier_fraction=0.0)
    store, keys, values = _store_with_window(policy)
    st = policy.new_state()
    policy.after_append(store, st)
    assert store.pinned == frozenset({0, 1})
    # the sinks draw almost all attention; the block's other tokens almost none
    attention = torch.full((96,), 1e-4)
    attention[:2] = 0.9
    st.record(list(range(96)), attention)
    st.query_sq_norms = torch.ones(10)
    without_sinks = attention.clone()
    without_sinks[:2] = 0
    want = _expected_widths(policy, keys[:, :, :32], values[:, :, :32], without_sinks[:32], 1.0, 96, Outliers())
    assert policy._block_bits(store, st, 0) == want
    unpinned = QAQ(value_error=2.0, min_bits=1, max_bits=8, residual=32, group_size=32, sinks=0,
                   outlier_fraction=0.0)
    plain, _, _ = _store_with_window(unpinned)  # the same tokens, nothing pinned
    assert unpinned._block_bits(plain, st, 0)[1] > want[1]  # the sinks' attention would widen it
    store.quantize_blocks([want])
    assert {0, 1} <= set(store.fp_positions) and store.q_exclude[0, :2].all()
    k_hat, _, _ = store.dequantized()
    torch.testing.assert_close(k_hat[:, :, :2], keys[:, :, :2])


def test_sinks_default_to_four():
    assert QAQ().sinks == DEFAULT_SINKS == 4


def test_sinks_are_pinned_when_the_prefill_is_observed_first():
    # At prefill the integration calls observe (which may quantize) before after_append.
    policy = QAQ(value_error=2.0, residual=32, group_size=32, sinks=1)
    store, keys, _ = _store_with_window(policy)
    st = policy.new_state()
    q = torch.randn(1, 4, 5, 64) * 0.125
    _, _, stats = store.attend(q, return_stats=True)
    policy.observe(store, st, stats, q)
    policy.after_append(store, st)
    assert store.n_quantized == 64 and store.pinned == frozenset({0})
    assert 0 in store.fp_positions and bool(store.q_exclude[0, 0])
    torch.testing.assert_close(store.dequantized()[0][:, :, 0], keys[:, :, 0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_bits=3, max_bits=2), "min_bits"),
    (dict(residual=2, attention_window=5), "residual"),
    (dict(outlier_fraction=0.6), "outlier_fraction"),
    (dict(value_error=0.0), "value_error"),
    (dict(value_outlier_fraction=0.5), "value_outlier_fraction"),
    (dict(sinks=-1), r"QAQ: sinks must be >= 0 \(0 keeps no attention sinks\), got -1"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QAQ(**kwargs).validate()


def test_registered_configurations():
    from torchkvq.policies import REGISTRY, get_policy

    qaq = [n for n in REGISTRY if n.startswith("qaq")]
    assert {"qaq", "qaq-no-outliers", "qaq-g64-r32-sink"} <= set(qaq)
    for name in qaq:
        p = get_policy(name)
        p.validate()
        assert isinstance(p, QAQ) and p.window_dtype == torch.float16
        store = p.make_store(1, 3, 64, torch.float32, "cpu")
        assert store.group_size == p.group_size
    assert get_policy("qaq").sinks == get_policy("qaq-no-outliers").sinks == DEFAULT_SINKS
    assert get_policy("qaq-g64-r32-sink").sinks == 1
    g64 = get_policy("qaq-g64-r32-sink")
    assert (g64.group_size, g64.value_group_size, g64.residual, g64.outlier_fraction) == (64, 64, 32, 0.0)
