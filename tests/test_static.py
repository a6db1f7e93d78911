"""The compile-friendly decode path: kvq.write_tokens and StaticDecoder over a reserved store."""

import pytest
import torch
import torch._dynamo

import torchkvq
from torchkvq import reference
from torchkvq.policies import KIVI
from torchkvq.static import StaticDecoder


def _slots(B=2, H=3, F=7, D=16, n=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_fp = torch.randn(B, H, F, D, generator=g).to(dtype)
    v_fp = torch.randn(B, H, F, D, generator=g).to(dtype)
    fp_pos = torch.randint(-1, 50, (B, F), generator=g)
    key = torch.randn(B, H, n, D, generator=g)
    value = torch.randn(B, H, n, D, generator=g)
    slots = torch.randperm(F, generator=g)[:n]
    positions = torch.randint(0, 100, (B, n), generator=g)
    return k_fp, v_fp, fp_pos, key, value, slots, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 3])
def test_write_tokens_matches_reference(dtype, n):
    args = _slots(n=n, dtype=dtype)
    mine = [t.clone() for t in args]
    ref = [t.clone() for t in args]
    torchkvq.ops.write_tokens(*mine)
    reference.write_tokens(*ref)
    for a, b in zip(mine[:3], ref[:3]):
        assert torch.equal(a, b)
    assert torch.equal(mine[2][:, args[5]], args[6])  # positions landed in their slots


def test_write_tokens_opcheck():
    torch.library.opcheck(torch.ops.kvq.write_tokens.default, _slots())


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.__setitem__(5, a[5].int()), "slots must be int64"),
        (lambda a: a.__setitem__(6, a[6][:1]), "positions must be int64"),
        (lambda a: a.__setitem__(3, a[3][:, :1]), "key and value must be"),
        (lambda a: a.__setitem__(1, a[1][:, :, :3]), "k_fp and v_fp must be"),
    ],
)
def test_write_tokens_bad_input(change, match):
    args = list(_slots())
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torchkvq.ops.write_tokens(*args)


def _store(policy, B=1, H=2, D=64, tokens=512):
    s = policy.make_store(B, H, D, torch.float32, "cpu")
    # exactly enough: a window of up to R + G tokens before a flush, plus the pinned sinks
    s.reserve(tokens, policy.residual + policy.group_size + policy.sinks)
    return s


def _run(backend, steps=70, seed=0):
    torch.manual_seed(seed)
    policy = KIVI(2, 2, group_size=32, residual=64)
    eager_store, compiled_store = _store(policy), _store(policy)
    prompt_k, prompt_v = torch.randn(1, 2, 90, 64), torch.randn(1, 2, 90, 64)
    for s in (eager_store, compiled_store):
        s.append(prompt_k, prompt_v)
        policy.after_append(s, None)
    eager = StaticDecoder(eager_store, policy)
    compiled = StaticDecoder(compiled_store, policy, compile={"backend": backend})
    addresses = compiled_store.k_codes.data_ptr(), compiled_store.k_fp.data_ptr()
    for _ in range(steps):
        q, k, v = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)
        torch.testing.assert_close(compiled.step(q, k, v), eager.step(q, k, v), atol=1e-5, rtol=1e-5)
    assert compiled_store.n_quantized >= 64  # blocks were quantized between compiled steps
    assert compiled_store.pinned == set(range(policy.sinks))  # the sinks outlived their block
    assert (compiled_store.k_codes.data_ptr(), compiled_store.k_fp.data_ptr()) == addresses


def test_static_decode_compiles_once_aot_eager():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run("aot_eager")


@pytest.mark.slow
def test_static_decode_inductor():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        _run("inductor", steps=40)


def test_static_decoder_needs_reserved_store():
    policy = KIVI(2, 2)
    with pytest.raises(ValueError, match="reserve"):
        StaticDecoder(policy.make_store(1, 2, 64, torch.float32, "cpu"), policy)


def test_reserved_store_refuses_to_grow():
    policy = KIVI(2, 2, group_size=32, residual=32)
    s = policy.make_store(1, 2, 64, torch.float32, "cpu")
    s.reserve(64, 16)
    with pytest.raises(RuntimeError, match="reserve"):
        s.append(torch.randn(1, 2, 17, 64), torch.randn(1, 2, 17, 64))
