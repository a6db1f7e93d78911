"""torchkvq: compressed KV caches for decoder-only LLMs.

Importing the package loads the compiled kernels (``torch.ops.kvq.*``) and registers their
fake implementations so that every op works under ``torch.compile``.
"""

import torch

from . import _C  # noqa: F401  (registers torch.ops.kvq.* from csrc/)
from . import _meta  # noqa: F401  (registers the fakes)
from . import ops, reference

__all__ = ["ops", "reference", "cuda_available"]
__version__ = "0.1.0"


def cuda_available() -> bool:
    """Whether this build of torchkvq has CUDA kernels and a CUDA device is present."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kvq::quantize", "CUDA"
    )
