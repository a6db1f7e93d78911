"""Pure-PyTorch reference of every kvq op: the readable specification the kernels must match.

These functions favour clarity over speed; tests compare every kernel against them.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_dequant_matmul,
    check_dequantize,
    check_outlier_split,
    check_attention_frame,
    check_quant_attention,
    check_quantize,
    check_remat_kv,
    check_write_tokens,
)


def _group_last(x: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """Move `axis` last and split it into (groups, group_size)."""
    x = x.movedim(axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack b-bit codes along the last axis (a multiple of 8) into an LSB-first bit stream.

    Element j occupies stream bits [j*b, (j+1)*b) and stream bit k is bit k % 8 of byte k // 8,
    so every 8 elements fill exactly `bits` bytes.
    """
    eights = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    shifts = torch.arange(8, device=codes.device) * bits
    word = (eights << shifts).sum(-1, keepdim=True)  # disjoint bit ranges: sum == bitwise or
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    packed = (word >> byte_shifts) & 0xFF
    return packed.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes, 8/bits times as many along the last axis."""
    chunks = packed.to(torch.int64).reshape(*packed.shape[:-1], -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    word = (chunks << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1).to(torch.uint8)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``kvq::quantize``: asymmetric min/max quantization of groups along `axis`.

    scale = (max - min) / (2^bits - 1) and zero = min, both rounded to `scale_dtype`; codes are
    round-half-even((x - zero) / scale) clamped to [0, 2^bits - 1], computed with the stored
    (rounded) scale and zero so that dequantization sees the numbers quantization used. A group
    with any NaN/Inf, or whose scale or zero does not fit `scale_dtype`, gets NaN scale and zero
    (it dequantizes to NaN) and all-zero codes.
    """
    ax = check_quantize(x, bits, group_size, axis, scale_dtype)
    sdt = scale_dtype or torch.float16
    qmax = float((1 << bits) - 1)
    g = _group_last(x.float(), ax, group_size)
    mn, mx = g.amin(-1), g.amax(-1)
    scale = ((mx - mn) / qmax).to(sdt).float()
    zero = mn.to(sdt).float()
    bad = ~(g.isfinite().all(-1) & scale.isfinite() & zero.isfinite())
    scale = scale.masked_fill(bad, float("nan"))
    zero = zero.masked_fill(bad, float("nan"))
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = ((g - zero[..., None]) * inv[..., None]).clamp(0, qmax).round()
    q = q.nan_to_num(0.0).to(torch.uint8)
    codes = pack_codes(q.flatten(-2), bits).movedim(-1, ax)
    return codes.contiguous(), scale.to(sdt).movedim(-1, ax).contiguous(), zero.to(sdt).movedim(-1, ax).contiguous()


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference of ``kvq::dequantize``: x_hat = code * scale + zero in float32, cast to `dtype`."""
    ax, _ = check_dequantize(codes, scale, zero, bits, group_size, axis, dtype)
    q = unpack_codes(codes.movedim(ax, -1), bits).float()
    q = q.reshape(*q.shape[:-1], -1, group_size)
    s = scale.movedim(ax, -1).float()[..., None]
    z = zero.movedim(ax, -1).float()[..., None]
    x = (q * s + z).flatten(-2)
    return x.to(dtype).movedim(-1, ax).contiguous()


def outlier_split(
    x: torch.Tensor, n_low: int, n_high: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``kvq::outlier_split``: set aside the extremes of each vector (last axis).

    Values are ordered by (value, index), NaN above everything. The `n_low` smallest and the
    `n_high` largest are the outliers: ``index`` (int16) lists the low ones from the smallest up,
    then the high ones from the largest down; ``value`` holds them exactly. ``dense`` is `x` with
    each outlier replaced by the nearest bound of what remains, so the outliers no longer stretch
    the range a quantizer sees. ``dense.scatter(-1, index, value)`` reconstructs `x` exactly.
    """
    check_outlier_split(x, n_low, n_high)
    k = x.shape[-1]
    order = torch.sort(x, dim=-1, stable=True).indices
    low = order[..., :n_low]
    high = order[..., k - n_high :].flip(-1)
    index = torch.cat([low, high], dim=-1)
    value = x.gather(-1, index)
    lo = x.gather(-1, order[..., n_low : n_low + 1])
    hi = x.gather(-1, order[..., k - n_high - 1 : k - n_high])
    dense = x.clone()
    dense.scatter_(-1, low, lo.expand_as(low))
    dense.scatter_(-1, high, hi.expand_as(high))
    return dense, index.to(torch.int16), value


