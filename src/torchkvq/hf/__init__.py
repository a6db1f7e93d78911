"""Hugging Face transformers integration: ``KVQCache`` and ``enable(model, policy)``.

Example:
    >>> import torchkvq.hf
    >>> from torchkvq.policies import KIVI
    >>> cache = torchkvq.hf.enable(model, KIVI(key_bits=4, value_bits=4))  # doctest: +SKIP
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=64)  # doctest: +SKIP
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..policies import Policy
from ..policies.xquant import XQuant
from .attention import kvq_attention_forward
from .cache import ATTN_IMPLEMENTATION, KVQCache, KVQLayer, install_fit_check
from .xquant import XQuantCache, patch_model

AttentionInterface.register(ATTN_IMPLEMENTATION, kvq_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def new_cache(model, policy: Policy) -> KVQCache | XQuantCache:
    """A fresh cache of `policy` for `model` (already switched by :func:`enable`): an
    :class:`XQuantCache` for XQuant policies, else a :class:`KVQCache`."""
    if isinstance(policy, XQuant):
        return XQuantCache(model, policy)
    return KVQCache(model.config, policy)


def enable(model, policy: Policy) -> KVQCache | XQuantCache:
    """Switch `model` to torchkvq's attention and return an empty cache for it.

    The model keeps working with ordinary caches (attention is then plain SDPA). Build a new
    cache (:func:`new_cache`) for every new sequence batch. XQuant policies get an
    :class:`XQuantCache` (the model is patched to hand it the attention input).
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"torchkvq.hf.enable: {type(model).__name__} does not use transformers' attention "
                "interface (it kept its own attention), so KVQCache cannot serve it"
            )
        cache = new_cache(model, policy)
    except Exception:
        model.set_attn_implementation(previous)  # a refused model is left as it was
        raise
    install_fit_check(model)
    model.eval()
    return cache


__all__ = ["enable", "new_cache", "KVQCache", "KVQLayer", "XQuantCache", "patch_model",
           "kvq_attention_forward", "ATTN_IMPLEMENTATION"]
