"""XQuant in transformers: a ``Cache`` whose layers cache the attention input, and the model
patching that hands that input to the cache.

Nothing in transformers is edited. :func:`patch_model` registers forward pre-hooks (once per
model) on every decoder layer and its attention module: when the call's ``past_key_values`` is
an :class:`XQuantCache`, they give the cache layer the attention input X (post-norm), the
residual stream entering the decoder layer (for XQuant-CL) and the tokens' position ids. The
attention module then runs as usual: its ``Cache.update`` call caches X instead of K and V, and
torchkvq's attention function (:mod:`torchkvq.hf.attention`) attends over the layer's
:class:`~torchkvq.remat.RematStore`, which rematerializes K and V.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..policies.xquant import XQuant, XQuantCL
from ..remat import Accumulator, LayerWeights, RematStore, TokenIndex
from ..xstore import XStore
from .cache import ATTN_IMPLEMENTATION, PENDING

_HOOKED = "_torchkvq_xquant_hooks"


def _decoder_layers(model) -> list:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    rotary = getattr(base, "rotary_emb", None)
    if layers is None or rotary is None or not all(
        hasattr(l, "self_attn") and hasattr(l, "input_layernorm")
        and hasattr(l.self_attn, "k_proj") and hasattr(l.self_attn, "v_proj") for l in layers
    ):
        raise NotImplementedError(
            f"XQuant: {type(model).__name__} is not a Llama-style decoder (model.layers[i] with "
            "input_layernorm and self_attn.k_proj/v_proj, model.rotary_emb); not supported yet"
        )
    return list(layers)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _check_keys_are_rope_of_projection(model, layers: list) -> None:
    """XQuant rebuilds each key as RoPE(k_norm(X·W_k + b)) over whole heads (k_norm: QK-norm
    models' per-head key norm, else none); refuse models whose keys are anything else rather
    than attend over wrong keys."""
    head_dim = _head_dim(model.config.get_text_config(decoder=True))
    for i, l in enumerate(layers):
        kn = getattr(l.self_attn, "k_norm", None)
        shape = tuple(getattr(kn, "weight", torch.empty(0)).shape)
        if kn is not None and shape != (head_dim,):
            raise NotImplementedError(
                f"XQuant: {type(model).__name__} layer {i} normalizes its keys with a k_norm that is not "
                f"a per-head norm over head_dim={head_dim} (weight shape {shape}); rematerializing such keys "
                "is not supported yet (use a KVQCache policy such as KIVI, which caches the keys after the norm)"
            )
    w = layers[0].self_attn.k_proj.weight
    cos, _ = getattr(model, "model", model).rotary_emb(
        torch.zeros(1, dtype=w.dtype, device=w.device), torch.zeros(1, 1, dtype=torch.long, device=w.device))
    if cos.shape[-1] != head_dim:
        raise NotImplementedError(
            f"XQuant: {type(model).__name__} rotates {cos.shape[-1]} of its {head_dim} key channels "
            "(partial rotary); rematerialization applies RoPE to whole heads, so this is not supported "
            "yet (use a KVQCache policy)"
        )


def _per_head(norm):
    """``[B, T, heads * head_dim] -> same``: a norm over head_dim applied to every head."""
    if norm is None:
        return None
    head_dim = norm.weight.shape[0]
    return lambda k: norm(k.unflatten(-1, (-1, head_dim))).flatten(-2)


def _capture_residual(layer_module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if isinstance(cache, XQuantCache):
        cache.check_layer(layer_module)
        h = args[0] if args else kwargs["hidden_states"]
        cache.layers[layer_module.self_attn.layer_idx].pending_residual = h


def _capture_input(attn_module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if isinstance(cache, XQuantCache):
        layer = cache.layers[attn_module.layer_idx]
        layer.pending_x = args[0] if args else kwargs["hidden_states"]
        layer.pending_positions = kwargs.get("position_ids")


def patch_model(model) -> None:
    """Install the input-capturing hooks on `model`'s decoder layers (idempotent). They do
    nothing unless the forward call's cache is an :class:`XQuantCache`."""
    if getattr(model, _HOOKED, None):
        return
    handles = []
    for layer in _decoder_layers(model):
        handles.append(layer.register_forward_pre_hook(_capture_residual, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_pre_hook(_capture_input, with_kwargs=True))
    setattr(model, _HOOKED, handles)


def _layer_weights(model, policy: XQuant) -> list[LayerWeights]:
    """Each layer's projections in XQuant's form, computed once per model and mode (the SVD is
    the offline step)."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = _head_dim(cfg)
    kv_heads = cfg.num_key_value_heads
    mode = "x" if isinstance(policy, XQuantCL) else policy.resolve_mode(cfg.hidden_size, kv_heads * head_dim)
    memo = model.__dict__.setdefault("_torchkvq_xquant_weights", {})
    if mode not in memo:
        out = []
        with torch.no_grad():
            for layer in _decoder_layers(model):
                a = layer.self_attn
                out.append(LayerWeights.build(
                    a.k_proj.weight.detach(), None if a.k_proj.bias is None else a.k_proj.bias.detach(),
                    a.v_proj.weight.detach(), None if a.v_proj.bias is None else a.v_proj.bias.detach(),
                    kv_heads, head_dim, mode))
        memo[mode] = out
    return memo[mode]


class XQuantLayer(CacheLayerMixin):
    """One decoder layer under XQuant: ``update`` caches the captured input, not K and V."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    window = None  # full attention only: XQuantCache refuses sliding-window models

    def __init__(self, cache: "XQuantCache", index: int) -> None:
        super().__init__()
        self.cache, self.index = cache, index
        self.policy = cache.policy
        self.state: Any = None
        self.store: RematStore | None = None
        self.pending_x = self.pending_residual = self.pending_positions = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = self.cache._make_store(self.index, key_states.shape[0], key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        cl = isinstance(self.policy, XQuantCL)
        x = self.pending_residual if cl else self.pending_x
        positions = self.pending_positions
        self.pending_x = self.pending_residual = self.pending_positions = None
        if x is None or positions is None:
            raise RuntimeError(
                "XQuantCache: the attention layer's input was not captured; build the cache with "
                "torchkvq.hf.enable(model, policy) or XQuantCache(model, policy), which patch the model"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.store is not None
        self.store.append(x, positions)
        key_states._kvq_layer = self  # how torchkvq's attention function finds this layer
        PENDING.layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.store.n_tokens if self.store is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False
        self.cache.tokens = None  # shared by every layer: a reset cache starts a new sequence
        if self.cache.accumulator is not None:
            self.cache.accumulator.release()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("XQuantCache does not support beam search; use greedy or sampling generation")


class XQuantCache(Cache):
    """A transformers cache holding XQuant's quantized layer inputs instead of keys and values.

    Args:
        model: a Llama-style causal LM using torchkvq's attention (:func:`torchkvq.hf.enable`
            sets that up); it is patched (:func:`patch_model`) if it was not.
        policy: :class:`~torchkvq.policies.XQuant` or :class:`~torchkvq.policies.XQuantCL`.
    """

    def __init__(self, model, policy: XQuant) -> None:
        if not isinstance(policy, XQuant):
            raise TypeError(f"XQuantCache: policy must be XQuant or XQuantCL, got {type(policy).__name__}")
        policy.validate()
        text = model.config.get_text_config(decoder=True)
        if getattr(text, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(
                "XQuantCache: the model does not use torchkvq's attention; call "
                "torchkvq.hf.enable(model, policy) first (it returns a ready cache). "
                f"attn_implementation is {getattr(text, '_attn_implementation', None)!r}"
            )
        layer_types, _ = get_layer_types_and_kwargs(text)
        if set(layer_types) != {"full_attention"}:
            raise NotImplementedError(
                f"XQuantCache: layer types {sorted(set(layer_types) - {'full_attention'})} are not "
                "supported; XQuant serves full-attention decoders only (use a KVQCache policy)"
            )
        layers = _decoder_layers(model)
        _check_keys_are_rope_of_projection(model, layers)
        patch_model(model)
        self.policy = policy
        self._weights = _layer_weights(model, policy)
        self._decoder_layers = layers  # the model's modules: check_layer tells another model's
        self._norms = [l.input_layernorm for l in layers]
        self._key_norms = [_per_head(getattr(l.self_attn, "k_norm", None)) for l in layers]
        self._rotary = getattr(model, "model", model).rotary_emb
        self.tokens: TokenIndex | None = None
        self.accumulator = Accumulator() if isinstance(policy, XQuantCL) else None
        super().__init__(layers=[XQuantLayer(self, i) for i in range(len(layers))])

    def check_layer(self, layer_module) -> None:
        """Raise unless `layer_module` is the decoder layer of the model this cache was built
        for. The cache rematerializes K and V with that model's projections, so another model -
        even one of the same config - would attend over the wrong keys. Called by the first hook
        of each layer, before anything is cached, so a refused forward leaves the cache as it was."""
        idx = layer_module.self_attn.layer_idx
        if not (0 <= idx < len(self._decoder_layers) and self._decoder_layers[idx] is layer_module):
            raise ValueError(
                f"XQuantCache: layer {idx} of this model is not a layer of the model the cache was "
                "built for (the cache rematerializes keys and values with that model's "
                "projections); build a cache for this model: torchkvq.hf.enable(model, policy) or "
                "XQuantCache(model, policy)"
            )

    def _make_store(self, index: int, batch_size: int, device: torch.device) -> RematStore:
        w = self._weights[index]
        dtype = w.streams[0].weight.dtype
        if self.tokens is None:
            probe = torch.zeros(1, dtype=dtype, device=device)
            self.tokens = TokenIndex(batch_size, lambda pos: self._rotary(probe, pos), device)
        p = self.policy
        stores = [XStore(batch_size, s.width, bits=p.bits_for(index), group_size=p.group_size,
                         window_dtype=p.window_dtype or dtype, scale_dtype=p.scale_dtype, device=device)
                  for s in w.streams]
        return RematStore(index, w, self.tokens, stores, absorb_values=p.absorb_values,
                          accumulator=self.accumulator,
                          norm=self._norms[index] if self.accumulator is not None else None,
                          last=index == len(self._weights) - 1, key_norm=self._key_norms[index])

    @property
    def stores(self) -> list[RematStore]:
        return [layer.store for layer in self.layers if layer.store is not None]

    def nbytes(self) -> int:
        """Bytes held: every layer's codes, scales, zeros and window, the shared positions and
        padding flags, and, while a forward pass holds them, the rotary tables and XQuant-CL's
        accumulator."""
        return sum(self.nbytes_breakdown().values())

    def nbytes_breakdown(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.stores:
            for k, v in s.nbytes_breakdown().items():
                total[k] = total.get(k, 0) + v
        t = self.tokens  # the shared token index: in use, its spare capacity, the step's tables
        total["bookkeeping"] = t.nbytes_in_use() if t is not None else 0
        total["reserved"] = total.get("reserved", 0) + (t.nbytes() - t.nbytes_in_use() if t is not None else 0)
        total["rotary_tables"] = t.tables_nbytes() if t is not None else 0
        total["accumulator"] = self.accumulator.nbytes() if self.accumulator is not None else 0
        return total

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 K/V cache of the same tokens would take."""
        return sum(s.fp16_nbytes() for s in self.stores)
