"""Shape rules of the kvq ops, shared by the fakes and the reference implementation.

The C++ kernels enforce the same rules (csrc/quantize_args.h) with the same messages.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# c10's names, so that these messages read exactly like the C++ kernels' (which print ScalarType).
_C10_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
}


def _dt(dtype: torch.dtype | None) -> str:
    return _C10_NAMES.get(dtype, str(dtype))
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
        lambda: f"{op}: x must be float32, float16 or bfloat16, got {_dt(x.dtype)}",
    )
    torch._check(
        scale_dtype is None or scale_dtype in SCALE_DTYPES,
        lambda: f"{op}: scale_dtype must be float16 or float32, got {_dt(scale_dtype)}",
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
    op: str = "kvq::dequantize",
) -> tuple[int, int]:
    """Validate kvq::dequantize arguments; returns (axis, number of elements along it). `op` is
    the op called: also kvq::dequant_matmul and kvq::remat_kv, whose packed operand this is."""
    check_bits_and_group(op, bits, group_size)
    torch._check(codes.dtype == torch.uint8, lambda: f"{op}: codes must be uint8, got {_dt(codes.dtype)}")
    torch._check(
        scale.dtype in SCALE_DTYPES,
        lambda: f"{op}: scale must be float16 or float32, got {_dt(scale.dtype)}",
    )
    torch._check(
        zero.dtype == scale.dtype,
        lambda: f"{op}: zero must have the dtype of scale ({_dt(scale.dtype)}), got {_dt(zero.dtype)}",
    )
    torch._check(
        dtype in FLOAT_DTYPES,
        lambda: f"{op}: dtype must be float32, float16 or bfloat16, got {_dt(dtype)}",
    )
    _check_device(op, "codes", codes, scale=scale, zero=zero)
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


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    torch._check(
        t.dtype in FLOAT_DTYPES,
        lambda: f"{op}: {name} must be float32, float16 or bfloat16, got {_dt(t.dtype)}",
    )


def _check_shape(op: str, name: str, t: torch.Tensor, expected: list[int], why: str) -> None:
    torch._check(
        list(t.shape) == list(expected),
        lambda: f"{op}: {name} must have shape {list(expected)} ({why}), got {list(t.shape)}",
    )


def _check_device(op: str, ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Each of `tensors` on ref's device; the message says which tensor is where."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(
                t.device == ref.device,
                lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "move every input to one device",
            )


def _check_outliers(
    op: str,
    prefix: str,
    index: torch.Tensor | None,
    value: torch.Tensor | None,
    rows: list[int],
    value_dtype: torch.dtype,
    dtype_of: str,
    head_dim: int | None = None,
) -> None:
    """Outlier index/value pair of shape rows + [n] (n <= head_dim when given), in the kernels' order."""
    torch._check(
        (index is None) == (value is None),
        lambda: f"{op}: {prefix}index and {prefix}value must be given together",
    )
    if index is None or value is None:
        return
    torch._check(
        index.dtype == torch.int16,
        lambda: f"{op}: {prefix}index must be int16, got {_dt(index.dtype)}",
    )
    torch._check(
        value.dtype == value_dtype,
        lambda: f"{op}: {prefix}value must have {dtype_of}'s dtype {_dt(value_dtype)}, got {_dt(value.dtype)}",
    )
    # Worded like the C++ checks: "[rows] + [n]", or "[rows..., n] with n <= head_dim".
    expected = (f"{list(rows)} + [n]" if head_dim is None
                else "[" + ", ".join(map(str, rows)) + ", n] with n <= head_dim")
    torch._check(
        index.dim() == len(rows) + 1 and list(index.shape[:-1]) == list(rows)
        and (head_dim is None or index.shape[-1] <= head_dim),
        lambda: f"{op}: {prefix}index must have shape {expected}, got {list(index.shape)}",
    )
    torch._check(
        value.shape == index.shape,
        lambda: f"{op}: {prefix}value must have the shape of {prefix}index "
        f"{list(index.shape)}, got {list(value.shape)}",
    )


def check_outlier_split(x: torch.Tensor, n_low: int, n_high: int) -> None:
    op = "kvq::outlier_split"
    _check_float(op, "x", x)
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension")
    torch._check(x.numel() > 0, lambda: f"{op}: x must not be empty, got shape {list(x.shape)}")
    torch._check(
        n_low >= 0 and n_high >= 0,
        lambda: f"{op}: n_low and n_high must be >= 0, got {n_low} and {n_high}",
    )
    torch._check(
        n_low + n_high < x.shape[-1],
        lambda: f"{op}: n_low + n_high = {n_low + n_high} must be smaller than x.size(-1) = "
        f"{x.shape[-1]} so that some values stay dense",
    )
    torch._check(
        x.shape[-1] <= 32767, lambda: f"{op}: x.size(-1) must fit int16 indices, got {x.shape[-1]}"
    )


