"""XQuant and XQuant-CL (arXiv 2508.10395): cache the attention layer's input, not K and V.

* :class:`XQuant` caches each layer's post-norm input X quantized per token (MHA, where X has
  half the channels of K and V), or for GQA models - where X is wider than K and V together -
  the low-rank latents ``X·U_k`` and ``X·U_v`` from an offline SVD of ``W_k`` and ``W_v``
  (rank = kv dimension, so nothing is lost before quantization). Attention rematerializes K
  (RoPE at each token's position) and V with ``kvq.remat_kv``.
* :class:`XQuantCL` caches, per layer, the quantized difference between the residual stream
  entering the layer and an accumulator of the dequantized differences of the earlier layers;
  the decoder rebuilds the same accumulator, applies the layer's input norm and projects. The
  residual stream (the decoder layer's input, before its norm) rather than the post-norm X:
  on the bundled SmolLM2 its layer-to-layer differences are narrower, which halves the key
  error at 2 bits (docs/xquant.md gives the measurement).

Both keep the newest tokens in a full-precision window and quantize the oldest ones in blocks of
`block` tokens once the window exceeds `residual` tokens. The store layer
(:mod:`torchkvq.remat`) does the work; these classes hold the hyper-parameters and the flush
rule. They need the model's weights, so they run through :class:`torchkvq.hf.XQuantCache`
(``torchkvq.hf.enable(model, XQuant(...))`` returns one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..store import KVStore
from .base import Policy


@dataclass
class XQuant(Policy):
    """Cache X (MHA) or its SVD latents (GQA) per token at `bits`, newest tokens in fp.

    Args:
        bits: code width, 1-8.
        group_size: channels per (scale, zero) group of a token's vector (multiple of 8
            dividing the cached width: hidden size for X, kv dimension for latents).
        residual: full-precision window: at least this many newest tokens stay unquantized.
        block: tokens quantized at once (the window holds residual .. residual + block - 1).
        mode: ``"x"``, ``"latent"`` or ``"auto"`` (X when hidden <= 2 kv_dim, else latents).
        absorb_values: attention computes ``(Σ_t p_t·X̂_t)·W_vᵀ`` instead of rebuilding V.
        scale_dtype: float16 or float32 scales and zeros.
        window_dtype: dtype of the window.
    """

    bits: int = 4
    group_size: int = 64
    residual: int = 128
    block: int = 32
    mode: str = "auto"
    absorb_values: bool = False
    scale_dtype: torch.dtype = torch.float16
    window_dtype: torch.dtype | None = torch.float16

    @property
    def name(self) -> str:
        return f"xquant-{self.bits}"

    def bits_for(self, layer: int) -> int:
        """Code width of layer `layer`."""
        return self.bits

    def resolve_mode(self, hidden: int, kv_dim: int) -> str:
        """The cached form for a layer with `hidden` input channels and K/V of `kv_dim` each."""
        if self.mode != "auto":
            return self.mode
        return "x" if hidden <= 2 * kv_dim else "latent"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if not 1 <= self.bits <= 8:
            raise ValueError(f"{name}: bits must be in [1, 8], got {self.bits}")
        if self.residual < 0 or self.block < 1:
            raise ValueError(f"{name}: residual must be >= 0 and block >= 1, got {self.residual} and {self.block}")
        if self.mode not in ("auto", "x", "latent"):
            raise ValueError(f"{name}: mode must be 'auto', 'x' or 'latent', got {self.mode!r}")

    def make_store(self, batch_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str, window: int | None = None) -> KVStore:
        raise TypeError(
            f"{type(self).__name__} caches the layer input, not keys and values: use "
            "torchkvq.hf.enable(model, policy) or torchkvq.hf.XQuantCache(model, policy)"
        )

    def after_append(self, store: Any, state: Any) -> None:
        ready = max(0, (store.n_tokens - self.residual - store.n_quantized) // self.block)
        store.flush(ready * self.block)  # XQuant-CL advances its accumulator even when 0


@dataclass
class XQuantCL(XQuant):
    """XQuant-CL: per layer, the quantized delta of the residual stream to the accumulator.

    Args (besides :class:`XQuant`'s; `mode` is ignored: the residual stream is cached):
        first_layers: how many leading layers use `first_bits` instead of `bits` (their deltas
            are the whole embedding and the first large update; on the bundled model two 4-bit
            layers cut the 2-bit KL in half for 4% more bytes, see docs/xquant.md).
        first_bits: their width (never below `bits`).
    """

    bits: int = 2
    residual: int = 32
    first_layers: int = 2
    first_bits: int = 4

    @property
    def name(self) -> str:
        return f"xquant-cl-{self.bits}"

    def bits_for(self, layer: int) -> int:
        return max(self.first_bits, self.bits) if layer < self.first_layers else self.bits

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.first_bits <= 8 or self.first_layers < 0:
            raise ValueError(f"XQuantCL: first_bits must be in [1, 8] and first_layers >= 0, got "
                             f"{self.first_bits} and {self.first_layers}")
