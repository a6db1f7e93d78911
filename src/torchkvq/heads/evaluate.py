"""Held-out perplexity of KV-head-merged models: variants, per-part ablations, recovery.

``python -m torchkvq.heads.evaluate --help``. Calibration: ``--calib-seqs`` Wikipedia windows
of ``--calib-len`` tokens from ``--calib-offset``; evaluation: ``--eval-seqs`` windows of
``--eval-len`` tokens from ``--eval-offset`` (the two must not overlap). Perplexity is the plain
full-sequence one (a full-precision cache gives the same); ``torchkvq eval --methods
heads-1,heads-1+kivi-4`` measures the merged model under the streaming protocol and cache
policies. One calibration pass of the original model serves every one-pass variant and the
per-layer ablation (``--per-layer``: one layer's keys, or values, replaced by their
reconstruction at a time, all other layers untouched).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

from .compress import REFINE_TARGETS
from .finetune import RECOVER_TRAIN

_PLAIN = dict(key_weighting="none", value_weighting="none")
#: name -> compress() keyword arguments; "moments" marks the one-pass variants
VARIANTS = {
    "activations": {},  # the default: sequential calibration + o_proj refit
    "activations-no-refit": dict(refit=False),
    "activations-refit-mlp": dict(refit_mlp="layer"),
    "activations-refit-mlp-stream": dict(refit_mlp="stream"),
    "activations-one-pass": dict(moments=True),
    "activations-one-pass-plain": dict(moments=True, **_PLAIN),
    "weights": dict(init="weights"),
    "weights-plain": dict(init="weights", **_PLAIN),
    # diagnostics: old head count, only the keys (or values) replaced by their reconstruction
    "keys-only": dict(moments=True, emulate="keys"),
    "values-only": dict(moments=True, emulate="values"),
    "weights-keys-only": dict(init="weights", emulate="keys"),
    "weights-values-only": dict(init="weights", emulate="values"),
}


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every window ``[n, T]`` (each read from its start)."""
    nll, n = 0.0, 0
    for row in windows:
        out = model(row[None], labels=row[None], use_cache=False)
        nll += float(out.loss) * (row.numel() - 1)
        n += row.numel() - 1
    return float(torch.tensor(nll / n).exp())


