"""One decode step (one query token) of attention over every layer: XQuant's rematerialization
against KIVI's fused attention and fp SDPA, at the SmolLM2-135M shape.

Every layer gets its own cache (a real decode step walks all layers, so nothing stays in the
CPU's caches between layers). Variants, timed in the same run, interleaved round by round:

* ``sdpa_fp32``: ``F.scaled_dot_product_attention(q, K, V, enable_gqa=True)`` over fp32 K/V.
* ``kivi4_fused``: ``kvq.quant_attention`` over a KIVI store (4-bit keys per channel and values
  per token, G=32, fp16 scales, the newest 128 tokens in an fp16 window).
* ``xquant4_remat``: XQuant on a GQA model: 4-bit SVD latents ``X·U_k``, ``X·U_v`` (per-token
  groups of 64, window 128); ``kvq.remat_kv`` rebuilds K (RoPE fused) and V, then
  ``kvq.quant_attention`` over them (``RematStore.attend``).
* ``xquant4_absorb``: the same cache; K rebuilt, V absorbed: ``(P·L̂_v)·(Σ·Bᵀ)`` with
  ``kvq.dequant_matmul`` for ``P·L̂_v``.
* ``remat_k_fused`` / ``remat_k_rope_after``: only the key rematerialization of all layers,
  RoPE inside ``kvq.remat_kv`` vs a plain ``remat_kv`` followed by transformers-style
  ``x·cos + rotate_half(x)·sin`` (the issue's "fused or right after - measure").

Reported per T: median wall time and process CPU time (all threads; less sensitive to other
processes on a shared machine) of the step over all layers, their ratios to ``sdpa_fp32``, and
the bytes each variant's cache holds per layer (what the step must read).

    python bench/remat.py [--tokens 1024,4096,16384] [--layers 30] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import torchkvq  # noqa: E402,F401
from torchkvq import ops  # noqa: E402
from torchkvq.reference import rotate_half_rope  # noqa: E402
from torchkvq.remat import LayerWeights, RematStore, TokenIndex  # noqa: E402
from torchkvq.store import KVStore  # noqa: E402
from torchkvq.xstore import XStore  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import machine_info  # noqa: E402

HIDDEN, HQ, HKV, D, R = 576, 9, 3, 64, 128


def rope_fn(theta: float = 100000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)

    def rope(pos: torch.Tensor):
        f = pos[..., None].float() * inv
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()

    return rope


def build_layer(T: int, gen: torch.Generator):
    """Per layer: (query, fp K/V, KIVI store, XQuant store, absorbed XQuant store)."""
    x = torch.randn(1, T, HIDDEN, generator=gen)
    w_k = torch.randn(HKV * D, HIDDEN, generator=gen) / HIDDEN**0.5
    w_v = torch.randn(HKV * D, HIDDEN, generator=gen) / HIDDEN**0.5
    rope = rope_fn()
    pos = torch.arange(T)[None]
    cos, sin = rope(pos)
    k = rotate_half_rope((x @ w_k.T).view(1, T, HKV, D), cos, sin).transpose(1, 2).contiguous()
    v = (x @ w_v.T).view(1, T, HKV, D).transpose(1, 2).contiguous()
    q = torch.randn(1, HQ, 1, D, generator=gen)

    kivi = KVStore(1, HKV, D, dtype=torch.float16, group_size=32)
    kivi.append(k, v)
    kivi.quantize_blocks([(4, 4)] * ((T - R) // 32))

    weights = LayerWeights.build(w_k, None, w_v, None, HKV, D, "latent")
    tokens = TokenIndex(1, rope, "cpu")
    stores = []
    for absorb in (False, True):
        xs = [XStore(1, s.width, bits=4, group_size=64) for s in weights.streams]
        st = RematStore(0, weights, tokens, xs, absorb_values=absorb)
        st.append(x, pos)
        st.flush((T - R) // 32 * 32)
        stores.append(st)
    tokens.tables(T)  # the tables are shared by all layers of a step: computed once, not timed
    return q, k, v, kivi, stores[0], stores[1], (weights, stores[0], cos, sin)


def remat_keys(layer, rope_after: bool) -> torch.Tensor:
    weights, st, cos, sin = layer
    s, xs = weights.streams[0], st.stores[0]
    codes, scale, zero = xs.quantized()
    Q = codes.shape[1]
    if not rope_after:
        return ops.remat_kv(codes, scale, zero, 4, 64, s.weight, None, cos[:, :Q], sin[:, :Q], s.n_k)
    k = ops.remat_kv(codes, scale, zero, 4, 64, s.weight, None, None, None, 0)
    k = k.view(1, Q, HKV, D)
    c, sn = cos[:, :Q, None], sin[:, :Q, None]
    return k * c + torch.cat([-k[..., D // 2 :], k[..., : D // 2]], -1) * sn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    results = []
    for T in [int(t) for t in args.tokens.split(",")]:
        gen = torch.Generator().manual_seed(T)
        layers = [build_layer(T, gen) for _ in range(args.layers)]
        variants = {
            "sdpa_fp32": lambda L: F.scaled_dot_product_attention(L[0], L[1], L[2], enable_gqa=True),
            "kivi4_fused": lambda L: L[3].attend(L[0]),
            "xquant4_remat": lambda L: L[4].attend(L[0]),
            "xquant4_absorb": lambda L: L[5].attend(L[0]),
            "remat_k_fused": lambda L: remat_keys(L[6], False),
            "remat_k_rope_after": lambda L: remat_keys(L[6], True),
        }
        times: dict[str, list[float]] = {n: [] for n in variants}
        cpu: dict[str, list[float]] = {n: [] for n in variants}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, fn in variants.items():
                c0, t0 = time.process_time(), time.perf_counter()
                for L in layers:
                    fn(L)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        L0 = layers[0]
        held = {
            "sdpa_fp32": 2 * L0[1].numel() * 4,
            "kivi4_fused": L0[3].nbytes(),
            "xquant4_remat": L0[4].nbytes(),
            "xquant4_absorb": L0[5].nbytes(),
            "remat_k_fused": L0[4].stores[0].nbytes(),
            "remat_k_rope_after": L0[4].stores[0].nbytes(),
        }
        base = statistics.median(times["sdpa_fp32"][1:])
        base_cpu = statistics.median(cpu["sdpa_fp32"][1:])
        for name, ts in times.items():
            med, med_cpu = statistics.median(ts[1:]), statistics.median(cpu[name][1:])
            results.append({"tokens": T, "variant": name, "median_s": med, "vs_sdpa": med / base,
                            "cpu_s": med_cpu, "cpu_vs_sdpa": med_cpu / base_cpu,
                            "bytes_per_layer": held[name], "layers": args.layers})
        del layers
    print(f"decode step over {args.layers} layers, SmolLM2-135M shape (hidden {HIDDEN}, {HQ} q / "
          f"{HKV} kv heads, head_dim {D}), median of {args.repeats}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| T | variant | step ms (wall) | × sdpa_fp32 | CPU ms | × sdpa_fp32 (CPU) | cache bytes / layer |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tokens']} | {r['variant']} | {1e3 * r['median_s']:.1f} | {r['vs_sdpa']:.2f} | "
              f"{1e3 * r['cpu_s']:.1f} | {r['cpu_vs_sdpa']:.2f} | {r['bytes_per_layer']:,} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(), "command": "python bench/remat.py " + " ".join(sys.argv[1:]),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
