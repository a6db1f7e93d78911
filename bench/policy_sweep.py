"""Where a policy's bytes and error go: candidate configurations on the streaming evaluation.

Runs the protocol of ``torchkvq eval`` (``torchkvq.eval.protocol``: prefill ``--prompt`` tokens,
feed the rest in chunks of ``--chunk``, score every token after the prompt against the
full-precision cache on the same tokens) over the configurations of :data:`CONFIGS`, and prints
per configuration the quality (perplexity change, mean KL, top-1 agreement), the bytes the cache
holds per token (everything counted, as ``torchkvq eval`` counts it) with their breakdown
(``KVQCache.nbytes_breakdown()``: codes, scales, outliers, fp window, pinned, bookkeeping,
reserved capacity) and, for mixed-precision policies, how many blocks got each width.

The configurations are the registry's (``torchkvq.policies.REGISTRY``) plus the candidates this
file names; docs/results.md quotes its figures with the command that produced them.

    python bench/policy_sweep.py --configs qaq,qaq-g64-r32 [--n-seqs 4] [--json PATH]
    python bench/policy_sweep.py --list
    python bench/policy_sweep.py --bytes-only --configs kivi-2,logquant-2   # no model, seconds

``--bytes-only`` runs each store alone on random keys and values with the evaluation's append
schedule (prompt, then chunks) and the model's cache shape (30 layers, 3 KV heads, head_dim 64):
for policies whose decisions do not depend on the data (KIVI, LogQuant) that gives the bytes of
the real run exactly; QAQ's widths depend on attention, so it is refused there.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (shared machines)

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from torchkvq.eval import corpus, methods, model as model_lib, protocol  # noqa: E402
from torchkvq.policies import KIVI, QAQ, REGISTRY, LogQuant, Policy  # noqa: E402

F16 = torch.float16

#: Candidate configurations (name -> factory), on top of the registry's. KIVI and QAQ keep their
#: default 4 attention sinks unless a name says otherwise (``-s1``: one sink, ``-s0``: none).
CONFIGS: dict[str, Callable[[], Policy]] = {
    **REGISTRY,
    # KIVI with smaller windows (some with 64-token groups, 4-bit keys, one sink), for reference
    # points at higher compression
    "kivi-2-r32": lambda: KIVI(key_bits=2, value_bits=2, residual=32, window_dtype=F16),
    "kivi-2-g64-r32": lambda: KIVI(key_bits=2, value_bits=2, group_size=64, value_group_size=64,
                                   residual=32, window_dtype=F16),
    "kivi-k4v2-g64-r32": lambda: KIVI(key_bits=4, value_bits=2, group_size=64,
                                      value_group_size=64, residual=32, window_dtype=F16),
    "kivi-k4v2-g64-r32-s1": lambda: KIVI(key_bits=4, value_bits=2, group_size=64,
                                         value_group_size=64, residual=32, sinks=1,
                                         window_dtype=F16),
    "kivi-2-r160": lambda: KIVI(key_bits=2, value_bits=2, residual=160, window_dtype=F16),
    "kivi-2-r168": lambda: KIVI(key_bits=2, value_bits=2, residual=168, window_dtype=F16),
    # LogQuant at smaller windows (bytes toward KIVI-2's)
    "logquant-2-w28": lambda: LogQuant(window=28, bits=2, window_dtype=F16),
    "logquant-2-w29": lambda: LogQuant(window=29, bits=2, window_dtype=F16),
    # QAQ: the registry's budgets with one change at a time, then combinations
    "qaq-r32": lambda: QAQ(key_error=2.0, value_error=8.0, residual=32, window_dtype=F16),
    "qaq-g64": lambda: QAQ(key_error=2.0, value_error=8.0, group_size=64, value_group_size=64,
                           window_dtype=F16),
    "qaq-k-outliers": lambda: QAQ(key_error=2.0, value_error=8.0, value_outlier_fraction=0.0,
                                  window_dtype=F16),
    "qaq-s1": lambda: QAQ(key_error=2.0, value_error=8.0, sinks=1, window_dtype=F16),
    "qaq-s0": lambda: QAQ(key_error=2.0, value_error=8.0, sinks=0, window_dtype=F16),
    "qaq-min1": lambda: QAQ(key_error=2.0, value_error=8.0, min_bits=1, window_dtype=F16),
    "qaq-g64-r32": lambda: QAQ(key_error=2.0, value_error=8.0, group_size=64, value_group_size=64,
                               residual=32, outlier_fraction=0.0, window_dtype=F16),
    "qaq-g64-r32-s1": lambda: QAQ(key_error=2.0, value_error=8.0, group_size=64,
                                  value_group_size=64, residual=32, sinks=1,
                                  outlier_fraction=0.0, window_dtype=F16),
    "qaq-g64-r32-s1-kout": lambda: QAQ(key_error=2.0, value_error=8.0, group_size=64,
                                       value_group_size=64, residual=32, sinks=1,
                                       value_outlier_fraction=0.0, window_dtype=F16),
    "qaq-g64-r32-s1-min1": lambda: QAQ(key_error=2.0, value_error=8.0, min_bits=1, group_size=64,
                                       value_group_size=64, residual=32, sinks=1,
                                       outlier_fraction=0.0, window_dtype=F16),
    "qaq-g64-r32-s1-min1-v16": lambda: QAQ(key_error=2.0, value_error=16.0, min_bits=1,
                                           group_size=64, value_group_size=64, residual=32,
                                           sinks=1, outlier_fraction=0.0, window_dtype=F16),
}


def _method(name: str) -> methods.Method:
    factory = CONFIGS[name]

    def make(model):
        from torchkvq.hf import KVQCache

        return KVQCache(model.config, factory())

    return methods.Method(name, "torchkvq", make, lambda cache: cache.nbytes(), repr(factory()))


def _instrumented(m: methods.Method, sink: dict) -> methods.Method:
    """`m`, recording each finished cache's breakdown and block widths into ``sink[m.name]``."""

    def nbytes(cache) -> int:
        rec = sink.setdefault(m.name, {"breakdown": collections.Counter(), "widths": collections.Counter(),
                                       "tokens": 0})
        rec["breakdown"].update(cache.nbytes_breakdown())
        rec["tokens"] += cache.stores[0].n_tokens
        for s in cache.stores:
            rec["widths"].update(f"k{k}v{v}" for k, v in s.block_bits)
        return m.nbytes(cache)

    return methods.Method(m.name, m.kind, m.make_cache, nbytes, m.description)


