"""Greedy generation on the real model (bundled SmolLM2-135M, fp32, CPU): decode speed and memory
of every cache in one run.

Methods (``torchkvq.eval.methods.all_methods()``): ``fp32`` (transformers DynamicCache),
``hf-quanto-4`` / ``hf-quanto-2`` (transformers QuantizedCache, quanto backend: group 64,
residual 128) and the torchkvq policies ``kivi-4``, ``kivi-2``, ``kivi-2-g128`` (KVQCache).
The model runs with torchkvq's attention implementation for every method, as ``torchkvq eval``
does; with a cache other than KVQCache it is transformers' SDPA attention, unchanged.

Protocol, for each prompt length P (the first P tokens of the deterministic wiki corpus from
``--offset``; the shorter prompt is a prefix of the longer) and each method:

1. prefill: one forward over the P prompt tokens into a fresh cache, ``logits_to_keep=1``
   (as ``model.generate`` does; full logits of a 4k prompt would be 0.8 GB), timed;
2. ``gc.collect()`` + ``malloc_trim(0)``, then the peak RSS (VmHWM) is reset through
   ``/proc/self/clear_refs``;
3. decode: a manual greedy loop (as ``protocol.decode_speed``, not ``model.generate``) of
   ``--new-tokens`` steps, one token per forward, EOS ignored, each step timed;
4. the cache's bytes (counted as ``methods.py`` counts them; ``nbytes_breakdown()`` for KVQCache)
   and VmHWM are read.

Repeats run round-robin (repeat r, then prompt, then methods in an order rotated by r) so that
a load change on a shared machine hits every method alike. Prefill seconds and decode tokens/s
are medians over repeats. After the last repeat, two more decode steps of the same cache run
under ``torch.profiler.profile(profile_memory=True)``: the second step's peak of live torch
allocations above its starting level is the step's transient memory as torch sees it, and the
profile's per-op self CPU time says where a step's time goes.

Memory figures (MiB):

* ``peak_rss``: VmHWM during decode (model weights, Python and torch included);
* ``peak_over_base``: VmHWM during decode minus VmRSS before the cache was created (after
  ``malloc_trim``): the cache plus everything decoding allocates on top of the model;
* ``transient``: VmHWM during decode minus VmRSS at its start (cache already held);
* ``prof_step_peak``: the profiler's peak of live torch allocations in one decode step above its
  starting level (torch's allocator only; scratch a C++ kernel takes from ``std::vector`` and
  freed-but-retained malloc memory are invisible to it).

    python bench/generate.py [--prompts 1024,4096] [--new-tokens 64] [--repeats 3] [--json PATH]
    python bench/generate.py --quick      # smoke test: P=128, 8 tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# On a machine shared with other processes, OpenMP's default active waiting makes every parallel
# region of a multi-threaded run wait for descheduled workers (see bench/attention.py); PASSIVE
# must be set before torch loads OpenMP. An explicit OMP_WAIT_POLICY in the environment wins.
OMP_WAIT_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402

MiB = 1 << 20
DEFAULT_METHODS = ["fp32", "hf-quanto-4", "hf-quanto-2", "kivi-4", "kivi-2", "kivi-2-g128"]


# --------------------------------------------------------------------------------------------
# process memory and machine facts
# --------------------------------------------------------------------------------------------


def status_kib(key: str) -> int | None:
    return machine.proc_kib("/proc/self/status", key)


def rss_mib() -> float | None:
    v = status_kib("VmRSS")
    return None if v is None else v / 1024


def hwm_mib() -> float | None:
    v = status_kib("VmHWM")
    return None if v is None else v / 1024


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs sets VmHWM back to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def versions() -> dict:
    out = {}
    for mod in ("transformers", "optimum.quanto", "gguf", "tokenizers"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except ImportError:
            out[mod] = None
    return out


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def fp16_bytes(config, tokens: int) -> int:
    """Bytes an fp16 cache of `tokens` tokens takes for this model (keys and values)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens


def _step(model, token, cache):
    out = model(token, past_key_values=cache, use_cache=True)
    return out.logits[:, -1:].argmax(-1)


