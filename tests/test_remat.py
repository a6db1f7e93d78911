"""Tests of kvq::remat_kv (CPU kernel, fake, reference): XQuant's rematerialization of keys and
values from packed X (or a low-rank latent), RoPE fused.

(a) reference sweep (bits 1-8 x group size x dtype x bias x RoPE) with a FlashAttention-style
    bound: the kernel's error against a float64 ground truth is at most 2x the error of the
    same-precision reference (plus a tiny atol),
(b) RoPE equals transformers' apply_rotary_pos_emb on the model's own rotary tables; one call
    over cat(W_k, W_v) equals two calls; an SVD latent rematerializes X·W_kᵀ,
(c) hypothesis: fused == dequantize-then-linear-then-RoPE, (d) opcheck, (e) torch.compile,
(f) bad inputs (kernel and fake raise the same message).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import torchkvq
from torchkvq import reference as ref

from store_factory import assert_flash_close, assert_same

remat_kv = torch.ops.kvq.remat_kv
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def dt_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rope_tables(N: int, T: int, hd: int, gen: torch.Generator, theta: float = 10000.0):
    """cos/sin [N, T, hd] at random (distinct per row) positions, as transformers builds them."""
    pos = torch.randint(0, 4096, (N, T), generator=gen).double()
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def make_case(*, N, T, d, n_out, bits, group_size, dtype, bias=False, hd=0, rope_heads=0,
              cos_rows=None, scale_dtype=torch.float16, seed=0):
    """(args, X_hat f64, cos f64, sin f64) with x [N, T, d] packed per token and a weight [n_out, d]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, d, generator=gen) + 0.5 * torch.randn(1, 1, d, generator=gen)
    codes, scale, zero = torch.ops.kvq.quantize(x, bits, group_size, -1, scale_dtype)
    w = (torch.randn(n_out, d, generator=gen) / math.sqrt(d)).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype) if bias else None
    cos = sin = None
    cos64 = sin64 = None
    if hd:
        cos64, sin64 = rope_tables(N if cos_rows is None else cos_rows, T, hd, gen)
        cos, sin = cos64.to(dtype), sin64.to(dtype)
    args = (codes, scale, zero, bits, group_size, w, b, cos, sin, hd * rope_heads)
    return args, x_hat_f64(args)


def x_hat_f64(args) -> torch.Tensor:
    codes, scale, zero, bits, group_size = args[:5]
    q = ref.unpack_codes(codes, bits).double()
    q = q.reshape(*q.shape[:-1], -1, group_size)
    return (q * scale.double()[..., None] + zero.double()[..., None]).flatten(-2)


def truth_f64(args, x: torch.Tensor) -> torch.Tensor:
    """The float64 ground truth, from the inputs as they are (weight/bias/cos/sin in their dtype)."""
    _, _, _, _, _, w, b, cos, sin, rope_dim = args
    out = x @ w.double().T
    if b is not None:
        out = out + b.double()
    if rope_dim:
        N, T = out.shape[:2]
        hd = cos.shape[-1]
        k = out[..., :rope_dim].reshape(N, T, -1, hd)
        k = ref.rotate_half_rope(k, cos.double(), sin.double())
        out = torch.cat([k.reshape(N, T, rope_dim), out[..., rope_dim:]], -1)
    return out


def check(args, x):
    got = remat_kv(*args)
    want = ref.remat_kv(*args)
    assert got.dtype == args[5].dtype and got.shape == want.shape
    assert_flash_close(got, want, truth_f64(args, x), "out")
    return got


# ---------------------------------------------------------------------------------------------
# (a) reference sweep
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_reference(bits, group_size, dtype, bias, rope):
    seed = bits * 1000 + group_size * 10 + FLOATS.index(dtype) * 3 + 2 * bias + rope
    # 37 tokens: one full 32-token tile and a ragged one; rope on 2 of 3 heads of 16
    args, x = make_case(N=2, T=37, d=2 * group_size, n_out=48, bits=bits, group_size=group_size,
                        dtype=dtype, bias=bias, hd=16 if rope else 0, rope_heads=2,
                        scale_dtype=(torch.float16, torch.float32)[seed % 2], seed=seed)
    check(args, x)


