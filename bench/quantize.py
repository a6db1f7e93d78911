"""Throughput of kvq::quantize / kvq::dequantize against plain eager PyTorch (torchkvq.reference).

KV-shaped inputs ([1, 32, 4096, 128] by default): keys quantized per channel (groups along
tokens, axis=2), values per token (groups along channels, axis=-1), bits 2/4/8, fp16 and fp32.

GB/s are bytes of the floating-point tensor (the quantize input, the dequantize output) per
second; "traffic GB/s" adds the packed codes and the scale/zero bytes the op also moves, to be
read against the machine's read bandwidth measured here with a large ``sum()``.

Caches: every timed call works on a different tensor of a pool whose total size is at least
twice the last-level cache (``--cache-mib``, default max(sysfs L3, 260 MiB) on CPU), and the
last outputs are kept alive over the same span so no call writes into a block the previous one
just freed. So no call finds its data in cache, as when decoding walks every layer's cache.

    python bench/quantize.py [--device cpu|cuda] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import statistics
import sys
import time

# OpenMP's default active waiting makes every parallel region wait for a descheduled worker on
# a shared 2-vCPU machine; passive waiting is what a loaded machine needs (set before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import torchkvq  # noqa: E402
from torchkvq import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

MiB = 1 << 20
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    info = {
        "cpu_model": machine.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "sysfs_llc_mib": machine.llc_mib(),
        "torch_version": torch.__version__,
        "torchkvq_version": torchkvq.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": machine.now(),
        "device": device,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30,
                    gpu_l2_mib=getattr(p, "L2_cache_size", 0) / MiB, cuda=torch.version.cuda)
    return info


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Pool:
    """Distinct inputs handed out round-robin; the cursor survives across measurements so the
    next call always gets the least recently used item."""

    def __init__(self, items):
        self.items, self.cursor = items, 0

    def __len__(self):
        return len(self.items)

    def next(self):
        item = self.items[self.cursor % len(self.items)]
        self.cursor += 1
        return item


CPU_TIMES: list[float] = []  # process CPU seconds of the last time_calls, call by call


def time_calls(fn, pool: Pool, calls: int, warmup: int, keep: int, device: str) -> list[float]:
    """Wall seconds of `calls` calls of fn(item), each on the next item of `pool`, after
    `warmup` untimed ones (process CPU seconds go to CPU_TIMES). The last `keep` results stay
    alive so outputs never reuse a block that was just written."""
    ring = collections.deque(maxlen=max(keep, 1))
    times = []
    CPU_TIMES.clear()
    for i in range(warmup + calls):
        item = pool.next()
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(item)
        sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        ring.append(out)
        if i >= warmup:
            times.append(dt)
            CPU_TIMES.append(dc)
    return times


def pool_len(item_bytes: int, cache_bytes: int) -> int:
    return max(2, math.ceil(2 * cache_bytes / item_bytes))


def read_bandwidth(device: str, cache_bytes: int, repeats: int) -> dict:
    """GB/s of float32 sum() over tensors that together exceed twice the cache."""
    n = 64 * MiB // 4  # 64 MiB per tensor
    pool = Pool([torch.rand(n, device=device) for _ in range(pool_len(n * 4, cache_bytes))])
    times = time_calls(lambda t: t.sum(), pool, calls=max(repeats, len(pool)), warmup=2,
                       keep=0, device=device)
    med = statistics.median(times)
    return {"bytes_per_call": n * 4, "pool_tensors": len(pool), "median_s": med,
            "gbps": n * 4 / med / 1e9, "times_s": times}


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def packed_sizes(shape, axis, bits, group_size, scale_bytes=2):
    numel = math.prod(shape)
    ax = axis % len(shape)
    codes = numel * bits // 8
    meta = 2 * (numel // group_size) * scale_bytes
    return codes, meta, ax


def run(args) -> dict:
    device = args.device
    shape = args.shape
    g = args.group_size
    cache_mib = args.cache_mib
    if cache_mib is None:
        if device == "cuda":
            cache_mib = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * MiB) / MiB
        else:
            cache_mib = max(machine.llc_mib() or 0, 260.0)
    cache = int(cache_mib * MiB)
    gen = torch.Generator(device="cpu").manual_seed(0)

    info = machine_info(device)
    bw = read_bandwidth(device, cache, args.repeats)
    print(f"# {info['cpu_model']}, {info['cpu_count']} cores ({info['torch_threads']} torch threads), "
          f"torch {info['torch_version']}, torchkvq {info['torchkvq_version']}, {info['date']}")
    if info["load_average_1_5_15"]:
        print(f"# load average at start: {info['load_average_1_5_15'][0]:.2f} (other processes "
              f"competing for the cores make every figure slower and noisier)")
    print(f"# device {device}; shape {shape}, group size {g}, scale/zero fp16; "
          f"cache assumed {cache_mib:.0f} MiB (sysfs LLC {info['sysfs_llc_mib']} MiB)")
    print(f"# every timed call reads a distinct tensor from a pool >= 2x that cache and the last "
          f"outputs (>= 2x cache) stay alive; medians of {args.repeats} calls (baseline "
          f"{args.baseline_repeats}) after warm-up")
    print(f"# read bandwidth (fp32 sum over {bw['pool_tensors']} x 64 MiB): {bw['gbps']:.1f} GB/s")

    rows = []
    layouts = [("K", 2), ("V", -1)]
    for dname, dtype in DTYPES.items():
        esize = torch.empty((), dtype=dtype).element_size()
        fp_bytes = math.prod(shape) * esize
        # quantize: a pool of distinct fp tensors
        xs = Pool([torch.randn(shape, generator=gen).to(dtype).to(device)
                   for _ in range(pool_len(fp_bytes, cache))])
        for kv, axis in layouts:
            for bits in args.bits:
                codes_b, meta_b, _ = packed_sizes(shape, axis, bits, g)
                keep = pool_len(codes_b + meta_b, cache)
                k = time_calls(lambda x: torch.ops.kvq.quantize(x, bits, g, axis), xs,
                               args.repeats, args.warmup, keep, device)
                kc = list(CPU_TIMES)
                b = time_calls(lambda x: reference.quantize(x, bits, g, axis), xs,
                               args.baseline_repeats, 1, keep, device)
                rows.append(_row("quantize", kv, dname, axis, bits, g, shape, fp_bytes,
                                 codes_b, meta_b, k, b, len(xs), kc, list(CPU_TIMES)))
                _print_row(rows[-1], header=len(rows) == 1)
        del xs
        # dequantize: a pool of distinct packed tensors (random codes are valid bit streams)
        for kv, axis in layouts:
            for bits in args.bits:
                codes_b, meta_b, ax = packed_sizes(shape, axis, bits, g)
                cshape = list(shape)
                cshape[ax] = shape[ax] * bits // 8
                sshape = list(shape)
                sshape[ax] = shape[ax] // g
                pool = Pool([
                    (
                        torch.randint(0, 256, cshape, generator=gen, dtype=torch.uint8).to(device),
                        (torch.rand(sshape, generator=gen) * 0.1).half().to(device),
                        torch.randn(sshape, generator=gen).half().to(device),
                    )
                    for _ in range(pool_len(codes_b + meta_b, cache))
                ])
                keep = pool_len(fp_bytes, cache)
                k = time_calls(lambda c: torch.ops.kvq.dequantize(*c, bits, g, axis, dtype), pool,
                               args.repeats, args.warmup, keep, device)
                kc = list(CPU_TIMES)
                b = time_calls(lambda c: reference.dequantize(*c, bits, g, axis, dtype), pool,
                               args.baseline_repeats, 1, keep, device)
                rows.append(_row("dequantize", kv, dname, axis, bits, g, shape, fp_bytes,
                                 codes_b, meta_b, k, b, len(pool), kc, list(CPU_TIMES)))
                _print_row(rows[-1])
                del pool

    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = list(os.getloadavg())
    return {
        "benchmark": "bench/quantize.py",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": info,
        "config": {"shape": shape, "group_size": g, "bits": args.bits, "scale_dtype": "float16",
                   "repeats": args.repeats, "baseline_repeats": args.baseline_repeats,
                   "warmup": args.warmup, "cache_mib_assumed": cache_mib,
                   "cache_policy": "distinct tensors cycled, pool >= 2x cache; outputs kept "
                   "alive over >= 2x cache",
                   "baseline": "torchkvq.reference (plain eager PyTorch)"},
        "read_bandwidth": bw,
        "results": rows,
    }


def _row(op, kv, dname, axis, bits, g, shape, fp_bytes, codes_b, meta_b, k, b, pool, kc, bc):
    km, bm = statistics.median(k), statistics.median(b)
    kcm, bcm = statistics.median(kc), statistics.median(bc)
    return {
        "op": op, "tensor": kv, "dtype": dname, "axis": axis, "bits": bits, "group_size": g,
        "shape": list(shape), "fp_bytes": fp_bytes, "codes_bytes": codes_b, "meta_bytes": meta_b,
        "pool_items": pool,
        "kernel_median_s": km, "kernel_gbps": fp_bytes / km / 1e9,
        "kernel_traffic_gbps": (fp_bytes + codes_b + meta_b) / km / 1e9,
        "baseline_median_s": bm, "baseline_gbps": fp_bytes / bm / 1e9,
        "speedup": bm / km,
        "kernel_cpu_median_s": kcm, "baseline_cpu_median_s": bcm,
        "speedup_cpu_time": bcm / kcm if kcm > 0 else None,
        "kernel_cpu_share": sum(kc) / sum(k), "baseline_cpu_share": sum(bc) / sum(b),
        "kernel_times_s": k, "baseline_times_s": b,
        "kernel_cpu_times_s": kc, "baseline_cpu_times_s": bc,
    }


_HEADER = (f"{'op':<10} {'input':<22} {'bits':>4} {'kvq ms':>8} {'GB/s':>6} {'traffic':>8} "
           f"{'eager ms':>9} {'GB/s':>6} {'speedup':>8} {'cpu-time speedup':>17} {'kvq cpu/wall':>13}")


def _print_row(r, header=False):
    if header:
        print(_HEADER)
        print("-" * len(_HEADER))
    label = f"{r['tensor']} {r['dtype']} axis={r['axis']}"
    print(f"{r['op']:<10} {label:<22} {r['bits']:>4} {r['kernel_median_s'] * 1e3:>8.2f} "
          f"{r['kernel_gbps']:>6.2f} {r['kernel_traffic_gbps']:>8.2f} "
          f"{r['baseline_median_s'] * 1e3:>9.1f} {r['baseline_gbps']:>6.2f} {r['speedup']:>7.1f}x "
          f"{r['speedup_cpu_time']:>16.1f}x {r['kernel_cpu_share']:>13.2f}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=15, help="timed torchkvq calls per figure")
    p.add_argument("--baseline-repeats", type=int, default=3,
                   help="timed eager-reference calls per figure (they take ~1 s each on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--shape", type=int, nargs=4, default=[1, 32, 4096, 128],
                   metavar=("B", "H", "T", "D"))
    p.add_argument("--cache-mib", type=float, default=None,
                   help="last-level cache to defeat (default: max(sysfs L3, 260) on CPU, L2 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write every figure and the machine info here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torchkvq.cuda_available():
        raise SystemExit("--device cuda: this torchkvq build has no CUDA kernels or no GPU is present")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
