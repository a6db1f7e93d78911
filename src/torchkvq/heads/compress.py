"""Merge groups of KV heads into one each (MHA -> GQA, GQA -> fewer KV heads), RoPE-aware.

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

``init="activations"`` takes second moments from calibration text; ``init="weights"`` uses the
weight matrices alone (identity input covariance). The result is an ordinary transformers model
(``config.num_key_value_heads`` updated, projections resized) that saves and reloads as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import (attention_modules, augmented_moment, calibration_token_ids, collect_input_moments,
                        first_output, output_sensitivities)
from .rope import complex_rows, real_rows

__all__ = ["compress", "plan_layer", "apply_plan", "emulate_plan", "LayerPlan", "LayerReport",
           "CompressReport", "value_merge", "key_merge"]

_EPS = 1e-10


@dataclass
class LayerReport:
    """Share of the (weighted) second-moment energy kept by each layer's merge."""

    key_energy: float
    value_energy: float
    output_residual: float | None = None  # relative o_proj residual after a refit
    refine_error: tuple[float, float] | None = None  # attention-output error before/after refinement
    mlp_residual: float | None = None  # relative down_proj residual after a refit_mlp


@dataclass
class CompressReport:
    old_kv_heads: int
    kv_heads: int
    init: str
    key_weighting: str
    value_weighting: str
    calibration_tokens: int
    layers: list[LayerReport] = field(default_factory=list)
    method: str = "one-pass"  # "sequential[+refit(...)]", "one-pass" (activations) or "weights"


# --------------------------------------------------------------------------------------------
# The two merges on second moments
# --------------------------------------------------------------------------------------------