@pytest.mark.parametrize("dtype", FLOATS, ids=dt_id)
@pytest.mark.parametrize(
    "N, T, d, n_out, group_size, hd, rope_heads, cos_rows",
    [
        (1, 1, 576, 384, 64, 64, 3, 1),  # decode: one token, SmolLM2's X -> cat(W_k, W_v)
        (1, 200, 192, 192, 64, 64, 3, 1),  # a GQA key latent (rank 192), RoPE on every head
        (3, 65, 128, 256, 32, 128, 1, 3),  # head_dim 128, per-row rotary tables
        (2, 96, 256, 512, 128, 256, 2, 1),  # head_dim 256, one table for the batch
        (1, 33, 64, 40, 8, 0, 0, None),  # values only: no RoPE, n_out not a multiple of 8
    ],
)
def test_shapes(N, T, d, n_out, group_size, hd, rope_heads, cos_rows, dtype):
    for bits in (2, 3, 8):
        args, x = make_case(N=N, T=T, d=d, n_out=n_out, bits=bits, group_size=group_size,
                            dtype=dtype, bias=bits == 3, hd=hd, rope_heads=rope_heads,
                            cos_rows=cos_rows, seed=T + d + bits)
        check(args, x)


def test_constant_x_is_exact():
    """Constant groups dequantize exactly: the result is the plain matmul of the constant."""
    x = torch.full((1, 16, 32), 0.75)
    codes, scale, zero = torch.ops.kvq.quantize(x, 2, 32, -1, torch.float32)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    got = remat_kv(codes, scale, zero, 2, 32, w, None, None, None, 0)
    torch.testing.assert_close(got, (x @ w.T), rtol=0, atol=1e-6)


def test_non_contiguous_inputs():
    args, _ = make_case(N=2, T=40, d=64, n_out=32, bits=3, group_size=32, dtype=torch.float32,
                        bias=True, hd=16, rope_heads=1, cos_rows=2, seed=8)
    codes, scale, zero, bits, g, w, b, cos, sin, rd = args
    nc = lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    args2 = (nc(codes), nc(scale), nc(zero), bits, g, w.T.contiguous().T, b, nc(cos), nc(sin), rd)
    assert not args2[0].is_contiguous() and not args2[5].is_contiguous()
    assert_same(remat_kv(*args2), remat_kv(*args))


def test_wrapper_matches_op():
    args, _ = make_case(N=1, T=20, d=64, n_out=32, bits=4, group_size=32, dtype=torch.float16,
                        bias=True, hd=16, rope_heads=2, seed=9)
    assert_same(torchkvq.ops.remat_kv(*args), remat_kv(*args))


# ---------------------------------------------------------------------------------------------
# (b) what XQuant relies on
# ---------------------------------------------------------------------------------------------


