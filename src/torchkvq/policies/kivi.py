"""KIVI (arXiv 2402.02750): keys per channel, values per token, a full-precision recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..store import KVStore
from .base import DEFAULT_SINKS, Policy


@dataclass
class KIVI(Policy):
    """The KIVI baseline: every token beyond the recent window is quantized once, in whole blocks.

    Keys are quantized per channel over blocks of `group_size` tokens, values per token in groups
    of `value_group_size` channels. At least the `residual` newest tokens stay in full precision,
    so the prefill's tail that does not fill a block stays in full precision too.

    Attention sinks: the first `sinks` tokens (default ``policies.DEFAULT_SINKS`` = 4) are
    pinned in full precision for good, counted per batch row - each row's first real tokens,
    after its left padding (see :meth:`KVStore.sink_positions`); in a sliding-window layer only
    while they are inside the window. ``sinks=0`` turns them off.
    They cost, per layer, ``2 * batch * kv_heads * head_dim`` elements of `window_dtype` plus
    an int64 position per row for each pinned position, on top of their quantized copy (which
    stays in its block, excluded from attention): a constant, not a per-token cost (the
    bundled 30-layer model, 3 KV heads of 64 in fp16: 4 sinks = 93,120 bytes per sequence).
    Rows with different padding pin the union of their sinks, up to ``batch * sinks``.

    Args:
        key_bits, value_bits: widths, 1-8 each.
        group_size: tokens per block (the key group).
        residual: full-precision recent window R (>= 0).
        sinks: leading tokens of each row kept in full precision (>= 0; 0: none).
        value_group_size: channels per value group (default ``min(group_size, head_dim)``).
        scale_dtype: float16 (default) or float32 scales and zero points.
        window_dtype: dtype of the full-precision tokens (None: the model's dtype).
    """

    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual: int = 128
    sinks: int = DEFAULT_SINKS
    value_group_size: int | None = None
    scale_dtype: torch.dtype = torch.float16
    window_dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        bits = f"{self.key_bits}" if self.key_bits == self.value_bits else f"k{self.key_bits}v{self.value_bits}"
        return f"kivi-{bits}"

    def validate(self) -> None:
        super().validate()
        for field in ("key_bits", "value_bits"):
            v = getattr(self, field)
            if not 1 <= v <= 8:
                raise ValueError(f"KIVI: {field} must be in [1, 8], got {v}")
        if self.residual < 0:
            raise ValueError(f"KIVI: residual must be >= 0, got {self.residual}")
        if self.sinks < 0:
            raise ValueError(f"KIVI: sinks must be >= 0 (0 keeps no attention sinks), got {self.sinks}")

    def after_append(self, store: KVStore, state: Any) -> None:
        if self.sinks:  # sinks arrive in full precision and are pinned before any flush
            store.pin(store.sink_positions(self.sinks) - store.pinned)
        ready = (store.n_tokens - self.residual - store.n_quantized) // store.group_size
        if ready > 0:
            store.quantize_blocks([(self.key_bits, self.value_bits)] * ready)
