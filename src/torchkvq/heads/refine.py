"""Layer-wise refinement of one merged attention module on its calibration inputs.

The PCA merge and the closed-form ``o_proj`` refit minimize second-moment proxies of the error
(key and value reconstruction, the output projection's least squares at a fixed attention
pattern). What a layer hands on is its attention *output*, which goes through the softmax.
:func:`refine_attention` takes the merge as the starting point and runs Adam on the module's
four projections to minimize the relative error of that output against a target, on the
calibration inputs the sequential merge has already cached: no labels, no loss through the
rest of the model, one layer at a time (post-training reconstruction as in BRECQ or OmniQuant,
not fine-tuning). See docs/heads.md for what it buys.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .calibrate import first_output

__all__ = ["refine_attention", "output_error"]


def _projections(attn: nn.Module, which: str = "qkvo") -> list[nn.Parameter]:
    if not which or any(c not in "qkvo" for c in which) or len(set(which)) != len(which):
        raise ValueError(f"projections must be distinct letters from 'qkvo' (e.g. 'qkvo', 'kv'), got {which!r}")
    return [p for c in "qkvo" if c in which for p in getattr(attn, f"{c}_proj").parameters()]


def _out(attn: nn.Module, call) -> torch.Tensor:
    args, kwargs = call
    out = attn(*args, **kwargs)
    return first_output(out)


def _sq(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    x = x.float().square()
    return (x if w is None else x * w).sum()


@torch.no_grad()
def output_error(attn: nn.Module, calls: list, targets: list[torch.Tensor],
                 weights: list[torch.Tensor] | None = None) -> float:
    """``sum w ||attn(call) - target||^2 / sum w ||target||^2`` over the calls (``w``: the
    elementwise ``weights`` of each call, ``[B, T, hidden]``; 1 when None)."""
    err = ref = 0.0
    for i, (call, t) in enumerate(zip(calls, targets)):
        w = None if weights is None else weights[i]
        err += float(_sq(_out(attn, call) - t, w))
        ref += float(_sq(t, w))
    return err / max(ref, 1e-30)


def refine_attention(attn: nn.Module, calls: list, targets: list[torch.Tensor], steps: int,
                     lr: float = 1e-3, calls_per_step: int = 4,
                     generator: torch.Generator | None = None, projections: str = "qkvo",
                     on_step: Callable[[int], None] | None = None,
                     weights: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """Adam on ``q_proj``/``k_proj``/``v_proj``/``o_proj`` of ``attn`` (in place).

    Args:
        attn: the merged attention module.
        calls: ``(args, kwargs)`` of its calibration forward calls (hidden states ``[B, T,
            hidden]`` float32 plus the rotary embeddings and mask the decoder layer passed).
        targets: the output ``[B, T, hidden]`` each call should produce.
        steps: optimizer steps; each averages the gradient of ``calls_per_step`` calls drawn at
            random without replacement. The learning rate follows a cosine from ``lr`` to 0.
        projections: which of the four projections are trained (letters of ``"qkvo"``).
        on_step: called with the step number (1..steps) after each step, gradients off (e.g.
            to measure a held-out error; :mod:`torchkvq.heads.layer_study`).
        weights: per call, elementwise weights of the squared error (``[B, T, hidden]``, the
            shape of the target; e.g. :func:`~torchkvq.heads.calibrate.output_sensitivities`);
            None weighs every element alike.
    Returns ``(relative error before, after)`` over all calls (:func:`output_error`, with the
    same weights).
    """
    if steps < 0 or calls_per_step < 1:
        raise ValueError(f"steps must be >= 0 and calls_per_step >= 1, got {steps}, {calls_per_step}")
    if weights is not None and (len(weights) != len(targets) or any(
            w.shape != t.shape for w, t in zip(weights, targets))):
        raise ValueError("weights must hold one tensor per call, each the shape of its target")
    params = _projections(attn, projections)
    before = output_error(attn, calls, targets, weights)
    if steps == 0:
        return before, before
    flags = [p.requires_grad for p in params]
    start = {id(p): p.detach().clone() for p in params}
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    wt = weights if weights is not None else [None] * len(targets)
    norms = [float(_sq(t, w)) for t, w in zip(targets, wt)]
    per = min(calls_per_step, len(calls))
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for step in range(1, steps + 1):
                pick = torch.randperm(len(calls), generator=generator)[:per].tolist()
                denom = sum(norms[i] for i in pick)
                opt.zero_grad(set_to_none=True)
                for i in pick:
                    loss = _sq(_out(attn, calls[i]) - targets[i], wt[i]) / denom
                    loss.backward()
                opt.step()
                sched.step()
                if on_step is not None:
                    with torch.no_grad():
                        on_step(step)
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
    after = output_error(attn, calls, targets, weights)
    if not after < before:  # an lr too large for this layer: keep the merge as it was
        with torch.no_grad():
            for p in params:
                p.copy_(start[id(p)])
        after = before
    return before, after
