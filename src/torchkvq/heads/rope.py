"""Rotary position embedding as complex numbers, in transformers' ``rotate_half`` layout.

transformers' Llama-family models rotate each head vector ``x`` of size ``d`` as
``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[d/2:], x[:d/2])``: dims ``j``
and ``j + d/2`` form the rotary pair of frequency ``j`` (``0 <= j < d/2``). Writing
``z_j = x[j] + i x[j + d/2]``, RoPE at position ``p`` is ``z_j -> z_j * exp(i theta_j p)``.

A linear map that commutes with RoPE at every position must therefore act on each frequency
on its own and be complex-linear there: ``z'_j = sum_i c_ij z_ij`` (a 2x2 rotation-scaling per
head and pair). :func:`complex_rows` / :func:`real_rows` convert projection weights between
the two views.
"""

from __future__ import annotations

import torch

__all__ = ["complex_rows", "real_rows"]


def complex_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a projection ``[heads * d, ...]`` as complex rows ``[heads, d/2, ...]``.

    Row ``j`` of head ``h`` becomes ``w[h, j] + i w[h, j + d/2]``, so that the complex
    projection output is the rotary view ``z_j`` of the real one.
    """
    half = head_dim // 2
    w = w.reshape(-1, head_dim, *w.shape[1:])
    return torch.complex(w[:, :half], w[:, half:])


def real_rows(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`complex_rows`: ``[heads, d/2, ...]`` complex -> ``[heads * d, ...]`` real."""
    w = torch.cat([z.real, z.imag], dim=1)
    return w.reshape(-1, *w.shape[2:])
