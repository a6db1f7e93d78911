"""The measurements behind XQuant-CL's design choices on the bundled SmolLM2-135M (docs/xquant.md).

1. ``--part stream``: which per-layer signal to accumulate across layers. On 512 Wikipedia
   tokens, quantize (per token, groups of 64) the layer-to-layer difference of either the
   post-norm attention input X or the residual stream h entering the decoder layer (X = norm(h)),
   accumulating the dequantized differences as XQuant-CL does (no drift: each layer's difference
   is taken against the accumulator), and report the relative error of the keys X̂·W_kᵀ against
   the exact ones, mean and max over the 30 layers, next to quantizing X directly.
2. ``--part variants``: the streaming evaluation (prompt 1024, chunks of 32, one 1536-token
   sequence) of XQuant-CL-2 variants - first layers at 4 bits, group size, window - and XQuant-3
   at similar bytes.

    python bench/xquant_ablation.py --part stream
    python bench/xquant_ablation.py --part variants
"""

from __future__ import annotations

import argparse

import torch

import torchkvq
from torchkvq.eval import corpus, model as model_lib, protocol


def stream_part(m, tok) -> None:
    ids = corpus.token_sequences(tok, corpus.wiki_corpus_text(), 1, 512)
    xs, hs = [], []
    hooks = []
    for layer in m.model.layers:
        hooks.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, a, k: xs.append(k["hidden_states"][0]), with_kwargs=True))
        hooks.append(layer.register_forward_pre_hook(
            lambda mod, a, k: hs.append((a[0] if a else k["hidden_states"])[0]), with_kwargs=True))
    with torch.no_grad():
        m(ids)
        for h in hooks:
            h.remove()

        def qd(t, b):
            c, s, z = torchkvq.ops.quantize(t[None], b, 64, -1)
            return torchkvq.ops.dequantize(c, s, z, b, 64, -1)[0]

        print("| bits | CL on X: key error mean / max | CL on h: mean / max | X quantized directly: mean |")
        print("|---|---|---|---|")
        for b in (1, 2, 3, 4):
            row = []
            for v, norm in ((xs, False), (hs, True)):
                acc = torch.zeros_like(v[0])
                errs, direct = [], []
                for i, layer in enumerate(m.model.layers):
                    acc = acc + qd(v[i] - acc, b)
                    x_hat = layer.input_layernorm(acc) if norm else acc
                    w = layer.self_attn.k_proj.weight
                    k = xs[i] @ w.T
                    errs.append(float((k - x_hat @ w.T).norm() / k.norm()))
                    direct.append(float((k - qd(xs[i], b) @ w.T).norm() / k.norm()))
                row.append(f"{sum(errs) / len(errs):.3f} / {max(errs):.3f}")
            print(f"| {b} | {row[0]} | {row[1]} | {sum(direct) / len(direct):.3f} |")


def variants_part(m, tok) -> None:
    from torchkvq.eval.methods import Method, all_methods
    from torchkvq.hf import ATTN_IMPLEMENTATION, new_cache
    from torchkvq.policies import XQuant, XQuantCL

    m.set_attn_implementation(ATTN_IMPLEMENTATION)
    seqs = corpus.token_sequences(tok, corpus.wiki_corpus_text(), 1, 1536, 0)
    variants = {
        "cl-2, no wider first layers": XQuantCL(bits=2, first_layers=0),
        "cl-2, first 2 layers 4-bit (default)": XQuantCL(bits=2),
        "cl-2, group 32": XQuantCL(bits=2, first_layers=0, group_size=32),
        "cl-2, group 192": XQuantCL(bits=2, first_layers=0, group_size=192),
        "cl-2, window 128": XQuantCL(bits=2, first_layers=0, residual=128),
        "xquant-3 (latents)": XQuant(bits=3),
    }
    methods = [all_methods()["fp32"]] + [
        Method(k, "torchkvq", (lambda p: (lambda model: new_cache(model, p)))(p),
               lambda c: c.nbytes(), k) for k, p in variants.items()]
    res = protocol.evaluate(m, methods, seqs, 1024, 32)
    base = res["fp32"].perplexity
    cfg = m.config
    fp16 = 2 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    print("| variant | ppl | Δppl % | KL | × vs fp16 |")
    print("|---|---|---|---|---|")
    for k, r in res.items():
        print(f"| {k} | {r.perplexity:.3f} | {100 * (r.perplexity / base - 1):+.2f} | "
              f"{r.mean_kl:.4f} | {fp16 / r.bytes_per_token:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["stream", "variants"], required=True)
    args = p.parse_args()
    m, tok = model_lib.load_model(progress=False)
    (stream_part if args.part == "stream" else variants_part)(m, tok)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