def _sym_sqrt(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m^(1/2), m^(-1/2))`` of symmetric PSD matrices ``[..., d, d]``, eigenvalues floored."""
    ev, vec = torch.linalg.eigh(m)
    ev = ev.clamp_min(ev.amax(-1, keepdim=True).clamp_min(_EPS) * 1e-8)
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
    kept = float(ev.clamp_min(0).sort(descending=True).values[:rank].sum() / ev.clamp_min(0).sum().clamp_min(_EPS))
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
        dw = (w.clamp_min(w.amax(-1, keepdim=True).clamp_min(_EPS) * 1e-6)).sqrt()
    c_mat = dw[:, :, None] * cov * dw[:, None, :]
    c_mat = (c_mat + c_mat.mH) / 2
    ev, vec = torch.linalg.eigh(c_mat)  # ascending
    u = vec[..., -1]  # [F, g]
    kept = float(ev[..., -1].clamp_min(0).sum() / ev.clamp_min(0).sum().clamp_min(_EPS))
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


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


#: what a refined layer reproduces (``compress(refine_target=...)``)
REFINE_TARGETS = ("layer", "fisher", "stream", "stream-residual")


class _Stop(Exception):
    pass


def _decoder_layers(model, mods) -> list[nn.Module]:
    """The block holding each attention module (the module whose child it is)."""
    parent = {}
    for m in model.modules():
        for child in m.children():
            parent[id(child)] = m
    layers = [parent.get(id(a)) for a in mods]
    if any(layer is None for layer in layers):
        raise NotImplementedError("could not find the decoder layer of every attention module")
    return layers


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
    return float((y - a @ w.T).square().sum() / y.square().sum().clamp_min(_EPS))


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


def _hidden(call) -> torch.Tensor:
    args, kw = call
    return args[0] if args else kw["hidden_states"]


def _compress_sequential(model, mods, batches, kv_heads, key_weighting, value_weighting,
                         refit: bool, ridge: float, progress: bool, report: "CompressReport",
                         refine: dict | None = None, refit_mlp: str | None = None) -> None:
    """Layer by layer on cached hidden states (one pass through the model in all): each layer
    is calibrated on the outputs of the already-merged layers before it, and (``refit``) its
    ``o_proj`` is refitted to the original layer's attention output on those inputs;
    ``refine`` (keyword arguments of :func:`refine_attention` plus ``target`` and
    ``damping``) then refines the four projections on the attention output, and ``refit_mlp``
    (``"layer"``/``"stream"``) refits the layer's ``mlp.down_proj`` (:func:`refit_down_proj`)."""
    from tqdm.auto import tqdm

    from .refine import refine_attention

    layers = _decoder_layers(model, mods)
    states = []  # (args, kwargs) of the first decoder layer, per batch

    def catch(_m, args, kwargs):
        states.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    tokens = sum(a[0].shape[0] * a[0].shape[1] if a else kw["hidden_states"].shape[:2].numel()
                 for a, kw in states)
    report.calibration_tokens = tokens
    target_kind = (refine or {}).get("target", "layer")
    if target_kind not in REFINE_TARGETS:
        raise ValueError(f"refine target must be one of {REFINE_TARGETS}, got {target_kind!r}")
    stream_refine = bool(refine) and target_kind.startswith("stream")
    orig_states = list(states) if stream_refine or refit_mlp == "stream" else None
    sens = None
    if refine and target_kind == "fisher":  # from the original model, before any layer changes
        sens = output_sensitivities(model, batches, progress=progress)
        damping = refine.get("damping", 0.0)
        if damping:
            for per_layer in sens:
                mean = sum(float(w.sum()) for w in per_layer) / sum(w.numel() for w in per_layer)
                for w in per_layer:
                    w.add_(damping * mean)

    for i, (layer, attn) in enumerate(tqdm(list(zip(layers, mods)), desc="merging KV heads (sequential)",
                                           unit="layer", disable=not progress)):
        hidden = attn.k_proj.in_features
        sums = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
        attn_calls, targets = [], []

        def pre(_m, args, kwargs):
            attn_calls.append((args, kwargs))

        def post(_m, _args, _kwargs, out):
            targets.append(first_output(out).detach())

        def k_in(_m, args):
            sums.add_(augmented_moment(args[0]))

        hs = [attn.register_forward_pre_hook(pre, with_kwargs=True),
              attn.register_forward_hook(post, with_kwargs=True),
              attn.k_proj.register_forward_pre_hook(k_in)]
        layer_targets = []  # the original layer's outputs, for refit_mlp
        try:
            with torch.no_grad():
                for args, kw in states:
                    out = layer(*args, **kw)
                    if refit_mlp == "layer":
                        layer_targets.append(first_output(out))
        finally:
            for h in hs:
                h.remove()
        if orig_states is not None:
            # the original layer on the original model's hidden states: what the merged model
            # should hand on, upstream errors included
            stream_t = []
            h = attn.register_forward_hook(
                lambda _m, _a, _k, out: stream_t.append(first_output(out).detach()),
                with_kwargs=True)
            nxt = []
            try:
                with torch.no_grad():
                    for args, kw in orig_states:
                        out = layer(*args, **kw)
                        nxt.append(_next_call((args, kw), out))
            finally:
                h.remove()
            if target_kind == "stream-residual":  # also undo the residual stream's drift
                stream_t = [t + _hidden(o) - _hidden(m) for t, o, m in zip(stream_t, orig_states, states)]
            orig_states = nxt
            if refit_mlp == "stream":
                layer_targets = [_hidden(c) for c in nxt]
        plan = plan_layer(attn, kv_heads, sums / tokens, key_weighting, value_weighting)
        apply_plan(attn, plan)
        if refit:
            plan.report.output_residual = refit_on_calls(attn, attn_calls, targets, ridge)
        if refine:
            kw_r = {k: v for k, v in refine.items() if k not in ("target", "damping")}
            plan.report.refine_error = refine_attention(
                attn, attn_calls, stream_t if stream_refine else targets,
                weights=None if sens is None else sens[i], **kw_r)
        if refit_mlp:
            plan.report.mlp_residual = refit_down_proj(layer, states, layer_targets, ridge)
        del attn_calls, targets, layer_targets
        if sens is not None:
            sens[i] = None
        report.layers.append(plan.report)
        with torch.no_grad():
            states = [_next_call(c, layer(*c[0], **c[1])) for c in states]
    model.train(was_training)


def _next_call(call, out):
    """The next decoder layer's call: ``call`` with its hidden states replaced by ``out``."""
    args, kw = call
    out = first_output(out)
    return ((out,) + tuple(args[1:]), kw) if args else (args, {**kw, "hidden_states": out})


def _check_supported(model, mods) -> None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    prf = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
    if prf not in (None, 1, 1.0):
        raise NotImplementedError(f"partial rotary embeddings (factor {prf}) are not supported")
    for m in mods:
        for name in ("q_norm", "k_norm"):
            if getattr(m, name, None) is not None:
                raise NotImplementedError(
                    f"{type(m).__name__} has {name}: it normalizes {name[0]} per head before RoPE; the merge needs "
                    "keys and queries linear in the input (Llama/Mistral/Qwen2-style attention)")
    kinds = {(m.q_proj.out_features, m.k_proj.out_features, m.v_proj.out_features, m.head_dim) for m in mods}
    if len(kinds) != 1:
        raise NotImplementedError(f"layers with different head layouts are not supported: {kinds}")


