"""Random, valid argument sets for ``kvq::quant_attention`` and float64 ground truths.

The layout follows ``torchkvq.ops.quant_attention``'s docstring and
``torchkvq.reference.dequantize_blocks``:

* blocks of ``G = group_size`` quantized tokens; block b's keys are quantized per channel
  (``kvq.quantize`` along tokens, one group per block) and its values per token (along channels
  in groups of ``v_group_size``); the packed bytes of all used blocks are concatenated per
  (batch, kv head) into ``k_codes`` / ``v_codes`` ``[B, Hkv, bytes]``;
* a width of 0 marks an unused block: it takes no bytes in the pool and its scales/zeros are
  NaN (so a kernel that reads them anyway produces NaN);
* full-precision slots ``k_fp``/``v_fp`` ``[B, Hkv, F, D]`` at positions ``fp_pos`` ``[B, F]``
  (shuffled, some -1 = empty), holding the window after the quantized tokens and, when
  ``q_exclude`` is used, some quantized tokens pinned in full precision.

``attention_f64`` computes the exact (float64) attention of such an argument set, independent
of ``torchkvq.reference.quant_attention`` (which works in float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torchkvq import reference as ref

ARG_NAMES = (
    "query", "k_codes", "k_scale", "k_zero", "k_bits", "v_codes", "v_scale", "v_zero", "v_bits",
    "k_fp", "v_fp", "fp_pos", "q_exclude", "k_outlier_index", "k_outlier_value",
    "v_outlier_index", "v_outlier_value", "group_size", "v_group_size", "scale", "causal",
    "return_stats", "q_offset", "window", "softcap",
)


@dataclass
class AttentionArgs:
    """All arguments of one ``kvq::quant_attention`` call, by schema name."""

    kw: dict = field(default_factory=dict)

    def __getitem__(self, name):
        return self.kw[name]

    def args(self) -> tuple:
        """Positional arguments in schema order."""
        return tuple(self.kw[n] for n in ARG_NAMES)

    def replace(self, **changes) -> "AttentionArgs":
        kw = dict(self.kw)
        kw.update(changes)
        return AttentionArgs(kw)

    @property
    def tokens_held(self) -> int:
        return self.kw["k_bits"].numel() * self.kw["group_size"] + self.kw["k_fp"].shape[2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct_channels(shape, n: int, D: int, gen: torch.Generator) -> torch.Tensor:
    """int16 ``[*shape, n]``: n distinct channels in [0, D) per row."""
    if n == 0:
        return torch.zeros(*shape, 0, dtype=torch.int16)
    keys = torch.rand(*shape, D, generator=gen)
    return keys.argsort(dim=-1)[..., :n].to(torch.int16)


def make_attention_args(
    *,
    B: int = 1,
    Hq: int = 2,
    Hkv: int = 1,
    L: int = 1,
    D: int = 64,
    k_widths=(2, 4),
    v_widths=None,
    group_size: int = 32,
    v_group_size: int = 32,
    F: int = 5,
    n_empty: int = 1,
    q_exclude: bool = False,
    n_k_outliers: int = 0,
    n_v_outliers: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    fp_dtype: torch.dtype = torch.float32,
    q_dtype: torch.dtype = torch.float32,
    causal: bool = False,
    return_stats: bool = False,
    scale: float | None = None,
    pool_slack: int = 0,
    seed: int = 0,
    key_offset: float = 0.5,
    q_offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
) -> AttentionArgs:
    """A random valid argument set. `k_widths` lists each block's key width (0 = unused);
    `v_widths` the value widths (default: the key widths; zeros must coincide). `n_empty` of
    the `F` fp slots per batch row are empty (-1) when F allows; with `q_exclude`, about a
    quarter of the quantized tokens are excluded and some of them pinned in the fp slots.
    Quantized token i sits at position ``q_offset + i`` (the fp window follows them)."""
    gen = _gen(seed)
    G = group_size
    k_widths = [int(w) for w in k_widths]
    v_widths = k_widths if v_widths is None else [int(w) for w in v_widths]
    assert len(v_widths) == len(k_widths)
    NB, Q = len(k_widths), len(k_widths) * G
    nan = float("nan")

    k_codes, v_codes = [], []
    k_scale = torch.full((B, Hkv, NB, D), nan, dtype=scale_dtype)
    k_zero = torch.full((B, Hkv, NB, D), nan, dtype=scale_dtype)
    v_scale = torch.full((B, Hkv, Q, D // v_group_size), nan, dtype=scale_dtype)
    v_zero = torch.full((B, Hkv, Q, D // v_group_size), nan, dtype=scale_dtype)
    for b, (kw, vw) in enumerate(zip(k_widths, v_widths)):
        if kw == 0:
            continue
        # Keys with per-channel offsets (like real keys), values plain.
        kx = torch.randn(B, Hkv, G, D, generator=gen) + key_offset * torch.randn(
            B, Hkv, 1, D, generator=gen)
        vx = torch.randn(B, Hkv, G, D, generator=gen)
        c, s, z = torch.ops.kvq.quantize(kx, kw, G, 2, scale_dtype)
        k_codes.append(c.reshape(B, Hkv, -1))
        k_scale[:, :, b : b + 1], k_zero[:, :, b : b + 1] = s, z
        c, s, z = torch.ops.kvq.quantize(vx, vw, v_group_size, 3, scale_dtype)
        v_codes.append(c.reshape(B, Hkv, -1))
        v_scale[:, :, b * G : (b + 1) * G], v_zero[:, :, b * G : (b + 1) * G] = s, z
    slack = torch.randint(0, 256, (B, Hkv, pool_slack), generator=gen, dtype=torch.uint8)
    k_codes = torch.cat(k_codes + [slack], dim=2) if k_codes else slack.clone()
    v_codes = torch.cat(v_codes + [slack], dim=2) if v_codes else slack.clone()

    used = torch.tensor(k_widths).repeat_interleave(G) > 0 if NB else torch.zeros(0, dtype=torch.bool)
    excl = None
    pinned: list[list[int]] = [[] for _ in range(B)]
    if q_exclude:
        excl = (torch.rand(B, Q, generator=gen) < 0.25) if Q else torch.zeros(B, 0, dtype=torch.bool)
        for bi in range(B):
            cand = torch.nonzero(excl[bi] & used).flatten().tolist()
            pinned[bi] = cand[: max(0, (F - n_empty) // 2)]

    fp_pos = torch.full((B, F), -1, dtype=torch.int64)
    for bi in range(B):
        n_full = max(0, F - min(n_empty, F) - (bi % 2))  # rows hold different counts
        pos = [q_offset + i for i in pinned[bi][:n_full]]
        pos = pos + list(range(q_offset + Q, q_offset + Q + n_full - len(pos)))  # the window after the quantized part
        slots = torch.randperm(F, generator=gen)[: len(pos)]
        fp_pos[bi, slots] = torch.tensor(pos, dtype=torch.int64)
    k_fp = (torch.randn(B, Hkv, F, D, generator=gen) + key_offset * torch.randn(
        B, Hkv, 1, D, generator=gen)).to(fp_dtype)
    v_fp = torch.randn(B, Hkv, F, D, generator=gen).to(fp_dtype)

    kw = dict(
        query=torch.randn(B, Hq, L, D, generator=gen).to(q_dtype),
        k_codes=k_codes, k_scale=k_scale, k_zero=k_zero,
        k_bits=torch.tensor(k_widths, dtype=torch.int32),
        v_codes=v_codes, v_scale=v_scale, v_zero=v_zero,
        v_bits=torch.tensor(v_widths, dtype=torch.int32),
        k_fp=k_fp, v_fp=v_fp, fp_pos=fp_pos, q_exclude=excl,
        k_outlier_index=None, k_outlier_value=None, v_outlier_index=None, v_outlier_value=None,
        group_size=G, v_group_size=v_group_size,
        scale=D ** -0.5 if scale is None else scale, causal=causal, return_stats=return_stats,
        q_offset=q_offset, window=window, softcap=softcap,
    )
    if n_k_outliers:
        kw["k_outlier_index"] = _distinct_channels((B, Hkv, Q), n_k_outliers, D, gen)
        kw["k_outlier_value"] = (3 * torch.randn(B, Hkv, Q, n_k_outliers, generator=gen)).to(fp_dtype)
    if n_v_outliers:
        kw["v_outlier_index"] = _distinct_channels((B, Hkv, Q), n_v_outliers, D, gen)
        kw["v_outlier_value"] = (3 * torch.randn(B, Hkv, Q, n_v_outliers, generator=gen)).to(fp_dtype)
    return AttentionArgs(kw)


def nan_cases(causal: bool):
    """(args, rows expected NaN [B, Hq, L]): a NaN and an Inf in two queries, and a NaN in one
    full-precision key, which poisons exactly the rows of its kv head that see its position."""
    a = make_attention_args(B=2, Hq=4, Hkv=2, L=3, D=64, k_widths=(2, 0, 4, 3), group_size=32,
                            F=9, causal=causal, return_stats=True, seed=12)
    q, k_fp = a["query"].clone(), a["k_fp"].clone()
    q[0, 1, 2, 5] = float("nan")
    q[1, 3, 0, 7] = float("inf")  # scores +inf (or NaN where the key's channel is 0)
    held = a["fp_pos"][1].masked_fill(a["fp_pos"][1] < 0, 1 << 40)
    slot = int(held.argmin())  # batch row 1's oldest fp token: every query sees it
    k_fp[1, 0, slot, 9] = float("nan")
    want = torch.zeros(2, 4, 3, dtype=torch.bool)
    want[0, 1, 2] = want[1, 3, 0] = True
    want[1, :2] = True  # query heads 0 and 1 read kv head 0
    return a.replace(query=q, k_fp=k_fp), want


def dequantize_blocks_f64(codes, scale, zero, bits, group_size, v_group_size, head_dim):
    """Like ``reference.dequantize_blocks`` but ``code * scale + zero`` in float64."""
    B, H = codes.shape[:2]
    G, D = group_size, head_dim
    out, offset = [], 0
    for b, w in enumerate(bits.tolist()):
        if w == 0:
            out.append(torch.zeros(B, H, G, D, dtype=torch.float64))
            continue
        nbytes = G * D * w // 8
        chunk = codes[:, :, offset : offset + nbytes]
        offset += nbytes
        if v_group_size is None:  # keys: [G*w/8, D] packed along tokens, scale per channel
            q = ref.unpack_codes(chunk.reshape(B, H, G * w // 8, D).transpose(-1, -2), w)
            q = q.transpose(-1, -2).double()  # [B, H, G, D]
            s = scale[:, :, b : b + 1].double()
            z = zero[:, :, b : b + 1].double()
            out.append(q * s + z)
        else:  # values: [G, D*w/8] packed along channels, scale per token and channel group
            q = ref.unpack_codes(chunk.reshape(B, H, G, D * w // 8), w).double()
            q = q.reshape(B, H, G, D // v_group_size, v_group_size)
            s = scale[:, :, b * G : (b + 1) * G].double()[..., None]
            z = zero[:, :, b * G : (b + 1) * G].double()[..., None]
            out.append((q * s + z).reshape(B, H, G, D))
    if not out:
        return torch.zeros(B, H, 0, D, dtype=torch.float64)
    return torch.cat(out, dim=2)


def held_tokens_f64(a: AttentionArgs):
    """(keys, values [B, Hkv, T, D] float64, valid [B, T], positions [B, T]) of every held token,
    quantized ones first, then the fp slots."""
    D = a["query"].shape[-1]
    G = a["group_size"]
    kq = dequantize_blocks_f64(a["k_codes"], a["k_scale"], a["k_zero"], a["k_bits"], G, None, D)
    vq = dequantize_blocks_f64(a["v_codes"], a["v_scale"], a["v_zero"], a["v_bits"], G,
                               a["v_group_size"], D)
    if a["k_outlier_index"] is not None:
        kq = kq.scatter_add(-1, a["k_outlier_index"].long(), a["k_outlier_value"].double())
    if a["v_outlier_index"] is not None:
        vq = vq.scatter_add(-1, a["v_outlier_index"].long(), a["v_outlier_value"].double())
    B, Q = a["fp_pos"].shape[0], kq.shape[2]
    q_valid = (a["k_bits"] > 0).repeat_interleave(G)[None].expand(B, Q)
    if a["q_exclude"] is not None:
        q_valid = q_valid & ~a["q_exclude"]
    keys = torch.cat([kq, a["k_fp"].double()], 2)
    values = torch.cat([vq, a["v_fp"].double()], 2)
    valid = torch.cat([q_valid, a["fp_pos"] >= 0], 1)
    pos = torch.cat([a["q_offset"] + torch.arange(Q)[None].expand(B, Q), a["fp_pos"]], 1)
    return keys, values, valid, pos


def attention_f64(a: AttentionArgs):
    """Exact attention in float64: (out [B, Hq, L, D], lse [B, Hq, L], stats [B, Hkv, T]).

    Written per batch row over the tokens that row holds (gathered, not masked like the
    reference), so that it is an independent reading of the specification."""
    keys, values, valid, pos = held_tokens_f64(a)
    query = a["query"].double()
    B, Hq, L, D = query.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    g = Hq // Hkv
    out = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    lse = torch.full((B, Hq, L), float("-inf"), dtype=torch.float64)
    stats = torch.zeros(B, Hkv, T, dtype=torch.float64)
    kv_head = torch.arange(Hq) // g
    for b in range(B):
        idx = torch.nonzero(valid[b]).flatten()  # the tokens held in this batch row
        if idx.numel() == 0:
            continue
        end = int(pos[b, idx].max()) + 1
        seen = torch.ones(L, idx.numel(), dtype=torch.bool)
        if a["causal"]:  # query l sits at position end - L + l
            qpos = (end - L + torch.arange(L))[:, None]
            seen = pos[b, idx][None, :] <= qpos
            if a["window"] is not None:  # and sees the window positions up to its own
                seen = seen & (pos[b, idx][None, :] > qpos - a["window"])
        k = keys[b][kv_head][:, idx]  # [Hq, n, D]
        v = values[b][kv_head][:, idx]
        s = torch.einsum("hnd,hld->hln", k, query[b]) * a["scale"]
        if a["softcap"] is not None:
            s = a["softcap"] * torch.tanh(s / a["softcap"])
        s = s.masked_fill(~seen, float("-inf"))
        m = s.amax(-1, keepdim=True)
        rows = torch.isfinite(m[..., 0])  # [Hq, L]: queries that see something
        e = torch.exp(s - torch.where(torch.isfinite(m), m, 0.0))
        tot = e.sum(-1, keepdim=True)
        p = torch.where(tot > 0, e / tot, 0.0)
        lse[b] = torch.where(rows, (m + torch.log(tot))[..., 0], float("-inf"))
        out[b] = torch.einsum("hln,hnd->hld", p, v)
        stats[b][:, idx] = p.reshape(Hkv, g * L, -1).amax(1)
    return out, lse, stats


# ---------------------------------------------------------------------------------------------
# comparison helpers shared by the op tests
# ---------------------------------------------------------------------------------------------

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality of dtype, shape and values (NaN matches NaN, -0.0 != +0.0)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.dtype in _INT_VIEW:
        an, en = actual.isnan(), expected.isnan()
        assert torch.equal(an, en), "NaN positions differ"
        iv = _INT_VIEW[actual.dtype]
        a = actual.contiguous().view(iv).masked_fill(an, 0)
        e = expected.contiguous().view(iv).masked_fill(en, 0)
        bad = (a != e).nonzero()
        assert bad.numel() == 0, (
            f"{bad.shape[0]} of {a.numel()} elements differ, first at {bad[0].tolist()}: "
            f"{actual[tuple(bad[0])].item()!r} vs {expected[tuple(bad[0])].item()!r}"
        )
    else:
        assert torch.equal(actual, expected), (actual != expected).nonzero()[:5].tolist()


EPS32 = torch.finfo(torch.float32).eps


def assert_flash_close(got: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor,
                       name: str = "", factor: float = 2.0, atol_eps: float = 8.0) -> None:
    """FlashAttention-style bound: the kernel's max error against the float64 `truth` is at most
    `factor` times the max error of the same-precision `baseline` (plus a tiny atol of
    `atol_eps` float32 epsilons of the largest magnitude). Non-finite entries of `truth` (e.g.
    -inf lse) must be matched exactly."""
    assert got.shape == truth.shape == baseline.shape, (name, got.shape, baseline.shape, truth.shape)
    fin = torch.isfinite(truth)
    g = got.double()
    assert torch.equal(torch.isfinite(g), fin), f"{name}: non-finite entries differ"
    assert torch.equal(g[~fin], truth[~fin]), f"{name}: non-finite entries differ"
    if not bool(fin.any()):
        return
    t = truth[fin]
    err = (g[fin] - t).abs().max().item()
    base = (baseline.double()[fin] - t).abs().max().item()
    atol = atol_eps * EPS32 * max(1.0, t.abs().max().item())
    assert err <= factor * base + atol, (
        f"{name}: kernel error {err:.3g} > {factor} x baseline error {base:.3g} + {atol:.3g}")
