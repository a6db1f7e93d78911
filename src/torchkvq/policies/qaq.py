"""QAQ (arXiv 2403.04643): per-token widths from error budgets, separately for keys and values,
with an attention window and outliers kept exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..store import KVStore, Outliers
from .base import DEFAULT_SINKS, Policy


@dataclass
class QAQState:
    """What QAQ remembers about one layer between steps."""

    window: int
    recent: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [window, positions]
    step: int = 0
    query_sq_norms: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def record(self, positions: list[int], attention: torch.Tensor) -> None:
        """Store this step's attention (max over batch, heads and queries) for each position."""
        cap = max(positions, default=-1) + 1
        if cap > self.recent.shape[1]:
            grown = torch.zeros(self.window, max(cap, int(self.recent.shape[1] * 1.25)))
            grown[:, : self.recent.shape[1]] = self.recent
            self.recent = grown
        row = self.step % self.window
        self.recent[row] = 0
        if positions:
            self.recent[row, torch.tensor(positions)] = attention.float().cpu()
        self.step += 1

    def predicted(self, positions: list[int]) -> torch.Tensor:
        """QAQ's predicted attention: the max of the last `window` scores of each position."""
        return self.recent[:, torch.tensor(positions)].amax(0)


@dataclass
class QAQ(Policy):
    """QAQ as a real cache: packed storage, fused attention, every token quantized once.

    Widths follow QAQ's budgets. Value of token t: allowed error
    ``sqrt(12 / T) * value_error / a_t`` with ``a_t`` its predicted attention (the max of its
    last `attention_window` attention scores, which ``kvq.quant_attention`` returns as
    statistics - no attention matrix is materialized). Keys: ``sigma^2 = log(T^3 / (T - 1) *
    key_error^2 + 1) / |q|^2`` with ``|q|^2`` the `query_percentile` of the scaled query norms
    seen so far, and allowed error ``sqrt(3) * sigma``. A width is
    ``ceil(log2(range / (2 * error) + 1))`` clamped to [min_bits, max_bits], range measured
    without the outliers. The `outlier_fraction` most extreme values of each key and value vector
    (half at each end, at least one each) are kept exactly; `value_outlier_fraction` sets the
    values' fraction apart (e.g. 0: outliers for keys only, the more sensitive of the two).

    Where the paper keeps an unquantized copy on the CPU to raise a token's width later,
    torchkvq keeps every token in full precision for its first `residual` steps (at least
    `attention_window`), so its width is decided from a full attention window, and then
    quantizes it once. Widths are per block of `group_size` tokens (shared by heads and batch):
    a block gets the widest width any of its tokens needs.

    Attention sinks: the first `sinks` tokens (default ``policies.DEFAULT_SINKS`` = 4) are
    pinned in full precision for good, counted per batch row - each row's first real tokens,
    after its left padding - exactly as in :class:`KIVI`, at the same cost (``2 * batch *
    kv_heads * head_dim`` elements of `window_dtype` and an int64 position per row for each
    pinned position per layer, a constant). Their quantized copies are never attended to, so
    their attention does not widen their block. ``sinks=0`` turns them off.

    Args:
        key_error, value_error: the budgets (smaller: more bits).
        min_bits, max_bits: width range.
        attention_window: n, the number of recent scores a prediction looks at.
        residual: steps a token stays in full precision before it is quantized.
        outlier_fraction: fraction of each vector kept exactly (0 disables outliers).
        value_outlier_fraction: the same for values only (None: `outlier_fraction`).
        sinks: leading tokens of each row kept in full precision (>= 0; 0: none).
        query_percentile: percentile of |q|^2 used by the key budget.
    """

    key_error: float = 0.5
    value_error: float = 0.5
    min_bits: int = 2
    max_bits: int = 4
    attention_window: int = 5
    residual: int = 128
    outlier_fraction: float = 0.01
    value_outlier_fraction: float | None = None
    sinks: int = DEFAULT_SINKS
    query_percentile: float = 0.9
    group_size: int = 32
    value_group_size: int | None = None
    scale_dtype: torch.dtype = torch.float16
    window_dtype: torch.dtype | None = None
    wants_stats: bool = True

    @property
    def name(self) -> str:
        return f"qaq-{self.min_bits}-{self.max_bits}"

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.min_bits <= self.max_bits <= 8:
            raise ValueError(f"QAQ: need 1 <= min_bits <= max_bits <= 8, got {self.min_bits}, {self.max_bits}")
        if self.attention_window < 1 or self.residual < self.attention_window:
            raise ValueError(
                f"QAQ: need attention_window >= 1 and residual >= attention_window, got "
                f"{self.attention_window} and {self.residual}"
            )
        fractions = (self.outlier_fraction, self._value_fraction)
        if not all(0 <= f < 0.5 for f in fractions) or not 0 < self.query_percentile <= 1:
            raise ValueError("QAQ: outlier_fraction and value_outlier_fraction must be in [0, 0.5) "
                             "and query_percentile in (0, 1]")
        if self.sinks < 0:
            raise ValueError(f"QAQ: sinks must be >= 0 (0 keeps no attention sinks), got {self.sinks}")
        if self.key_error <= 0 or self.value_error <= 0:
            raise ValueError("QAQ: key_error and value_error must be > 0")

    @property
    def _value_fraction(self) -> float:
        return self.outlier_fraction if self.value_outlier_fraction is None else self.value_outlier_fraction

    @staticmethod
    def _outliers(fraction: float, head_dim: int) -> Outliers:
        if fraction == 0:
            return Outliers()
        each = max(1, round(fraction * head_dim / 2))
        return Outliers(each, each)

    def make_store(self, batch_size, kv_heads, head_dim, dtype, device, window=None) -> KVStore:
        return KVStore(
            batch_size, kv_heads, head_dim, dtype=self.window_dtype or dtype, device=device,
            group_size=self.group_size, value_group_size=self.value_group_size,
            scale_dtype=self.scale_dtype, key_outliers=self._outliers(self.outlier_fraction, head_dim),
            value_outliers=self._outliers(self._value_fraction, head_dim), window=window,
        )

    @property
    def prefill_stats_queries(self) -> int:  # the prompt's last queries stand for the last steps
        return self.attention_window

    def new_state(self) -> QAQState:
        return QAQState(self.attention_window, recent=torch.zeros(self.attention_window, 0))

    def after_append(self, store: KVStore, state: Any) -> None:
        """Pin the sinks; widths wait for this step's attention statistics (:meth:`observe`)."""
        self._pin_sinks(store)

    def _pin_sinks(self, store: KVStore) -> None:
        # Sinks arrive in full precision and are pinned before any flush (at prefill, observe
        # runs before after_append).
        if self.sinks:
            store.pin(store.sink_positions(self.sinks) - store.pinned)  # per row, in the window

    def observe(self, store: KVStore, state: Any, stats: torch.Tensor, query: torch.Tensor) -> None:
        st: QAQState = state
        self._pin_sinks(store)
        positions, fp_stats = store.fp_slot_stats(stats)
        st.record(positions, fp_stats.amax(dim=(0, 1)))
        norms = query.float().pow(2).sum(-1).flatten().cpu()
        st.query_sq_norms = torch.cat([st.query_sq_norms, norms])[-4096:]
        ready = (store.n_tokens - self.residual - store.n_quantized) // store.group_size
        if ready > 0:
            store.quantize_blocks([self._block_bits(store, st, b) for b in range(ready)])

    def _clipped_range(self, x: torch.Tensor, o: Outliers) -> torch.Tensor:
        """Per token vector ``[..., D]``: max - min once the outliers are set aside."""
        s = x.float().sort(dim=-1).values
        return s[..., s.shape[-1] - 1 - o.high] - s[..., o.low]

    def _block_bits(self, store: KVStore, st: QAQState, b: int) -> tuple[int, int]:
        # T: the tokens a query attends to (a sliding-window layer sees at most its window)
        G, T = store.group_size, min(store.n_tokens, store.window or store.n_tokens)
        first = store.n_quantized + b * G
        positions = list(range(first, first + G))
        keys, values = store.fp_tokens(positions)
        ok, ov = store.key_outliers, store.value_outliers

        attention = st.predicted(positions)  # [G]
        # a pinned token's quantized copy is never attended to: its attention asks for nothing
        pinned = torch.tensor([p in store.pinned for p in positions])
        attention = attention.masked_fill(pinned, 0).clamp_min(1e-6)
        v_err = math.sqrt(12 / T) * self.value_error / attention
        v_range = self._clipped_range(values, ov).amax(dim=(0, 1))  # [G]
        v_bits = self._width(v_range / (2 * v_err)).max()

        q2 = torch.quantile(st.query_sq_norms, self.query_percentile).clamp_min(1e-12)
        sigma2 = math.log(T**3 / max(T - 1, 1) * self.key_error**2 + 1) / q2
        k_err = math.sqrt(3) * sigma2.sqrt()
        k = keys.float()
        if ok.count:  # per-channel ranges of the block once each token's outliers are clipped
            s = k.sort(dim=-1).values
            D = k.shape[-1]
            k = k.clamp(s[..., ok.low : ok.low + 1], s[..., D - 1 - ok.high : D - ok.high])
        k_range = (k.amax(dim=2) - k.amin(dim=2)).amax()
        k_bits = self._width(k_range / (2 * k_err))
        return int(k_bits), int(v_bits)

    def _width(self, ratio: torch.Tensor) -> torch.Tensor:
        bits = torch.ceil(torch.log2(ratio + 1))
        return bits.clamp(self.min_bits, self.max_bits).to(torch.int64)
