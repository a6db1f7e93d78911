"""The ``torchkvq`` command line: ``torchkvq eval`` compares every method on a real model."""

from __future__ import annotations

import argparse
import pathlib
import sys


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare every cache method on a real model and real text (table, CSV/JSON, plot)",
        description="Streaming evaluation: prefill --prompt tokens, feed the rest in chunks of "
        "--chunk tokens through each cache, score every token after the prompt against the "
        "full-precision cache on the same tokens.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="the bundled SmolLM2-135M (default) or a local transformers causal-LM folder")
    p.add_argument("--methods", default="default",
                   help="comma-separated method names; 'default' (one configuration of every method, "
                   "marked * by --list-methods); 'all' (every registry entry; no heads-K)")
    p.add_argument("--list-methods", action="store_true", help="print the known methods and exit")
    p.add_argument("--text", choices=["wiki", "long"], default="wiki",
                   help="wiki: Wikipedia lead sections (default); long: one long coherent book")
    p.add_argument("--n-seqs", type=int, default=4, help="sequences (default 4)")
    p.add_argument("--seq-len", type=int, default=1536, help="tokens per sequence (default 1536)")
    p.add_argument("--prompt", type=int, default=1024, help="prefilled tokens P (default 1024)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per chunk C after the prompt (default 32; 1 = exact decoding)")
    p.add_argument("--offset", type=int, default=0, help="token offset of the first sequence in the text")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="greedy tokens decoded one by one after a --prompt-token prefill, for tokens/s (0 skips)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"),
                   help="folder for results.csv, results.json and results.png (default ./results)")
    p.add_argument("--json", type=pathlib.Path, default=None, help="also write the JSON here")
    p.add_argument("--heads-calibration-tokens", type=int, default=16384,
                   help="calibration tokens of heads-K methods (Wikipedia, disjoint from the evaluated "
                   "tokens; default 16384)")
    p.add_argument("--heads-refine-steps", type=int, default=0,
                   help="layer-wise refinement steps per layer of heads-K merges (compress(refine_steps=...); "
                   "default 0 = off; docs/heads.md)")
    p.add_argument("--heads-refine-lr", type=float, default=1e-3,
                   help="peak learning rate of --heads-refine-steps (default 1e-3)")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import torch
    from tqdm import tqdm

    from .eval import corpus, methods, model as model_lib, protocol, report

    if args.list_methods:
        for name, m in methods.all_methods().items():
            mark = "*" if name in methods.DEFAULT else " "
            print(f"{mark} {name:16s} {m.kind:9s} {m.description}")
        heads = ", ".join(n for n in methods.DEFAULT if n.startswith("heads-"))
        print(f"{'*' if heads else ' '} {'heads-K[+M]':16s} {'heads':9s} method M (default fp32) on the model with its KV heads "
              f"merged into K (torchkvq.heads; not part of 'all'; default: {heads or 'none'})")
        print("\n* = part of the default run (--methods default)")
        return 0
    if not 0 < args.prompt < args.seq_len:
        raise SystemExit(f"torchkvq eval: --prompt must be in (0, --seq-len={args.seq_len}), got {args.prompt}")
    if args.chunk < 1 or args.n_seqs < 1:
        raise SystemExit("torchkvq eval: --chunk and --n-seqs must be >= 1")
    if args.decode_tokens < 0:
        raise SystemExit(f"torchkvq eval: --decode-tokens must be >= 0 (0 skips the decode timing), "
                         f"got {args.decode_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = methods.names_from(args.methods)
    try:
        chosen = methods.resolve(names)
    except ValueError as e:
        raise SystemExit(f"torchkvq eval: {e}")

    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = model_lib.load_model(args.model)
    import torchkvq.hf

    model.set_attn_implementation(torchkvq.hf.ATTN_IMPLEMENTATION)
    if args.text == "wiki":
        text, source = corpus.wiki_corpus_text(), {"text": "wiki"}
    else:
        text, source = corpus.long_text()
    sequences = corpus.token_sequences(tokenizer, text, args.n_seqs, args.seq_len, args.offset)
    models = {}
    heads = {m.kv_heads for m in chosen if m.kv_heads is not None}
    if heads:
        from .eval import transforms

        try:
            calib, source["heads_calibration_offset"] = transforms.calibration_tokens(
                tokenizer, args.heads_calibration_tokens, 512, args.text, args.offset,
                args.offset + args.n_seqs * args.seq_len)
            merged = transforms.merged_models(model, heads, calib, refine_steps=args.heads_refine_steps,
                                              refine_lr=args.heads_refine_lr)
        except ValueError as e:
            raise SystemExit(f"torchkvq eval: {e}")
        source["heads_calibration_tokens"] = calib.numel()
        source["heads_method"] = next(iter(merged.values())).torchkvq_heads_report.method
        models = {m.name: merged[m.kv_heads] for m in chosen if m.kv_heads is not None}

    with tqdm(total=len(chosen) * args.n_seqs, desc="streaming eval", unit="seq") as bar:
        results = protocol.evaluate(model, chosen, sequences, args.prompt, args.chunk, progress=bar,
                                    models=models)
    if args.decode_tokens:
        for m in tqdm(chosen, desc="decode speed", unit="method"):
            tps, peak, nbytes = protocol.decode_speed(models.get(m.name, model), m, sequences[:1, : args.prompt],
                                                      args.decode_tokens)
            r = results[m.name]
            r.decode_tokens_per_s, r.decode_peak_rss_mib, r.decode_cache_bytes = tps, peak, nbytes

    cfg = model.config
    fp16_per_token = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * getattr(
        cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    table_rows = report.rows(results, fp16_per_token)
    settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items() if k != "func"}
    settings["source"] = source
    settings["command"] = "torchkvq " + " ".join(sys.argv[1:])
    machine = protocol.machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_csv(table_rows, args.out / "results.csv")
    report.write_json(table_rows, settings, machine, args.out / "results.json")
    if args.json:
        report.write_json(table_rows, settings, machine, args.json)
    title = (f"{args.model}, {args.text} text: {args.n_seqs}×{args.seq_len} tokens, "
             f"prompt {args.prompt}, chunk {args.chunk}")
    report.plot(table_rows, args.out / "results.png", title)
    print(report.table(table_rows))
    print(f"\nfp16 cache: {fp16_per_token:,} bytes/token. Written: {args.out / 'results.csv'}, "
          f"{args.out / 'results.json'}, {args.out / 'results.png'}")
    return 0


def _compress_heads_parser(sub) -> None:
    p = sub.add_parser(
        "compress-heads",
        help="merge groups of KV heads into one (fewer KV heads, RoPE-aware) and save the model",
        description="Low-rank KV-head merging (docs/heads.md): calibrate on Wikipedia text, merge every "
        "group of adjacent KV heads into one shared head, fold the reconstructions into the query "
        "and output projections, and save an ordinary transformers model (+ tokenizer) to --out.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="the bundled SmolLM2-135M (default) or a local transformers causal-LM folder")
    p.add_argument("--kv-heads", type=int, required=True, help="new number of KV heads (must divide the current one)")
    p.add_argument("--init", choices=["activations", "weights"], default="activations",
                   help="PCA of calibration activations (default) or of the weights alone")
    p.add_argument("--calibration-tokens", type=int, default=16384,
                   help="Wikipedia tokens to calibrate on (default 16384; ignored with --init weights)")
    p.add_argument("--calibration-offset", type=int, default=100_000,
                   help="token offset of the calibration text in the Wikipedia corpus (default 100000, "
                   "clear of the windows torchkvq eval reads by default)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--one-pass", action="store_true",
                   help="calibrate every layer on one pass of the original model (default: layer by "
                   "layer on the merged model's own hidden states, with an o_proj refit)")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="layer-wise refinement: Adam steps per layer on the attention output after the merge "
                   "(calibration only, no end-to-end loss; default 0 = off; not with --one-pass; docs/heads.md)")
    p.add_argument("--refine-lr", type=float, default=1e-3, help="peak learning rate of --refine-steps (default 1e-3)")
    p.add_argument("--refine-target", choices=["layer", "fisher", "stream", "stream-residual"], default="layer",
                   help="what a refined layer reproduces (default layer: the original layer on the same inputs; "
                   "fisher: the same, each error weighted by its effect on the original model's loss)")
    p.add_argument("--refine-damping", type=float, default=0.0,
                   help="with --refine-target fisher: add this multiple of the mean weight to every weight")
    p.add_argument("--refit-mlp", choices=["layer", "stream"], default=None,
                   help="also refit each layer's mlp.down_proj so the layer reproduces the original layer "
                   "(layer) or the original model's hidden state (stream); default off; docs/heads.md")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="optional recovery: distil the original model into the merged one for this many "
                   "steps (default 0 = off; docs/heads.md)")
    p.add_argument("--recover-lr", type=float, default=1e-4, help="learning rate of --recover-steps (default 1e-4)")
    p.add_argument("--recover-train", choices=["attention", "all"], default="attention",
                   help="what --recover-steps trains: the q/k/v/o projections (default) or every parameter")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="folder for the compressed model")
    p.set_defaults(func=_run_compress_heads)