def dequant_matmul(
    a: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    transpose_b: bool,
    outlier_index: torch.Tensor | None = None,
    outlier_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``kvq::dequant_matmul``: ``a @ B_hat`` (or ``a @ B_hat^T``) in float32.

    ``B_hat = dequantize(codes, ...)`` is ``[..., N, K]``; optional sparse corrections are added
    at ``B_hat[..., n, outlier_index[..., n, j]] += outlier_value[..., n, j]``. Returns `a`'s dtype.
    """
    check_dequant_matmul(a, codes, scale, zero, bits, group_size, axis, transpose_b,
                         outlier_index, outlier_value)
    b = dequantize(codes, scale, zero, bits, group_size, axis, torch.float32)
    if outlier_index is not None and outlier_value is not None:
        b = b.scatter_add(-1, outlier_index.long(), outlier_value.float())
    out = a.float() @ (b.transpose(-1, -2) if transpose_b else b)
    return out.to(a.dtype)


def dequantize_blocks(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: torch.Tensor,
    group_size: int,
    v_group_size: int | None,
    head_dim: int,
) -> torch.Tensor:
    """Dequantize a store's byte pool of blocks with per-block widths to float32.

    Keys (``v_group_size=None``): block b is ``[group_size * bits[b] / 8, head_dim]`` bytes packed
    along tokens, with ``scale[:, :, b]`` per channel. Values: block b is
    ``[group_size, head_dim * bits[b] / 8]`` bytes packed along channels, with one scale per token
    and group of `v_group_size` channels. Blocks are back to back in the pool; a width of 0 marks
    an unused block (zeros here; never attended to). Returns ``[B, H, blocks * group_size, D]``.
    """
    B, H = codes.shape[:2]
    G = group_size
    out, offset = [], 0
    for b, w in enumerate(bits.tolist()):
        if w == 0:
            out.append(torch.zeros(B, H, G, head_dim, device=codes.device))
            continue
        nbytes = G * head_dim * w // 8
        chunk = codes[:, :, offset : offset + nbytes]
        offset += nbytes
        if v_group_size is None:
            c = chunk.reshape(B, H, G * w // 8, head_dim)
            out.append(dequantize(c, scale[:, :, b : b + 1], zero[:, :, b : b + 1], w, G, 2, torch.float32))
        else:
            c = chunk.reshape(B, H, G, head_dim * w // 8)
            rows = slice(b * G, (b + 1) * G)
            out.append(dequantize(c, scale[:, :, rows], zero[:, :, rows], w, v_group_size, 3, torch.float32))
    if not out:
        return torch.zeros(B, H, 0, head_dim, device=codes.device)
    return torch.cat(out, dim=2)


def quant_attention(
    query: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    k_bits: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    v_bits: torch.Tensor,
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    fp_pos: torch.Tensor,
    q_exclude: torch.Tensor | None,
    k_outlier_index: torch.Tensor | None,
    k_outlier_value: torch.Tensor | None,
    v_outlier_index: torch.Tensor | None,
    v_outlier_value: torch.Tensor | None,
    group_size: int,
    v_group_size: int,
    scale: float,
    causal: bool,
    return_stats: bool,
    q_offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``kvq::quant_attention``: softmax attention over a compressed store.

    The store holds quantized blocks (token i of the quantized part sits at position
    ``q_offset + i``) and full-precision slots (``k_fp``/``v_fp`` at positions ``fp_pos``, -1 =
    empty). A quantized token is attended to when its block's width is non-zero and
    ``q_exclude`` does not mark it. With ``causal``, the L queries sit at the last L positions
    held (per batch row) and each sees positions up to its own; with a ``window`` W, a query at
    position q sees positions p with ``q - W < p <= q``. With ``softcap`` c, the scaled scores
    s become ``c * tanh(s / c)`` (Gemma 2). Query head h reads kv head ``h // (Hq / Hkv)``.

    Returns ``out [B, Hq, L, D]`` (query's dtype; 0 for a query that sees nothing, NaN for one
    with a NaN or +inf score, e.g. from a NaN/Inf in it), ``lse [B, Hq, L]`` (float32
    log-sum-exp of the scaled scores, -inf when nothing is seen, NaN with out) and, with
    ``return_stats``, ``stats [B, Hkv, Q + F]``: per held token, the largest attention
    probability any query head of its group and any query gave it (else an empty tensor).
    """
    B, Hq, L, D, Hkv, T = check_quant_attention(
        query, k_codes, k_scale, k_zero, k_bits, v_codes, v_scale, v_zero, v_bits, k_fp, v_fp,
        fp_pos, q_exclude, k_outlier_index, k_outlier_value, v_outlier_index, v_outlier_value,
        group_size, v_group_size)
    check_attention_frame(q_offset, window, softcap, causal)
    G = group_size
    kq = dequantize_blocks(k_codes, k_scale, k_zero, k_bits, G, None, D)
    vq = dequantize_blocks(v_codes, v_scale, v_zero, v_bits, G, v_group_size, D)
    if k_outlier_index is not None and k_outlier_value is not None:
        kq = kq.scatter_add(-1, k_outlier_index.long(), k_outlier_value.float())
    if v_outlier_index is not None and v_outlier_value is not None:
        vq = vq.scatter_add(-1, v_outlier_index.long(), v_outlier_value.float())
    Q = kq.shape[2]
    q_valid = (k_bits > 0).repeat_interleave(G)[None, :].expand(B, Q)
    if q_exclude is not None:
        q_valid = q_valid & ~q_exclude
    q_pos = q_offset + torch.arange(Q, device=query.device)[None, :].expand(B, Q)
    keys = torch.cat([kq, k_fp.float()], dim=2)
    values = torch.cat([vq, v_fp.float()], dim=2)
    valid = torch.cat([q_valid, fp_pos >= 0], dim=1)  # [B, T]
    pos = torch.cat([q_pos, fp_pos], dim=1)
    mask = valid[:, None, :].expand(B, L, T)
    if causal:
        held = torch.where(valid, pos, -1)
        end = (held.amax(dim=1) if T else held.new_full((B,), -1)) + 1  # one past the newest held
        q_positions = end[:, None] - L + torch.arange(L, device=query.device)
        mask = mask & (pos[:, None, :] <= q_positions[:, :, None])
        if window is not None:
            mask = mask & (pos[:, None, :] > q_positions[:, :, None] - window)
    g = Hq // Hkv
    q = query.float().reshape(B, Hkv, g, L, D)
    s = torch.einsum("bkgld,bktd->bkglt", q, keys) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None, None], float("-inf"))
    # A row with a NaN or +inf score among the tokens it sees (a NaN/Inf in its query or in a
    # key) comes out NaN, out and lse, as in SDPA; a row that sees nothing comes out 0, lse -inf.
    poisoned = (s.isnan() | (s == float("inf"))).any(dim=-1)
    lse = torch.logsumexp(s, dim=-1).masked_fill(poisoned, float("nan"))
    seen = mask[:, None, None] & (lse > float("-inf"))[..., None]
    p = torch.where(seen | poisoned[..., None], torch.exp(s - lse[..., None]), 0.0)
    out = torch.einsum("bkglt,bktd->bkgld", p, values).reshape(B, Hq, L, D).to(query.dtype)
    # Poisoned rows give no token a probability in the stats (the kernels skip them too).
    stats = (p.masked_fill(poisoned[..., None], 0.0).amax(dim=(2, 3)) if return_stats
             else query.new_empty(0, dtype=torch.float32))
    return out, lse.reshape(B, Hq, L), stats


