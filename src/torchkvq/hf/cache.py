"""A transformers ``Cache`` whose layers are compressed :class:`~torchkvq.store.KVStore` s."""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from ..policies import Policy
from ..policies.xquant import XQuant
from ..store import KVStore
from . import persist

#: Name under which torchkvq's attention function is registered with transformers.
ATTN_IMPLEMENTATION = "kvq"

#: The layer whose update ran last on this thread and whose attention has not run yet: lets the
#: attention function notice a model that replaced the tagged keys in between.
PENDING = threading.local()


class KVQLayer(CacheLayerMixin):
    """One decoder layer's cache: a store plus the policy's per-layer state.

    ``update`` only appends the new keys and values in full precision and tags the returned key
    tensor with this layer; torchkvq's attention function (see :mod:`torchkvq.hf.attention`)
    then lets the policy quantize and attends over the store directly. `window` is the layer's
    sliding window (None: full attention): its store keeps only what the window still sees.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, policy: Policy, window: int | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.window = window
        self.is_sliding = window is not None
        self.state: Any = policy.new_state()
        self.store: KVStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = self.policy.make_store(B, H, D, key_states.dtype, key_states.device, self.window)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new tokens; on any error the layer is left exactly as it was."""
        if not isinstance(key_states, torch.Tensor) or key_states.dim() != 4:
            raise ValueError(f"KVQCache: keys must be a [batch, kv_heads, tokens, head_dim] tensor, "
                             f"got {list(key_states.shape) if isinstance(key_states, torch.Tensor) else type(key_states).__name__}")
        store = self.store
        if store is None:
            # Built aside and kept only once the append succeeded: a failed first update leaves
            # the layer uninitialized.
            B, H, _, D = key_states.shape
            store = self.policy.make_store(B, H, D, key_states.dtype, key_states.device, self.window)
        elif (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (
                store.batch_size, store.kv_heads, store.head_dim):
            raise ValueError(
                f"KVQCache: this layer holds batch {store.batch_size}, {store.kv_heads} kv heads of "
                f"dim {store.head_dim}, but got keys {list(key_states.shape)}; a cache serves one "
                "batch of one model: build a new KVQCache for this batch or model"
            )
        store.append(key_states, value_states)
        if self.store is None:
            self.dtype, self.device, self.store = key_states.dtype, key_states.device, store
            self.is_initialized = True
        key_states._kvq_layer = self  # how the attention function finds this layer's store
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
        self.state = self.policy.new_state()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            "KVQCache does not support beam search (reordering a compressed cache); use greedy "
            "or sampling generation"
        )


_FIT_CHECK = "_torchkvq_fit_check"


def _check_fit(model, args, kwargs) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, KVQCache):
        cache.check_fits(model.config)


def install_fit_check(model) -> None:
    """A forward pre-hook on `model` (idempotent; :func:`torchkvq.hf.enable` installs it) that
    refuses a KVQCache built for another layer count before any layer runs, so the failed
    forward leaves the cache as it was. Other caches pass untouched."""
    if getattr(model, _FIT_CHECK, None) is None:
        setattr(model, _FIT_CHECK, model.register_forward_pre_hook(_check_fit, with_kwargs=True))


