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
    p.add_argument("--methods", default="all",
                   help="comma-separated method names, or 'all' (default); see --list-methods")
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
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import torch
    from tqdm import tqdm

    from .eval import corpus, methods, model as model_lib, protocol, report

    if args.list_methods:
        for name, m in methods.all_methods().items():
            print(f"{name:14s} {m.kind:9s} {m.description}")
        return 0
    if not 0 < args.prompt < args.seq_len:
        raise SystemExit(f"torchkvq eval: --prompt must be in (0, --seq-len={args.seq_len}), got {args.prompt}")
    if args.chunk < 1 or args.n_seqs < 1:
        raise SystemExit("torchkvq eval: --chunk and --n-seqs must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(methods.all_methods()) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
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

    with tqdm(total=len(chosen) * args.n_seqs, desc="streaming eval", unit="seq") as bar:
        results = protocol.evaluate(model, chosen, sequences, args.prompt, args.chunk, progress=bar)
    if args.decode_tokens:
        for m in tqdm(chosen, desc="decode speed", unit="method"):
            tps, peak, nbytes = protocol.decode_speed(model, m, sequences[:1, : args.prompt], args.decode_tokens)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchkvq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _eval_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
