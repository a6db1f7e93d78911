"""The compressed per-layer KV store: what a layer holds and how attention reads it.

A store holds the keys and values of one attention layer, ``[batch, kv_heads, tokens,
head_dim]`` after RoPE, in three parts:

* **quantized blocks** of ``group_size`` consecutive tokens, oldest first. Keys are quantized
  per channel (each group is one channel over the block's tokens), values per token (groups of
  ``value_group_size`` channels). Each block has its own key and value bit widths, so mixed
  precision is possible; optional fixed-capacity outliers per token are kept exactly.
* **full-precision slots**: the recent window (tokens not yet quantized) and **pinned** tokens
  a policy keeps in full precision (attention sinks, LogQuant's log-spaced set). A pinned token
  that is also quantized is excluded from attention in its quantized form.
* bookkeeping: per-block widths, slot positions, exclusion flags.

A **sliding-window** store (``window=W``, for layers whose queries see only the last W
positions) keeps only what its queries can still see: before new tokens are appended (and on
:meth:`evict`), full-precision tokens that left every future query's window are dropped and
quantized blocks that left it entirely are freed (the held blocks move down the pools, and the
first held block's position becomes ``q_offset``); a block partly inside stays, its
out-of-window tokens masked by the kernel. Pins that leave the window are dropped with their
tokens.

The store has no policy: a policy appends tokens, decides when blocks are quantized and at what
widths, and which tokens to pin. Every token is quantized once, from its full-precision value.
All tensors are preallocated with capacity and grow geometrically, so appending never copies the
whole store at every step; :meth:`reserve` preallocates for a known length. Attention
(:meth:`attend`) hands the full-capacity tensors to ``kvq.quant_attention``: unused blocks have
width 0 and unused slots position -1, so no slice is ever copied to make it contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops

# Capacity grows by this factor (amortized O(1) copies per token; at most 25% held in reserve).
_GROWTH = 1.25


@dataclass(frozen=True)
class Outliers:
    """Per-token outlier capacity: ``low`` smallest and ``high`` largest channels kept exactly."""

    low: int = 0
    high: int = 0

    @property
    def count(self) -> int:
        return self.low + self.high


def _grow(t: torch.Tensor, dim: int, size: int, fill: float | int | bool = 0) -> torch.Tensor:
    """A copy of `t` with `dim` enlarged to `size`, new entries set to `fill`."""
    shape = list(t.shape)
    shape[dim] = size
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class KVStore:
    """Compressed keys and values of one attention layer (see the module docstring).

    Args:
        batch_size, kv_heads, head_dim: the layer's cache shape.
        dtype: dtype of the full-precision slots; appended keys/values of another float dtype are
            cast to it (e.g. an fp16 window for an fp32 model).
        device: where every tensor lives.
        group_size: tokens per quantized block, i.e. the key group size (multiple of 8).
        value_group_size: channels per value group; a multiple of 8 dividing `head_dim`
            (default: the largest such number up to `group_size`).
        scale_dtype: dtype of scales and zero points (float16 or float32).
        key_outliers, value_outliers: per-token outlier capacity of keys and values.
        window: sliding window W of the layer (a query at position q sees ``q - W < p <= q``),
            or None for full attention.
    """

    def __init__(
        self,
        batch_size: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        group_size: int = 32,
        value_group_size: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
        key_outliers: Outliers = Outliers(),
        value_outliers: Outliers = Outliers(),
        window: int | None = None,
    ) -> None:
        # Default: the widest multiple of 8 up to group_size that divides head_dim (80 -> 16).
        vg = value_group_size if value_group_size is not None else max(
            [v for v in range(8, min(group_size, head_dim) + 1, 8) if head_dim % v == 0], default=0)
        for name, v in (("batch_size", batch_size), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if v < 1:
                raise ValueError(f"KVStore: {name} must be >= 1, got {v}")
        if group_size < 8 or group_size % 8:
            raise ValueError(f"KVStore: group_size must be a positive multiple of 8, got {group_size}")
        if vg < 8 or vg % 8 or head_dim % vg:
            raise ValueError(
                f"KVStore: value_group_size must be a multiple of 8 dividing head_dim {head_dim}, got {vg}"
            )
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"KVStore: dtype must be float32, float16 or bfloat16, got {dtype}")
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"KVStore: scale_dtype must be float16 or float32, got {scale_dtype}")
        for name, o in (("key_outliers", key_outliers), ("value_outliers", value_outliers)):
            if o.low < 0 or o.high < 0 or o.count >= head_dim:
                raise ValueError(
                    f"KVStore: {name} must be >= 0 each and leave channels dense (< head_dim "
                    f"{head_dim}), got {o}"
                )
        if window is not None and window < 1:
            raise ValueError(f"KVStore: window must be >= 1 (or None for full attention), got {window}")
        self.batch_size, self.kv_heads, self.head_dim = batch_size, kv_heads, head_dim
        self.window = window
        self.dtype, self.device = dtype, torch.device(device)
        self.group_size, self.value_group_size, self.scale_dtype = group_size, vg, scale_dtype
        self.key_outliers, self.value_outliers = key_outliers, value_outliers

        B, H, D = batch_size, kv_heads, head_dim
        dev, sdt = self.device, scale_dtype
        self._block_bits: list[tuple[int, int]] = []  # (key bits, value bits) per used block
        self._k_bytes = self._v_bytes = 0  # pool bytes used per (batch, head)
        self.k_bits = torch.zeros(0, dtype=torch.int32, device=dev)
        self.v_bits = torch.zeros(0, dtype=torch.int32, device=dev)
        self.k_codes = torch.zeros(B, H, 0, dtype=torch.uint8, device=dev)
        self.v_codes = torch.zeros(B, H, 0, dtype=torch.uint8, device=dev)
        self.k_scale = torch.zeros(B, H, 0, D, dtype=sdt, device=dev)
        self.k_zero = torch.zeros(B, H, 0, D, dtype=sdt, device=dev)
        self.v_scale = torch.zeros(B, H, 0, D // vg, dtype=sdt, device=dev)
        self.v_zero = torch.zeros(B, H, 0, D // vg, dtype=sdt, device=dev)
        self.q_exclude = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        self.k_outlier_index = self.k_outlier_value = None
        self.v_outlier_index = self.v_outlier_value = None
        if key_outliers.count:
            self.k_outlier_index = torch.zeros(B, H, 0, key_outliers.count, dtype=torch.int16, device=dev)
            self.k_outlier_value = torch.zeros(B, H, 0, key_outliers.count, dtype=dtype, device=dev)
        if value_outliers.count:
            self.v_outlier_index = torch.zeros(B, H, 0, value_outliers.count, dtype=torch.int16, device=dev)
            self.v_outlier_value = torch.zeros(B, H, 0, value_outliers.count, dtype=dtype, device=dev)
        self.k_fp = torch.zeros(B, H, 0, D, dtype=dtype, device=dev)
        self.v_fp = torch.zeros(B, H, 0, D, dtype=dtype, device=dev)
        self.fp_pos = torch.zeros(B, 0, dtype=torch.int64, device=dev)
        self._slots: list[int] = []  # position held by each used fp slot (shared by the batch)
        self._pinned: set[int] = set()
        self._n_tokens = 0
        self._fixed = False
        self._q_offset = 0  # position of quantized token 0 (> 0 once a window freed blocks)
        self._horizon = 0  # no query before this position will come (sliding window)
        self._lead_pad = [0] * B  # per batch row: leading positions marked padding

    # ---- what is held ----------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Tokens appended so far (padding included): the next token's position."""
        return self._n_tokens

    @property
    def n_quantized(self) -> int:
        """Positions below this are quantized or, in a sliding-window store, dropped: the next
        block to quantize starts here. Quantized blocks hold ``[q_offset, n_quantized)``."""
        return self._q_offset + len(self._block_bits) * self.group_size

    @property
    def q_offset(self) -> int:
        """Position of the first held quantized token (0 unless a window freed blocks)."""
        return self._q_offset

    @property
    def window_start(self) -> int:
        """The oldest position a query can still see: 0 without a window, else
        ``first query - W + 1`` (older tokens are dropped, or masked in a block partly inside)."""
        if self.window is None:
            return 0
        return max(0, self._horizon - self.window + 1)

    @property
    def block_bits(self) -> list[tuple[int, int]]:
        """(key bits, value bits) of every quantized block, oldest first."""
        return list(self._block_bits)

    @property
    def fp_positions(self) -> list[int]:
        """Positions held in full precision (window and pinned), in slot order."""
        return list(self._slots)

    @property
    def pinned(self) -> frozenset[int]:
        return frozenset(self._pinned)

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = {
            "k_bits": self.k_bits, "v_bits": self.v_bits, "k_codes": self.k_codes,
            "v_codes": self.v_codes, "k_scale": self.k_scale, "k_zero": self.k_zero,
            "v_scale": self.v_scale, "v_zero": self.v_zero, "q_exclude": self.q_exclude,
            "k_fp": self.k_fp, "v_fp": self.v_fp, "fp_pos": self.fp_pos,
        }
        for name in ("k_outlier_index", "k_outlier_value", "v_outlier_index", "v_outlier_value"):
            t = getattr(self, name)
            if t is not None:
                named[name] = t
        return named

    def nbytes(self) -> int:
        """Bytes of every tensor the store holds, capacity included."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def nbytes_breakdown(self) -> dict[str, int]:
        """Bytes by part; the values sum to :meth:`nbytes`.

        ``codes`` (packed keys and values), ``scales`` (scales and zero points), ``outliers``
        (indices and values), ``fp_window`` (full-precision tokens not pinned), ``pinned``,
        ``bookkeeping`` (widths, slot positions, exclusion flags) count what is in use;
        ``reserved`` is allocated capacity not yet in use.
        """
        B, H, D, G = self.batch_size, self.kv_heads, self.head_dim, self.group_size
        nb = len(self._block_bits)
        q = nb * G
        sb = torch.empty(0, dtype=self.scale_dtype).element_size()
        eb = torch.empty(0, dtype=self.dtype).element_size()
        out_count = self.key_outliers.count + self.value_outliers.count
        n_pinned = sum(1 for p in self._slots if p in self._pinned)
        used = {
            "codes": B * H * (self._k_bytes + self._v_bytes),
            "scales": 2 * B * H * sb * (nb * D + q * (D // self.value_group_size)),
            "outliers": B * H * q * out_count * (2 + eb),
            "fp_window": 2 * B * H * D * eb * (len(self._slots) - n_pinned),
            "pinned": 2 * B * H * D * eb * n_pinned,
            "bookkeeping": 2 * 4 * nb + B * q + 8 * B * len(self._slots),
        }
        used["reserved"] = self.nbytes() - sum(used.values())
        return used

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 cache of the same layer would take: the baseline of compression ratios.

        A full-attention layer holds every token; a sliding-window layer the ``W - 1`` newest
        between steps, as transformers' ``DynamicSlidingWindowLayer`` does."""
        held = self._n_tokens if self.window is None else min(self._n_tokens, self.window - 1)
        return 2 * 2 * self.batch_size * self.kv_heads * self.head_dim * held

    # ---- capacity --------------------------------------------------------------------------

    def reserve(self, tokens: int, fp_tokens: int, max_bits: int = 8) -> None:
        """Preallocate for `tokens` quantized tokens at widths <= `max_bits` and `fp_tokens` slots."""
        blocks = -(-tokens // self.group_size)
        per_block = self.group_size * self.head_dim * max_bits // 8
        self._ensure_blocks(blocks, blocks * per_block, blocks * per_block, exact=True)
        self._ensure_slots(fp_tokens, exact=True)
        self._fixed = True

    @property
    def fixed(self) -> bool:
        """True after :meth:`reserve`: tensors keep their addresses and shapes (no growth, no
        shrinking), which a compiled decode step relies on."""
        return self._fixed

    def _check_fixed(self, what: str, needed: int, cap: int) -> None:
        if self._fixed:
            raise RuntimeError(
                f"KVStore: {what} needs capacity {needed} but the store was reserved for {cap}; "
                "reserve() more before decoding"
            )

    def _ensure_slots(self, needed: int, exact: bool = False) -> None:
        cap = self.k_fp.shape[2]
        if needed <= cap:
            return
        self._check_fixed("full-precision slots", needed, cap)
        new = needed if exact else max(needed, int(cap * _GROWTH), 16)
        self.k_fp = _grow(self.k_fp, 2, new)
        self.v_fp = _grow(self.v_fp, 2, new)
        self.fp_pos = _grow(self.fp_pos, 1, new, -1)

    def _ensure_blocks(self, blocks: int, k_bytes: int, v_bytes: int, exact: bool = False) -> None:
        def size(cap: int, need: int) -> int:
            # A sliding-window store needs a bounded number of blocks: no slack beyond that.
            return need if exact or self.window is not None else max(need, int(cap * _GROWTH))

        G = self.group_size
        for what, need, cap in (("key codes", k_bytes, self.k_codes.shape[2]),
                                ("value codes", v_bytes, self.v_codes.shape[2]),
                                ("blocks", blocks, self.k_bits.shape[0])):
            if need > cap:
                self._check_fixed(what, need, cap)
        if k_bytes > self.k_codes.shape[2]:
            self.k_codes = _grow(self.k_codes, 2, size(self.k_codes.shape[2], k_bytes))
        if v_bytes > self.v_codes.shape[2]:
            self.v_codes = _grow(self.v_codes, 2, size(self.v_codes.shape[2], v_bytes))
        cap = self.k_bits.shape[0]
        if blocks <= cap:
            return
        new = size(cap, blocks)
        self.k_bits = _grow(self.k_bits, 0, new)
        self.v_bits = _grow(self.v_bits, 0, new)
        self.k_scale = _grow(self.k_scale, 2, new)
        self.k_zero = _grow(self.k_zero, 2, new)
        self.v_scale = _grow(self.v_scale, 2, new * G)
        self.v_zero = _grow(self.v_zero, 2, new * G)
        self.q_exclude = _grow(self.q_exclude, 1, new * G, False)
        for name in ("k_outlier_index", "k_outlier_value", "v_outlier_index", "v_outlier_value"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, _grow(t, 2, new * G))

    # ---- writing ---------------------------------------------------------------------------

    def _check_kv(self, name: str, t: torch.Tensor, n: int | None) -> int:
        B, H, D = self.batch_size, self.kv_heads, self.head_dim
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"KVStore.append: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(
                f"KVStore.append: {name} must be [batch={B}, kv_heads={H}, tokens, head_dim={D}], "
                f"got {list(t.shape)}"
            )
        if n is not None and t.shape[2] != n:
            raise ValueError(f"KVStore.append: key and value must hold the same number of tokens, got {n} and {t.shape[2]}")
        if t.shape[2] == 0:
            raise ValueError(f"KVStore.append: {name} holds no tokens; append at least one")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"KVStore.append: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"KVStore.append: {name} is on {t.device} but the store is on {self.device}")
        if not torch.isfinite(t).all():
            raise ValueError(f"KVStore.append: {name} contains NaN or Inf; the store was left unchanged")
        if t.dtype != self.dtype and t.abs().amax() > torch.finfo(self.dtype).max:
            raise ValueError(
                f"KVStore.append: {name} holds values beyond {self.dtype}'s range (the store's "
                f"dtype), which would become Inf; use a wider dtype. The store was left unchanged"
            )
        return t.shape[2]

    def append(self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append tokens at the next positions, in full precision (the recent window).

        Args:
            key, value: ``[batch, kv_heads, n, head_dim]`` floats on the store's device, finite,
                any strides; stored in the store's dtype.
            valid: optional bool ``[batch, n]``; False marks padding, which attention skips and
                per-channel key statistics ignore.

        Raises (leaving the store unchanged) on a wrong type, shape, dtype or device, on an
        empty append and on NaN/Inf.
        """
        n = self._check_kv("key", key, None)
        self._check_kv("value", value, n)
        if valid is not None and (valid.dtype != torch.bool or list(valid.shape) != [self.batch_size, n]):
            raise ValueError(
                f"KVStore.append: valid must be bool [batch={self.batch_size}, tokens={n}], got "
                f"{valid.dtype} {list(valid.shape)}"
            )
        slots, positions = self.prepare_append(n, valid)
        ops.write_tokens(self.k_fp, self.v_fp, self.fp_pos, key, value, slots, positions)

    def prepare_append(self, n: int, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Book slots for `n` new tokens and return ``(slots [n], positions [batch, n])`` for
        ``kvq.write_tokens``; :meth:`append` is this plus the write. Split so that a compiled
        decode step can do the write itself (see :mod:`torchkvq.static`). A sliding-window store
        first drops what the new tokens' queries cannot see (:meth:`evict`)."""
        self.evict(self._n_tokens)
        if valid is not None:
            self._note_padding(self._n_tokens, valid)
        f = len(self._slots)
        self._ensure_slots(f + n)
        slots = torch.arange(f, f + n, device=self.device)
        pos = torch.arange(self._n_tokens, self._n_tokens + n, device=self.device)
        pos = pos.expand(self.batch_size, n)
        if valid is not None:
            pos = torch.where(valid.to(self.device), pos, -1)
        self._slots.extend(range(self._n_tokens, self._n_tokens + n))
        self._n_tokens += n
        return slots, pos.contiguous()

    def mark_padding(self, valid: torch.Tensor) -> None:
        """Mark padding among the newest ``valid.shape[1]`` tokens (still in full precision).

        Args:
            valid: bool ``[batch, n]``; False marks padding, which attention skips and
                per-channel key statistics ignore.
        """
        n = valid.shape[-1] if valid.dim() == 2 else -1
        if valid.dtype != torch.bool or list(valid.shape) != [self.batch_size, n] or not 0 < n <= self._n_tokens:
            raise ValueError(
                f"KVStore.mark_padding: valid must be bool [batch={self.batch_size}, n] with "
                f"0 < n <= {self._n_tokens} tokens held, got {valid.dtype} {list(valid.shape)}"
            )
        first = self._n_tokens - n
        if first < self.n_quantized:
            raise ValueError("KVStore.mark_padding: those tokens are already quantized; mark padding right after append")
        self._note_padding(first, valid)
        slot_of = {p: i for i, p in enumerate(self._slots)}
        idx = torch.tensor([slot_of[p] for p in range(first, self._n_tokens)], device=self.device)
        pos = self.fp_pos.index_select(1, idx)
        self.fp_pos[:, idx] = torch.where(valid.to(self.device), pos, -1)

    def quantize_blocks(self, bits: list[tuple[int, int]]) -> None:
        """Quantize the next ``len(bits)`` blocks of the window, oldest first, once each.

        Args:
            bits: (key bits, value bits) for each new block, 1-8 each.

        The block's tokens leave the full-precision slots unless they are pinned (then their
        quantized copy is excluded from attention until :meth:`unpin`).
        """
        if not bits:
            return
        for kb, vb in bits:
            if not (1 <= kb <= 8 and 1 <= vb <= 8):
                raise ValueError(f"KVStore.quantize_blocks: bits must be in [1, 8], got {(kb, vb)}")
        G, q0 = self.group_size, self.n_quantized
        n = len(bits) * G
        if q0 + n > self._n_tokens:
            raise ValueError(
                f"KVStore.quantize_blocks: {len(bits)} blocks need tokens up to position {q0 + n}, "
                f"but only {self._n_tokens} are held"
            )
        slot_of = {p: i for i, p in enumerate(self._slots)}
        idx = torch.tensor([slot_of[p] for p in range(q0, q0 + n)], device=self.device)
        keys = self.k_fp.index_select(2, idx)
        values = self.v_fp.index_select(2, idx)
        pad = self.fp_pos.index_select(1, idx) < 0  # [B, n]
        if pad.any():
            keys = self._neutralize_padding(keys, pad)

        nb0 = len(self._block_bits)
        D = self.head_dim
        k_need = self._k_bytes + sum(G * D * kb // 8 for kb, _ in bits)
        v_need = self._v_bytes + sum(G * D * vb // 8 for _, vb in bits)
        self._ensure_blocks(nb0 + len(bits), k_need, v_need)
        start = 0
        while start < len(bits):  # one kernel call per run of equal widths
            end = start
            while end < len(bits) and bits[end] == bits[start]:
                end += 1
            self._write_run(keys, values, start, end, nb0, bits[start])
            start = end
        self._block_bits.extend(bits)
        sl = slice(q0 - self._q_offset, q0 - self._q_offset + n)  # quantized token index
        pinned = torch.tensor([p in self._pinned for p in range(q0, q0 + n)], device=self.device)
        self.q_exclude[:, sl] = pad | pinned
        self._drop_slots({p for p in range(q0, q0 + n) if p not in self._pinned})

    def _neutralize_padding(self, keys: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Give padded tokens a key inside the range of the block's real tokens, per channel.

        Keys are quantized per channel over a block's tokens, so a padding token's key would
        otherwise stretch the min/max of every channel (left padding poisons per-channel
        statistics). Padding is never attended to, so its stored value does not matter.
        """
        B, H, n, D = keys.shape
        G = self.group_size
        blocks = keys.reshape(B, H, n // G, G, D)
        real = ~pad.reshape(B, 1, n // G, G, 1)
        lowest = blocks.masked_fill(~real, float("inf")).amin(dim=3, keepdim=True)
        lowest = torch.where(lowest.isfinite(), lowest, torch.zeros_like(lowest))
        return torch.where(real, blocks, lowest).reshape(B, H, n, D)

    def _write_run(self, keys, values, start, end, nb0, widths) -> None:
        """Quantize blocks [start, end) of the new tokens, all of widths (kb, vb), into the pools."""
        kb, vb = widths
        G, vg = self.group_size, self.value_group_size
        B, H = self.batch_size, self.kv_heads
        k = keys[:, :, start * G : end * G]
        v = values[:, :, start * G : end * G]
        b0, b1 = nb0 + start, nb0 + end
        t0, t1 = b0 * G, b1 * G
        k_dense, k_oi, k_ov = self._split(k, self.key_outliers)
        v_dense, v_oi, v_ov = self._split(v, self.value_outliers)
        kc, ks, kz = ops.quantize(k_dense, kb, G, 2, self.scale_dtype)
        vc, vs, vz = ops.quantize(v_dense, vb, vg, 3, self.scale_dtype)
        nk, nv = kc[0, 0].numel(), vc[0, 0].numel()
        self.k_codes[:, :, self._k_bytes : self._k_bytes + nk] = kc.reshape(B, H, nk)
        self.v_codes[:, :, self._v_bytes : self._v_bytes + nv] = vc.reshape(B, H, nv)
        self._k_bytes += nk
        self._v_bytes += nv
        self.k_scale[:, :, b0:b1] = ks
        self.k_zero[:, :, b0:b1] = kz
        self.v_scale[:, :, t0:t1] = vs
        self.v_zero[:, :, t0:t1] = vz
        self.k_bits[b0:b1] = kb
        self.v_bits[b0:b1] = vb
        if k_oi is not None:
            # Store corrections, not the raw outliers: attention adds them to what the codes
            # reconstruct at those channels, which restores the exact value.
            k_hat = ops.dequantize(kc, ks, kz, kb, G, 2, torch.float32)
            self.k_outlier_index[:, :, t0:t1] = k_oi
            self.k_outlier_value[:, :, t0:t1] = (k_ov.float() - k_hat.gather(-1, k_oi.long())).to(self.dtype)
        if v_oi is not None:
            v_hat = ops.dequantize(vc, vs, vz, vb, vg, 3, torch.float32)
            self.v_outlier_index[:, :, t0:t1] = v_oi
            self.v_outlier_value[:, :, t0:t1] = (v_ov.float() - v_hat.gather(-1, v_oi.long())).to(self.dtype)

    @staticmethod
    def _split(x: torch.Tensor, o: Outliers):
        if o.count == 0:
            return x, None, None
        return ops.outlier_split(x, o.low, o.high)

    def _drop_slots(self, positions: set[int]) -> None:
        """Remove full-precision slots holding `positions`, compacting the rest in place."""
        if not positions:
            return
        keep = [i for i, p in enumerate(self._slots) if p not in positions]
        f, n = len(self._slots), len(keep)
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.k_fp[:, :, :n] = self.k_fp.index_select(2, idx)
        self.v_fp[:, :, :n] = self.v_fp.index_select(2, idx)
        self.fp_pos[:, :n] = self.fp_pos.index_select(1, idx)
        self.fp_pos[:, n:f] = -1
        self._slots = [self._slots[i] for i in keep]
        cap = self.k_fp.shape[2]
        if cap > 2 * n + 64 and not self._fixed:  # e.g. after a long prefill: give the slack back
            new = max(n, 1)
            self.k_fp = self.k_fp[:, :, :new].clone()
            self.v_fp = self.v_fp[:, :, :new].clone()
            self.fp_pos = self.fp_pos[:, :new].clone()

    def _note_padding(self, first: int, valid: torch.Tensor) -> None:
        """Extend each row's leading padding with the new tokens `first`.. marked invalid."""
        for b, row in enumerate(valid.tolist()):
            if self._lead_pad[b] == first:  # everything before is padding
                self._lead_pad[b] += row.index(True) if True in row else len(row)

    # ---- sliding window --------------------------------------------------------------------

    def evict(self, first_query: int) -> None:
        """Sliding-window store: no query before position `first_query` will come, so drop what
        the queries from there on cannot see (nothing without a window).

        Full-precision tokens (pinned ones too: their pins go) older than :attr:`window_start`
        are dropped, quantized blocks entirely older are freed and the held blocks move down the
        pools. Tokens older than it that were never quantized are skipped: :attr:`n_quantized`
        jumps past them. :meth:`append` calls this with the first new position.
        """
        if self.window is None:
            return
        if not 0 <= first_query <= self._n_tokens:
            raise ValueError(f"KVStore.evict: first_query must be in [0, {self._n_tokens}], got {first_query}")
        self._horizon = max(self._horizon, first_query)
        cut = self.window_start
        G = self.group_size
        gone = {p for p in self._slots if p < cut}
        self._pinned = {p for p in self._pinned if p >= cut}
        n_free = min(len(self._block_bits), max(0, (cut - self._q_offset) // G))
        if n_free:
            self._free_blocks(n_free)
        if self.n_quantized < cut:  # no block left: the next block starts at the window
            self._q_offset = cut
        self._drop_slots(gone)

    def _free_blocks(self, k: int) -> None:
        """Free the `k` oldest blocks: the others move to the front of every block tensor."""
        G, D = self.group_size, self.head_dim
        m = len(self._block_bits) - k
        k_gone = sum(G * D * kb // 8 for kb, _ in self._block_bits[:k])
        v_gone = sum(G * D * vb // 8 for _, vb in self._block_bits[:k])

        def shift(t: torch.Tensor, dim: int, start: int, length: int, fill) -> None:
            # [start, start + length) -> [0, length), then clear the tail it vacated; the clone
            # because source and destination overlap
            if length:
                t.narrow(dim, 0, length).copy_(t.narrow(dim, start, length).clone())
            t.narrow(dim, length, start).fill_(fill)

        shift(self.k_codes, 2, k_gone, self._k_bytes - k_gone, 0)
        shift(self.v_codes, 2, v_gone, self._v_bytes - v_gone, 0)
        for t in (self.k_bits, self.v_bits):
            shift(t, 0, k, m, 0)
        for t in (self.k_scale, self.k_zero):
            shift(t, 2, k, m, 0)
        shift(self.q_exclude, 1, k * G, m * G, False)
        for t in (self.v_scale, self.v_zero, self.k_outlier_index, self.k_outlier_value,
                  self.v_outlier_index, self.v_outlier_value):
            if t is not None:
                shift(t, 2, k * G, m * G, 0)
        self._block_bits = self._block_bits[k:]
        self._k_bytes -= k_gone
        self._v_bytes -= v_gone
        self._q_offset += k * G
        if not self._fixed and self.k_bits.shape[0] > 2 * m + 4:  # e.g. after a long prefill
            self._shrink_blocks(max(m, 1))

    def _shrink_blocks(self, blocks: int) -> None:
        """Give back block capacity beyond `blocks` blocks and the code bytes in use."""
        G = self.group_size
        self.k_codes = self.k_codes[:, :, : self._k_bytes].clone()
        self.v_codes = self.v_codes[:, :, : self._v_bytes].clone()
        self.k_bits, self.v_bits = self.k_bits[:blocks].clone(), self.v_bits[:blocks].clone()
        self.k_scale = self.k_scale[:, :, :blocks].clone()
        self.k_zero = self.k_zero[:, :, :blocks].clone()
        self.q_exclude = self.q_exclude[:, : blocks * G].clone()
        for name in ("v_scale", "v_zero", "k_outlier_index", "k_outlier_value", "v_outlier_index",
                     "v_outlier_value"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:, :, : blocks * G].clone())

    # ---- pinning ---------------------------------------------------------------------------

    def pin(self, positions) -> None:
        """Keep these tokens in full precision; they must still be held in full precision."""
        positions = set(int(p) for p in positions)
        future = sorted(p for p in positions if not 0 <= p < self._n_tokens)
        if future:
            raise ValueError(f"KVStore.pin: positions {future[:8]} are not held (the store holds 0..{self._n_tokens - 1})")
        missing = positions - set(self._slots)
        if missing:
            raise ValueError(
                f"KVStore.pin: positions {sorted(missing)[:8]} are no longer held in full "
                "precision (already quantized); pin tokens before they leave the window"
            )
        self._pinned |= positions

    def sink_positions(self, n: int) -> set[int]:
        """Positions of every batch row's first `n` real tokens (after its leading padding),
        united over the batch, among those held and still visible. Pinning them keeps each
        row's attention sinks in full precision; rows with different padding make the union
        wider than `n` (a position pinned for one row is full precision for all rows)."""
        first, end = self.window_start, self._n_tokens
        return {p for lead in set(self._lead_pad) for p in range(max(lead, first), min(lead + n, end))}

    def unpin(self, positions) -> None:
        """Release pinned tokens: already-quantized ones fall back to their quantized copy."""
        positions = set(int(p) for p in positions) & self._pinned
        self._pinned -= positions
        quantized = {p for p in positions if p < self.n_quantized}
        if quantized:
            idx = torch.tensor([p - self._q_offset for p in sorted(quantized)], device=self.device)
            # A padding token stays excluded: its fp slot holds -1 for that batch row.
            slot_of = {p: i for i, p in enumerate(self._slots)}
            slots = torch.tensor([slot_of[p] for p in sorted(quantized)], device=self.device)
            self.q_exclude[:, idx] = self.fp_pos.index_select(1, slots) < 0
            self._drop_slots(quantized)

    # ---- reading ---------------------------------------------------------------------------

    def fp_tokens(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, len(positions), head_dim]`` of tokens held in full
        precision (a copy), e.g. for a policy to size the widths of the next blocks."""
        slot_of = {p: i for i, p in enumerate(self._slots)}
        missing = [p for p in positions if p not in slot_of]
        if missing:
            raise ValueError(f"KVStore.fp_tokens: positions {missing[:8]} are not held in full precision")
        idx = torch.tensor([slot_of[p] for p in positions], dtype=torch.long, device=self.device)
        return self.k_fp.index_select(2, idx), self.v_fp.index_select(2, idx)

    def fp_slot_stats(self, stats: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Split :meth:`attend`'s ``stats`` into (positions, values) of the full-precision slots."""
        q_cap = self.k_bits.shape[0] * self.group_size
        return list(self._slots), stats[:, :, q_cap : q_cap + len(self._slots)]

    def attend(
        self,
        query: torch.Tensor,
        scale: float | None = None,
        causal: bool = True,
        return_stats: bool = False,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of `query` ``[batch, q_heads, L, head_dim]`` over everything held.

        The queries are the last L tokens appended (causal: each sees positions up to its own;
        in a sliding-window store only the last :attr:`window` of them). `softcap` soft-caps the
        scaled scores (``c * tanh(s / c)``, Gemma 2). Returns ``(out, lse, stats)`` as
        :func:`torchkvq.ops.quant_attention`; ``stats`` columns are the quantized tokens
        ``[0, block capacity * group_size)`` (positions from :attr:`q_offset`) then the fp slots
        (see :attr:`fp_positions`).
        """
        if query.dim() != 4 or query.shape[2] > self._n_tokens:
            raise ValueError(
                f"KVStore.attend: query must be [batch, q_heads, L, head_dim] with L <= the "
                f"{self._n_tokens} tokens held (queries are the newest tokens), got {list(query.shape)}"
            )
        B, Hq, _, D = query.shape
        if B != self.batch_size or D != self.head_dim or Hq % self.kv_heads:
            raise ValueError(
                f"KVStore.attend: query {list(query.shape)} does not fit this store (batch "
                f"{self.batch_size}, a multiple of {self.kv_heads} heads, head_dim {self.head_dim}); "
                "queries must come from the batch and model that filled the store"
            )
        if self._n_tokens - query.shape[2] < self._horizon:
            raise ValueError(
                f"KVStore.attend: this sliding-window store dropped what queries before position "
                f"{self._horizon} would see; attend with at most the {self._n_tokens - self._horizon} "
                f"newest tokens as queries, got L = {query.shape[2]}"
            )
        if query.device != self.k_codes.device:
            raise ValueError(
                f"KVStore.attend: query is on {query.device} but the store is on {self.k_codes.device}; "
                "move the query to the store's device"
            )
        if self.window is not None and not causal:
            raise ValueError("KVStore.attend: a sliding-window store attends causally (causal=True)")
        if scale is None:
            scale = self.head_dim**-0.5
        return ops.quant_attention(
            query, self.k_codes, self.k_scale, self.k_zero, self.k_bits, self.v_codes,
            self.v_scale, self.v_zero, self.v_bits, self.k_fp, self.v_fp, self.fp_pos,
            self.q_exclude, self.k_outlier_index, self.k_outlier_value, self.v_outlier_index,
            self.v_outlier_value, self.group_size, self.value_group_size, scale, causal,
            return_stats, self._q_offset, self.window, softcap,
        )

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything held as float32 ``(keys, values, positions)`` in position order - for tests
        and debugging only: this is the full-precision copy attention never builds.

        Keys/values are ``[batch, kv_heads, n, head_dim]`` for the positions from the oldest
        held one (0 without a window) to the newest; for each position the full-precision copy
        wins over the quantized one. Padding comes back like any token, and so do dropped
        tokens between held ones (zeros) and out-of-window tokens of a block partly inside.
        """
        from . import reference

        D, q, o = self.head_dim, len(self._block_bits) * self.group_size, self._q_offset
        kq = reference.dequantize_blocks(self.k_codes, self.k_scale, self.k_zero, self.k_bits,
                                         self.group_size, None, D)[:, :, :q]
        vq = reference.dequantize_blocks(self.v_codes, self.v_scale, self.v_zero, self.v_bits,
                                         self.group_size, self.value_group_size, D)[:, :, :q]
        if self.k_outlier_index is not None:
            kq = kq.scatter_add(-1, self.k_outlier_index[:, :, :q].long(), self.k_outlier_value[:, :, :q].float())
        if self.v_outlier_index is not None:
            vq = vq.scatter_add(-1, self.v_outlier_index[:, :, :q].long(), self.v_outlier_value[:, :, :q].float())
        first = min(([o] if q else []) + self._slots, default=self._n_tokens) if self.window else 0
        keys = torch.zeros(self.batch_size, self.kv_heads, self._n_tokens - first, D)
        values = torch.zeros_like(keys)
        keys[:, :, o - first : o - first + q], values[:, :, o - first : o - first + q] = kq, vq
        for slot, p in enumerate(self._slots):
            keys[:, :, p - first] = self.k_fp[:, :, slot].float()
            values[:, :, p - first] = self.v_fp[:, :, slot].float()
        return keys, values, torch.arange(first, self._n_tokens)

    # ---- saving and restoring --------------------------------------------------------------

    def _used_views(self, blocks: int, k_bytes: int, v_bytes: int, slots: int) -> dict[str, torch.Tensor]:
        """Views of the parts of every tensor that hold `blocks` blocks and `slots` fp slots."""
        q = blocks * self.group_size
        views = {"k_bits": self.k_bits[:blocks], "v_bits": self.v_bits[:blocks],
                 "k_codes": self.k_codes[:, :, :k_bytes], "v_codes": self.v_codes[:, :, :v_bytes],
                 "k_scale": self.k_scale[:, :, :blocks], "k_zero": self.k_zero[:, :, :blocks],
                 "v_scale": self.v_scale[:, :, :q], "v_zero": self.v_zero[:, :, :q],
                 "q_exclude": self.q_exclude[:, :q], "k_fp": self.k_fp[:, :, :slots],
                 "v_fp": self.v_fp[:, :, :slots], "fp_pos": self.fp_pos[:, :slots]}
        for name in ("k_outlier_index", "k_outlier_value", "v_outlier_index", "v_outlier_value"):
            t = getattr(self, name)
            if t is not None:
                views[name] = t[:, :, :q]
        return views

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The store as ``(tensors, meta)``: what :meth:`from_state_dict` needs to rebuild it.

        ``tensors`` hold only what is in use (a file is not padded with capacity), as contiguous
        copies; ``meta`` is JSON-serializable: the constructor arguments, the bookkeeping and the
        capacities, so that a restored store has the same tensor shapes, hence computes
        bit-identical attention and grows at the same steps.
        """
        used = self._used_views(len(self._block_bits), self._k_bytes, self._v_bytes, len(self._slots))
        meta = {
            "batch_size": self.batch_size, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "dtype": str(self.dtype).removeprefix("torch."), "group_size": self.group_size,
            "value_group_size": self.value_group_size,
            "scale_dtype": str(self.scale_dtype).removeprefix("torch."),
            "key_outliers": [self.key_outliers.low, self.key_outliers.high],
            "value_outliers": [self.value_outliers.low, self.value_outliers.high],
            "block_bits": [list(b) for b in self._block_bits], "k_bytes": self._k_bytes,
            "v_bytes": self._v_bytes, "slots": list(self._slots), "pinned": sorted(self._pinned),
            "n_tokens": self._n_tokens, "fixed": self._fixed, "window": self.window,
            "q_offset": self._q_offset, "horizon": self._horizon, "lead_pad": list(self._lead_pad),
            "capacity": {"blocks": self.k_bits.shape[0], "k_bytes": self.k_codes.shape[2],
                         "v_bytes": self.v_codes.shape[2], "slots": self.k_fp.shape[2]},
        }
        return {n: t.detach().clone().contiguous() for n, t in used.items()}, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict,
                        device: torch.device | str = "cpu") -> "KVStore":
        """Rebuild a store saved with :meth:`state_dict` on `device`.

        Raises ValueError naming the first field or tensor that does not fit the saved
        configuration (a file from another version, or a damaged one); never returns a partial
        store.
        """
        def dtype(name: str) -> torch.dtype:
            d = getattr(torch, str(meta[name]), None)
            if not isinstance(d, torch.dtype):
                raise ValueError(f"KVStore.from_state_dict: {name} {meta[name]!r} is not a torch dtype")
            return d

        try:
            store = cls(
                meta["batch_size"], meta["kv_heads"], meta["head_dim"], dtype=dtype("dtype"),
                device=device, group_size=meta["group_size"], value_group_size=meta["value_group_size"],
                scale_dtype=dtype("scale_dtype"), key_outliers=Outliers(*meta["key_outliers"]),
                value_outliers=Outliers(*meta["value_outliers"]), window=meta["window"],
            )
            bits = [(int(k), int(v)) for k, v in meta["block_bits"]]
            slots, pinned = [int(p) for p in meta["slots"]], {int(p) for p in meta["pinned"]}
            n, fixed, cap = int(meta["n_tokens"]), bool(meta["fixed"]), meta["capacity"]
            q_off, horizon = int(meta["q_offset"]), int(meta["horizon"])
            lead_pad = [int(p) for p in meta["lead_pad"]]
            k_bytes, v_bytes = int(meta["k_bytes"]), int(meta["v_bytes"])
            caps = [int(cap[c]) for c in ("blocks", "k_bytes", "v_bytes", "slots")]
        except (KeyError, TypeError) as e:
            raise ValueError(f"KVStore.from_state_dict: meta lacks or mangles the field {e}") from None
        G, D = store.group_size, store.head_dim
        nb, q = len(bits), len(bits) * G
        # Positions after the quantized blocks that a query can still see are all in fp slots.
        start = max(q_off + q, 0 if store.window is None else horizon - store.window + 1)
        if not (all(1 <= k <= 8 and 1 <= v <= 8 for k, v in bits) and 0 <= q_off and q_off + q <= n
                and horizon <= n and len(lead_pad) == store.batch_size
                and k_bytes == sum(G * D * k // 8 for k, _ in bits)
                and v_bytes == sum(G * D * v // 8 for _, v in bits)
                and len(set(slots)) == len(slots) and all(0 <= p < n for p in slots)
                and pinned <= set(slots) and set(range(start, n)) <= set(slots)
                and caps[0] >= nb and caps[1] >= k_bytes and caps[2] >= v_bytes and caps[3] >= len(slots)):
            raise ValueError("KVStore.from_state_dict: the bookkeeping (block widths, byte counts, "
                             "slots, capacities) is inconsistent")
        store._ensure_blocks(caps[0], caps[1], caps[2], exact=True)
        store._ensure_slots(caps[3], exact=True)
        views = store._used_views(nb, k_bytes, v_bytes, len(slots))
        if set(tensors) != set(views):
            raise ValueError(f"KVStore.from_state_dict: expected tensors {sorted(views)}, got {sorted(tensors)}")
        for name, view in views.items():
            t = tensors[name]
            if t.shape != view.shape or t.dtype != view.dtype:
                raise ValueError(f"KVStore.from_state_dict: {name} must be {view.dtype} "
                                 f"{list(view.shape)}, got {t.dtype} {list(t.shape)}")
            view.copy_(t)
        store._block_bits, store._k_bytes, store._v_bytes = bits, k_bytes, v_bytes
        store._slots, store._pinned, store._n_tokens, store._fixed = slots, pinned, n, fixed
        store._q_offset, store._horizon, store._lead_pad = q_off, horizon, lead_pad
        return store
