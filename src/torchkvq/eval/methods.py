"""The methods ``torchkvq eval`` compares: the full-precision cache, every registered torchkvq
policy, and Hugging Face's QuantizedCache as the peer users have today.

A method builds a fresh cache for each sequence and reports the bytes that cache holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..policies import REGISTRY

BASELINE = "fp32"


@dataclass(frozen=True)
class Method:
    """A named way to cache: ``make_cache(model)`` gives a fresh cache, ``nbytes(cache)`` what
    it holds, and ``kind`` is ``baseline``, ``torchkvq``, ``peer`` or ``heads``. ``kv_heads``:
    run on a copy of the model whose KV heads were merged into this many (eval/transforms.py).
    ``nbytes_in_use``: the bytes that hold data, where the cache reserves capacity ahead (None:
    everything it holds is in use, as for transformers' caches, which grow by concatenation)."""

    name: str
    kind: str
    make_cache: Callable
    nbytes: Callable
    description: str
    kv_heads: int | None = None
    nbytes_in_use: Callable | None = None

    def bytes_in_use(self, cache) -> int:
        """Bytes of `cache` that hold data (``nbytes`` less capacity reserved for growth)."""
        return (self.nbytes_in_use or self.nbytes)(cache)


def tensor_bytes(t) -> int:
    """Bytes of a tensor, descending into wrapper subclasses (e.g. quanto's packed tensors)."""
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return 0


def _dynamic_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _dynamic_bytes(cache) -> int:
    return sum(tensor_bytes(layer.keys) + tensor_bytes(layer.values) for layer in cache.layers)


def _quanto_cache(bits: int):
    def make(model):
        from transformers import QuantizedCache

        return QuantizedCache("quanto", model.config, nbits=bits)

    return make


def _quantized_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        total += tensor_bytes(layer.keys) + tensor_bytes(layer.values)
        total += tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)
    return total


def _policy_method(name: str) -> Method:
    def make(model):
        from ..hf import new_cache

        return new_cache(model, REGISTRY[name]())

    def nbytes(cache) -> int:
        return cache.nbytes()

    def in_use(cache) -> int:
        return cache.nbytes() - cache.nbytes_breakdown().get("reserved", 0)

    policy = REGISTRY[name]()
    return Method(name, "torchkvq", make, nbytes, repr(policy), nbytes_in_use=in_use)


#: What ``torchkvq eval`` runs unless told otherwise: one configuration of every method, chosen so
#: the default run fits 10 minutes on 2 cores. ``--methods all`` runs every registry entry.
DEFAULT = ["fp32", "kivi-4", "kivi-2", "logquant-2", "qaq", "xquant-4", "xquant-cl-3", "heads-1+kivi-4",
           "hf-quanto-4", "hf-quanto-2"]


def all_methods() -> dict[str, Method]:
    """Every method by name: the baseline, the registered policies, the peers."""
    methods = {
        BASELINE: Method(BASELINE, "baseline", _dynamic_cache, _dynamic_bytes,
                         "transformers DynamicCache, full precision (the model runs in fp32)"),
    }
    for name in REGISTRY:
        methods[name] = _policy_method(name)
    for bits in (4, 2):
        methods[f"hf-quanto-{bits}"] = Method(
            f"hf-quanto-{bits}", "peer", _quanto_cache(bits), _quantized_bytes,
            f"transformers QuantizedCache, quanto backend, {bits}-bit (group 64, residual 128)",
        )
    return methods


def _heads_method(name: str, known: dict[str, Method]) -> Method | None:
    """``heads-K`` (fp cache) or ``heads-K+<method>`` on the model merged to K KV heads."""
    from .transforms import heads_spec

    spec = heads_spec(name)
    if spec is None or spec[0] < 1 or (spec[1] or BASELINE) not in known:
        return None
    inner = known[spec[1] or BASELINE]
    return dataclasses.replace(inner, name=name, kind="heads", kv_heads=spec[0],
                               description=f"KV heads merged to {spec[0]} (torchkvq.heads, calibrated) "
                               f"+ {inner.description}")


def names_from(spec: str) -> list[str]:
    """Method names from ``--methods``: ``default`` (:data:`DEFAULT`), ``all`` (every known
    method except ``heads-K``, which needs a calibration pass each), or comma-separated names."""
    if spec == "default":
        return list(DEFAULT)
    if spec == "all":
        return list(all_methods())
    return [m.strip() for m in spec.split(",") if m.strip()]


def resolve(names: list[str]) -> list[Method]:
    """Methods by name, the baseline first (every comparison needs it). Besides the known
    names, ``heads-K`` and ``heads-K+<known name>`` (not part of ``all``)."""
    known = all_methods()
    extra = {n: m for n in names if n not in known and (m := _heads_method(n, known)) is not None}
    unknown = [n for n in names if n not in known and n not in extra]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(known)}, "
                         "and heads-K / heads-K+<method> (KV heads merged to K, e.g. heads-1+kivi-4)")
    known.update(extra)
    ordered = [BASELINE] + [n for n in names if n != BASELINE]
    return [known[n] for n in ordered]
