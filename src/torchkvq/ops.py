"""Typed Python entry points of the kvq ops (``torch.ops.kvq.*``), one docstring per op."""

from __future__ import annotations

import torch


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of groups of consecutive elements along one axis.

    Groups are `group_size` consecutive elements along `axis`: groups along the channel axis
    give per-token quantization (KIVI values), groups along the token axis give per-channel
    quantization (KIVI keys). Computation is float32; x_hat = code * scale + zero.

    Args:
        x: float32, float16 or bfloat16 tensor of any rank >= 1, any strides, CPU or CUDA.
        bits: code width, 1 to 8.
        group_size: elements per group; a positive multiple of 8 that divides ``x.size(axis)``.
        axis: the grouped axis (negative values count from the end).
        scale_dtype: dtype of scale and zero, ``torch.float16`` (default) or ``torch.float32``.

    Returns:
        ``(codes, scale, zero)``. ``codes`` is uint8 with ``x``'s shape except
        ``x.size(axis) * bits / 8`` along `axis` (LSB-first bit stream, see docs/format.md);
        ``scale`` and ``zero`` have ``x.size(axis) / group_size`` along `axis`. A group holding
        NaN or Inf, or whose range does not fit `scale_dtype`, gets NaN scale and zero and so
        dequantizes to NaN: bad values are never turned into plausible numbers.

    Example:
        >>> k = torch.randn(1, 8, 128, 64)                     # [batch, heads, tokens, dim]
        >>> codes, scale, zero = quantize(k, 2, 32, axis=2)    # KIVI keys: per channel
        >>> codes.shape, scale.shape
        (torch.Size([1, 8, 32, 64]), torch.Size([1, 8, 4, 64]))
    """
    return torch.ops.kvq.quantize(x, bits, group_size, axis, scale_dtype)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``code * scale + zero`` in float32, returned as `dtype`.

    Args:
        codes: uint8 packed codes as returned by :func:`quantize`.
        scale, zero: float16 or float32 (the same dtype), one per group along `axis`.
        bits, group_size, axis: the values given to :func:`quantize`.
        dtype: float32, float16 or bfloat16.

    Returns:
        A tensor of `dtype` with ``codes.size(axis) * 8 / bits`` elements along `axis`.
    """
    return torch.ops.kvq.dequantize(codes, scale, zero, bits, group_size, axis, dtype)
