"""Pure-PyTorch reference of every kvq op: the readable specification the kernels must match.

These functions favour clarity over speed; tests compare every kernel against them.
"""

from __future__ import annotations

import torch

from ._checks import check_dequantize, check_quantize


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
