"""torchkvq's attention function for transformers: attention straight over the compressed store."""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import PENDING


def kvq_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query [B, Hq, L, D]`` -> ``([B, L, Hq, D], None)``.

    With a :class:`~torchkvq.hf.KVQCache`, `key`/`value` are only the new tokens (tagged with
    their layer). Padding found in the first chunk's mask is marked in the store. The first
    chunk attends to its own full-precision keys and values with SDPA - exactly, as KIVI's
    prefill does (with logit soft-capping, which SDPA lacks, with ``kvq.quant_attention`` over
    the still unquantized store; a policy that needs attention statistics gets those of the last
    few prompt queries from ``kvq.quant_attention``) - and then the policy quantizes what it
    wants. Every later chunk runs ``kvq.quant_attention`` over the store (causal, GQA-aware,
    sliding window and soft-capping as the layer asks) after the policy has quantized: the
    history is never dequantized into a full-precision tensor. A sliding-window layer's store
    then drops what the next query cannot see, so between steps it holds what transformers'
    sliding-window cache holds. Learned sinks (``s_aux``) rescale the output by the kernel's
    log-sum-exp (the attention statistics a policy sees leave the sink out). Without a KVQCache (e.g. a plain DynamicCache), `key`/`value`
    hold the whole history in full precision and this is SDPA.
    """
    layer = getattr(key, "_kvq_layer", None)
    pending, PENDING.layer = getattr(PENDING, "layer", None), None
    if layer is None and pending is not None:
        raise NotImplementedError(
            f"torchkvq attention: {type(module).__name__} transforms the cached keys between "
            "Cache.update and attention (e.g. repeats them), so it cannot read a compressed "
            "store; this model is not supported by KVQCache"
        )
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    if layer is None and (softcap is not None or sinks is not None):
        return _eager_attention(query, key, value, attention_mask, dropout, scaling, softcap, window, sinks)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if window != layer.window:
        raise ValueError(
            f"torchkvq attention: {type(module).__name__} attends with sliding_window={window} but "
            f"its cache layer was built for {layer.window}; build the KVQCache from this model's config"
        )
    if dropout:
        raise ValueError("torchkvq attention is for inference: dropout must be 0 (call model.eval())")
    store, policy = layer.store, layer.policy
    L = query.shape[2]
    first = store.n_tokens == L  # nothing was held before this chunk
    if first and attention_mask is not None:
        # Padding: the keys a token does not see at its own position (the mask's diagonal; its
        # last row would also hide what left a sliding window).
        i = torch.arange(L, device=attention_mask.device)
        valid = attention_mask[:, 0, i, attention_mask.shape[-1] - L + i].to(torch.bool)
        if not bool(valid.all()):
            store.mark_padding(valid)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if first:
        if softcap is None and sinks is None:
            # Exact attention over the prompt's own full-precision keys and values, as KIVI does.
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                            scaling=scaling, **kwargs)
        else:  # nothing is quantized yet: the same exact attention, soft-capped / with sinks
            out, lse, _ = store.attend(query, scale=scale, causal=True, softcap=softcap)
            out = _with_sinks(out, lse, sinks).transpose(1, 2)
        stats_queries = policy.prefill_stats_queries if policy.wants_stats else 0
        # Only the last few prompt queries (statistics) and later ones read the store from now
        # on: a sliding-window store drops the rest before the policy quantizes anything.
        store.evict(max(0, store.n_tokens - stats_queries))
        if policy.wants_stats:
            # Statistics of the last few prompt queries only: they stand for the last steps.
            recent = query[:, :, -stats_queries:]
            _, _, stats = store.attend(recent, scale=scale, causal=True, return_stats=True, softcap=softcap)
            policy.observe(store, layer.state, stats, recent * scale)
        policy.after_append(store, layer.state)
        store.evict(store.n_tokens)
        return out.contiguous(), None
    policy.after_append(store, layer.state)
    out, lse, stats = store.attend(query, scale=scale, causal=True, return_stats=policy.wants_stats,
                                   softcap=softcap)
    out = _with_sinks(out, lse, sinks)
    if policy.wants_stats:
        policy.observe(store, layer.state, stats, query * scale)
    store.evict(store.n_tokens)  # a sliding-window store keeps what the next query sees
    return out.transpose(1, 2).contiguous(), None


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Learned attention sinks (GPT-OSS's ``s_aux``, one logit per query head) join the softmax
    without a value: the output shrinks by ``sum(exp(s)) / (sum(exp(s)) + exp(sink))``, i.e.
    ``sigmoid(lse - sink)``. `out` ``[B, Hq, L, D]``, `lse` ``[B, Hq, L]``."""
    if sinks is None:
        return out
    keep = torch.sigmoid(lse - sinks.float()[None, :, None])  # lse = -inf (sees nothing): 0
    return (out.float() * keep[..., None]).to(out.dtype)


def _eager_attention(query, key, value, attention_mask, dropout, scaling, softcap, window, sinks):
    """Attention over full-precision keys with what SDPA lacks: logit soft-capping (scores
    ``c * tanh(s / c)``, then the mask) and learned sinks (an extra logit per head in the
    softmax). `attention_mask` is what ``sdpa_mask`` built (bool, True = attend) or None where
    it left causality to SDPA: the queries are then the last L of the T keys, each seeing its
    own position and, with a `window`, the W - 1 before. Returns ``([B, L, Hq, D], None)``."""
    if dropout:
        raise ValueError("torchkvq attention is for inference: dropout must be 0 (call model.eval())")
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = torch.matmul(query, key.transpose(2, 3)).float() * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    L, T = query.shape[2], key.shape[2]
    if attention_mask is None:
        qpos = torch.arange(T - L, T, device=query.device)[:, None]
        kpos = torch.arange(T, device=query.device)[None, :]
        attention_mask = (kpos <= qpos) & (kpos > qpos - window if window is not None else True)
    elif attention_mask.dtype != torch.bool:  # an additive float mask
        s = s + attention_mask[..., :T].float()
        attention_mask = None
    if attention_mask is not None:
        s = s.masked_fill(~attention_mask[..., :T], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.float()[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    p = s.softmax(-1).nan_to_num(0.0)[..., :T].to(value.dtype)  # a fully masked row gives 0
    return torch.matmul(p, value).transpose(1, 2).contiguous(), None
