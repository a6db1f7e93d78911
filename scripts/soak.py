"""Soak test: generate thousands of tokens with each policy on the real model and watch memory.

For every policy: prefill a Wikipedia prompt into a KVQCache of the bundled SmolLM2-135M, then
decode greedily one token at a time (``--tokens`` steps, default 8192). Every ``--every``
tokens it checks and records:

* **finite output**: every step's logits are finite (checked at every step);
* **bytes as predicted**: the bytes in use, recomputed here from each store's public state
  (KIVI, LogQuant, QAQ: blocks x their widths, scales and zero points, outliers, full-precision
  tokens, bookkeeping, the formulas of docs/store.md; XQuant: per-token codes, scales and zero
  points, the window and the token index, docs/xquant.md) equal the store's own accounting; the
  bytes allocated (every tensor the stores hold, walked through ``vars()``) equal
  ``cache.nbytes()`` and stay below
  1.25 x in use plus the full-precision slack the store keeps; the bytes added per quantized
  token over the run are reported (docs/reliability.md compares them with the formula);
* **no leak**: the process RSS minus the bytes the cache holds stays flat after warm-up (its
  least-squares slope in bytes per token), and so does the number of Python objects the garbage
  collector tracks (a policy's bookkeeping adds a few per block).

Exits non-zero when a check fails. ``--json PATH`` writes every figure and the environment.

    PYTHONPATH=src python scripts/soak.py --policies kivi-2 --tokens 8192 --json soak.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time

import psutil
import torch
from tqdm import tqdm

from torchkvq.eval import corpus, model as eval_model
from torchkvq.hf import XQuantCache, enable
from torchkvq.policies import REGISTRY, Policy, get_policy
from torchkvq.store import KVStore

LEAK_BYTES_PER_TOKEN = 256  # RSS beyond the cache's own growth; the cache grows ~4 KB/token
GROWTH = 1.25


def esize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def held(obj) -> int:
    """Bytes of every tensor `obj` holds in its attributes (or in tuples of them), found without
    the object's own accounting."""
    ts = [t for v in vars(obj).values() for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)


