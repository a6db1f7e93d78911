"""Shared test configuration and helpers for the torchkvq test suite.

* Hypothesis profiles: ``ci`` (default; no deadline, few examples so the suite stays fast on
  2 cores) and ``thorough`` (more examples). Pick one with ``HYPOTHESIS_PROFILE=thorough``.
* ``make_x``: seeded random tensors that are never all zeros (so every group has a range
  unless a test builds constant groups on purpose).
"""

from __future__ import annotations

import os

import pytest
import torch

try:  # hypothesis is a test dependency, but let plain-pytest files collect without it
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    settings = None

import torchkvq  # noqa: F401  (registers torch.ops.kvq.*)

if settings is not None:
    settings.register_profile(
        "ci",
        deadline=None,
        max_examples=25,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def random_tensor(
    shape,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``randn(shape) * scale + offset`` from a private generator seeded with `seed`, cast to
    `dtype`; never all zeros (a zero tensor is replaced by a ramp)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float32) * scale + offset
    x = x.to(dtype)
    if x.numel() > 0 and not bool(x.ne(0).any()):
        x = (torch.arange(x.numel(), dtype=torch.float32).reshape(shape) + 1).to(dtype)
    return x.to(device)


@pytest.fixture(scope="session")
def make_x():
    """The :func:`random_tensor` helper as a (session-scoped, hypothesis-safe) fixture."""
    return random_tensor
