"""LogQuant (arXiv 2503.19950): full precision for a local window and a log-spaced set of older
tokens, 2 bits for the rest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..store import KVStore
from .base import Policy


@dataclass
class LogIndex:
    """The full-precision selection of LogQuant's reference code, shared by all layers and heads.

    ``local``: the newest W..2W positions; ``log``: at most W older positions, spaced roughly
    log-uniformly with distance because every shift keeps every other one. Position 0 (the
    attention sink) is never dropped.
    """

    window: int
    local: list[int] = field(default_factory=list)
    log: list[int] = field(default_factory=list)

    def prefill(self, n: int) -> None:
        """Select among the first `n` positions at once."""
        W = self.window
        log: list[int] = []
        local = list(range(n))
        kept = log + local
        while len(kept) >= 3 * W:
            log, local = kept[0 : 2 * W : 2], kept[2 * W :]
            kept = log + local
        if W < n < 3 * W:
            log, local = kept[:W], kept[W:]
        self.log, self.local = log, local

    def push(self, position: int) -> None:
        """Admit one new position; past 2W local positions, the oldest W merge into the log set."""
        W = self.window
        self.local.append(position)
        if len(self.local) > 2 * W:
            self.log = (self.log + self.local[:W])[0::2] if self.log else self.local[:W]
            self.local = self.local[W:]

    @property
    def selected(self) -> set[int]:
        return set(self.log) | set(self.local)


@dataclass
class LogQuant(Policy):
    """LogQuant: quantize everything except a local window and a log-spaced set of older tokens.

    Every token is quantized once, in whole blocks of `group_size` tokens, as soon as it is older
    than the local window; a token of the log set keeps its full-precision copy (pinned) and its
    quantized copy is excluded from attention until the log set drops it. Tokens older than the
    local window that do not yet fill a block stay in full precision for the moment, so at most
    ``3 * window + group_size - 1`` tokens are in full precision. Unlike the reference code,
    history is never re-quantized from dequantized values. In a sliding-window layer, log
    positions (position 0 included) are dropped once they leave the layer's window.

    The rule's position 0 is the first position of the batch, which for a left-padded row is
    padding. ``sinks`` adds each row's first real tokens (after its padding), pinned for good as
    KIVI's are (:meth:`KVStore.sink_positions`); the default 0 is the paper's rule alone.

    Args:
        window: W; the local window holds W..2W tokens, the log set at most W.
        bits: width of keys and values outside the selection.
        group_size: tokens per quantized block (the key group).
        value_group_size: channels per value group (default ``min(group_size, head_dim)``).
        window_dtype: dtype of the full-precision tokens (None: the model's dtype).
        sinks: leading real tokens of each row kept in full precision besides the rule's
            selection (>= 0).
    """

    window: int = 48
    bits: int = 2
    group_size: int = 32
    value_group_size: int | None = None
    scale_dtype: torch.dtype = torch.float16
    window_dtype: torch.dtype | None = None
    sinks: int = 0

    @property
    def name(self) -> str:
        return f"logquant-{self.bits}"

    def validate(self) -> None:
        super().validate()
        if self.window < 1:
            raise ValueError(f"LogQuant: window must be >= 1, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"LogQuant: sinks must be >= 0 (0 keeps only the rule's selection), got {self.sinks}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"LogQuant: bits must be in [1, 8], got {self.bits}")

    def new_state(self) -> LogIndex:
        return LogIndex(self.window)

    def after_append(self, store: KVStore, state: Any) -> None:
        index: LogIndex = state
        seen = index.local[-1] + 1 if index.local else 0
        if seen == 0 and store.n_tokens > 1:
            index.prefill(store.n_tokens)
        else:
            for p in range(seen, store.n_tokens):
                index.push(p)
        # In a sliding-window layer, log positions older than the window were dropped by the
        # store (pins included): the log set keeps only what the layer still sees.
        keep = {p for p in index.log if p >= store.window_start}
        if self.sinks:  # sinks arrive in full precision: pinned before any block is quantized
            keep |= store.sink_positions(self.sinks)
        store.unpin(store.pinned - keep)
        store.pin(keep - store.pinned)
        ready = (index.local[0] - store.n_quantized) // store.group_size
        if ready > 0:
            store.quantize_blocks([(self.bits, self.bits)] * ready)