class KVQCache(Cache):
    """A compressed KV cache for ``model.generate(..., past_key_values=cache)`` and forward calls.

    Args:
        config: the model's config; the model must use torchkvq's attention
            (:func:`torchkvq.hf.enable` sets that up). Sliding-window layers (the config's
            ``layer_types`` / ``sliding_window``, as transformers' ``DynamicCache`` reads them)
            get sliding-window stores, full-attention layers ordinary ones.
        policy: the cache policy, e.g. :class:`torchkvq.policies.KIVI`.

    Example:
        >>> import torchkvq.hf
        >>> from torchkvq.policies import KIVI
        >>> cache = torchkvq.hf.enable(model, KIVI(key_bits=2, value_bits=2))  # doctest: +SKIP
        >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=64)  # doctest: +SKIP
        >>> cache.nbytes_breakdown()  # doctest: +SKIP
    """

    def __init__(self, config, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"KVQCache: policy must be a torchkvq.policies.Policy, got {type(policy).__name__}")
        if isinstance(policy, XQuant):
            raise TypeError(
                f"KVQCache: {type(policy).__name__} caches the layer input, not keys and values: use "
                "torchkvq.hf.enable(model, policy) or torchkvq.hf.XQuantCache(model, policy)"
            )
        policy.validate()
        text = config.get_text_config(decoder=True)
        if getattr(text, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(
                "KVQCache: the model does not use torchkvq's attention, so it would attend over "
                "the new tokens only; call torchkvq.hf.enable(model, policy) first (it returns a "
                f"ready cache). attn_implementation is {getattr(text, '_attn_implementation', None)!r}"
            )
        if getattr(text, "use_bidirectional_attention", False):
            raise NotImplementedError("KVQCache: bidirectional attention is not supported; only causal decoders are")
        # The same reading of the config as transformers' DynamicCache (layer_types, else each
        # layer's sliding_window), so both caches give a layer the same window.
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        unsupported = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unsupported:
            raise NotImplementedError(
                f"KVQCache: layer types {unsupported} are not supported; only full-attention and "
                "sliding-window layers are"
            )
        self.policy = policy
        #: What the cached keys depend on in the model config (checked by :meth:`load`).
        self.model_fingerprint = persist.model_fingerprint(config)
        super().__init__(layers=[
            KVQLayer(policy, kw.get("sliding_window") if t == "sliding_attention" else None)
            for t, kw in zip(layer_types, layer_kwargs)
        ])

    def check_fits(self, config) -> None:
        """Raise unless a model of `config` has this cache's layer count. Called before a
        forward touches the cache (:func:`install_fit_check`): with a deeper model the layers
        before the first missing one would take the step's tokens, and with a shallower one
        the cache would silently keep layers nobody updates."""
        n = len(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])
        if n != len(self.layers):
            raise ValueError(
                f"KVQCache: the model has {n} layers but this cache was built for a config with "
                f"{len(self.layers)}; a cache serves one model: build it from this model's config "
                "(torchkvq.hf.enable(model, policy) or KVQCache(model.config, policy))"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # The last line of defence for models whose forward install_fit_check does not see.
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"KVQCache: the model updates layer {layer_idx} but this cache was built for a "
                f"config with {len(self.layers)} layers; build the cache from this model's config"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def save(self, path) -> None:
        """Write this cache to `path` (a safetensors file) for :meth:`load`, e.g. to reuse a
        compressed prompt (prefix caching). See :mod:`torchkvq.hf.persist` for the format."""
        persist.save_cache(self, path)

    @classmethod
    def load(cls, path, config, policy: Policy | None = None, device=None) -> "KVQCache":
        """Read a cache written by :meth:`save`, to continue generating where it stopped.

        Args:
            path: the file.
            config: the config of the model that will use the cache; it must be the model the
                cache was filled by (same architecture, layers, heads, RoPE, dtype) and use
                torchkvq's attention (:func:`torchkvq.hf.enable`).
            policy: None to rebuild the file's policy, or a policy that must equal it.
            device: where the stores go (default: CPU).

        Raises:
            ValueError: a truncated or corrupted file (checksum), another format version,
                another model, or another policy; the message says which.
        """
        return persist.load_cache(cls, path, config, policy=policy, device=device)

    @property
    def stores(self) -> list[KVStore]:
        """The initialized layers' stores."""
        return [layer.store for layer in self.layers if layer.store is not None]

    def nbytes(self) -> int:
        """Bytes of every tensor held by every layer (capacity included)."""
        return sum(s.nbytes() for s in self.stores)

    def nbytes_breakdown(self) -> dict[str, int]:
        """Bytes by part summed over layers; see :meth:`KVStore.nbytes_breakdown`."""
        total: dict[str, int] = {}
        for s in self.stores:
            for k, v in s.nbytes_breakdown().items():
                total[k] = total.get(k, 0) + v
        return total

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 cache of the same layers would take (a sliding-window layer: its window)."""
        return sum(s.fp16_nbytes() for s in self.stores)
