"""Run kvq.quant_attention on one layer's store in a loop, for a sampling profiler.

One layer of a bench/attention.py shape (A: Llama-3-8B-like, 32 q / 8 kv heads, head_dim 128;
B: SmolLM2-135M, 9 q / 3 kv heads, head_dim 64) of T tokens in the KIVI store of
bench/attention.py (fp16 scales/zeros, the newest 128 tokens in an fp32 window), one decode
query, called N times on the same (cache-hot) data; prints the CPU time per call. Profile it
with e.g.

    OMP_NUM_THREADS=1 perf record -e cpu-clock -F 2000 -- python bench/profile_attention.py
    perf report --no-children --sort symbol

    python bench/profile_attention.py [--shape A] [--tokens 4096] [--bits 2] [--group 32] [--calls 400]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention as bench  # noqa: E402  (the store layout and the call, shared with the benchmark)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(bench.SHAPES), default="A")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--calls", type=int, default=400)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    shape = bench.SHAPES[args.shape]
    hq, hkv, d, R = shape["hq"], shape["hkv"], shape["d"], bench.R
    Tq = args.tokens - R
    kq, vq = (torch.randn(1, hkv, Tq, d, generator=gen) for _ in range(2))
    k_fp, v_fp = (torch.randn(1, hkv, R, d, generator=gen) for _ in range(2))
    layer = bench.build_quant_layer(kq, vq, args.bits, args.group, k_fp, v_fp,
                                    torch.arange(Tq, args.tokens)[None])
    q = torch.randn(1, hq, 1, d, generator=gen)
    bench.kvq_attend(q, layer)
    c0 = time.process_time()
    for _ in range(args.calls):
        bench.kvq_attend(q, layer)
    cpu_ms = (time.process_time() - c0) / args.calls * 1e3
    print(f"shape {args.shape}, T={args.tokens}, {args.bits}-bit G={args.group}, {torch.get_num_threads()} thread(s): "
          f"{cpu_ms:.2f} CPU ms per call")


if __name__ == "__main__":
    main()