def write_tokens(
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    fp_pos: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Reference of ``kvq::write_tokens``: token j goes to slot ``slots[j]`` of k_fp/v_fp (cast
    to their dtype) and ``fp_pos[:, slots[j]] = positions[:, j]``, in place."""
    check_write_tokens(k_fp, v_fp, fp_pos, key, value, slots, positions)
    F = k_fp.shape[2]
    if slots.numel():  # the kernel checks this on the CPU too (data, so not in the fake)
        lo, hi = int(slots.min()), int(slots.max())
        torch._check(lo >= 0 and hi < F, lambda: f"kvq::write_tokens: slots must be in [0, {F}) "
                     f"(the slots k_fp holds), got {lo}..{hi}")
    k_fp.index_copy_(2, slots, key.to(k_fp.dtype))
    v_fp.index_copy_(2, slots, value.to(v_fp.dtype))
    fp_pos.index_copy_(1, slots, positions)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' rotate_half convention: ``x * cos + rotate_half(x) * sin`` per head.

    ``x [N, T, heads, hd]``, ``cos``/``sin`` ``[N or 1, T, hd]`` (all float32)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]


def remat_kv(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_dim: int,
) -> torch.Tensor:
    """Reference of ``kvq::remat_kv``: ``X_hat @ weight^T + bias``, RoPE on the first `rope_dim`
    outputs, all in float32, returned in `weight`'s dtype.

    ``X_hat = dequantize(codes, scale, zero, bits, group_size, axis=-1)`` is ``[N, T, d]`` (per-token
    groups). With `cos`/`sin` ``[N or 1, T, hd]``, outputs ``[0, rope_dim)`` are heads of ``hd``
    channels rotated at each token's position (:func:`rotate_half_rope`), after the bias, as a
    transformers attention layer does to its keys.
    """
    N, T, n_out, hd = check_remat_kv(codes, scale, zero, bits, group_size, weight, bias, cos, sin,
                                     rope_dim)
    x = dequantize(codes, scale, zero, bits, group_size, -1, torch.float32)
    out = x @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    if rope_dim and cos is not None and sin is not None:
        k = out[..., :rope_dim].reshape(N, T, rope_dim // hd, hd)
        k = rotate_half_rope(k, cos.float(), sin.float())
        out = torch.cat([k.reshape(N, T, rope_dim), out[..., rope_dim:]], dim=-1)
    return out.to(weight.dtype)
