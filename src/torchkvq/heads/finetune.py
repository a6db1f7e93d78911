"""Optional end-to-end recovery after merging: distil the original model into the merged one.

Only the projections the merge changed (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of every
layer) are trained; the loss is the KL divergence from the original model's next-token
distribution on calibration tokens (distillation, so the merged model is pulled back towards
the original rather than adapted to the calibration domain). See docs/heads.md for what it buys
on CPU.
"""

from __future__ import annotations

import torch

from .calibrate import attention_modules

__all__ = ["recover"]


def recover(model, teacher, token_ids: torch.Tensor, steps: int = 100, lr: float = 5e-5,
            progress: bool = True) -> list[float]:
    """Distil ``teacher`` into ``model`` for ``steps`` Adam steps (one row of ``token_ids
    [B, T]`` per step, cycling), training only the attention projections. In place; returns the
    KL per step (nats/token)."""
    from tqdm.auto import tqdm

    mods = attention_modules(model)
    params = [p for a in mods for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj) for p in lin.parameters()]
    all_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    teacher.eval()
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    losses = []
    try:
        bar = tqdm(range(steps), desc="recovery (distillation)", unit="step", disable=not progress)
        for step in bar:
            ids = token_ids[step % token_ids.shape[0]][None]
            with torch.no_grad():
                ref = torch.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)
            lp = torch.log_softmax(model(ids, use_cache=False).logits.float(), -1)
            loss = (ref.exp() * (ref - lp)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(kl=f"{losses[-1]:.3f}")
    finally:
        for p, f in all_flags.items():
            p.grad = None
            p.requires_grad_(f)
        model.train(was_training)
    return losses
