"""Fake (meta) implementations of every kvq op, for torch.compile and FakeTensor tracing.

Each fake checks shapes with the same rules and messages as the kernel and never reads data.
"""

from __future__ import annotations

import torch

from ._checks import (
    check_dequant_matmul,
    check_attention_frame,
    check_dequantize,
    check_outlier_split,
    check_quant_attention,
    check_quantize,
    check_remat_kv,
    check_write_tokens,
    with_axis,
)


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


@torch.library.register_fake("kvq::outlier_split")
def _outlier_split_fake(x, n_low, n_high):
    check_outlier_split(x, n_low, n_high)
    n = n_low + n_high
    index = x.new_empty(*x.shape[:-1], n, dtype=torch.int16)
    return torch.empty_like(x, memory_format=torch.contiguous_format), index, x.new_empty(*x.shape[:-1], n)


@torch.library.register_fake("kvq::dequant_matmul")
def _dequant_matmul_fake(a, codes, scale, zero, bits, group_size, axis, transpose_b,
                         outlier_index=None, outlier_value=None):
    _, cols = check_dequant_matmul(a, codes, scale, zero, bits, group_size, axis, transpose_b,
                                   outlier_index, outlier_value)
    return a.new_empty(*a.shape[:-1], cols)


@torch.library.register_fake("kvq::quant_attention")
def _quant_attention_fake(query, k_codes, k_scale, k_zero, k_bits, v_codes, v_scale, v_zero,
                          v_bits, k_fp, v_fp, fp_pos, q_exclude, k_outlier_index,
                          k_outlier_value, v_outlier_index, v_outlier_value, group_size,
                          v_group_size, scale, causal, return_stats, q_offset=0, window=None,
                          softcap=None):
    B, Hq, L, D, Hkv, T = check_quant_attention(
        query, k_codes, k_scale, k_zero, k_bits, v_codes, v_scale, v_zero, v_bits, k_fp, v_fp,
        fp_pos, q_exclude, k_outlier_index, k_outlier_value, v_outlier_index, v_outlier_value,
        group_size, v_group_size)
    check_attention_frame(q_offset, window, softcap, causal)
    out = query.new_empty(B, Hq, L, D)
    lse = query.new_empty(B, Hq, L, dtype=torch.float32)
    stats = query.new_empty(*((B, Hkv, T) if return_stats else (0,)), dtype=torch.float32)
    return out, lse, stats


@torch.library.register_fake("kvq::write_tokens")
def _write_tokens_fake(k_fp, v_fp, fp_pos, key, value, slots, positions):
    check_write_tokens(k_fp, v_fp, fp_pos, key, value, slots, positions)


@torch.library.register_fake("kvq::remat_kv")
def _remat_kv_fake(codes, scale, zero, bits, group_size, weight, bias, cos, sin, rope_dim):
    N, T, n_out, _ = check_remat_kv(codes, scale, zero, bits, group_size, weight, bias, cos, sin,
                                    rope_dim)
    return weight.new_empty(N, T, n_out)