def _run_compress_heads(args) -> int:
    import copy
    import json
    import time

    import torch

    from .eval import corpus, model as model_lib
    from .heads import compress, recover

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.calibration_tokens < 1 or args.seq_len < 1 or args.recover_steps < 0 or args.refine_steps < 0:
        raise SystemExit("torchkvq compress-heads: --calibration-tokens and --seq-len must be >= 1, "
                         "--recover-steps and --refine-steps >= 0")
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tokenizer = model_lib.load_model(args.model)
    teacher = copy.deepcopy(model) if args.recover_steps else None
    calib = None
    if args.init == "activations" or args.recover_steps:
        seq_len = min(args.seq_len, args.calibration_tokens)
        calib = corpus.token_sequences(tokenizer, corpus.wiki_corpus_text(), max(1, args.calibration_tokens // seq_len),
                                       seq_len, args.calibration_offset)
    start = time.perf_counter()
    try:
        compress(model, calib if args.init == "activations" else None, kv_heads=args.kv_heads, init=args.init,
                 sequential=not args.one_pass, refine_steps=args.refine_steps, refine_lr=args.refine_lr,
                 refine_target=args.refine_target, refine_damping=args.refine_damping,
                 refit_mlp=args.refit_mlp, progress=True)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"torchkvq compress-heads: {e}")
    rep = model.torchkvq_heads_report
    info = {"model": str(args.model), "old_kv_heads": rep.old_kv_heads, "kv_heads": rep.kv_heads,
            "init": rep.init, "method": rep.method, "calibration_tokens": rep.calibration_tokens,
            "calibration_offset": args.calibration_offset, "merge_seconds": round(time.perf_counter() - start, 1),
            "key_energy_kept": [round(r.key_energy, 4) for r in rep.layers],
            "value_energy_kept": [round(r.value_energy, 4) for r in rep.layers]}
    if rep.layers[0].refine_error is not None:
        info["refine_error_before_after"] = [[round(a, 5), round(b, 5)] for a, b in (r.refine_error for r in rep.layers)]
    if args.recover_steps:
        start = time.perf_counter()
        kl = recover(model, teacher, calib, steps=args.recover_steps, lr=args.recover_lr, train=args.recover_train)
        info.update(recover_steps=args.recover_steps, recover_lr=args.recover_lr, recover_train=args.recover_train,
                    recover_kl_first_last=[round(kl[0], 4), round(kl[-1], 4)],
                    recover_seconds=round(time.perf_counter() - start, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "torchkvq_heads.json").write_text(json.dumps(info, indent=1))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{rep.old_kv_heads} -> {rep.kv_heads} KV heads ({rep.method}, {rep.calibration_tokens} calibration "
          f"tokens) in {info['merge_seconds']} s; weighted energy kept: keys {mean(info['key_energy_kept']):.3f}, "
          f"values {mean(info['value_energy_kept']):.3f}. Saved to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchkvq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    _compress_heads_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
