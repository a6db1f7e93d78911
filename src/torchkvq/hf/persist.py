"""Saving a :class:`~torchkvq.hf.KVQCache` to disk and loading it back (prefix caching).

A file is one safetensors file. Its tensors are every layer's store (only the parts in use, see
:meth:`KVStore.state_dict`) as ``layers.<i>.store.<name>`` and the tensors of the policy's
per-layer state as ``layers.<i>.state.<field>``. Its metadata holds two strings:

* ``torchkvq``: JSON with the format name and version, the policy (class and hyper-parameters),
  the fingerprint of the model the cache belongs to (architecture, layer count, KV heads,
  head_dim, RoPE, dtype), and per layer the store's bookkeeping and the policy state's plain
  fields;
* ``checksum``: ``sha256:<hex>`` over that JSON and every tensor's name, dtype, shape and bytes.

Loading checks, in this order: a readable safetensors file (not truncated), the format and its
version, the checksum (any flipped byte), the model fingerprint against the config it is loaded
for, the policy, and then each store's consistency. Each failure raises ValueError saying what
is wrong; nothing is half-loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch

from ..policies import Policy
from ..store import KVStore

if TYPE_CHECKING:  # pragma: no cover
    from .cache import KVQCache

FORMAT = "torchkvq.KVQCache"
FORMAT_VERSION = 1


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError:  # transformers depends on it, so this is rare
        raise ImportError(
            "KVQCache.save/load need the 'safetensors' package: pip install safetensors"
        ) from None
    return safetensors


def model_fingerprint(config) -> dict[str, Any]:
    """What a cache depends on in a model config: keys and values of one model are meaningless
    to another with a different layer count, head layout, RoPE or dtype."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or {"rope_theta": getattr(text, "rope_theta", None)}
    dtype = text.dtype if hasattr(text, "dtype") else getattr(text, "torch_dtype", None)
    return {
        "model_type": getattr(text, "model_type", None),
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        "head_dim": head_dim,
        "hidden_size": text.hidden_size,
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }


# ---- policies: hyper-parameters and per-layer state as JSON + tensors -----------------------


