"""CUDA kernel of kvq::remat_kv against the CPU kernel.

The CUDA kernel accumulates in float32 in another order than the CPU kernel's GEMM, so it is
held to a FlashAttention-style bound: its error against a float64 ground truth is at most twice
the CPU kernel's error plus a small tolerance. RoPE, bias and every width 1-8 are swept.
"""

from __future__ import annotations

import pytest
import torch

import torchkvq

from store_factory import assert_flash_close
from test_remat import make_case, truth_f64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torchkvq.cuda_available(), reason="needs a CUDA device and torchkvq built with CUDA"
    ),
]

remat_kv = torch.ops.kvq.remat_kv


def _cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rope", [False, True])
def test_matches_cpu(bits, dtype, rope):
    args, x = make_case(N=2, T=77, d=192, n_out=200 if not rope else 192, bits=bits,
                        group_size=64, dtype=dtype, bias=bits % 2 == 0, hd=64 if rope else 0,
                        rope_heads=2, seed=bits)
    cpu = remat_kv(*args)
    got = remat_kv(*_cuda(args)).cpu()
    assert got.dtype == dtype and got.shape == cpu.shape
    assert_flash_close(got, cpu, truth_f64(args, x), "out")


def test_opcheck_cuda():
    args, _ = make_case(N=1, T=40, d=64, n_out=64, bits=3, group_size=32, dtype=torch.float16,
                        bias=True, hd=32, rope_heads=1, seed=3)
    torch.library.opcheck(remat_kv.default, _cuda(args))