def bytes_only(names: list[str], prompt: int, seq_len: int, chunk: int, layers: int = 30,
               kv_heads: int = 3, head_dim: int = 64) -> None:
    """Print the bytes per token (and their breakdown) each store holds after the evaluation's
    append schedule on random data: the tokens held are ``seq_len - 1``, as in the evaluation."""
    parts = ["codes", "scales", "outliers", "fp_window", "pinned", "bookkeeping", "reserved"]
    print("| config | bytes/token | × vs fp16 | in use (no reserve) | " + " | ".join(parts) + " |")
    print("|" + "---|" * (4 + len(parts)))
    fp16 = 2 * 2 * layers * kv_heads * head_dim
    n = seq_len - 1
    for name in names:
        policy = CONFIGS[name]()
        if policy.wants_stats:
            raise SystemExit(f"policy_sweep: {name}'s widths depend on attention; run it on the model")
        policy.validate()
        store, state = policy.make_store(1, kv_heads, head_dim, torch.float32, "cpu"), policy.new_state()
        gen = torch.Generator().manual_seed(0)
        t = 0
        while t < n:
            c = prompt if t == 0 else min(chunk, n - t)
            store.append(torch.randn(1, kv_heads, c, head_dim, generator=gen),
                         torch.randn(1, kv_heads, c, head_dim, generator=gen))
            policy.after_append(store, state)
            t += c
        bd = {k: v * layers / n for k, v in store.nbytes_breakdown().items()}
        total = store.nbytes() * layers / n
        print(f"| {name} | {total:,.0f} | {fp16 / total:.2f} | {total - bd['reserved']:,.0f} | "
              + " | ".join(f"{bd[k]:,.0f}" for k in parts) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="qaq,qaq-no-outliers", help="comma-separated names (see --list)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    p.add_argument("--text", choices=["wiki", "long"], default="wiki")
    p.add_argument("--n-seqs", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1536)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--json", type=pathlib.Path, default=None, help="write every figure here")
    p.add_argument("--bytes-only", action="store_true",
                   help="bytes of KIVI/LogQuant stores on random data with the evaluation's schedule (no model)")
    args = p.parse_args(argv)
    if args.list:
        for name, f in CONFIGS.items():
            print(f"{name:24s} {f()!r}")
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"policy_sweep: unknown configuration(s) {unknown}; see --list")
    if args.bytes_only:
        bytes_only(names, args.prompt, args.seq_len, args.chunk)
        return 0

    model, tokenizer = model_lib.load_model("smollm2-135m")
    import torchkvq.hf

    model.set_attn_implementation(torchkvq.hf.ATTN_IMPLEMENTATION)
    text = corpus.wiki_corpus_text() if args.text == "wiki" else corpus.long_text()[0]
    sequences = corpus.token_sequences(tokenizer, text, args.n_seqs, args.seq_len, args.offset)
    details: dict = {}
    chosen = [methods.all_methods()[methods.BASELINE]] + [_instrumented(_method(n), details) for n in names]
    with tqdm(total=len(chosen) * args.n_seqs, desc="sweep", unit="seq") as bar:
        results = protocol.evaluate(model, chosen, sequences, args.prompt, args.chunk, progress=bar)

    cfg = model.config
    fp16 = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    base = results[methods.BASELINE].perplexity
    parts = ["codes", "scales", "outliers", "fp_window", "pinned", "bookkeeping", "reserved"]
    print("| config | Δppl % | KL | top-1 | bytes/token | × vs fp16 | " + " | ".join(parts) + " | block widths |")
    print("|" + "---|" * (7 + len(parts)))
    rows = []
    for name in names:
        r, d = results[name], details[name]
        per_token = {k: d["breakdown"][k] / d["tokens"] for k in parts}  # tokens held, as the table counts
        widths = dict(sorted(d["widths"].items()))
        row = {"config": name, "policy": repr(CONFIGS[name]()), "d_ppl_pct": 100 * (r.perplexity - base) / base,
               "kl": r.mean_kl, "top1": r.top1_agreement, "bytes_per_token": r.bytes_per_token,
               "ratio_vs_fp16": fp16 / r.bytes_per_token, "breakdown_per_token": per_token,
               "block_widths": widths}
        rows.append(row)
        total_blocks = sum(widths.values()) or 1
        wtxt = ", ".join(f"{w} {100 * c / total_blocks:.0f}%" for w, c in widths.items())
        print(f"| {name} | {row['d_ppl_pct']:+.2f} | {row['kl']:.4f} | {row['top1']:.3f} | "
              f"{row['bytes_per_token']:,.0f} | {row['ratio_vs_fp16']:.2f} | "
              + " | ".join(f"{per_token[k]:,.0f}" for k in parts) + f" | {wtxt} |")
    if args.json:
        settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
        settings["command"] = "python bench/policy_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
        args.json.write_text(json.dumps({"settings": settings, "machine": protocol.machine_info(),
                                         "fp32_ppl": base, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
