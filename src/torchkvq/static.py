"""Compile-friendly decoding: a decode step over a preallocated store as one static graph.

After :meth:`KVStore.reserve`, a store's tensors keep their addresses and shapes, so the decode
step - write the new token into its slot (``kvq.write_tokens``, which declares what it mutates)
and attend (``kvq.quant_attention``) - compiles with ``torch.compile(fullgraph=True)`` once and
is reused at every step. The bookkeeping around it (which slot, when a block is quantized) stays
in Python between steps.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .policies import Policy
from .store import KVStore


def decode_core(query, key, value, slots, positions, k_codes, k_scale, k_zero, k_bits, v_codes,
                v_scale, v_zero, v_bits, k_fp, v_fp, fp_pos, q_exclude, k_outlier_index,
                k_outlier_value, v_outlier_index, v_outlier_value, group_size: int,
                v_group_size: int, scale: float) -> torch.Tensor:
    """Write one step's tokens into their slots, then attend over the whole store."""
    torch.ops.kvq.write_tokens(k_fp, v_fp, fp_pos, key, value, slots, positions)
    out, _, _ = torch.ops.kvq.quant_attention(
        query, k_codes, k_scale, k_zero, k_bits, v_codes, v_scale, v_zero, v_bits, k_fp, v_fp,
        fp_pos, q_exclude, k_outlier_index, k_outlier_value, v_outlier_index, v_outlier_value,
        group_size, v_group_size, scale, True, False,
    )
    return out


class StaticDecoder:
    """Decode steps over a reserved store with a compiled :func:`decode_core`.

    Args:
        store: a store on which :meth:`KVStore.reserve` was called (it must not grow). A KIVI
            store needs ``residual + group_size`` full-precision slots for its window (R..R+G-1
            tokens between steps, one more during a step) plus one per pinned sink: ``sinks``
            for a batch without padding, up to ``batch * sinks`` for rows padded differently.
        policy, state: the policy driving the store and its per-layer state; the policy runs
            after each step, in eager mode.
        compile: a ``torch.compile`` keyword dict (``fullgraph=True`` is always set), or None to
            run :func:`decode_core` eagerly.

    Example:
        >>> store = policy.make_store(1, 8, 128, torch.float32, "cpu")   # doctest: +SKIP
        >>> store.reserve(tokens=4096, fp_tokens=policy.residual + policy.group_size + policy.sinks)  # doctest: +SKIP
        >>> dec = StaticDecoder(store, policy, policy.new_state(), compile={"backend": "inductor"})  # doctest: +SKIP
        >>> out = dec.step(q, k, v)   # q [1, 32, 1, 128], k/v [1, 8, 1, 128]  # doctest: +SKIP
    """

    def __init__(self, store: KVStore, policy: Policy, state: Any = None,
                 compile: dict | None = None) -> None:
        if not store.fixed:
            raise ValueError("StaticDecoder: call store.reserve(tokens, fp_tokens) first so its shapes stay fixed")
        if store.window is not None:
            raise ValueError(
                "StaticDecoder: a sliding-window store frees blocks and moves its positions "
                "(q_offset) as it decodes, which a compiled step would recompile for; decode it eagerly"
            )
        self.store, self.policy, self.state = store, policy, state
        self._core: Callable = decode_core
        if compile is not None:
            self._core = torch.compile(decode_core, fullgraph=True, dynamic=False, **compile)

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             scale: float | None = None) -> torch.Tensor:
        """Append ``key``/``value`` ``[B, H, 1, D]`` and attend ``query [B, Hq, 1, D]``."""
        s = self.store
        if key.shape[2] != 1 or query.shape[2] != 1:
            raise ValueError("StaticDecoder.step decodes one token at a time; use KVStore.append for chunks")
        slots, positions = s.prepare_append(1)
        out = self._core(
            query, key, value, slots, positions, s.k_codes, s.k_scale, s.k_zero, s.k_bits,
            s.v_codes, s.v_scale, s.v_zero, s.v_bits, s.k_fp, s.v_fp, s.fp_pos, s.q_exclude,
            s.k_outlier_index, s.k_outlier_value, s.v_outlier_index, s.v_outlier_value,
            s.group_size, s.value_group_size, scale if scale is not None else s.head_dim**-0.5,
        )
        self.policy.after_append(s, self.state)
        return out