def check_dequant_matmul(
    a: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int,
    transpose_b: bool,
    outlier_index: torch.Tensor | None,
    outlier_value: torch.Tensor | None,
) -> tuple[list[int], int]:
    """Validate kvq::dequant_matmul; returns (shape of the dequantized operand, output columns)."""
    op = "kvq::dequant_matmul"
    _check_float(op, "a", a)
    torch._check(codes.dim() >= 2, lambda: f"{op}: codes must have rank >= 2, got {codes.dim()}")
    rank = codes.dim()
    ax = normalize_axis(op, "codes", axis, rank)
    torch._check(
        ax >= rank - 2,
        lambda: f"{op}: axis must be one of the last two dimensions (-1: groups along columns, "
        f"-2: groups along rows), got {axis}",
    )
    _check_device(op, "a", a, codes=codes, scale=scale, zero=zero, outlier_index=outlier_index,
                  outlier_value=outlier_value)
    ax, n = check_dequantize(codes, scale, zero, bits, group_size, ax, a.dtype, op)
    b_shape = with_axis(codes.shape, ax, n)
    rows, cols = b_shape[-2], b_shape[-1]
    torch._check(
        a.dim() == rank and list(a.shape[:-2]) == b_shape[:-2],
        lambda: f"{op}: a must have the leading dimensions of the packed operand {b_shape[:-2]}, "
        f"got shape {list(a.shape)}",
    )
    inner = cols if transpose_b else rows
    torch._check(
        a.shape[-1] == inner,
        lambda: f"{op}: a.size(-1) = {a.shape[-1]} must equal the packed operand's "
        f"{'columns' if transpose_b else 'rows'} ({inner}) for transpose_b={transpose_b}",
    )
    _check_outliers(op, "outlier_", outlier_index, outlier_value, b_shape[:-1], a.dtype, "a")
    return b_shape, rows if transpose_b else cols


