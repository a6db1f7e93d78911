"""Optional end-to-end recovery after merging: distil the original model into the merged one.

The loss is the KL divergence from the original model's next-token distribution on calibration
tokens (distillation, so the merged model is pulled back towards the original rather than
adapted to the calibration domain). By default only the projections the merge changed
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of every layer) are trained; ``train="all"``
trains every parameter, so the MLPs and norms can make up for what the merged attention loses.
See docs/heads.md for what it buys on CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

from .calibrate import attention_modules

__all__ = ["RECOVER_TRAIN", "recover"]

#: what ``recover(train=...)`` can train
RECOVER_TRAIN = ("attention", "all")


def recover(model, teacher, token_ids: torch.Tensor, steps: int = 100, lr: float = 5e-5,
            train: str = "attention", on_step: Callable[[int, float], None] | None = None,
            progress: bool = True) -> list[float]:
    """Distil ``teacher`` into ``model`` for ``steps`` Adam steps at a constant ``lr``.

    Args:
        token_ids: ``[B, T]`` integer tokens; one row per step, cycling through the rows.
        train: ``"attention"`` (q/k/v/o projections of every layer) or ``"all"`` (every
            parameter of ``model``).
        on_step: called as ``on_step(step, kl)`` after each step (``step`` from 1), e.g. to
            measure held-out perplexity as the run goes; the model is in eval mode then.

    In place; returns the KL per step (nats/token). Every parameter's ``requires_grad`` is
    restored and its ``.grad`` cleared on return.
    """
    from tqdm.auto import tqdm

    if train not in RECOVER_TRAIN:
        raise ValueError(f"train must be one of {RECOVER_TRAIN}, got {train!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if token_ids.dim() != 2 or token_ids.shape[0] == 0 or token_ids.is_floating_point():
        raise ValueError(f"token_ids must be a non-empty [B, T] integer tensor, got {tuple(token_ids.shape)} "
                         f"{token_ids.dtype}")
    if train == "all":
        params = list(model.parameters())
    else:
        params = [p for a in attention_modules(model) for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
                  for p in lin.parameters()]
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
            if on_step is not None:
                on_step(step + 1, losses[-1])
    finally:
        for p, f in all_flags.items():
            p.grad = None
            p.requires_grad_(f)
        model.train(was_training)
    return losses
