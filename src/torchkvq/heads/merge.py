"""The merge of one attention layer's KV heads into fewer, RoPE-aware, on second moments.

After "Effectively Compress KV Heads for LLM" (arXiv 2406.07056); see docs/heads.md.

For every attention layer, groups of ``g = old_kv_heads // kv_heads`` adjacent KV heads become
one shared head:

* **Values** carry no RoPE. Take the top-``d`` principal directions ``Psi [g*d, d]`` of the
  group's concatenated values ``[tokens, g*d]``; the shared head's projection is
  ``Psi^T W_v`` and each original head's reconstruction block ``Psi_i [d, d]`` is folded into
  the output-projection columns of the query heads that read that head. Exact whenever the
  group's values span at most ``d`` dimensions.
* **Keys** are rotated by RoPE between the projection and the dot product, so only merges that
  commute with RoPE are allowed: per rotary frequency pair ``j`` (dims ``j`` and ``j + d/2`` in
  transformers' ``rotate_half`` layout, a complex number ``z_ij``), the shared key is
  ``z'_j = sum_i c_ij z_ij`` with one complex scalar per head (a 2x2 rotation-scaling). ``c_j``
  is the top eigenvector of the ``g x g`` Hermitian covariance of ``(z_1j .. z_gj)`` (a
  per-frequency complex PCA); head ``i``'s key is reconstructed as ``r_ij z'_j`` and
  ``conj(r_ij)`` is folded into the rotary pairs of the query heads that attended to head
  ``i``, so that ``q_h . k_i ~= q'_h . k'``. Rotation by the same angle commutes with complex
  scaling, so the merge holds at every position.

Both PCAs can be weighted by what the error costs downstream (defaults, see docs/heads.md):
key errors by the energy of the queries that read them (``key_weighting="query"``), value
errors by the output projection that reads them (``value_weighting="output"``).

No side effects until :func:`apply_plan` writes a :class:`LayerPlan` into the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .rope import complex_rows, real_rows

__all__ = ["value_merge", "key_merge", "plan_layer", "apply_plan", "emulate_plan", "LayerPlan", "LayerReport"]

EPS = 1e-10


@dataclass
class LayerReport:
    """Share of the (weighted) second-moment energy kept by each layer's merge."""

    key_energy: float
    value_energy: float
    output_residual: float | None = None  # relative o_proj residual after a refit
    refine_error: tuple[float, float] | None = None  # attention-output error before/after refinement
    mlp_residual: float | None = None  # relative down_proj residual after a refit_mlp


# --------------------------------------------------------------------------------------------
# The two merges on second moments
# --------------------------------------------------------------------------------------------


def _sym_sqrt(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m^(1/2), m^(-1/2))`` of symmetric PSD matrices ``[..., d, d]``, eigenvalues floored."""
    ev, vec = torch.linalg.eigh(m)
    ev = ev.clamp_min(ev.amax(-1, keepdim=True).clamp_min(EPS) * 1e-8)
    s = ev.sqrt()
    return (vec * s[..., None, :]) @ vec.mT, (vec / s[..., None, :]) @ vec.mT


def value_merge(cov: torch.Tensor, d: int, rank: int | None = None,
                out_metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PCA merge of one group's values.

    ``cov [g*d, g*d]``: second moment of the concatenated values. ``out_metric [g, d, d]``
    (optional): PSD metric per head in which the reconstruction error is measured (``sum_h
    W_o,h^T W_o,h`` over the query heads reading that head); ``None`` is the plain Euclidean PCA.
    Returns ``(down [rank, g*d], up [g*d, rank], kept energy share)``: the shared value is
    ``down @ v`` and the group's values are reconstructed as ``up @ (down @ v)``; ``up @ down``
    is the identity when ``rank = g*d``. ``rank`` defaults to ``d``. The basis is rotated
    within the kept subspace so that head 0's reconstruction block is as close to the identity
    as an orthogonal change of basis allows (with ``g = 1`` and no metric: exactly the identity).
    """
    gd = cov.shape[0]
    rank = d if rank is None else rank
    if out_metric is None:
        s = s_inv = torch.eye(gd, dtype=cov.dtype)
    else:
        sq, isq = _sym_sqrt(out_metric)
        s, s_inv = torch.block_diag(*sq), torch.block_diag(*isq)
    c = s @ cov @ s
    c = (c + c.T) / 2
    ev, vec = torch.linalg.eigh(c)
    u = vec[:, torch.argsort(ev, descending=True)[:rank]]
    kept = float(ev.clamp_min(0).sort(descending=True).values[:rank].sum() / ev.clamp_min(0).sum().clamp_min(EPS))
    up = s_inv @ u
    # Procrustes: rotate the kept basis so that head 0's block is closest to the identity.
    if rank == d:
        a = up[:d]  # [d, rank]
        uu, _, vvh = torch.linalg.svd(a.T)
        q = uu @ vvh
        u, up = u @ q, up @ q
    down = u.T @ s
    return down, up, kept