def check_quant_attention(
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
) -> tuple[int, int, int, int, int, int]:
    """Validate kvq::quant_attention; returns (B, Hq, L, D, Hkv, tokens held)."""
    op = "kvq::quant_attention"
    _check_float(op, "query", query)
    torch._check(query.dim() == 4, lambda: f"{op}: query must be [batch, q_heads, q_len, head_dim], got rank {query.dim()}")
    B, Hq, L, D = query.shape
    torch._check(k_fp.dim() == 4, lambda: f"{op}: k_fp must be [batch, kv_heads, fp_tokens, head_dim], got rank {k_fp.dim()}")
    torch._check(L >= 1 and D >= 1 and B >= 1, lambda: f"{op}: query must not be empty, got shape {list(query.shape)}")
    Hkv = k_fp.shape[1]
    torch._check(
        Hkv >= 1 and Hq % Hkv == 0,
        lambda: f"{op}: query heads ({Hq}) must be a multiple of kv heads ({Hkv})",
    )
    _check_device(op, "query", query, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, k_bits=k_bits,
                  v_codes=v_codes, v_scale=v_scale, v_zero=v_zero, v_bits=v_bits, k_fp=k_fp,
                  v_fp=v_fp, fp_pos=fp_pos, q_exclude=q_exclude, k_outlier_index=k_outlier_index,
                  k_outlier_value=k_outlier_value, v_outlier_index=v_outlier_index,
                  v_outlier_value=v_outlier_value)
    check_bits_and_group(op, 1, group_size)
    torch._check(
        v_group_size > 0 and v_group_size % 8 == 0 and D % v_group_size == 0,
        lambda: f"{op}: v_group_size must be a positive multiple of 8 dividing head_dim {D}, "
        f"got {v_group_size}",
    )
    F = k_fp.shape[2]
    _check_float(op, "k_fp", k_fp)
    _check_shape(op, "k_fp", k_fp, [B, Hkv, F, D], "batch, kv heads, fp tokens, head_dim")
    torch._check(v_fp.dtype == k_fp.dtype, lambda: f"{op}: v_fp must have k_fp's dtype {_dt(k_fp.dtype)}, got {_dt(v_fp.dtype)}")
    _check_shape(op, "v_fp", v_fp, [B, Hkv, F, D], "the shape of k_fp")
    torch._check(fp_pos.dtype == torch.int64, lambda: f"{op}: fp_pos must be int64, got {_dt(fp_pos.dtype)}")
    _check_shape(op, "fp_pos", fp_pos, [B, F], "one position per batch row and fp token, -1 for an empty slot")
    # Worded and ordered like csrc/attention_args.h.
    for name, t in (("k_bits", k_bits), ("v_bits", v_bits)):
        torch._check(
            t.dtype == torch.int32 and t.dim() == 1,
            lambda: f"{op}: {name} must be a 1-D int32 tensor (one width per block), got "
            f"{_dt(t.dtype)} of rank {t.dim()}",
        )
    NB = k_bits.shape[0]
    _check_shape(op, "v_bits", v_bits, [NB], "one width per block, like k_bits")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes)):
        torch._check(
            t.dtype == torch.uint8 and t.dim() == 3 and list(t.shape[:2]) == [B, Hkv],
            lambda: f"{op}: {name} must be uint8 [batch, kv_heads, bytes] = [{B}, {Hkv}, n], "
            f"got {_dt(t.dtype)} {list(t.shape)}",
        )
    torch._check(
        k_scale.dtype in SCALE_DTYPES,
        lambda: f"{op}: k_scale must be float16 or float32, got {_dt(k_scale.dtype)}",
    )
    for name, t in (("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        torch._check(
            t.dtype == k_scale.dtype,
            lambda: f"{op}: {name} must have k_scale's dtype {_dt(k_scale.dtype)} (scales and "
            f"zeros share one dtype), got {_dt(t.dtype)}",
        )
    Q = NB * group_size
    _check_shape(op, "k_scale", k_scale, [B, Hkv, NB, D], "one per block and channel")
    _check_shape(op, "k_zero", k_zero, [B, Hkv, NB, D], "the shape of k_scale")
    _check_shape(op, "v_scale", v_scale, [B, Hkv, Q, D // v_group_size], "one per token and channel group")
    _check_shape(op, "v_zero", v_zero, [B, Hkv, Q, D // v_group_size], "the shape of v_scale")
    if q_exclude is not None:
        torch._check(q_exclude.dtype == torch.bool, lambda: f"{op}: q_exclude must be bool, got {_dt(q_exclude.dtype)}")
        _check_shape(op, "q_exclude", q_exclude, [B, Q], "one flag per batch row and quantized token")
    _check_outliers(op, "k_outlier_", k_outlier_index, k_outlier_value, [B, Hkv, Q], k_fp.dtype, "k_fp", D)
    _check_outliers(op, "v_outlier_", v_outlier_index, v_outlier_value, [B, Hkv, Q], k_fp.dtype, "k_fp", D)
    return B, Hq, L, D, Hkv, Q + F


def check_attention_frame(q_offset: int, window: int | None, softcap: float | None, causal: bool) -> None:
    """Validate kvq::quant_attention's positions and score options (q_offset, window, softcap)."""
    op = "kvq::quant_attention"
    torch._check(q_offset >= 0, lambda: f"{op}: q_offset (the position of quantized token 0) must be >= 0, got {q_offset}")
    if window is not None:
        torch._check(window >= 1, lambda: f"{op}: window must be >= 1 (the positions a query sees, its own included), got {window}")
        torch._check(causal, lambda: f"{op}: window needs causal=True (it is measured back from each query's position)")
    if softcap is not None:
        torch._check(
            softcap > 0 and math.isfinite(softcap),
            lambda: f"{op}: softcap must be a positive finite number (or None for no capping)",
        )


def check_write_tokens(
    k_fp: torch.Tensor,
    v_fp: torch.Tensor,
    fp_pos: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    op = "kvq::write_tokens"
    torch._check(
        k_fp.dim() == 4 and v_fp.shape == k_fp.shape,
        lambda: f"{op}: k_fp and v_fp must be [batch, kv_heads, slots, head_dim] of one shape, "
        f"got {list(k_fp.shape)} and {list(v_fp.shape)}",
    )
    torch._check(
        k_fp.dtype in FLOAT_DTYPES and v_fp.dtype == k_fp.dtype,
        lambda: f"{op}: k_fp and v_fp must be float32, float16 or bfloat16 of one dtype, got "
        f"{_dt(k_fp.dtype)} and {_dt(v_fp.dtype)}",
    )
    for name, t in (("v_fp", v_fp), ("fp_pos", fp_pos), ("key", key), ("value", value),
                    ("slots", slots), ("positions", positions)):
        torch._check(
            t.device == k_fp.device,
            lambda: f"{op}: {name} is on {t.device} but k_fp is on {k_fp.device}; move every "
            "input to one device",
        )
    torch._check(
        k_fp.is_contiguous() and v_fp.is_contiguous() and fp_pos.is_contiguous(),
        lambda: f"{op}: the store's tensors must be contiguous",
    )
    B, H, F, D = k_fp.shape
    torch._check(
        key.dim() == 4 and key.shape[0] == B and key.shape[1] == H and key.shape[3] == D
        and value.shape == key.shape,
        lambda: f"{op}: key and value must be [{B}, {H}, n, {D}] of one shape, got "
        f"{list(key.shape)} and {list(value.shape)}",
    )
    n = key.shape[2]
    torch._check(
        key.dtype in FLOAT_DTYPES and value.dtype in FLOAT_DTYPES,
        lambda: f"{op}: key and value must be float32, float16 or bfloat16",
    )
    torch._check(
        slots.dtype == torch.int64 and list(slots.shape) == [n],
        lambda: f"{op}: slots must be int64 [{n}], got {_dt(slots.dtype)} {list(slots.shape)}",
    )
    torch._check(
        positions.dtype == torch.int64 and list(positions.shape) == [B, n],
        lambda: f"{op}: positions must be int64 [{B}, {n}], got {_dt(positions.dtype)} {list(positions.shape)}",
    )
    torch._check(
        fp_pos.dtype == torch.int64 and list(fp_pos.shape) == [B, F],
        lambda: f"{op}: fp_pos must be int64 [{B}, {F}], got {_dt(fp_pos.dtype)} {list(fp_pos.shape)}",
    )


def check_remat_kv(
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
) -> tuple[int, int, int, int]:
    """Validate kvq::remat_kv; returns (batch N, tokens T, output channels, rotary head_dim)."""
    op = "kvq::remat_kv"
    torch._check(
        codes.dim() == 3,
        lambda: f"{op}: codes must be [batch, tokens, packed channels] (rank 3), got rank {codes.dim()}",
    )
    _check_float(op, "weight", weight)
    _check_device(op, "codes", codes, scale=scale, zero=zero, weight=weight, bias=bias, cos=cos, sin=sin)
    _, d = check_dequantize(codes, scale, zero, bits, group_size, -1, weight.dtype, op)
    N, T = codes.shape[0], codes.shape[1]
    torch._check(
        weight.dim() == 2 and weight.shape[1] == d,
        lambda: f"{op}: weight must be [out_features, {d}] (nn.Linear layout; in_features = the "
        f"packed operand's {d} channels), got {list(weight.shape)}",
    )
    n_out = weight.shape[0]
    if bias is not None:
        torch._check(
            bias.dtype == weight.dtype,
            lambda: f"{op}: bias must have weight's dtype {_dt(weight.dtype)}, got {_dt(bias.dtype)}",
        )
        _check_shape(op, "bias", bias, [n_out], "one per output channel")
    torch._check(
        (cos is None) == (sin is None), lambda: f"{op}: cos and sin must be given together"
    )
    hd = 0
    if cos is None or sin is None:
        torch._check(rope_dim == 0, lambda: f"{op}: rope_dim must be 0 without cos and sin, got {rope_dim}")
        return N, T, n_out, hd
    for name, t in (("cos", cos), ("sin", sin)):
        torch._check(
            t.dtype == weight.dtype,
            lambda: f"{op}: {name} must have weight's dtype {_dt(weight.dtype)}, got {_dt(t.dtype)}",
        )
    torch._check(
        cos.dim() == 3 and cos.shape[0] in (1, N) and cos.shape[1] == T and cos.shape[2] >= 2
        and cos.shape[2] % 2 == 0,
        lambda: f"{op}: cos must be [{N} or 1, {T}, head_dim] with an even head_dim (the rotary "
        f"table at each token's position), got {list(cos.shape)}",
    )
    _check_shape(op, "sin", sin, list(cos.shape), "the shape of cos")
    hd = cos.shape[2]
    torch._check(
        rope_dim > 0 and rope_dim % hd == 0 and rope_dim <= n_out,
        lambda: f"{op}: rope_dim must be a positive multiple of head_dim {hd} and at most "
        f"{n_out} output channels, got {rope_dim}",
    )
    return N, T, n_out, hd
