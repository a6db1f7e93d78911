"""Shape rules of the kvq ops, shared by the fakes and the reference implementation.

The C++ kernels enforce the same rules (csrc/quantize_args.h) with the same messages.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPES = (torch.float16, torch.float32)


def normalize_axis(op: str, name: str, axis: int, rank: int) -> int:
    torch._check(rank >= 1, lambda: f"{op}: {name} must have at least one dimension")
    torch._check(
        -rank <= axis < rank,
        lambda: f"{op}: axis must be in [{-rank}, {rank - 1}] for {name} of rank {rank}, got {axis}",
    )
    return axis % rank


def check_bits_and_group(op: str, bits: int, group_size: int) -> None:
    torch._check(1 <= bits <= 8, lambda: f"{op}: bits must be in [1, 8], got {bits}")
    torch._check(
        group_size > 0 and group_size % 8 == 0,
        lambda: f"{op}: group_size must be a positive multiple of 8 (so each group fills whole "
        f"bytes), got {group_size}",
    )


def check_quantize(
    x: torch.Tensor, bits: int, group_size: int, axis: int, scale_dtype: torch.dtype | None
) -> int:
    """Validate kvq::quantize arguments; returns the non-negative axis."""
    op = "kvq::quantize"
    check_bits_and_group(op, bits, group_size)
    torch._check(
        x.dtype in FLOAT_DTYPES,
        lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}",
    )
    torch._check(
        scale_dtype is None or scale_dtype in SCALE_DTYPES,
        lambda: f"{op}: scale_dtype must be float16 or float32, got {scale_dtype}",
    )
    ax = normalize_axis(op, "x", axis, x.dim())
    torch._check(x.numel() > 0, lambda: f"{op}: x must not be empty, got shape {list(x.shape)}")
    torch._check(
        x.shape[ax] % group_size == 0,
        lambda: f"{op}: group_size {group_size} must divide x.size({ax}) = {x.shape[ax]}; pad "
        "that axis or choose a group size that divides it",
    )
    return ax


def check_dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    dtype: torch.dtype,
) -> tuple[int, int]:
    """Validate kvq::dequantize arguments; returns (axis, number of elements along it)."""
    op = "kvq::dequantize"
    check_bits_and_group(op, bits, group_size)
    torch._check(codes.dtype == torch.uint8, lambda: f"{op}: codes must be uint8, got {codes.dtype}")
    torch._check(
        scale.dtype in SCALE_DTYPES,
        lambda: f"{op}: scale must be float16 or float32, got {scale.dtype}",
    )
    torch._check(
        zero.dtype == scale.dtype,
        lambda: f"{op}: zero must have the dtype of scale ({scale.dtype}), got {zero.dtype}",
    )
    torch._check(
        dtype in FLOAT_DTYPES,
        lambda: f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}",
    )
    torch._check(
        scale.device == codes.device and zero.device == codes.device,
        lambda: f"{op}: codes, scale and zero must be on one device, got {codes.device}, "
        f"{scale.device} and {zero.device}",
    )
    ax = normalize_axis(op, "codes", axis, codes.dim())
    torch._check(
        codes.numel() > 0, lambda: f"{op}: codes must not be empty, got shape {list(codes.shape)}"
    )
    torch._check(
        (codes.shape[ax] * 8) % (bits * group_size) == 0,
        lambda: f"{op}: codes.size({ax}) = {codes.shape[ax]} bytes is not a whole number of "
        f"groups of {group_size} {bits}-bit codes",
    )
    n = codes.shape[ax] * 8 // bits
    expected = list(codes.shape)
    expected[ax] = n // group_size
    torch._check(
        list(scale.shape) == expected,
        lambda: f"{op}: scale must have shape {expected} (codes' shape with {n // group_size} "
        f"groups along axis {ax}), got {list(scale.shape)}",
    )
    torch._check(
        zero.shape == scale.shape,
        lambda: f"{op}: zero must have the shape of scale {list(scale.shape)}, got {list(zero.shape)}",
    )
    return ax, n


def with_axis(shape: torch.Size | list[int], axis: int, size: int) -> list[int]:
    out = list(shape)
    out[axis] = size
    return out