def predicted_in_use(s: KVStore) -> int:
    """Bytes in use by the formulas of docs/store.md, from the store's public state only."""
    B, H, D, G, vg = s.batch_size, s.kv_heads, s.head_dim, s.group_size, s.value_group_size
    blocks = s.block_bits
    q, f = len(blocks) * G, len(s.fp_positions)  # fp slots: the window and the pinned tokens (sinks)
    sb, eb = esize(s.scale_dtype), esize(s.dtype)
    codes = B * H * sum(G * D * (kb + vb) // 8 for kb, vb in blocks)
    scales = 2 * sb * B * H * (len(blocks) * D + q * (D // vg))  # key: per block+channel; value: per token+group
    outliers = B * H * q * (s.key_outliers.count + s.value_outliers.count) * (2 + eb)  # int16 index + value
    fp = 2 * B * H * f * D * eb
    bookkeeping = 2 * 4 * len(blocks) + B * q + 8 * B * f  # int32 widths, bool exclusion, int64 positions
    return codes + scales + outliers + fp + bookkeeping


class KVStoreBytes:
    """The byte checks of a KVQCache: one KVStore per layer (docs/store.md's formulas)."""

    def __init__(self, cache) -> None:
        self.stores = cache.stores

    def in_use(self) -> int:
        return sum(predicted_in_use(s) for s in self.stores)

    def allocated(self) -> int:
        return sum(held(s) for s in self.stores)

    def tokens(self) -> tuple[int, int, int]:
        """(tokens held, quantized, full precision) of the first layer."""
        s = self.stores[0]
        return s.n_tokens, s.n_quantized, len(s.fp_positions)

    def fp_token_bytes(self) -> int:
        """One full-precision token in every layer (key and value), its position included."""
        return sum(2 * s.batch_size * s.kv_heads * s.head_dim * esize(s.dtype) + 8 * s.batch_size for s in self.stores)

    def slack(self) -> int:
        """Full-precision capacity the stores may keep beyond one growth step: up to the slots in
        use plus 64 per layer."""
        return sum(2 * s.batch_size * s.kv_heads * s.head_dim * esize(s.dtype) * (len(s.fp_positions) + 64)
                   for s in self.stores)


class XStoreBytes:
    """The byte checks of an XQuantCache: per layer one XStore per stream (X, its two latents, or
    XQuant-CL's delta), plus the token index every layer shares. Between steps the rotary tables
    and XQuant-CL's accumulator are released, so they are not part of the bytes in use here; if a
    step left them held, the store's accounting and this one differ and the check fails."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.xstores = [x for s in cache.stores for x in s.stores]

    def in_use(self) -> int:
        total = 0
        for x in self.xstores:
            B, q, w = x.batch_size, x.n_quantized, x.n_tokens - x.n_quantized
            total += B * q * x.width * x.bits // 8  # codes
            total += 2 * B * q * (x.width // x.group_size) * esize(x.scale_dtype)  # scales and zeros
            total += B * w * x.width * esize(x.window_dtype)  # window
        t = self.cache.tokens
        return total + t.batch_size * t.n * (8 + 1)  # int64 position and bool padding flag per token

    def allocated(self) -> int:
        acc = self.cache.accumulator
        return sum(held(x) for x in self.xstores) + held(self.cache.tokens) + (held(acc) if acc is not None else 0)

    def tokens(self) -> tuple[int, int, int]:
        x = self.xstores[0]
        return x.n_tokens, x.n_quantized, x.n_tokens - x.n_quantized

    def fp_token_bytes(self) -> int:
        return sum(x.batch_size * x.width * esize(x.window_dtype) for x in self.xstores)

    def slack(self) -> int:
        """The window keeps up to twice its tokens plus 64 before it gives capacity back."""
        return sum(x.batch_size * x.width * esize(x.window_dtype) * (x.n_tokens - x.n_quantized + 64)
                   for x in self.xstores)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two points)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def summarize(rows: list[dict], warmup: int) -> dict:
    """Slopes over the checks after `warmup` tokens: RSS beyond the cache's bytes, Python objects
    and RSS per token; bytes in use per quantized token (the change in full-precision tokens
    taken out)."""
    late = [r for r in rows if r["step"] >= warmup]
    if len(late) < 2:
        return {}
    xs = [r["tokens"] for r in late]
    first, last = late[0], late[-1]
    dq = last["quantized_tokens"] - first["quantized_tokens"]
    d_fp = (last["fp_tokens"] - first["fp_tokens"]) * last["fp_token_bytes"]
    return {
        "checked_from_token": first["tokens"], "checked_to_token": last["tokens"],
        "leak_bytes_per_token": slope(xs, [r["rss"] - r["allocated"] for r in late]),
        "gc_objects_per_token": slope(xs, [r["gc_objects"] for r in late]),
        "rss_bytes_per_token": slope(xs, [r["rss"] for r in late]),
        "bytes_per_quantized_token": (last["in_use"] - first["in_use"] - d_fp) / dq if dq else math.nan,
        "fp16_bytes_per_token": last["fp16_bytes_per_token"],
    }


def soak(m, prompt: torch.Tensor, name: str, tokens: int, every: int, warmup: int,
         on_check=lambda rows: None, policy: Policy | None = None) -> dict:
    """Decode `tokens` steps after `prompt` ``[1, P]`` with the registry's policy `name` (or
    `policy`, reported as `name`), checking as the module says; returns every figure."""
    cache = enable(m, policy if policy is not None else get_policy(name))
    proc = psutil.Process()
    rows, failures = [], []
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            logits = m(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            for step in tqdm(range(1, tokens + 1), desc=name, unit="tok", mininterval=5):
                logits = m(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                if not bool(logits.isfinite().all()):
                    failures.append(f"non-finite logits at step {step}")
                    break
                token = logits.argmax(-1, keepdim=True)
                if step % every and step != tokens:
                    continue
                acct = (XStoreBytes if isinstance(cache, XQuantCache) else KVStoreBytes)(cache)
                in_use, alloc = acct.in_use(), acct.allocated()
                br = cache.nbytes_breakdown()
                n_tokens, n_quantized, n_fp = acct.tokens()
                # collect first so the count is of live objects: uncollected garbage makes a
                # sawtooth whose rising edges read as a leak
                gc.collect()
                row = {
                    "step": step, "tokens": n_tokens, "nbytes": cache.nbytes(),
                    "allocated": alloc, "in_use": in_use, "store_in_use": cache.nbytes() - br["reserved"],
                    "quantized_tokens": n_quantized, "fp_tokens": n_fp, "fp_token_bytes": acct.fp_token_bytes(),
                    "fp16_bytes_per_token": cache.fp16_nbytes() / n_tokens,
                    "rss": proc.memory_info().rss, "gc_objects": len(gc.get_objects()),
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                on_check(rows)
                if row["in_use"] != row["store_in_use"]:
                    failures.append(f"step {step}: in use {in_use} by the formulas, {row['store_in_use']} by the store")
                if alloc != row["nbytes"]:
                    failures.append(f"step {step}: tensors hold {alloc} bytes, nbytes() says {row['nbytes']}")
                # capacity: at most one growth step beyond what is in use, plus the fp slack
                if alloc > GROWTH * in_use + acct.slack():
                    failures.append(f"step {step}: {alloc} bytes allocated for {in_use} in use")
    finally:
        m.set_attn_implementation("sdpa")
    res = {"policy": name, "tokens": tokens, "prompt": prompt.shape[1], "rows": rows, "failures": failures,
           "seconds": time.perf_counter() - t0}
    res.update(summarize(rows, warmup))
    if res.get("leak_bytes_per_token", 0) > LEAK_BYTES_PER_TOKEN:
        failures.append(f"RSS beyond the cache grows {res['leak_bytes_per_token']:.0f} bytes/token after warm-up")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=sorted(REGISTRY), choices=sorted(REGISTRY))
    ap.add_argument("--tokens", type=int, default=8192, help="decode steps per policy")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (Wikipedia)")
    ap.add_argument("--every", type=int, default=256, help="tokens between checks")
    ap.add_argument("--warmup", type=int, default=1024, help="tokens before the leak slopes are measured")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--report", metavar="JSON", help="only summarize the checks of an earlier run's --json "
                    "(also of a run that was stopped: its last policy is marked partial)")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            data = json.load(f)
        for r in data["results"]:
            rows = r["rows"]
            summary = summarize(rows, args.warmup)
            print(json.dumps({"policy": r["policy"], "partial": r.get("partial", False),
                              "decoded": rows[-1]["step"] if rows else 0, "failures": r.get("failures", []),
                              "last_check": rows[-1] if rows else None, **summary}, indent=1))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    m, tok = eval_model.load_model(progress=False)
    prompt = corpus.token_sequences(tok, corpus.wiki_corpus_text(), 1, args.prompt)
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    results = []

    def save(partial=None):
        if args.json:  # at every check, so a long run that is stopped keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"env": env, "results": results + ([partial] if partial else [])}, f, indent=1)

    for name in args.policies:
        r = soak(m, prompt, name, args.tokens, args.every, args.warmup,
                 on_check=lambda rows, name=name: save({"policy": name, "partial": True, "rows": rows}))
        results.append(r)
        end = r["rows"][-1] if r["rows"] else {}
        print(f"{name}: {r['tokens']} tokens in {r['seconds']:.0f} s; cache {end.get('nbytes', 0) / 2**20:.1f} MiB "
              f"({end.get('nbytes', 0) / max(1, end.get('tokens', 1)):.0f} B/token allocated, fp16 "
              f"{r.get('fp16_bytes_per_token', float('nan')):.0f}); "
              f"{r.get('bytes_per_quantized_token', float('nan')):.1f} B per quantized token; "
              f"RSS {end.get('rss', 0) / 2**20:.0f} MiB; RSS beyond cache "
              f"{r.get('leak_bytes_per_token', float('nan')):+.1f} B/token; Python objects "
              f"{r.get('gc_objects_per_token', float('nan')):+.3f}/token; "
              f"{'OK' if not r['failures'] else 'FAILED: ' + '; '.join(r['failures'][:3])}", flush=True)
        save()
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
