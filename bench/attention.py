"""One decode step (L=1) of attention over every layer's KV cache: torch SDPA vs kvq::quant_attention.

For a real model shape, every layer gets its own cache tensors (as in real decoding: a CPU's
last-level cache holds one layer's quantized cache but not a model's), and a decode step is the
loop over all layers. Variants, timed in the same run and interleaved round by round:

* ``sdpa_fp32`` / ``sdpa_bf16``: ``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)``
  over fp32 / bf16 caches (bf16 queries for bf16). This is what transformers' sdpa attention
  calls when there is no mask.
* ``sdpa_fp32_packed`` / ``sdpa_bf16_packed``: the same SDPA with GQA done by folding the query
  heads of one kv head into the query-length axis (``[1, Hq, 1, D] -> [1, Hkv, Hq/Hkv, D]``, exact
  for one query and no mask; transformers' ``pack_gqa``). On CPU this is the faster SDPA form at
  L=1, so it is reported as the stronger baseline.
* ``deq_sdpa_2b_g32``: what Hugging Face's QuantizedCache does each step: per layer, dequantize
  the whole quantized history (2-bit, G=32) to fp32 with ``kvq.dequantize``, concatenate the fp
  window, then SDPA (enable_gqa). ``deq_sdpa_2b_g32_packed``: the same with packed GQA.
* ``kvq_{2,4}b_g{32,128}``: ``kvq.quant_attention`` over the KIVI store: keys per channel in
  blocks of G tokens, values per token in groups of ``v_group_size = min(head_dim, G)`` channels,
  fp16 scales and zeros, the newest R=128 tokens in an fp32 window.

Bytes read per step are counted exactly from the tensors each variant is given (codes + scales
+ zeros + fp window + fp positions + block widths for the quantized store; K + V for SDPA), and
achieved GB/s is set against the machine's read bandwidth measured here (large ``sum()``).
Before every timed step that reads less than it, a buffer larger than the last-level cache is
written (not timed), so each step starts cold, as when the model's weights have streamed through
the cache in between.
Peak extra memory of one decode step (at the largest T) is measured twice: the rise of the
process' peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before the step,
after ``malloc_trim``; and the peak of live tensor bytes from torch.profiler's memory events
(allocator-independent; glibc may keep freed heap memory, which only the RSS figure shows).
Speed-ups are reported from wall-clock medians and, in the JSON, from process CPU time too (less
sensitive to other processes on a shared machine). OMP_WAIT_POLICY defaults to PASSIVE (below).

Shapes: A = Llama-3-8B-like (32 layers, 32 q / 8 kv heads, d=128; T = 1k, 4k, 16k by default),
B = SmolLM2-135M (30 layers, 9 q / 3 kv heads, d=64; T = 1k, 4k, 16k, 32k by default).

    python bench/attention.py [--shapes A,B] [--tokens 1024,4096] [--repeats 5] [--json PATH]
    python bench/attention.py --quick          # smoke test: T=1k, 2 rounds, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

# On a machine shared with other processes, OpenMP's default active waiting makes every parallel
# region of a 2-thread run wait for a descheduled worker: a 4 MiB in-place multiply measured
# 16 ms with 2 threads vs 1.5 ms with 1 here, and 1.5 ms with 2 threads under PASSIVE. Set before
# torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
OMP_WAIT_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torchkvq  # noqa: E402,F401  (registers torch.ops.kvq)
from torchkvq import ops, reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
R = 128  # fp window (newest tokens in fp32)
QUANT_CONFIGS = [(2, 32), (2, 128), (4, 32), (4, 128)]  # (bits, G)
DESIGN_L3_MIB = 260  # docs/DESIGN.md: the host's L3; sysfs in the VM may report less

SHAPES = {
    "A": dict(name="Llama-3-8B-like", layers=32, hq=32, hkv=8, d=128,
              tokens=(1024, 4096, 16384)),
    "B": dict(name="SmolLM2-135M", layers=30, hq=9, hkv=3, d=64,
              tokens=(1024, 4096, 16384, 32768)),
}


# --------------------------------------------------------------------------------------------
# machine facts
# --------------------------------------------------------------------------------------------


def meminfo_kib(key: str) -> int:
    return machine.proc_kib("/proc/meminfo", key) or 0


def proc_status_kib(key: str) -> int:
    return machine.proc_kib("/proc/self/status", key) or 0


def machine_info() -> dict:
    return {
        "cpu_model": machine.cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_wait_policy_set_by_script": OMP_WAIT_POLICY_DEFAULTED,
        "llc_mib_sysfs": machine.llc_mib(),
        "llc_mib_design": DESIGN_L3_MIB,
        "mem_total_gib": round(meminfo_kib("MemTotal") / (1 << 20), 2),
        "mem_available_gib_at_start": round(meminfo_kib("MemAvailable") / (1 << 20), 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torchkvq_commit": machine.git_commit(),
        "torchkvq_extension": machine.extension_build(),
        "date": machine.now(),
        "loadavg_at_start": machine.loadavg(),
    }


def read_bandwidth_gbs(gib: float, repeats: int) -> dict:
    """Median GB/s of ``x.sum()`` over an fp32 tensor of `gib` GiB (a read-only stream)."""
    x = torch.empty(int(gib * GiB) // 4, dtype=torch.float32)
    x.fill_(1.0)  # touch every page
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    del x
    machine.free_memory()
    med = statistics.median(times)
    return {"bytes": nbytes, "median_s": med, "gbs": nbytes / med / 1e9,
            "best_gbs": nbytes / min(times) / 1e9, "times_s": times}


# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------


def v_group(d: int, G: int) -> int:
    return min(d, G)


@dataclass
class QuantLayer:
    """One layer's KIVI store as quant_attention takes it, plus the 4-D views dequantize takes."""

    bits: int
    G: int
    VG: int
    kc4: torch.Tensor  # [B, H, Tq*bits/8, D]
    ks: torch.Tensor
    kz: torch.Tensor
    vc4: torch.Tensor  # [B, H, Tq, D*bits/8]
    vs: torch.Tensor
    vz: torch.Tensor
    k_bits: torch.Tensor
    v_bits: torch.Tensor
    k_fp: torch.Tensor
    v_fp: torch.Tensor
    fp_pos: torch.Tensor
    k_pool: torch.Tensor = field(init=False)
    v_pool: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        B, H = self.kc4.shape[:2]
        # quantize(axis=2) packs each group of G tokens into G*bits/8 consecutive rows of D bytes:
        # block b of the pool is exactly rows [b*G*bits/8, (b+1)*G*bits/8). For values (axis=3)
        # token i's packed row is bytes [i*D*bits/8, ...), so block b is rows [b*G, (b+1)*G).
        self.k_pool = self.kc4.reshape(B, H, -1)
        self.v_pool = self.vc4.reshape(B, H, -1)
        assert self.k_pool.data_ptr() == self.kc4.data_ptr()  # a view, no copy

    def store_tensors(self) -> list[torch.Tensor]:
        return [self.k_pool, self.ks, self.kz, self.k_bits, self.v_pool, self.vs, self.vz,
                self.v_bits, self.k_fp, self.v_fp, self.fp_pos]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store_tensors())


