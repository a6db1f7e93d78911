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


def outlier_split(
    x: torch.Tensor, n_low: int, n_high: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Set aside a fixed number of extreme values of every vector (last axis) in full precision.

    The count is fixed per vector (not data-dependent), so shapes stay static. Values are
    ordered by (value, index); the `n_low` smallest and `n_high` largest are the outliers.

    Args:
        x: float32/float16/bfloat16 ``[..., K]``, ``K <= 32767``, ``n_low + n_high < K``.
        n_low, n_high: outliers taken from the bottom and from the top of each vector.

    Returns:
        ``(dense, index, value)``: ``dense`` is `x` (contiguous) with every outlier replaced by
        the nearest bound of the remaining values, so a quantizer's min/max ignore them;
        ``index`` is int16 ``[..., n_low + n_high]`` (low ones smallest first, then high ones
        largest first); ``value`` holds the outliers exactly, in `x`'s dtype.
        ``dense.scatter(-1, index.long(), value)`` equals `x`.

    Example:
        >>> dense, idx, val = outlier_split(torch.tensor([[0.1, 9.0, -0.2, 0.3]]), 0, 1)
        >>> dense, idx, val
        (tensor([[ 0.1000,  0.3000, -0.2000,  0.3000]]), tensor([[1]], dtype=torch.int16), tensor([[9.]]))
    """
    return torch.ops.kvq.outlier_split(x, n_low, n_high)


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
    """Matrix product with a packed right operand, dequantized tile by tile inside the kernel.

    ``B_hat = dequantize(codes, scale, zero, bits, group_size, axis)`` is ``[..., N, K]`` and is
    never written to memory whole. Sparse corrections, if given, are added where they belong:
    ``B_hat[..., n, outlier_index[..., n, j]] += outlier_value[..., n, j]``.

    * ``transpose_b=True``: ``a [..., M, K] @ B_hat^T -> [..., M, N]`` (scores q·K̂ᵀ over keys
      packed per channel, axis=-2; or X̂·W with X packed per token, computed as W^T·X̂^T).
    * ``transpose_b=False``: ``a [..., M, N] @ B_hat -> [..., M, K]`` (P·V̂ over values packed
      per token, axis=-1).

    Args:
        a: float32/float16/bfloat16 with the leading dimensions of `codes`.
        codes, scale, zero, bits, group_size: as returned by/given to :func:`quantize`.
        axis: -1 (groups along K) or -2 (groups along N).
        outlier_index: int16 ``[..., N, n]``; outlier_value: float ``[..., N, n]``.

    Returns:
        `a`'s dtype, accumulated in float32.
    """
    return torch.ops.kvq.dequant_matmul(
        a, codes, scale, zero, bits, group_size, axis, transpose_b, outlier_index, outlier_value
    )


def remat_kv(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    rope_dim: int = 0,
) -> torch.Tensor:
    """XQuant's rematerialization: ``X_hat @ weight^T + bias`` from packed X, RoPE fused.

    ``X_hat = dequantize(codes, scale, zero, bits, group_size, axis=-1)`` is dequantized a tile
    of tokens at a time inside the kernel and never written to memory whole. One call serves
    both XQuant layouts: the cached layer input X with ``weight = cat(W_k, W_v)`` (MHA; X is
    unpacked once for keys and values), or a low-rank latent ``X·U`` with the SVD's ``Σ·Bᵀ``
    folded into `weight` (GQA).

    Args:
        codes, scale, zero: :func:`quantize`'s output for ``x [N, T, d]`` quantized along
            ``axis=-1`` (per-token groups of `group_size` channels), any width 1-8.
        weight: float32/float16/bfloat16 ``[n_out, d]`` (``nn.Linear`` layout).
        bias: ``[n_out]`` of weight's dtype, or None.
        cos, sin: ``[N or 1, T, head_dim]`` of weight's dtype: the rotary tables at each token's
            position (transformers' ``rotate_half`` convention), or None.
        rope_dim: outputs ``[0, rope_dim)`` are heads of ``head_dim`` channels rotated after the
            bias (the key part); 0 without cos/sin.

    Returns:
        ``[N, T, n_out]`` in weight's dtype, accumulated in float32.

    Example:
        >>> x = torch.randn(1, 100, 576)                          # [batch, tokens, hidden]
        >>> codes, s, z = quantize(x, 4, 64, axis=-1)
        >>> w = torch.randn(384, 576)                             # cat(W_k, W_v)
        >>> remat_kv(codes, s, z, 4, 64, w).shape
        torch.Size([1, 100, 384])
    """
    return torch.ops.kvq.remat_kv(codes, scale, zero, bits, group_size, weight, bias, cos, sin,
                                  rope_dim)


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
    return_stats: bool = False,
    q_offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of queries over a compressed KV store, reading the packed codes directly.

    Usually called through :class:`torchkvq.store.KVStore.attend`, which supplies the store's
    tensors. Layout (B batch, Hkv kv heads, D head_dim, NB blocks of G = `group_size` tokens):

    * ``k_codes``/``v_codes`` ``[B, Hkv, bytes]`` uint8: the blocks back to back. Block b's keys
      are ``[G * k_bits[b] / 8, D]`` (packed along tokens: per-channel groups), its values
      ``[G, D * v_bits[b] / 8]`` (packed along channels in groups of `v_group_size`).
    * ``k_scale``/``k_zero`` ``[B, Hkv, NB, D]``; ``v_scale``/``v_zero``
      ``[B, Hkv, NB * G, D / v_group_size]``; float16 or float32.
    * ``k_bits``/``v_bits`` int32 ``[NB]``: each block's width, 1-8, or 0 for an unused block.
    * ``k_fp``/``v_fp`` ``[B, Hkv, F, D]`` full-precision tokens at positions ``fp_pos`` int64
      ``[B, F]`` (-1 marks an empty slot). Quantized token i sits at position ``q_offset + i``
      (a sliding-window store frees its oldest blocks, so its first held block need not start at
      position 0).
    * ``q_exclude`` bool ``[B, NB * G]``: quantized tokens to skip (held in full precision too,
      or padding). ``*_outlier_index`` int16 / ``*_outlier_value`` ``[B, Hkv, NB * G, n]``:
      corrections added to the dequantized keys/values at those channels.

    Args:
        query: ``[B, Hq, L, D]``, Hq a multiple of Hkv (GQA by index arithmetic, no repeat).
        scale: the softmax scale (usually ``D ** -0.5``).
        causal: queries are the last L positions held and see positions up to their own.
        return_stats: also return per-token attention statistics (see below).
        q_offset: the position of quantized token 0 (>= 0).
        window: sliding window W (needs `causal`): a query at position q sees the positions p
            with ``q - W < p <= q`` (transformers' ``sliding_window``); None: no window.
        softcap: logit soft-capping c (Gemma 2): the scaled scores s become ``c * tanh(s / c)``
            before the softmax; None: no capping.

    Returns:
        ``(out, lse, stats)``: ``out [B, Hq, L, D]`` in query's dtype (accumulated in float32),
        ``lse [B, Hq, L]`` float32 log-sum-exp of the scaled scores (-inf for a query that sees
        nothing, whose output is 0), ``stats [B, Hkv, NB * G + F]`` float32: the largest
        probability any query of the group gave each held token (empty unless requested).
    """
    return torch.ops.kvq.quant_attention(
        query, k_codes, k_scale, k_zero, k_bits, v_codes, v_scale, v_zero, v_bits, k_fp, v_fp,
        fp_pos, q_exclude, k_outlier_index, k_outlier_value, v_outlier_index, v_outlier_value,
        group_size, v_group_size, scale, causal, return_stats, q_offset, window, softcap,
    )


def write_tokens(
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    fp_pos: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write new tokens into a store's preallocated full-precision slots, in place.

    Declared as mutating ``k_fp``, ``v_fp`` and ``fp_pos`` (``Tensor(a!)``) and returning
    nothing, so a decode step - write, then :func:`quant_attention` - traces into one
    static-shape graph under ``torch.compile(fullgraph=True)``.

    Args:
        k_fp, v_fp: ``[B, H, F, D]`` slot tensors (any float dtype; written values are cast).
        fp_pos: int64 ``[B, F]`` slot positions.
        key, value: ``[B, H, n, D]`` new tokens.
        slots: int64 ``[n]``, the slot of each new token.
        positions: int64 ``[B, n]``, their positions (-1 marks padding).
    """
    torch.ops.kvq.write_tokens(k_fp, v_fp, fp_pos, key, value, slots, positions)