def test_rope_equals_transformers():
    """The fused RoPE is transformers' apply_rotary_pos_emb on the model's own tables."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=2,
                                   head_dim=64, rope_parameters={"rope_theta": 1e5, "rope_type": "default"})
    rot = LlamaRotaryEmbedding(cfg)
    N, T, d, H, hd = 2, 50, 128, 2, 64
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, T, d, generator=gen)
    pos = torch.randint(0, 8000, (N, T), generator=gen)
    cos, sin = rot(x, pos)
    w = torch.randn(H * hd, d, generator=gen) / math.sqrt(d)
    codes, scale, zero = torch.ops.kvq.quantize(x, 8, 32, -1, torch.float32)
    x_hat = torch.ops.kvq.dequantize(codes, scale, zero, 8, 32, -1, torch.float32)
    k = (x_hat @ w.T).view(N, T, H, hd).transpose(1, 2)
    _, want = apply_rotary_pos_emb(k, k, cos, sin)
    got = remat_kv(codes, scale, zero, 8, 32, w, None, cos, sin, H * hd)
    torch.testing.assert_close(got.view(N, T, H, hd).transpose(1, 2), want, rtol=1e-5, atol=1e-5)


def test_one_call_for_keys_and_values_equals_two():
    """MHA XQuant unpacks X once for cat(W_k, W_v): the same numbers as two separate calls."""
    args, _ = make_case(N=1, T=70, d=128, n_out=256, bits=2, group_size=64, dtype=torch.float32,
                        bias=True, hd=64, rope_heads=2, seed=11)
    codes, scale, zero, bits, g, w, b, cos, sin, _ = args
    both = remat_kv(codes, scale, zero, bits, g, w, b, cos, sin, 128)
    k = remat_kv(codes, scale, zero, bits, g, w[:128], b[:128], cos, sin, 128)
    v = remat_kv(codes, scale, zero, bits, g, w[128:], b[128:], None, None, 0)
    torch.testing.assert_close(both, torch.cat([k, v], -1), rtol=1e-6, atol=1e-6)


def test_svd_latent_rematerializes_keys():
    """An SVD latent of rank kv_dim carries X·W_kᵀ exactly: through 8-bit codes, the latent's
    rematerialization is as close to X·W_kᵀ as quantizing X itself would be (no rank loss)."""
    gen = torch.Generator().manual_seed(5)
    d, r = 192, 64
    w = torch.randn(r, d, generator=gen) / math.sqrt(d)
    x = torch.randn(1, 90, d, generator=gen)
    u, s, vh = torch.linalg.svd(w.T, full_matrices=False)  # W_kᵀ = U Σ Bᵀ
    latent = x @ u
    codes, scale, zero = torch.ops.kvq.quantize(latent, 8, 64, -1, torch.float32)
    got = remat_kv(codes, scale, zero, 8, 64, (s[:, None] * vh).T.contiguous(), None, None, None, 0)
    want = x @ w.T
    err = (got - want).abs().max() / want.abs().max()
    assert err < 5e-3, err


# ---------------------------------------------------------------------------------------------
# (c) hypothesis: fused == dequantize, then linear, then RoPE
# ---------------------------------------------------------------------------------------------

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


@given(
    bits=st.integers(1, 8),
    group_size=st.sampled_from([8, 16, 32, 64]),
    groups=st.integers(1, 3),
    dtype=st.sampled_from(FLOATS),
    scale_dtype=st.sampled_from([torch.float16, torch.float32]),
    N=st.integers(1, 3),
    T=st.integers(1, 70),
    heads=st.integers(1, 3),
    hd=st.sampled_from([2, 8, 16]),
    rope_heads=st.integers(0, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_fused_equals_unfused(bits, group_size, groups, dtype, scale_dtype, N, T, heads,
                                       hd, rope_heads, bias, seed):
    rope_heads = min(rope_heads, heads)
    args, _ = make_case(N=N, T=T, d=groups * group_size, n_out=heads * hd, bits=bits,
                        group_size=group_size, dtype=dtype, bias=bias,
                        hd=hd if rope_heads else 0, rope_heads=rope_heads,
                        scale_dtype=scale_dtype, seed=seed)
    codes, scale, zero, _, _, w, b, cos, sin, rope_dim = args
    x = torch.ops.kvq.dequantize(codes, scale, zero, bits, group_size, -1, torch.float32)
    want = torch.nn.functional.linear(x, w.float(), None if b is None else b.float())
    if rope_dim:
        k = ref.rotate_half_rope(want[..., :rope_dim].reshape(N, T, -1, hd), cos.float(), sin.float())
        want = torch.cat([k.reshape(N, T, -1), want[..., rope_dim:]], -1)
    got = remat_kv(*args)
    assert got.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()))


# ---------------------------------------------------------------------------------------------
# (d) opcheck, (e) torch.compile
# ---------------------------------------------------------------------------------------------

OPCHECK = [
    # N, T, d, n_out, bits, group_size, dtype, bias, hd, rope_heads, cos_rows, scale_dtype
    (1, 5, 64, 32, 2, 32, torch.float32, False, 16, 1, None, torch.float16),
    (2, 33, 96, 48, 3, 32, torch.float16, True, 0, 0, None, torch.float32),
    (2, 9, 64, 64, 8, 8, torch.bfloat16, True, 32, 2, 1, torch.float16),
]


@pytest.mark.parametrize("N, T, d, n_out, bits, g, dtype, bias, hd, rh, cr, sdt", OPCHECK)
def test_opcheck(N, T, d, n_out, bits, g, dtype, bias, hd, rh, cr, sdt):
    args, _ = make_case(N=N, T=T, d=d, n_out=n_out, bits=bits, group_size=g, dtype=dtype,
                        bias=bias, hd=hd, rope_heads=rh, cos_rows=cr, scale_dtype=sdt, seed=3)
    torch.library.opcheck(remat_kv.default, args)


def test_compile_aot_eager():
    torch._dynamo.reset()

    def fn(x, w, b, cos, sin):  # quantize X, rematerialize K (RoPE) and V in one call
        c, s, z = torch.ops.kvq.quantize(x, 4, 32, -1, None)
        kv = torch.ops.kvq.remat_kv(c, s, z, 4, 32, w, b, cos, sin, 64)
        return kv[..., :64], kv[..., 64:]

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 40, 128, generator=gen)
    w, b = torch.randn(128, 128, generator=gen), torch.randn(128, generator=gen)
    cos, sin = (t.float() for t in rope_tables(1, 40, 32, gen))
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w, b, cos, sin)
    for g, want in zip(got, fn(x, w, b, cos, sin)):
        assert_same(g, want)


# ---------------------------------------------------------------------------------------------
# (f) bad inputs: the kernel and the fake raise the same message
# ---------------------------------------------------------------------------------------------

NAMES = ["codes", "scale", "zero", "bits", "group_size", "weight", "bias", "cos", "sin", "rope_dim"]


def _base():
    args, _ = make_case(N=2, T=10, d=64, n_out=48, bits=4, group_size=32, dtype=torch.float32,
                        bias=True, hd=16, rope_heads=2, seed=1)
    return list(args)


def _with(**changes):
    def make():
        args = _base()
        for k, f in changes.items():
            i = NAMES.index(k)
            args[i] = f(args[i], args)
        return args

    return make


OP = "kvq::remat_kv: "
DQ = OP  # the codes/scale/zero rules are kvq::dequantize's, the messages name the op called
BAD = {
    "codes_rank2": (_with(codes=lambda c, _: c[0], scale=lambda s, _: s[0], zero=lambda z, _: z[0]),
                    OP + r"codes must be \[batch, tokens, packed channels\] \(rank 3\), got rank 2"),
    "weight_float64": (_with(weight=lambda w, _: w.double()),
                       OP + "weight must be float32, float16 or bfloat16, got Double"),
    "codes_dtype": (_with(codes=lambda c, _: c.to(torch.int8)), DQ + "codes must be uint8, got Char"),
    "bits_9": (_with(bits=lambda b, _: 9), DQ + r"bits must be in \[1, 8\], got 9"),
    "scale_shape": (_with(scale=lambda s, _: s[:, :, :1]), DQ + r"scale must have shape \[2, 10, 2\]"),
    "weight_shape": (_with(weight=lambda w, _: w[:, :60]),
                     OP + r"weight must be \[out_features, 64\] \(nn.Linear layout; in_features = "
                     r"the packed operand's 64 channels\), got \[48, 60\]"),
    "weight_rank": (_with(weight=lambda w, _: w[None]), OP + r"weight must be \[out_features, 64\]"),
    "bias_dtype": (_with(bias=lambda b, _: b.half()), OP + "bias must have weight's dtype Float, got Half"),
    "bias_shape": (_with(bias=lambda b, _: b[:47]),
                   OP + r"bias must have shape \[48\] \(one per output channel\), got \[47\]"),
    "cos_without_sin": (_with(sin=lambda s, _: None), OP + "cos and sin must be given together"),
    "sin_without_cos": (_with(cos=lambda c, _: None), OP + "cos and sin must be given together"),
    "rope_dim_without_tables": (_with(cos=lambda c, _: None, sin=lambda s, _: None),
                                OP + "rope_dim must be 0 without cos and sin, got 32"),
    "cos_dtype": (_with(cos=lambda c, _: c.double()), OP + "cos must have weight's dtype Float, got Double"),
    "sin_dtype": (_with(sin=lambda s, _: s.half()), OP + "sin must have weight's dtype Float, got Half"),
    "cos_tokens": (_with(cos=lambda c, _: c[:, :9], sin=lambda s, _: s[:, :9]),
                   OP + r"cos must be \[2 or 1, 10, head_dim\] with an even head_dim .*got \[2, 9, 16\]"),
    "cos_batch": (_with(cos=lambda c, _: torch.cat([c, c]), sin=lambda s, _: torch.cat([s, s])),
                  OP + r"cos must be \[2 or 1, 10, head_dim\]"),
    "cos_odd_head_dim": (_with(cos=lambda c, _: c[..., :15], sin=lambda s, _: s[..., :15]),
                         OP + r"cos must be .* with an even head_dim"),
    "sin_shape": (_with(sin=lambda s, _: s[:1]),
                  OP + r"sin must have shape \[2, 10, 16\] \(the shape of cos\), got \[1, 10, 16\]"),
    "rope_dim_not_multiple": (_with(rope_dim=lambda r, _: 24),
                              OP + "rope_dim must be a positive multiple of head_dim 16 and at "
                              "most 48 output channels, got 24"),
    "rope_dim_too_large": (_with(rope_dim=lambda r, _: 64), OP + "rope_dim must be .*got 64"),
    "rope_dim_zero_with_tables": (_with(rope_dim=lambda r, _: 0), OP + "rope_dim must be .*got 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rejects(case):
    make, msg = BAD[case]
    with pytest.raises(RuntimeError, match="^" + msg):
        remat_kv(*make())


@pytest.mark.parametrize("case", list(BAD))
def test_fake_rejects_with_the_kernel_message(case):
    make, msg = BAD[case]
    args = make()
    with pytest.raises(RuntimeError) as kernel:
        remat_kv(*args)
    with pytest.raises(RuntimeError, match="^" + msg) as fake:
        with FakeTensorMode() as mode:
            remat_kv(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert str(kernel.value).splitlines()[0] == str(fake.value).splitlines()[0]