def build_quant_layer(kq: torch.Tensor, vq: torch.Tensor, bits: int, G: int,
                      k_fp: torch.Tensor, v_fp: torch.Tensor, fp_pos: torch.Tensor) -> QuantLayer:
    """KIVI store: ``kq``/``vq`` ``[B, H, Tq, D]`` (the tokens before the fp window) in blocks of
    G tokens, quantized with one ``kvq.quantize`` call each; ``k_fp``/``v_fp`` the fp32 window."""
    B, H, Tq, D = kq.shape
    assert Tq % G == 0, (Tq, G)
    VG = v_group(D, G)
    kc, ks, kz = ops.quantize(kq, bits, G, axis=2, scale_dtype=torch.float16)
    vc, vs, vz = ops.quantize(vq, bits, VG, axis=3, scale_dtype=torch.float16)
    kb = torch.full((Tq // G,), bits, dtype=torch.int32)
    return QuantLayer(bits, G, VG, kc, ks, kz, vc, vs, vz, kb, kb.clone(), k_fp, v_fp, fp_pos)


def copy_quant_layer(src: QuantLayer, k_fp: torch.Tensor, v_fp: torch.Tensor) -> QuantLayer:
    """The same store in memory of its own (timing does not depend on the values)."""
    return QuantLayer(src.bits, src.G, src.VG, src.kc4.clone(), src.ks.clone(), src.kz.clone(),
                      src.vc4.clone(), src.vs.clone(), src.vz.clone(), src.k_bits.clone(),
                      src.v_bits.clone(), k_fp, v_fp, src.fp_pos.clone())


# --------------------------------------------------------------------------------------------
# the per-layer calls that are timed
# --------------------------------------------------------------------------------------------


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_packed(q, k, v):
    # One query, no mask: the g query heads of a kv head become g query rows of that head.
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v)
    return out.reshape(B, Hq, 1, D)


def deq_then_sdpa(q, ql: QuantLayer, packed: bool):
    k = ops.dequantize(ql.kc4, ql.ks, ql.kz, ql.bits, ql.G, 2, torch.float32)
    v = ops.dequantize(ql.vc4, ql.vs, ql.vz, ql.bits, ql.VG, 3, torch.float32)
    k = torch.cat([k, ql.k_fp], dim=2)
    v = torch.cat([v, ql.v_fp], dim=2)
    return sdpa_packed(q, k, v) if packed else sdpa_gqa(q, k, v)


def kvq_attend(q, ql: QuantLayer):
    D = q.shape[-1]
    out, _, _ = ops.quant_attention(
        q, ql.k_pool, ql.ks, ql.kz, ql.k_bits, ql.v_pool, ql.vs, ql.vz, ql.v_bits,
        ql.k_fp, ql.v_fp, ql.fp_pos, None, None, None, None, None,
        ql.G, ql.VG, D ** -0.5, False, False)
    return out


# --------------------------------------------------------------------------------------------
# self-check: the pool layout built here is the one the op and the reference read
# --------------------------------------------------------------------------------------------


def self_check() -> None:
    g = torch.Generator().manual_seed(0)
    for hq, hkv, d in ((4, 2, 128), (9, 3, 64)):
        for bits, G in QUANT_CONFIGS:
            T = 3 * G + R
            k = torch.randn(1, hkv, T, d, generator=g)
            v = torch.randn(1, hkv, T, d, generator=g)
            q = torch.randn(1, hq, 1, d, generator=g)
            k_fp = k[:, :, T - R:].contiguous()
            v_fp = v[:, :, T - R:].contiguous()
            fp_pos = torch.arange(T - R, T)[None]
            ql = build_quant_layer(k[:, :, : T - R], v[:, :, : T - R], bits, G, k_fp, v_fp, fp_pos)
            kref = reference.dequantize_blocks(ql.k_pool, ql.ks, ql.kz, ql.k_bits, G, None, d)
            vref = reference.dequantize_blocks(ql.v_pool, ql.vs, ql.vz, ql.v_bits, G, ql.VG, d)
            kop = ops.dequantize(ql.kc4, ql.ks, ql.kz, bits, G, 2, torch.float32)
            vop = ops.dequantize(ql.vc4, ql.vs, ql.vz, bits, ql.VG, 3, torch.float32)
            assert torch.equal(kref, kop), ("key pool layout", hq, hkv, d, bits, G)
            assert torch.equal(vref, vop), ("value pool layout", hq, hkv, d, bits, G)
            # quantization error within half a step (sanity of the data, not a kernel test)
            assert (kop - k[:, :, : T - R]).abs().max() <= 0.51 * ql.ks.float().max() + 1e-3
            out = kvq_attend(q, ql)
            ref = reference.quant_attention(
                q, ql.k_pool, ql.ks, ql.kz, ql.k_bits, ql.v_pool, ql.vs, ql.vz, ql.v_bits,
                ql.k_fp, ql.v_fp, ql.fp_pos, None, None, None, None, None, G, ql.VG, d ** -0.5,
                False, False)[0]
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            for packed in (False, True):
                torch.testing.assert_close(out, deq_then_sdpa(q, ql, packed), atol=1e-4, rtol=1e-4)
        q = torch.randn(1, hq, 1, d, generator=g)
        torch.testing.assert_close(sdpa_packed(q, k, v), sdpa_gqa(q, k, v), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# one (shape, T) case
# --------------------------------------------------------------------------------------------


def per_layer_bytes(shape: dict, T: int, variants: list[str]) -> int:
    """Resident bytes per layer of every cache the case builds (for the memory budget)."""
    hkv, d = shape["hkv"], shape["d"]
    Tq = T - R
    total = 2 * hkv * T * d * 4  # fp32 K, V (also the source everything is built from)
    if any(v.startswith("sdpa_bf16") for v in variants):
        total += 2 * hkv * T * d * 2
    total += 2 * hkv * R * d * 4  # shared fp window
    for bits, G in QUANT_CONFIGS:
        VG = v_group(d, G)
        total += hkv * Tq * d * bits // 8 * 2 + hkv * (Tq // G) * d * 4 + hkv * Tq * (d // VG) * 4
    return total


class Flusher:
    """Writes a buffer larger than the last-level cache so the next step starts cold."""

    def __init__(self, mib: int):
        self.buf = torch.zeros(mib * MiB // 4, dtype=torch.float32) if mib > 0 else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.add_(1.0)


def time_steps(steps: dict, repeats: int, warmup: int, flush: Flusher,
               needs_flush: dict[str, bool]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Round-robin: each round times one full decode step of every variant, cold.

    Returns wall-clock seconds and process CPU seconds (all threads) per step; the latter is
    the work done and is less sensitive to other processes competing for the cores.
    """
    times = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for rnd in range(warmup + repeats):
        for name, step in steps.items():
            if needs_flush[name]:
                flush()
            c0 = time.process_time()
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            dc = time.process_time() - c0
            if rnd >= warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    return times, cpu


def peak_extra_rss(step) -> int | None:
    """Rise of peak RSS over the RSS before one call of `step`, in bytes (None if unsupported)."""
    machine.free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = proc_status_kib("VmRSS")
    step()
    return (proc_status_kib("VmHWM") - base) * 1024


def peak_alloc_profiler(step) -> int:
    """Peak of live bytes allocated through torch's allocator during one call of `step`.

    From torch.profiler's memory events (profile_memory=True): the running sum of allocations
    and frees, in time order. Counts tensors only (not a kernel's private std::vector scratch).
    """
    from torch.profiler import ProfilerActivity, profile

    machine.free_memory()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    evs = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]")
    live = peak = 0
    for _, n in evs:
        live += n
        peak = max(peak, live)
    return peak


def hot_layer_ms(fn, repeats: int) -> float:
    """Median ms of one layer's call repeated on the same (cache-resident as far as it fits) data."""
    fn()
    fn()
    ts = []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run_case(shape_key: str, T: int, args, flush: Flusher, bw_gbs: float) -> dict:
    shape = SHAPES[shape_key]
    hq, hkv, d = shape["hq"], shape["hkv"], shape["d"]
    variants = args.variant_list
    per_layer = per_layer_bytes(shape, T, variants)
    avail = meminfo_kib("MemAvailable") * 1024
    budget = avail - int(args.mem_margin_gib * GiB)
    layers = min(shape["layers"], max(1, budget // per_layer))
    note = ""
    if layers < shape["layers"]:
        note = (f"{layers} of {shape['layers']} layers: all caches of all variants must be resident "
                f"for interleaved timing ({per_layer / MiB:.0f} MiB per layer, "
                f"{avail / GiB:.1f} GiB available)")
        print(f"  note: {note}", flush=True)

    t_build = time.perf_counter()
    gen = torch.Generator().manual_seed(1234 + T)
    Tq = T - R
    fp32, bf16, quant = [], [], {cfg: [] for cfg in QUANT_CONFIGS}
    fp_pos = torch.arange(Tq, T)[None]
    queries32 = [torch.randn(1, hq, 1, d, generator=gen) for _ in range(layers)]
    queries16 = [q.to(torch.bfloat16) for q in queries32]
    need_quant = {(b, G) for (b, G) in QUANT_CONFIGS
                  if any(v.startswith(f"kvq_{b}b_g{G}") for v in variants)}
    if any(v.startswith("deq_sdpa") for v in variants):
        need_quant.add((2, 32))
    sources = layers if args.quant_sources <= 0 else min(layers, args.quant_sources)
    for layer in range(layers):
        # every layer its own fp32 K/V; quantized part and fp window generated apart so the
        # quantizer gets contiguous input, then concatenated for SDPA
        kq = torch.randn(1, hkv, Tq, d, generator=gen)
        vq = torch.randn(1, hkv, Tq, d, generator=gen)
        k_fp = torch.randn(1, hkv, R, d, generator=gen)
        v_fp = torch.randn(1, hkv, R, d, generator=gen)
        k, v = torch.cat([kq, k_fp], dim=2), torch.cat([vq, v_fp], dim=2)
        fp32.append((k, v))
        if any(x.startswith("sdpa_bf16") for x in variants):
            bf16.append((k.to(torch.bfloat16), v.to(torch.bfloat16)))
        for cfg in QUANT_CONFIGS:
            if cfg in need_quant:
                if layer < sources:
                    ql = build_quant_layer(kq, vq, cfg[0], cfg[1], k_fp, v_fp, fp_pos)
                else:
                    ql = copy_quant_layer(quant[cfg][layer % sources], k_fp, v_fp)
                quant[cfg].append(ql)
        del kq, vq
    build_s = time.perf_counter() - t_build

    def make_step(name):
        if name == "sdpa_fp32":
            return lambda: [sdpa_gqa(queries32[i], *fp32[i]) for i in range(layers)]
        if name == "sdpa_bf16":
            return lambda: [sdpa_gqa(queries16[i], *bf16[i]) for i in range(layers)]
        if name == "sdpa_fp32_packed":
            return lambda: [sdpa_packed(queries32[i], *fp32[i]) for i in range(layers)]
        if name == "sdpa_bf16_packed":
            return lambda: [sdpa_packed(queries16[i], *bf16[i]) for i in range(layers)]
        if name.startswith("deq_sdpa_2b_g32"):
            packed = name.endswith("_packed")
            ql = quant[(2, 32)]
            return lambda: [deq_then_sdpa(queries32[i], ql[i], packed) for i in range(layers)]
        if name.startswith("kvq_"):
            b, G = name[4:].split("b_g")
            ql = quant[(int(b), int(G))]
            return lambda: [kvq_attend(queries32[i], ql[i]) for i in range(layers)]
        raise ValueError(name)

    def bytes_read(name) -> int:
        if name.startswith("sdpa_fp32"):
            return sum(k.nbytes + v.nbytes for k, v in fp32)
        if name.startswith("sdpa_bf16"):
            return sum(k.nbytes + v.nbytes for k, v in bf16)
        if name.startswith("deq_sdpa_2b_g32"):
            # its inputs: the same store (fp_pos and block widths aside); it also writes and
            # re-reads the fp32 history, see "materialized_bytes"
            return sum(ql.nbytes() - ql.fp_pos.nbytes - ql.k_bits.nbytes - ql.v_bits.nbytes
                       for ql in quant[(2, 32)])
        b, G = name[4:].split("b_g")
        return sum(ql.nbytes() for ql in quant[(int(b), int(G))])

    steps = {name: make_step(name) for name in variants}
    # A step that reads more than the flush buffer evicts itself; only smaller ones need it.
    needs_flush = {n: bytes_read(n) < args.flush_mib * MiB for n in variants}
    times, cpu_times = time_steps(steps, args.repeats, args.warmup, flush, needs_flush)

    fp32_bytes = sum(k.nbytes + v.nbytes for k, v in fp32)
    rows = []
    med = {n: statistics.median(ts) for n, ts in times.items()}
    cmed = {n: statistics.median(ts) for n, ts in cpu_times.items()}
    for name in variants:
        ts = times[name]
        nbytes = bytes_read(name)
        row = {
            "variant": name,
            "ms_median": med[name] * 1e3,
            "ms_min": min(ts) * 1e3,
            "ms_per_layer": med[name] * 1e3 / layers,
            "times_s": ts,
            "cpu_ms_median": cmed[name] * 1e3,
            "cpu_times_s": cpu_times[name],
            "bytes_read": nbytes,
            "bytes_read_mib": nbytes / MiB,
            "gbs": nbytes / med[name] / 1e9,
            "frac_of_read_bw": nbytes / med[name] / 1e9 / bw_gbs,
        }
        for ref in ("sdpa_fp32", "sdpa_bf16", "deq_sdpa_2b_g32", "sdpa_fp32_packed",
                    "sdpa_bf16_packed"):
            if ref in med:
                row[f"speedup_vs_{ref}"] = med[ref] / med[name]
                row[f"cpu_speedup_vs_{ref}"] = cmed[ref] / cmed[name]
        sdpas = [n for n in med if n.startswith("sdpa_")]
        if sdpas:
            best = min(sdpas, key=lambda n: med[n])
            row["speedup_vs_best_sdpa"] = med[best] / med[name]
            row["best_sdpa"] = best
            cbest = min(sdpas, key=lambda n: cmed[n])
            row["cpu_speedup_vs_best_sdpa"] = cmed[cbest] / cmed[name]
            row["cpu_best_sdpa"] = cbest
        if name.startswith("deq_sdpa"):
            # fp32 K̂, V̂ written by dequantize, read+written by cat, read by SDPA
            row["materialized_bytes"] = 2 * layers * hkv * d * 4 * (Tq + 2 * T)
        rows.append(row)

    case = {
        "shape": shape_key, "shape_name": shape["name"], "tokens": T, "layers": layers,
        "layers_model": shape["layers"], "q_heads": hq, "kv_heads": hkv, "head_dim": d,
        "fp_window": R, "quantized_tokens": Tq, "note": note, "build_s": build_s,
        "quantized_source_layers": sources,
        "working_set_mib_fp32": fp32_bytes / MiB,
        "v_group_size": {f"g{G}": v_group(d, G) for _, G in QUANT_CONFIGS},
        "loadavg": machine.loadavg(), "rows": rows,
    }

    if args.memory:
        mem, alloc = {}, {}
        for name in variants:
            if name.startswith(("kvq_2b_g32", "deq_sdpa", "sdpa_fp32")):
                mem[name] = peak_extra_rss(steps[name])
                alloc[name] = peak_alloc_profiler(steps[name])
        Tmat = 2 * hkv * d * 4 * T  # one layer's K + V in fp32, for scale
        case["peak_extra_rss_bytes"] = mem
        case["peak_alloc_bytes"] = alloc
        case["one_layer_fp32_kv_bytes"] = Tmat
    if args.profile:
        prof = {}
        for name in ("kvq_2b_g32", "kvq_4b_g32", "sdpa_fp32_packed", "sdpa_fp32",
                     "deq_sdpa_2b_g32_packed"):
            if name not in steps and not (name == "deq_sdpa_2b_g32_packed" and (2, 32) in quant
                                          and quant[(2, 32)]):
                continue
            one = {
                "kvq_2b_g32": lambda: kvq_attend(queries32[0], quant[(2, 32)][0]),
                "kvq_4b_g32": lambda: kvq_attend(queries32[0], quant[(4, 32)][0]),
                "sdpa_fp32_packed": lambda: sdpa_packed(queries32[0], *fp32[0]),
                "sdpa_fp32": lambda: sdpa_gqa(queries32[0], *fp32[0]),
                "deq_sdpa_2b_g32_packed": lambda: deq_then_sdpa(queries32[0], quant[(2, 32)][0], True),
            }[name]
            entry = {"hot_ms_per_layer": hot_layer_ms(one, args.repeats)}
            if name in med:
                entry["cold_ms_per_layer"] = med[name] * 1e3 / layers
            nthreads = torch.get_num_threads()
            if nthreads > 1:
                torch.set_num_threads(1)
                try:
                    entry["hot_ms_per_layer_1thread"] = hot_layer_ms(one, args.repeats)
                finally:
                    torch.set_num_threads(nthreads)
            if name.startswith("deq_sdpa"):
                ql = quant[(2, 32)][0]
                entry["hot_ms_dequantize_kv"] = hot_layer_ms(
                    lambda: (ops.dequantize(ql.kc4, ql.ks, ql.kz, 2, 32, 2, torch.float32),
                             ops.dequantize(ql.vc4, ql.vs, ql.vz, 2, ql.VG, 3, torch.float32)),
                    args.repeats)
            prof[name] = entry
        case["profile"] = prof

    del fp32, bf16, quant, steps
    machine.free_memory()
    return case


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

LABELS = {
    "sdpa_fp32": "SDPA fp32 (enable_gqa)",
    "sdpa_bf16": "SDPA bf16 (enable_gqa)",
    "sdpa_fp32_packed": "SDPA fp32 (packed GQA)",
    "sdpa_bf16_packed": "SDPA bf16 (packed GQA)",
    "deq_sdpa_2b_g32": "dequant->SDPA 2b G32 (gqa)",
    "deq_sdpa_2b_g32_packed": "dequant->SDPA 2b G32 (pk)",
    "kvq_2b_g32": "kvq 2-bit G=32",
    "kvq_2b_g128": "kvq 2-bit G=128",
    "kvq_4b_g32": "kvq 4-bit G=32",
    "kvq_4b_g128": "kvq 4-bit G=128",
}


def fmt_x(row, key):
    v, c = row.get(key), row.get("cpu_" + key)
    return f"{v:5.2f}x ({c:5.2f}x)" if v is not None else "-"


def print_case(case: dict) -> None:
    print(f"\n[{case['shape']}] {case['shape_name']}: {case['layers']} layers x {case['q_heads']} q / "
          f"{case['kv_heads']} kv heads x d{case['head_dim']}, T={case['tokens']} "
          f"(fp32 K+V {case['working_set_mib_fp32']:.0f} MiB; built in {case['build_s']:.1f} s; "
          f"load {case['loadavg']})")
    print("  speed-ups: wall-clock median (CPU-time median) of the reference / this variant")
    hdr = (f"  {'variant':27s} {'ms/step':>8s} {'min':>8s} {'CPU ms':>8s} {'vs fp32 SDPA':>15s} "
           f"{'vs bf16 SDPA':>15s} {'vs deq->SDPA':>15s} {'vs best SDPA':>15s} {'MiB read':>8s} "
           f"{'GB/s':>5s} {'%BW':>4s}")
    print(hdr)
    for r in case["rows"]:
        print(f"  {LABELS.get(r['variant'], r['variant']):27s} {r['ms_median']:8.1f} {r['ms_min']:8.1f} "
              f"{r['cpu_ms_median']:8.1f} "
              f"{fmt_x(r, 'speedup_vs_sdpa_fp32'):>15s} {fmt_x(r, 'speedup_vs_sdpa_bf16'):>15s} "
              f"{fmt_x(r, 'speedup_vs_deq_sdpa_2b_g32'):>15s} {fmt_x(r, 'speedup_vs_best_sdpa'):>15s} "
              f"{r['bytes_read_mib']:8.1f} {r['gbs']:5.2f} {100 * r['frac_of_read_bw']:3.0f}%")
    if "peak_extra_rss_bytes" in case:
        parts = [f"{LABELS.get(k, k)}: RSS +{v / MiB:.1f} MiB" if v is not None else f"{k}: RSS n/a"
                 for k, v in case["peak_extra_rss_bytes"].items()]
        parts = [f"{a}, tensors {case['peak_alloc_bytes'][k] / MiB:.1f} MiB"
                 for a, k in zip(parts, case["peak_extra_rss_bytes"])]
        print("  peak extra memory of one step: " + "; ".join(parts)
              + f"  (one layer's fp32 K+V: {case['one_layer_fp32_kv_bytes'] / MiB:.1f} MiB)")
    if "profile" in case:
        for k, e in case["profile"].items():
            extra = ""
            if "hot_ms_dequantize_kv" in e:
                extra += f" (of which dequantize K,V {e['hot_ms_dequantize_kv']:.2f} ms)"
            if "hot_ms_per_layer_1thread" in e:
                extra += f", hot with 1 thread {e['hot_ms_per_layer_1thread']:.2f} ms"
            cold = f"cold {e['cold_ms_per_layer']:.2f} ms, " if "cold_ms_per_layer" in e else ""
            print(f"  per layer {LABELS.get(k, k)}: {cold}hot {e['hot_ms_per_layer']:.2f} ms{extra}")


ALL_VARIANTS = ["sdpa_fp32", "sdpa_bf16", "sdpa_fp32_packed", "sdpa_bf16_packed",
                "deq_sdpa_2b_g32", "deq_sdpa_2b_g32_packed",
                "kvq_2b_g32", "kvq_2b_g128", "kvq_4b_g32", "kvq_4b_g128"]
DEFAULT_VARIANTS = [v for v in ALL_VARIANTS if v != "deq_sdpa_2b_g32_packed"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="A,B", help="comma list of A (Llama-3-8B-like), B (SmolLM2-135M)")
    p.add_argument("--tokens", default=None,
                   help="context lengths T for every shape (default: A 1k,4k,16k; B 1k,4k,16k,32k)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma list from {','.join(ALL_VARIANTS)}")
    p.add_argument("--flush-mib", type=int, default=512,
                   help="buffer written before every timed step that reads less (0: no flush)")
    p.add_argument("--bw-gib", type=float, default=1.5, help="size of the bandwidth probe")
    p.add_argument("--quant-sources", type=int, default=4,
                   help="layers quantized from their own data; the others get copies of these "
                        "stores in memory of their own (0: quantize every layer)")
    p.add_argument("--mem-margin-gib", type=float, default=3.0,
                   help="memory left free when sizing the caches (layers are reduced to fit)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (done at the largest T)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the hot/cold + 1-thread probes (done at the largest T)")
    p.add_argument("--quick", action="store_true", help="smoke test: T=1024, 2 repeats, small probes")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.warmup = args.tokens or "1024", 2, 1
        args.bw_gib, args.flush_mib = min(args.bw_gib, 0.25), min(args.flush_mib, 64)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variant_list:
        if v not in ALL_VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {ALL_VARIANTS}")
    shapes = [s.strip().upper() for s in args.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    tokens_of = {}
    for s in shapes:
        tokens_of[s] = (sorted(int(t) for t in args.tokens.split(",")) if args.tokens
                        else list(SHAPES[s]["tokens"]))
        for t in tokens_of[s]:
            if t <= R or (t - R) % 128:
                p.error(f"--tokens: T - {R} must be a positive multiple of 128, got T={t}")

    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['cpu_count']} cpus, torch {info['torch']}, "
          f"torch.get_num_threads() = {info['torch_threads']}, OMP_WAIT_POLICY={info['omp_wait_policy']}, LLC sysfs {info['llc_mib_sysfs']} MiB "
          f"(DESIGN.md: {DESIGN_L3_MIB} MiB), {info['mem_total_gib']} GiB RAM, load {info['loadavg_at_start']}")
    t0 = time.perf_counter()
    self_check()
    print(f"self-check passed ({time.perf_counter() - t0:.1f} s): pools built from ops.quantize "
          "match reference.dequantize_blocks; quant_attention matches the reference and "
          "dequantize-then-SDPA", flush=True)
    bw = read_bandwidth_gbs(args.bw_gib, max(args.repeats, 5))
    print(f"read bandwidth: {bw['gbs']:.2f} GB/s (median of {len(bw['times_s'])} sums over "
          f"{bw['bytes'] / GiB:.2f} GiB fp32; best {bw['best_gbs']:.2f})", flush=True)
    flush = Flusher(args.flush_mib)
    print(f"v_group_size = min(head_dim, G); scales/zeros fp16; fp window R={R} fp32; "
          f"{args.repeats} timed rounds after {args.warmup} warm-up, medians; "
          f"{args.flush_mib} MiB written before every step that reads less than that", flush=True)

    cases = []
    for s in shapes:
        tokens = tokens_of[s]
        for i, T in enumerate(tokens):
            last = i == len(tokens) - 1
            a = argparse.Namespace(**vars(args))
            a.memory = args.memory and last
            a.profile = args.profile and last
            case = run_case(s, T, a, flush, bw["gbs"])
            print_case(case)
            sys.stdout.flush()
            cases.append(case)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s; load {machine.loadavg()}")
    if args.json:
        info["loadavg_at_end"] = machine.loadavg()
        out = {"benchmark": "bench/attention.py", "argv": sys.argv[1:], "machine": info,
               "read_bandwidth": bw, "settings": {
                   "fp_window": R, "quant_configs": QUANT_CONFIGS, "v_group_size": "min(head_dim, G)",
                   "scale_dtype": "float16", "repeats": args.repeats, "warmup": args.warmup,
                   "flush_mib": args.flush_mib, "variants": args.variant_list,
                   "quant_sources": args.quant_sources, "tokens": tokens_of},
               "total_s": total, "cases": cases}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
