"""XQuant's per-layer store: per-token quantized vectors (the layer input X, its low-rank latents,
or XQuant-CL's cross-layer deltas) and a full-precision window of the newest tokens.

Unlike :class:`~torchkvq.store.KVStore` there are no keys and values here: attention rebuilds
them from what is stored (see :mod:`torchkvq.remat`). Each token's vector of ``width`` channels
is quantized once, per token, in groups of ``group_size`` channels (``kvq.quantize`` along the
last axis), oldest first; the newest tokens wait in the window. Tensors grow geometrically, so
appending never copies the whole store at every step.
"""

from __future__ import annotations

import torch

from . import ops

_GROWTH = 1.25


def _grow(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class XStore:
    """Per-token quantized vectors of one layer plus a full-precision window.

    Args:
        batch_size: rows of the batch.
        width: channels per token (a multiple of `group_size`).
        bits: code width of the quantized tokens, 1-8.
        group_size: channels per (scale, zero) group, a multiple of 8.
        window_dtype: dtype of the window (the newest tokens, not yet quantized).
        scale_dtype: float16 or float32 scales and zeros.
        device: where every tensor lives.
    """

    def __init__(self, batch_size: int, width: int, *, bits: int, group_size: int,
                 window_dtype: torch.dtype = torch.float16,
                 scale_dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu") -> None:
        if batch_size < 1 or width < 1:
            raise ValueError(f"XStore: batch_size and width must be >= 1, got {batch_size} and {width}")
        if not 1 <= bits <= 8:
            raise ValueError(f"XStore: bits must be in [1, 8], got {bits}")
        if group_size < 8 or group_size % 8 or width % group_size:
            raise ValueError(f"XStore: group_size must be a multiple of 8 dividing width {width}, got {group_size}")
        if window_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"XStore: window_dtype must be float32, float16 or bfloat16, got {window_dtype}")
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"XStore: scale_dtype must be float16 or float32, got {scale_dtype}")
        self.batch_size, self.width, self.bits, self.group_size = batch_size, width, bits, group_size
        self.window_dtype, self.scale_dtype, self.device = window_dtype, scale_dtype, torch.device(device)
        B, dev = batch_size, self.device
        self.codes = torch.zeros(B, 0, width * bits // 8, dtype=torch.uint8, device=dev)
        self.scale = torch.zeros(B, 0, width // group_size, dtype=scale_dtype, device=dev)
        self.zero = torch.zeros_like(self.scale)
        self.window = torch.zeros(B, 0, width, dtype=window_dtype, device=dev)
        self._n_quantized = 0
        self._n_window = 0

    @property
    def n_tokens(self) -> int:
        return self._n_quantized + self._n_window

    @property
    def n_quantized(self) -> int:
        """Tokens held quantized: positions ``[0, n_quantized)``; the window holds the rest."""
        return self._n_quantized

    def append(self, x: torch.Tensor) -> None:
        """Add tokens ``x [batch, n, width]`` (finite floats) to the window, cast to its dtype.
        Every check (:meth:`check_append`) comes before the first write: a failed append leaves
        the store unchanged."""
        self.check_append(x)
        self.write(x)

    def write(self, x: torch.Tensor) -> None:
        """:meth:`append` without its checks, for a caller that ran :meth:`check_append` on `x`."""
        n, f = x.shape[1], self._n_window
        if f + n > self.window.shape[1]:
            self.window = _grow(self.window, 1, max(f + n, int(self.window.shape[1] * _GROWTH), 16))
        self.window[:, f : f + n] = x
        self._n_window += n

    def check_append(self, x: torch.Tensor, check_finite: bool = True) -> None:
        """Raise what :meth:`append` would raise for `x`, changing nothing (so that a caller
        appending to several stores can check them all before writing to any). ``check_finite=
        False`` skips the NaN/Inf pass, for a caller that has just run it on this very tensor."""
        B, W = self.batch_size, self.width
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"XStore.append: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[0] != B or x.shape[2] != W or x.shape[1] == 0:
            raise ValueError(f"XStore.append: x must be [batch={B}, n >= 1, width={W}], got {list(x.shape)}")
        # Same rules as KVStore.append: no silent cast of integers or float64, no cross-device copy.
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"XStore.append: x must be float32, float16 or bfloat16, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"XStore.append: x is on {x.device} but the store is on {self.device}")
        if check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("XStore.append: x contains NaN or Inf; the store was left unchanged")
        if x.dtype != self.window_dtype and bool(x.abs().amax() > torch.finfo(self.window_dtype).max):
            raise ValueError(
                f"XStore.append: x holds values beyond {self.window_dtype}'s range (the window's "
                "dtype), which would become Inf; use a wider window_dtype. The store was left unchanged"
            )

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(codes, scale, zero)`` of the quantized tokens (views, ``[batch, n_quantized, ...]``)."""
        q = self._n_quantized
        return self.codes[:, :q], self.scale[:, :q], self.zero[:, :q]

    def window_tokens(self) -> torch.Tensor:
        """The window ``[batch, n_tokens - n_quantized, width]`` (a view)."""
        return self.window[:, : self._n_window]

    def quantize_oldest(self, n: int, base: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize the `n` oldest window tokens once and move them out of the window.

        Args:
            n: tokens to quantize (<= the window's size).
            base: optional float32 ``[batch, n, width]`` subtracted first: XQuant-CL stores the
                difference to the accumulator of the earlier layers.

        Returns:
            The float32 values the decoder will see for those tokens (``dequantize(codes)``,
            plus nothing else), so a caller can update an accumulator with exactly them.
        """
        if not 0 < n <= self._n_window:
            raise ValueError(f"XStore.quantize_oldest: n must be in [1, {self._n_window}], got {n}")
        x = self.window[:, :n].float()
        if base is not None:
            x = x - base
        codes, scale, zero = ops.quantize(x, self.bits, self.group_size, -1, self.scale_dtype)
        q = self._n_quantized
        if q + n > self.codes.shape[1]:
            new = max(q + n, int(self.codes.shape[1] * _GROWTH))
            self.codes, self.scale, self.zero = (_grow(t, 1, new) for t in (self.codes, self.scale, self.zero))
        self.codes[:, q : q + n], self.scale[:, q : q + n], self.zero[:, q : q + n] = codes, scale, zero
        rest = self._n_window - n
        self.window[:, :rest] = self.window[:, n : n + rest].clone()
        if self.window.shape[1] > 2 * rest + 64:  # e.g. after a long prefill: give the slack back
            self.window = self.window[:, : max(rest, 1)].clone()
        self._n_quantized += n
        self._n_window = rest
        return ops.dequantize(codes, scale, zero, self.bits, self.group_size, -1, torch.float32)

    def nbytes(self) -> int:
        """Bytes of every tensor held, capacity included."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.window))

    def nbytes_breakdown(self) -> dict[str, int]:
        """``codes``, ``scales`` (scales and zeros), ``fp_window`` in use, ``reserved`` capacity."""
        B, q = self.batch_size, self._n_quantized
        used = {
            "codes": B * q * self.codes.shape[2],
            "scales": 2 * B * q * self.scale.shape[2] * self.scale.element_size(),
            "fp_window": B * self._n_window * self.width * self.window.element_size(),
        }
        used["reserved"] = self.nbytes() - sum(used.values())
        return used
