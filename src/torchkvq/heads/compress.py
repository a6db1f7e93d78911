"""Merge groups of KV heads into one each (MHA -> GQA, GQA -> fewer KV heads), RoPE-aware.

After "Effectively Compress KV Heads for LLM" (arXiv 2406.07056); see docs/heads.md. The merge
of one layer is :mod:`.merge` (per-frequency complex PCA of the keys, PCA of the values, both
folded into the projections beside them); this module runs it over a whole model: in one pass
on second moments, or (the default) layer by layer on cached hidden states with the refits of
:mod:`.refit` and the optional refinement of :mod:`.refine`.

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
from .merge import LayerReport, apply_plan, emulate_plan, plan_layer
from .refit import refit_down_proj, refit_on_calls

__all__ = ["compress", "CompressReport", "REFINE_TARGETS"]


@dataclass
class CompressReport:
    """What :func:`compress` did (``model.torchkvq_heads_report``): settings and one
    :class:`~torchkvq.heads.merge.LayerReport` per layer."""

    old_kv_heads: int
    kv_heads: int
    init: str
    key_weighting: str
    value_weighting: str
    calibration_tokens: int
    layers: list[LayerReport] = field(default_factory=list)
    method: str = "one-pass"  # "sequential[+refit(...)]", "one-pass" (activations) or "weights"


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