def compress(model, calibration=None, kv_heads: int = 1, init: str = "activations", *,
             tokenizer=None, seq_len: int = 512, batch_size: int = 1,
             key_weighting: str = "query", value_weighting: str = "output",
             sequential: bool = True, refit: bool = True, ridge: float = 1e-2,
             refine_steps: int = 0, refine_lr: float = 1e-3, refine_target: str = "layer",
             refine_damping: float = 0.0, refit_mlp: str | None = None,
             moments: tuple[list[torch.Tensor], int] | None = None, progress: bool = True,
             emulate: str | None = None):
    """Merge every layer's KV heads into ``kv_heads`` heads, in place; returns ``model``.

    Args:
        model: a transformers causal LM with Llama-style attention (q/k/v/o projections,
            ``rotate_half`` RoPE over the full head dim), e.g. Llama, Mistral, Qwen2.
        calibration: text(s) (needs ``tokenizer``), a ``[T]``/``[B, T]`` token-id tensor or a
            list of token-id sequences. Required for ``init="activations"``, ignored for
            ``"weights"``.
        kv_heads: the new number of KV heads; must divide the current one.
        init: ``"activations"`` (PCA of calibration keys/values) or ``"weights"`` (PCA of the
            projection weights alone).
        tokenizer: tokenizes text calibration data (``seq_len``-token windows).
        key_weighting: ``"query"`` weights each head's key error by the energy of the queries
            that read it; ``"none"``: plain per-frequency PCA.
        value_weighting: ``"output"`` measures value error through the output projection;
            ``"none"``: plain PCA.
        sequential: (activations only) calibrate layer by layer on the hidden states the
            already-merged layers produce (one pass through the model in all), GPTQ-style;
            ``False``: every layer from one pass of the original model.
        refit: (sequential only) refit each layer's ``o_proj`` by ridge least squares so that
            the merged heads reproduce the original layer's attention output on the
            calibration tokens (``ridge`` shrinks towards the PCA fold).
        refine_steps: (sequential only) after the merge and refit, Adam steps per layer on the
            four projections against the attention output on the calibration tokens
            (:func:`torchkvq.heads.refine.refine_attention`; 0 = off). ``refine_lr``: its peak
            learning rate (cosine decay). ``refine_target``: ``"layer"`` — the original layer's
            output on the same (merged-model) inputs; ``"stream"`` — the original layer's output
            on the original model's hidden states, so a layer also makes up for the layers
            before it; ``"stream-residual"`` — that plus the residual stream's drift (Llama-style
            pre-norm layers, where the attention output is added to the layer input);
            ``"fisher"`` — the ``"layer"`` target with each element of the error weighted by
            how much it moves the original model's loss on the calibration text
            (:func:`~torchkvq.heads.calibrate.output_sensitivities`, one extra forward and
            backward pass of the original model per calibration window; BRECQ's
            Fisher-weighted reconstruction). ``refine_damping`` (fisher only) adds that multiple of
            each layer's mean weight to every weight, mixing in the plain error.
        refit_mlp: (sequential only) after the attention's merge (and refit, refinement), refit
            each decoder layer's ``mlp.down_proj`` by ridge least squares
            (:func:`refit_down_proj`) so that the layer's output reproduces ``"layer"`` — the
            original layer's output on the same inputs — or ``"stream"`` — the original model's
            hidden state after that layer (upstream drift included). None: off.
        moments: precomputed ``collect_input_moments`` output, to reuse one calibration pass
            (implies the one-pass, non-sequential path).
        progress: tqdm progress bars.
        emulate: diagnostics only — ``"keys"``, ``"values"`` or ``"both"`` keeps the old head
            count and substitutes only the reconstructed keys and/or values
            (:func:`emulate_plan`), to see which merge costs what.

    A :class:`CompressReport` is attached as ``model.torchkvq_heads_report``.
    """
    from tqdm.auto import tqdm

    if init not in ("activations", "weights"):
        raise ValueError(f"init must be 'activations' or 'weights', got {init!r}")
    if key_weighting not in ("query", "none"):
        raise ValueError(f"key_weighting must be 'query' or 'none', got {key_weighting!r}")
    if value_weighting not in ("output", "none"):
        raise ValueError(f"value_weighting must be 'output' or 'none', got {value_weighting!r}")
    if not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be an integer >= 0, got {refine_steps!r}")
    if refine_target not in REFINE_TARGETS:
        raise ValueError(f"refine_target must be one of {REFINE_TARGETS}, got {refine_target!r}")
    if not (isinstance(refine_damping, (int, float)) and refine_damping >= 0) or (
            refine_damping and refine_target != "fisher"):
        raise ValueError(f"refine_damping must be a number >= 0 and applies to refine_target='fisher' only, "
                         f"got {refine_damping!r} with refine_target={refine_target!r}")
    if refit_mlp not in (None, "layer", "stream"):
        raise ValueError(f"refit_mlp must be None, 'layer' or 'stream', got {refit_mlp!r}")
    if refit_mlp and not (init == "activations" and sequential and moments is None and emulate is None):
        raise ValueError("refit_mlp needs the sequential activation merge (init='activations', "
                         "sequential=True, no moments=, no emulate=)")
    if refine_steps and not (init == "activations" and sequential and moments is None and emulate is None):
        raise ValueError("refine_steps needs the sequential activation merge (init='activations', "
                         "sequential=True, no moments=, no emulate=)")
    if emulate not in (None, "keys", "values", "both"):
        raise ValueError(f"emulate must be None, 'keys', 'values' or 'both', got {emulate!r}")
    mods = attention_modules(model)
    _check_supported(model, mods)
    d = mods[0].head_dim
    n_kv = mods[0].k_proj.out_features // d
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads < 1:
        raise ValueError(f"kv_heads must be a positive integer, got {kv_heads!r}")
    if kv_heads > n_kv or n_kv % kv_heads:
        raise ValueError(
            f"kv_heads={kv_heads} must divide the model's current {n_kv} KV heads (groups of "
            f"adjacent heads are merged); valid choices: "
            f"{[k for k in range(1, n_kv + 1) if n_kv % k == 0]}")
    if init == "activations" and moments is None:
        if calibration is None:
            raise ValueError("init='activations' needs calibration text or token ids (calibration=...)")
        batches = calibration_token_ids(calibration, tokenizer, seq_len)
    if moments is not None and len(moments[0]) != len(mods):
        raise ValueError(f"moments hold {len(moments[0])} layers, the model has {len(mods)}")

    report = CompressReport(n_kv, kv_heads, init, key_weighting, value_weighting, 0, method=init)
    if init == "activations" and sequential and moments is None and emulate is None:
        rows = [b[j:j + batch_size] for b in batches for j in range(0, b.shape[0], batch_size)]
        report.method = "sequential" + (f"+refit(ridge={ridge:g})" if refit else "")
        refine = None
        if refine_steps:
            refine = dict(steps=refine_steps, lr=refine_lr, target=refine_target, damping=refine_damping,
                          generator=torch.Generator().manual_seed(0))
            report.method += f"+refine({refine_steps}x{refine_lr:g},{refine_target})"
        if refit_mlp:
            report.method += f"+refit_mlp({refit_mlp})"
        _compress_sequential(model, mods, rows, kv_heads, key_weighting, value_weighting,
                             refit, ridge, progress, report, refine, refit_mlp)
    else:
        if init == "activations":
            if moments is None:
                moments = collect_input_moments(model, batches, batch_size=batch_size, progress=progress)
            sums, report.calibration_tokens = moments
            sigmas = [s / report.calibration_tokens for s in sums]
            report.method = "one-pass"
        else:
            sigmas = [torch.eye(mods[0].k_proj.in_features + 1, dtype=torch.float64)] * len(mods)
        for attn, sigma in tqdm(list(zip(mods, sigmas)), desc=f"merging KV heads {n_kv}->{kv_heads}",
                                unit="layer", disable=not progress):
            plan = plan_layer(attn, kv_heads, sigma, key_weighting, value_weighting)
            if emulate is None:
                apply_plan(attn, plan)
            else:
                emulate_plan(attn, plan, keys=emulate in ("keys", "both"), values=emulate in ("values", "both"))
            report.layers.append(plan.report)
    model.torchkvq_heads_report = report
    if emulate is not None:
        return model

    configs = {id(model.config): model.config}
    if hasattr(model.config, "get_text_config"):
        tc = model.config.get_text_config()
        configs[id(tc)] = tc
    for m in mods:
        if getattr(m, "config", None) is not None:
            configs[id(m.config)] = m.config
    for cfg in configs.values():
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = kv_heads
    return model