def key_merge(cov: torch.Tensor, weight: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-frequency complex PCA of one group's keys.

    ``cov [F, g, g]`` complex Hermitian: ``E[z_i conj(z_l)]`` of the rotary pairs of the g heads
    per frequency; ``weight [g, F]`` (optional): the cost of an error in head ``i``'s pair
    ``j`` (energy of the queries reading it). Returns ``(c [g, F], r [g, F], kept share)``: the
    shared key is ``z'_j = sum_i c_ij z_ij`` and head ``i``'s key is reconstructed as
    ``r_ij z'_j``. Gauge: ``r = 1`` on the head with the largest share per frequency (so
    ``g = 1`` gives ``c = r = 1``).
    """
    g = cov.shape[-1]
    if weight is None:
        dw = torch.ones(cov.shape[0], g, dtype=cov.real.dtype)
    else:
        w = weight.T.clamp_min(0)  # [F, g]
        dw = (w.clamp_min(w.amax(-1, keepdim=True).clamp_min(EPS) * 1e-6)).sqrt()
    c_mat = dw[:, :, None] * cov * dw[:, None, :]
    c_mat = (c_mat + c_mat.mH) / 2
    ev, vec = torch.linalg.eigh(c_mat)  # ascending
    u = vec[..., -1]  # [F, g]
    kept = float(ev[..., -1].clamp_min(0).sum() / ev.clamp_min(0).sum().clamp_min(EPS))
    r = u / dw
    c = u.conj() * dw
    star = u.abs().argmax(-1)
    lam = r.gather(-1, star[:, None])  # [F, 1]
    r, c = r / lam, c * lam
    return c.T.contiguous(), r.T.contiguous(), kept


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------


def _aug(lin: nn.Linear) -> torch.Tensor:
    w = lin.weight.detach().to(torch.float64)
    b = lin.bias.detach().to(torch.float64) if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return torch.cat([w, b[:, None]], 1)


def _linear_like(old: nn.Linear, weight_aug: torch.Tensor) -> nn.Linear:
    new = nn.Linear(old.in_features, weight_aug.shape[0], bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight_aug[:, :-1])
        if new.bias is not None:
            new.bias.copy_(weight_aug[:, -1])
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


@dataclass
class LayerPlan:
    """The merge of one layer, before it is written into the module (float64, augmented
    ``[W, b]`` rows). ``r [n_kv, d/2]`` complex: key reconstruction of each old head;
    ``up [n_kv, d, d]``: value reconstruction block of each old head."""

    new_k: torch.Tensor
    new_v: torch.Tensor
    new_q: torch.Tensor
    new_o: torch.Tensor
    r: torch.Tensor
    up: torch.Tensor
    report: LayerReport


@torch.no_grad()
def plan_layer(attn: nn.Module, kv_heads: int, sigma: torch.Tensor,
               key_weighting: str = "query", value_weighting: str = "output") -> LayerPlan:
    """Compute the merge of one attention module into ``kv_heads`` KV heads (no side effects).

    ``sigma [hidden+1, hidden+1]``: second moment of the augmented input ``[x, 1]`` (identity
    for ``init="weights"``).
    """
    d = attn.head_dim
    if d % 2:
        raise ValueError(f"head_dim {d} is odd: no rotary pairs")
    half = d // 2
    n_q = attn.q_proj.out_features // d
    n_kv = attn.k_proj.out_features // d
    g = n_kv // kv_heads
    rep = n_q // n_kv  # query heads per old KV head
    sigma = sigma.to(torch.float64)

    wq, wk, wv = _aug(attn.q_proj), _aug(attn.k_proj), _aug(attn.v_proj)
    wo = attn.o_proj.weight.detach().to(torch.float64)  # [hidden, n_q*d]
    owner = torch.arange(n_q) // rep  # old KV head of each query head

    # ---- keys: per-frequency complex second moments between old heads
    zk = complex_rows(wk, d)  # [n_kv, F, h+1]
    cov_k = torch.einsum("ifh,lfh->fil", zk @ sigma.to(zk.dtype), zk.conj())  # [F, n_kv, n_kv]
    zq = complex_rows(wq, d)  # [n_q, F, h+1]
    if key_weighting == "query":
        q_energy = ((zq.real @ sigma) * zq.real).sum(-1) + ((zq.imag @ sigma) * zq.imag).sum(-1)
        kw = torch.zeros(n_kv, half, dtype=torch.float64).index_add_(0, owner, q_energy)
    elif key_weighting == "none":
        kw = None
    else:
        raise ValueError(f"key_weighting must be 'query' or 'none', got {key_weighting!r}")
    new_zk = torch.empty(kv_heads, half, zk.shape[-1], dtype=zk.dtype)
    r_all = torch.empty(n_kv, half, dtype=zk.dtype)
    k_kept = []
    for n in range(kv_heads):
        sl = slice(n * g, (n + 1) * g)
        c, r, kept = key_merge(cov_k[:, sl, sl], None if kw is None else kw[sl])
        new_zk[n] = torch.einsum("if,ifh->fh", c, zk[sl])
        r_all[sl] = r
        k_kept.append(kept)
    zq = zq * r_all[owner].conj()[..., None]

    # ---- values
    cov_v = wv @ sigma @ wv.T  # [n_kv*d, n_kv*d]
    if value_weighting == "output":
        wo_h = wo.T.reshape(n_q, d, -1)  # [n_q, d, hidden]
        metric = torch.zeros(n_kv, d, d, dtype=torch.float64).index_add_(0, owner, wo_h @ wo_h.mT)
    elif value_weighting == "none":
        metric = None
    else:
        raise ValueError(f"value_weighting must be 'output' or 'none', got {value_weighting!r}")
    new_wv = torch.empty(kv_heads * d, wv.shape[1], dtype=torch.float64)
    up_all = torch.empty(n_kv, d, d, dtype=torch.float64)  # [old head, d, d]
    v_kept = []
    for n in range(kv_heads):
        sl = slice(n * g * d, (n + 1) * g * d)
        down, up, kept = value_merge(cov_v[sl, sl], d,
                                     out_metric=None if metric is None else metric[n * g:(n + 1) * g])
        new_wv[n * d:(n + 1) * d] = down @ wv[sl]
        up_all[n * g:(n + 1) * g] = up.reshape(g, d, d)
        v_kept.append(kept)
    new_wo = torch.einsum("hqd,qde->hqe", wo.reshape(wo.shape[0], n_q, d), up_all[owner])
    return LayerPlan(new_k=real_rows(new_zk), new_v=new_wv, new_q=real_rows(zq),
                     new_o=new_wo.reshape(wo.shape), r=r_all, up=up_all,
                     report=LayerReport(key_energy=sum(k_kept) / len(k_kept),
                                        value_energy=sum(v_kept) / len(v_kept)))


@torch.no_grad()
def apply_plan(attn: nn.Module, plan: LayerPlan) -> None:
    """Write a :class:`LayerPlan` into the module: resized k/v projections, folded q/o."""
    d = attn.head_dim
    kv_heads = plan.new_k.shape[0] // d
    n_q = attn.q_proj.out_features // d
    attn.k_proj = _linear_like(attn.k_proj, plan.new_k)
    attn.v_proj = _linear_like(attn.v_proj, plan.new_v)
    attn.q_proj.weight.copy_(plan.new_q[:, :-1])
    if attn.q_proj.bias is not None:
        attn.q_proj.bias.copy_(plan.new_q[:, -1])
    attn.o_proj.weight.copy_(plan.new_o)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = n_q // kv_heads
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = kv_heads


@torch.no_grad()
def emulate_plan(attn: nn.Module, plan: LayerPlan, keys: bool = True, values: bool = True) -> None:
    """Diagnostic: keep the old head count but give every old head its *reconstructed* keys
    (``r_i * k'``) and/or values (``up_i @ v'``). With both, the attention scores and outputs
    equal the merged model's; with one, the loss of the other merge alone is measured."""
    d = attn.head_dim
    n_kv = attn.k_proj.out_features // d
    kv_heads = plan.new_k.shape[0] // d
    g = n_kv // kv_heads
    if keys:
        zk = complex_rows(plan.new_k, d)  # [kv_heads, F, h+1]
        rec = plan.r[..., None] * zk.repeat_interleave(g, 0)
        w = real_rows(rec)
        attn.k_proj.weight.copy_(w[:, :-1])
        if attn.k_proj.bias is not None:
            attn.k_proj.bias.copy_(w[:, -1])
    if values:
        rec = torch.einsum("ide,ieh->idh", plan.up, plan.new_v.view(kv_heads, d, -1).repeat_interleave(g, 0))
        w = rec.reshape(n_kv * d, -1)
        attn.v_proj.weight.copy_(w[:, :-1])
        if attn.v_proj.bias is not None:
            attn.v_proj.bias.copy_(w[:, -1])
