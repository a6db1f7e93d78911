"""The policy interface: what a layer keeps in full precision, and at what widths it quantizes.

A policy drives a :class:`~torchkvq.store.KVStore` and nothing else: after tokens are appended
it pins tokens and quantizes blocks; after attention it may look at per-token attention
statistics. It never calls a kernel itself. In a sliding-window layer the store drops what left
the window, pins included; a policy pins only positions from ``store.window_start`` on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..store import KVStore, Outliers

#: Attention sinks KIVI and QAQ keep in full precision by default: each batch row's first real
#: tokens draw a large share of every query's attention, so their quantization error reaches
#: every output (StreamingLLM, arXiv 2309.17453, keeps 4). One constant so the policies agree.
DEFAULT_SINKS = 4


class Policy(ABC):
    """Base class of cache policies. Subclasses are small dataclasses of hyper-parameters.

    Attributes a subclass sets: ``group_size`` (tokens per quantized block), ``value_group_size``
    (channels per value group, None = ``min(group_size, head_dim)``), ``scale_dtype``,
    ``key_outliers`` / ``value_outliers`` (:class:`~torchkvq.store.Outliers`).
    """

    group_size: int = 32
    value_group_size: int | None = None
    scale_dtype: torch.dtype = torch.float16
    key_outliers: Outliers = Outliers()
    value_outliers: Outliers = Outliers()
    #: dtype of full-precision tokens; None keeps the model's dtype.
    window_dtype: torch.dtype | None = None
    #: Whether :meth:`observe` needs attention statistics (costs a second pass over the store).
    wants_stats: bool = False
    #: With :attr:`wants_stats`: how many of the prompt's last queries report statistics at
    #: prefill (the prompt itself is attended to with SDPA).
    prefill_stats_queries: int = 1

    @property
    @abstractmethod
    def name(self) -> str:
        """Short label used in tables, e.g. ``kivi-2``."""

    def make_store(self, batch_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str, window: int | None = None) -> KVStore:
        """An empty store configured for this policy; `window` is the layer's sliding window
        (None: full attention)."""
        return KVStore(
            batch_size, kv_heads, head_dim, dtype=self.window_dtype or dtype, device=device,
            group_size=self.group_size, value_group_size=self.value_group_size,
            scale_dtype=self.scale_dtype, key_outliers=self.key_outliers,
            value_outliers=self.value_outliers, window=window,
        )

    def new_state(self) -> Any:
        """Per-layer state the policy keeps between steps (None when it needs none)."""
        return None

    @abstractmethod
    def after_append(self, store: KVStore, state: Any) -> None:
        """Called once tokens were appended (and padding marked), before attention reads the store."""

    def observe(self, store: KVStore, state: Any, stats: torch.Tensor, query: torch.Tensor) -> None:
        """Called after attention when :attr:`wants_stats`.

        Args:
            stats: ``[batch, kv_heads, slots]`` as returned by :meth:`KVStore.attend`.
            query: ``[batch, q_heads, L, head_dim]``, already multiplied by the softmax scale.
        """

    def validate(self) -> None:
        """Raise ValueError on inconsistent hyper-parameters (called by the cache)."""
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"{type(self).__name__}: group_size must be a positive multiple of 8, got {self.group_size}")