def per_layer(model, moments, kv_heads: int, windows: torch.Tensor, parts=("keys", "values"),
              progress: bool = True) -> list[dict]:
    """Perplexity with one layer's keys (or values) replaced by their merged reconstruction."""
    from tqdm.auto import tqdm

    from .calibrate import attention_modules
    from .merge import emulate_plan, plan_layer

    sums, tokens = moments
    mods = attention_modules(model)
    rows = []
    for i in tqdm(range(len(mods)), desc="per-layer ablation", unit="layer", disable=not progress):
        attn = mods[i]
        plan = plan_layer(attn, kv_heads, sums[i] / tokens)
        row = {"layer": i, "key_energy": plan.report.key_energy, "value_energy": plan.report.value_energy}
        for part in parts:
            saved = {n: p.detach().clone() for n, p in attn.named_parameters()}
            emulate_plan(attn, plan, keys=part == "keys", values=part == "values")
            row[part] = perplexity(model, windows)
            with torch.no_grad():
                for n, p in attn.named_parameters():
                    p.copy_(saved[n])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchkvq.heads.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--variants", default="activations,weights",
                   help=f"comma-separated, from {', '.join(VARIANTS)} ('' for none)")
    p.add_argument("--per-layer", action="store_true", help="also the per-layer keys/values ablation")
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--calib-offset", type=int, default=100_000)
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--eval-offset", type=int, default=500_000)
    p.add_argument("--recover-steps", type=int, default=0,
                   help="after merging, distil the original into each variant for this many steps "
                        "(torchkvq.heads.finetune.recover: one calibration window per step)")
    p.add_argument("--recover-lr", type=float, default=1e-4)
    p.add_argument("--recover-train", default="attention", choices=RECOVER_TRAIN,
                   help="what the distillation trains: the attention projections (default) or every parameter")
    p.add_argument("--recover-seqs", type=int, default=None,
                   help="distil on this many windows of --calib-len tokens from --calib-offset "
                        "(default: the calibration windows)")
    p.add_argument("--recover-eval-every", type=int, default=0,
                   help="also measure held-out perplexity every this many distillation steps")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="layer-wise refinement steps per layer for the sequential variants "
                        "(compress(refine_steps=...); torchkvq.heads.refine)")
    p.add_argument("--refine-lr", type=float, default=1e-3)
    p.add_argument("--refine-target", default="layer", choices=REFINE_TARGETS)
    p.add_argument("--refine-damping", type=float, default=0.0,
                   help="fisher target: add this multiple of the mean weight to every weight")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)

    from ..eval import corpus
    from ..eval.model import load_model
    from .calibrate import collect_input_moments
    from .compress import compress

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if args.recover_steps < 0 or args.recover_eval_every < 0 or (args.recover_seqs is not None and args.recover_seqs < 1):
        raise SystemExit("--recover-steps and --recover-eval-every must be >= 0, --recover-seqs >= 1")
    if not args.recover_steps and (args.recover_seqs or args.recover_eval_every or args.recover_train != "attention"):
        raise SystemExit("--recover-seqs, --recover-eval-every and --recover-train need --recover-steps N (N >= 1)")
    train_seqs = max(args.calib_seqs, args.recover_seqs or 0) if args.recover_steps else args.calib_seqs
    calib_end = args.calib_offset + train_seqs * args.calib_len
    eval_end = args.eval_offset + args.eval_seqs * args.eval_len
    if not (calib_end <= args.eval_offset or eval_end <= args.calib_offset):
        raise SystemExit("calibration (or distillation) and evaluation tokens overlap")
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tok = load_model(args.model)
    text = corpus.wiki_corpus_text()
    calib = corpus.token_sequences(tok, text, args.calib_seqs, args.calib_len, args.calib_offset)
    evals = corpus.token_sequences(tok, text, args.eval_seqs, args.eval_len, args.eval_offset)
    distil = calib
    if args.recover_steps and args.recover_seqs:
        distil = corpus.token_sequences(tok, text, args.recover_seqs, args.calib_len, args.calib_offset)
    moments = None
    if args.per_layer or any(VARIANTS[v].get("moments") for v in variants):
        moments = collect_input_moments(base, [calib])

    ref = perplexity(base, evals)
    rows = [{"variant": "original", "kv_heads": base.config.num_key_value_heads, "ppl": ref}]
    print(json.dumps(rows[-1]), file=sys.stderr)
    for v in variants:
        kw = dict(VARIANTS[v])
        if kw.pop("moments", False):
            kw["moments"] = moments
        if args.refine_steps and "moments" not in kw and kw.get("init", "activations") == "activations" \
                and "emulate" not in kw:
            kw.update(refine_steps=args.refine_steps, refine_lr=args.refine_lr, refine_target=args.refine_target,
                      refine_damping=args.refine_damping)
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        compress(m, calib, kv_heads=args.kv_heads, **kw)
        merge_s = round(time.perf_counter() - t0, 1)
        rep = m.torchkvq_heads_report
        row = {"variant": v, "kv_heads": m.config.num_key_value_heads, "ppl": perplexity(m, evals),
               "merge_s": merge_s,
               "key_energy": sum(r.key_energy for r in rep.layers) / len(rep.layers),
               "value_energy": sum(r.value_energy for r in rep.layers) / len(rep.layers),
               "method": rep.method}
        if rep.layers[0].refine_error is not None:
            row["refine_error"] = [[round(a, 5), round(b, 5)] for a, b in (r.refine_error for r in rep.layers)]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        if args.recover_steps:
            from .finetune import recover

            curve = []

            def held_out(step, kl, m=m):
                if args.recover_eval_every and step % args.recover_eval_every == 0:
                    curve.append({"step": step, "kl": round(kl, 5), "ppl": perplexity(m, evals)})
                    print(json.dumps(curve[-1]), file=sys.stderr)

            t0 = time.perf_counter()
            kls = recover(m, base, distil, steps=args.recover_steps, lr=args.recover_lr, train=args.recover_train,
                          on_step=held_out)
            recover_s = round(time.perf_counter() - t0, 1)
            done = curve and curve[-1]["step"] == args.recover_steps  # the last point is the final model
            rows.append({"variant": f"{v}+recover({args.recover_steps}x{args.recover_lr:g},{args.recover_train},"
                                    f"{distil.shape[0]} windows)",
                         "kv_heads": m.config.num_key_value_heads,
                         "ppl": curve[-1]["ppl"] if done else perplexity(m, evals),
                         "recover_s": recover_s, "kl_first": kls[0], "kl_last": kls[-1], "curve": curve})
            print(json.dumps(rows[-1]), file=sys.stderr)
        del m

    print("| variant | KV heads | ppl | vs original |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kv_heads']} | {r['ppl']:.2f} | {100 * (r['ppl'] / ref - 1):+.1f}% |")
    layer_rows = []
    if args.per_layer:
        layer_rows = per_layer(base, moments, args.kv_heads, evals)
        print("\n| layer | keys only: ppl | vs original | values only: ppl | vs original |\n|---|---|---|---|---|")
        for r in layer_rows:
            print(f"| {r['layer']} | {r['keys']:.2f} | {100 * (r['keys'] / ref - 1):+.1f}% | "
                  f"{r['values']:.2f} | {100 * (r['values'] / ref - 1):+.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "per_layer": layer_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
