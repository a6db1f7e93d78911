"""Fake (meta) implementations of every kvq op, for torch.compile and FakeTensor tracing.

Each fake checks shapes with the same rules and messages as the kernel and never reads data.
"""

from __future__ import annotations

import torch

from ._checks import check_dequantize, check_quantize, with_axis


@torch.library.register_fake("kvq::quantize")
def _quantize_fake(x, bits, group_size, axis, scale_dtype=None):
    ax = check_quantize(x, bits, group_size, axis, scale_dtype)
    n = x.shape[ax]
    codes = x.new_empty(with_axis(x.shape, ax, n * bits // 8), dtype=torch.uint8)
    scale = x.new_empty(with_axis(x.shape, ax, n // group_size), dtype=scale_dtype or torch.float16)
    return codes, scale, torch.empty_like(scale)


@torch.library.register_fake("kvq::dequantize")
def _dequantize_fake(codes, scale, zero, bits, group_size, axis, dtype):
    ax, n = check_dequantize(codes, scale, zero, bits, group_size, axis, dtype)
    return codes.new_empty(with_axis(codes.shape, ax, n), dtype=dtype)
