"""Cache policies: which tokens get which precision. See :class:`Policy`."""

from __future__ import annotations

from typing import Callable

import torch

from .base import DEFAULT_SINKS, Policy
from .kivi import KIVI
from .logquant import LogQuant
from .qaq import QAQ
from .xquant import XQuant, XQuantCL

#: Named configurations, as ``torchkvq eval`` and the benchmarks refer to them. Full-precision
#: tokens are held in fp16 so that byte figures compare with an fp16 cache on equal terms. KIVI
#: and QAQ keep their default attention sinks (:data:`DEFAULT_SINKS` per row) unless a name says
#: otherwise; LogQuant always keeps position 0 by its own rule, and sinks only where a name says so.
REGISTRY: dict[str, Callable[[], Policy]] = {
    "kivi-4": lambda: KIVI(key_bits=4, value_bits=4, window_dtype=torch.float16),
    "kivi-2": lambda: KIVI(key_bits=2, value_bits=2, window_dtype=torch.float16),
    # kivi-2 without attention sinks: what the sinks buy
    "kivi-2-no-sinks": lambda: KIVI(key_bits=2, value_bits=2, sinks=0, window_dtype=torch.float16),
    "kivi-2-g128": lambda: KIVI(key_bits=2, value_bits=2, group_size=128, value_group_size=64,
                                window_dtype=torch.float16),
    # window 48 keeps ~135 tokens in full precision on average, as KIVI's R = 128 does (128..159)
    "logquant-2": lambda: LogQuant(window=48, bits=2, window_dtype=torch.float16),
    # a smaller window that lands at kivi-2-no-sinks' bytes in the default evaluation (6,385 vs
    # 6,378 bytes/token; kivi-2's 4 sinks add 76; logquant-2 holds as many bytes in use as kivi-2,
    # but more reserve)
    "logquant-2-w28": lambda: LogQuant(window=28, bits=2, window_dtype=torch.float16),
    # w28 with KIVI's 4 sinks per row besides the rule's position 0: at kivi-2's bytes (6,445 vs
    # 6,454 bytes/token in the default evaluation)
    "logquant-2-w28-s4": lambda: LogQuant(window=28, bits=2, sinks=4, window_dtype=torch.float16),
    # the default window with the 4 sinks: about kivi-2's bytes in use (6,302 vs 6,378)
    "logquant-2-s4": lambda: LogQuant(window=48, bits=2, sinks=4, window_dtype=torch.float16),
    # budgets that land mostly at 2 bits, near KIVI-2's bytes (plus 1% outliers)
    "qaq": lambda: QAQ(key_error=2.0, value_error=8.0, window_dtype=torch.float16),
    # the same budgets without outliers: lands at KIVI-2's bytes
    "qaq-no-outliers": lambda: QAQ(key_error=2.0, value_error=8.0, outlier_fraction=0.0,
                                   window_dtype=torch.float16),
    # toward the 5x target: 64-token blocks and value groups (less metadata), a 32-token window,
    # no outliers, one sink (token 0) in full precision
    "qaq-g64-r32-sink": lambda: QAQ(key_error=2.0, value_error=8.0, group_size=64,
                                    value_group_size=64, residual=32, sinks=1,
                                    outlier_fraction=0.0, window_dtype=torch.float16),
    # XQuant: the bundled GQA model caches SVD latents (rank = kv dim), per-token groups of 64
    "xquant-2": lambda: XQuant(bits=2),
    "xquant-3": lambda: XQuant(bits=3),
    "xquant-4": lambda: XQuant(bits=4),
    # XQuant-CL: deltas of the residual stream, the first 2 layers at 4 bits, 32-token window
    "xquant-cl-2": lambda: XQuantCL(bits=2),
    "xquant-cl-3": lambda: XQuantCL(bits=3),
    "xquant-cl-4": lambda: XQuantCL(bits=4),
}


def get_policy(name: str) -> Policy:
    """The registered policy called `name` (see :data:`REGISTRY`)."""
    try:
        return REGISTRY[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["Policy", "DEFAULT_SINKS", "KIVI", "LogQuant", "QAQ", "XQuant", "XQuantCL", "REGISTRY", "get_policy"]
