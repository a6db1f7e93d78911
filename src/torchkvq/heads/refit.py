"""Closed-form refits after a merge: ridge least squares of a layer's output projections.

The PCA merges fold each old head's reconstruction into ``o_proj``; refitting ``o_proj`` on the
merged layer's own inputs against the original layer's attention output also corrects part of
the key error (the refit sees the merged attention pattern). The same closed form refits the
MLP's ``down_proj`` so the whole decoder layer reproduces the original one. See docs/heads.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .calibrate import first_output
from .merge import EPS

__all__ = ["ridge_refit", "refit_on_calls", "refit_down_proj"]


@torch.no_grad()
def ridge_refit(lin: nn.Linear, inputs: torch.Tensor, target: torch.Tensor, ridge: float) -> float:
    """Refit ``lin.weight`` (in place) so that ``lin`` maps ``inputs [N, in]`` to ``target [N,
    out]``: ``min ||target - b - A W^T||^2 + lam ||W - W_0||^2`` (``W_0`` the current weight,
    ``b`` the bias, kept; ``lam = ridge * mean(diag(A^T A))``). Returns the relative residual."""
    a = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    y = target.reshape(-1, target.shape[-1]).to(torch.float64)
    w0 = lin.weight.detach().to(torch.float64)
    if lin.bias is not None:
        y = y - lin.bias.detach().to(torch.float64)
    ata = a.T @ a
    lam = ridge * float(ata.diagonal().mean())
    rhs = a.T @ y + lam * w0.T
    w = torch.linalg.solve(ata + lam * torch.eye(ata.shape[0], dtype=ata.dtype), rhs).T
    lin.weight.copy_(w)
    return float((y - a @ w.T).square().sum() / y.square().sum().clamp_min(EPS))


@torch.no_grad()
def refit_on_calls(attn: nn.Module, calls: list, targets: list[torch.Tensor], ridge: float) -> float:
    """Least-squares refit of ``o_proj`` (:func:`ridge_refit`, shrunk towards the PCA fold) on
    the merged module's own ``o_proj`` inputs for ``calls``
    (``(args, kwargs)`` of its forward) against ``targets`` (the original outputs, ``[B, T,
    hidden]`` each). Returns the relative residual."""
    merged_in = []
    h = attn.o_proj.register_forward_pre_hook(lambda _m, a: merged_in.append(a[0].detach()))
    try:
        for args, kw in calls:
            attn(*args, **kw)
    finally:
        h.remove()
    return ridge_refit(attn.o_proj, torch.cat([m.reshape(-1, m.shape[-1]) for m in merged_in]),
                        torch.cat([t.reshape(-1, t.shape[-1]) for t in targets]), ridge)


@torch.no_grad()
def refit_down_proj(layer: nn.Module, calls: list, targets: list[torch.Tensor], ridge: float) -> float:
    """Refit the decoder layer's MLP output projection (``mlp.down_proj``) so that the layer,
    its attention already merged, reproduces ``targets`` (the original layer's outputs ``[B, T,
    hidden]`` for ``calls``): the MLP's hidden features of the merged layer's own residual
    stream are asked to cancel what they can of the attention's error, the way the ``o_proj``
    refit folds the value error (:func:`ridge_refit`, shrunk towards the current weight).
    Returns the relative residual of the down projection's least squares."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise NotImplementedError(f"{type(layer).__name__} has no mlp.down_proj linear layer to refit")
    ins, need = [], []
    h = down.register_forward_pre_hook(lambda _m, a: ins.append(a[0].detach()))
    try:
        for call, t in zip(calls, targets):
            out = first_output(layer(*call[0], **call[1]))
            need.append((t - out).reshape(-1, t.shape[-1]))  # what down_proj must add to its output now
    finally:
        h.remove()
    a = torch.cat([x.reshape(-1, x.shape[-1]) for x in ins])
    return ridge_refit(down, a, down(a) + torch.cat(need), ridge)
