"""One layer's merge error on calibration text and on held-out text, step by step.

The refinement (:mod:`torchkvq.heads.refine`) reports its error on the calibration windows it
trains on. This study merges a single attention layer of the *original* model (every other
layer intact, so its inputs are exact), refits ``o_proj`` and refines it, and measures the
relative attention-output error on those windows and on held-out windows from elsewhere in the
corpus as the steps go: how much of the gain is fitting the calibration text, and where the
error of one merged layer levels off. docs/heads.md ("How low one layer's error goes") has the
figures::

    python -m torchkvq.heads.layer_study --layer 10 --train-windows 1024 --steps 1600
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

__all__ = ["attention_calls", "study_layer"]


def attention_calls(model, attn: nn.Module, windows: torch.Tensor,
                    progress: bool = False) -> tuple[list, list[torch.Tensor]]:
    """The ``(args, kwargs)`` of ``attn``'s forward call for each window ``[T]`` of ``windows
    [N, T]`` (int64), and its output ``[1, T, hidden]``; the forward stops at ``attn``."""
    from tqdm.auto import tqdm

    from .calibrate import first_output
    from .compress import _Stop

    calls, outs = [], []

    def post(_m, _a, _k, out):
        outs.append(first_output(out).detach())
        raise _Stop

    hooks = [attn.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True),
             attn.register_forward_hook(post, with_kwargs=True)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for w in tqdm(windows, desc="layer inputs", unit="window", disable=not progress):
                try:
                    model(w[None].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return calls, outs


def study_layer(model, layer: int, train: torch.Tensor, held_out: torch.Tensor, kv_heads: int = 1,
                steps: int = 1600, lr: float = 1e-3, every: int = 400, projections: str = "qkvo",
                ridge: float = 0.01, seed: int = 0, progress: bool = True) -> dict:
    """Merge ``model``'s attention layer ``layer`` (in place) to ``kv_heads`` KV heads on the
    ``train`` windows ``[N, T]``, refit its ``o_proj``, refine it for ``steps`` steps; return
    the relative output errors ``{"pca", "refit", "curve": [(step, train, held_out), ...]}``
    (the curve every ``every`` steps and at the last; errors as
    :func:`torchkvq.heads.refine.output_error`)."""
    from tqdm.auto import tqdm

    from .calibrate import attention_modules, augmented_moment
    from .compress import _check_supported
    from .merge import apply_plan, plan_layer
    from .refit import refit_on_calls
    from .refine import output_error, refine_attention

    mods = attention_modules(model)
    if not 0 <= layer < len(mods):
        raise ValueError(f"layer must be in [0, {len(mods)}), got {layer}")
    if every < 1 or steps < 0:
        raise ValueError(f"every must be >= 1 and steps >= 0, got {every}, {steps}")
    _check_supported(model, mods)
    n_kv = mods[layer].k_proj.out_features // mods[layer].head_dim
    if kv_heads < 1 or n_kv % kv_heads:
        raise ValueError(f"kv_heads must divide the layer's {n_kv} KV heads, got {kv_heads}")
    attn = mods[layer]
    model.eval()
    tr_calls, tr_out = attention_calls(model, attn, train, progress)
    ho_calls, ho_out = attention_calls(model, attn, held_out, progress)

    def errors():
        return output_error(attn, tr_calls, tr_out), output_error(attn, ho_calls, ho_out)

    moments = sum(augmented_moment(args[0] if args else kw["hidden_states"]) for args, kw in tr_calls)
    apply_plan(attn, plan_layer(attn, kv_heads, moments / sum(t.shape[:-1].numel() for t in tr_out)))
    res = {"layer": layer, "kv_heads": kv_heads, "train_windows": len(train), "held_out_windows": len(held_out),
           "steps": steps, "lr": lr, "projections": projections, "pca": errors()}
    refit_on_calls(attn, tr_calls, tr_out, ridge)
    res["refit"] = errors()
    res["curve"] = [(0, *res["refit"])]
    bar = tqdm(total=steps, desc=f"refining layer {layer}", unit="step", disable=not progress)

    def on_step(step):
        bar.update()
        if step % every == 0 or step == steps:
            res["curve"].append((step, *errors()))
            bar.set_postfix(train=f"{res['curve'][-1][1]:.4f}", held_out=f"{res['curve'][-1][2]:.4f}")

    try:
        refine_attention(attn, tr_calls, tr_out, steps, lr=lr, projections=projections, on_step=on_step,
                         generator=torch.Generator().manual_seed(seed))
    finally:
        bar.close()
    res["final"] = errors()  # after refine_attention's keep-the-merge check
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchkvq.heads.layer_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--train-windows", type=int, default=256)
    p.add_argument("--held-out-windows", type=int, default=16)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--train-offset", type=int, default=100_000)
    p.add_argument("--held-out-offset", type=int, default=400_000)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=400)
    p.add_argument("--projections", default="qkvo", help="which projections the refinement trains")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)

    from ..eval import corpus
    from ..eval.model import load_model

    train_end = args.train_offset + args.train_windows * args.window_len
    held_end = args.held_out_offset + args.held_out_windows * args.window_len
    if not (train_end <= args.held_out_offset or held_end <= args.train_offset):
        raise SystemExit("--train-* and --held-out-* windows overlap: move --held-out-offset")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    text = corpus.wiki_corpus_text()
    train = corpus.token_sequences(tok, text, args.train_windows, args.window_len, args.train_offset)
    held = corpus.token_sequences(tok, text, args.held_out_windows, args.window_len, args.held_out_offset)
    res = study_layer(model, args.layer, train, held, args.kv_heads, args.steps, args.lr, args.every,
                      args.projections)
    print(f"layer {args.layer}, {args.train_windows} x {args.window_len} calibration tokens, "
          f"projections {args.projections}, lr {args.lr:g}")
    print("| step | calibration error | held-out error |\n|---|---|---|")
    print(f"| PCA merge | {res['pca'][0]:.4f} | {res['pca'][1]:.4f} |")
    for step, e_tr, e_ho in res["curve"]:
        print(f"| {'refit' if step == 0 else step} | {e_tr:.4f} | {e_ho:.4f} |")
    if res["final"] != tuple(res["curve"][-1][1:]):
        print(f"| kept the refit (the refinement did not lower the calibration error) | "
              f"{res['final'][0]:.4f} | {res['final'][1]:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if all(math.isfinite(e) for _, *es in res["curve"] for e in es) else 1


if __name__ == "__main__":
    raise SystemExit(main())
