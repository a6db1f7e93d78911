"""Tests of the KIVI policy (torchkvq.policies.KIVI) driving a KVStore directly.

After every append: the newest >= `residual` tokens are in full precision, quantization only
ever happens in whole blocks and as soon as a block is ready (fewer than residual + group_size
tokens stay in the window), so a prefill's tail that does not fill a block stays in full
precision; the first `sinks` tokens are pinned; every block has the policy's key/value widths.
Also: validate() errors, names, the registry, make_store.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from torchkvq.policies import DEFAULT_SINKS, KIVI, REGISTRY, Policy, get_policy


def rnd(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def feed(policy, chunks, B=1, H=2, D=64, dtype=torch.float32, seed=0, check=None):
    """Append chunks of the given sizes, calling after_append after each; returns the store."""
    store = policy.make_store(B, H, D, dtype, "cpu")
    state = policy.new_state()
    T = sum(chunks)
    k, v = rnd((B, H, T, D), seed), rnd((B, H, T, D), seed + 1)
    t = 0
    for n in chunks:
        store.append(k[:, :, t : t + n], v[:, :, t : t + n])
        policy.after_append(store, state)
        t += n
        if check is not None:
            check(store)
    return store


def kivi_invariants(policy: KIVI):
    R, G = policy.residual, policy.group_size

    def check(store):
        T, q = store.n_tokens, store.n_quantized
        assert q % G == 0  # whole blocks only
        assert T - q >= R or q == 0  # at least the newest R tokens stay fp
        assert T - q - R < G  # ... and no full block more than that
        assert q == max(0, (T - R) // G * G)
        sinks = set(range(min(policy.sinks, T)))
        assert set(store.fp_positions) == set(range(q, T)) | sinks
        assert store.pinned == frozenset(sinks)
        assert store.block_bits == [(policy.key_bits, policy.value_bits)] * (q // G)
        nb = q // G
        assert store.k_bits[:nb].tolist() == [policy.key_bits] * nb
        assert store.v_bits[:nb].tolist() == [policy.value_bits] * nb
        assert not bool(store.k_bits[nb:].any())  # unused blocks have width 0
        if q:
            excluded = store.q_exclude[:, :q]
            want = torch.zeros(q, dtype=torch.bool)
            want[: min(policy.sinks, q)] = True
            assert torch.equal(excluded, want.expand_as(excluded))

    return check


@pytest.mark.parametrize("chunks", [[200], [200] + [1] * 70, [1] * 300, [37, 5, 90, 1, 1, 64, 3]])
@pytest.mark.parametrize("kb, vb", [(2, 2), (4, 2), (8, 4)])
def test_window_and_blocks(chunks, kb, vb):
    p = KIVI(key_bits=kb, value_bits=vb, group_size=32, residual=128)
    store = feed(p, chunks, check=kivi_invariants(p))
    assert store.n_tokens == sum(chunks)


def test_prefill_tail_stays_full_precision():
    p = KIVI(key_bits=2, value_bits=2, group_size=32, residual=128, sinks=0)  # the window alone
    store = feed(p, [200])
    assert store.n_quantized == 64  # (200 - 128) // 32 = 2 blocks
    assert store.fp_positions == list(range(64, 200))
    store = feed(p, [159])  # shorter than R + G: nothing is quantized
    assert store.n_quantized == 0 and store.fp_positions == list(range(159))
    p0 = KIVI(key_bits=4, value_bits=4, group_size=16, residual=0, sinks=0)
    store = feed(p0, [70])  # R = 0: everything but the tail that does not fill a block
    assert store.n_quantized == 64 and store.fp_positions == list(range(64, 70))


def test_sinks_are_pinned_and_attended_in_full_precision():
    p = KIVI(key_bits=2, value_bits=2, group_size=16, residual=16, sinks=4)
    store = feed(p, [10] + [1] * 60, check=kivi_invariants(p))
    assert store.n_quantized == 48
    assert store.fp_positions[:4] == [0, 1, 2, 3]
    k, v, _ = store.dequantized()
    ref = rnd((1, 2, 70, 64), 0)
    assert torch.equal(k[:, :, :4], ref[:, :, :4])  # the sinks come back exactly
    q = rnd((1, 4, 1, 64), 9)
    out = store.attend(q)[0]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_sinks_default_to_four():
    assert KIVI().sinks == DEFAULT_SINKS == 4
    p = KIVI(key_bits=2, value_bits=2, group_size=16, residual=16)
    store = feed(p, [40, 1, 1])
    assert store.n_quantized == 16 and store.pinned == {0, 1, 2, 3}
    assert not feed(KIVI(key_bits=2, value_bits=2, group_size=16, residual=16, sinks=0), [40, 1, 1]).pinned


@given(
    chunks=st.lists(st.integers(1, 70), min_size=1, max_size=12),
    G=st.sampled_from([8, 16, 32]),
    R=st.integers(0, 80),
    sinks=st.integers(0, 8),
    kb=st.integers(1, 8),
    vb=st.integers(1, 8),
)
def test_property_kivi_invariants(chunks, G, R, sinks, kb, vb):
    p = KIVI(key_bits=kb, value_bits=vb, group_size=G, residual=R, sinks=sinks)
    p.validate()
    feed(p, chunks, B=2, H=1, D=64, check=kivi_invariants(p))


def test_many_sinks_with_single_token_appends():
    p = KIVI(key_bits=4, value_bits=4, group_size=8, residual=0, sinks=16)
    store = feed(p, [1] * 40)
    assert store.pinned == frozenset(range(16))


def test_batch_and_dtypes():
    p = KIVI(key_bits=4, value_bits=2, group_size=16, residual=16, window_dtype=torch.float16)
    store = feed(p, [50, 1, 1, 30], B=3, H=2, D=128, check=kivi_invariants(p))
    assert store.dtype == torch.float16 and store.k_fp.dtype == torch.float16
    assert store.value_group_size == 16
    p2 = KIVI(group_size=32, value_group_size=64, scale_dtype=torch.float32)
    s2 = p2.make_store(1, 1, 128, torch.bfloat16, "cpu")
    assert (s2.dtype, s2.value_group_size, s2.scale_dtype, s2.group_size) == (
        torch.bfloat16, 64, torch.float32, 32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(key_bits=0), r"key_bits must be in \[1, 8\], got 0"),
    (dict(key_bits=9), r"key_bits must be in \[1, 8\], got 9"),
    (dict(value_bits=0), r"value_bits must be in \[1, 8\], got 0"),
    (dict(value_bits=16), r"value_bits must be in \[1, 8\], got 16"),
    (dict(group_size=12), "group_size must be a positive multiple of 8, got 12"),
    (dict(group_size=0), "group_size must be a positive multiple of 8"),
    (dict(residual=-1), "KIVI: residual must be >= 0, got -1"),
    (dict(sinks=-2), r"KIVI: sinks must be >= 0 \(0 keeps no attention sinks\), got -2"),
])
def test_validate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KIVI(**kwargs).validate()


def test_names_and_registry():
    assert KIVI(key_bits=2, value_bits=2).name == "kivi-2"
    assert KIVI(key_bits=4, value_bits=2).name == "kivi-k4v2"
    kivi = {"kivi-2", "kivi-4", "kivi-2-g128", "kivi-2-no-sinks"}
    assert set(REGISTRY) >= kivi
    for name in sorted(kivi):
        p = get_policy(name)
        assert isinstance(p, Policy) and p.name == name.removesuffix("-g128").removesuffix("-no-sinks")
        p.validate()
        assert p.window_dtype == torch.float16
        assert p.sinks == (0 if name.endswith("-no-sinks") else DEFAULT_SINKS)
    assert get_policy("kivi-2-no-sinks") == KIVI(key_bits=2, value_bits=2, sinks=0, window_dtype=torch.float16)
    assert get_policy("kivi-2") is not get_policy("kivi-2")  # a fresh policy each time
    g128 = get_policy("kivi-2-g128")
    assert (g128.group_size, g128.value_group_size) == (128, 64)
    with pytest.raises(ValueError, match="unknown policy 'nope'; known: kivi-2"):
        get_policy("nope")