def profile_step(model, token, cache, top: int = 8) -> dict:
    """Two decode steps under torch.profiler (CPU, profile_memory). The first only makes the
    second's frees visible (the profiler cannot see frees of blocks allocated before it
    started); the second gives the peak of live torch allocations above its starting level.
    Op times are per step (the two steps' totals halved)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("bench_generate::warm_step"):
            token = _step(model, token, cache)
        with record_function("bench_generate::step"):
            token = _step(model, token, cache)
    result: dict = {"ok": False}
    try:
        events = list(prof.profiler.kineto_results.events())
        mark = next(e for e in events if e.name() == "bench_generate::step")
        t0, t1 = mark.start_ns(), mark.end_ns()
        mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
        level = sum(e.nbytes() for e in mem if e.start_ns() < t0)
        start, peak, allocated = level, level, 0
        for e in mem:
            if t0 <= e.start_ns() <= t1:
                level += e.nbytes()
                peak = max(peak, level)
                allocated += max(e.nbytes(), 0)
        result.update(ok=True, step_peak_bytes=peak - start, step_end_bytes=level - start,
                      step_allocated_bytes=allocated, step_wall_s=(t1 - t0) / 1e9)
    except (AttributeError, StopIteration, RuntimeError) as e:  # profiler internals changed
        result["error"] = repr(e)
    try:
        # The two step annotations' self time is what no profiled op covers: Python and
        # framework overhead; it is reported as one row.
        per_op: dict[str, list[float]] = {}
        for a in prof.key_averages():
            key = "(python/framework)" if a.key.startswith("bench_generate::") else a.key
            row = per_op.setdefault(key, [0.0, 0])
            row[0] += a.self_cpu_time_total
            row[1] += a.count
        total = sum(v[0] for v in per_op.values())
        ranked = sorted(per_op.items(), key=lambda kv: kv[1][0], reverse=True)
        result["self_cpu_ms_per_step"] = total / 2 / 1e3
        result["top_ops"] = [
            {"op": k, "self_cpu_ms_per_step": v[0] / 2 / 1e3, "calls_per_step": v[1] / 2,
             "share": v[0] / total if total else 0}
            for k, v in ranked[:top]
        ]
    except Exception as e:  # noqa: BLE001 - a profiler summary is optional
        result["top_ops_error"] = repr(e)
    return result


@torch.inference_mode()
def run_once(model, method, ids: torch.Tensor, new_tokens: int, profile: bool) -> dict:
    """Prefill `ids` ``[1, P]`` into a fresh cache of `method`, decode `new_tokens` greedily."""
    machine.free_memory()
    rss_base = rss_mib()
    cache = method.make_cache(model)
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    del out
    machine.free_memory()
    rss_start = rss_mib()
    can_peak = reset_peak_rss()
    load_before = machine.loadavg()
    tokens, steps = [], []
    for _ in range(new_tokens):
        tokens.append(int(token))
        s = time.perf_counter()
        token = _step(model, token, cache)
        steps.append(time.perf_counter() - s)
    peak = hwm_mib() if can_peak else None
    rec = {
        "prefill_s": prefill_s,
        "decode_s": sum(steps),
        "tokens_per_s": new_tokens / sum(steps),
        "step_s": steps,
        "tokens": tokens,
        "cache_tokens": ids.shape[1] + new_tokens,
        "cache_bytes": method.nbytes(cache),
        "fp16_bytes": fp16_bytes(model.config, ids.shape[1] + new_tokens),
        "rss_base_mib": rss_base,
        "rss_decode_start_mib": rss_start,
        "peak_rss_mib": peak,
        "loadavg_before_decode": load_before,
        "loadavg_after_decode": machine.loadavg(),
    }
    if hasattr(cache, "nbytes_breakdown"):
        rec["nbytes_breakdown"] = cache.nbytes_breakdown()
        rec["kvq_fp16_nbytes"] = cache.fp16_nbytes()
    if profile:
        rec["profile"] = profile_step(model, token, cache)
    del cache, token
    machine.free_memory()
    return rec


def summarize(runs: list[dict], fp_tokens: list[int] | None) -> dict:
    last = runs[-1]
    tps = [r["tokens_per_s"] for r in runs]
    peaks = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"] is not None]
    s = {
        "prefill_s_median": statistics.median(r["prefill_s"] for r in runs),
        "tokens_per_s_median": statistics.median(tps),
        "tokens_per_s_min": min(tps),
        "tokens_per_s_max": max(tps),
        "step_ms_median_all": 1e3 * statistics.median(x for r in runs for x in r["step_s"]),
        "cache_bytes": last["cache_bytes"],
        "fp16_bytes": last["fp16_bytes"],
        "ratio_vs_fp16": last["cache_bytes"] / last["fp16_bytes"],
        "peak_rss_mib_median": statistics.median(peaks) if peaks else None,
        "peak_over_base_mib_median": statistics.median(
            r["peak_rss_mib"] - r["rss_base_mib"] for r in runs if r["peak_rss_mib"] is not None
        ) if peaks else None,
        "transient_mib_median": statistics.median(
            r["peak_rss_mib"] - r["rss_decode_start_mib"] for r in runs if r["peak_rss_mib"] is not None
        ) if peaks else None,
    }
    if "nbytes_breakdown" in last:
        s["nbytes_breakdown"] = last["nbytes_breakdown"]
    prof = next((r["profile"] for r in reversed(runs) if "profile" in r), None)
    if prof is not None:
        s["profile"] = prof
    if fp_tokens is not None:
        toks = runs[0]["tokens"]
        same = 0
        for a, b in zip(toks, fp_tokens):
            if a != b:
                break
            same += 1
        s["same_tokens_as_fp32"] = same
    return s


def table(summary: dict, prompts: list[int], names: list[str], new_tokens: int) -> str:
    hdr = ("| method | prompt | prefill s | decode tok/s (min–max) | cache MiB | vs fp16 | "
           "peak RSS MiB | peak − base MiB | transient MiB | profiler step peak MiB | "
           f"same tokens as fp32 (of {new_tokens}) |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for P in prompts:
        for n in names:
            s = summary[str(P)][n]
            prof = s.get("profile", {})
            pk = f"{prof['step_peak_bytes'] / MiB:.1f}" if prof.get("ok") else "–"

            def f(x, fmt):
                return "–" if x is None else format(x, fmt)

            lines.append(
                f"| {n} | {P} | {s['prefill_s_median']:.2f} | {s['tokens_per_s_median']:.2f} "
                f"({s['tokens_per_s_min']:.2f}–{s['tokens_per_s_max']:.2f}) | "
                f"{s['cache_bytes'] / MiB:.2f} | {s['ratio_vs_fp16']:.3f}× | "
                f"{f(s['peak_rss_mib_median'], '.0f')} | {f(s['peak_over_base_mib_median'], '.1f')} | "
                f"{f(s['transient_mib_median'], '.1f')} | {pk} | "
                f"{s.get('same_tokens_as_fp32', '–')} |"
            )
    return "\n".join(lines)


def profile_table(summary: dict, P: int, names: list[str], top: int = 5) -> str:
    out = [f"Where one decode step's time goes at prompt {P} (torch.profiler, self CPU ms per step):"]
    for n in names:
        prof = summary[str(P)][n].get("profile")
        if not prof or "top_ops" not in prof:
            continue
        ops = ", ".join(f"{o['op']} {o['self_cpu_ms_per_step']:.1f} ({o['share']:.0%})"
                        for o in prof["top_ops"][:top])
        out.append(f"  {n:12s} total {prof['self_cpu_ms_per_step']:.1f} ms: {ops}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", default="1024,4096", help="comma list of prompt lengths (tokens)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--repeats", type=int, default=3, help="prefill+decode runs per method and prompt")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list (default {','.join(DEFAULT_METHODS)}); fp32 is always run first")
    p.add_argument("--offset", type=int, default=0, help="first corpus token of the prompt")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler decode step")
    p.add_argument("--quick", action="store_true", help="smoke test: P=128, 8 tokens, 1 repeat")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.repeats = "128", 8, 1
    prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
    if not prompts or min(prompts) < 1 or args.new_tokens < 1 or args.repeats < 1:
        p.error("--prompts, --new-tokens and --repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchkvq.hf
    from torchkvq.eval import corpus, methods as methods_lib, model as model_lib, protocol

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    try:
        chosen = methods_lib.resolve(names)  # fp32 first
    except ValueError as e:
        p.error(str(e))
    names = [m.name for m in chosen]

    load_start = machine.loadavg()
    t = time.perf_counter()
    model, tokenizer = model_lib.load_model(progress=False)
    model.set_attn_implementation(torchkvq.hf.ATTN_IMPLEMENTATION)
    model.eval()
    load_s = time.perf_counter() - t
    text = corpus.wiki_corpus_text()
    seqs = {P: corpus.token_sequences(tokenizer, text, 1, P, args.offset) for P in prompts}
    print(f"model loaded in {load_s:.1f} s; threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; loadavg {load_start}", file=sys.stderr)

    # Warm-up, untimed: every method's code path once on a short prompt, so that lazily mapped
    # weights are resident and lazy imports are done before any figure is taken.
    warm_ids = seqs[min(prompts)][:, :16]
    for m in chosen:
        run_once(model, m, warm_ids, 2, profile=False)

    runs: dict[int, dict[str, list[dict]]] = {P: {n: [] for n in names} for P in prompts}
    loads = []
    started = time.perf_counter()
    for r in range(args.repeats):
        order = chosen[r % len(chosen):] + chosen[: r % len(chosen)]
        for P in prompts:
            for m in order:
                rec = run_once(model, m, seqs[P], args.new_tokens,
                               profile=args.profile and r == args.repeats - 1)
                rec["repeat"] = r
                runs[P][m.name].append(rec)
                loads.append(rec["loadavg_after_decode"])
                print(f"[{time.perf_counter() - started:7.0f} s] repeat {r} P={P} {m.name:12s} "
                      f"prefill {rec['prefill_s']:.2f} s, {rec['tokens_per_s']:.2f} tok/s, "
                      f"peak RSS {rec['peak_rss_mib']:.0f} MiB, load {rec['loadavg_after_decode']}",
                      file=sys.stderr)
    load_end = machine.loadavg()

    summary = {str(P): {} for P in prompts}
    for P in prompts:
        fp_tokens = runs[P][names[0]][0]["tokens"]
        for n in names:
            summary[str(P)][n] = summarize(runs[P][n], None if n == names[0] else fp_tokens)

    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]) if argv is None else str(argv)
    print(table(summary, prompts, names, args.new_tokens))
    if args.profile:
        print()
        print(profile_table(summary, max(prompts), names))
    facts = protocol.machine_info()
    facts.update({
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_wait_policy_set_by_script": OMP_WAIT_POLICY_DEFAULTED,
        "platform": platform.platform(),
        "torchkvq_commit": machine.git_commit(),
        "versions": versions(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "loadavg_max_seen": max((l[0] for l in loads if l), default=None),
    })
    print(f"\nloadavg (1, 5, 15 min) at start {load_start}, at end {load_end}, on {os.cpu_count()} "
          f"CPUs; threads {torch.get_num_threads()}; {facts['cpu']}")
    if args.json:
        out = {
            "benchmark": "bench/generate.py",
            "command": cmd,
            "date": machine.now(),
            "settings": {"prompts": prompts, "new_tokens": args.new_tokens, "repeats": args.repeats,
                         "methods": names, "offset": args.offset, "text": "wiki",
                         "decode": "manual greedy loop, one token per forward, after a prefill "
                                   "with logits_to_keep=1",
                         "attn_implementation": torchkvq.hf.ATTN_IMPLEMENTATION},
            "model_load_s": load_s,
            "machine": facts,
            "descriptions": {m.name: m.description for m in chosen},
            "summary": summary,
            "runs": {str(P): v for P, v in runs.items()},
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"written {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
