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
    prefill does (a policy that needs attention statistics gets those of the last few prompt
    queries from ``kvq.quant_attention``) - and then the policy quantizes what it wants. Every
    later chunk runs ``kvq.quant_attention`` over the store (causal, GQA-aware) after the policy
    has quantized: the history is never dequantized into a full-precision tensor. Without a KVQCache (e.g. a plain DynamicCache),
    `key`/`value` hold the whole history in full precision and this is SDPA.
    """
    layer = getattr(key, "_kvq_layer", None)
    pending, PENDING.layer = getattr(PENDING, "layer", None), None
    if layer is None and pending is not None:
        raise NotImplementedError(
            f"torchkvq attention: {type(module).__name__} transforms the cached keys between "
            "Cache.update and attention (e.g. repeats them), so it cannot read a compressed "
            "store; this model is not supported by KVQCache"
        )
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("torchkvq attention: sliding-window and soft-capped attention are not supported yet")
    if dropout:
        raise ValueError("torchkvq attention is for inference: dropout must be 0 (call model.eval())")
    store, policy = layer.store, layer.policy
    L = query.shape[2]
    first = store.n_tokens == L  # nothing was held before this chunk
    if first and attention_mask is not None:
        valid = attention_mask[:, 0, -1, -L:].to(torch.bool)
        if not bool(valid.all()):
            store.mark_padding(valid)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if first:
        # Exact attention over the prompt's own full-precision keys and values, as KIVI does.
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                        scaling=scaling, **kwargs)
        if policy.wants_stats:
            # Statistics of the last few prompt queries only: they stand for the last steps.
            recent = query[:, :, -policy.prefill_stats_queries :]
            _, _, stats = store.attend(recent, scale=scale, causal=True, return_stats=True)
            policy.observe(store, layer.state, stats, recent * scale)
        policy.after_append(store, layer.state)
        return out, None
    policy.after_append(store, layer.state)
    out, _, stats = store.attend(query, scale=scale, causal=True, return_stats=policy.wants_stats)
    if policy.wants_stats:
        policy.observe(store, layer.state, stats, query * scale)
    return out.transpose(1, 2).contiguous(), None