def _encode(owner: str, name: str, value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    raise TypeError(f"KVQCache.save: cannot save {owner}.{name} of type {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"dtype"}:
        d = getattr(torch, str(value["dtype"]), None)
        if not isinstance(d, torch.dtype):
            raise ValueError(f"KVQCache.load: {value['dtype']!r} is not a torch dtype")
        return d
    return value


def policy_config(policy: Policy) -> dict[str, Any]:
    """The policy's class and hyper-parameters (a policy is a dataclass of them)."""
    cls = type(policy)
    if not dataclasses.is_dataclass(policy):
        raise TypeError(f"KVQCache.save: policy {cls.__name__} is not a dataclass, so its "
                        "configuration cannot be saved")
    fields = {f.name: _encode(cls.__name__, f.name, getattr(policy, f.name))
              for f in dataclasses.fields(policy)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}


def _policy_classes(base: type = Policy) -> dict[str, type]:
    """Every Policy subclass defined so far (only classes already imported: a file never makes
    torchkvq import a module)."""
    out: dict[str, type] = {}
    for sub in base.__subclasses__():
        out[f"{sub.__module__}.{sub.__qualname__}"] = sub
        out.update(_policy_classes(sub))
    return out


def policy_from_config(cfg: dict[str, Any]) -> Policy:
    cls = _policy_classes().get(cfg["class"])
    if cls is None:
        raise ValueError(f"KVQCache.load: the file's policy class {cfg['class']} is not defined; "
                         "import the module that defines it, or pass policy=")
    try:
        return cls(**{k: _decode(v) for k, v in cfg["fields"].items()})
    except TypeError as e:
        raise ValueError(f"KVQCache.load: the file's {cls.__name__} configuration does not fit "
                         f"this version of the class: {e}") from None


def _state_split(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A policy's per-layer state (None or a dataclass) as (tensors, JSON fields)."""
    if state is None:
        return {}, None
    if not dataclasses.is_dataclass(state):
        raise TypeError(f"KVQCache.save: policy state {type(state).__name__} is not a dataclass")
    tensors, plain = {}, {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor):
            tensors[prefix + f.name] = v.detach().clone().contiguous()
        else:
            plain[f.name] = _encode(type(state).__name__, f.name, v)
    return tensors, plain


def _state_restore(policy: Policy, tensors: dict[str, torch.Tensor], plain: dict[str, Any] | None,
                   prefix: str) -> Any:
    state = policy.new_state()
    names = {n[len(prefix):] for n in tensors if n.startswith(prefix)}
    if state is None:
        if plain is not None or names:
            raise ValueError(f"KVQCache.load: the file holds policy state the policy does not keep ({prefix})")
        return None
    fields = {f.name for f in dataclasses.fields(state)}
    if set(plain or {}) | names != fields:
        raise ValueError(f"KVQCache.load: {prefix} must hold the fields {sorted(fields)} of "
                         f"{type(state).__name__}, got {sorted(set(plain or {}) | names)}")
    for name in names:
        setattr(state, name, tensors[prefix + name])
    for name, v in (plain or {}).items():
        setattr(state, name, _decode(v))
    return state


# ---- the file ------------------------------------------------------------------------------


def _checksum(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def save_cache(cache: "KVQCache", path: str | os.PathLike) -> None:
    """Write `cache` to `path` (see the module docstring); the file appears whole or not at all."""
    st = _safetensors()
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        if layer.store is None:
            layers.append(None)
            continue
        store_t, store_meta = layer.store.state_dict()
        tensors.update({f"layers.{i}.store.{n}": t for n, t in store_t.items()})
        state_t, state_plain = _state_split(layer.state, f"layers.{i}.state.")
        tensors.update(state_t)
        layers.append({"store": store_meta, "state": state_plain,
                       "dtype": str(layer.dtype).removeprefix("torch.")})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "policy": policy_config(cache.policy),
            "model": cache.model_fingerprint, "layers": layers}
    meta_json = json.dumps(meta, sort_keys=True)
    tensors = {n: t.cpu() for n, t in tensors.items()}
    metadata = {"torchkvq": meta_json, "checksum": _checksum(meta_json, tensors)}
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".kvqcache-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        st.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path: str) -> tuple[dict, str, str, dict[str, torch.Tensor]]:
    st = _safetensors()
    try:
        with st.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except (st.SafetensorError, OSError, RuntimeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"KVQCache.load: {path} is not a readable safetensors file (truncated or "
                         f"corrupted?): {e}") from None
    if "torchkvq" not in metadata or "checksum" not in metadata:
        raise ValueError(f"KVQCache.load: {path} is a safetensors file but not a torchkvq cache "
                         "(no 'torchkvq' metadata); write one with KVQCache.save")
    try:
        meta = json.loads(metadata["torchkvq"])
    except json.JSONDecodeError as e:
        raise ValueError(f"KVQCache.load: {path} has corrupted metadata (not JSON: {e})") from None
    return meta, metadata["torchkvq"], metadata["checksum"], tensors


def load_cache(cls: type, path: str | os.PathLike, config, policy: Policy | None = None,
               device: torch.device | str | None = None) -> "KVQCache":
    """Read a cache written by :func:`save_cache` for the model of `config` (see KVQCache.load)."""
    path = os.fspath(path)
    meta, meta_json, checksum, tensors = _read(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"KVQCache.load: {path} is not a torchkvq cache file (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"KVQCache.load: {path} has format version {meta.get('format_version')!r} "
                         f"but this torchkvq reads version {FORMAT_VERSION}; re-create the cache "
                         "with this version")
    if _checksum(meta_json, tensors) != checksum:
        raise ValueError(f"KVQCache.load: {path} is corrupted: its checksum does not match its "
                         "contents")
    want = model_fingerprint(config)
    diff = {k: (meta["model"].get(k), want[k]) for k in want if meta["model"].get(k) != want[k]}
    if diff:
        detail = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"KVQCache.load: {path} was saved for another model ({detail}); a cache "
                         "only fits the model that filled it")
    saved = policy_from_config(meta["policy"]) if policy is None else policy
    if policy is not None and policy_config(policy) != meta["policy"]:
        raise ValueError(f"KVQCache.load: policy {policy!r} differs from the file's "
                         f"{meta['policy']}; pass policy=None to use the file's")
    cache = cls(config, saved)
    if len(meta["layers"]) != len(cache.layers):
        raise ValueError(f"KVQCache.load: {path} holds {len(meta['layers'])} layers, the model has "
                         f"{len(cache.layers)}")
    for i, (layer, lm) in enumerate(zip(cache.layers, meta["layers"])):
        if lm is None:
            continue
        prefix = f"layers.{i}.store."
        dev = device if device is not None else "cpu"
        store_t = {n[len(prefix):]: t.to(dev) for n, t in tensors.items() if n.startswith(prefix)}
        layer.store = KVStore.from_state_dict(store_t, lm["store"], device=dev)
        state_t = {n: t for n, t in tensors.items() if n.startswith(f"layers.{i}.state.")}
        layer.state = _state_restore(saved, state_t, lm["state"], f"layers.{i}.state.")
        layer.dtype, layer.device = getattr(torch, lm["dtype"]), layer.store.device
        layer.is_initialized = True
    return cache
